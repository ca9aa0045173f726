// trainer/training_quality.h: the eval: section of a training run. Every eval.every steps (and at
// the last step) all ranks draw eval.n samples and measure FID, KID and precision/recall against
// eval.ref through evaluate_sample_quality, the code of `diffuse eval --fid`; and the best
// evaluation so far, which checkpoint.keep_best keeps (its value travels in every checkpoint's
// metadata, so a resumed run knows it).
//
//   TrainingQuality quality(config, device);        // loads and checks eval.features and eval.ref
//   if (quality.due(step, last)) {
//     auto result = quality.evaluate(*model, comm);  // collective; model holds the weights eval.ema names
//   }
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "dist/communicator.h"
#include "model/diffusion.h"
#include "trainer/config.h"
#include "trainer/sample_quality.h"

namespace diffuse::trainer {

/// The best evaluation so far under checkpoint.keep_best (lower is better).
struct BestEvaluation {
  BestMetric metric = BestMetric::kFid;
  double value = 0;
  int64_t step = 0;
};

/// The value keep_best compares: the FID, or KID's mean; nullopt when the result has no KID.
std::optional<double> best_metric_value(BestMetric metric, const QualityResult& result);

/// Stores `best` in checkpoint metadata (best_metric, best_value exactly, best_step).
void write_best_evaluation(std::map<std::string, std::string>& metadata, const BestEvaluation& best);

/// The best evaluation a checkpoint's metadata records for `metric`; nullopt when it records none
/// or one of another metric. Throws naming the key when the entries are malformed.
std::optional<BestEvaluation> read_best_evaluation(const std::map<std::string, std::string>& metadata,
                                                   BestMetric metric);

class TrainingQuality {
 public:
  /// Loads eval.features onto `device` and reads eval.ref; throws std::invalid_argument naming the
  /// key and the file when one is missing or unreadable, or when the statistics were made with
  /// another feature network. Every rank builds one (each computes features of its share).
  TrainingQuality(const Config& config, torch::Device device);
  ~TrainingQuality();

  /// Whether step `step` evaluates: every eval.every steps, and the last step of the run.
  bool due(int64_t step, bool last) const;
  /// The EMA rate (an index of ema.decay) whose weights eval.ema names; nullopt: the raw weights.
  std::optional<size_t> ema_index() const { return ema_index_; }
  /// "ema.<rate>" or "online", as `diffuse eval` labels weights.
  const std::string& weights_label() const { return weights_label_; }
  /// Samples and measures `diffusion` (collective; every rank returns the same result). A
  /// class-conditional model's sample i gets class i mod model.num_classes (cycled_classes).
  QualityResult evaluate(DiffusionModel& diffusion, dist::Communicator& comm);
  const QualityRequest& request() const { return request_; }
  const FeatureNetworkInfo& network() const;

 private:
  std::unique_ptr<FeatureNetwork> network_;
  ReferenceStatistics reference_;
  QualityRequest request_;
  int64_t every_ = 0;
  std::optional<size_t> ema_index_;
  std::string weights_label_;
};

}  // namespace diffuse::trainer
