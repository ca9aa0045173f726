#include "trainer/posthoc_ema.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

namespace diffuse::trainer {

namespace {

// sigma_rel(gamma) rises from 0 at gamma = -1 to its peak here and falls toward 0 after it.
double peak_gamma() { return (std::sqrt(5.0) - 3.0) / 2.0; }

std::string text(double value) {
  std::ostringstream out;
  out.precision(17);
  out << value;
  return out.str();
}

// Algorithm 3's <p_a, p_b>, the inner product of two power-function profiles, with the same
// tensor operations as ema-pytorch's p_dot_p so the float64 values agree.
torch::Tensor p_dot_p(const torch::Tensor& t_a, const torch::Tensor& gamma_a, const torch::Tensor& t_b,
                      const torch::Tensor& gamma_b) {
  auto t_ratio = t_a / t_b;
  auto t_exp = torch::where(t_a < t_b, gamma_b, -gamma_a);
  auto t_max = torch::maximum(t_a, t_b);
  auto num = (gamma_a + 1) * (gamma_b + 1) * t_ratio.pow(t_exp);
  auto den = (gamma_a + gamma_b + 1) * t_max;
  return num / den;
}

}  // namespace

double max_sigma_rel() { return gamma_to_sigma_rel(peak_gamma()); }

double gamma_to_sigma_rel(double gamma) {
  if (!(gamma > -1.0) || !std::isfinite(gamma)) {
    throw std::invalid_argument("post-hoc EMA gamma must be a finite number > -1, got " + text(gamma));
  }
  return std::sqrt((gamma + 1.0) / ((gamma + 2.0) * (gamma + 2.0) * (gamma + 3.0)));
}

double sigma_rel_to_gamma(double sigma_rel) {
  double peak = max_sigma_rel();
  if (!(sigma_rel > 0.0) || sigma_rel > peak) {
    throw std::invalid_argument("post-hoc EMA sigma_rel must be in (0, " + text(peak) + "], got " + text(sigma_rel) +
                                " (larger relative widths have no power-function profile)");
  }
  // Newton's method on the cubic from above its largest root: right of the inflection point
  // (-7/3) the cubic is increasing and convex, so the iterates fall monotonically onto the root
  // (linearly only at the peak, where the two roots right of -1 merge). It stops when they stop
  // falling, i.e. at the root to rounding.
  double t = 1.0 / (sigma_rel * sigma_rel);
  auto cubic = [t](double g) { return ((g + 7.0) * g + (16.0 - t)) * g + (12.0 - t); };
  auto slope = [t](double g) { return (3.0 * g + 14.0) * g + (16.0 - t); };
  double gamma = 1.0 + std::max({7.0, std::abs(16.0 - t), std::abs(12.0 - t)});  // Cauchy's bound
  for (int iteration = 0; iteration < 2000; ++iteration) {
    double value = cubic(gamma);
    if (value <= 0.0) break;
    double next = gamma - value / slope(gamma);
    if (!(next < gamma)) break;
    gamma = next;
  }
  return std::max(gamma, peak_gamma());
}

PowerEma::PowerEma(std::vector<torch::Tensor> parameters, double gamma, int64_t update_every)
    : online_(std::move(parameters)), gamma_(gamma), update_every_(update_every) {
  gamma_to_sigma_rel(gamma);  // validates gamma
  if (update_every_ < 1) throw std::invalid_argument("PowerEma update_every must be >= 1, got " + std::to_string(update_every));
  torch::NoGradGuard no_grad;
  average_.reserve(online_.size());
  for (const auto& tensor : online_) average_.push_back(tensor.detach().to(torch::kFloat32).clone());
}

double PowerEma::beta_at(int64_t step) const {
  return std::pow(1.0 - 1.0 / (static_cast<double>(step) + 1.0), 1.0 + gamma_);
}

void PowerEma::update() {
  int64_t current = step_;
  ++step_;
  if (current % update_every_ != 0) return;
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> online32;
  online32.reserve(online_.size());
  for (const auto& tensor : online_) {
    online32.push_back(tensor.dtype() == torch::kFloat32 ? tensor.detach() : tensor.detach().to(torch::kFloat32));
  }
  if (!initialized_) {
    for (size_t i = 0; i < average_.size(); ++i) average_[i].copy_(online32[i]);
    initialized_ = true;
  }
  torch::_foreach_lerp_(average_, online32, 1.0 - beta_at(step_));
}

void PowerEma::load_state(int64_t step, bool initialized, const std::vector<torch::Tensor>& average) {
  if (average.size() != average_.size()) {
    throw std::invalid_argument("PowerEma::load_state: " + std::to_string(average.size()) + " saved tensors for " +
                                std::to_string(average_.size()) + " tracked ones");
  }
  for (size_t i = 0; i < average.size(); ++i) {
    if (average[i].sizes() != average_[i].sizes()) {
      throw std::invalid_argument("PowerEma::load_state: saved tensor " + std::to_string(i) + " has shape " +
                                  c10::str(average[i].sizes()) + ", the tracked one " + c10::str(average_[i].sizes()));
    }
  }
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < average.size(); ++i) average_[i].copy_(average[i]);
  step_ = step;
  initialized_ = initialized;
}

std::vector<double> solve_posthoc_weights(const std::vector<PosthocSnapshot>& snapshots, double target_gamma,
                                          int64_t target_step) {
  if (snapshots.empty()) throw std::invalid_argument("post-hoc EMA needs at least one snapshot to solve for weights");
  gamma_to_sigma_rel(target_gamma);
  if (target_step < 1) throw std::invalid_argument("post-hoc EMA target step must be >= 1, got " + std::to_string(target_step));
  std::vector<double> steps, gammas;
  for (size_t i = 0; i < snapshots.size(); ++i) {
    if (snapshots[i].step < 1) {
      throw std::invalid_argument("post-hoc EMA snapshot " + std::to_string(i) + " has step " +
                                  std::to_string(snapshots[i].step) + "; steps start at 1");
    }
    if (!(snapshots[i].gamma > -1.0)) {
      throw std::invalid_argument("post-hoc EMA snapshot " + std::to_string(i) + " has gamma " +
                                  text(snapshots[i].gamma) + "; gamma must be > -1");
    }
    steps.push_back(static_cast<double>(snapshots[i].step));
    gammas.push_back(snapshots[i].gamma);
  }
  auto options = torch::TensorOptions().dtype(torch::kFloat64);
  auto t_i = torch::tensor(steps, options), gamma_i = torch::tensor(gammas, options);
  auto t_r = torch::tensor({static_cast<double>(target_step)}, options), gamma_r = torch::tensor({target_gamma}, options);
  auto rows = [](const torch::Tensor& x) { return x.reshape({-1, 1}); };
  auto columns = [](const torch::Tensor& x) { return x.reshape({1, -1}); };
  auto a = p_dot_p(rows(t_i), rows(gamma_i), columns(t_i), columns(gamma_i));
  auto b = p_dot_p(rows(t_i), rows(gamma_i), columns(t_r), columns(gamma_r));
  auto [solution, info] = torch::linalg_solve_ex(a, b);
  if (info.item<int64_t>() != 0 || !torch::isfinite(solution).all().item<bool>()) {
    throw std::invalid_argument("post-hoc EMA weights cannot be solved: the snapshots' profiles are linearly "
                                "dependent (a (step, gamma) pair repeated?)");
  }
  auto flat = solution.reshape({-1}).contiguous();
  return {flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel()};
}

NamedTensors synthesize_posthoc_ema(const std::vector<PosthocSnapshot>& snapshots, const SnapshotReader& read,
                                    double target_sigma_rel, std::optional<int64_t> target_step) {
  if (snapshots.empty()) throw std::invalid_argument("post-hoc EMA synthesis found no snapshots");
  double target_gamma = sigma_rel_to_gamma(target_sigma_rel);
  int64_t last_step = 0;
  std::vector<PosthocSnapshot> rounded = snapshots;
  for (auto& snapshot : rounded) {
    last_step = std::max(last_step, snapshot.step);
    snapshot.gamma = static_cast<float>(snapshot.gamma);
  }
  int64_t step = target_step.value_or(last_step);
  if (step > last_step) {
    throw std::invalid_argument("post-hoc EMA can synthesize up to the last snapshot step " + std::to_string(last_step) +
                                ", asked for step " + std::to_string(step));
  }
  auto weights = solve_posthoc_weights(rounded, static_cast<float>(target_gamma), step);

  NamedTensors synthesized;
  torch::NoGradGuard no_grad;
  for (size_t s = 0; s < snapshots.size(); ++s) {
    NamedTensors tensors = read(s);
    std::string where = "post-hoc EMA snapshot " + std::to_string(s) + " (step " + std::to_string(snapshots[s].step) +
                        ", gamma " + text(snapshots[s].gamma) + ")";
    if (s == 0) {
      for (const auto& [name, tensor] : tensors) {
        if (!tensor.is_floating_point()) throw std::invalid_argument(where + ": tensor '" + name + "' is not floating point");
        synthesized.emplace_back(name, tensor.to(torch::kFloat32) * weights[0]);
      }
      continue;
    }
    if (tensors.size() != synthesized.size()) {
      throw std::invalid_argument(where + " has " + std::to_string(tensors.size()) + " tensors, snapshot 0 has " +
                                  std::to_string(synthesized.size()));
    }
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto& [name, tensor] = tensors[i];
      auto& [expected_name, sum] = synthesized[i];
      if (name != expected_name) {
        throw std::invalid_argument(where + ": tensor " + std::to_string(i) + " is '" + name + "', snapshot 0 has '" +
                                    expected_name + "' there");
      }
      if (tensor.sizes() != sum.sizes()) {
        throw std::invalid_argument(where + ": tensor '" + name + "' has shape " + c10::str(tensor.sizes()) +
                                    ", snapshot 0 has " + c10::str(sum.sizes()));
      }
      if (!tensor.is_floating_point()) throw std::invalid_argument(where + ": tensor '" + name + "' is not floating point");
      // As the reference: the snapshot in the model's float32, scaled, then added.
      sum.add_(tensor.to(sum.device(), torch::kFloat32) * weights[s]);
    }
  }
  return synthesized;
}

}  // namespace diffuse::trainer
