// model/linear_assignment.h: exact minimum-cost linear assignment (the Hungarian method in the
// shortest-augmenting-path form of Jonker and Volgenant, O(n^2 m)), and the noise-to-image
// assignment of immiscible diffusion (Li et al., arXiv:2406.12303) built on it.
//
// The reference (denoising-diffusion-pytorch 2.3.1, `immiscible=True`) calls
// scipy.optimize.linear_sum_assignment; Debian ships no maintained C++ library for it, so this is a
// compact implementation, tested against brute force and against scipy's assignments.
//
//   std::vector<int64_t> col = linear_sum_assignment(cost);   // row i -> column col[i]
//   auto perm = immiscible_noise_assignment(x_start, noise);  // noise.index_select(0, perm)
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace diffuse::model {

/// The assignment of each row of `cost` ([n, m], n <= m, finite, any floating or integer dtype,
/// any device) to a distinct column that minimises the summed cost: result[i] is row i's column.
/// Computed in float64 on the host. Among several optimal assignments (ties) one is returned
/// deterministically; it need not be the one scipy returns. Throws std::invalid_argument for a
/// non-2-D matrix, more rows than columns, or a non-finite entry.
std::vector<int64_t> linear_sum_assignment(const torch::Tensor& cost);

/// Immiscible diffusion's assignment, as the reference's `noise_assignment`: the permutation `perm`
/// (int64 [b], on x_start's device) minimising sum_i ||x_start[i] - noise[perm[i]]||_2 over the
/// batch, i.e. linear_sum_assignment(torch::cdist(x_start.flatten(1), noise.flatten(1))). The cost
/// is the Euclidean distance itself, not its square, exactly as the reference's cdist; the two
/// criteria can pick different permutations. No gradient flows through it.
torch::Tensor immiscible_noise_assignment(const torch::Tensor& x_start, const torch::Tensor& noise);

}  // namespace diffuse::model
