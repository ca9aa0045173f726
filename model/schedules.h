// model/schedules.h: the reference's beta schedules, computed with the same float64 torch
// operations (and the sigmoid schedule's float32 constants) so the buffers derived from them are
// bit-identical to denoising-diffusion-pytorch's.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace diffuse::model {

/// DDPM's linear schedule, stretched to T steps: linspace(1e-4 * 1000/T, 0.02 * 1000/T, T), float64.
torch::Tensor linear_beta_schedule(int64_t timesteps);

/// Improved DDPM's cosine schedule: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas clipped to
/// [0, 0.999], float64.
torch::Tensor cosine_beta_schedule(int64_t timesteps, double s = 0.008);

/// The sigmoid schedule of Jabri et al. (arXiv:2212.11972, Fig. 8): alpha_bar from a shifted sigmoid
/// between `start` and `end`, betas clipped to [0, 0.999], float64. Like the reference, the two
/// sigmoid end values are float32 scalars and their difference is taken in float32.
torch::Tensor sigmoid_beta_schedule(int64_t timesteps, double start = -3, double end = 3, double tau = 1);

/// The schedule named `name` ("linear", "cosine" or "sigmoid"); throws std::invalid_argument otherwise.
torch::Tensor beta_schedule(const std::string& name, int64_t timesteps);

}  // namespace diffuse::model
