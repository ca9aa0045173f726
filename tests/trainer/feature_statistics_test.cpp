// Tests of trainer/feature_network.h and trainer/feature_statistics.h, run on 1, 2 and 4 ranks:
// the committed TorchScript fixture (tests/trainer/fixtures/make_feature_net.py), statistics
// reduced over ranks equal to one process's, the stats file and its refusals.
#include <gtest/gtest.h>

#include <random>

#include "data/dataset.h"
#include "mpi_support.h"
#include "support.h"
#include "trainer/feature_network.h"
#include "trainer/feature_statistics.h"
#include "util/sha256.h"

namespace diffuse::trainer {
namespace {

namespace fs = std::filesystem;

const dist::Context& ctx() { return testing::world(); }

fs::path fixture(const std::string& name) {
  const char* source = std::getenv("DIFFUSE_SOURCE_DIR");
  return fs::path(source != nullptr ? source : ".") / "tests/trainer/fixtures" / name;
}

/// Every rank sees it.
struct SharedDir : testing::SharedDir {
  SharedDir() : testing::SharedDir("diffuse-fstats") {}
};

/// A dataset of n random images (the same on every rank: a fixed seed), written by rank 0.
fs::path make_dataset(const SharedDir& dir, const std::string& name, int64_t n, int64_t size, int64_t channels,
                      uint64_t seed, int64_t max_value = 255) {
  auto path = dir / name;
  if (ctx().is_root()) {
    auto generator = at::detail::createCPUGenerator(seed);
    auto images = torch::randint(0, max_value + 1, {n, size, size, channels}, generator, torch::kInt64).to(torch::kUInt8);
    data::write_dataset(path, images, torch::Tensor());
  }
  ctx().barrier();
  return path;
}

TEST(FeatureNetwork, LoadsTheFixtureWithItsMetadataAndHash) {
  FeatureNetwork net(fixture("tiny_features.pt"), torch::kCPU);
  EXPECT_EQ(net.info().name, "tiny-test-features");
  EXPECT_EQ(net.info().input_height, 16);
  EXPECT_EQ(net.info().input_width, 16);
  EXPECT_FALSE(net.info().resizes_internally);
  EXPECT_EQ(net.info().resize_mode, "bilinear");
  EXPECT_EQ(net.info().dimension, 8);
  EXPECT_EQ(net.info().sha256, util::sha256_file(fixture("tiny_features.pt")));
  auto images = torch::rand({3, 3, 16, 16});
  auto f = net.features(images);
  EXPECT_EQ(f.scalar_type(), torch::kFloat64);
  EXPECT_EQ(f.sizes(), (std::vector<int64_t>{3, 8}));
  // The last 3 features are the channel means (the fixture's definition).
  testing::expect_allclose(f.slice(1, 5), images.mean({2, 3}).to(torch::kFloat64), 1e-6, 1e-7);
}

TEST(FeatureNetwork, RepeatsGreyToThreeChannelsAndResizesWithTheDeclaredMode) {
  FeatureNetwork net(fixture("tiny_features.pt"), torch::kCPU);
  auto grey = torch::rand({2, 1, 16, 16});
  testing::expect_allclose(net.features(grey), net.features(grey.repeat({1, 3, 1, 1})), 0, 0, "grey");
  auto small = torch::rand({2, 3, 8, 8});
  namespace F = torch::nn::functional;
  auto resized = F::interpolate(small, F::InterpolateFuncOptions()
                                           .size(std::vector<int64_t>{16, 16})
                                           .mode(torch::kBilinear)
                                           .align_corners(false));
  testing::expect_allclose(net.features(small), net.features(resized), 0, 0, "resize");
}

TEST(FeatureNetwork, RefusesFilesWithoutMetadataOrMissing) {
  auto message = testing::error_of([] { FeatureNetwork(fixture("tiny_features_no_metadata.pt"), torch::kCPU); });
  EXPECT_NE(message.find("has no extra file diffuse_features.json"), std::string::npos) << message;
  message = testing::error_of([] { FeatureNetwork(fixture("no_such_net.pt"), torch::kCPU); });
  EXPECT_NE(message.find("no such file"), std::string::npos) << message;
  message = testing::error_of([] { FeatureNetwork(fixture("make_feature_net.py"), torch::kCPU); });
  EXPECT_NE(message.find("not a loadable TorchScript file"), std::string::npos) << message;
}

TEST(FeatureStatistics, AccumulatorOverRanksEqualsOneProcess) {
  auto generator = at::detail::createCPUGenerator(42);
  auto all = torch::randn({101, 6}, generator, torch::kFloat64) * 2 + 3;
  auto comm = dist::make_mpi_communicator(ctx());
  auto [first, last] = rank_share(101, comm->rank(), comm->size());
  FeatureAccumulator accumulator(6);
  for (int64_t i = first; i < last; i += 7) accumulator.add(all.slice(0, i, std::min(i + 7, last)));
  auto reduced = accumulator.reduce(*comm);
  auto direct = gaussian_statistics(all);
  EXPECT_EQ(reduced.count, 101);
  testing::expect_allclose(reduced.mean, direct.mean, 1e-12, 1e-13, "mean");
  testing::expect_allclose(reduced.covariance, direct.covariance, 1e-11, 1e-12, "covariance");
}

TEST(FeatureStatistics, ReferenceStatisticsAndFidDoNotDependOnTheRankCount) {
  SharedDir dir;
  auto data = make_dataset(dir, "data.h5", 37, 12, 3, 7);  // 12x12: resized to the net's 16x16
  FeatureNetwork net(fixture("tiny_features.pt"), torch::kCPU);
  auto comm = dist::make_mpi_communicator(ctx());
  int64_t progress = 0;
  auto ref = compute_reference_statistics(net, *comm, {.data = data, .n = 0, .batch = 5,
                                                       .on_progress = [&](int64_t k) { progress += k; }});
  EXPECT_EQ(progress, 37);
  EXPECT_EQ(ref.n, 37);
  EXPECT_EQ(ref.dataset_count, 37);
  EXPECT_EQ(ref.features_sha256, net.info().sha256);
  EXPECT_EQ(ref.features.sizes(), (std::vector<int64_t>{37, 8}));
  // One process, every image in one batch, the same sums: what a 1-rank run makes.
  auto local_statistics = [&](const fs::path& file) {
    auto all = data::read_images(file, 0, data::read_dataset_info(file).count);
    auto f = net.features(all.permute({0, 3, 1, 2}).to(torch::kFloat32) / 255.0);
    return statistics_from_sums(f.sum(0), torch::mm(f.t(), f), f.size(0));
  };
  auto images = data::read_images(data, 0, 37);
  auto local = local_statistics(data);
  testing::expect_allclose(ref.statistics.mean, local.mean, 1e-12, 1e-14, "mean");
  auto all_features = net.features(images.permute({0, 3, 1, 2}).to(torch::kFloat32) / 255.0);
  testing::expect_allclose(ref.features, all_features, 1e-6, 1e-7, "kept features");
  testing::expect_allclose(ref.statistics.covariance, local.covariance, 1e-9, 1e-14, "covariance");
  auto other = make_dataset(dir, "other.h5", 40, 12, 1, 8, /*max_value=*/100);  // darker, grey
  auto other_stats = compute_reference_statistics(net, *comm, {.data = other, .batch = 4}).statistics;
  double fid = frechet_distance(ref.statistics, other_stats);
  double fid_local = frechet_distance(local, local_statistics(other));
  EXPECT_GT(fid_local, 0.01);
  EXPECT_NEAR(fid, fid_local, 1e-9 * std::abs(fid_local)) << "ranks " << comm->size();
  // The content hash is the same on every rank count: the hash of the per-image hashes in order.
  util::Sha256 expected;
  for (int64_t i = 0; i < 37; ++i) {
    auto image = images[i].contiguous();
    expected.update(util::sha256_hex(
        std::string_view(static_cast<const char*>(image.data_ptr()), static_cast<size_t>(image.numel()))));
  }
  EXPECT_EQ(ref.content_sha256, expected.hex_digest());
  // Only the first n images when asked.
  EXPECT_EQ(compute_reference_statistics(net, *comm, {.data = data, .n = 10}).n, 10);
}

TEST(FeatureStatistics, FileRoundTripsAndRefusesAnotherNetworkOrDataset) {
  SharedDir dir;
  auto data = make_dataset(dir, "data.h5", 20, 16, 3, 1);
  auto other_data = make_dataset(dir, "other.h5", 20, 16, 3, 2);
  FeatureNetwork net(fixture("tiny_features.pt"), torch::kCPU);
  FeatureNetwork other_net(fixture("tiny_features_other.pt"), torch::kCPU);
  auto comm = dist::make_mpi_communicator(ctx());
  auto ref = compute_reference_statistics(net, *comm, {.data = data});
  auto path = dir / "ref.stats.h5";
  if (ctx().is_root()) write_reference_statistics(path, ref);
  ctx().barrier();
  auto back = read_reference_statistics(path);
  testing::expect_allclose(back.statistics.mean, ref.statistics.mean, 0, 0);
  testing::expect_allclose(back.statistics.covariance, ref.statistics.covariance, 0, 0);
  EXPECT_EQ(back.statistics.count, 20);
  EXPECT_EQ(back.features_sha256, ref.features_sha256);
  EXPECT_EQ(back.content_sha256, ref.content_sha256);
  EXPECT_EQ(back.dataset_identity, ref.dataset_identity);
  EXPECT_EQ(back.n, 20);
  testing::expect_allclose(back.features, ref.features, 1e-7, 1e-7, "features (stored as float32)");
  EXPECT_NO_THROW(check_reference_statistics(back, path, net.info(), data::dataset_identity(data)));
  auto message = testing::error_of([&] { check_reference_statistics(back, path, other_net.info()); });
  EXPECT_NE(message.find("made with another feature network"), std::string::npos) << message;
  EXPECT_NE(message.find(other_net.info().sha256), std::string::npos) << message;
  message = testing::error_of(
      [&] { check_reference_statistics(back, path, net.info(), data::dataset_identity(other_data)); });
  EXPECT_NE(message.find("made from another dataset"), std::string::npos) << message;
  message = testing::error_of([&] { read_reference_statistics(data); });
  EXPECT_NE(message.find("no attribute 'kind'"), std::string::npos) << message;
}

}  // namespace
}  // namespace diffuse::trainer
