// model/schedules.cpp: the reference's beta schedules. They use its float64 torch operations in its
// order (including `1. / x` as reciprocal and the sigmoid schedule's float32 constants), so the
// float32 buffers built from them are bit-identical to Python's.
#include "model/schedules.h"

#include <cmath>
#include <numbers>
#include <stdexcept>

namespace diffuse::model {

torch::Tensor linear_beta_schedule(int64_t timesteps) {
  const double scale = 1000.0 / static_cast<double>(timesteps);
  return torch::linspace(scale * 0.0001, scale * 0.02, timesteps, torch::kFloat64);
}

torch::Tensor cosine_beta_schedule(int64_t timesteps, double s) {
  auto t = torch::linspace(0, static_cast<double>(timesteps), timesteps + 1, torch::kFloat64) / timesteps;
  auto alphas_cumprod = torch::cos((t + s) / (1 + s) * std::numbers::pi * 0.5).pow(2);
  alphas_cumprod = alphas_cumprod / alphas_cumprod[0];
  auto betas = 1 - (alphas_cumprod.slice(0, 1) / alphas_cumprod.slice(0, 0, -1));
  return torch::clamp(betas, 0, 0.999);
}

torch::Tensor sigmoid_beta_schedule(int64_t timesteps, double start, double end, double tau) {
  auto t = torch::linspace(0, static_cast<double>(timesteps), timesteps + 1, torch::kFloat64) / timesteps;
  // The reference builds these with torch.tensor(python float): float32 0-dim tensors. Added to a
  // float64 vector they are promoted, but their difference is taken in float32 (quirk kept: pure
  // float64 constants move betas by up to 6.5e-6).
  auto v_start = torch::scalar_tensor(start / tau, torch::kFloat32).sigmoid();
  auto v_end = torch::scalar_tensor(end / tau, torch::kFloat32).sigmoid();
  auto alphas_cumprod = (-((t * (end - start) + start) / tau).sigmoid() + v_end) / (v_end - v_start);
  alphas_cumprod = alphas_cumprod / alphas_cumprod[0];
  auto betas = 1 - (alphas_cumprod.slice(0, 1) / alphas_cumprod.slice(0, 0, -1));
  return torch::clamp(betas, 0, 0.999);
}

torch::Tensor beta_schedule(const std::string& name, int64_t timesteps) {
  if (name == "linear") return linear_beta_schedule(timesteps);
  if (name == "cosine") return cosine_beta_schedule(timesteps);
  if (name == "sigmoid") return sigmoid_beta_schedule(timesteps);
  throw std::invalid_argument("unknown beta schedule '" + name + "' (allowed: linear, cosine, sigmoid)");
}

}  // namespace diffuse::model
