// model/likelihood.cpp: the Gaussian KL and the discretized Gaussian decoder of the variational
// bound (openai/improved-diffusion's formulas), computed in float64 with the exact normal CDF.
#include "model/likelihood.h"

#include <cmath>
#include <limits>
#include <numbers>

namespace diffuse::model {

torch::Tensor normal_kl(const torch::Tensor& mean1, const torch::Tensor& logvar1, const torch::Tensor& mean2,
                        const torch::Tensor& logvar2) {
  return 0.5 * (-1.0 + logvar2 - logvar1 + torch::exp(logvar1 - logvar2) +
                (mean1 - mean2).pow(2) * torch::exp(-logvar2));
}

namespace {

// log(1 - exp(x)) for x <= 0 (Maechler's log1mexp). Each branch sees only inputs where it is safe,
// so neither the value nor the gradient of the unused branch can be NaN.
torch::Tensor log1mexp(const torch::Tensor& x) {
  const double cut = -std::numbers::ln2;
  auto near = x > cut;
  auto x_near = torch::where(near, x, torch::full_like(x, -1.0));
  auto x_far = torch::where(near, torch::full_like(x, -1.0), x);
  return torch::where(near, torch::log(-torch::expm1(x_near)), torch::log1p(-torch::exp(x_far)));
}

}  // namespace

torch::Tensor log_normal_cdf_diff(const torch::Tensor& a, const torch::Tensor& b) {
  auto a64 = a.to(torch::kFloat64), b64 = b.to(torch::kFloat64);
  // In the upper tail both CDFs round to 1 and their difference cancels; mirror the interval so
  // both ends sit in the lower tail, where log_ndtr keeps full relative precision.
  auto flip = a64 > 0;
  auto lo = torch::where(flip, -b64, a64);
  auto hi = torch::where(flip, -a64, b64);
  auto log_hi = torch::special::log_ndtr(hi);
  return log_hi + log1mexp(torch::special::log_ndtr(lo) - log_hi);
}

torch::Tensor discretized_gaussian_log_likelihood(const torch::Tensor& x, const torch::Tensor& means,
                                                  const torch::Tensor& log_scales) {
  TORCH_CHECK(x.sizes() == means.sizes() && x.sizes() == log_scales.sizes(),
              "discretized_gaussian_log_likelihood: x, means and log_scales must have one shape, got ", x.sizes(),
              ", ", means.sizes(), ", ", log_scales.sizes());
  auto x64 = x.to(torch::kFloat64);
  auto centered = x64 - means.to(torch::kFloat64);
  auto inv_stdv = torch::exp(-log_scales.to(torch::kFloat64));
  auto plus_in = inv_stdv * (centered + 1.0 / 255.0);
  auto min_in = inv_stdv * (centered - 1.0 / 255.0);
  // Edge buckets reach to -inf / +inf: P = Phi(plus_in) at x = -1 and 1 - Phi(min_in) = Phi(-min_in)
  // at x = 1. Every branch works on finite inputs, so no inf reaches a gradient.
  auto lower_edge = torch::special::log_ndtr(plus_in);
  auto upper_edge = torch::special::log_ndtr(-min_in);
  auto interior = log_normal_cdf_diff(min_in, plus_in);
  auto log_probs = torch::where(x64 < -0.999, lower_edge, torch::where(x64 > 0.999, upper_edge, interior));
  return log_probs.to(x.scalar_type());
}

}  // namespace diffuse::model
