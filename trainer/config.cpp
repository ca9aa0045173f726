// One table of fields drives parsing, overrides, serialisation and the list of keys, so the
// YAML reader, `--set` and the written config can never disagree about a key.
#include "trainer/config.h"
#include "trainer/config_internal.h"

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
using config_internal::require;
using config_internal::shortest_text;

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


}  // namespace

namespace config_internal {

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

void require(bool ok, const std::string& key, const std::string& value, const std::string& allowed) {
  if (!ok) throw std::invalid_argument("config key " + key + ": got " + value + ", expected " + allowed);
}

void require_finite_floats(const Config& config) {
  // Infinity and NaN pass most range checks (NaN compares false, .inf > 0), so every float key,
  // also one set in code rather than parsed, is refused by name first.
  for (const auto& field : fields_of(const_cast<Config&>(config))) {
    const std::string key = field.section + "." + field.key;
    if (auto* value = std::get_if<double*>(&field.ref)) {
      require(std::isfinite(**value), key, std::to_string(**value), "a finite number");
    } else if (auto* values = std::get_if<std::vector<double>*>(&field.ref)) {
      for (double v : **values) require(std::isfinite(v), key, std::to_string(v), "finite numbers");
    }
  }
}

}  // namespace config_internal

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
