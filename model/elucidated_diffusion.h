// model/elucidated_diffusion.h: EDM (Karras et al. 2022, "Elucidating the Design Space of
// Diffusion-Based Generative Models") around a denoiser, the C++ counterpart of the reference's
// `ElucidatedDiffusion` (denoising-diffusion-pytorch 2.3.1, elucidated_diffusion.py): the
// preconditioning c_skip / c_out / c_in / c_noise, log-normal noise levels for training with EDM's
// loss weight, self-conditioning, the rho schedule, the stochastic Heun sampler (S_churn, S_tmin,
// S_tmax, S_noise) and DPM-Solver++(2M). Same numbers as the reference for the same weights and draws.
//
// The denoiser is the reference's Unet with a learned or random Fourier time embedding (the
// reference asserts `random_or_learned_sinusoidal_cond`; the time it sees is c_noise = ln(sigma)/4)
// or a KarrasUnet (unconditional: the reference passes the net no class labels). It is registered as
// "net", so state_dict keys are the reference's ("net.init_conv.weight", ...). There are no buffers.
//
// Randomness: every draw takes an explicit torch::Generator (undefined = torch's default), drawn on
// the generator's device and moved to the data's, in the reference's order and shapes; seeded alike, a
// CPU generator reproduces the reference's CPU draws. The one exception is forward()'s
// self-conditioning coin, which the reference takes from Python's `random`; here it is one uniform
// draw from the generator (as GaussianDiffusion does), and losses() takes it as an argument.
//
//   ElucidatedOptions options;
//   options.image_size = 32;
//   UnetOptions unet;
//   unet.learned_sinusoidal_cond = true;
//   ElucidatedDiffusion edm(Unet(unet), options);
//   auto gen = at::make_generator<at::CPUGeneratorImpl>(/*seed=*/0);
//   auto loss = edm->forward(images_in_0_1, gen);              // scalar, as the reference's forward
//   auto images = edm->sample(16, gen);                          // Heun, 32 steps, in [0, 1]
//   auto fast = edm->sample_using_dpmpp(16, gen, /*steps=*/20);
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <string>

#include "model/karras_unet.h"
#include "model/unet.h"

namespace diffuse::model {

/// Constructor options of the reference `ElucidatedDiffusion` (same names and defaults; image_size
/// has none in Python, 128 here).
struct ElucidatedOptions {
  int64_t image_size = 128;
  int64_t channels = 3;
  int64_t num_sample_steps = 32;
  double sigma_min = 0.002;
  double sigma_max = 80;
  double sigma_data = 0.5;  ///< standard deviation of the data (in [-1, 1])
  double rho = 7;           ///< curvature of the sampling schedule
  double P_mean = -1.2;     ///< training: ln(sigma) ~ N(P_mean, P_std^2)
  double P_std = 1.2;
  double S_churn = 80;  ///< stochastic sampling (the paper's Table 5)
  double S_tmin = 0.05;
  double S_tmax = 50;
  double S_noise = 1.003;

  /// Throws std::invalid_argument naming the field, its value and what is allowed.
  void validate() const;
  /// Every field as one JSON object; from_json(to_json()) == *this.
  std::string to_json() const;
  /// Parses to_json()'s format; missing keys keep defaults; unknown keys and bad values throw
  /// std::invalid_argument naming the key.
  static ElucidatedOptions from_json(const std::string& text);

  bool operator==(const ElucidatedOptions&) const = default;
};

class ElucidatedDiffusionImpl : public torch::nn::Module {
 public:
  /// Refuses a Unet without learned/random Fourier time (as the reference), one whose out_dim is not
  /// its channel count, channel counts that differ from options.channels, and an image_size not
  /// divisible by the net's downsample factor (or, for a KarrasUnet, not its image_size).
  ElucidatedDiffusionImpl(Unet net, ElucidatedOptions options);
  /// Refuses a class-conditional KarrasUnet (the reference passes no labels) and the mismatches above.
  ElucidatedDiffusionImpl(KarrasUnet net, ElucidatedOptions options);

  // ---- preconditioning (Table 1), elementwise on float sigma tensors
  torch::Tensor c_skip(const torch::Tensor& sigma) const;
  torch::Tensor c_out(const torch::Tensor& sigma) const;
  torch::Tensor c_in(const torch::Tensor& sigma) const;
  torch::Tensor c_noise(const torch::Tensor& sigma) const;  ///< ln(max(sigma, 1e-20)) / 4
  /// (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
  torch::Tensor loss_weight(const torch::Tensor& sigma) const;

  /// D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, self_cond), equation (7); sigma: [b] float, or
  /// one value for the whole batch (rounded to float32, as the reference's torch.full). clamp: to [-1, 1].
  /// self_cond: the previous x0 estimate, for a self-conditioning net (zeros when absent, as the
  /// reference's nets substitute); rejected for other nets.
  torch::Tensor preconditioned_network_forward(const torch::Tensor& noised_images, const torch::Tensor& sigma,
                                               const std::optional<torch::Tensor>& self_cond = std::nullopt,
                                               bool clamp = false);
  torch::Tensor preconditioned_network_forward(const torch::Tensor& noised_images, double sigma,
                                               const std::optional<torch::Tensor>& self_cond = std::nullopt,
                                               bool clamp = false);

  /// Equation (5): steps float32 noise levels from sigma_max down to sigma_min, then a final 0 (steps + 1
  /// values). Default: options().num_sample_steps.
  torch::Tensor sample_schedule(std::optional<int64_t> steps = std::nullopt) const;

  /// Stochastic Heun sampling (Algorithm 2), no grad; images in [0, 1]. Draws the initial noise, then
  /// one noise tensor per step (even where gamma is 0). clamp: each denoised estimate to [-1, 1]. Does
  /// not switch the net's mode (call eval() first: a KarrasUnet renormalises its weights in training mode).
  torch::Tensor sample(int64_t batch, torch::Generator generator, std::optional<int64_t> steps = std::nullopt,
                       bool clamp = true);
  /// sample() from the given standard-normal initial noise [b, C, S, S] (scaled by sigma_max here)
  /// instead of drawing it; the per-step noise still comes from `generator`.
  torch::Tensor sample_from(const torch::Tensor& initial_noise, torch::Generator generator,
                            std::optional<int64_t> steps = std::nullopt, bool clamp = true);
  /// DPM-Solver++(2M) on the same schedule, no grad; images in [0, 1]. Draws only the initial noise.
  torch::Tensor sample_using_dpmpp(int64_t batch, torch::Generator generator,
                                   std::optional<int64_t> steps = std::nullopt);
  /// sample_using_dpmpp() from the given standard-normal initial noise (deterministic from there).
  torch::Tensor sample_using_dpmpp_from(const torch::Tensor& initial_noise, std::optional<int64_t> steps = std::nullopt);

  /// exp(P_mean + P_std n), n ~ N(0, 1) of shape [batch] from `generator`.
  torch::Tensor noise_distribution(int64_t batch, torch::Generator generator) const;

  /// Per-sample training losses [b] without randomness: images in [-1, 1], sigmas [b], noise like
  /// images; loss_weight(sigma) * mean over C, H, W of (D(images + sigma noise; sigma) - images)^2.
  /// self_condition_pass (self-conditioning nets only): first estimate x0 without grad and condition
  /// the graded pass on it, as the reference does when its coin comes up.
  torch::Tensor losses(const torch::Tensor& images, const torch::Tensor& sigmas, const torch::Tensor& noise,
                       bool self_condition_pass = false);
  /// The reference's forward(): images [b, C, S, S] in [0, 1]; draws sigma (noise_distribution), then the
  /// noise, then (self-conditioning nets) the coin as one uniform < 0.5; returns the mean loss.
  torch::Tensor forward(const torch::Tensor& images, torch::Generator generator);

  const ElucidatedOptions& options() const { return options_; }
  int64_t channels() const { return options_.channels; }
  int64_t image_size() const { return options_.image_size; }
  bool self_condition() const { return self_condition_; }
  /// Whichever net this diffusion holds (registered as "net"): for its parameters and state dict.
  std::shared_ptr<torch::nn::Module> denoiser() const;

  Unet unet{nullptr};               ///< the net when it is a Unet, else null
  KarrasUnet karras_unet{nullptr};  ///< the net when it is a KarrasUnet, else null

 private:
  void check(const std::string& kind, int64_t channels, int64_t out_dim, int64_t downsample_factor) const;
  void check_initial_noise(const torch::Tensor& initial_noise) const;
  torch::Tensor net_forward(const torch::Tensor& x, const torch::Tensor& time,
                            const std::optional<torch::Tensor>& self_cond);

  ElucidatedOptions options_;
  bool self_condition_ = false;
};
TORCH_MODULE(ElucidatedDiffusion);

}  // namespace diffuse::model
