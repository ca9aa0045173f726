// model/diffusion.h: Gaussian diffusion around a U-Net, the C++ counterpart of the reference's
// `GaussianDiffusion` (denoising-diffusion-pytorch 2.3.1): the same 13 schedule buffers (names,
// order, float32 values bit for bit), objectives, loss weighting, offset noise, self-conditioning,
// DDPM and DDIM samplers; the class-conditional variant of its classifier_free_guidance module
// (around a ConditionalUnet: condition dropout in training, guided sampling); the 1.x loss choice
// (l1 | l2) and 2.3.1's immiscible noise assignment; plus, from Improved DDPM (openai/improved-diffusion), a learned variance
// with the hybrid loss and the variational bound in bits per dimension.
//
// Randomness: every draw takes an explicit torch::Generator (an undefined one means torch's
// default generator). Draws happen on the generator's device and are moved to the data's, so a
// CPU generator gives the same numbers whatever device the model runs on, and with the same seed
// the samplers reproduce the reference's CPU samples exactly.
//
//   DiffusionOptions options;
//   options.image_size = 64;
//   GaussianDiffusion diffusion(Unet(UnetOptions{}), options);
//   auto gen = at::make_generator<at::CPUGeneratorImpl>(/*seed=*/0);
//   auto loss = diffusion->forward(images_in_0_1, gen);          // scalar, as the reference's forward
//   loss.backward();
//   SampleOptions sampling;                                       // DDIM, 50 steps, eta 0
//   auto images = diffusion->sample(16, sampling, gen);           // [16, 3, 64, 64] in [0, 1]
//
// Class-conditional (classifier-free guidance):
//   GaussianDiffusion cfg(ConditionalUnet(ConditionalUnetOptions{.num_classes = 10}), options);
//   auto loss = cfg->forward(images_in_0_1, gen, labels);          // drops labels with cond_drop_prob
//   sampling.cond_scale = 6; sampling.rescaled_phi = 0.7;
//   auto grid = cfg->sample(3, sampling, gen, torch::tensor({0, 3, 7}));
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <string>

#include "model/conditional_unet.h"
#include "model/unet.h"

namespace diffuse::model {

/// How to draw samples. sampler "ddpm": ancestral sampling through every timestep (`steps` and
/// `eta` ignored); "ddim": `steps` DDIM steps (1..timesteps) with noise scale `eta` (0 = deterministic).
/// clip_denoised clamps each step's x0 prediction to [-1, 1], as the reference always does.
/// cond_scale and rescaled_phi apply to class-conditional diffusions only (see ClassCondition).
struct SampleOptions {
  std::string sampler = "ddim";
  int64_t steps = 50;
  double eta = 0.0;
  bool clip_denoised = true;
  double cond_scale = 6.0;    ///< guidance scale: 1 = conditional model alone, 0 = unconditional
  double rescaled_phi = 0.7;  ///< in [0, 1]: share of the std-rescaled guided prediction

  /// Throws std::invalid_argument naming the field, its value and what is allowed.
  void validate(int64_t timesteps) const;
};

/// Constructor options of the reference `GaussianDiffusion` (same names and defaults), plus vlb_weight.
struct DiffusionOptions {
  int64_t image_size = 128;
  int64_t timesteps = 1000;
  std::optional<int64_t> sampling_timesteps;  ///< default: timesteps (the reference then samples with DDPM)
  std::string objective = "pred_v";           ///< pred_noise | pred_x0 | pred_v
  std::string beta_schedule = "sigmoid";      ///< linear | cosine | sigmoid
  double ddim_sampling_eta = 0.0;
  bool auto_normalize = true;  ///< forward() takes images in [0, 1], sample() returns them in [0, 1]
  double offset_noise_strength = 0.0;
  bool min_snr_loss_weight = false;
  double min_snr_gamma = 5.0;
  /// lambda of Improved DDPM's hybrid loss L_simple + lambda * L_vlb (learned-variance U-Nets only).
  /// L_vlb is estimated as T * L_t for the sampled t, so the default 0.001 at T = 1000 adds exactly
  /// improved-diffusion's per-sample vb term (its RESCALED_MSE: vb * T / 1000).
  double vlb_weight = 0.001;
  /// Elementwise training loss against the objective's target: "l2" (squared error, the 2.x
  /// reference) or "l1" (absolute error, 1.x's loss_type='l1'). Either is averaged per sample, then
  /// multiplied by loss_weight[t]; with a learned variance only this simple term changes.
  std::string loss_type = "l2";
  /// Immiscible diffusion (reference 2.3.1, immiscible=True): within each batch, noise is assigned
  /// to images by the permutation minimising the summed Euclidean distance (linear_assignment.h)
  /// before x_t is formed. Like the reference, the pred_noise / pred_v targets keep the unpermuted
  /// noise (REFERENCE.md quirk 5); it applies to training losses only, not to q_sample or the bound.
  bool immiscible = false;

  /// Every field as one JSON object; from_json(to_json()) == *this.
  std::string to_json() const;
  /// Parses to_json()'s format; missing keys keep defaults; unknown keys and bad values throw
  /// std::invalid_argument naming the key.
  static DiffusionOptions from_json(const std::string& text);
  /// Throws std::invalid_argument naming the field, its value and what is allowed.
  void validate() const;
  /// What the reference's sample() does with these options: DDPM when sampling_timesteps is unset
  /// or equals timesteps, otherwise DDIM with sampling_timesteps steps and ddim_sampling_eta.
  SampleOptions reference_sample_options() const;

  bool operator==(const DiffusionOptions&) const = default;
};

/// The variational bound of a batch in bits per dimension (Improved DDPM's calc_bpd_loop).
struct VlbResult {
  torch::Tensor total_bpd;  ///< [b] prior_bpd + vb_bpd.sum(1): an upper bound on -log2 p(x) per dimension
  torch::Tensor prior_bpd;  ///< [b] L_T = KL(q(x_T | x_0) || N(0, I))
  torch::Tensor vb_bpd;     ///< [b, T] column t: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)); column 0: decoder NLL L_0
  torch::Tensor mse;        ///< [b, T] column t: mean squared error of the implied noise prediction at t
};

/// Model output turned into both parameterisations (the reference's ModelPrediction).
struct ModelPrediction {
  torch::Tensor pred_noise;
  torch::Tensor pred_x_start;
  torch::Tensor var_output;  ///< learned-variance channels in [-1, 1] ~ [min, max]; undefined otherwise
};

/// What a class-conditional diffusion conditions on; an unconditional diffusion takes an empty one
/// and rejects classes.
struct ClassCondition {
  torch::Tensor classes;      ///< int64 [b] in [0, num_classes); undefined = unconditional diffusion
  double cond_scale = 6.0;    ///< ConditionalUnet::forward_with_cond_scale's cond_scale
  double rescaled_phi = 0.7;  ///< ... and rescaled_phi (the reference sampler's defaults)
};

/// Mean and variance of a Gaussian over x_{t-1}, broadcastable to x.
struct GaussianStats {
  torch::Tensor mean;
  torch::Tensor variance;
  torch::Tensor log_variance;
  torch::Tensor pred_x_start;  ///< x0 the mean was derived from (p_mean_variance only)
};

/// The diffusion process around a U-Net. Submodule "model" (the U-Net: a Unet, or a ConditionalUnet
/// for classifier-free guidance) and the 13 float32 buffers of the reference, so
/// state_dict(diffusion) has the reference's keys in its order.
class GaussianDiffusionImpl : public torch::nn::Module {
 public:
  /// Validates `options` and that the U-Net fits: out_dim == channels (or 2 * channels: learned
  /// variance), no learned/random sinusoidal time embedding (as the reference), image_size divisible
  /// by its downsample factor.
  GaussianDiffusionImpl(Unet model, DiffusionOptions options);
  /// The classifier_free_guidance module's GaussianDiffusion: the same schedules, losses and
  /// samplers, with the U-Net conditioned on classes. Refuses a learned-variance ConditionalUnet
  /// (out_dim != channels) and learned/random sinusoidal time embeddings, as the reference does.
  GaussianDiffusionImpl(ConditionalUnet model, DiffusionOptions options);

  /// Per-sample training loss, shape [b]: the loss_type error (squared or absolute) against the
  /// objective's target averaged over C, H, W, times loss_weight[t]; plus lambda * T * L_t
  /// (bits/dim, gradient only into the variance) for a learned-variance U-Net. x_start in [-1, 1],
  /// t int64 [b], noise like x_start (not modified); classes int64 [b] exactly when conditional().
  /// From `generator`, in this order: offset noise [b, C] (when offset_noise_strength > 0), then the
  /// self-conditioning coin (when the U-Net self-conditions) as one uniform draw < 0.5, then (when
  /// conditional) the condition-dropout mask, ConditionalUnet::draw_keep_mask. The reference flips
  /// the coin with Python's random.random() instead; this is the one deliberate deviation, so a run
  /// is reproducible from one seed. (Reading the coin is a host sync when the generator lives on a
  /// GPU; a CPU generator avoids it.) The reference draws the dropout mask from torch's default
  /// generator at the same point of its stream, so seeded alike the two agree.
  torch::Tensor training_losses(const torch::Tensor& x_start, const torch::Tensor& t, const torch::Tensor& noise,
                                torch::Generator generator, const torch::Tensor& classes = {});
  /// training_losses without randomness: offset noise already in `noise`, the self-conditioning coin
  /// given as `self_condition_pass` (true: condition on the model's own detached x0 prediction), the
  /// condition dropout as `keep_mask` (bool [b], false = null class; undefined = keep every class).
  torch::Tensor p_losses(const torch::Tensor& x_start, const torch::Tensor& t, const torch::Tensor& noise,
                         bool self_condition_pass = false, const torch::Tensor& classes = {},
                         const torch::Tensor& keep_mask = {});
  /// The reference's forward(): img [b, C, S, S] in [0, 1] (in [-1, 1] without auto_normalize);
  /// draws t ~ U{0..T-1} then noise, as the reference does; returns the mean loss. `classes`: the
  /// images' labels, required exactly when conditional().
  torch::Tensor forward(const torch::Tensor& img, torch::Generator generator, const torch::Tensor& classes = {});

  /// x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.
  torch::Tensor q_sample(const torch::Tensor& x_start, const torch::Tensor& t, const torch::Tensor& noise) const;

  /// Samples `batch` images (in [0, 1] with auto_normalize), in no-grad mode. Draws the initial
  /// noise [batch, C, S, S] and then one noise tensor per step exactly like the reference (DDPM: every
  /// step but the last; DDIM: every step but the last, even with eta = 0). Does not switch the model
  /// to eval mode (call eval() first, as the reference's trainer does). A conditional diffusion needs
  /// `classes` (int64 [batch]) and guides with options.cond_scale / rescaled_phi, drawing nothing
  /// more; as in the reference's classifier-free-guidance sampler, its DDIM steps use the guided
  /// noise prediction as is (the unconditional sampler re-derives it from the clipped x0).
  torch::Tensor sample(int64_t batch, const SampleOptions& options, torch::Generator generator,
                       const torch::Tensor& classes = {});
  /// sample() starting from the given initial noise [b, C, S, S] instead of drawing it.
  torch::Tensor sample_from(torch::Tensor initial_noise, const SampleOptions& options, torch::Generator generator,
                            const torch::Tensor& classes = {});

  /// The variational bound of x_start ([-1, 1], values on the 8-bit grid) in bits per dimension, one
  /// forward pass per timestep (T passes), no grad. Noise for t = T-1 down to 0 is drawn in that
  /// order. The U-Net sees no self-conditioning (zeros). For a fixed-variance model p(x_{t-1}|x_t)
  /// uses the posterior variance, with improved-diffusion's clipping at t = 0 (log of the t = 1
  /// variance) for the decoder.
  VlbResult vlb_bits_per_dim(const torch::Tensor& x_start, torch::Generator generator, bool clip_denoised = true,
                             const ClassCondition& condition = {});

  // ---- reference helpers (t: int64 [b]; results broadcast like x)
  torch::Tensor predict_start_from_noise(const torch::Tensor& x_t, const torch::Tensor& t,
                                         const torch::Tensor& noise) const;
  torch::Tensor predict_noise_from_start(const torch::Tensor& x_t, const torch::Tensor& t,
                                         const torch::Tensor& x0) const;
  torch::Tensor predict_v(const torch::Tensor& x_start, const torch::Tensor& t, const torch::Tensor& noise) const;
  torch::Tensor predict_start_from_v(const torch::Tensor& x_t, const torch::Tensor& t, const torch::Tensor& v) const;
  /// q(x_{t-1} | x_t, x_0): mean, variance and the reference's clipped log variance (log 1e-20 at t = 0).
  GaussianStats q_posterior(const torch::Tensor& x_start, const torch::Tensor& x_t, const torch::Tensor& t) const;
  /// Runs the U-Net (x_self_cond: zeros when the U-Net self-conditions and none is given; a
  /// conditional U-Net runs guided, ConditionalUnet::forward_with_cond_scale with `condition`).
  ModelPrediction model_predictions(const torch::Tensor& x, const torch::Tensor& t,
                                    const std::optional<torch::Tensor>& x_self_cond = std::nullopt,
                                    bool clip_x_start = false, bool rederive_pred_noise = false,
                                    const ClassCondition& condition = {});
  /// model_predictions from an already computed U-Net output.
  ModelPrediction predictions_from_output(const torch::Tensor& model_output, const torch::Tensor& x,
                                          const torch::Tensor& t, bool clip_x_start = false,
                                          bool rederive_pred_noise = false) const;
  /// p(x_{t-1} | x_t): the posterior at the (optionally clipped) x0 prediction; variance fixed (the
  /// posterior's, as the reference) or learned (Improved DDPM's interpolation, see learned_log_variance).
  GaussianStats p_mean_variance(const torch::Tensor& x, const torch::Tensor& t,
                                const std::optional<torch::Tensor>& x_self_cond = std::nullopt,
                                bool clip_denoised = true, const ClassCondition& condition = {});
  GaussianStats p_mean_variance_from_output(const torch::Tensor& model_output, const torch::Tensor& x,
                                            const torch::Tensor& t, bool clip_denoised) const;
  /// Improved DDPM's "learned range": frac = (v + 1) / 2, log var = frac log(beta_t) + (1 - frac) log(posterior
  /// variance_t), the latter with t = 0 clipped to t = 1's value.
  torch::Tensor learned_log_variance(const torch::Tensor& var_output, const torch::Tensor& t) const;
  /// L_{t-1} in bits/dim per sample [b]: the decoder NLL where t == 0, the Gaussian KL elsewhere.
  torch::Tensor vb_terms_bpd(const GaussianStats& p, const torch::Tensor& x_start, const torch::Tensor& x_t,
                             const torch::Tensor& t) const;
  /// The hybrid loss's VLB part for a learned-variance output [b, 2C, H, W]: vlb_weight * T * L_t
  /// with the mean channels detached (stop-gradient), as improved-diffusion; shape [b].
  torch::Tensor hybrid_vlb_loss(const torch::Tensor& model_output, const torch::Tensor& x_start,
                                const torch::Tensor& x_t, const torch::Tensor& t) const;
  /// L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim per sample [b].
  torch::Tensor prior_bpd(const torch::Tensor& x_start) const;

  const DiffusionOptions& options() const { return options_; }
  int64_t num_timesteps() const { return options_.timesteps; }
  int64_t channels() const { return conditional() ? conditional_model->channels() : model->channels(); }
  int64_t image_size() const { return options_.image_size; }
  bool self_condition() const { return model && model->self_condition(); }
  bool learned_variance() const { return model && model->out_dim() == 2 * model->channels(); }
  /// Whether the U-Net is a ConditionalUnet (classifier-free guidance).
  bool conditional() const { return static_cast<bool>(conditional_model); }
  /// The conditional U-Net's class count; 0 for an unconditional diffusion.
  int64_t num_classes() const { return conditional() ? conditional_model->num_classes() : 0; }
  /// Whichever U-Net this diffusion holds (registered as "model"): for its parameters and state dict.
  std::shared_ptr<torch::nn::Module> denoiser() const;
  /// img * 2 - 1 with auto_normalize, else img (and the inverse).
  torch::Tensor normalize(const torch::Tensor& img) const;
  torch::Tensor unnormalize(const torch::Tensor& x) const;

  Unet model{nullptr};                          ///< the U-Net of an unconditional diffusion, else null
  ConditionalUnet conditional_model{nullptr};  ///< the U-Net of a conditional diffusion, else null
  // The reference's buffers, float32, in its registration (= state_dict) order.
  torch::Tensor betas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
      log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_variance,
      posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2, loss_weight;

 private:
  /// Validates the options and a U-Net's shape facts, then registers the buffers (both constructors).
  void init(const std::string& kind, int64_t channels, int64_t out_dim, bool fourier_time, int64_t downsample_factor);
  torch::Tensor self_cond_input(const torch::Tensor& x, const std::optional<torch::Tensor>& x_self_cond) const;
  /// The U-Net output for sampling and the bound: guided when conditional, else the plain Unet.
  torch::Tensor denoise(const torch::Tensor& x, const torch::Tensor& t, const std::optional<torch::Tensor>& x_self_cond,
                        const ClassCondition& condition);
  /// improved-diffusion's posterior_log_variance_clipped: t = 0 takes t = 1's value.
  torch::Tensor likelihood_log_variance(const torch::Tensor& t, int64_t ndim) const;
  torch::Tensor p_sample_step(const torch::Tensor& img, int64_t t, torch::Tensor& x_start, bool clip,
                              torch::Generator& generator, const ClassCondition& condition);

  enum class Objective { kPredNoise, kPredX0, kPredV };
  DiffusionOptions options_;
  Objective objective_ = Objective::kPredV;
};
TORCH_MODULE(GaussianDiffusion);

}  // namespace diffuse::model
