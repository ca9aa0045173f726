// trainer/model_factory.cpp: see model_factory.h.
#include "trainer/model_factory.h"

#include <algorithm>
#include <stdexcept>

namespace diffuse::trainer {

model::UnetOptions unet_options(const ModelConfig& m) {
  model::UnetOptions options;
  options.dim = m.dim;
  options.dim_mults = m.dim_mults;
  options.channels = m.channels;
  options.self_condition = m.self_condition;
  options.learned_variance = m.learned_variance;
  options.dropout = m.dropout;
  options.attn_heads = {m.attn_heads};
  options.attn_dim_head = {m.attn_dim_head};
  options.full_attn = m.full_attn;
  options.flash_attn = m.flash_attn;
  options.learned_sinusoidal_cond = m.learned_sinusoidal_cond;
  options.random_fourier_features = m.random_fourier_features;
  options.learned_sinusoidal_dim = m.learned_sinusoidal_dim;
  return options;
}

model::KarrasUnetOptions karras_unet_options(const Config& config) {
  const auto& m = config.model;
  model::KarrasUnetOptions options;
  options.image_size = config.data.image_size;
  options.dim = m.dim;
  options.dim_max = m.dim_max;
  options.channels = m.channels;
  options.num_downsamples = m.num_downsamples;
  options.num_blocks_per_stage = m.num_blocks_per_stage;
  options.attn_res = m.attn_res;
  options.fourier_dim = m.fourier_dim;
  options.attn_dim_head = m.attn_dim_head;
  options.mp_cat_t = m.mp_cat_t;
  options.mp_add_emb_t = m.mp_add_emb_t;
  options.attn_res_mp_add_t = m.attn_res_mp_add_t;
  options.dropout = m.dropout;
  options.self_condition = m.self_condition;
  return options;
}

model::ElucidatedOptions elucidated_options(const Config& config) {
  const auto& d = config.diffusion;
  model::ElucidatedOptions options;
  options.image_size = config.data.image_size;
  options.channels = config.model.channels;
  options.sigma_min = d.sigma_min;
  options.sigma_max = d.sigma_max;
  options.sigma_data = d.sigma_data;
  options.rho = d.rho;
  options.P_mean = d.P_mean;
  options.P_std = d.P_std;
  options.S_churn = d.S_churn;
  options.S_tmin = d.S_tmin;
  options.S_tmax = d.S_tmax;
  options.S_noise = d.S_noise;
  return options;
}

model::ConditionalUnetOptions conditional_unet_options(const ModelConfig& m) {
  model::ConditionalUnetOptions options;
  options.dim = m.dim;
  options.num_classes = m.num_classes;
  options.cond_drop_prob = m.cond_drop_prob;
  options.dim_mults = m.dim_mults;
  options.channels = m.channels;
  options.attn_heads = m.attn_heads;
  options.attn_dim_head = m.attn_dim_head;
  return options;
}

std::string unet_options_json(const Config& config) {
  const auto& m = config.model;
  if (m.type == ModelType::kKarrasUnet) return karras_unet_options(config).to_json();
  return m.num_classes > 0 ? conditional_unet_options(m).to_json() : unet_options(m).to_json();
}

std::string diffusion_options_json(const Config& config) {
  return config.diffusion.type == DiffusionType::kElucidated ? elucidated_options(config).to_json()
                                                             : diffusion_options(config).to_json();
}

model::DiffusionOptions diffusion_options(const Config& config) {
  model::DiffusionOptions options;
  options.image_size = config.data.image_size;
  options.timesteps = config.diffusion.timesteps;
  options.objective = to_string(config.diffusion.objective);
  options.beta_schedule = to_string(config.diffusion.beta_schedule);
  options.min_snr_loss_weight = config.diffusion.min_snr_loss_weight;
  options.min_snr_gamma = config.diffusion.min_snr_gamma;
  options.offset_noise_strength = config.diffusion.offset_noise_strength;
  options.vlb_weight = config.diffusion.vlb_weight;
  options.loss_type = to_string(config.diffusion.loss_type);
  options.immiscible = config.diffusion.immiscible;
  return options;
}

model::GaussianDiffusion build_diffusion(const Config& config) {
  if (config.diffusion.type != DiffusionType::kGaussian) {
    throw std::invalid_argument("build_diffusion: diffusion.type is " + to_string(config.diffusion.type) +
                                ", not gaussian (build_model builds either)");
  }
  if (config.model.num_classes > 0) {
    return model::GaussianDiffusion(model::ConditionalUnet(conditional_unet_options(config.model)),
                                    diffusion_options(config));
  }
  return model::GaussianDiffusion(model::Unet(unet_options(config.model)), diffusion_options(config));
}

DiffusionModel build_model(const Config& config) {
  if (config.diffusion.type == DiffusionType::kGaussian) return DiffusionModel(build_diffusion(config));
  if (config.model.type == ModelType::kKarrasUnet) {
    return DiffusionModel(
        model::ElucidatedDiffusion(model::KarrasUnet(karras_unet_options(config)), elucidated_options(config)));
  }
  return DiffusionModel(model::ElucidatedDiffusion(model::Unet(unet_options(config.model)), elucidated_options(config)));
}

namespace {

// What the weights mean: the U-Net's parameter shapes (and how its layers connect) and the
// forward process the network was trained to invert. Dropout, flash attention, the condition
// dropout (model.cond_drop_prob), the loss (diffusion.loss_type, diffusion.immiscible) and every
// training, data, logging and sampling key can change between a run and its resume.
bool defines_the_model(const std::string& key) {
  static const std::vector<std::string> keys{
      "model.dim",           "model.dim_mults",        "model.channels",      "model.self_condition",
      "model.learned_variance", "model.attn_heads",    "model.attn_dim_head", "model.full_attn",     "model.num_classes",
      "diffusion.timesteps", "diffusion.beta_schedule", "diffusion.objective",
      "model.type",          "diffusion.type",         "model.learned_sinusoidal_cond", "model.random_fourier_features",
      "model.learned_sinusoidal_dim", "model.dim_max", "model.num_downsamples", "model.num_blocks_per_stage",
      "model.attn_res",      "model.fourier_dim",      "model.mp_cat_t",      "model.mp_add_emb_t",
      "model.attn_res_mp_add_t", "diffusion.sigma_data"};
  return std::find(keys.begin(), keys.end(), key) != keys.end();
}

}  // namespace

ResumeVerdict compare_for_resume(const Config& saved, const Config& current) {
  auto before = saved.values();
  auto after = current.values();
  ResumeVerdict verdict;
  for (size_t i = 0; i < before.size(); ++i) {
    if (before[i].second == after[i].second) continue;
    ConfigChange change{before[i].first, before[i].second, after[i].second};
    (defines_the_model(change.key) ? verdict.refused : verdict.allowed).push_back(std::move(change));
  }
  return verdict;
}

std::string resume_refusal_message(const std::string& checkpoint, const std::vector<ConfigChange>& refused) {
  std::string changes;
  for (const auto& c : refused) changes += (changes.empty() ? "" : "; ") + c.key + " " + c.before + " -> " + c.after;
  return "cannot resume from " + checkpoint + ": the checkpoint's weights were trained with a different model (" +
         changes + "). Resume with the checkpoint's values (its config is in its manifest; `diffuse inspect " +
         checkpoint + "` shows it), or start a new run directory to train the changed model.";
}

}  // namespace diffuse::trainer
