// trainer/loss_tracker.h: the training loss between two log steps, overall and by timestep quartile
// (q0: the least noisy quarter), and the last gradient norm. Sums stay on the device, so steps
// that do not log never wait for it; summarize() is the one host sync of a logging step.
#pragma once

#include <torch/torch.h>

#include <cstdint>

#include "dist/communicator.h"

namespace diffuse::trainer {

class LossTracker {
 public:
  LossTracker(int64_t timesteps, torch::Device device);

  /// Per-sample losses [b] of timesteps t [b].
  void add(const torch::Tensor& losses, const torch::Tensor& t);
  /// The gradient norm of the step (a 0-dim tensor on the device).
  void set_grad_norm(const torch::Tensor& norm);

  struct Summary {
    double loss = NAN;                        ///< mean over every rank's samples since the last summary
    double quartile[4] = {NAN, NAN, NAN, NAN};  ///< the same by timestep quartile (NaN: no sample)
    double grad_norm = NAN;                   ///< mean over ranks of the last step's norm
  };
  /// Reduces every rank's sums over `comm` (collective), returns them and starts a new interval.
  Summary summarize(dist::Communicator& comm);

 private:
  double quartile_width_;
  torch::Tensor sums_;  ///< [loss_sum, quartile sums x4, quartile counts x4, grad norm] float32
};

}  // namespace diffuse::trainer
