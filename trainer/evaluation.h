// trainer/evaluation.h: the variational bound in bits/dim on held-out images, with the images split
// over ranks (`diffuse eval`).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>

#include "dist/communicator.h"
#include "model/diffusion.h"

namespace diffuse::trainer {

struct BoundRequest {
  std::filesystem::path data;  ///< HDF5 dataset (diffuse prep)
  int64_t n = 1000;            ///< first n images (fewer when the dataset is smaller)
  int64_t batch = 16;
  uint64_t seed = 0;           ///< the noise of the bound's terms; rank r uses seed + r
  /// A class-conditional model: condition every image on this class; unset: on its label in the
  /// dataset (which must then have labels). The bound uses the conditional model unguided
  /// (cond_scale 1), the likelihood it was trained for. Must be unset for an unconditional model.
  std::optional<int64_t> fixed_class;
  /// Called after each batch with the images that batch covered on all ranks together.
  std::function<void(int64_t images)> on_progress;
};

/// Means over images (bits/dim) and the standard error of the total.
struct BoundSummary {
  int64_t images = 0;
  double total = 0, standard_error = 0, prior = 0, decoder = 0, terms = 0;
};

/// Every rank evaluates its contiguous share; the sums are reduced over `comm`. Throws naming the
/// file when its images do not match the model's size or channels, or (conditional model) when it
/// has no labels or one outside [0, num_classes), naming the image.
BoundSummary evaluate_bits_per_dim(model::GaussianDiffusionImpl& diffusion, dist::Communicator& comm,
                                   const BoundRequest& request);

}  // namespace diffuse::trainer
