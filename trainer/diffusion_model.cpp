// trainer/diffusion_model.cpp: see diffusion_model.h.
#include "trainer/diffusion_model.h"

#include <cmath>
#include <stdexcept>

namespace diffuse::trainer {

DiffusionModel::DiffusionModel(model::GaussianDiffusion gaussian) : gaussian_(std::move(gaussian)) {}
DiffusionModel::DiffusionModel(model::ElucidatedDiffusion elucidated) : elucidated_(std::move(elucidated)) {}

torch::nn::Module& DiffusionModel::module() const {
  if (gaussian_) return *gaussian_.ptr();
  if (elucidated_) return *elucidated_.ptr();
  throw std::logic_error("DiffusionModel: used before a diffusion was assigned");
}

std::shared_ptr<torch::nn::Module> DiffusionModel::denoiser() const {
  return gaussian_ ? gaussian_->denoiser() : elucidated_->denoiser();
}

int64_t DiffusionModel::channels() const { return gaussian_ ? gaussian_->channels() : elucidated_->channels(); }

int64_t DiffusionModel::image_size() const {
  return gaussian_ ? gaussian_->image_size() : elucidated_->image_size();
}

torch::Device DiffusionModel::device() const {
  auto params = denoiser()->parameters();
  return params.empty() ? torch::Device(torch::kCPU) : params.front().device();
}

std::string DiffusionModel::network_class() const {
  if (gaussian_) return gaussian_->conditional() ? "ConditionalUnet" : "Unet";
  return elucidated_->karras_unet ? "KarrasUnet" : "Unet";
}

std::string resolve_sampler(DiffusionType type, const std::string& requested) {
  if (type == DiffusionType::kGaussian) {
    if (requested == "auto") return "ddim";
    if (requested == "ddim" || requested == "ddpm") return requested;
    throw std::invalid_argument("sampler '" + requested +
                                "' is not one of this model's (diffusion.type: gaussian): auto, ddim or ddpm");
  }
  if (requested == "auto") return "heun";
  if (requested == "heun" || requested == "dpmpp") return requested;
  throw std::invalid_argument("sampler '" + requested +
                              "' is not one of this model's (diffusion.type: elucidated): auto, heun or dpmpp");
}

DiffusionModel::TrainingStep DiffusionModel::training_losses(const torch::Tensor& images, const torch::Tensor& labels,
                                                             const TimestepSampler& sampler,
                                                             torch::Generator& generator, int64_t buckets) {
  const int64_t b = images.size(0);
  if (gaussian_) {
    auto draw = sampler.sample(b, generator, images.device());
    auto noise = torch::randn(images.sizes(), generator, images.options());
    // Labels condition only a conditional model (an unconditional one refuses them).
    auto losses = gaussian_->training_losses(images, draw.t, noise, generator,
                                             gaussian_->conditional() ? labels : torch::Tensor());
    return {losses, draw.weights, draw.t};
  }
  const auto& o = elucidated_->options();
  auto sigmas = elucidated_->noise_distribution(b, generator).to(images.device());
  auto noise = torch::randn(images.sizes(), generator, images.options());
  bool self_condition_pass = false;
  if (elucidated_->self_condition()) {
    self_condition_pass =
        torch::rand({1}, generator, torch::TensorOptions(torch::kFloat).device(generator.device())).item<float>() < 0.5f;
  }
  auto losses = elucidated_->losses(images, sigmas, noise, self_condition_pass);
  // Phi((ln sigma - P_mean) / P_std): where sigma lies in the training distribution, so the loss
  // quartiles of the log mean the same for every run (lowest noise first, as the timestep's).
  auto quantile = 0.5 * (1 + torch::erf((sigmas.to(torch::kFloat64).log() - o.P_mean) / (o.P_std * std::sqrt(2.0))));
  auto bucket = (quantile * static_cast<double>(buckets)).floor().clamp(0, static_cast<double>(buckets - 1));
  return {losses, torch::ones({b}, images.options().dtype(torch::kFloat32)), bucket.to(torch::kInt64)};
}

torch::Tensor DiffusionModel::sample_from(const torch::Tensor& initial_noise, const model::SampleOptions& options,
                                          torch::Generator generator, const torch::Tensor& classes) {
  const std::string sampler = sampler_name(options.sampler);
  if (gaussian_) {
    auto resolved = options;
    resolved.sampler = sampler;
    return gaussian_->sample_from(initial_noise, resolved, generator, classes);
  }
  if (classes.defined()) {
    throw std::invalid_argument("an elucidated model is unconditional: it takes no classes");
  }
  if (options.steps < 2) {
    throw std::invalid_argument("the " + sampler + " sampler needs at least 2 steps, got " +
                                std::to_string(options.steps));
  }
  if (sampler == "dpmpp") return elucidated_->sample_using_dpmpp_from(initial_noise, options.steps);
  return elucidated_->sample_from(initial_noise, generator, options.steps, options.clip_denoised);
}

}  // namespace diffuse::trainer
