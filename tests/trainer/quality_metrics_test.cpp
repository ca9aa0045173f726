// Tests of trainer/quality_metrics.h: FD, KID and precision/recall against numpy/scipy golden
// values (tests/trainer/golden/make_quality_golden.py), the matrix square root on a singular
// covariance, and the metrics' behaviour on same vs different distributions.
#include "trainer/quality_metrics.h"

#include <gtest/gtest.h>

#include <cstdlib>

#include "data/hdf5_tensors.h"
#include "support.h"

namespace diffuse::trainer {
namespace {

data::Hdf5Tensors golden() {
  const char* source = std::getenv("DIFFUSE_SOURCE_DIR");
  std::filesystem::path root = source != nullptr ? source : ".";
  return data::read_hdf5_tensors(root / "tests/trainer/golden/quality_golden.h5");
}

double scalar(const data::Hdf5Tensors& file, const std::string& name) { return file.at(name).item<double>(); }

TEST(QualityMetrics, FrechetDistanceMatchesScipy) {
  auto g = golden();
  auto real = gaussian_statistics(g.at("real")), fake = gaussian_statistics(g.at("fake"));
  double expected = scalar(g, "fd_real_fake");
  double got = frechet_distance(real, fake);
  std::cout << "FD " << got << " golden " << expected << " relative error " << std::abs(got - expected) / expected << "\n";
  EXPECT_NEAR(got, expected, 1e-9 * expected);
  // Symmetric in its arguments.
  EXPECT_NEAR(frechet_distance(fake, real), expected, 1e-9 * expected);
}

TEST(QualityMetrics, FrechetDistanceWithSingularCovarianceMatchesScipy) {
  auto g = golden();
  auto few = gaussian_statistics(g.at("few"));  // 10 features in 16 dimensions: rank 9
  auto real = gaussian_statistics(g.at("real"));
  double expected = scalar(g, "fd_real_few");
  double got = frechet_distance(real, few);
  std::cout << "FD (singular) " << got << " golden " << expected << " relative error "
            << std::abs(got - expected) / expected << "\n";
  EXPECT_NEAR(got, expected, 1e-7 * expected);
  EXPECT_NEAR(frechet_distance(few, real), expected, 1e-7 * expected);
}

TEST(QualityMetrics, SymmetricSqrtOfSingularCovarianceIsRealAndSquaresBack) {
  auto g = golden();
  auto cov = gaussian_statistics(g.at("few")).covariance;
  auto root = symmetric_sqrt(cov);
  EXPECT_EQ(root.scalar_type(), torch::kFloat64);
  testing::expect_allclose(root, root.t(), 0, 1e-14, "symmetry");
  testing::expect_allclose(torch::mm(root, root), cov, 0, 1e-12, "root^2 = cov");
  // A rank-deficient matrix with exact zeros: its root is the zero-padded root.
  auto diag = torch::diag(torch::tensor({4.0, 0.0, 9.0}, torch::kFloat64));
  testing::expect_allclose(symmetric_sqrt(diag), torch::diag(torch::tensor({2.0, 0.0, 3.0}, torch::kFloat64)), 0,
                           1e-15);
}

TEST(QualityMetrics, FrechetDistanceOfSameDataIsZeroAndOfHalvesSmallVsNoiseLarge) {
  auto g = golden();
  auto real = gaussian_statistics(g.at("real"));
  EXPECT_NEAR(frechet_distance(real, real), 0.0, 1e-9);
  torch::manual_seed(3);
  auto data = torch::randn({4000, 8}, torch::kFloat64) * 0.3 + 0.5;
  auto half1 = gaussian_statistics(data.slice(0, 0, 2000)), half2 = gaussian_statistics(data.slice(0, 2000));
  auto noise = gaussian_statistics(torch::rand({2000, 8}, torch::kFloat64) * 4 - 2);
  double same = frechet_distance(half1, half2), different = frechet_distance(half1, noise);
  EXPECT_LT(same, 0.02);
  EXPECT_GT(different, 5.0);
}

TEST(QualityMetrics, StatisticsFromSumsEqualTwoPassStatistics) {
  auto g = golden();
  auto x = g.at("real");
  auto direct = gaussian_statistics(x);
  auto sums = statistics_from_sums(x.sum(0), torch::mm(x.t(), x), x.size(0));
  testing::expect_allclose(sums.mean, direct.mean, 0, 1e-12, "mean");
  testing::expect_allclose(sums.covariance, direct.covariance, 0, 1e-11, "covariance");
  EXPECT_EQ(sums.count, 200);
}

TEST(QualityMetrics, UnbiasedPolynomialMmdMatchesNumpy) {
  auto g = golden();
  double expected = scalar(g, "mmd_real_fake");
  double got = polynomial_mmd2_unbiased(g.at("real"), g.at("fake"));
  std::cout << "MMD^2 " << got << " golden " << expected << " relative error "
            << std::abs(got - expected) / std::abs(expected) << "\n";
  EXPECT_NEAR(got, expected, 1e-10 * std::abs(expected));
  // One subset of the full size is a permutation of the full sets: the same value.
  auto kid = kernel_inception_distance(g.at("real"), g.at("fake"), {.subsets = 1, .subset_size = 200, .seed = 5});
  EXPECT_NEAR(kid.mean, expected, 1e-10 * std::abs(expected));
  EXPECT_EQ(kid.std, 0.0);
}

TEST(QualityMetrics, KidOfIdenticalDistributionsIsZeroWithinItsStd) {
  torch::manual_seed(11);
  auto a = torch::randn({1000, 16}, torch::kFloat64), b = torch::randn({1000, 16}, torch::kFloat64);
  auto same = kernel_inception_distance(a, b, {.subsets = 50, .subset_size = 200, .seed = 1});
  EXPECT_LT(std::abs(same.mean), 2 * same.std + 1e-12) << same.mean << " ± " << same.std;
  auto shifted = kernel_inception_distance(a, b + 1.0, {.subsets = 50, .subset_size = 200, .seed = 1});
  EXPECT_GT(shifted.mean, 10 * shifted.std);
  // Seeded: the same subsets again.
  auto again = kernel_inception_distance(a, b, {.subsets = 50, .subset_size = 200, .seed = 1});
  EXPECT_EQ(again.mean, same.mean);
  EXPECT_EQ(again.subset_size, 200);
}

TEST(QualityMetrics, PrecisionRecallMatchesNumpy) {
  auto g = golden();
  auto pr = precision_recall(g.at("real"), g.at("fake"), 3);
  EXPECT_DOUBLE_EQ(pr.precision, scalar(g, "precision"));
  EXPECT_DOUBLE_EQ(pr.recall, scalar(g, "recall"));
  auto self = precision_recall(g.at("real"), g.at("real"), 3);
  EXPECT_EQ(self.precision, 1.0);
  EXPECT_EQ(self.recall, 1.0);
}

TEST(QualityMetrics, RefusesMismatchedFeatureSizes) {
  auto a = torch::randn({10, 4}, torch::kFloat64), b = torch::randn({10, 5}, torch::kFloat64);
  EXPECT_NE(testing::error_of([&] { kernel_inception_distance(a, b, {}); }).find("differ in size"), std::string::npos);
  EXPECT_NE(testing::error_of([&] { precision_recall(a, b); }).find("differ in size"), std::string::npos);
  EXPECT_NE(testing::error_of([&] { frechet_distance(gaussian_statistics(a), gaussian_statistics(b)); })
                .find("feature sizes differ"),
            std::string::npos);
  EXPECT_NE(testing::error_of([&] { precision_recall(a.slice(0, 0, 3), a); }).find("more than k = 3"),
            std::string::npos);
}

}  // namespace
}  // namespace diffuse::trainer
