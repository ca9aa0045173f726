// trainer/optimization.h: the optimizer step: fused AdamW, the learning-rate schedule, global
// gradient-norm clipping, and the dynamic loss scaler for fp16.
//
// The loss scaler's whole loop, for one optimizer step:
//   (scaler.scale(loss)).backward();               // per micro-step
//   reducer.finish();                              // grads all-reduced (still scaled)
//   bool skip = scaler.unscale_(grads, agree);     // unscale in place; found-inf agreed by all ranks
//   if (!skip) { clip; optimizer.step(); }
//   scaler.update(skip);                           // back off / grow; throws a diagnosis when stuck
#pragma once

#include <torch/torch.h>

#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "trainer/config.h"

namespace diffuse::trainer {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.99;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

/// torch.optim.AdamW (decoupled weight decay, bias correction) over a fixed list of parameters,
/// as one fused kernel for all of them (CPU and CUDA). Moments live beside the parameters.
class AdamW {
 public:
  AdamW(std::vector<torch::Tensor> params, std::vector<std::string> names, AdamWOptions options);
  /// One update from the parameters' current .grad() with learning rate `lr`. With `skip_if`, a
  /// 1-element float tensor on the parameters' device, the update (and its step count) is dropped
  /// on the device when it is non-zero: no host sync.
  void step(double lr, const std::optional<torch::Tensor>& skip_if = std::nullopt);
  /// "exp_avg.<name>", "exp_avg_sq.<name>" per parameter, then "step".
  NamedTensors state() const;
  /// Restores what state() produced; throws naming a missing key or a shape mismatch.
  void load_state(const NamedTensors& tensors);

 private:
  std::vector<torch::Tensor> params_;
  std::vector<std::string> names_;
  AdamWOptions options_;
  std::vector<torch::Tensor> exp_avg_, exp_avg_sq_, steps_;  ///< steps_: one 0-dim per parameter (fused API)
};

struct LrSchedule {
  double base_lr = 1e-4;
  int64_t warmup_steps = 0;
  LrScheduleKind kind = LrScheduleKind::kConstant;
  int64_t total_steps = 1;
  double min_lr_ratio = 0.0;
  /// Learning rate for optimizer step `step` (0-based): linear warm-up from base/warmup to base,
  /// then constant or cosine decay to min_lr_ratio * base at total_steps.
  double at(int64_t step) const;
};

/// Scales all gradients so their global 2-norm is at most max_norm (torch's clip_grad_norm_:
/// coefficient min(1, max_norm / (norm + 1e-6))). Returns the norm before clipping, as a 0-dim
/// tensor on the gradients' device (no host sync). Uses _foreach kernels. `per_tensor_norms`, when
/// given, receives each gradient's own norm [n] (computed anyway).
torch::Tensor clip_grad_norm(const std::vector<torch::Tensor>& grads, double max_norm,
                             torch::Tensor* per_tensor_norms = nullptr);

/// Raised when fp16 training cannot make progress (too many skipped steps or a collapsed scale).
class LossScaleDiverged : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct GradScalerOptions {
  bool enabled = false;
  double init_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  int64_t max_consecutive_skipped = 50;
  double min_scale = 1.0;
};

class GradScaler {
 public:
  explicit GradScaler(GradScalerOptions options);

  bool enabled() const { return options_.enabled; }
  /// loss * scale (identity when disabled).
  torch::Tensor scale(const torch::Tensor& loss) const;
  /// Unscales `grads` in place and returns true when any is inf/NaN on ANY rank: `agree_max`
  /// all-reduces (MAX) a 1-element float tensor so every rank takes the same decision.
  /// Disabled: returns false without touching the grads.
  bool unscale_(const std::vector<torch::Tensor>& grads, const std::function<void(torch::Tensor&)>& agree_max);
  /// Records the step's outcome: backs off on a skip, grows after growth_interval clean steps.
  /// Throws LossScaleDiverged with a diagnosis after max_consecutive_skipped skips in a row or
  /// when the scale falls below min_scale.
  void update(bool skipped);

  double scale_value() const { return scale_; }
  int64_t consecutive_skipped() const { return consecutive_skipped_; }
  int64_t total_skipped() const { return total_skipped_; }

  /// "scale", "growth_tracker", "consecutive_skipped", "total_skipped".
  NamedTensors state() const;
  void load_state(const NamedTensors& tensors);

 private:
  GradScalerOptions options_;
  double scale_;
  int64_t growth_tracker_ = 0;
  int64_t consecutive_skipped_ = 0;
  int64_t total_skipped_ = 0;
};

}  // namespace diffuse::trainer
