#include "trainer/optimization.h"

#include <cmath>
#include <map>

namespace diffuse::trainer {

double LrSchedule::at(int64_t step) const {
  if (warmup_steps > 0 && step < warmup_steps) {
    return base_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  }
  if (kind == "constant") return base_lr;
  int64_t decay_steps = std::max<int64_t>(total_steps - warmup_steps, 1);
  double progress = std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(decay_steps));
  double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine);
}

torch::Tensor clip_grad_norm(const std::vector<torch::Tensor>& grads, double max_norm) {
  if (grads.empty()) return torch::zeros({});
  torch::NoGradGuard no_grad;
  auto norms = torch::_foreach_norm(grads, 2);
  auto total = torch::linalg_vector_norm(torch::stack(norms), 2);
  if (max_norm > 0) {
    // No host sync: the clamp keeps the coefficient on the device, as torch's clip_grad_norm_ does.
    auto coefficient = torch::clamp(max_norm / (total + 1e-6), c10::nullopt, 1.0);
    torch::_foreach_mul_(grads, coefficient);
  }
  return total;
}

GradScaler::GradScaler(GradScalerOptions options) : options_(options), scale_(options.init_scale) {}

torch::Tensor GradScaler::scale(const torch::Tensor& loss) const {
  return options_.enabled ? loss * scale_ : loss;
}

bool GradScaler::unscale_(const std::vector<torch::Tensor>& grads,
                          const std::function<void(torch::Tensor&)>& agree_max) {
  if (!options_.enabled) return false;
  torch::NoGradGuard no_grad;
  auto device = grads.empty() ? torch::Device(torch::kCPU) : grads.front().device();
  auto found_inf = torch::zeros({1}, torch::TensorOptions().dtype(torch::kFloat32).device(device));
  auto inverse = torch::full({1}, 1.0 / scale_, torch::TensorOptions().dtype(torch::kFloat32).device(device));
  // One fused kernel multiplies by 1/scale and flags any non-finite value (CPU and CUDA).
  at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inverse);
  if (agree_max) agree_max(found_inf);
  return found_inf.item<float>() > 0;
}

void GradScaler::update(bool skipped) {
  if (!options_.enabled) return;
  if (skipped) {
    scale_ *= options_.backoff_factor;
    growth_tracker_ = 0;
    ++consecutive_skipped_;
    ++total_skipped_;
    if (consecutive_skipped_ >= options_.max_consecutive_skipped) {
      throw LossScaleDiverged(
          "fp16 training stopped: " + std::to_string(consecutive_skipped_) +
          " optimizer steps in a row had inf/NaN gradients (loss scale now " + std::to_string(scale_) +
          "). The model is producing non-finite values, not just overflowing: lower train.lr, check the data "
          "(inf/NaN pixels), or train with train.precision=bf16 or fp32.");
    }
    if (scale_ < options_.min_scale) {
      throw LossScaleDiverged("fp16 training stopped: the loss scale fell to " + std::to_string(scale_) +
                              ", below train.min_loss_scale=" + std::to_string(options_.min_scale) +
                              ". Gradients overflow even unscaled: lower train.lr or use train.precision=bf16.");
    }
    return;
  }
  consecutive_skipped_ = 0;
  if (++growth_tracker_ >= options_.growth_interval) {
    scale_ *= options_.growth_factor;
    growth_tracker_ = 0;
  }
}

std::vector<std::pair<std::string, torch::Tensor>> GradScaler::state() const {
  return {{"scaler.scale", torch::tensor(scale_, torch::kFloat64)},
          {"scaler.growth_tracker", torch::tensor(growth_tracker_, torch::kInt64)},
          {"scaler.consecutive_skipped", torch::tensor(consecutive_skipped_, torch::kInt64)},
          {"scaler.total_skipped", torch::tensor(total_skipped_, torch::kInt64)}};
}

void GradScaler::load_state(const std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
  std::map<std::string, torch::Tensor> by_name(tensors.begin(), tensors.end());
  auto get = [&](const std::string& key) {
    auto it = by_name.find(key);
    if (it == by_name.end()) throw std::runtime_error("checkpoint has no loss-scaler tensor '" + key + "'");
    return it->second;
  };
  scale_ = get("scaler.scale").item<double>();
  growth_tracker_ = get("scaler.growth_tracker").item<int64_t>();
  consecutive_skipped_ = get("scaler.consecutive_skipped").item<int64_t>();
  total_skipped_ = get("scaler.total_skipped").item<int64_t>();
}

}  // namespace diffuse::trainer
