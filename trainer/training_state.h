// trainer/training_state.h: the one place that names every tensor of the training state in a
// checkpoint and maps the trainer's parts to and from checkpoint contents. The trainer's save and
// resume and the commands' model loading (sample, export, eval) all go through it.
//
// Checkpoint names (format_version 1):
//   model.<param>                          online U-Net weights (the reference's state-dict names)
//   optim.exp_avg.<param>, optim.exp_avg_sq.<param>, optim.step        AdamW
//   ema.<rate>.<param>                     one average per rate, e.g. ema.0.9999.final_conv.weight
//   ema_state.step, ema_state.initialized  the averaging's progress
//   scaler.scale, .growth_tracker, .consecutive_skipped, .total_skipped   fp16 loss scaler
//   timestep_sampler.loss_history, .loss_counts                        loss-aware timestep sampler
// and per rank:
//   rng                                    this rank's generator state
//   loader.epoch, loader.position, loader.seed, loader.samples_seen    this rank's loader
// (checkpoints written before the named loader entries hold one int64 tensor "loader" with
// [epoch, position, seed, samples_seen]; they are still read).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "data/loader.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/ema.h"
#include "trainer/optimization.h"
#include "trainer/timestep_sampler.h"

namespace diffuse::trainer {

/// The parts a checkpoint captures, by reference (the Trainer owns them).
struct TrainingParts {
  const std::vector<std::string>& names;  ///< U-Net parameter names, in parameter order
  std::vector<torch::Tensor>& params;
  AdamW& optimizer;
  Ema& ema;
  GradScaler& scaler;
  TimestepSampler& sampler;
  torch::Generator& generator;
  data::Loader& loader;
};

/// The training state at `step` as checkpoint contents (the config and metadata are the caller's).
CheckpointContents capture_training_state(const TrainingParts& parts, int64_t step);

/// What a restore tells the trainer beyond the parts it filled.
struct RestoredProgress {
  int64_t step = 0;
  /// This rank did not exist in the saved world: its generator was not restored (the caller
  /// re-seeds it) and its loader position was derived from the global sample count.
  bool per_rank_inherited = false;
};

/// Fills every part from `checkpoint`; throws naming the first missing or misshapen tensor.
RestoredProgress restore_training_state(const LoadedCheckpoint& checkpoint, TrainingParts& parts);

/// Which weights of a checkpoint to use: "online", "ema" (the first EMA rate), or a rate ("0.9999").
struct ModelWeights {
  std::string label;      ///< "online" or "ema.<rate>"
  NamedTensors tensors;  ///< under the U-Net's own names
};
/// The U-Net weights `which` names, for `names`; throws listing the rates the checkpoint keeps.
ModelWeights model_weights(const LoadedCheckpoint& checkpoint, const Config& saved_config, const std::string& which,
                           const std::vector<std::string>& names);

}  // namespace diffuse::trainer
