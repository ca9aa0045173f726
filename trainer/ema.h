// trainer/ema.h: exponential moving averages of the weights, with ema-pytorch's semantics (the
// reference Trainer's EMA): update_every, update_after_step and the inverse-gamma warm-up
//   decay(step) = clamp(1 - (1 + e / inv_gamma)^-power, min_value, beta),  e = step - update_after_step
// Several rates are kept at once (as guided-diffusion does, e.g. 0.9999 and 0.999), all in fp32,
// updated with _foreach kernels.
//
//   Ema ema(model->parameters(), {.decays = {0.9999, 0.999}});
//   ... optimizer.step(); ema.update();
//   ema.copy_to(sampling_model->parameters(), /*rate index*/ 0);
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

namespace diffuse::trainer {

struct EmaOptions {
  std::vector<double> decays{0.995};  ///< beta of each average (the cap of the warm-up)
  int64_t update_every = 10;
  int64_t update_after_step = 100;
  double inv_gamma = 1.0;
  double power = 2.0 / 3.0;
  double min_value = 0.0;
};

class Ema {
 public:
  /// Tracks `parameters` (the online model's tensors, e.g. parameters() then float buffers).
  Ema(std::vector<torch::Tensor> parameters, EmaOptions options);

  /// One call per optimizer step, after it (ema-pytorch's EMA.update()).
  void update();

  /// The decay the next lerp would use for rate `index` at internal step `step` (ema-pytorch's
  /// get_current_decay, computed in float32 as it is there). 0 during the warm-up.
  double decay_at(int64_t step, size_t index) const;

  size_t rates() const { return shadows_.size(); }
  double rate(size_t index) const { return options_.decays.at(index); }
  int64_t step() const { return step_; }
  bool initialized() const { return initialized_; }
  const std::vector<torch::Tensor>& shadow(size_t index) const { return shadows_.at(index); }

  /// Copies average `index` into `targets` (same order and shapes as the tracked tensors).
  void copy_to(const std::vector<torch::Tensor>& targets, size_t index) const;

  /// The averaging's progress for checkpoints: "step", "initialized".
  std::vector<std::pair<std::string, torch::Tensor>> progress_state() const;
  /// Average `index`'s tensors under `names` (the tracked tensors' names, in order).
  std::vector<std::pair<std::string, torch::Tensor>> average_state(size_t index,
                                                                   const std::vector<std::string>& names) const;
  /// Restores what progress_state() and average_state() produced (averages[i] for rate i);
  /// throws naming a missing key or a shape mismatch.
  void load_state(const std::vector<std::pair<std::string, torch::Tensor>>& progress,
                  const std::vector<std::vector<std::pair<std::string, torch::Tensor>>>& averages,
                  const std::vector<std::string>& names);

  /// A rate as checkpoint keys spell it: 0.9999 -> "0.9999" (six significant digits).
  static std::string rate_text(double rate);

 private:
  void copy_from_online();

  std::vector<torch::Tensor> online_;
  std::vector<std::vector<torch::Tensor>> shadows_;  ///< [rate][tensor], fp32
  EmaOptions options_;
  int64_t step_ = 0;
  bool initialized_ = false;
};

}  // namespace diffuse::trainer
