// trainer/model_factory.cpp: see model_factory.h.
#include "trainer/model_factory.h"

#include <algorithm>

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

std::string unet_options_json(const ModelConfig& m) {
  return m.num_classes > 0 ? conditional_unet_options(m).to_json() : unet_options(m).to_json();
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
  if (config.model.num_classes > 0) {
    return model::GaussianDiffusion(model::ConditionalUnet(conditional_unet_options(config.model)),
                                    diffusion_options(config));
  }
  return model::GaussianDiffusion(model::Unet(unet_options(config.model)), diffusion_options(config));
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
      "diffusion.timesteps", "diffusion.beta_schedule", "diffusion.objective"};
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
