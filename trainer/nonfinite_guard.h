// trainer/nonfinite_guard.h: divergence detection without a per-step host sync. Each step folds
// "was the loss or any gradient NaN/inf?" into a few device-side counters and returns a flag that
// makes the fused AdamW drop that step's update on the device, so non-finite gradients never
// reach the weights. The host reads the counters only where it already synchronises (log steps,
// checkpoints) and then applies train.on_nonfinite: stop, or skip up to
// train.max_nonfinite_skips steps in a row.
//
// Every rank sees the same all-reduced gradients and the same losses' finiteness after the
// reduction, so every rank takes the same decision without talking.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace diffuse::trainer {

class NonfiniteGuard {
 public:
  explicit NonfiniteGuard(torch::Device device);

  /// Call once per micro-batch with its per-sample losses.
  void add_losses(const torch::Tensor& losses);
  /// Call once per optimizer step with each parameter's gradient norm [P] (after the all-reduce).
  /// Returns a [1] float tensor, 1 when this step must not update the weights. Starts a new step.
  torch::Tensor end_step(const torch::Tensor& per_parameter_grad_norms, int64_t step);

  /// What the counters say (one host sync).
  struct Report {
    int64_t bad_steps = 0;    ///< since the start of this run
    int64_t consecutive = 0;  ///< bad steps in a row up to the last one
    int64_t first_step = -1;  ///< the first bad step (1-based, as logged), -1 when none
    bool first_was_loss = false;  ///< the first bad step's loss was non-finite
    int64_t first_parameter = -1;  ///< index of its first parameter with a non-finite gradient, or -1
  };
  Report read() const;
  /// Forgets this step's losses without counting it (an fp16 step the loss scaler already skipped).
  void discard_step() { loss_bad_.zero_(); }

 private:
  torch::Tensor loss_bad_;  ///< 0-dim bool, this step so far
  torch::Tensor counters_;  ///< int64 [5]: bad steps, consecutive, first step, first was loss, first parameter
};

}  // namespace diffuse::trainer
