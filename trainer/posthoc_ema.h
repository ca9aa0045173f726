// trainer/posthoc_ema.h: post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training
// Dynamics of Diffusion Models", Algorithms 2 and 3) with ema-pytorch 0.8.3's semantics
// (ema_pytorch/post_hoc_ema.py). During training a PowerEma per sigma_rel (ema-pytorch's KarrasEMA)
// is updated every step and snapshotted every K steps; afterwards any other profile is synthesized
// as a least-squares combination of the snapshots, one snapshot in memory at a time.
//
//   PowerEma sharp(model->parameters(), sigma_rel_to_gamma(0.05)), wide(..., sigma_rel_to_gamma(0.28));
//   ... optimizer.step(); sharp.update(); wide.update(); every K steps: save both averages with their
//   PosthocSnapshot{step, gamma}
//   auto tensors = synthesize_posthoc_ema(snapshots, load_snapshot, /*sigma_rel*/ 0.1);
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::trainer {

/// The largest sigma_rel a power-function profile can have: sigma_rel(gamma) peaks at
/// gamma = (sqrt(5) - 3) / 2, where it is 0.30028...
double max_sigma_rel();

/// gamma of the power-function profile whose relative standard deviation is `sigma_rel`: the
/// largest real root of gamma^3 + 7 gamma^2 + (16 - t) gamma + (12 - t), t = sigma_rel^-2 (as
/// ema-pytorch's sigma_rel_to_gamma). Throws unless 0 < sigma_rel <= max_sigma_rel().
double sigma_rel_to_gamma(double sigma_rel);

/// The inverse: sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Throws unless gamma > -1.
double gamma_to_sigma_rel(double gamma);

/// ema-pytorch's KarrasEMA over a set of tensors: update() counts a step and, every `update_every`
/// steps, lerps the fp32 average toward the online tensors with
///   beta = (1 - 1 / (step + 1))^(1 + gamma)       (step counted after this update)
/// The first update that lerps copies the online tensors first.
class PowerEma {
 public:
  /// Tracks `parameters` (the online model's floating-point tensors, in a fixed order).
  PowerEma(std::vector<torch::Tensor> parameters, double gamma, int64_t update_every = 1);

  /// One call per optimizer step, after it.
  void update();

  /// The beta the lerp of the update that brought the count to `step` uses.
  double beta_at(int64_t step) const;

  double gamma() const { return gamma_; }
  int64_t step() const { return step_; }
  bool initialized() const { return initialized_; }
  /// The fp32 averages, in the order of the tracked tensors.
  const std::vector<torch::Tensor>& average() const { return average_; }

  /// Restores a saved state (step, whether initialized, the averages in tracked order); throws on a
  /// count or shape mismatch naming the tensor index.
  void load_state(int64_t step, bool initialized, const std::vector<torch::Tensor>& average);

 private:
  std::vector<torch::Tensor> online_;
  std::vector<torch::Tensor> average_;
  double gamma_;
  int64_t update_every_;
  int64_t step_ = 0;
  bool initialized_ = false;
};

/// One saved average: the PowerEma's step count when it was saved, and its gamma.
struct PosthocSnapshot {
  int64_t step = 0;
  double gamma = 0.0;
};

/// The weights that combine `snapshots` into the profile (target_gamma, target_step): ema-pytorch's
/// solve_weights, the float64 solve A w = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>.
/// Throws on no snapshots, a step < 1, a gamma <= -1, or a singular system (duplicate snapshots).
std::vector<double> solve_posthoc_weights(const std::vector<PosthocSnapshot>& snapshots, double target_gamma,
                                          int64_t target_step);

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;
/// Returns snapshot `index`'s named tensors (any floating dtype, e.g. bf16 on disk).
using SnapshotReader = std::function<NamedTensors(size_t index)>;

/// ema-pytorch's PostHocEMA.synthesize_ema_model(sigma_rel, step): solves the weights over all
/// snapshots (their gammas rounded to float32, as the reference's torch.tensor(gammas) does),
/// then accumulates sum_i w_i * snapshot_i in float32, reading one snapshot at a time through
/// `read`. target_step defaults to the last snapshot step and may not exceed it. Every snapshot must
/// have the first one's names, order and shapes; a mismatch throws naming the snapshot and tensor.
NamedTensors synthesize_posthoc_ema(const std::vector<PosthocSnapshot>& snapshots, const SnapshotReader& read,
                                    double target_sigma_rel, std::optional<int64_t> target_step = std::nullopt);

}  // namespace diffuse::trainer
