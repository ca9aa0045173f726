// trainer/sample_quality.cpp: sampling, features and the metrics for `diffuse eval --fid` and the
// evaluations of a training run.
#include "trainer/sample_quality.h"

#include <fmt/format.h>

#include "util/json.h"

namespace diffuse::trainer {

torch::Tensor cycled_classes(int64_t n, const std::vector<int64_t>& classes) {
  if (classes.empty()) throw std::invalid_argument("cycled_classes: no classes to cycle through");
  auto pool = torch::tensor(classes, torch::kInt64);
  return pool.index({torch::arange(n, torch::kInt64) % static_cast<int64_t>(classes.size())});
}

QualityResult compare_with_reference(const FeatureSummary& features, int64_t n, const ReferenceStatistics& reference,
                                     const MetricOptions& options, const std::string& items) {
  const int64_t d = features.statistics.mean.numel();
  if (reference.statistics.mean.numel() != d) {
    throw std::invalid_argument(fmt::format("reference statistics have {} features, the {} have {}",
                                            reference.statistics.mean.numel(), items, d));
  }
  QualityResult result{.n = n, .feature_dimension = d};
  result.fid = frechet_distance(features.statistics, reference.statistics);
  if (n < d || reference.n < d) {
    result.warnings.push_back(fmt::format(
        "N = {} {} and {} reference images for {} features: the covariance is singular and FID is biased "
        "upwards; use N >= {} (10000 or more is usual) before comparing numbers",
        n, items, reference.n, d, d));
  }
  const auto& real = reference.features;
  if (real.defined() && real.size(0) > options.pr_k && features.kept.size(0) > options.pr_k) {
    result.kid = kernel_inception_distance(real, features.kept, options.kid);
    result.precision_recall = precision_recall(real, features.kept, options.pr_k);
  } else {
    result.warnings.push_back(fmt::format("KID and precision/recall need more than {} features on each side", options.pr_k));
  }
  return result;
}

QualityResult evaluate_sample_quality(DiffusionModel& diffusion, dist::Communicator& comm,
                                      FeatureNetwork& network, const ReferenceStatistics& reference,
                                      const QualityRequest& request) {
  int64_t d = network.info().dimension;
  // Checked before sampling too: the samples may take hours.
  if (reference.statistics.mean.numel() != d) {
    throw std::invalid_argument(fmt::format("reference statistics have {} features, the feature network {} gives {}",
                                            reference.statistics.mean.numel(), network.info().path.string(), d));
  }
  const int64_t n = request.sampling.n;
  if (n < 2) throw std::invalid_argument("eval --fid: --n must be at least 2");
  auto images = sample_images(diffusion, comm, request.sampling);  // [n, C, H, W] in [0, 1], every rank
  // Quantised to 8 bits as `diffuse sample` saves them and as the reference images are: the
  // metrics are those of the saved samples, and the float rounding of how the ranks batched the
  // sampler (1e-7) does not reach the features.
  images = (images * 255).round().clamp(0, 255) / 255;
  auto slice = [&images](int64_t begin, int64_t end) { return images.slice(0, begin, end); };
  auto summary = summarize_features(network, comm, n, kKeptFeatures, request.feature_batch, slice);
  return compare_with_reference(summary, n, reference, request.metrics);
}

QualityResult evaluate_image_quality(FeatureNetwork& network, dist::Communicator& comm,
                                     const ReferenceStatistics& reference, const StatsRequest& images,
                                     const MetricOptions& options) {
  // The reference statistics' own path: the same reading, batching and reduction.
  auto measured = compute_reference_statistics(network, comm, images);
  auto result = compare_with_reference({.statistics = measured.statistics, .kept = measured.features}, measured.n,
                                       reference, options, "images");
  result.images_content_sha256 = measured.content_sha256;
  return result;
}

std::vector<std::pair<std::string, std::string>> sampling_json_fields(const QualityRequest& request) {
  namespace json = util::json;
  const auto& options = request.sampling.options;
  return {{"sampler", json::quote(options.sampler)},
          {"steps", std::to_string(options.steps)},
          {"eta", json::number(options.eta)},
          {"seed", std::to_string(request.sampling.seed)}};
}

std::string quality_json(const QualityResult& result, const FeatureNetworkInfo& network,
                         const ReferenceStatistics& reference,
                         const std::vector<std::pair<std::string, std::string>>& fields,
                         const std::vector<std::pair<std::string, std::string>>& extra) {
  namespace json = util::json;
  std::string out = "{\"fid\": " + json::number(result.fid);
  if (result.kid) {
    out += ", \"kid_mean\": " + json::number(result.kid->mean) + ", \"kid_std\": " + json::number(result.kid->std) +
           ", \"kid_subsets\": " + std::to_string(result.kid->subsets) +
           ", \"kid_subset_size\": " + std::to_string(result.kid->subset_size);
  }
  if (result.precision_recall) {
    out += ", \"precision\": " + json::number(result.precision_recall->precision) +
           ", \"recall\": " + json::number(result.precision_recall->recall) +
           ", \"pr_k\": " + std::to_string(result.precision_recall->k);
  }
  out += ", \"n\": " + std::to_string(result.n);
  for (const auto& [key, value] : fields) out += ", " + json::quote(key) + ": " + value;
  out += ", \"features\": " + json::quote(network.name) + ", \"features_sha256\": " + json::quote(network.sha256) +
         ", \"feature_dimension\": " + std::to_string(result.feature_dimension) +
         ", \"reference_n\": " + std::to_string(reference.n) +
         ", \"reference_dataset\": " + json::quote(reference.dataset_path) +
         ", \"reference_content_sha256\": " + json::quote(reference.content_sha256);
  for (const auto& [key, value] : extra) out += ", " + json::quote(key) + ": " + value;
  return out + "}";
}

}  // namespace diffuse::trainer
