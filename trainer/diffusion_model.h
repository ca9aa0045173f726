// trainer/diffusion_model.h: the formulation a run trains, behind one interface for the trainer,
// sampling, evaluation and export: GaussianDiffusion (diffusion.type: gaussian, DDPM/DDIM, around a
// Unet or ConditionalUnet) or ElucidatedDiffusion (diffusion.type: elucidated, EDM, around a Unet
// with Fourier time or a KarrasUnet).
//
//   DiffusionModel model = build_model(config);          // trainer/model_factory.h
//   model.module().to(device);
//   auto step = model.training_losses(x, labels, sampler, generator);   // per-sample losses
//   auto images = model.sample_from(noise, {.sampler = "auto", .steps = 32}, generator);
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>

#include "model/diffusion.h"
#include "model/elucidated_diffusion.h"
#include "trainer/timestep_sampler.h"

namespace diffuse::trainer {

/// The sampler `requested` names for a formulation: "auto" is ddim (gaussian) or heun (elucidated);
/// otherwise ddim/ddpm or heun/dpmpp. Throws std::invalid_argument naming the choices.
std::string resolve_sampler(DiffusionType type, const std::string& requested);

class DiffusionModel {
 public:
  DiffusionModel() = default;
  explicit DiffusionModel(model::GaussianDiffusion gaussian);
  explicit DiffusionModel(model::ElucidatedDiffusion elucidated);

  /// The whole diffusion (for to(), train(), eval()); registered names are the reference's.
  torch::nn::Module& module() const;
  /// The network alone: its parameters are what is trained, averaged, exported and checkpointed.
  std::shared_ptr<torch::nn::Module> denoiser() const;
  /// The DDPM formulation, or null: the variational bound (bits/dim) exists only for it.
  model::GaussianDiffusionImpl* gaussian() const { return gaussian_ ? gaussian_.ptr().get() : nullptr; }
  model::ElucidatedDiffusionImpl* elucidated() const { return elucidated_ ? elucidated_.ptr().get() : nullptr; }
  explicit operator bool() const { return gaussian_ || elucidated_; }

  int64_t channels() const;
  int64_t image_size() const;
  bool conditional() const { return gaussian_ && gaussian_->conditional(); }
  int64_t num_classes() const { return gaussian_ ? gaussian_->num_classes() : 0; }
  torch::Device device() const;
  /// "Unet", "ConditionalUnet" or "KarrasUnet": the reference class the exported weights load into.
  std::string network_class() const;

  DiffusionType type() const { return gaussian_ ? DiffusionType::kGaussian : DiffusionType::kElucidated; }
  /// resolve_sampler for this model's formulation.
  std::string sampler_name(const std::string& requested) const { return resolve_sampler(type(), requested); }

  struct TrainingStep {
    torch::Tensor losses;   ///< [b] per-sample loss, with the formulation's weighting
    torch::Tensor weights;  ///< [b] importance weights of the timestep draw (ones for elucidated)
    /// [b] int64 in [0, buckets): the draw's position in its noise distribution, low noise first (the
    /// timestep for gaussian; for elucidated, the log-normal quantile of sigma scaled to the buckets).
    torch::Tensor bucket;
  };
  /// One micro-batch's losses, drawing as the reference's forward() does, from `generator`: gaussian:
  /// t (from `sampler`), the noise, the self-conditioning coin; elucidated: sigma (log-normal), the
  /// noise, the coin. images: [-1, 1]; labels: a conditional model's classes (ignored otherwise).
  TrainingStep training_losses(const torch::Tensor& images, const torch::Tensor& labels, const TimestepSampler& sampler,
                               torch::Generator& generator, int64_t buckets);

  /// Images in [0, 1] from standard-normal initial noise [b, C, S, S]; the sampler's per-step noise
  /// comes from `generator`. options.sampler goes through sampler_name(). classes: a conditional
  /// model's labels (guided with options.cond_scale / rescaled_phi).
  torch::Tensor sample_from(const torch::Tensor& initial_noise, const model::SampleOptions& options,
                            torch::Generator generator, const torch::Tensor& classes = {});

 private:
  model::GaussianDiffusion gaussian_{nullptr};
  model::ElucidatedDiffusion elucidated_{nullptr};
};

}  // namespace diffuse::trainer
