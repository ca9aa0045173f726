// model/diffusion.cpp: GaussianDiffusion: options, training losses, samplers and the bound.
//
// Reference parity notes. Buffers are built from model/schedules.cpp in float64 and stored as
// float32, bit-identical to the reference's. The samplers consume random numbers exactly like the reference
// (same shapes, same order, same count) so a seeded CPU generator reproduces its samples.
#include "model/diffusion.h"

#include <cmath>
#include <limits>
#include <numbers>
#include <stdexcept>

#include "util/json.h"
#include "model/likelihood.h"
#include "model/linear_assignment.h"
#include "model/schedules.h"

namespace diffuse::model {
namespace json = util::json;

// ---------------------------------------------------------------------------------------------
// Options

namespace {

[[noreturn]] void invalid(const std::string& owner, const std::string& field, const std::string& value,
                          const std::string& allowed) {
  throw std::invalid_argument(owner + "." + field + " = " + value + " is invalid: " + allowed);
}

std::string num(double v) { return std::isfinite(v) ? json::number(v) : std::to_string(v); }

}  // namespace

void SampleOptions::validate(int64_t timesteps) const {
  if (sampler != "ddpm" && sampler != "ddim") invalid("SampleOptions", "sampler", sampler, "allowed: ddpm, ddim");
  if (sampler == "ddim" && (steps < 1 || steps > timesteps)) {
    invalid("SampleOptions", "steps", std::to_string(steps),
            "DDIM needs 1 <= steps <= timesteps (" + std::to_string(timesteps) + ")");
  }
  if (!(eta >= 0) || !std::isfinite(eta)) invalid("SampleOptions", "eta", num(eta), "must be finite and >= 0");
  if (!std::isfinite(cond_scale)) invalid("SampleOptions", "cond_scale", num(cond_scale), "must be finite");
  if (!(rescaled_phi >= 0 && rescaled_phi <= 1)) {
    invalid("SampleOptions", "rescaled_phi", num(rescaled_phi), "must be in [0, 1]");
  }
}

void DiffusionOptions::validate() const {
  const std::string o = "DiffusionOptions";
  if (image_size < 1) invalid(o, "image_size", std::to_string(image_size), "must be positive");
  if (timesteps < 2) invalid(o, "timesteps", std::to_string(timesteps), "must be >= 2");
  if (sampling_timesteps && (*sampling_timesteps < 1 || *sampling_timesteps > timesteps)) {
    invalid(o, "sampling_timesteps", std::to_string(*sampling_timesteps),
            "must be in [1, timesteps = " + std::to_string(timesteps) + "]");
  }
  if (objective != "pred_noise" && objective != "pred_x0" && objective != "pred_v") {
    invalid(o, "objective", "'" + objective + "'", "allowed: pred_noise, pred_x0, pred_v");
  }
  if (beta_schedule != "linear" && beta_schedule != "cosine" && beta_schedule != "sigmoid") {
    invalid(o, "beta_schedule", "'" + beta_schedule + "'", "allowed: linear, cosine, sigmoid");
  }
  // The linear schedule ends at beta = 20 / T: T <= 20 would make alpha_bar zero or negative.
  if (beta_schedule == "linear" && timesteps <= 20) {
    invalid(o, "timesteps", std::to_string(timesteps), "the linear schedule needs timesteps > 20 (its last beta is 20/T)");
  }
  if (!(ddim_sampling_eta >= 0) || !std::isfinite(ddim_sampling_eta)) {
    invalid(o, "ddim_sampling_eta", num(ddim_sampling_eta), "must be finite and >= 0");
  }
  if (!(offset_noise_strength >= 0) || !std::isfinite(offset_noise_strength)) {
    invalid(o, "offset_noise_strength", num(offset_noise_strength), "must be finite and >= 0");
  }
  if (!(min_snr_gamma > 0) || !std::isfinite(min_snr_gamma)) {
    invalid(o, "min_snr_gamma", num(min_snr_gamma), "must be finite and > 0");
  }
  if (!(vlb_weight >= 0) || !std::isfinite(vlb_weight)) invalid(o, "vlb_weight", num(vlb_weight), "must be finite and >= 0");
  if (loss_type != "l2" && loss_type != "l1") invalid(o, "loss_type", "'" + loss_type + "'", "allowed: l2, l1");
}

SampleOptions DiffusionOptions::reference_sample_options() const {
  SampleOptions s;
  if (sampling_timesteps && *sampling_timesteps < timesteps) {
    s.sampler = "ddim";
    s.steps = *sampling_timesteps;
    s.eta = ddim_sampling_eta;
  } else {
    s.sampler = "ddpm";
    s.steps = timesteps;
  }
  return s;
}

std::string DiffusionOptions::to_json() const {
  auto boolean = [](bool b) { return std::string(b ? "true" : "false"); };
  return "{\"image_size\":" + std::to_string(image_size) + ",\"timesteps\":" + std::to_string(timesteps) +
         ",\"sampling_timesteps\":" + (sampling_timesteps ? std::to_string(*sampling_timesteps) : "null") +
         ",\"objective\":" + json::quote(objective) + ",\"beta_schedule\":" + json::quote(beta_schedule) +
         ",\"ddim_sampling_eta\":" + json::number(ddim_sampling_eta) +
         ",\"auto_normalize\":" + boolean(auto_normalize) +
         ",\"offset_noise_strength\":" + json::number(offset_noise_strength) +
         ",\"min_snr_loss_weight\":" + boolean(min_snr_loss_weight) +
         ",\"min_snr_gamma\":" + json::number(min_snr_gamma) + ",\"vlb_weight\":" + json::number(vlb_weight) +
         ",\"loss_type\":" + json::quote(loss_type) + ",\"immiscible\":" + boolean(immiscible) + "}";
}

DiffusionOptions DiffusionOptions::from_json(const std::string& text) {
  json::Value root;
  try {
    root = json::parse(text);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("DiffusionOptions JSON: ") + e.what());
  }
  if (root.type() != json::Value::Type::Object) {
    throw std::invalid_argument(std::string("DiffusionOptions JSON must be an object, got ") + root.type_name());
  }
  DiffusionOptions o;
  for (const auto& [key, value] : root.as_object()) {
    try {
      if (key == "image_size") o.image_size = value.as_int64();
      else if (key == "timesteps") o.timesteps = value.as_int64();
      else if (key == "sampling_timesteps")
        o.sampling_timesteps = value.is_null() ? std::optional<int64_t>() : value.as_int64();
      else if (key == "objective") o.objective = value.as_string();
      else if (key == "beta_schedule") o.beta_schedule = value.as_string();
      else if (key == "ddim_sampling_eta") o.ddim_sampling_eta = value.as_double();
      else if (key == "auto_normalize") o.auto_normalize = value.as_bool();
      else if (key == "offset_noise_strength") o.offset_noise_strength = value.as_double();
      else if (key == "min_snr_loss_weight") o.min_snr_loss_weight = value.as_bool();
      else if (key == "min_snr_gamma") o.min_snr_gamma = value.as_double();
      else if (key == "vlb_weight") o.vlb_weight = value.as_double();
      else if (key == "loss_type") o.loss_type = value.as_string();
      else if (key == "immiscible") o.immiscible = value.as_bool();
      else throw std::invalid_argument("unknown key");
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("DiffusionOptions JSON key \"" + key + "\": " + e.what());
    }
  }
  o.validate();
  return o;
}

// ---------------------------------------------------------------------------------------------
// GaussianDiffusion

namespace {

// The reference's `extract`: a[t] reshaped to broadcast over a tensor of `ndim` dimensions.
torch::Tensor extract(const torch::Tensor& a, const torch::Tensor& t, int64_t ndim) {
  std::vector<int64_t> shape(static_cast<size_t>(ndim), 1);
  shape[0] = t.size(0);
  return a.gather(-1, t).reshape(shape);
}

std::vector<int64_t> non_batch_dims(const torch::Tensor& x) {
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

torch::Tensor mean_flat(const torch::Tensor& x) { return x.mean(non_batch_dims(x)); }

std::optional<at::Generator> as_optional(const torch::Generator& generator) {
  return generator.defined() ? std::optional<at::Generator>(generator) : std::nullopt;
}

torch::Device draw_device(const torch::Generator& generator, const torch::Device& fallback) {
  return generator.defined() ? generator.device() : fallback;
}

// Standard normal noise of `sizes`, drawn on the generator's device (the same stream as the
// reference's randn/randn_like on that device), then moved to `like`'s device.
torch::Tensor randn_from(torch::Generator& generator, at::IntArrayRef sizes, const torch::TensorOptions& like) {
  auto drawn = torch::randn(sizes, as_optional(generator), like.device(draw_device(generator, like.device())));
  return drawn.to(like.device());
}

constexpr double kLn2 = std::numbers::ln2;

}  // namespace

GaussianDiffusionImpl::GaussianDiffusionImpl(Unet unet, DiffusionOptions options) : options_(std::move(options)) {
  if (!unet) throw std::invalid_argument("GaussianDiffusion: the Unet is empty (nullptr)");
  init("Unet", unet->channels(), unet->out_dim(), unet->random_or_learned_sinusoidal_cond(), unet->downsample_factor());
  model = register_module("model", std::move(unet));
}

GaussianDiffusionImpl::GaussianDiffusionImpl(ConditionalUnet unet, DiffusionOptions options)
    : options_(std::move(options)) {
  if (!unet) throw std::invalid_argument("GaussianDiffusion: the ConditionalUnet is empty (nullptr)");
  if (unet->out_dim() != unet->channels()) {
    throw std::invalid_argument("GaussianDiffusion: a ConditionalUnet needs out_dim == channels (" +
                                std::to_string(unet->channels()) + "), got " + std::to_string(unet->out_dim()) +
                                "; the reference's classifier-free-guidance diffusion has no learned variance");
  }
  init("ConditionalUnet", unet->channels(), unet->out_dim(), unet->random_or_learned_sinusoidal_cond(),
       unet->downsample_factor());
  conditional_model = register_module("model", std::move(unet));
}

std::shared_ptr<torch::nn::Module> GaussianDiffusionImpl::denoiser() const {
  if (conditional()) return conditional_model.ptr();
  return model.ptr();
}

void GaussianDiffusionImpl::init(const std::string& kind, int64_t c, int64_t out_dim, bool fourier_time,
                                 int64_t downsample_factor) {
  options_.validate();
  if (out_dim != c && out_dim != 2 * c) {
    throw std::invalid_argument("GaussianDiffusion: " + kind + " out_dim " + std::to_string(out_dim) +
                                " must equal channels (" + std::to_string(c) + "), or 2 * channels (" +
                                std::to_string(2 * c) + ") for a learned variance");
  }
  if (fourier_time) {
    throw std::invalid_argument(
        "GaussianDiffusion: a " + kind + " with learned_sinusoidal_cond or random_fourier_features is for "
        "continuous-time diffusion; the reference's GaussianDiffusion refuses it too");
  }
  if (options_.image_size % downsample_factor != 0) {
    throw std::invalid_argument("GaussianDiffusion: image_size " + std::to_string(options_.image_size) +
                                " is not divisible by the " + kind + "'s downsample factor " +
                                std::to_string(downsample_factor));
  }
  objective_ = options_.objective == "pred_noise" ? Objective::kPredNoise
               : options_.objective == "pred_x0"  ? Objective::kPredX0
                                                  : Objective::kPredV;

  // Everything in float64 with the reference's operations, cast to float32 at registration.
  const auto b = beta_schedule(options_.beta_schedule, options_.timesteps);
  const auto alphas = 1. - b;
  const auto ac = torch::cumprod(alphas, 0);
  const auto ac_prev = torch::constant_pad_nd(ac.slice(0, 0, -1), {1, 0}, 1.);
  auto reg = [&](const char* name, const torch::Tensor& value) {
    return register_buffer(name, value.to(torch::kFloat32));
  };
  betas = reg("betas", b);
  alphas_cumprod = reg("alphas_cumprod", ac);
  alphas_cumprod_prev = reg("alphas_cumprod_prev", ac_prev);
  sqrt_alphas_cumprod = reg("sqrt_alphas_cumprod", torch::sqrt(ac));
  sqrt_one_minus_alphas_cumprod = reg("sqrt_one_minus_alphas_cumprod", torch::sqrt(1. - ac));
  log_one_minus_alphas_cumprod = reg("log_one_minus_alphas_cumprod", torch::log(1. - ac));
  // Python's `1. / x` is x.reciprocal() * 1.
  sqrt_recip_alphas_cumprod = reg("sqrt_recip_alphas_cumprod", torch::sqrt(ac.reciprocal()));
  sqrt_recipm1_alphas_cumprod = reg("sqrt_recipm1_alphas_cumprod", torch::sqrt(ac.reciprocal() - 1));
  const auto pv = b * (1. - ac_prev) / (1. - ac);
  posterior_variance = reg("posterior_variance", pv);
  posterior_log_variance_clipped = reg("posterior_log_variance_clipped", torch::log(pv.clamp_min(1e-20)));
  posterior_mean_coef1 = reg("posterior_mean_coef1", b * torch::sqrt(ac_prev) / (1. - ac));
  posterior_mean_coef2 = reg("posterior_mean_coef2", (1. - ac_prev) * torch::sqrt(alphas) / (1. - ac));
  const auto snr = ac / (1 - ac);
  auto clipped_snr = snr.clone();
  if (options_.min_snr_loss_weight) clipped_snr.clamp_max_(options_.min_snr_gamma);
  switch (objective_) {
    case Objective::kPredNoise: loss_weight = reg("loss_weight", clipped_snr / snr); break;
    case Objective::kPredX0: loss_weight = reg("loss_weight", clipped_snr); break;
    case Objective::kPredV: loss_weight = reg("loss_weight", clipped_snr / (snr + 1)); break;
  }
}

torch::Tensor GaussianDiffusionImpl::normalize(const torch::Tensor& img) const {
  return options_.auto_normalize ? img * 2 - 1 : img;
}

torch::Tensor GaussianDiffusionImpl::unnormalize(const torch::Tensor& x) const {
  return options_.auto_normalize ? (x + 1) * 0.5 : x;
}

torch::Tensor GaussianDiffusionImpl::q_sample(const torch::Tensor& x_start, const torch::Tensor& t,
                                              const torch::Tensor& noise) const {
  return extract(sqrt_alphas_cumprod, t, x_start.dim()) * x_start +
         extract(sqrt_one_minus_alphas_cumprod, t, x_start.dim()) * noise;
}

torch::Tensor GaussianDiffusionImpl::predict_start_from_noise(const torch::Tensor& x_t, const torch::Tensor& t,
                                                              const torch::Tensor& noise) const {
  return extract(sqrt_recip_alphas_cumprod, t, x_t.dim()) * x_t -
         extract(sqrt_recipm1_alphas_cumprod, t, x_t.dim()) * noise;
}

torch::Tensor GaussianDiffusionImpl::predict_noise_from_start(const torch::Tensor& x_t, const torch::Tensor& t,
                                                              const torch::Tensor& x0) const {
  return (extract(sqrt_recip_alphas_cumprod, t, x_t.dim()) * x_t - x0) /
         extract(sqrt_recipm1_alphas_cumprod, t, x_t.dim());
}

torch::Tensor GaussianDiffusionImpl::predict_v(const torch::Tensor& x_start, const torch::Tensor& t,
                                               const torch::Tensor& noise) const {
  return extract(sqrt_alphas_cumprod, t, x_start.dim()) * noise -
         extract(sqrt_one_minus_alphas_cumprod, t, x_start.dim()) * x_start;
}

torch::Tensor GaussianDiffusionImpl::predict_start_from_v(const torch::Tensor& x_t, const torch::Tensor& t,
                                                          const torch::Tensor& v) const {
  return extract(sqrt_alphas_cumprod, t, x_t.dim()) * x_t - extract(sqrt_one_minus_alphas_cumprod, t, x_t.dim()) * v;
}

GaussianStats GaussianDiffusionImpl::q_posterior(const torch::Tensor& x_start, const torch::Tensor& x_t,
                                                 const torch::Tensor& t) const {
  GaussianStats out;
  out.mean = extract(posterior_mean_coef1, t, x_t.dim()) * x_start + extract(posterior_mean_coef2, t, x_t.dim()) * x_t;
  out.variance = extract(posterior_variance, t, x_t.dim());
  out.log_variance = extract(posterior_log_variance_clipped, t, x_t.dim());
  return out;
}

torch::Tensor GaussianDiffusionImpl::self_cond_input(const torch::Tensor& x,
                                                     const std::optional<torch::Tensor>& x_self_cond) const {
  const bool given = x_self_cond.has_value() && x_self_cond->defined();
  if (!self_condition()) {
    TORCH_CHECK(!given, "x_self_cond given, but the Unet was built with self_condition = false");
    return {};
  }
  return given ? *x_self_cond : torch::zeros_like(x);
}

torch::Tensor GaussianDiffusionImpl::denoise(const torch::Tensor& x, const torch::Tensor& t,
                                             const std::optional<torch::Tensor>& x_self_cond,
                                             const ClassCondition& condition) {
  if (conditional()) {
    TORCH_CHECK(condition.classes.defined(),
                "this GaussianDiffusion's U-Net is class-conditional: pass the classes (int64 [batch]) to condition on");
    TORCH_CHECK(!x_self_cond.has_value() || !x_self_cond->defined(),
                "x_self_cond given, but a ConditionalUnet does not self-condition");
    return conditional_model
        ->forward_with_cond_scale(x, t, condition.classes, condition.cond_scale, condition.rescaled_phi)
        .guided;
  }
  TORCH_CHECK(!condition.classes.defined(), "classes given, but this GaussianDiffusion's U-Net is unconditional");
  auto sc = self_cond_input(x, x_self_cond);
  return model->forward(x, t, sc.defined() ? std::optional<torch::Tensor>(sc) : std::nullopt);
}

ModelPrediction GaussianDiffusionImpl::model_predictions(const torch::Tensor& x, const torch::Tensor& t,
                                                         const std::optional<torch::Tensor>& x_self_cond,
                                                         bool clip_x_start, bool rederive_pred_noise,
                                                         const ClassCondition& condition) {
  return predictions_from_output(denoise(x, t, x_self_cond, condition), x, t, clip_x_start, rederive_pred_noise);
}

ModelPrediction GaussianDiffusionImpl::predictions_from_output(const torch::Tensor& model_output,
                                                               const torch::Tensor& x, const torch::Tensor& t,
                                                               bool clip_x_start, bool rederive_pred_noise) const {
  ModelPrediction pred;
  torch::Tensor out = model_output;
  if (learned_variance()) {
    auto parts = model_output.split(channels(), 1);
    out = parts[0];
    pred.var_output = parts[1];
  }
  auto maybe_clip = [&](const torch::Tensor& v) { return clip_x_start ? v.clamp(-1., 1.) : v; };
  switch (objective_) {
    case Objective::kPredNoise:
      pred.pred_noise = out;
      pred.pred_x_start = maybe_clip(predict_start_from_noise(x, t, out));
      if (clip_x_start && rederive_pred_noise) pred.pred_noise = predict_noise_from_start(x, t, pred.pred_x_start);
      break;
    case Objective::kPredX0:
      pred.pred_x_start = maybe_clip(out);
      pred.pred_noise = predict_noise_from_start(x, t, pred.pred_x_start);
      break;
    case Objective::kPredV:
      pred.pred_x_start = maybe_clip(predict_start_from_v(x, t, out));
      pred.pred_noise = predict_noise_from_start(x, t, pred.pred_x_start);
      break;
  }
  return pred;
}

torch::Tensor GaussianDiffusionImpl::likelihood_log_variance(const torch::Tensor& t, int64_t ndim) const {
  const auto& lv = posterior_log_variance_clipped;
  return extract(torch::cat({lv.slice(0, 1, 2), lv.slice(0, 1)}), t, ndim);
}

torch::Tensor GaussianDiffusionImpl::learned_log_variance(const torch::Tensor& var_output,
                                                          const torch::Tensor& t) const {
  auto min_log = likelihood_log_variance(t, var_output.dim());
  auto max_log = extract(torch::log(betas), t, var_output.dim());
  auto frac = (var_output + 1) / 2;
  return frac * max_log + (1 - frac) * min_log;
}

GaussianStats GaussianDiffusionImpl::p_mean_variance_from_output(const torch::Tensor& model_output,
                                                                 const torch::Tensor& x, const torch::Tensor& t,
                                                                 bool clip_denoised) const {
  auto pred = predictions_from_output(model_output, x, t);
  auto x_start = clip_denoised ? pred.pred_x_start.clamp(-1., 1.) : pred.pred_x_start;
  auto stats = q_posterior(x_start, x, t);
  stats.pred_x_start = x_start;
  if (pred.var_output.defined()) {
    stats.log_variance = learned_log_variance(pred.var_output, t);
    stats.variance = stats.log_variance.exp();
  }
  return stats;
}

GaussianStats GaussianDiffusionImpl::p_mean_variance(const torch::Tensor& x, const torch::Tensor& t,
                                                     const std::optional<torch::Tensor>& x_self_cond,
                                                     bool clip_denoised, const ClassCondition& condition) {
  return p_mean_variance_from_output(denoise(x, t, x_self_cond, condition), x, t, clip_denoised);
}

torch::Tensor GaussianDiffusionImpl::vb_terms_bpd(const GaussianStats& p, const torch::Tensor& x_start,
                                                  const torch::Tensor& x_t, const torch::Tensor& t) const {
  // improved-diffusion's clipped log variances (t = 0 takes t = 1's): the reference's log(1e-20)
  // at t = 0 would make the decoder a near-delta.
  const auto clipped = likelihood_log_variance(t, x_t.dim());
  const auto true_mean = q_posterior(x_start, x_t, t).mean;
  auto kl = mean_flat(normal_kl(true_mean, clipped, p.mean, p.log_variance)) / kLn2;
  const auto decoder_log_variance = learned_variance() ? p.log_variance : clipped;
  auto log_scales = (0.5 * decoder_log_variance).expand_as(x_start);
  auto decoder_nll =
      -mean_flat(discretized_gaussian_log_likelihood(x_start, p.mean.expand_as(x_start), log_scales)) / kLn2;
  return torch::where(t == 0, decoder_nll, kl);
}

torch::Tensor GaussianDiffusionImpl::hybrid_vlb_loss(const torch::Tensor& model_output, const torch::Tensor& x_start,
                                                     const torch::Tensor& x_t, const torch::Tensor& t) const {
  TORCH_CHECK(learned_variance(), "hybrid_vlb_loss needs a learned-variance Unet (out_dim = 2 * channels)");
  auto parts = model_output.split(channels(), 1);
  // Stop-gradient on the mean: the VLB term trains only the variance (Improved DDPM, Sec. 3.1).
  auto frozen = torch::cat({parts[0].detach(), parts[1]}, 1);
  auto p = p_mean_variance_from_output(frozen, x_t, t, /*clip_denoised=*/false);
  return vb_terms_bpd(p, x_start, x_t, t) * (options_.vlb_weight * static_cast<double>(options_.timesteps));
}

torch::Tensor GaussianDiffusionImpl::prior_bpd(const torch::Tensor& x_start) const {
  auto t = torch::full({x_start.size(0)}, options_.timesteps - 1,
                       torch::TensorOptions(torch::kLong).device(x_start.device()));
  auto mean = extract(sqrt_alphas_cumprod, t, x_start.dim()) * x_start;
  auto log_variance = extract(log_one_minus_alphas_cumprod, t, x_start.dim());
  auto zero = torch::zeros({}, x_start.options());
  return mean_flat(normal_kl(mean, log_variance.expand_as(mean), zero, zero)) / kLn2;
}

torch::Tensor GaussianDiffusionImpl::p_losses(const torch::Tensor& x_start, const torch::Tensor& t,
                                              const torch::Tensor& noise, bool self_condition_pass,
                                              const torch::Tensor& classes, const torch::Tensor& keep_mask) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x_start.size(0) && t.scalar_type() == torch::kLong,
              "timesteps t must be int64 of shape [", x_start.size(0), "], got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(noise.sizes() == x_start.sizes(), "noise must have the shape of x_start ", x_start.sizes(), ", got ",
              noise.sizes());
  TORCH_CHECK(conditional() == classes.defined(),
              conditional() ? "this GaussianDiffusion's U-Net is class-conditional: pass the images' classes"
                            : "classes given, but this GaussianDiffusion's U-Net is unconditional");
  TORCH_CHECK(conditional() || !keep_mask.defined(), "keep_mask given, but this GaussianDiffusion's U-Net is unconditional");
  // Immiscible diffusion permutes the noise that forms x_t only: the targets below keep the
  // caller's order, as in the reference, whose q_sample permutes a local copy.
  auto x = q_sample(x_start, t, options_.immiscible ? noise.index_select(0, immiscible_noise_assignment(x_start, noise))
                                                    : noise);
  std::optional<torch::Tensor> x_self_cond;
  if (self_condition()) {
    if (self_condition_pass) {
      torch::NoGradGuard no_grad;
      x_self_cond = model_predictions(x, t).pred_x_start.detach();
    } else {
      x_self_cond = torch::zeros_like(x);
    }
  }
  auto model_out = conditional() ? conditional_model->forward(x, t, classes, keep_mask) : model->forward(x, t, x_self_cond);
  auto mean_out = learned_variance() ? model_out.slice(1, 0, channels()) : model_out;
  torch::Tensor target;
  switch (objective_) {
    case Objective::kPredNoise: target = noise; break;
    case Objective::kPredX0: target = x_start; break;
    case Objective::kPredV: target = predict_v(x_start, t, noise); break;
  }
  auto loss = mean_flat(options_.loss_type == "l1" ? torch::l1_loss(mean_out, target, at::Reduction::None)
                                                   : torch::mse_loss(mean_out, target, at::Reduction::None));
  loss = loss * extract(loss_weight, t, 1);
  if (learned_variance()) loss = loss + hybrid_vlb_loss(model_out, x_start, x, t);
  return loss;
}

torch::Tensor GaussianDiffusionImpl::training_losses(const torch::Tensor& x_start, const torch::Tensor& t,
                                                     const torch::Tensor& noise, torch::Generator generator,
                                                     const torch::Tensor& classes) {
  auto eps = noise;
  if (options_.offset_noise_strength > 0) {
    auto offset = randn_from(generator, {x_start.size(0), x_start.size(1)}, x_start.options());
    eps = noise + options_.offset_noise_strength * offset.unsqueeze(-1).unsqueeze(-1);
  }
  bool self_condition_pass = false;
  if (self_condition()) {
    auto coin = torch::rand({1}, as_optional(generator),
                            torch::TensorOptions(torch::kFloat32).device(draw_device(generator, torch::kCPU)));
    self_condition_pass = coin.item<float>() < 0.5f;
  }
  torch::Tensor keep_mask;
  if (conditional()) keep_mask = conditional_model->draw_keep_mask(x_start.size(0), x_start.device(), generator);
  return p_losses(x_start, t, eps, self_condition_pass, classes, keep_mask);
}

torch::Tensor GaussianDiffusionImpl::forward(const torch::Tensor& img, torch::Generator generator,
                                             const torch::Tensor& classes) {
  const int64_t s = options_.image_size;
  TORCH_CHECK(img.dim() == 4 && img.size(1) == channels() && img.size(2) == s && img.size(3) == s,
              "GaussianDiffusion expects images of shape [batch, ", channels(), ", ", s, ", ", s, "], got ",
              img.sizes());
  const int64_t b = img.size(0);
  auto t = torch::randint(0, options_.timesteps, {b}, as_optional(generator),
                          torch::TensorOptions(torch::kLong).device(draw_device(generator, img.device())))
               .to(img.device());
  auto x_start = normalize(img);
  auto noise = randn_from(generator, x_start.sizes(), x_start.options());
  return training_losses(x_start, t, noise, generator, classes).mean();
}

torch::Tensor GaussianDiffusionImpl::sample(int64_t batch, const SampleOptions& options, torch::Generator generator,
                                            const torch::Tensor& classes) {
  TORCH_CHECK(batch >= 1, "sample: batch must be positive, got ", batch);
  TORCH_CHECK(!classes.defined() || (classes.dim() == 1 && classes.size(0) == batch),
              "sample: one class per image needed, classes of shape [", batch, "], got ", classes.sizes());
  const int64_t s = options_.image_size;
  auto noise = randn_from(generator, {batch, channels(), s, s}, betas.options());
  return sample_from(noise, options, generator, classes);
}

torch::Tensor GaussianDiffusionImpl::p_sample_step(const torch::Tensor& img, int64_t t, torch::Tensor& x_start,
                                                   bool clip, torch::Generator& generator,
                                                   const ClassCondition& condition) {
  auto batched = torch::full({img.size(0)}, t, torch::TensorOptions(torch::kLong).device(img.device()));
  std::optional<torch::Tensor> sc;
  if (self_condition()) sc = x_start.defined() ? x_start : torch::zeros_like(img);
  auto p = p_mean_variance(img, batched, sc, clip, condition);
  x_start = p.pred_x_start;
  if (t == 0) return p.mean;  // the reference adds exp(.) * 0.
  auto noise = randn_from(generator, img.sizes(), img.options());
  return p.mean + (0.5 * p.log_variance).exp() * noise;
}

torch::Tensor GaussianDiffusionImpl::sample_from(torch::Tensor initial_noise, const SampleOptions& options,
                                                 torch::Generator generator, const torch::Tensor& classes) {
  options.validate(options_.timesteps);
  const int64_t s = options_.image_size;
  TORCH_CHECK(initial_noise.dim() == 4 && initial_noise.size(1) == channels() && initial_noise.size(2) == s &&
                  initial_noise.size(3) == s,
              "sample_from: initial noise must have shape [batch, ", channels(), ", ", s, ", ", s, "], got ",
              initial_noise.sizes());
  torch::NoGradGuard no_grad;
  auto img = initial_noise.to(betas.device(), betas.scalar_type());
  const int64_t b = img.size(0);
  const ClassCondition condition{classes, options.cond_scale, options.rescaled_phi};
  torch::Tensor x_start;
  if (options.sampler == "ddpm") {
    for (int64_t t = options_.timesteps - 1; t >= 0; --t) {
      img = p_sample_step(img, t, x_start, options.clip_denoised, generator, condition);
    }
    return unnormalize(img);
  }
  // DDIM: times = linspace(-1, T - 1, steps + 1) in float32, truncated to int, reversed.
  auto times = torch::linspace(-1, static_cast<double>(options_.timesteps - 1), options.steps + 1).to(torch::kInt);
  std::vector<int64_t> order(static_cast<size_t>(options.steps + 1));
  for (int64_t i = 0; i <= options.steps; ++i) order[static_cast<size_t>(i)] = times[options.steps - i].item<int>();
  for (int64_t i = 0; i < options.steps; ++i) {
    const int64_t time = order[static_cast<size_t>(i)], time_next = order[static_cast<size_t>(i) + 1];
    auto time_cond = torch::full({b}, time, torch::TensorOptions(torch::kLong).device(img.device()));
    std::optional<torch::Tensor> sc;
    if (self_condition()) sc = x_start.defined() ? x_start : torch::zeros_like(img);
    // The classifier-free-guidance reference does not re-derive the noise from the clipped x0.
    auto pred = model_predictions(img, time_cond, sc, options.clip_denoised, /*rederive_pred_noise=*/!conditional(),
                                  condition);
    x_start = pred.pred_x_start;
    if (time_next < 0) {
      img = x_start;
      continue;
    }
    auto alpha = alphas_cumprod[time];
    auto alpha_next = alphas_cumprod[time_next];
    auto sigma = options.eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt();
    auto c = (1 - alpha_next - sigma.pow(2)).sqrt();
    // Drawn even when eta = 0 (sigma = 0): the reference does, and the stream must stay in step.
    auto noise = randn_from(generator, img.sizes(), img.options());
    img = x_start * alpha_next.sqrt() + c * pred.pred_noise + sigma * noise;
  }
  return unnormalize(img);
}

VlbResult GaussianDiffusionImpl::vlb_bits_per_dim(const torch::Tensor& x_start, torch::Generator generator,
                                                  bool clip_denoised, const ClassCondition& condition) {
  TORCH_CHECK(x_start.dim() == 4 && x_start.size(1) == channels(), "vlb_bits_per_dim expects x_start of shape [batch, ",
              channels(), ", H, W] in [-1, 1], got ", x_start.sizes());
  torch::NoGradGuard no_grad;
  const int64_t b = x_start.size(0), steps = options_.timesteps;
  auto x0 = x_start.to(betas.device(), betas.scalar_type());
  VlbResult r;
  r.vb_bpd = torch::empty({b, steps}, x0.options());
  r.mse = torch::empty({b, steps}, x0.options());
  for (int64_t t = steps - 1; t >= 0; --t) {
    auto batched = torch::full({b}, t, torch::TensorOptions(torch::kLong).device(x0.device()));
    auto noise = randn_from(generator, x0.sizes(), x0.options());
    auto x_t = q_sample(x0, batched, noise);
    auto p = p_mean_variance(x_t, batched, std::nullopt, clip_denoised, condition);
    r.vb_bpd.select(1, t).copy_(vb_terms_bpd(p, x0, x_t, batched));
    auto eps = predict_noise_from_start(x_t, batched, p.pred_x_start);
    r.mse.select(1, t).copy_(mean_flat((eps - noise).pow(2)));
  }
  r.prior_bpd = prior_bpd(x0);
  r.total_bpd = r.vb_bpd.sum(1) + r.prior_bpd;
  return r;
}

}  // namespace diffuse::model
