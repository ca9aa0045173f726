// The checks of a parsed configuration: ranges, combinations, and the keys that belong to the
// other network or formulation (Config::validate, validate_eval, validate_formulation).
#include "trainer/config.h"
#include "trainer/config_internal.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::trainer {
using config_internal::require;
using config_internal::shortest_text;

namespace {

// Bounds of keys whose later conversion could overflow: bucket bytes as int64, the collective
// deadline as int64 milliseconds and as a steady_clock time point (nanoseconds).
constexpr double kMaxBucketCapMb = 1024.0 * 1024.0;
constexpr double kMaxCollectiveTimeoutS = 7.0 * 24 * 3600;
// The largest relative width of a power-function EMA profile (trainer/posthoc_ema.h max_sigma_rel(),
// rounded down so that every accepted value has a gamma).
constexpr double kMaxSigmaRel = 0.30028;

void non_negative_key(const std::string& key, int64_t v) { require(v >= 0, key, std::to_string(v), "an integer >= 0"); }

}  // namespace

void Config::validate() const {
  config_internal::require_finite_floats(*this);
  auto positive = [](const std::string& key, int64_t v) { require(v > 0, key, std::to_string(v), "an integer > 0"); };
  auto non_negative = [](const std::string& key, int64_t v) {
    require(v >= 0, key, std::to_string(v), "an integer >= 0");
  };
  positive("model.dim", model.dim);
  require(!model.dim_mults.empty(), "model.dim_mults", "[]", "a non-empty list of positive integers");
  for (auto m : model.dim_mults) positive("model.dim_mults", m);
  require(model.channels == 1 || model.channels == 3, "model.channels", std::to_string(model.channels), "1 or 3");
  require(model.dropout >= 0 && model.dropout < 1, "model.dropout", std::to_string(model.dropout), "0 <= dropout < 1");
  positive("model.attn_heads", model.attn_heads);
  positive("model.attn_dim_head", model.attn_dim_head);
  require(model.full_attn.empty() || model.full_attn.size() == 1 || model.full_attn.size() == model.dim_mults.size(),
          "model.full_attn", std::to_string(model.full_attn.size()) + " entries",
          "empty, one entry, or one per stage (" + std::to_string(model.dim_mults.size()) + ")");

  require(model.num_classes >= 0, "model.num_classes", std::to_string(model.num_classes),
          "0 (unconditional) or the number of classes of the dataset's labels");
  require(model.cond_drop_prob >= 0 && model.cond_drop_prob <= 1, "model.cond_drop_prob",
          std::to_string(model.cond_drop_prob), "a probability in [0, 1]");
  if (model.num_classes > 0) {
    // The classifier-free-guidance U-Net of the reference has none of these: refuse rather than ignore.
    const std::string why = " (model.num_classes > 0 builds the reference's classifier-free-guidance U-Net, which "
                            "has no such option; remove the key or set model.num_classes=0)";
    require(!model.self_condition, "model.self_condition", "true", "false" + why);
    require(!model.learned_variance, "model.learned_variance", "true", "false" + why);
    require(model.dropout == 0, "model.dropout", std::to_string(model.dropout), "0" + why);
    require(model.full_attn.empty(), "model.full_attn", std::to_string(model.full_attn.size()) + " entries",
            "[]" + why);
    require(!model.flash_attn, "model.flash_attn", "true", "false" + why);
  }

  positive("diffusion.timesteps", diffusion.timesteps);
  require(diffusion.min_snr_gamma > 0, "diffusion.min_snr_gamma", std::to_string(diffusion.min_snr_gamma), "> 0");
  require(diffusion.offset_noise_strength >= 0, "diffusion.offset_noise_strength",
          std::to_string(diffusion.offset_noise_strength), ">= 0");
  require(diffusion.vlb_weight >= 0, "diffusion.vlb_weight", std::to_string(diffusion.vlb_weight), ">= 0");

  require(!data.path.empty(), "data.path", "''", "the path of an HDF5 dataset made by `diffuse prep`");
  if (model.type == ModelType::kUnet) {
    int64_t factor = int64_t{1} << (model.dim_mults.size() - 1);
    require(data.image_size > 0 && data.image_size % factor == 0, "data.image_size", std::to_string(data.image_size),
            "a positive multiple of " + std::to_string(factor) + " (2^(stages-1) for " +
                std::to_string(model.dim_mults.size()) + " stages)");
  }
  validate_formulation();
  positive("data.workers", data.workers);
  positive("data.prefetch", data.prefetch);

  positive("train.steps", train.steps);
  positive("train.batch_size", train.batch_size);
  positive("train.accumulate", train.accumulate);
  require(train.lr > 0, "train.lr", std::to_string(train.lr), "a learning rate > 0");
  non_negative("train.warmup_steps", train.warmup_steps);
  require(train.min_lr_ratio >= 0 && train.min_lr_ratio <= 1, "train.min_lr_ratio", std::to_string(train.min_lr_ratio),
          "0..1");
  require(train.weight_decay >= 0, "train.weight_decay", std::to_string(train.weight_decay), ">= 0");
  require(train.adam_beta1 >= 0 && train.adam_beta1 < 1, "train.adam_beta1", std::to_string(train.adam_beta1), "0..1");
  require(train.adam_beta2 >= 0 && train.adam_beta2 < 1, "train.adam_beta2", std::to_string(train.adam_beta2), "0..1");
  require(train.adam_eps > 0, "train.adam_eps", std::to_string(train.adam_eps), "> 0");
  require(train.max_grad_norm >= 0, "train.max_grad_norm", std::to_string(train.max_grad_norm), ">= 0 (0 disables)");
  require(train.seed >= 0, "train.seed", std::to_string(train.seed), "an integer >= 0");
  // Upper bounds keep the conversions to bytes (int64) and milliseconds far from overflowing.
  require(train.bucket_cap_mb > 0 && train.bucket_cap_mb <= kMaxBucketCapMb, "train.bucket_cap_mb",
          std::to_string(train.bucket_cap_mb), "> 0 and <= " + std::to_string(static_cast<int64_t>(kMaxBucketCapMb)) +
                                                   " (1 TiB)");
  require(train.collective_timeout_s >= 0.001 && train.collective_timeout_s <= kMaxCollectiveTimeoutS,
          "train.collective_timeout_s", std::to_string(train.collective_timeout_s),
          "0.001 to " + std::to_string(static_cast<int64_t>(kMaxCollectiveTimeoutS)) + " seconds (7 days)");
  // The scale multiplies float32 losses: beyond float32's range it is infinity.
  require(train.loss_scale_init > 0 && train.loss_scale_init <= std::numeric_limits<float>::max(),
          "train.loss_scale_init", std::to_string(train.loss_scale_init), "> 0 and <= 3.4e38 (float32's largest)");
  positive("train.loss_scale_growth_interval", train.loss_scale_growth_interval);
  positive("train.max_consecutive_skipped", train.max_consecutive_skipped);
  positive("train.max_nonfinite_skips", train.max_nonfinite_skips);
  require(train.min_loss_scale > 0, "train.min_loss_scale", std::to_string(train.min_loss_scale), "> 0");

  require(!ema.decay.empty(), "ema.decay", "[]", "one or more decay rates in (0, 1)");
  for (double d : ema.decay) require(d > 0 && d < 1, "ema.decay", std::to_string(d), "a rate in (0, 1)");
  positive("ema.update_every", ema.update_every);
  non_negative("ema.update_after_step", ema.update_after_step);
  require(ema.inv_gamma > 0, "ema.inv_gamma", std::to_string(ema.inv_gamma), "> 0");
  require(ema.power > 0, "ema.power", std::to_string(ema.power), "> 0");
  require(ema.min_value >= 0 && ema.min_value < 1, "ema.min_value", std::to_string(ema.min_value), "0..1");
  // Post-hoc EMA (ema-pytorch's PostHocEMA): power-function profiles, whose sigma_rel cannot exceed
  // 0.3003 (sigma_rel(gamma) peaks at gamma = (sqrt(5) - 3) / 2).
  for (double sigma_rel : ema.posthoc_sigma_rels) {
    require(sigma_rel > 0 && sigma_rel <= kMaxSigmaRel, "ema.posthoc.sigma_rels", shortest_text(sigma_rel),
            "relative widths in (0, 0.3003] (EDM2 trains with [0.05, 0.28])");
  }
  for (size_t i = 0; i < ema.posthoc_sigma_rels.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      require(ema.posthoc_sigma_rels[i] != ema.posthoc_sigma_rels[j], "ema.posthoc.sigma_rels",
              shortest_text(ema.posthoc_sigma_rels[i]) + " twice", "distinct profiles");
    }
  }
  if (ema.posthoc_sigma_rels.empty()) {
    require(ema.posthoc_snapshot_every == 0, "ema.posthoc.snapshot_every", std::to_string(ema.posthoc_snapshot_every),
            "0 without ema.posthoc.sigma_rels (no post-hoc EMA to snapshot)");
  } else {
    require(ema.posthoc_snapshot_every > 0, "ema.posthoc.snapshot_every", std::to_string(ema.posthoc_snapshot_every),
            "an integer > 0 with ema.posthoc.sigma_rels (steps between snapshots; EDM2 uses about 1/16 of a run "
            "of 2^k steps)");
  }

  positive("checkpoint.every", checkpoint.every);
  positive("checkpoint.keep_last", checkpoint.keep_last);
  non_negative("checkpoint.keep_every", checkpoint.keep_every);

  positive("log.every", log.every);
  non_negative("log.sample_every", log.sample_every);
  positive("log.num_samples", log.num_samples);
  positive("log.sample_steps", log.sample_steps);
  if (diffusion.type == DiffusionType::kGaussian) {
    require(log.sample_steps <= diffusion.timesteps, "log.sample_steps", std::to_string(log.sample_steps),
            "at most diffusion.timesteps (" + std::to_string(diffusion.timesteps) + ")");
  } else {
    require(log.sample_steps >= 2, "log.sample_steps", std::to_string(log.sample_steps),
            "at least 2 (the elucidated sampler's schedule needs two noise levels)");
  }

  validate_eval();
}

void Config::validate_eval() const {
  non_negative_key("eval.every", eval.every);
  if (eval.every == 0) {
    // A section that names its files but never runs would be a silent no-op.
    require(eval.features.empty() && eval.ref.empty(), "eval.every", "0",
            "an integer > 0 when eval.features or eval.ref is set (0: no evaluation during training)");
    require(checkpoint.keep_best == BestMetric::kNone, "checkpoint.keep_best", to_string(checkpoint.keep_best),
            "none without evaluations during training (add an eval: section with every, n, features and ref)");
    return;
  }
  require(!eval.features.empty(), "eval.features", "''",
          "a TorchScript feature network (.pt with diffuse_features.json) when eval.every > 0");
  require(!eval.ref.empty(), "eval.ref", "''",
          "reference statistics from `diffuse stats --features` with the same network when eval.every > 0");
  require(eval.n >= 2, "eval.n", std::to_string(eval.n), "an integer >= 2 (10000 or more for numbers to compare)");
  if (diffusion.type == DiffusionType::kGaussian) {
    require(eval.sampler == "auto" || eval.sampler == "ddim" || eval.sampler == "ddpm", "eval.sampler", eval.sampler,
            "auto, ddim or ddpm (diffusion.type: gaussian)");
    require(eval.steps > 0 && eval.steps <= diffusion.timesteps, "eval.steps", std::to_string(eval.steps),
            "1 to diffusion.timesteps (" + std::to_string(diffusion.timesteps) + ")");
  } else {
    require(eval.sampler == "auto" || eval.sampler == "heun" || eval.sampler == "dpmpp", "eval.sampler", eval.sampler,
            "auto, heun or dpmpp (diffusion.type: elucidated)");
    require(eval.steps >= 2, "eval.steps", std::to_string(eval.steps), "an integer >= 2");
  }
  require(eval.eta >= 0, "eval.eta", std::to_string(eval.eta), ">= 0");
  non_negative_key("eval.seed", eval.seed);
  bool known_weights = eval.ema == "ema" || eval.ema == "online";
  std::string rates;
  for (double rate : ema.decay) {
    char* end = nullptr;
    double given = std::strtod(eval.ema.c_str(), &end);
    if (!eval.ema.empty() && end != nullptr && *end == '\0' && std::abs(given - rate) < 1e-12) known_weights = true;
    rates += (rates.empty() ? "" : ", ") + shortest_text(rate);
  }
  require(known_weights, "eval.ema", "'" + eval.ema + "'",
          "ema (the first rate), online (the raw weights) or one of ema.decay: " + rates);
}

void Config::validate_formulation() const {
  const bool karras = model.type == ModelType::kKarrasUnet;
  const bool elucidated = diffusion.type == DiffusionType::kElucidated;
  // A key the chosen network or formulation does not read must keep its default: a value there was
  // meant for the other type, and ignoring it would train something other than what was asked for.
  const auto defaults = Config().values();
  const auto current = values();
  auto require_default = [&](const std::vector<std::string>& keys, const std::string& why) {
    for (size_t i = 0; i < current.size(); ++i) {
      if (std::find(keys.begin(), keys.end(), current[i].first) == keys.end()) continue;
      require(current[i].second == defaults[i].second, current[i].first, current[i].second,
              "its default " + defaults[i].second + " (" + why + "; remove the key)");
    }
  };
  if (karras) {
    require_default({"model.dim_mults", "model.learned_variance", "model.attn_heads", "model.full_attn",
                     "model.flash_attn", "model.cond_drop_prob", "model.learned_sinusoidal_cond",
                     "model.random_fourier_features", "model.learned_sinusoidal_dim"},
                    "model.type: karras_unet does not read it; it belongs to model.type: unet");
    require(elucidated, "model.type", "karras_unet",
            "unet with diffusion.type: gaussian (model.type: karras_unet is EDM2's network: set diffusion.type: "
            "elucidated)");
    require(model.dim_max >= model.dim, "model.dim_max", std::to_string(model.dim_max),
            ">= model.dim (" + std::to_string(model.dim) + ")");
    require(model.num_downsamples >= 1 && model.num_downsamples <= 8, "model.num_downsamples",
            std::to_string(model.num_downsamples), "1 to 8");
    require(model.num_blocks_per_stage >= 1, "model.num_blocks_per_stage", std::to_string(model.num_blocks_per_stage),
            "an integer >= 1");
    for (auto res : model.attn_res) require(res > 0, "model.attn_res", std::to_string(res), "positive resolutions");
    require(model.fourier_dim > 0 && model.fourier_dim % 2 == 0, "model.fourier_dim", std::to_string(model.fourier_dim),
            "a positive even integer");
    for (const auto& [key, t] : {std::pair<std::string, double>{"model.mp_cat_t", model.mp_cat_t},
                                 {"model.mp_add_emb_t", model.mp_add_emb_t},
                                 {"model.attn_res_mp_add_t", model.attn_res_mp_add_t}}) {
      require(t >= 0 && t <= 1, key, shortest_text(t), "a blend in [0, 1]");
    }
    const int64_t factor = int64_t{1} << model.num_downsamples;
    require(data.image_size > 0 && data.image_size % factor == 0, "data.image_size", std::to_string(data.image_size),
            "a positive multiple of " + std::to_string(factor) + " (2^model.num_downsamples)");
  } else {
    require_default({"model.dim_max", "model.num_downsamples", "model.num_blocks_per_stage", "model.attn_res",
                     "model.fourier_dim", "model.mp_cat_t", "model.mp_add_emb_t", "model.attn_res_mp_add_t"},
                    "model.type: unet does not read it; it belongs to model.type: karras_unet");
    require(!(model.learned_sinusoidal_cond && model.random_fourier_features), "model.random_fourier_features", "true",
            "false when model.learned_sinusoidal_cond is true (one Fourier embedding: learned or random)");
    require(model.learned_sinusoidal_dim > 0 && model.learned_sinusoidal_dim % 2 == 0, "model.learned_sinusoidal_dim",
            std::to_string(model.learned_sinusoidal_dim), "a positive even integer");
  }
  if (elucidated) {
    require_default({"diffusion.timesteps", "diffusion.objective", "diffusion.beta_schedule",
                     "diffusion.min_snr_loss_weight", "diffusion.min_snr_gamma", "diffusion.offset_noise_strength",
                     "diffusion.vlb_weight", "diffusion.timestep_sampler", "diffusion.loss_type",
                     "diffusion.immiscible"},
                    "diffusion.type: elucidated does not read it; it belongs to diffusion.type: gaussian");
    require(model.num_classes == 0, "model.num_classes", std::to_string(model.num_classes),
            "0 with diffusion.type: elucidated (the reference's ElucidatedDiffusion passes its network no labels)");
    if (!karras) {
      require(model.learned_sinusoidal_cond || model.random_fourier_features, "model.learned_sinusoidal_cond", "false",
              "true, or model.random_fourier_features: true, with diffusion.type: elucidated (its network sees the "
              "continuous noise level ln(sigma)/4, which the sinusoidal step embedding is not made for; the "
              "reference asserts it)");
      require(!model.learned_variance, "model.learned_variance", "true",
              "false with diffusion.type: elucidated (the denoiser predicts the image only)");
    }
    require(diffusion.sigma_min > 0, "diffusion.sigma_min", shortest_text(diffusion.sigma_min), "> 0");
    require(diffusion.sigma_max > diffusion.sigma_min, "diffusion.sigma_max", shortest_text(diffusion.sigma_max),
            "> diffusion.sigma_min (" + shortest_text(diffusion.sigma_min) + ")");
    require(diffusion.sigma_data > 0, "diffusion.sigma_data", shortest_text(diffusion.sigma_data), "> 0");
    require(diffusion.rho > 0, "diffusion.rho", shortest_text(diffusion.rho), "> 0");
    require(diffusion.P_std > 0, "diffusion.P_std", shortest_text(diffusion.P_std), "> 0");
    require(diffusion.S_churn >= 0, "diffusion.S_churn", shortest_text(diffusion.S_churn), ">= 0");
    require(diffusion.S_tmin >= 0, "diffusion.S_tmin", shortest_text(diffusion.S_tmin), ">= 0");
    require(diffusion.S_tmax >= diffusion.S_tmin, "diffusion.S_tmax", shortest_text(diffusion.S_tmax),
            ">= diffusion.S_tmin (" + shortest_text(diffusion.S_tmin) + ")");
    require(diffusion.S_noise > 0, "diffusion.S_noise", shortest_text(diffusion.S_noise), "> 0");
  } else {
    require_default({"diffusion.sigma_min", "diffusion.sigma_max", "diffusion.sigma_data", "diffusion.rho",
                     "diffusion.P_mean", "diffusion.P_std", "diffusion.S_churn", "diffusion.S_tmin", "diffusion.S_tmax",
                     "diffusion.S_noise"},
                    "diffusion.type: gaussian does not read it; it belongs to diffusion.type: elucidated");
    require(!model.learned_sinusoidal_cond && !model.random_fourier_features, "model.learned_sinusoidal_cond", "true",
            "false with diffusion.type: gaussian (the reference's GaussianDiffusion refuses a Fourier-time U-Net)");
  }
}

}  // namespace diffuse::trainer
