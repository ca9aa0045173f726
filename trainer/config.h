// trainer/config.h: the run configuration. Plain structs with defaults, one YAML reader, one YAML
// writer, one validate(); unknown keys and bad values fail before anything starts, naming the key,
// the value and what is allowed.
//
//   auto config = Config::from_yaml_file("configs/demo.yaml");
//   config.apply_override("train.lr=2e-4");      // --set
//   config.validate();
//   std::string resolved = config.to_yaml();     // written to the run directory and every checkpoint
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::trainer {

// The choices a config offers, parsed once when the config is read; to_string() gives the config's
// spelling back (for the written config, logs and messages).
enum class Precision { kFp32, kBf16, kFp16 };
enum class DeviceChoice { kAuto, kCpu, kCuda };
enum class GradCompression { kNone, kBf16, kFp16 };
enum class LrScheduleKind { kConstant, kCosine };
enum class Objective { kPredNoise, kPredX0, kPredV };
enum class BetaSchedule { kLinear, kCosine, kSigmoid };
enum class TimestepSamplerKind { kUniform, kLossAware };
enum class NonfinitePolicy { kStop, kSkip };
enum class LossType { kL2, kL1 };
enum class BestMetric { kNone, kFid, kKid };
enum class ModelType { kUnet, kKarrasUnet };
enum class DiffusionType { kGaussian, kElucidated };
enum class SnapshotDtype { kBf16, kFp32 };

std::string to_string(Precision value);
std::string to_string(DeviceChoice value);
std::string to_string(GradCompression value);
std::string to_string(LrScheduleKind value);
std::string to_string(Objective value);
std::string to_string(BetaSchedule value);
std::string to_string(TimestepSamplerKind value);
std::string to_string(NonfinitePolicy value);
std::string to_string(LossType value);
std::string to_string(BestMetric value);
std::string to_string(ModelType value);
std::string to_string(DiffusionType value);
std::string to_string(SnapshotDtype value);

struct ModelConfig {
  /// unet: the reference's Unet (or its classifier-free-guidance U-Net with num_classes > 0);
  /// karras_unet: EDM2's magnitude-preserving U-Net (the reference's KarrasUnet).
  ModelType type = ModelType::kUnet;
  int64_t dim = 64;
  std::vector<int64_t> dim_mults{1, 2, 4, 8};
  int64_t channels = 3;
  bool self_condition = false;
  bool learned_variance = false;
  double dropout = 0.0;
  int64_t attn_heads = 4;
  int64_t attn_dim_head = 32;
  std::vector<bool> full_attn{};  ///< empty: the reference default (full attention innermost only)
  bool flash_attn = false;
  /// > 0: the class-conditional U-Net of the reference's classifier_free_guidance module, trained on
  /// the dataset's labels (which must lie in [0, num_classes)); 0: the unconditional U-Net.
  int64_t num_classes = 0;
  double cond_drop_prob = 0.5;  ///< conditional only: share of labels replaced by the null class in training
  // unet only: a Fourier time embedding (learned, or random and fixed) in place of the sinusoidal one,
  // which diffusion.type: elucidated needs (its time input is the continuous c_noise = ln(sigma) / 4).
  bool learned_sinusoidal_cond = false;
  bool random_fourier_features = false;
  int64_t learned_sinusoidal_dim = 16;
  // karras_unet only (model.dim, channels, dropout, attn_dim_head and self_condition apply to both).
  int64_t dim_max = 768;
  int64_t num_downsamples = 3;
  int64_t num_blocks_per_stage = 4;
  std::vector<int64_t> attn_res{16, 8};
  int64_t fourier_dim = 16;
  double mp_cat_t = 0.5;
  double mp_add_emb_t = 0.5;
  double attn_res_mp_add_t = 0.3;
};

struct DiffusionConfig {
  /// gaussian: DDPM/DDIM (the reference's GaussianDiffusion); elucidated: EDM (ElucidatedDiffusion).
  DiffusionType type = DiffusionType::kGaussian;
  // gaussian only
  int64_t timesteps = 1000;
  Objective objective = Objective::kPredV;
  BetaSchedule beta_schedule = BetaSchedule::kSigmoid;
  bool min_snr_loss_weight = false;
  double min_snr_gamma = 5.0;
  double offset_noise_strength = 0.0;
  double vlb_weight = 0.001;               ///< hybrid-loss lambda, learned variance only
  TimestepSamplerKind timestep_sampler = TimestepSamplerKind::kUniform;
  LossType loss_type = LossType::kL2;      ///< l2 (squared error, the reference) or l1 (absolute error)
  bool immiscible = false;                 ///< immiscible noise assignment within each batch (reference 2.3.1)
  // elucidated only: the reference's names and defaults (EDM's Table 5)
  double sigma_min = 0.002;
  double sigma_max = 80;
  double sigma_data = 0.5;
  double rho = 7;
  double P_mean = -1.2;
  double P_std = 1.2;
  double S_churn = 80;
  double S_tmin = 0.05;
  double S_tmax = 50;
  double S_noise = 1.003;
};

struct DataConfig {
  std::string path;          ///< HDF5 dataset (diffuse prep); relative paths are relative to the CWD
  int64_t image_size = 128;
  bool random_flip = true;
  int64_t workers = 2;
  int64_t prefetch = 4;
};

struct TrainConfig {
  int64_t steps = 100000;
  int64_t batch_size = 32;        ///< per rank, per micro-step
  int64_t accumulate = 1;         ///< micro-steps per optimizer step
  double lr = 8e-5;
  LrScheduleKind lr_schedule = LrScheduleKind::kConstant;  ///< after warm-up
  int64_t warmup_steps = 0;
  double min_lr_ratio = 0.0;      ///< cosine floor as a fraction of lr
  double weight_decay = 0.0;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.99;
  double adam_eps = 1e-8;
  double max_grad_norm = 1.0;     ///< 0 disables clipping
  Precision precision = Precision::kFp32;
  int64_t seed = 0;
  DeviceChoice device = DeviceChoice::kAuto;
  double bucket_cap_mb = 25.0;
  GradCompression grad_compression = GradCompression::kNone;
  double collective_timeout_s = 600.0;
  double loss_scale_init = 65536.0;
  int64_t loss_scale_growth_interval = 2000;
  int64_t max_consecutive_skipped = 50;   ///< fp16: stop with a diagnosis after this many skipped steps
  double min_loss_scale = 1.0;            ///< fp16: stop when the scale falls below this
  bool channels_last = true;              ///< CUDA only
  /// A NaN/inf loss or gradient: stop the run (non-zero exit, nothing saved), or drop that step's
  /// update and go on, stopping after max_nonfinite_skips such steps in a row.
  NonfinitePolicy on_nonfinite = NonfinitePolicy::kStop;
  int64_t max_nonfinite_skips = 20;
};

struct EmaConfig {
  std::vector<double> decay{0.995};  ///< one or more rates, each kept and checkpointed
  int64_t update_every = 10;
  int64_t update_after_step = 100;
  double inv_gamma = 1.0;
  double power = 2.0 / 3.0;
  double min_value = 0.0;
  /// Post-hoc EMA (`posthoc:` in the ema section): one power-function EMA per relative width, each
  /// snapshotted every posthoc_snapshot_every steps to RUN/posthoc/, from which `export/sample/eval
  /// --posthoc-sigma-rel` synthesize any other width afterwards. Empty: none.
  std::vector<double> posthoc_sigma_rels{};
  int64_t posthoc_snapshot_every = 0;
  SnapshotDtype posthoc_dtype = SnapshotDtype::kBf16;  ///< of the snapshots on disk (the averages stay fp32)
};

struct CheckpointConfig {
  int64_t every = 1000;
  int64_t keep_last = 3;
  int64_t keep_every = 0;        ///< also keep every M-th step forever (0: none)
  bool stop_on_error = true;     ///< false: a failed save is reported and training continues
  /// fid or kid (lower is better; needs the eval: section): keep the checkpoint of the best
  /// evaluation so far beside keep_last/keep_every, with checkpoints/best pointing at it. An
  /// evaluation that beats the best is checkpointed at once, whatever checkpoint.every says.
  BestMetric keep_best = BestMetric::kNone;
};

struct LogConfig {
  int64_t every = 100;
  int64_t sample_every = 1000;   ///< 0 disables sample grids
  int64_t num_samples = 16;
  int64_t sample_steps = 50;     ///< DDIM steps for the grids
  int64_t sample_seed = 1234;
  bool tensorboard = true;       ///< rank 0 writes TensorBoard event files to RUN/tensorboard/
};

/// Sample quality during training (`diffuse eval --fid` every `every` steps, on all ranks).
struct EvalConfig {
  int64_t every = 0;             ///< 0: never (a config without the eval: section)
  int64_t n = 10000;             ///< samples per evaluation
  std::string features;          ///< TorchScript feature network (.pt with diffuse_features.json)
  std::string ref;               ///< reference statistics made by `diffuse stats` with the same features
  std::string sampler = "auto";  ///< auto (ddim, or heun for elucidated), ddim or ddpm; heun or dpmpp
  int64_t steps = 50;            ///< sampler steps (ddpm uses every timestep)
  double eta = 0.0;
  std::string ema = "ema";       ///< "ema" (the first of ema.decay), one of ema.decay's rates, or "online"
  int64_t seed = 0;              ///< of the samples' noise: the same noise at every evaluation
};

struct Config {
  std::string name = "run";      ///< from the file name; names the default run directory
  ModelConfig model;
  DiffusionConfig diffusion;
  DataConfig data;
  TrainConfig train;
  EmaConfig ema;
  CheckpointConfig checkpoint;
  LogConfig log;
  EvalConfig eval;

  /// Parses YAML text; throws naming unknown sections/keys, a section or key given twice (with
  /// both lines), unparsable values and non-finite numbers (.inf, .nan). Empty text gives the
  /// defaults.
  static Config from_yaml(const std::string& text, const std::string& name = "run");
  /// from_yaml of a file; also refuses a folder and a file without settings (empty or only
  /// comments), which would otherwise train the built-in defaults.
  static Config from_yaml_file(const std::filesystem::path& path);
  /// Writes every key (the resolved config); from_yaml(to_yaml()) == *this.
  std::string to_yaml() const;
  /// Applies one `section.key=value` override (value in YAML syntax, e.g. `model.dim_mults=[1,2]`).
  /// Overrides apply in order, so a key repeated with `--set` takes its last value (deliberate
  /// on a command line, unlike a key given twice in a file).
  void apply_override(const std::string& assignment);
  /// Checks ranges and choices (every float finite); throws std::invalid_argument naming the key,
  /// value and what is allowed.
  void validate() const;
  bool operator==(const Config& other) const { return to_yaml() == other.to_yaml(); }
  /// Every key with its value as the written config spells it ("train.lr" -> "0.0001"), in order.
  std::vector<std::pair<std::string, std::string>> values() const;

 private:
  void validate_eval() const;  ///< the eval: section and checkpoint.keep_best
  /// model.type and diffusion.type: their own keys' ranges, and the other type's keys left at their
  /// defaults (a key the chosen network or formulation does not read is refused, not ignored).
  void validate_formulation() const;
};

/// Every `section.key` the configuration accepts (for help texts and tests).
std::vector<std::string> config_keys();

}  // namespace diffuse::trainer
