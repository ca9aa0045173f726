// trainer/timestep_sampler.h: which diffusion timesteps a batch trains on.
// Uniform, or guided-diffusion's loss-aware importance sampling (LossSecondMomentResampler):
// p(t) ∝ sqrt(E[L_t^2]) over the last 10 losses of each t, mixed with 0.1% uniform, once every t
// has 10 losses; the loss is reweighted by 1/(T p(t)) so its expectation is unchanged. The
// history is updated with the losses of ALL ranks (all-gathered, in rank order), so its state is
// identical everywhere and is checkpointed.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "trainer/config.h"

namespace diffuse::trainer {

class TimestepSampler {
 public:
  TimestepSampler(TimestepSamplerKind kind, int64_t timesteps, int64_t history_per_term = 10, double uniform_prob = 0.001);

  struct Draw {
    torch::Tensor t;        ///< [b] int64
    torch::Tensor weights;  ///< [b] float32 importance weights (ones for uniform)
  };
  /// Draws b timesteps with `generator` on `device`.
  Draw sample(int64_t batch, torch::Generator& generator, torch::Device device) const;

  /// Loss-aware only: feeds every rank's (t, loss) pairs, already gathered in rank order.
  void update(const torch::Tensor& all_t, const torch::Tensor& all_losses);
  bool needs_losses() const { return kind_ == TimestepSamplerKind::kLossAware; }
  bool warmed_up() const;
  /// Current sampling probabilities [T] (float64).
  torch::Tensor probabilities() const;

  std::vector<std::pair<std::string, torch::Tensor>> state() const;
  void load_state(const std::vector<std::pair<std::string, torch::Tensor>>& tensors);

 private:
  TimestepSamplerKind kind_;
  int64_t timesteps_;
  int64_t history_per_term_;
  double uniform_prob_;
  torch::Tensor loss_history_;  ///< [T, history] float64
  torch::Tensor loss_counts_;   ///< [T] int64
};

}  // namespace diffuse::trainer
