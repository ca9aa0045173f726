// model/likelihood.h: the closed-form pieces of the diffusion variational bound (Ho et al. 2020,
// Nichol & Dhariwal 2021 "Improved DDPM"), as in openai/improved-diffusion's losses.py, except that
// the decoder uses the exact normal CDF (a numerically stable log-CDF) instead of its tanh
// approximation, so the 256 bucket probabilities of a pixel sum to 1 to rounding.
#pragma once

#include <torch/torch.h>

namespace diffuse::model {

/// KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) elementwise, in nats (broadcasting).
torch::Tensor normal_kl(const torch::Tensor& mean1, const torch::Tensor& logvar1, const torch::Tensor& mean2,
                        const torch::Tensor& logvar2);

/// log(Phi(b) - Phi(a)) for a <= b elementwise, Phi the standard normal CDF, accurate in both tails
/// (computed in float64 via log_ndtr; the upper tail uses the mirrored interval). -inf bounds allowed
/// on the left, +inf on the right.
torch::Tensor log_normal_cdf_diff(const torch::Tensor& a, const torch::Tensor& b);

/// Log-probability (nats) that a Gaussian N(means, exp(log_scales)^2) puts on the 8-bit bucket of each
/// x: x is an image of uint8 values rescaled to [-1, 1] (x = k/127.5 - 1), the bucket is
/// [x - 1/255, x + 1/255] with the edge buckets extended to -inf (x = -1) and +inf (x = 1).
/// Result in the dtype of `x`.
torch::Tensor discretized_gaussian_log_likelihood(const torch::Tensor& x, const torch::Tensor& means,
                                                  const torch::Tensor& log_scales);

}  // namespace diffuse::model
