// trainer/model_factory.h: from a configuration to the model it describes, and which
// configuration changes a checkpoint's weights can survive.
//
//   DiffusionModel model = build_model(config);               // network + diffusion, CPU, fp32
//   auto verdict = compare_for_resume(saved_config, config);  // on --resume
//   if (!verdict.refused.empty()) throw ...;                  // e.g. model.dim 32 -> 64
#pragma once

#include <string>
#include <vector>

#include "model/conditional_unet.h"
#include "model/diffusion.h"
#include "model/elucidated_diffusion.h"
#include "model/karras_unet.h"
#include "model/unet.h"
#include "trainer/config.h"
#include "trainer/diffusion_model.h"

namespace diffuse::trainer {

model::UnetOptions unet_options(const ModelConfig& model);
/// The class-conditional U-Net's options (model.num_classes > 0); Config::validate() has refused the
/// keys it lacks (self_condition, learned_variance, dropout, full_attn, flash_attn).
model::ConditionalUnetOptions conditional_unet_options(const ModelConfig& model);
/// model.type: karras_unet's options (image_size from data.image_size).
model::KarrasUnetOptions karras_unet_options(const Config& config);
/// The options of whichever network the config builds, as JSON (checkpoint and export metadata).
std::string unet_options_json(const Config& config);
/// The gaussian diffusion the config trains. Sampling settings (log.sample_steps) are not part of it:
/// they are passed to each sampling call.
model::DiffusionOptions diffusion_options(const Config& config);
/// diffusion.type: elucidated's options.
model::ElucidatedOptions elucidated_options(const Config& config);
/// diffusion_options or elucidated_options as JSON, whichever diffusion.type names.
std::string diffusion_options_json(const Config& config);
/// The U-Net (conditional when model.num_classes > 0) and gaussian diffusion the configuration
/// describes (on CPU, fp32); throws std::invalid_argument for diffusion.type: elucidated.
model::GaussianDiffusion build_diffusion(const Config& config);
/// The network and diffusion the configuration describes, either formulation (on CPU, fp32).
DiffusionModel build_model(const Config& config);

/// One configuration key whose value differs.
struct ConfigChange {
  std::string key;
  std::string before, after;
};

/// What a resume with `current` on a checkpoint written with `saved` means.
struct ResumeVerdict {
  /// Keys that change what the saved weights mean (the U-Net's shape, the timesteps, the noise
  /// schedule, the objective): the resume must be refused.
  std::vector<ConfigChange> refused;
  /// Every other differing key: training or sampling from here on changes (logged on resume).
  std::vector<ConfigChange> allowed;
};
ResumeVerdict compare_for_resume(const Config& saved, const Config& current);

/// The refusal message: every refused key with both values, and what to do instead.
std::string resume_refusal_message(const std::string& checkpoint, const std::vector<ConfigChange>& refused);

}  // namespace diffuse::trainer
