// model/elucidated_diffusion.cpp: EDM preconditioning, training loss and samplers. Each formula
// repeats the reference's operations in its order and with its scalar types (Python floats computed in
// double, tensors in float32, `a / tensor` as tensor.reciprocal() * a as PyTorch's __rtruediv__ does),
// so float32 results agree with the reference bit for bit on one thread.
#include "model/elucidated_diffusion.h"

#include <cmath>
#include <stdexcept>

#include "util/json.h"

namespace diffuse::model {
namespace json = util::json;

// ---------------------------------------------------------------------------------------------
// Options

namespace {

[[noreturn]] void invalid(const std::string& field, double value, const std::string& allowed) {
  throw std::invalid_argument("ElucidatedOptions." + field + " = " + json::number(value) + " is invalid: " + allowed);
}

}  // namespace

void ElucidatedOptions::validate() const {
  if (image_size < 1) invalid("image_size", static_cast<double>(image_size), "must be positive");
  if (channels < 1) invalid("channels", static_cast<double>(channels), "must be positive");
  // The schedule divides by num_sample_steps - 1.
  if (num_sample_steps < 2) invalid("num_sample_steps", static_cast<double>(num_sample_steps), "must be >= 2");
  if (!(sigma_min > 0)) invalid("sigma_min", sigma_min, "must be > 0");
  if (!(sigma_max > sigma_min)) invalid("sigma_max", sigma_max, "must be > sigma_min = " + json::number(sigma_min));
  if (!(sigma_data > 0)) invalid("sigma_data", sigma_data, "must be > 0");
  if (!(rho > 0)) invalid("rho", rho, "must be > 0");
  if (!std::isfinite(P_mean)) invalid("P_mean", P_mean, "must be finite");
  if (!(P_std >= 0) || !std::isfinite(P_std)) invalid("P_std", P_std, "must be finite and >= 0");
  if (!(S_churn >= 0)) invalid("S_churn", S_churn, "must be >= 0");
  if (!(S_tmin >= 0)) invalid("S_tmin", S_tmin, "must be >= 0");
  if (!(S_tmax >= S_tmin)) invalid("S_tmax", S_tmax, "must be >= S_tmin = " + json::number(S_tmin));
  if (!(S_noise > 0)) invalid("S_noise", S_noise, "must be > 0");
}

std::string ElucidatedOptions::to_json() const {
  return "{\"image_size\":" + std::to_string(image_size) + ",\"channels\":" + std::to_string(channels) +
         ",\"num_sample_steps\":" + std::to_string(num_sample_steps) + ",\"sigma_min\":" + json::number(sigma_min) +
         ",\"sigma_max\":" + json::number(sigma_max) + ",\"sigma_data\":" + json::number(sigma_data) +
         ",\"rho\":" + json::number(rho) + ",\"P_mean\":" + json::number(P_mean) +
         ",\"P_std\":" + json::number(P_std) + ",\"S_churn\":" + json::number(S_churn) +
         ",\"S_tmin\":" + json::number(S_tmin) + ",\"S_tmax\":" + json::number(S_tmax) +
         ",\"S_noise\":" + json::number(S_noise) + "}";
}

ElucidatedOptions ElucidatedOptions::from_json(const std::string& text) {
  json::Value root;
  try {
    root = json::parse(text);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("ElucidatedOptions JSON: ") + e.what());
  }
  if (root.type() != json::Value::Type::Object) {
    throw std::invalid_argument(std::string("ElucidatedOptions JSON must be an object, got ") + root.type_name());
  }
  ElucidatedOptions o;
  for (const auto& [key, value] : root.as_object()) {
    try {
      if (key == "image_size") o.image_size = value.as_int64();
      else if (key == "channels") o.channels = value.as_int64();
      else if (key == "num_sample_steps") o.num_sample_steps = value.as_int64();
      else if (key == "sigma_min") o.sigma_min = value.as_double();
      else if (key == "sigma_max") o.sigma_max = value.as_double();
      else if (key == "sigma_data") o.sigma_data = value.as_double();
      else if (key == "rho") o.rho = value.as_double();
      else if (key == "P_mean") o.P_mean = value.as_double();
      else if (key == "P_std") o.P_std = value.as_double();
      else if (key == "S_churn") o.S_churn = value.as_double();
      else if (key == "S_tmin") o.S_tmin = value.as_double();
      else if (key == "S_tmax") o.S_tmax = value.as_double();
      else if (key == "S_noise") o.S_noise = value.as_double();
      else throw std::invalid_argument("unknown key");
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("ElucidatedOptions JSON key \"" + key + "\": " + e.what());
    }
  }
  o.validate();
  return o;
}

// ---------------------------------------------------------------------------------------------
// ElucidatedDiffusion

namespace {

std::optional<at::Generator> as_optional(const torch::Generator& generator) {
  return generator.defined() ? std::optional<at::Generator>(generator) : std::nullopt;
}

// Standard normals drawn on the generator's device (the reference's stream there), moved to `device`.
torch::Tensor draw_normal(torch::Generator& generator, at::IntArrayRef sizes, const torch::Device& device) {
  auto on = generator.defined() ? generator.device() : device;
  return torch::randn(sizes, as_optional(generator), torch::TensorOptions(torch::kFloat).device(on)).to(device);
}

torch::Tensor unnormalize_to_zero_to_one(const torch::Tensor& x) { return (x + 1) * 0.5; }

}  // namespace

ElucidatedDiffusionImpl::ElucidatedDiffusionImpl(Unet net, ElucidatedOptions options) : options_(std::move(options)) {
  options_.validate();
  TORCH_CHECK(net->random_or_learned_sinusoidal_cond(),
              "ElucidatedDiffusion needs a Unet with learned_sinusoidal_cond or random_fourier_features (its time "
              "input is the continuous c_noise = ln(sigma) / 4), as the reference asserts");
  check("Unet", net->channels(), net->out_dim(), net->downsample_factor());
  self_condition_ = net->self_condition();
  unet = register_module("net", std::move(net));
}

ElucidatedDiffusionImpl::ElucidatedDiffusionImpl(KarrasUnet net, ElucidatedOptions options)
    : options_(std::move(options)) {
  options_.validate();
  TORCH_CHECK(!net->options().num_classes,
              "ElucidatedDiffusion takes an unconditional KarrasUnet (the reference passes the net no class labels); "
              "this one has num_classes = ", *net->options().num_classes);
  TORCH_CHECK(net->options().image_size == options_.image_size, "ElucidatedDiffusion image_size ",
              options_.image_size, " differs from the KarrasUnet's image_size ", net->options().image_size);
  check("KarrasUnet", net->channels(), net->out_dim(), net->downsample_factor());
  self_condition_ = net->self_condition();
  karras_unet = register_module("net", std::move(net));
}

void ElucidatedDiffusionImpl::check(const std::string& kind, int64_t channels, int64_t out_dim,
                                    int64_t downsample_factor) const {
  TORCH_CHECK(channels == options_.channels, "ElucidatedDiffusion channels ", options_.channels, " differ from the ",
              kind, "'s ", channels);
  TORCH_CHECK(out_dim == channels, "ElucidatedDiffusion needs a ", kind, " predicting ", channels,
              " channels, this one has out_dim ", out_dim);
  TORCH_CHECK(options_.image_size % downsample_factor == 0, "ElucidatedDiffusion image_size ", options_.image_size,
              " must be divisible by the ", kind, "'s downsample factor ", downsample_factor);
}

std::shared_ptr<torch::nn::Module> ElucidatedDiffusionImpl::denoiser() const {
  if (unet) return unet.ptr();
  return karras_unet.ptr();
}

torch::Tensor ElucidatedDiffusionImpl::c_skip(const torch::Tensor& sigma) const {
  const double data2 = std::pow(options_.sigma_data, 2);
  return (sigma.pow(2) + data2).reciprocal() * data2;
}

torch::Tensor ElucidatedDiffusionImpl::c_out(const torch::Tensor& sigma) const {
  const double data2 = std::pow(options_.sigma_data, 2);
  return sigma * options_.sigma_data * (sigma.pow(2) + data2).pow(-0.5);
}

torch::Tensor ElucidatedDiffusionImpl::c_in(const torch::Tensor& sigma) const {
  return (sigma.pow(2) + std::pow(options_.sigma_data, 2)).pow(-0.5);
}

torch::Tensor ElucidatedDiffusionImpl::c_noise(const torch::Tensor& sigma) const {
  return sigma.clamp_min(1e-20).log() * 0.25;
}

torch::Tensor ElucidatedDiffusionImpl::loss_weight(const torch::Tensor& sigma) const {
  return (sigma.pow(2) + std::pow(options_.sigma_data, 2)) * (sigma * options_.sigma_data).pow(-2);
}

torch::Tensor ElucidatedDiffusionImpl::net_forward(const torch::Tensor& x, const torch::Tensor& time,
                                                   const std::optional<torch::Tensor>& self_cond) {
  TORCH_CHECK(self_condition_ || !self_cond, "ElucidatedDiffusion: self_cond given, but the net does not self-condition");
  if (unet) return unet->forward(x, time, self_condition_ ? std::optional(self_cond.value_or(torch::zeros_like(x))) : std::nullopt);
  return karras_unet->forward(x, time, self_cond);
}

torch::Tensor ElucidatedDiffusionImpl::preconditioned_network_forward(const torch::Tensor& noised_images,
                                                                      const torch::Tensor& sigma,
                                                                      const std::optional<torch::Tensor>& self_cond,
                                                                      bool clamp) {
  const int64_t b = noised_images.size(0);
  TORCH_CHECK(noised_images.dim() == 4 && noised_images.size(1) == options_.channels &&
                  noised_images.size(2) == options_.image_size && noised_images.size(3) == options_.image_size,
              "ElucidatedDiffusion expects images of shape [batch, ", options_.channels, ", ", options_.image_size,
              ", ", options_.image_size, "], got ", noised_images.sizes());
  TORCH_CHECK(sigma.dim() == 1 && sigma.size(0) == b, "ElucidatedDiffusion expects sigma of shape [", b, "], got ",
              sigma.sizes());
  auto padded = sigma.reshape({b, 1, 1, 1});
  auto net_out = net_forward(c_in(padded) * noised_images, c_noise(sigma), self_cond);
  auto out = c_skip(padded) * noised_images + c_out(padded) * net_out;
  return clamp ? out.clamp(-1., 1.) : out;
}

torch::Tensor ElucidatedDiffusionImpl::preconditioned_network_forward(const torch::Tensor& noised_images, double sigma,
                                                                      const std::optional<torch::Tensor>& self_cond,
                                                                      bool clamp) {
  auto sigmas = torch::full({noised_images.size(0)}, sigma, torch::TensorOptions(torch::kFloat).device(noised_images.device()));
  return preconditioned_network_forward(noised_images, sigmas, self_cond, clamp);
}

torch::Tensor ElucidatedDiffusionImpl::sample_schedule(std::optional<int64_t> steps) const {
  const int64_t n = steps.value_or(options_.num_sample_steps);
  TORCH_CHECK(n >= 2, "ElucidatedDiffusion needs at least 2 sampling steps, got ", n);
  const double inv_rho = 1 / options_.rho;
  const double max_r = std::pow(options_.sigma_max, inv_rho), min_r = std::pow(options_.sigma_min, inv_rho);
  auto device = denoiser()->parameters().empty() ? torch::Device(torch::kCPU) : denoiser()->parameters()[0].device();
  auto ramp = torch::arange(n, torch::TensorOptions(torch::kFloat).device(device));
  auto sigmas = (ramp / (n - 1) * (min_r - max_r) + max_r).pow(options_.rho);
  return torch::constant_pad_nd(sigmas, {0, 1}, 0.);
}

torch::Tensor ElucidatedDiffusionImpl::sample(int64_t batch, torch::Generator generator, std::optional<int64_t> steps,
                                              bool clamp) {
  const auto& o = options_;
  auto device = sample_schedule(2).device();
  return sample_from(draw_normal(generator, {batch, o.channels, o.image_size, o.image_size}, device), generator, steps,
                     clamp);
}

void ElucidatedDiffusionImpl::check_initial_noise(const torch::Tensor& initial_noise) const {
  const auto& o = options_;
  TORCH_CHECK(initial_noise.dim() == 4 && initial_noise.size(1) == o.channels && initial_noise.size(2) == o.image_size &&
                  initial_noise.size(3) == o.image_size,
              "ElucidatedDiffusion: initial noise must be [batch, ", o.channels, ", ", o.image_size, ", ", o.image_size,
              "], got ", initial_noise.sizes());
}

torch::Tensor ElucidatedDiffusionImpl::sample_from(const torch::Tensor& initial_noise, torch::Generator generator,
                                                   std::optional<int64_t> steps, bool clamp) {
  torch::NoGradGuard no_grad;
  check_initial_noise(initial_noise);
  const int64_t n = steps.value_or(options_.num_sample_steps);
  const auto& o = options_;
  const auto shape = initial_noise.sizes().vec();
  auto sigmas = sample_schedule(n);
  const double churn = std::min(o.S_churn / static_cast<double>(n), std::sqrt(2.) - 1);
  auto gammas = torch::where((sigmas >= o.S_tmin) & (sigmas <= o.S_tmax), churn, 0.);
  const auto device = sigmas.device();

  auto images = sigmas[0] * initial_noise.to(device);
  std::optional<torch::Tensor> x_start;
  for (int64_t i = 0; i < n; ++i) {
    const double sigma = sigmas[i].item<double>(), sigma_next = sigmas[i + 1].item<double>();
    const double gamma = gammas[i].item<double>();
    auto eps = o.S_noise * draw_normal(generator, shape, device);
    const double sigma_hat = sigma + gamma * sigma;
    auto images_hat = images + std::sqrt(std::pow(sigma_hat, 2) - std::pow(sigma, 2)) * eps;

    auto model_output = preconditioned_network_forward(images_hat, sigma_hat, self_condition_ ? x_start : std::nullopt, clamp);
    auto denoised_over_sigma = (images_hat - model_output) / sigma_hat;
    auto images_next = images_hat + (sigma_next - sigma_hat) * denoised_over_sigma;
    x_start = model_output;
    if (sigma_next != 0) {
      auto model_output_next = preconditioned_network_forward(
          images_next, sigma_next, self_condition_ ? std::optional(model_output) : std::nullopt, clamp);
      auto denoised_prime_over_sigma = (images_next - model_output_next) / sigma_next;
      images_next = images_hat + (0.5 * (sigma_next - sigma_hat)) * (denoised_over_sigma + denoised_prime_over_sigma);
      x_start = model_output_next;
    }
    images = images_next;
  }
  return unnormalize_to_zero_to_one(images.clamp(-1., 1.));
}

torch::Tensor ElucidatedDiffusionImpl::sample_using_dpmpp(int64_t batch, torch::Generator generator,
                                                          std::optional<int64_t> steps) {
  const auto& o = options_;
  auto device = sample_schedule(2).device();
  return sample_using_dpmpp_from(draw_normal(generator, {batch, o.channels, o.image_size, o.image_size}, device), steps);
}

torch::Tensor ElucidatedDiffusionImpl::sample_using_dpmpp_from(const torch::Tensor& initial_noise,
                                                               std::optional<int64_t> steps) {
  torch::NoGradGuard no_grad;
  check_initial_noise(initial_noise);
  const auto& o = options_;
  auto sigmas = sample_schedule(steps.value_or(o.num_sample_steps));
  auto images = sigmas[0] * initial_noise.to(sigmas.device());
  // DPM-Solver++ works in t = -ln(sigma).
  auto sigma_fn = [](const torch::Tensor& t) { return t.neg().exp(); };
  auto t_fn = [](const torch::Tensor& sigma) { return sigma.log().neg(); };
  torch::Tensor old_denoised;
  for (int64_t i = 0; i + 1 < sigmas.size(0); ++i) {
    auto denoised = preconditioned_network_forward(images, sigmas[i].item<double>());
    auto t = t_fn(sigmas[i]), t_next = t_fn(sigmas[i + 1]);
    auto h = t_next - t;
    torch::Tensor denoised_d = denoised;
    if (old_denoised.defined() && sigmas[i + 1].item<float>() != 0) {
      auto h_last = t - t_fn(sigmas[i - 1]);
      auto r = h_last / h;
      auto gamma = (2 * r).reciprocal() * -1;
      denoised_d = torch::rsub(gamma, 1) * denoised + gamma * old_denoised;
    }
    images = (sigma_fn(t_next) / sigma_fn(t)) * images - (-h).expm1() * denoised_d;
    old_denoised = denoised;
  }
  return unnormalize_to_zero_to_one(images.clamp(-1., 1.));
}

torch::Tensor ElucidatedDiffusionImpl::noise_distribution(int64_t batch, torch::Generator generator) const {
  auto device = denoiser()->parameters().empty() ? torch::Device(torch::kCPU) : denoiser()->parameters()[0].device();
  return (options_.P_std * draw_normal(generator, {batch}, device) + options_.P_mean).exp();
}

torch::Tensor ElucidatedDiffusionImpl::losses(const torch::Tensor& images, const torch::Tensor& sigmas,
                                              const torch::Tensor& noise, bool self_condition_pass) {
  TORCH_CHECK(noise.sizes() == images.sizes(), "ElucidatedDiffusion noise must have the images' shape ",
              images.sizes(), ", got ", noise.sizes());
  TORCH_CHECK(!self_condition_pass || self_condition_,
              "ElucidatedDiffusion: a self-conditioning pass needs a self-conditioning net");
  const int64_t b = images.size(0);
  auto noised = images + sigmas.reshape({b, 1, 1, 1}) * noise;
  std::optional<torch::Tensor> self_cond;
  if (self_condition_pass) {
    torch::NoGradGuard no_grad;
    self_cond = preconditioned_network_forward(noised, sigmas).detach();
  }
  auto denoised = preconditioned_network_forward(noised, sigmas, self_cond);
  auto per_sample = torch::mse_loss(denoised, images, at::Reduction::None).mean({1, 2, 3});
  return per_sample * loss_weight(sigmas);
}

torch::Tensor ElucidatedDiffusionImpl::forward(const torch::Tensor& images, torch::Generator generator) {
  const int64_t s = options_.image_size;
  TORCH_CHECK(images.dim() == 4 && images.size(1) == options_.channels && images.size(2) == s && images.size(3) == s,
              "ElucidatedDiffusion expects images of shape [batch, ", options_.channels, ", ", s, ", ", s, "], got ",
              images.sizes());
  auto x = images * 2 - 1;
  auto sigmas = noise_distribution(images.size(0), generator).to(images.device());
  auto noise = draw_normal(generator, x.sizes(), x.device());
  bool self_condition_pass = false;
  if (self_condition_) {
    auto on = generator.defined() ? generator.device() : torch::Device(torch::kCPU);
    self_condition_pass = torch::rand({1}, as_optional(generator), torch::TensorOptions(torch::kFloat).device(on))
                              .item<float>() < 0.5f;
  }
  return losses(x, sigmas, noise, self_condition_pass).mean();
}

}  // namespace diffuse::model
