// trainer/sample_quality.h: FID, KID and precision/recall of a model's samples, or of a dataset's
// images, against reference statistics (`diffuse eval --fid`, and the eval: section of a training
// run). The samples are drawn exactly as `diffuse sample` draws them (sample_images: the same
// images for the same seed on any number of ranks), their features reduced over ranks like the
// reference's (feature_statistics.h).
//
//   FeatureNetwork net("net.pt", device);
//   auto ref = read_reference_statistics("cifar.stats.h5");
//   check_reference_statistics(ref, "cifar.stats.h5", net.info());
//   auto result = evaluate_sample_quality(*loaded.diffusion, comm, net, ref, {.sampling = {.n = 10000, ...}});
//   auto floor = evaluate_image_quality(net, comm, ref, {.data = "cifar-test.h5", .n = 10000}, {});
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "trainer/feature_statistics.h"
#include "trainer/quality_metrics.h"
#include "trainer/sampling.h"

namespace diffuse::trainer {

/// How KID and precision/recall are computed from the kept features.
struct MetricOptions {
  KidOptions kid;    ///< subset_size is capped at the smaller side
  int64_t pr_k = 3;  ///< k of precision/recall's k-NN balls
};

struct QualityRequest {
  SampleRequest sampling;      ///< n, seed, batch, sampler, steps, eta, classes (as `diffuse sample`)
  int64_t feature_batch = 64;  ///< images per feature-network pass
  MetricOptions metrics;
};

struct QualityResult {
  int64_t n = 0, feature_dimension = 0;
  double fid = 0;
  /// From up to kKeptFeatures features of each side; empty when a side has too few (named in warnings).
  std::optional<KidResult> kid;
  std::optional<PrecisionRecall> precision_recall;
  std::vector<std::string> warnings;  ///< e.g. N below the feature dimension (FID biased, covariance singular)
  std::string images_content_sha256;  ///< evaluate_image_quality: the hash of the images read (as `stats`)
};

/// The classes of quality samples from a class-conditional model: sample i gets
/// classes[i mod classes.size()], so the classes are equally represented (up to one sample) at
/// any N, whatever the number of ranks. int64 [n] on the CPU.
torch::Tensor cycled_classes(int64_t n, const std::vector<int64_t>& classes);

/// The metrics of `features` (the statistics of n items and their first kept features) against
/// `reference`; `items` names what was measured in warnings ("samples", "images"). Throws when
/// the feature sizes differ.
QualityResult compare_with_reference(const FeatureSummary& features, int64_t n, const ReferenceStatistics& reference,
                                     const MetricOptions& options, const std::string& items = "samples");

/// Samples, quantises them to 8 bits (as saved PNGs), extracts features and compares with
/// `reference` (collective; every rank returns the same result, on any number of ranks). Throws when the reference's feature size differs from the network's.
QualityResult evaluate_sample_quality(DiffusionModel& diffusion, dist::Communicator& comm,
                                      FeatureNetwork& network, const ReferenceStatistics& reference,
                                      const QualityRequest& request);

/// The same for the first `images.n` images of a dataset (`eval --fid --images`), read and
/// reduced as `diffuse stats` reads them: the floor a model's FID can reach at that N, e.g. a
/// held-out set against the training set's statistics. Collective.
QualityResult evaluate_image_quality(FeatureNetwork& network, dist::Communicator& comm,
                                     const ReferenceStatistics& reference, const StatsRequest& images,
                                     const MetricOptions& options);

/// What the samples of `request` were drawn with, as JSON fields for quality_json: n's sampler,
/// steps, eta and seed.
std::vector<std::pair<std::string, std::string>> sampling_json_fields(const QualityRequest& request);

/// One JSON line: {"fid": ..., "kid_mean": ..., "kid_std": ..., "precision": ..., "recall": ...,
/// "n": ..., ...fields, "features": name, "features_sha256": ..., "reference_n": ..., ...extra}
/// (fields and extra: already-quoted JSON values).
std::string quality_json(const QualityResult& result, const FeatureNetworkInfo& network,
                         const ReferenceStatistics& reference,
                         const std::vector<std::pair<std::string, std::string>>& fields,
                         const std::vector<std::pair<std::string, std::string>>& extra = {});

}  // namespace diffuse::trainer
