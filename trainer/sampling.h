// trainer/sampling.h: a model from a checkpoint, and images sampled from it with the work split over
// ranks. `diffuse sample` and the trainer's sample grids both use it, so a grid and a sample
// command with the same seed draw the same images.
//
//   auto loaded = load_model("runs/demo/checkpoints/latest", "ema", device);
//   auto images = sample_images(loaded.diffusion, comm, {.n = 64, .seed = 7, .options = {...}});
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "model/diffusion.h"
#include "trainer/config.h"
#include "trainer/diffusion_model.h"

namespace diffuse::trainer {

struct LoadedModel {
  Config config;  ///< the configuration the checkpoint was trained with
  DiffusionModel diffusion;
  int64_t step = 0;
  std::string weights;                 ///< "online" or "ema.<rate>"
  std::vector<std::string> warnings;  ///< checkpoints skipped on the way (a corrupt `latest`, ...)
};

/// `which` for post-hoc EMA weights: "posthoc:<sigma_rel>", e.g. "posthoc:0.1".
inline constexpr const char* kPosthocWeights = "posthoc:";
/// A sigma_rel as given on the command line; throws std::invalid_argument unless in (0, 0.3003].
double parse_posthoc_sigma_rel(const std::string& text);

/// Reads a checkpoint in this process (a checkpoint directory, or a run directory / checkpoints
/// directory / `latest` link: the newest good one) and builds its model with the weights `which`
/// names ("ema", a rate such as "0.9999", "online", or "posthoc:<sigma_rel>": synthesized from the
/// run's post-hoc EMA snapshots up to the checkpoint's step), in eval mode on `device`.
/// `on_progress(bytes_done, bytes_total)` follows the checkpoint's reading.
LoadedModel load_model(const std::filesystem::path& checkpoint, const std::string& which, torch::Device device,
                       const std::function<void(int64_t, int64_t)>& on_progress = {});

struct SampleRequest {
  int64_t n = 64;
  uint64_t seed = 0;
  /// Images per forward pass: image i is made in chunk i / batch, on whichever rank, so the samples
  /// do not depend on the number of ranks; ranks take consecutive runs of chunks.
  int64_t batch = 16;
  model::SampleOptions options;  ///< cond_scale / rescaled_phi: the guidance of a conditional model
  /// A class-conditional model: image i's class, int64 [n] in [0, num_classes) (see class_rows);
  /// must be undefined for an unconditional one.
  torch::Tensor classes;
  /// Called on every rank after each of its chunks with the images that chunk made on all ranks
  /// together (for a progress line on rank 0).
  std::function<void(int64_t images)> on_progress;
};

/// Labels for a grid with one row per class: `per_class` images of class 0, then of class 1, ...
/// int64 [classes.size() * per_class] on the CPU.
torch::Tensor class_rows(const std::vector<int64_t>& classes, int64_t per_class);

/// `--classes`: "all" (0 .. num_classes-1) or a comma-separated list such as "0,3,7". Throws
/// std::invalid_argument naming the entry that is not an integer or lies outside [0, num_classes).
std::vector<int64_t> parse_class_list(const std::string& spec, int64_t num_classes);
/// `--classes-file`: one class per image, integers separated by white space, commas or new lines.
/// Throws naming the file and the entry (1-based) that is bad, or an empty file.
std::vector<int64_t> read_class_file(const std::filesystem::path& path, int64_t num_classes);

/// Samples `request.n` images, each rank its share, and returns all of them on every rank, on the
/// CPU, in [0, 1], [n, C, H, W]. Image i's initial noise comes from one seeded CPU stream and each
/// chunk's sampler noise is keyed by its first image's index, so the images do not depend on the
/// number of ranks. Throws std::invalid_argument when the classes do not fit the model (missing for
/// a conditional one, given to an unconditional one, wrong count or out of range).
torch::Tensor sample_images(DiffusionModel& diffusion, dist::Communicator& comm, const SampleRequest& request);

}  // namespace diffuse::trainer
