// trainer/training_quality.cpp: see training_quality.h.
#include "trainer/training_quality.h"

#include <fmt/format.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <numeric>
#include <stdexcept>

#include "trainer/ema.h"

namespace diffuse::trainer {
namespace {

/// Runs `body`, prefixing what it throws with the config key the file came from.
template <typename Body>
auto for_key(const std::string& key, const std::string& file, Body&& body) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(file, ec)) {
    throw std::invalid_argument("config key " + key + ": " + file + " does not exist or is not a file");
  }
  try {
    return body();
  } catch (const std::exception& error) {
    throw std::invalid_argument("config key " + key + " (" + file + "): " + error.what());
  }
}

/// The EMA rate eval.ema names (Config::validate() has checked it is "ema", "online" or a rate).
std::optional<size_t> resolve_ema_index(const Config& config) {
  const std::string& which = config.eval.ema;
  if (which == "online") return std::nullopt;
  if (which == "ema") return 0;
  for (size_t i = 0; i < config.ema.decay.size(); ++i) {
    if (std::abs(std::atof(which.c_str()) - config.ema.decay[i]) < 1e-12) return i;
  }
  throw std::invalid_argument("config key eval.ema: '" + which + "' is none of ema.decay's rates");
}

}  // namespace

std::optional<double> best_metric_value(BestMetric metric, const QualityResult& result) {
  switch (metric) {
    case BestMetric::kFid: return result.fid;
    case BestMetric::kKid: return result.kid ? std::optional<double>(result.kid->mean) : std::nullopt;
    case BestMetric::kNone: return std::nullopt;
  }
  return std::nullopt;
}

void write_best_evaluation(std::map<std::string, std::string>& metadata, const BestEvaluation& best) {
  metadata["best_metric"] = to_string(best.metric);
  metadata["best_value"] = fmt::format("{:.17g}", best.value);  // reads back to the same double
  metadata["best_step"] = std::to_string(best.step);
}

std::optional<BestEvaluation> read_best_evaluation(const std::map<std::string, std::string>& metadata,
                                                   BestMetric metric) {
  auto name = metadata.find("best_metric");
  if (name == metadata.end() || name->second != to_string(metric)) return std::nullopt;
  auto entry = [&](const std::string& key) {
    auto it = metadata.find(key);
    if (it == metadata.end()) throw std::runtime_error("checkpoint metadata has best_metric but no " + key);
    return it->second;
  };
  BestEvaluation best{.metric = metric};
  try {
    best.value = std::stod(entry("best_value"));
    best.step = std::stoll(entry("best_step"));
  } catch (const std::logic_error&) {
    throw std::runtime_error("checkpoint metadata best_value/best_step are not numbers: '" + entry("best_value") +
                             "', '" + entry("best_step") + "'");
  }
  return best;
}

TrainingQuality::TrainingQuality(const Config& config, torch::Device device)
    : every_(config.eval.every), ema_index_(resolve_ema_index(config)) {
  const auto& e = config.eval;
  network_ = for_key("eval.features", e.features,
                     [&] { return std::make_unique<FeatureNetwork>(e.features, device); });
  reference_ = for_key("eval.ref", e.ref, [&] {
    auto reference = read_reference_statistics(e.ref);
    check_reference_statistics(reference, e.ref, network_->info());
    return reference;
  });
  weights_label_ = ema_index_ ? "ema." + Ema::rate_text(config.ema.decay[*ema_index_]) : "online";
  request_.sampling = {.n = e.n, .seed = static_cast<uint64_t>(e.seed), .batch = config.train.batch_size,
                       .options = {.sampler = resolve_sampler(config.diffusion.type, e.sampler), .steps = e.steps,
                                   .eta = e.eta}};
  if (const int64_t k = config.model.num_classes; k > 0) {
    std::vector<int64_t> all(static_cast<size_t>(k));
    std::iota(all.begin(), all.end(), 0);
    request_.sampling.classes = cycled_classes(e.n, all);
  }
}

TrainingQuality::~TrainingQuality() = default;

bool TrainingQuality::due(int64_t step, bool last) const { return step % every_ == 0 || last; }

QualityResult TrainingQuality::evaluate(DiffusionModel& diffusion, dist::Communicator& comm) {
  torch::NoGradGuard no_grad;
  return evaluate_sample_quality(diffusion, comm, *network_, reference_, request_);
}

const FeatureNetworkInfo& TrainingQuality::network() const { return network_->info(); }

}  // namespace diffuse::trainer
