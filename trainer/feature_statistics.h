// trainer/feature_statistics.h: features reduced over ranks to a Gaussian (mean and covariance in
// float64), the reference statistics of a dataset (`diffuse stats`) and their file.
//
//   FeatureNetwork net("net.pt", device);
//   auto ref = compute_reference_statistics(net, comm, {.data = "cifar.h5", .n = 50000});
//   if (comm.rank() == 0) write_reference_statistics("cifar.stats.h5", ref);
//   auto back = read_reference_statistics("cifar.stats.h5");
//   check_reference_statistics(back, "cifar.stats.h5", net.info());   // throws when made with another network
//
// Every rank adds its features to a sum [D] and a sum of outer products [D, D]; one all-reduce
// combines them, so the result does not depend on the number of ranks (up to float64 rounding).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>

#include "data/dataset_identity.h"
#include "dist/communicator.h"
#include "trainer/feature_network.h"
#include "trainer/quality_metrics.h"

namespace diffuse::trainer {

/// Sums of features on one rank, reduced into statistics over all ranks.
class FeatureAccumulator {
 public:
  explicit FeatureAccumulator(int64_t dimension);
  /// Adds features [b, D] (any float dtype; summed in float64).
  void add(const torch::Tensor& features);
  /// All-reduces the sums and the count over `comm` (collective) and returns the statistics.
  GaussianStatistics reduce(dist::Communicator& comm) const;

 private:
  torch::Tensor sum_, outer_;
  int64_t count_ = 0;
};

/// The first and one-past-last index of this rank's contiguous share of n items (the split of the
/// feature batches, and of the bound's images in `eval`).
std::pair<int64_t, int64_t> rank_share(int64_t n, int rank, int size);

/// Features of n items split over ranks: their statistics, and the first `keep` features.
struct FeatureSummary {
  GaussianStatistics statistics;
  torch::Tensor kept;  ///< features of items [0, min(n, keep)), [m, D] float64, on every rank
};

/// Runs `network` on items [0, n) in batches [k batch, (k + 1) batch), each rank its rank_share of
/// the batches (so every batch, and its features, is the same on any number of ranks);
/// `images(begin, end)` gives items [begin, end) as float [b, C, H, W] in [0, 1]. Reduces the
/// sums and the kept features over `comm` (collective; the result does not depend on the rank
/// count). `on_progress` gets the items of each step on all ranks together.
FeatureSummary summarize_features(FeatureNetwork& network, dist::Communicator& comm, int64_t n, int64_t keep,
                                  int64_t batch, const std::function<torch::Tensor(int64_t, int64_t)>& images,
                                  const std::function<void(int64_t)>& on_progress = {});

/// How many features the stats file and `eval` keep for KID and precision/recall.
inline constexpr int64_t kKeptFeatures = 10000;

struct StatsRequest {
  std::filesystem::path data;  ///< HDF5 dataset (diffuse prep)
  int64_t n = 0;               ///< first n images; 0 or more than the dataset: all of them
  int64_t batch = 64;          ///< images per forward pass
  std::function<void(int64_t images)> on_progress;  ///< images of this batch on all ranks together
};

/// Reference statistics and what they were made from.
struct ReferenceStatistics {
  GaussianStatistics statistics;
  std::string features_name, features_sha256;
  std::string dataset_path;            ///< as given
  int64_t dataset_count = 0;           ///< images in the file
  std::string dataset_identity;        ///< data::DatasetIdentity::digest of the file
  std::string content_sha256;          ///< SHA-256 of the per-image SHA-256s of the n images read, in order
  int64_t n = 0;                       ///< images used
  torch::Tensor features;              ///< the first min(n, kKeptFeatures) features [m, D] (KID, precision/recall)
};

/// Reads this rank's share of the first n images, runs `network` and reduces (collective).
/// Throws naming the file on a read error.
ReferenceStatistics compute_reference_statistics(FeatureNetwork& network, dist::Communicator& comm,
                                                 const StatsRequest& request);

/// Writes mean, covariance, count and the kept features (float32) with the provenance as root attributes (HDF5, readable with
/// h5py: f["mean"], f["covariance"], f.attrs["features_sha256"]).
void write_reference_statistics(const std::filesystem::path& path, const ReferenceStatistics& stats,
                                bool overwrite = false);

/// Reads a file written by write_reference_statistics; throws naming the file and the missing key.
ReferenceStatistics read_reference_statistics(const std::filesystem::path& path);

/// Refuses statistics made with another feature network (hash), or, when `dataset` is given, from
/// another dataset (identity), with a message saying which differs, both values, and what to do.
void check_reference_statistics(const ReferenceStatistics& stats, const std::filesystem::path& stats_path,
                                const FeatureNetworkInfo& network,
                                const std::optional<data::DatasetIdentity>& dataset = std::nullopt);

}  // namespace diffuse::trainer
