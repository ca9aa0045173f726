// One table of fields drives parsing, overrides, serialisation and the list of keys, so the
// YAML reader, `--set` and the written config can never disagree about a key.
#include "trainer/config.h"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <algorithm>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <variant>

namespace diffuse::trainer {
namespace {

/// One of a fixed set of words, stored as an enum.
struct Choice {
  std::vector<std::string> names;
  std::function<std::string()> get;
  std::function<void(const std::string&)> set;  ///< only called with one of `names`
};

using FieldRef = std::variant<int64_t*, double*, bool*, std::string*, std::vector<int64_t>*,
                              std::vector<bool>*, std::vector<double>*, Choice>;

template <typename Enum>
const std::vector<std::pair<Enum, const char*>>& names_of();
template <>
const std::vector<std::pair<Precision, const char*>>& names_of() {
  static const std::vector<std::pair<Precision, const char*>> names{
      {Precision::kFp32, "fp32"}, {Precision::kBf16, "bf16"}, {Precision::kFp16, "fp16"}};
  return names;
}
template <>
const std::vector<std::pair<DeviceChoice, const char*>>& names_of() {
  static const std::vector<std::pair<DeviceChoice, const char*>> names{
      {DeviceChoice::kAuto, "auto"}, {DeviceChoice::kCpu, "cpu"}, {DeviceChoice::kCuda, "cuda"}};
  return names;
}
template <>
const std::vector<std::pair<GradCompression, const char*>>& names_of() {
  static const std::vector<std::pair<GradCompression, const char*>> names{
      {GradCompression::kNone, "none"}, {GradCompression::kBf16, "bf16"}, {GradCompression::kFp16, "fp16"}};
  return names;
}
template <>
const std::vector<std::pair<LrScheduleKind, const char*>>& names_of() {
  static const std::vector<std::pair<LrScheduleKind, const char*>> names{{LrScheduleKind::kConstant, "constant"},
                                                                         {LrScheduleKind::kCosine, "cosine"}};
  return names;
}
template <>
const std::vector<std::pair<Objective, const char*>>& names_of() {
  static const std::vector<std::pair<Objective, const char*>> names{
      {Objective::kPredNoise, "pred_noise"}, {Objective::kPredX0, "pred_x0"}, {Objective::kPredV, "pred_v"}};
  return names;
}
template <>
const std::vector<std::pair<BetaSchedule, const char*>>& names_of() {
  static const std::vector<std::pair<BetaSchedule, const char*>> names{
      {BetaSchedule::kLinear, "linear"}, {BetaSchedule::kCosine, "cosine"}, {BetaSchedule::kSigmoid, "sigmoid"}};
  return names;
}
template <>
const std::vector<std::pair<TimestepSamplerKind, const char*>>& names_of() {
  static const std::vector<std::pair<TimestepSamplerKind, const char*>> names{
      {TimestepSamplerKind::kUniform, "uniform"}, {TimestepSamplerKind::kLossAware, "loss-aware"}};
  return names;
}

template <>
const std::vector<std::pair<NonfinitePolicy, const char*>>& names_of() {
  static const std::vector<std::pair<NonfinitePolicy, const char*>> names{{NonfinitePolicy::kStop, "stop"},
                                                                          {NonfinitePolicy::kSkip, "skip"}};
  return names;
}

template <>
const std::vector<std::pair<LossType, const char*>>& names_of() {
  static const std::vector<std::pair<LossType, const char*>> names{{LossType::kL2, "l2"}, {LossType::kL1, "l1"}};
  return names;
}

template <>
const std::vector<std::pair<BestMetric, const char*>>& names_of() {
  static const std::vector<std::pair<BestMetric, const char*>> names{
      {BestMetric::kNone, "none"}, {BestMetric::kFid, "fid"}, {BestMetric::kKid, "kid"}};
  return names;
}

template <>
const std::vector<std::pair<ModelType, const char*>>& names_of() {
  static const std::vector<std::pair<ModelType, const char*>> names{{ModelType::kUnet, "unet"},
                                                                    {ModelType::kKarrasUnet, "karras_unet"}};
  return names;
}

template <>
const std::vector<std::pair<DiffusionType, const char*>>& names_of() {
  static const std::vector<std::pair<DiffusionType, const char*>> names{{DiffusionType::kGaussian, "gaussian"},
                                                                        {DiffusionType::kElucidated, "elucidated"}};
  return names;
}

template <>
const std::vector<std::pair<SnapshotDtype, const char*>>& names_of() {
  static const std::vector<std::pair<SnapshotDtype, const char*>> names{{SnapshotDtype::kBf16, "bf16"},
                                                                        {SnapshotDtype::kFp32, "fp32"}};
  return names;
}

template <typename Enum>
std::string name_of(Enum value) {
  for (const auto& [candidate, name] : names_of<Enum>()) {
    if (candidate == value) return name;
  }
  throw std::logic_error("config choice without a name");
}

template <typename Enum>
Choice choice(Enum* target) {
  Choice c;
  for (const auto& [value, name] : names_of<Enum>()) c.names.emplace_back(name);
  c.get = [target] { return name_of(*target); };
  c.set = [target](const std::string& text) {
    for (const auto& [value, name] : names_of<Enum>()) {
      if (text == name) *target = value;
    }
  };
  return c;
}

struct Field {
  std::string section;
  std::string key;
  FieldRef ref;
};

std::string join(const std::vector<std::string>& items, const std::string& separator) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : separator) + item;
  return out;
}

std::vector<Field> fields_of(Config& c) {
  return {
      {"model", "type", choice(&c.model.type)},
      {"model", "dim", &c.model.dim},
      {"model", "dim_mults", &c.model.dim_mults},
      {"model", "channels", &c.model.channels},
      {"model", "self_condition", &c.model.self_condition},
      {"model", "learned_variance", &c.model.learned_variance},
      {"model", "dropout", &c.model.dropout},
      {"model", "attn_heads", &c.model.attn_heads},
      {"model", "attn_dim_head", &c.model.attn_dim_head},
      {"model", "full_attn", &c.model.full_attn},
      {"model", "flash_attn", &c.model.flash_attn},
      {"model", "num_classes", &c.model.num_classes},
      {"model", "cond_drop_prob", &c.model.cond_drop_prob},
      {"model", "learned_sinusoidal_cond", &c.model.learned_sinusoidal_cond},
      {"model", "random_fourier_features", &c.model.random_fourier_features},
      {"model", "learned_sinusoidal_dim", &c.model.learned_sinusoidal_dim},
      {"model", "dim_max", &c.model.dim_max},
      {"model", "num_downsamples", &c.model.num_downsamples},
      {"model", "num_blocks_per_stage", &c.model.num_blocks_per_stage},
      {"model", "attn_res", &c.model.attn_res},
      {"model", "fourier_dim", &c.model.fourier_dim},
      {"model", "mp_cat_t", &c.model.mp_cat_t},
      {"model", "mp_add_emb_t", &c.model.mp_add_emb_t},
      {"model", "attn_res_mp_add_t", &c.model.attn_res_mp_add_t},
      {"diffusion", "type", choice(&c.diffusion.type)},
      {"diffusion", "timesteps", &c.diffusion.timesteps},
      {"diffusion", "objective", choice(&c.diffusion.objective)},
      {"diffusion", "beta_schedule", choice(&c.diffusion.beta_schedule)},
      {"diffusion", "min_snr_loss_weight", &c.diffusion.min_snr_loss_weight},
      {"diffusion", "min_snr_gamma", &c.diffusion.min_snr_gamma},
      {"diffusion", "offset_noise_strength", &c.diffusion.offset_noise_strength},
      {"diffusion", "vlb_weight", &c.diffusion.vlb_weight},
      {"diffusion", "timestep_sampler", choice(&c.diffusion.timestep_sampler)},
      {"diffusion", "loss_type", choice(&c.diffusion.loss_type)},
      {"diffusion", "immiscible", &c.diffusion.immiscible},
      {"diffusion", "sigma_min", &c.diffusion.sigma_min},
      {"diffusion", "sigma_max", &c.diffusion.sigma_max},
      {"diffusion", "sigma_data", &c.diffusion.sigma_data},
      {"diffusion", "rho", &c.diffusion.rho},
      {"diffusion", "P_mean", &c.diffusion.P_mean},
      {"diffusion", "P_std", &c.diffusion.P_std},
      {"diffusion", "S_churn", &c.diffusion.S_churn},
      {"diffusion", "S_tmin", &c.diffusion.S_tmin},
      {"diffusion", "S_tmax", &c.diffusion.S_tmax},
      {"diffusion", "S_noise", &c.diffusion.S_noise},
      {"data", "path", &c.data.path},
      {"data", "image_size", &c.data.image_size},
      {"data", "random_flip", &c.data.random_flip},
      {"data", "workers", &c.data.workers},
      {"data", "prefetch", &c.data.prefetch},
      {"train", "steps", &c.train.steps},
      {"train", "batch_size", &c.train.batch_size},
      {"train", "accumulate", &c.train.accumulate},
      {"train", "lr", &c.train.lr},
      {"train", "lr_schedule", choice(&c.train.lr_schedule)},
      {"train", "warmup_steps", &c.train.warmup_steps},
      {"train", "min_lr_ratio", &c.train.min_lr_ratio},
      {"train", "weight_decay", &c.train.weight_decay},
      {"train", "adam_beta1", &c.train.adam_beta1},
      {"train", "adam_beta2", &c.train.adam_beta2},
      {"train", "adam_eps", &c.train.adam_eps},
      {"train", "max_grad_norm", &c.train.max_grad_norm},
      {"train", "precision", choice(&c.train.precision)},
      {"train", "seed", &c.train.seed},
      {"train", "device", choice(&c.train.device)},
      {"train", "bucket_cap_mb", &c.train.bucket_cap_mb},
      {"train", "grad_compression", choice(&c.train.grad_compression)},
      {"train", "collective_timeout_s", &c.train.collective_timeout_s},
      {"train", "loss_scale_init", &c.train.loss_scale_init},
      {"train", "loss_scale_growth_interval", &c.train.loss_scale_growth_interval},
      {"train", "max_consecutive_skipped", &c.train.max_consecutive_skipped},
      {"train", "min_loss_scale", &c.train.min_loss_scale},
      {"train", "channels_last", &c.train.channels_last},
      {"train", "on_nonfinite", choice(&c.train.on_nonfinite)},
      {"train", "max_nonfinite_skips", &c.train.max_nonfinite_skips},
      {"ema", "decay", &c.ema.decay},
      {"ema", "update_every", &c.ema.update_every},
      {"ema", "update_after_step", &c.ema.update_after_step},
      {"ema", "inv_gamma", &c.ema.inv_gamma},
      {"ema", "power", &c.ema.power},
      {"ema", "min_value", &c.ema.min_value},
      {"ema", "posthoc.sigma_rels", &c.ema.posthoc_sigma_rels},
      {"ema", "posthoc.snapshot_every", &c.ema.posthoc_snapshot_every},
      {"ema", "posthoc.dtype", choice(&c.ema.posthoc_dtype)},
      {"checkpoint", "every", &c.checkpoint.every},
      {"checkpoint", "keep_last", &c.checkpoint.keep_last},
      {"checkpoint", "keep_every", &c.checkpoint.keep_every},
      {"checkpoint", "stop_on_error", &c.checkpoint.stop_on_error},
      {"checkpoint", "keep_best", choice(&c.checkpoint.keep_best)},
      {"log", "every", &c.log.every},
      {"log", "sample_every", &c.log.sample_every},
      {"log", "num_samples", &c.log.num_samples},
      {"log", "sample_steps", &c.log.sample_steps},
      {"log", "sample_seed", &c.log.sample_seed},
      {"log", "tensorboard", &c.log.tensorboard},
      {"eval", "every", &c.eval.every},
      {"eval", "n", &c.eval.n},
      {"eval", "features", &c.eval.features},
      {"eval", "ref", &c.eval.ref},
      {"eval", "sampler", &c.eval.sampler},
      {"eval", "steps", &c.eval.steps},
      {"eval", "eta", &c.eval.eta},
      {"eval", "ema", &c.eval.ema},
      {"eval", "seed", &c.eval.seed},
  };
}

std::string type_name(const FieldRef& ref) {
  return std::visit(
      [](const auto& p) -> std::string {
        using T = std::remove_pointer_t<std::decay_t<decltype(p)>>;
        if constexpr (std::is_same_v<T, Choice>) return "one of: " + join(p.names, ", ");
        if constexpr (std::is_same_v<T, int64_t>) return "an integer";
        if constexpr (std::is_same_v<T, double>) return "a finite number";
        if constexpr (std::is_same_v<T, bool>) return "true or false";
        if constexpr (std::is_same_v<T, std::string>) return "a string";
        if constexpr (std::is_same_v<T, std::vector<int64_t>>) return "a list of integers, e.g. [1, 2, 4]";
        if constexpr (std::is_same_v<T, std::vector<bool>>) return "a list of true/false";
        if constexpr (std::is_same_v<T, std::vector<double>>) return "a finite number or a list of them";
      },
      ref);
}

std::string describe(const YAML::Node& node) {
  YAML::Emitter out;
  out << YAML::Flow << node;
  return out.c_str();
}

template <typename T>
T scalar_as(const YAML::Node& node) {
  if (!node.IsScalar()) throw YAML::BadConversion(node.Mark());
  T value = node.as<T>();
  // YAML spells infinity and NaN .inf and .nan; no key means either (train.lr=.inf trains NaN).
  if constexpr (std::is_floating_point_v<T>) {
    if (!std::isfinite(value)) throw YAML::BadConversion(node.Mark());
  }
  return value;
}

void assign(const Field& field, const YAML::Node& node) {
  try {
    std::visit(
        [&](const auto& p) {
          using T = std::remove_pointer_t<std::decay_t<decltype(p)>>;
          if constexpr (std::is_same_v<T, Choice>) {
            if (!node.IsScalar()) throw YAML::BadConversion(node.Mark());
            const auto text = node.as<std::string>();
            if (std::find(p.names.begin(), p.names.end(), text) == p.names.end()) {
              throw YAML::BadConversion(node.Mark());
            }
            p.set(text);
          } else if constexpr (std::is_same_v<T, std::vector<double>>) {
            if (node.IsScalar()) {
              *p = {scalar_as<double>(node)};
            } else if (node.IsSequence()) {
              T values;
              for (const auto& item : node) values.push_back(scalar_as<double>(item));
              *p = values;
            } else {
              throw YAML::BadConversion(node.Mark());
            }
          } else if constexpr (std::is_same_v<T, std::vector<int64_t>> || std::is_same_v<T, std::vector<bool>>) {
            if (!node.IsSequence()) throw YAML::BadConversion(node.Mark());
            T values;
            for (const auto& item : node) values.push_back(scalar_as<typename T::value_type>(item));
            *p = values;
          } else if constexpr (std::is_same_v<T, std::string>) {
            if (!node.IsScalar() && !node.IsNull()) throw YAML::BadConversion(node.Mark());
            *p = node.IsNull() ? std::string() : node.as<std::string>();
          } else {
            *p = scalar_as<T>(node);
          }
        },
        field.ref);
  } catch (const YAML::Exception&) {
    throw std::invalid_argument("config key " + field.section + "." + field.key + ": got '" + describe(node) +
                                "', expected " + type_name(field.ref));
  }
}

/// Shortest text that reads back to the same double (so to_yaml round-trips exactly), kept a
/// float in YAML's eyes (1 -> 1.0).
std::string shortest_text(double value) {
  std::string text;
  for (int digits = 1; digits <= 17; ++digits) {
    std::ostringstream candidate;
    candidate.precision(digits);
    candidate << value;
    text = candidate.str();
    if (std::stod(text) == value) break;
  }
  if (text.find_first_of(".eEn") == std::string::npos) text += ".0";
  return text;
}

void emit(YAML::Emitter& out, const FieldRef& ref) {
  std::visit(
      [&](const auto& p) {
        using T = std::remove_pointer_t<std::decay_t<decltype(p)>>;
        if constexpr (std::is_same_v<T, Choice>) {
          out << p.get();
        } else if constexpr (std::is_same_v<T, std::vector<int64_t>> || std::is_same_v<T, std::vector<bool>>) {
          out << YAML::Flow << YAML::BeginSeq;
          for (auto v : *p) out << static_cast<typename T::value_type>(v);
          out << YAML::EndSeq;
        } else if constexpr (std::is_same_v<T, std::vector<double>>) {
          out << YAML::Flow << YAML::BeginSeq;
          for (double v : *p) out << shortest_text(v);
          out << YAML::EndSeq;
        } else if constexpr (std::is_same_v<T, double>) {
          out << shortest_text(*p);
        } else {
          out << *p;
        }
      },
      ref);
}

const Field* find(const std::vector<Field>& fields, const std::string& section, const std::string& key) {
  for (const auto& field : fields) {
    if (field.section == section && field.key == key) return &field;
  }
  return nullptr;
}

/// Whether `section.group.` prefixes some key (a nested group such as ema.posthoc).
bool is_group(const std::vector<Field>& fields, const std::string& section, const std::string& group) {
  for (const auto& field : fields) {
    if (field.section == section && field.key.rfind(group + ".", 0) == 0) return true;
  }
  return false;
}

std::vector<std::string> keys_of_section(const std::vector<Field>& fields, const std::string& section) {
  std::vector<std::string> keys;
  for (const auto& field : fields) {
    if (field.section == section) keys.push_back(field.key);
  }
  return keys;
}

const std::vector<std::string>& sections() {
  static const std::vector<std::string> names{"model", "diffusion", "data", "train", "ema", "checkpoint", "log",
                                              "eval"};
  return names;
}

// Bounds of keys whose later conversion could overflow: bucket bytes as int64, the collective
// deadline as int64 milliseconds and as a steady_clock time point (nanoseconds).
constexpr double kMaxBucketCapMb = 1024.0 * 1024.0;
constexpr double kMaxCollectiveTimeoutS = 7.0 * 24 * 3600;
// The largest relative width of a power-function EMA profile (trainer/posthoc_ema.h max_sigma_rel(),
// rounded down so that every accepted value has a gamma).
constexpr double kMaxSigmaRel = 0.30028;

void require(bool ok, const std::string& key, const std::string& value, const std::string& allowed) {
  if (!ok) throw std::invalid_argument("config key " + key + ": got " + value + ", expected " + allowed);
}

void non_negative_key(const std::string& key, int64_t v) { require(v >= 0, key, std::to_string(v), "an integer >= 0"); }

}  // namespace

Config Config::from_yaml(const std::string& text, const std::string& name) {
  Config config;
  config.name = name;
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& error) {
    throw std::invalid_argument(std::string("config is not valid YAML: ") + error.what());
  }
  if (root.IsNull()) return config;
  if (!root.IsMap()) throw std::invalid_argument("config must be a mapping of sections (model, data, train, ...)");
  auto fields = fields_of(config);
  // yaml-cpp keeps every entry of a mapping, so a key given twice would silently take its last
  // value: refuse it, naming both lines. (`--set` may repeat a key: there the last one wins.)
  std::map<std::string, int> section_lines;
  for (const auto& section : root) {
    auto section_name = section.first.as<std::string>();
    if (auto [at, inserted] = section_lines.emplace(section_name, section.first.Mark().line + 1); !inserted) {
      throw std::invalid_argument("config section '" + section_name + "' is given twice (lines " +
                                  std::to_string(at->second) + " and " +
                                  std::to_string(section.first.Mark().line + 1) + "); merge them into one");
    }
    if (std::find(sections().begin(), sections().end(), section_name) == sections().end()) {
      throw std::invalid_argument("unknown config section '" + section_name + "'; expected one of: " +
                                  join(sections(), ", "));
    }
    if (section.second.IsNull()) continue;
    if (!section.second.IsMap()) {
      throw std::invalid_argument("config section '" + section_name + "' must be a mapping of keys");
    }
    std::map<std::string, int> key_lines;
    // A group of keys (ema.posthoc.sigma_rels) may be written as a nested mapping (posthoc: {sigma_rels:
    // ...}) or with the dotted key itself, which is how to_yaml() writes it.
    std::function<void(const YAML::Node&, const std::string&)> read_keys = [&](const YAML::Node& map,
                                                                               const std::string& prefix) {
      for (const auto& entry : map) {
        auto key = prefix + entry.first.as<std::string>();
        if (auto [at, inserted] = key_lines.emplace(key, entry.first.Mark().line + 1); !inserted) {
          throw std::invalid_argument("config key " + section_name + "." + key + " is given twice (lines " +
                                      std::to_string(at->second) + " and " +
                                      std::to_string(entry.first.Mark().line + 1) + "); keep one");
        }
        const Field* field = find(fields, section_name, key);
        if (field == nullptr && entry.second.IsMap() && is_group(fields, section_name, key)) {
          read_keys(entry.second, key + ".");
          continue;
        }
        if (field == nullptr) {
          throw std::invalid_argument("unknown config key '" + section_name + "." + key + "'; " + section_name +
                                      " accepts: " + join(keys_of_section(fields, section_name), ", "));
        }
        assign(*field, entry.second);
      }
    };
    read_keys(section.second, "");
  }
  return config;
}

Config Config::from_yaml_file(const std::filesystem::path& path) {
  // A folder opens and reads as empty, and an empty file parses as "no settings": either would
  // train the built-in defaults (a 35.7 M-parameter model) instead of what the user meant.
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) {
    throw std::invalid_argument("config " + path.string() + " is a folder; give a YAML file (e.g. configs/tiny.yaml)");
  }
  std::ifstream in(path);
  if (!in) throw std::invalid_argument("cannot read config file " + path.string());
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) throw std::invalid_argument("cannot read config file " + path.string());
  bool empty = false;
  try {
    empty = YAML::Load(text.str()).IsNull();
  } catch (const YAML::Exception&) {
    // from_yaml reports the syntax error below.
  }
  if (empty) {
    throw std::invalid_argument("config file " + path.string() +
                                " holds no settings (empty, or only comments); give a config with at least "
                                "data.path, e.g. configs/tiny.yaml");
  }
  try {
    return from_yaml(text.str(), path.stem().string());
  } catch (const std::invalid_argument& error) {
    throw std::invalid_argument(path.string() + ": " + error.what());
  }
}

std::string Config::to_yaml() const {
  auto fields = fields_of(const_cast<Config&>(*this));
  YAML::Emitter out;
  out << YAML::BeginMap;
  for (const auto& section : sections()) {
    out << YAML::Key << section << YAML::Value << YAML::BeginMap;
    for (const auto& field : fields) {
      if (field.section != section) continue;
      out << YAML::Key << field.key << YAML::Value;
      emit(out, field.ref);
    }
    out << YAML::EndMap;
  }
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

void Config::apply_override(const std::string& assignment) {
  auto equals = assignment.find('=');
  auto dot = assignment.find('.');
  if (equals == std::string::npos || dot == std::string::npos || dot > equals) {
    throw std::invalid_argument("--set expects section.key=value, got '" + assignment + "'");
  }
  std::string section = assignment.substr(0, dot);
  std::string key = assignment.substr(dot + 1, equals - dot - 1);
  std::string value = assignment.substr(equals + 1);
  auto fields = fields_of(*this);
  const Field* field = find(fields, section, key);
  if (field == nullptr) {
    if (std::find(sections().begin(), sections().end(), section) == sections().end()) {
      throw std::invalid_argument("--set " + assignment + ": unknown section '" + section + "'; expected one of: " +
                                  join(sections(), ", "));
    }
    throw std::invalid_argument("--set " + assignment + ": unknown key '" + section + "." + key + "'; " + section +
                                " accepts: " + join(keys_of_section(fields, section), ", "));
  }
  YAML::Node node;
  try {
    node = YAML::Load(value);
  } catch (const YAML::Exception&) {
    node = YAML::Node(value);
  }
  try {
    assign(*field, node);
  } catch (const std::invalid_argument& error) {
    throw std::invalid_argument("--set " + assignment + ": " + error.what());
  }
}

void Config::validate() const {
  // Every float key, also those set in code rather than parsed: infinity and NaN pass most range
  // checks below (NaN compares false, .inf > 0), so refuse them by name first.
  for (const auto& field : fields_of(const_cast<Config&>(*this))) {
    const std::string key = field.section + "." + field.key;
    if (auto* value = std::get_if<double*>(&field.ref)) {
      require(std::isfinite(**value), key, std::to_string(**value), "a finite number");
    } else if (auto* values = std::get_if<std::vector<double>*>(&field.ref)) {
      for (double v : **values) require(std::isfinite(v), key, std::to_string(v), "finite numbers");
    }
  }
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

std::string to_string(Precision value) { return name_of(value); }
std::string to_string(DeviceChoice value) { return name_of(value); }
std::string to_string(GradCompression value) { return name_of(value); }
std::string to_string(LrScheduleKind value) { return name_of(value); }
std::string to_string(Objective value) { return name_of(value); }
std::string to_string(BetaSchedule value) { return name_of(value); }
std::string to_string(TimestepSamplerKind value) { return name_of(value); }
std::string to_string(NonfinitePolicy value) { return name_of(value); }
std::string to_string(LossType value) { return name_of(value); }
std::string to_string(BestMetric value) { return name_of(value); }
std::string to_string(ModelType value) { return name_of(value); }
std::string to_string(DiffusionType value) { return name_of(value); }
std::string to_string(SnapshotDtype value) { return name_of(value); }

std::vector<std::pair<std::string, std::string>> Config::values() const {
  auto fields = fields_of(const_cast<Config&>(*this));
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& field : fields) {
    YAML::Emitter text;
    emit(text, field.ref);
    out.emplace_back(field.section + "." + field.key, text.c_str());
  }
  return out;
}

std::vector<std::string> config_keys() {
  Config config;
  std::vector<std::string> keys;
  for (const auto& field : fields_of(config)) keys.push_back(field.section + "." + field.key);
  return keys;
}

}  // namespace diffuse::trainer
