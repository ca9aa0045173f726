// trainer/feature_statistics.cpp: sums of features over ranks, and the reference statistics file.
#include "trainer/feature_statistics.h"

#include <cstring>
#include <stdexcept>

#include "data/dataset.h"
#include "data/hdf5_tensors.h"
#include "util/sha256.h"

namespace diffuse::trainer {

FeatureAccumulator::FeatureAccumulator(int64_t dimension)
    : sum_(torch::zeros({dimension}, torch::kFloat64)), outer_(torch::zeros({dimension, dimension}, torch::kFloat64)) {}

void FeatureAccumulator::add(const torch::Tensor& features) {
  if (features.dim() != 2 || features.size(1) != sum_.size(0)) {
    throw std::invalid_argument("feature statistics: expected features [b, " + std::to_string(sum_.size(0)) +
                                "], got " + c10::str(features.sizes()));
  }
  auto f = features.to(torch::kCPU, torch::kFloat64);
  sum_ += f.sum(0);
  outer_ += torch::mm(f.t(), f);
  count_ += f.size(0);
}

GaussianStatistics FeatureAccumulator::reduce(dist::Communicator& comm) const {
  // One all-reduce: [count, sum..., outer...] in float64 (counts up to 2^53 are exact).
  auto packed = torch::cat({torch::tensor({static_cast<double>(count_)}, torch::kFloat64), sum_, outer_.flatten()})
                    .to(comm.device());
  comm.all_reduce(packed, dist::ReduceOp::kSum);
  packed = packed.cpu();
  int64_t d = sum_.size(0);
  auto count = static_cast<int64_t>(packed[0].item<double>());
  return statistics_from_sums(packed.slice(0, 1, 1 + d), packed.slice(0, 1 + d).view({d, d}), count);
}

std::pair<int64_t, int64_t> rank_share(int64_t n, int rank, int size) {
  return {n * rank / size, n * (rank + 1) / size};
}

FeatureSummary summarize_features(FeatureNetwork& network, dist::Communicator& comm, int64_t n, int64_t keep,
                                  int64_t batch, const std::function<torch::Tensor(int64_t, int64_t)>& images,
                                  const std::function<void(int64_t)>& on_progress) {
  // Items [k batch, (k + 1) batch) form batch k on any number of ranks, and each rank runs its
  // share of whole batches: the network sees the same batches, so its (float32) features are
  // the same bits whatever the rank count, and only the float64 sums' order differs.
  const int64_t batches = (n + batch - 1) / batch;
  auto [first_batch, last_batch] = rank_share(batches, comm.rank(), comm.size());
  FeatureAccumulator accumulator(network.info().dimension);
  // Kept features at their index, zero elsewhere: summed over ranks, every row comes from exactly
  // one rank, so the gathered features are exact and do not depend on the rank count.
  int64_t m = std::min(n, keep);
  auto kept = torch::zeros({m, network.info().dimension}, torch::kFloat64);
  const int64_t steps = (batches + comm.size() - 1) / comm.size();
  for (int64_t step = 0; step < steps; ++step) {
    // Every rank takes part in every progress call; a rank past its share computes nothing.
    int64_t k = first_batch + step;
    int64_t begin = k < last_batch ? k * batch : 0, end = k < last_batch ? std::min(begin + batch, n) : 0;
    if (end > begin) {
      auto f = network.features(images(begin, end));
      accumulator.add(f);
      if (begin < m) kept.slice(0, begin, std::min(end, m)).copy_(f.slice(0, 0, std::min(end, m) - begin));
    }
    if (on_progress) {
      auto total = torch::tensor({end - begin}, torch::kInt64).to(comm.device());
      comm.all_reduce(total, dist::ReduceOp::kSum);
      on_progress(total.cpu().item<int64_t>());
    }
  }
  auto statistics = accumulator.reduce(comm);
  auto all_kept = kept.to(comm.device());
  comm.all_reduce(all_kept, dist::ReduceOp::kSum);
  return {.statistics = statistics, .kept = all_kept.cpu()};
}

ReferenceStatistics compute_reference_statistics(FeatureNetwork& network, dist::Communicator& comm,
                                                 const StatsRequest& request) {
  auto identity = data::dataset_identity(request.data);
  int64_t n = request.n <= 0 ? identity.count : std::min(request.n, identity.count);
  if (n < 2) {
    throw std::invalid_argument("stats: " + request.data.string() + " has " + std::to_string(identity.count) +
                                " images; the statistics need at least 2");
  }
  // Per-image SHA-256 (hex) at its index, zero elsewhere, summed over ranks like the features.
  auto digests = torch::zeros({n, 64}, torch::kUInt8);
  auto read = [&](int64_t begin, int64_t end) {
    auto images = data::read_images(request.data, begin, end - begin);  // [b, H, W, C] uint8
    for (int64_t i = 0; i < images.size(0); ++i) {
      auto image = images[i].contiguous();
      auto hex = util::sha256_hex(
          std::string_view(static_cast<const char*>(image.data_ptr()), static_cast<size_t>(image.numel())));
      std::memcpy(digests[begin + i].data_ptr(), hex.data(), 64);
    }
    return images.permute({0, 3, 1, 2}).to(torch::kFloat32) / 255.0;
  };
  auto summary = summarize_features(network, comm, n, kKeptFeatures, request.batch, read, request.on_progress);
  auto all_digests = digests.to(comm.device());
  comm.all_reduce(all_digests, dist::ReduceOp::kSum);
  all_digests = all_digests.cpu().contiguous();
  auto content = util::sha256_hex(std::string_view(static_cast<const char*>(all_digests.data_ptr()),
                                                   static_cast<size_t>(all_digests.numel())));
  return {.statistics = summary.statistics,
          .features_name = network.info().name,
          .features_sha256 = network.info().sha256,
          .dataset_path = request.data.string(),
          .dataset_count = identity.count,
          .dataset_identity = identity.digest,
          .content_sha256 = content,
          .n = n,
          .features = summary.kept};
}

void write_reference_statistics(const std::filesystem::path& path, const ReferenceStatistics& stats, bool overwrite) {
  data::write_hdf5_tensors(path,
                           {{"mean", stats.statistics.mean},
                            {"covariance", stats.statistics.covariance},
                            {"count", torch::tensor(stats.statistics.count, torch::kInt64)},
                            {"features", stats.features.to(torch::kFloat32)}},
                           {{"kind", "diffuse reference statistics"},
                            {"features_name", stats.features_name},
                            {"features_sha256", stats.features_sha256},
                            {"dataset_path", stats.dataset_path},
                            {"dataset_count", std::to_string(stats.dataset_count)},
                            {"dataset_identity", stats.dataset_identity},
                            {"content_sha256", stats.content_sha256},
                            {"n", std::to_string(stats.n)}},
                           overwrite);
}

ReferenceStatistics read_reference_statistics(const std::filesystem::path& path) {
  auto file = data::read_hdf5_tensors(path);
  auto attribute = [&](const std::string& key) {
    auto it = file.attributes.find(key);
    if (it == file.attributes.end()) {
      throw std::invalid_argument("reference statistics " + path.string() + ": no attribute '" + key +
                                  "'; make the file with `diffuse stats`");
    }
    return it->second;
  };
  if (attribute("kind") != "diffuse reference statistics") {
    throw std::invalid_argument("reference statistics " + path.string() + ": not a `diffuse stats` file");
  }
  auto get = [&](const std::string& name) {
    try {
      return file.at(name);
    } catch (const std::exception& error) {
      throw std::invalid_argument("reference statistics " + path.string() + ": " + error.what());
    }
  };
  ReferenceStatistics stats;
  stats.statistics = {.mean = get("mean").to(torch::kFloat64), .covariance = get("covariance").to(torch::kFloat64),
                      .count = get("count").item<int64_t>()};
  stats.features_name = attribute("features_name");
  stats.features_sha256 = attribute("features_sha256");
  stats.dataset_path = attribute("dataset_path");
  stats.dataset_count = std::stoll(attribute("dataset_count"));
  stats.dataset_identity = attribute("dataset_identity");
  stats.content_sha256 = attribute("content_sha256");
  stats.n = std::stoll(attribute("n"));
  stats.features = get("features").to(torch::kFloat64);
  return stats;
}

void check_reference_statistics(const ReferenceStatistics& stats, const std::filesystem::path& stats_path,
                                const FeatureNetworkInfo& network, const std::optional<data::DatasetIdentity>& dataset) {
  if (stats.features_sha256 != network.sha256) {
    throw std::invalid_argument("reference statistics " + stats_path.string() + " were made with another feature network: " +
                                stats.features_name + " sha256 " + stats.features_sha256 + ", but " +
                                network.path.string() + " (" + network.name + ") has sha256 " + network.sha256 +
                                "; remake them with `diffuse stats --features " + network.path.string() + "`");
  }
  if (dataset && dataset->digest != stats.dataset_identity) {
    throw std::invalid_argument("reference statistics " + stats_path.string() + " were made from another dataset: " +
                                stats.dataset_path + " (identity " + stats.dataset_identity.substr(0, 12) +
                                "), this one is " + dataset->summary() + "; remake them with `diffuse stats --data`");
  }
  if (stats.statistics.mean.numel() != network.dimension) {
    throw std::invalid_argument("reference statistics " + stats_path.string() + " have " +
                                std::to_string(stats.statistics.mean.numel()) + " features, the network gives " +
                                std::to_string(network.dimension));
  }
}

}  // namespace diffuse::trainer
