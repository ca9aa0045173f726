#include "trainer/optimization.h"

// trainer/optimization.cpp: see optimization.h.
#include <cmath>
#include <map>

namespace diffuse::trainer {

namespace {

/// The tensor named `key`, or a message naming what the checkpoint lacks.
const torch::Tensor& find_state(const std::map<std::string, torch::Tensor>& by_name, const std::string& key,
                                const char* part) {
  auto it = by_name.find(key);
  if (it == by_name.end()) throw std::runtime_error(std::string("checkpoint has no ") + part + " tensor '" + key + "'");
  return it->second;
}

void copy_checked(torch::Tensor& target, const torch::Tensor& saved, const std::string& key) {
  if (saved.sizes() != target.sizes()) {
    throw std::runtime_error("checkpoint tensor '" + key + "' has shape " + c10::str(saved.sizes()) +
                             ", this run expects " + c10::str(target.sizes()));
  }
  torch::NoGradGuard no_grad;
  target.copy_(saved);
}

}  // namespace

AdamW::AdamW(std::vector<torch::Tensor> params, std::vector<std::string> names, AdamWOptions options)
    : params_(std::move(params)), names_(std::move(names)), options_(options) {
  if (names_.size() != params_.size()) throw std::invalid_argument("AdamW: one name per parameter");
  for (const auto& p : params_) {
    exp_avg_.push_back(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    exp_avg_sq_.push_back(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    steps_.push_back(torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat32).device(p.device())));
  }
}

void AdamW::step(double lr, const std::optional<torch::Tensor>& skip_if) {
  std::vector<torch::Tensor> grads;
  grads.reserve(params_.size());
  for (auto& p : params_) grads.push_back(p.grad());
  torch::NoGradGuard no_grad;
  torch::_foreach_add_(steps_, 1);
  // The fused kernel returns without touching anything when found_inf is non-zero; the step count
  // is taken back as torch.optim's fused path does.
  c10::optional<at::Tensor> found_inf;
  if (skip_if) found_inf = *skip_if;
  at::_fused_adamw_(params_, grads, exp_avg_, exp_avg_sq_, /*max_exp_avg_sqs=*/{}, steps_, lr, options_.beta1,
                    options_.beta2, options_.weight_decay, options_.eps, /*amsgrad=*/false, /*maximize=*/false,
                    /*grad_scale=*/c10::nullopt, found_inf);
  if (skip_if) {
    std::vector<torch::Tensor> taken_back(steps_.size(), skip_if->reshape({}));
    torch::_foreach_sub_(steps_, taken_back);
  }
}

NamedTensors AdamW::state() const {
  NamedTensors out;
  for (size_t i = 0; i < names_.size(); ++i) out.emplace_back("exp_avg." + names_[i], exp_avg_[i]);
  for (size_t i = 0; i < names_.size(); ++i) out.emplace_back("exp_avg_sq." + names_[i], exp_avg_sq_[i]);
  if (!steps_.empty()) out.emplace_back("step", steps_.front());
  return out;
}

void AdamW::load_state(const NamedTensors& tensors) {
  std::map<std::string, torch::Tensor> by_name(tensors.begin(), tensors.end());
  for (size_t i = 0; i < names_.size(); ++i) {
    copy_checked(exp_avg_[i], find_state(by_name, "exp_avg." + names_[i], "optimizer"), "exp_avg." + names_[i]);
    copy_checked(exp_avg_sq_[i], find_state(by_name, "exp_avg_sq." + names_[i], "optimizer"),
                 "exp_avg_sq." + names_[i]);
  }
  if (steps_.empty()) return;
  const auto& step = find_state(by_name, "step", "optimizer");
  for (auto& s : steps_) copy_checked(s, step, "step");
}

double LrSchedule::at(int64_t step) const {
  if (warmup_steps > 0 && step < warmup_steps) {
    return base_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  }
  if (kind == LrScheduleKind::kConstant) return base_lr;
  int64_t decay_steps = std::max<int64_t>(total_steps - warmup_steps, 1);
  double progress = std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(decay_steps));
  double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine);
}

torch::Tensor clip_grad_norm(const std::vector<torch::Tensor>& grads, double max_norm,
                             torch::Tensor* per_tensor_norms) {
  if (grads.empty()) return torch::zeros({});
  torch::NoGradGuard no_grad;
  auto norms = torch::stack(torch::_foreach_norm(grads, 2));
  if (per_tensor_norms != nullptr) *per_tensor_norms = norms;
  auto total = torch::linalg_vector_norm(norms, 2);
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

NamedTensors GradScaler::state() const {
  return {{"scale", torch::tensor(scale_, torch::kFloat64)},
          {"growth_tracker", torch::tensor(growth_tracker_, torch::kInt64)},
          {"consecutive_skipped", torch::tensor(consecutive_skipped_, torch::kInt64)},
          {"total_skipped", torch::tensor(total_skipped_, torch::kInt64)}};
}

void GradScaler::load_state(const NamedTensors& tensors) {
  std::map<std::string, torch::Tensor> by_name(tensors.begin(), tensors.end());
  auto get = [&](const std::string& key) { return find_state(by_name, key, "loss-scaler"); };
  scale_ = get("scale").item<double>();
  growth_tracker_ = get("growth_tracker").item<int64_t>();
  consecutive_skipped_ = get("consecutive_skipped").item<int64_t>();
  total_skipped_ = get("total_skipped").item<int64_t>();
}

}  // namespace diffuse::trainer
