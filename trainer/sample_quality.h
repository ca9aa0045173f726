// trainer/sample_quality.h: FID, KID and precision/recall of a model's samples against reference
// statistics (`diffuse eval --fid`). The samples are drawn exactly as `diffuse sample` draws them
// (sample_images: the same images for the same seed on any number of ranks), their features
// reduced over ranks like the reference's (feature_statistics.h).
//
//   FeatureNetwork net("net.pt", device);
//   auto ref = read_reference_statistics("cifar.stats.h5");
//   check_reference_statistics(ref, "cifar.stats.h5", net.info());
//   auto result = evaluate_sample_quality(*loaded.diffusion, comm, net, ref, {.sampling = {.n = 10000, ...}});
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "trainer/feature_statistics.h"
#include "trainer/quality_metrics.h"
#include "trainer/sampling.h"

namespace diffuse::trainer {

struct QualityRequest {
  SampleRequest sampling;      ///< n, seed, batch, sampler, steps, eta (as `diffuse sample`)
  int64_t feature_batch = 64;  ///< images per feature-network pass
  KidOptions kid;              ///< subset_size is capped at the smaller side
  int64_t pr_k = 3;            ///< k of precision/recall's k-NN balls
};

struct QualityResult {
  int64_t n = 0, feature_dimension = 0;
  double fid = 0;
  /// From up to kKeptFeatures features of each side; empty when a side has too few (named in warnings).
  std::optional<KidResult> kid;
  std::optional<PrecisionRecall> precision_recall;
  std::vector<std::string> warnings;  ///< e.g. N below the feature dimension (FID biased, covariance singular)
};

/// Samples, quantises them to 8 bits (as saved PNGs), extracts features and compares with
/// `reference` (collective; every rank returns the same result, on any number of ranks). Throws when the reference's feature size differs from the network's.
QualityResult evaluate_sample_quality(model::GaussianDiffusionImpl& diffusion, dist::Communicator& comm,
                                      FeatureNetwork& network, const ReferenceStatistics& reference,
                                      const QualityRequest& request);

/// One JSON line: {"fid": ..., "kid_mean": ..., "kid_std": ..., "precision": ..., "recall": ...,
/// "n": ..., "sampler": ..., "steps": ..., "eta": ..., "seed": ..., "features": name,
/// "features_sha256": ..., "reference_n": ..., ...extra} (extra: already-quoted JSON values).
std::string quality_json(const QualityResult& result, const QualityRequest& request, const FeatureNetworkInfo& network,
                         const ReferenceStatistics& reference,
                         const std::vector<std::pair<std::string, std::string>>& extra = {});

}  // namespace diffuse::trainer
