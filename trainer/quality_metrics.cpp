// trainer/quality_metrics.cpp: FD, KID and precision/recall in float64 on the CPU.
#include "trainer/quality_metrics.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace diffuse::trainer {
namespace {

torch::Tensor as_features(const torch::Tensor& features, const char* what) {
  if (features.dim() != 2) {
    throw std::invalid_argument(std::string(what) + ": features must be [n, D], got " +
                                std::to_string(features.dim()) + " dimensions");
  }
  return features.to(torch::kCPU, torch::kFloat64).contiguous();
}

void check_same_width(const torch::Tensor& a, const torch::Tensor& b, const char* what) {
  if (a.size(1) != b.size(1)) {
    throw std::invalid_argument(std::string(what) + ": the two feature sets differ in size (" +
                                std::to_string(a.size(1)) + " vs " + std::to_string(b.size(1)) +
                                "); were they made by the same feature network?");
  }
}

/// Squared distances between the rows of a [m, D] and b [n, D]; clamped at 0 against rounding.
torch::Tensor squared_distances(const torch::Tensor& a, const torch::Tensor& b) {
  auto aa = (a * a).sum(1, /*keepdim=*/true), bb = (b * b).sum(1).unsqueeze(0);
  return (aa + bb - 2 * torch::mm(a, b.t())).clamp_min(0);
}

/// k-th nearest other point's squared distance for every row of x (the point itself excluded).
torch::Tensor knn_radii(const torch::Tensor& x, int64_t k, int64_t block) {
  std::vector<torch::Tensor> radii;
  for (int64_t start = 0; start < x.size(0); start += block) {
    auto rows = x.slice(0, start, std::min(start + block, x.size(0)));
    auto d = squared_distances(rows, x);
    // Exclude each point itself explicitly (its computed distance may round above a true zero
    // distance to a duplicate, but never matters otherwise).
    auto idx = torch::arange(start, start + rows.size(0), torch::kLong);
    d.index_put_({torch::arange(rows.size(0), torch::kLong), idx}, std::numeric_limits<double>::infinity());
    radii.push_back(std::get<0>(d.topk(k, 1, /*largest=*/false, /*sorted=*/true)).select(1, k - 1));
  }
  return torch::cat(radii);
}

/// Fraction of the rows of `query` within some ball (centres `centres`, squared radii `radii`).
double coverage(const torch::Tensor& query, const torch::Tensor& centres, const torch::Tensor& radii, int64_t block) {
  int64_t inside = 0;
  for (int64_t start = 0; start < query.size(0); start += block) {
    auto rows = query.slice(0, start, std::min(start + block, query.size(0)));
    auto d = squared_distances(rows, centres);
    inside += (d <= radii.unsqueeze(0)).any(1).sum().item<int64_t>();
  }
  return static_cast<double>(inside) / static_cast<double>(query.size(0));
}

}  // namespace

GaussianStatistics gaussian_statistics(const torch::Tensor& features) {
  auto x = as_features(features, "gaussian_statistics");
  if (x.size(0) < 2) throw std::invalid_argument("gaussian_statistics: need at least 2 features for a covariance");
  auto mean = x.mean(0);
  auto centred = x - mean;
  auto cov = torch::mm(centred.t(), centred) / static_cast<double>(x.size(0) - 1);
  return {.mean = mean, .covariance = cov, .count = x.size(0)};
}

GaussianStatistics statistics_from_sums(const torch::Tensor& sum, const torch::Tensor& outer_sum, int64_t count) {
  if (count < 2) {
    throw std::invalid_argument("feature statistics: need at least 2 features for a covariance, got " +
                                std::to_string(count));
  }
  auto s = sum.to(torch::kFloat64), o = outer_sum.to(torch::kFloat64);
  auto n = static_cast<double>(count);
  auto mean = s / n;
  auto cov = (o - n * torch::outer(mean, mean)) / (n - 1);
  cov = (cov + cov.t()) / 2;  // exact symmetry: the sums were reduced element by element
  return {.mean = mean, .covariance = cov, .count = count};
}

torch::Tensor symmetric_sqrt(const torch::Tensor& matrix) {
  auto m = matrix.to(torch::kCPU, torch::kFloat64);
  auto [values, vectors] = torch::linalg_eigh((m + m.t()) / 2);
  return torch::mm(vectors * values.clamp_min(0).sqrt().unsqueeze(0), vectors.t());
}

double frechet_distance(const GaussianStatistics& a, const GaussianStatistics& b) {
  if (a.mean.numel() != b.mean.numel()) {
    throw std::invalid_argument("frechet_distance: feature sizes differ (" + std::to_string(a.mean.numel()) + " vs " +
                                std::to_string(b.mean.numel()) + ")");
  }
  auto mu1 = a.mean.to(torch::kFloat64), mu2 = b.mean.to(torch::kFloat64);
  auto s1 = a.covariance.to(torch::kFloat64), s2 = b.covariance.to(torch::kFloat64);
  auto root1 = symmetric_sqrt(s1);
  auto m = torch::mm(torch::mm(root1, s2), root1);
  auto eigen = torch::linalg_eigvalsh((m + m.t()) / 2);
  double trace_sqrt = eigen.clamp_min(0).sqrt().sum().item<double>();
  double diff = (mu1 - mu2).pow(2).sum().item<double>();
  return diff + s1.trace().item<double>() + s2.trace().item<double>() - 2 * trace_sqrt;
}

double polynomial_mmd2_unbiased(const torch::Tensor& x_in, const torch::Tensor& y_in) {
  auto x = as_features(x_in, "kid"), y = as_features(y_in, "kid");
  check_same_width(x, y, "kid");
  if (x.size(0) != y.size(0) || x.size(0) < 2) {
    throw std::invalid_argument("kid: the two subsets must have the same size >= 2, got " +
                                std::to_string(x.size(0)) + " and " + std::to_string(y.size(0)));
  }
  double d = static_cast<double>(x.size(1)), m = static_cast<double>(x.size(0));
  auto kernel = [d](const torch::Tensor& u, const torch::Tensor& v) { return (torch::mm(u, v.t()) / d + 1).pow(3); };
  auto kxx = kernel(x, x), kyy = kernel(y, y), kxy = kernel(x, y);
  double xx = (kxx.sum() - kxx.diagonal().sum()).item<double>() / (m * (m - 1));
  double yy = (kyy.sum() - kyy.diagonal().sum()).item<double>() / (m * (m - 1));
  double xy = kxy.sum().item<double>() / (m * m);
  return xx + yy - 2 * xy;
}

KidResult kernel_inception_distance(const torch::Tensor& real_in, const torch::Tensor& fake_in,
                                    const KidOptions& options) {
  auto real = as_features(real_in, "kid"), fake = as_features(fake_in, "kid");
  check_same_width(real, fake, "kid");
  int64_t size = std::min({options.subset_size, real.size(0), fake.size(0)});
  if (size < 2) throw std::invalid_argument("kid: each side needs at least 2 features");
  if (options.subsets < 1) throw std::invalid_argument("kid: subsets must be >= 1");
  auto generator = at::detail::createCPUGenerator(options.seed);
  std::vector<double> values;
  for (int64_t i = 0; i < options.subsets; ++i) {
    auto fi = torch::randperm(fake.size(0), generator, torch::kLong).slice(0, 0, size);
    auto ri = torch::randperm(real.size(0), generator, torch::kLong).slice(0, 0, size);
    values.push_back(polynomial_mmd2_unbiased(fake.index_select(0, fi), real.index_select(0, ri)));
  }
  double mean = 0, var = 0;
  for (double v : values) mean += v;
  mean /= static_cast<double>(values.size());
  for (double v : values) var += (v - mean) * (v - mean);
  var /= static_cast<double>(values.size());
  return {.mean = mean, .std = std::sqrt(var), .subsets = options.subsets, .subset_size = size};
}

PrecisionRecall precision_recall(const torch::Tensor& real_in, const torch::Tensor& fake_in, int64_t k) {
  auto real = as_features(real_in, "precision/recall"), fake = as_features(fake_in, "precision/recall");
  check_same_width(real, fake, "precision/recall");
  if (k < 1 || real.size(0) <= k || fake.size(0) <= k) {
    throw std::invalid_argument("precision/recall: each side needs more than k = " + std::to_string(k) +
                                " features, got " + std::to_string(real.size(0)) + " real and " +
                                std::to_string(fake.size(0)) + " fake");
  }
  const int64_t block = 1024;
  auto real_radii = knn_radii(real, k, block), fake_radii = knn_radii(fake, k, block);
  return {.precision = coverage(fake, real, real_radii, block), .recall = coverage(real, fake, fake_radii, block), .k = k};
}

}  // namespace diffuse::trainer
