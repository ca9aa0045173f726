// trainer/quality_metrics.h: sample quality as numbers, from feature vectors (float64 throughout):
// the Fréchet distance between two Gaussians (FID when the features are Inception's), the kernel
// inception distance (KID) and precision/recall of k-NN manifolds.
//
//   auto real = gaussian_statistics(real_features), fake = gaussian_statistics(fake_features);
//   double fid = frechet_distance(real, fake);
//   auto kid = kernel_inception_distance(real_features, fake_features, {.subsets = 100, .subset_size = 1000});
//   auto pr = precision_recall(real_features, fake_features);   // k = 3
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace diffuse::trainer {

/// Mean [D] and covariance [D, D] (float64, unbiased: divided by count - 1) of `count` features.
struct GaussianStatistics {
  torch::Tensor mean, covariance;
  int64_t count = 0;
};

/// The statistics of features [n, D] (n >= 2), as numpy's mean(axis=0) and cov(rowvar=False).
GaussianStatistics gaussian_statistics(const torch::Tensor& features);

/// The statistics from accumulated sums over n features: sum [D] and sum of outer products
/// [D, D] (float64): mean = sum / n, covariance = (outer - n mean mean^T) / (n - 1).
GaussianStatistics statistics_from_sums(const torch::Tensor& sum, const torch::Tensor& outer_sum, int64_t count);

/// The square root of a symmetric positive semi-definite matrix (float64) through its symmetric
/// eigendecomposition S = V diag(l) V^T: V diag(sqrt(max(l, 0))) V^T. Eigenvalues below zero
/// (rounding of a singular matrix) are taken as zero, so the result is real and symmetric.
torch::Tensor symmetric_sqrt(const torch::Tensor& matrix);

/// The Fréchet distance between N(mu1, S1) and N(mu2, S2):
///   FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1^{1/2} S2 S1^{1/2}))
/// where S1^{1/2} is symmetric_sqrt(S1) and tr(sqrt(M)) for the symmetric PSD M = S1^{1/2} S2 S1^{1/2}
/// is the sum of the square roots of its eigenvalues (clamped at zero). This equals the usual
/// tr(sqrtm(S1 S2)) (S1 S2 is similar to M) without complex parts or a non-symmetric sqrtm.
double frechet_distance(const GaussianStatistics& a, const GaussianStatistics& b);

/// Unbiased MMD^2 between x [m, D] and y [m, D] with the cubic polynomial kernel
/// k(u, v) = (u.v / D + 1)^3 (Bińkowski et al. 2018; torch-fidelity's kid):
///   (sum_{i!=j} k(x_i,x_j) + sum_{i!=j} k(y_i,y_j)) / (m (m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2.
double polynomial_mmd2_unbiased(const torch::Tensor& x, const torch::Tensor& y);

struct KidOptions {
  int64_t subsets = 100;       ///< number of random subsets
  int64_t subset_size = 1000;  ///< features per subset from each side (at most the smaller side)
  uint64_t seed = 0;           ///< the subsets come from a torch CPU generator with this seed
};

/// KID: mean and (population) standard deviation of polynomial_mmd2_unbiased over
/// `subsets` random subsets drawn without replacement from each side.
struct KidResult {
  double mean = 0, std = 0;
  int64_t subsets = 0, subset_size = 0;
};
/// Throws when a side has fewer than 2 features or the feature sizes differ.
KidResult kernel_inception_distance(const torch::Tensor& real, const torch::Tensor& fake, const KidOptions& options);

/// Improved precision and recall (Kynkäänniemi et al. 2019): each real feature's ball reaches its
/// k-th nearest other real feature; precision is the fraction of fake features inside some real
/// ball (distance <= radius), recall the fraction of real features inside some fake ball.
struct PrecisionRecall {
  double precision = 0, recall = 0;
  int64_t k = 3;
};
/// Throws when a side has k features or fewer. Distances in float64, in row blocks (memory
/// O(block x n)).
PrecisionRecall precision_recall(const torch::Tensor& real, const torch::Tensor& fake, int64_t k = 3);

}  // namespace diffuse::trainer
