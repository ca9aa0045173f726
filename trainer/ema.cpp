#include "trainer/ema.h"

#include <sstream>
#include <stdexcept>

namespace diffuse::trainer {

Ema::Ema(std::vector<torch::Tensor> parameters, EmaOptions options)
    : online_(std::move(parameters)), options_(std::move(options)) {
  if (options_.decays.empty()) throw std::invalid_argument("Ema needs at least one decay rate");
  torch::NoGradGuard no_grad;
  for (size_t r = 0; r < options_.decays.size(); ++r) {
    std::vector<torch::Tensor> shadow;
    shadow.reserve(online_.size());
    for (const auto& tensor : online_) shadow.push_back(tensor.detach().to(torch::kFloat32).clone());
    shadows_.push_back(std::move(shadow));
  }
}

double Ema::decay_at(int64_t step, size_t index) const {
  // ema-pytorch computes this on float32 tensors; mirror it so the caps agree bit for bit
  // (e.g. 0.995 becomes float32(0.995) = 0.99500000477).
  int64_t epoch = std::max<int64_t>(step - options_.update_after_step - 1, 0);
  if (epoch <= 0) return 0.0;
  auto e = torch::tensor(static_cast<float>(epoch));
  auto value = 1 - (1 + e / options_.inv_gamma).pow(-options_.power);
  return value.clamp(options_.min_value, options_.decays.at(index)).item<float>();
}

void Ema::copy_from_online() {
  torch::NoGradGuard no_grad;
  for (auto& shadow : shadows_) {
    for (size_t i = 0; i < online_.size(); ++i) shadow[i].copy_(online_[i]);
  }
}

void Ema::update() {
  int64_t current = step_;
  ++step_;
  if (!initialized_) {
    copy_from_online();
    initialized_ = true;
    return;
  }
  if (current % options_.update_every != 0) return;
  if (current <= options_.update_after_step) {
    copy_from_online();
    return;
  }
  torch::NoGradGuard no_grad;
  // Online weights may be a different dtype than the fp32 shadows only if someone trains in
  // low precision; the lerp needs matching dtypes.
  std::vector<torch::Tensor> online32;
  online32.reserve(online_.size());
  for (const auto& tensor : online_) online32.push_back(tensor.dtype() == torch::kFloat32 ? tensor : tensor.to(torch::kFloat32));
  for (size_t r = 0; r < shadows_.size(); ++r) {
    double decay = decay_at(step_, r);
    torch::_foreach_lerp_(shadows_[r], online32, 1.0 - decay);
  }
}

void Ema::copy_to(const std::vector<torch::Tensor>& targets, size_t index) const {
  const auto& shadow = shadows_.at(index);
  if (targets.size() != shadow.size()) {
    throw std::invalid_argument("Ema::copy_to: " + std::to_string(targets.size()) + " targets for " +
                                std::to_string(shadow.size()) + " averaged tensors");
  }
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < shadow.size(); ++i) targets[i].copy_(shadow[i]);
}

std::string Ema::rate_text(double rate) {
  std::ostringstream text;
  text << rate;
  return text.str();
}

std::vector<std::pair<std::string, torch::Tensor>> Ema::progress_state() const {
  return {{"step", torch::tensor(step_, torch::kInt64)},
          {"initialized", torch::tensor(static_cast<int64_t>(initialized_), torch::kInt64)}};
}

std::vector<std::pair<std::string, torch::Tensor>> Ema::average_state(size_t index,
                                                                      const std::vector<std::string>& names) const {
  if (names.size() != online_.size()) throw std::invalid_argument("Ema::average_state: names do not match tracked tensors");
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t i = 0; i < names.size(); ++i) out.emplace_back(names[i], shadows_.at(index)[i]);
  return out;
}

void Ema::load_state(const std::vector<std::pair<std::string, torch::Tensor>>& progress,
                     const std::vector<std::vector<std::pair<std::string, torch::Tensor>>>& averages,
                     const std::vector<std::string>& names) {
  if (averages.size() != shadows_.size()) {
    throw std::runtime_error("the checkpoint keeps " + std::to_string(averages.size()) + " EMA rates, this run " +
                             std::to_string(shadows_.size()));
  }
  auto find = [](const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                 const std::string& key) -> const torch::Tensor& {
    for (const auto& [name, tensor] : tensors) {
      if (name == key) return tensor;
    }
    throw std::runtime_error("checkpoint has no EMA tensor '" + key + "'");
  };
  step_ = find(progress, "step").item<int64_t>();
  initialized_ = find(progress, "initialized").item<int64_t>() != 0;
  torch::NoGradGuard no_grad;
  for (size_t r = 0; r < shadows_.size(); ++r) {
    for (size_t i = 0; i < names.size(); ++i) {
      const auto& saved = find(averages[r], names[i]);
      if (saved.sizes() != shadows_[r][i].sizes()) {
        throw std::runtime_error("checkpoint EMA tensor '" + rate_text(rate(r)) + "." + names[i] + "' has shape " +
                                 c10::str(saved.sizes()) + ", the model expects " + c10::str(shadows_[r][i].sizes()));
      }
      shadows_[r][i].copy_(saved);
    }
  }
}

}  // namespace diffuse::trainer
