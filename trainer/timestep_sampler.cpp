#include "trainer/timestep_sampler.h"

#include <map>
#include <stdexcept>

namespace diffuse::trainer {

TimestepSampler::TimestepSampler(TimestepSamplerKind kind, int64_t timesteps, int64_t history_per_term, double uniform_prob)
    : kind_(kind), timesteps_(timesteps), history_per_term_(history_per_term), uniform_prob_(uniform_prob) {
  loss_history_ = torch::zeros({timesteps_, history_per_term_}, torch::kFloat64);
  loss_counts_ = torch::zeros({timesteps_}, torch::kInt64);
}

bool TimestepSampler::warmed_up() const {
  return kind_ == TimestepSamplerKind::kLossAware && (loss_counts_ == history_per_term_).all().item<bool>();
}

torch::Tensor TimestepSampler::probabilities() const {
  if (!warmed_up()) return torch::full({timesteps_}, 1.0 / static_cast<double>(timesteps_), torch::kFloat64);
  auto weights = loss_history_.pow(2).mean(-1).sqrt();
  weights = weights / weights.sum();
  weights = weights * (1 - uniform_prob_) + uniform_prob_ / static_cast<double>(timesteps_);
  return weights / weights.sum();
}

TimestepSampler::Draw TimestepSampler::sample(int64_t batch, torch::Generator& generator, torch::Device device) const {
  if (kind_ == TimestepSamplerKind::kUniform) {
    auto t = torch::randint(0, timesteps_, {batch}, generator, torch::TensorOptions().dtype(torch::kInt64));
    return {t.to(device), torch::ones({batch}, torch::TensorOptions().device(device))};
  }
  auto p = probabilities();
  auto t = torch::multinomial(p, batch, /*replacement=*/true, generator);
  auto weights = (1.0 / (static_cast<double>(timesteps_) * p.index_select(0, t))).to(torch::kFloat32);
  return {t.to(device), weights.to(device)};
}

void TimestepSampler::update(const torch::Tensor& all_t, const torch::Tensor& all_losses) {
  if (kind_ != TimestepSamplerKind::kLossAware) return;
  auto ts = all_t.to(torch::kCPU, torch::kInt64).contiguous();
  auto losses = all_losses.to(torch::kCPU, torch::kFloat64).contiguous();
  auto* t_data = ts.data_ptr<int64_t>();
  auto* l_data = losses.data_ptr<double>();
  auto history = loss_history_.accessor<double, 2>();
  auto counts = loss_counts_.accessor<int64_t, 1>();
  for (int64_t i = 0; i < ts.numel(); ++i) {
    int64_t t = t_data[i];
    if (t < 0 || t >= timesteps_) throw std::out_of_range("timestep " + std::to_string(t) + " out of range");
    if (counts[t] == history_per_term_) {
      for (int64_t k = 0; k + 1 < history_per_term_; ++k) history[t][k] = history[t][k + 1];
      history[t][history_per_term_ - 1] = l_data[i];
    } else {
      history[t][counts[t]] = l_data[i];
      counts[t] += 1;
    }
  }
}

std::vector<std::pair<std::string, torch::Tensor>> TimestepSampler::state() const {
  return {{"loss_history", loss_history_}, {"loss_counts", loss_counts_}};
}

void TimestepSampler::load_state(const std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
  std::map<std::string, torch::Tensor> by_name(tensors.begin(), tensors.end());
  auto history = by_name.find("loss_history");
  auto counts = by_name.find("loss_counts");
  if (history == by_name.end() || counts == by_name.end()) {
    throw std::runtime_error("checkpoint has no timestep sampler state (loss_history/loss_counts)");
  }
  if (history->second.sizes() != loss_history_.sizes()) {
    throw std::runtime_error("checkpoint timestep sampler history has shape " + c10::str(history->second.sizes()) +
                             ", this run expects " + c10::str(loss_history_.sizes()) + " (diffusion.timesteps changed?)");
  }
  loss_history_.copy_(history->second);
  loss_counts_.copy_(counts->second);
}

}  // namespace diffuse::trainer
