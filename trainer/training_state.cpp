// trainer/training_state.cpp: see training_state.h. Every checkpoint key is spelled here.
#include "trainer/training_state.h"

#include <cmath>
#include <cstdlib>
#include <map>

namespace diffuse::trainer {
namespace {

constexpr const char* kModel = "model.";
constexpr const char* kOptimizer = "optim.";
constexpr const char* kEmaWeights = "ema.";
constexpr const char* kEmaProgress = "ema_state.";
constexpr const char* kScaler = "scaler.";
constexpr const char* kTimestepSampler = "timestep_sampler.";
constexpr const char* kRng = "rng";
constexpr const char* kLoader = "loader.";
constexpr const char* kLoaderV1 = "loader";  ///< positional [epoch, position, seed, samples_seen]

std::string ema_prefix(double rate) { return kEmaWeights + Ema::rate_text(rate) + "."; }

void append_with_prefix(NamedTensors& out, const std::string& prefix, const NamedTensors& tensors) {
  for (const auto& [name, tensor] : tensors) out.emplace_back(prefix + name, tensor);
}

/// The tensors under `prefix`, with the prefix removed.
NamedTensors under_prefix(const NamedTensors& tensors, const std::string& prefix) {
  NamedTensors out;
  for (const auto& [name, tensor] : tensors) {
    if (name.compare(0, prefix.size(), prefix) == 0) out.emplace_back(name.substr(prefix.size()), tensor);
  }
  return out;
}

const torch::Tensor& require(const std::map<std::string, torch::Tensor>& by_name, const std::string& key,
                             const LoadedCheckpoint& checkpoint) {
  auto it = by_name.find(key);
  if (it == by_name.end()) throw std::runtime_error(checkpoint.directory.string() + " has no tensor '" + key + "'");
  return it->second;
}

data::LoaderState loader_state_of(const LoadedCheckpoint& checkpoint) {
  std::map<std::string, torch::Tensor> mine(checkpoint.per_rank.begin(), checkpoint.per_rank.end());
  if (auto v1 = mine.find(kLoaderV1); v1 != mine.end()) {
    const auto& t = v1->second;
    if (t.numel() != 4) {
      throw std::runtime_error(checkpoint.directory.string() + ": the loader state has " + std::to_string(t.numel()) +
                               " entries, expected 4 (epoch, position, seed, samples_seen)");
    }
    return {.epoch = t[0].item<int64_t>(), .position = t[1].item<int64_t>(),
            .seed = static_cast<uint64_t>(t[2].item<int64_t>()), .samples_seen = t[3].item<int64_t>()};
  }
  auto field = [&](const char* name) { return require(mine, std::string(kLoader) + name, checkpoint).item<int64_t>(); };
  return {.epoch = field("epoch"), .position = field("position"), .seed = static_cast<uint64_t>(field("seed")),
          .samples_seen = field("samples_seen")};
}

}  // namespace

CheckpointContents capture_training_state(const TrainingParts& parts, int64_t step) {
  CheckpointContents contents;
  contents.step = step;
  auto& replicated = contents.replicated;
  for (size_t i = 0; i < parts.names.size(); ++i) replicated.emplace_back(kModel + parts.names[i], parts.params[i]);
  append_with_prefix(replicated, kOptimizer, parts.optimizer.state());
  append_with_prefix(replicated, kEmaProgress, parts.ema.progress_state());
  for (size_t r = 0; r < parts.ema.rates(); ++r) {
    append_with_prefix(replicated, ema_prefix(parts.ema.rate(r)), parts.ema.average_state(r, parts.names));
  }
  append_with_prefix(replicated, kScaler, parts.scaler.state());
  append_with_prefix(replicated, kTimestepSampler, parts.sampler.state());

  contents.per_rank.emplace_back(kRng, parts.generator.get_state());
  const auto loader = parts.loader.state();
  auto scalar = [](int64_t v) { return torch::tensor(v, torch::kInt64); };
  contents.per_rank.emplace_back(std::string(kLoader) + "epoch", scalar(loader.epoch));
  contents.per_rank.emplace_back(std::string(kLoader) + "position", scalar(loader.position));
  contents.per_rank.emplace_back(std::string(kLoader) + "seed", scalar(static_cast<int64_t>(loader.seed)));
  contents.per_rank.emplace_back(std::string(kLoader) + "samples_seen", scalar(loader.samples_seen));
  return contents;
}

RestoredProgress restore_training_state(const LoadedCheckpoint& checkpoint, TrainingParts& parts) {
  std::map<std::string, torch::Tensor> by_name(checkpoint.replicated.begin(), checkpoint.replicated.end());
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < parts.names.size(); ++i) {
      const std::string key = kModel + parts.names[i];
      const auto& saved = require(by_name, key, checkpoint);
      if (saved.sizes() != parts.params[i].sizes()) {
        throw std::runtime_error(checkpoint.directory.string() + ": tensor '" + key + "' has shape " +
                                 c10::str(saved.sizes()) + ", expected " + c10::str(parts.params[i].sizes()));
      }
      parts.params[i].copy_(saved);
    }
  }
  parts.optimizer.load_state(under_prefix(checkpoint.replicated, kOptimizer));
  std::vector<NamedTensors> averages;
  for (size_t r = 0; r < parts.ema.rates(); ++r) {
    averages.push_back(under_prefix(checkpoint.replicated, ema_prefix(parts.ema.rate(r))));
  }
  parts.ema.load_state(under_prefix(checkpoint.replicated, kEmaProgress), averages, parts.names);
  parts.scaler.load_state(under_prefix(checkpoint.replicated, kScaler));
  parts.sampler.load_state(under_prefix(checkpoint.replicated, kTimestepSampler));

  parts.loader.restore(loader_state_of(checkpoint));
  RestoredProgress progress{.step = checkpoint.step, .per_rank_inherited = checkpoint.per_rank_inherited};
  if (!checkpoint.per_rank_inherited) {
    std::map<std::string, torch::Tensor> mine(checkpoint.per_rank.begin(), checkpoint.per_rank.end());
    parts.generator.set_state(require(mine, kRng, checkpoint));
  }
  return progress;
}

ModelWeights model_weights(const LoadedCheckpoint& checkpoint, const Config& saved_config, const std::string& which,
                           const std::vector<std::string>& names) {
  std::string prefix;
  ModelWeights weights;
  if (which == "online") {
    prefix = kModel;
    weights.label = "online";
  } else {
    const auto& rates = saved_config.ema.decay;
    for (double rate : rates) {
      bool named = which == "ema" || which == Ema::rate_text(rate) ||
                   (!which.empty() && std::abs(std::atof(which.c_str()) - rate) < 1e-12);
      if (named) {
        prefix = ema_prefix(rate);
        weights.label = "ema." + Ema::rate_text(rate);
        break;
      }
    }
    if (prefix.empty()) {
      std::string available;
      for (double rate : rates) available += (available.empty() ? "" : ", ") + Ema::rate_text(rate);
      throw std::invalid_argument("--weights " + which + ": the checkpoint keeps EMA rates " + available +
                                  " (or use 'ema' for the first, or 'online')");
    }
  }
  std::map<std::string, torch::Tensor> by_name(checkpoint.replicated.begin(), checkpoint.replicated.end());
  for (const auto& name : names) weights.tensors.emplace_back(name, require(by_name, prefix + name, checkpoint));
  return weights;
}

}  // namespace diffuse::trainer
