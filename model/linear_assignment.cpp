// model/linear_assignment.cpp: the Hungarian method with row/column potentials, adding one row at a
// time and growing a shortest augmenting path (Dijkstra on reduced costs) from it, as in Jonker &
// Volgenant (1987) and the classic e-maxx formulation. Column 0 is a virtual column that holds the
// row being inserted, which keeps the path bookkeeping free of special cases.
#include "model/linear_assignment.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace diffuse::model {

std::vector<int64_t> linear_sum_assignment(const torch::Tensor& cost) {
  if (!cost.defined() || cost.dim() != 2) {
    throw std::invalid_argument("linear_sum_assignment: the cost must be a 2-D matrix, got " +
                                std::string(cost.defined() ? std::to_string(cost.dim()) + " dimensions" : "none"));
  }
  const int64_t n = cost.size(0), m = cost.size(1);
  if (n > m) {
    throw std::invalid_argument("linear_sum_assignment: " + std::to_string(n) + " rows cannot go to " +
                                std::to_string(m) + " distinct columns (needs rows <= columns; transpose it)");
  }
  const auto c = cost.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  if (!torch::isfinite(c).all().item<bool>()) {
    throw std::invalid_argument("linear_sum_assignment: the cost matrix has a NaN or infinite entry");
  }
  const double* a = c.data_ptr<double>();
  const double inf = std::numeric_limits<double>::infinity();
  // 1-based: u[i] row potentials, v[j] column potentials, p[j] the row holding column j (0: free),
  // way[j] the previous column on the current shortest path.
  std::vector<double> u(static_cast<size_t>(n) + 1, 0.0), v(static_cast<size_t>(m) + 1, 0.0);
  std::vector<int64_t> p(static_cast<size_t>(m) + 1, 0), way(static_cast<size_t>(m) + 1, 0);
  for (int64_t i = 1; i <= n; ++i) {
    p[0] = i;
    int64_t j0 = 0;
    std::vector<double> minv(static_cast<size_t>(m) + 1, inf);
    std::vector<char> used(static_cast<size_t>(m) + 1, 0);
    do {
      used[j0] = 1;
      const int64_t i0 = p[j0];
      double delta = inf;
      int64_t j1 = 0;
      for (int64_t j = 1; j <= m; ++j) {
        if (used[j]) continue;
        const double reduced = a[(i0 - 1) * m + (j - 1)] - u[i0] - v[j];
        if (reduced < minv[j]) {
          minv[j] = reduced;
          way[j] = j0;
        }
        if (minv[j] < delta) {  // strict: ties go to the lowest column index
          delta = minv[j];
          j1 = j;
        }
      }
      for (int64_t j = 0; j <= m; ++j) {
        if (used[j]) {
          u[p[j]] += delta;
          v[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      }
      j0 = j1;
    } while (p[j0] != 0);
    // Flip the augmenting path back to the virtual column.
    do {
      const int64_t j1 = way[j0];
      p[j0] = p[j1];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<int64_t> column(static_cast<size_t>(n), -1);
  for (int64_t j = 1; j <= m; ++j) {
    if (p[j] != 0) column[static_cast<size_t>(p[j] - 1)] = j - 1;
  }
  return column;
}

torch::Tensor immiscible_noise_assignment(const torch::Tensor& x_start, const torch::Tensor& noise) {
  TORCH_CHECK(x_start.dim() >= 2 && noise.sizes() == x_start.sizes(),
              "immiscible_noise_assignment: x_start must be batched ([b, ...]) and noise of its shape; got x_start ", x_start.sizes(),
              " and noise ", noise.sizes());
  torch::NoGradGuard no_grad;
  const auto dist = torch::cdist(x_start.detach().flatten(1), noise.detach().flatten(1));
  const auto column = linear_sum_assignment(dist);
  return torch::tensor(column, torch::kLong).to(x_start.device());
}

}  // namespace diffuse::model
