// trainer/loss_tracker.cpp: see loss_tracker.h.
#include "trainer/loss_tracker.h"

namespace diffuse::trainer {

LossTracker::LossTracker(int64_t timesteps, torch::Device device)
    : quartile_width_(static_cast<double>(timesteps) / 4.0),
      sums_(torch::zeros({10}, torch::TensorOptions().dtype(torch::kFloat32).device(device))) {}

void LossTracker::add(const torch::Tensor& losses, const torch::Tensor& t) {
  auto detached = losses.detach().to(torch::kFloat32);
  sums_.narrow(0, 0, 1) += detached.sum();
  auto quartile = (t.to(torch::kFloat64) / quartile_width_).floor().clamp(0, 3).to(torch::kInt64);
  sums_.narrow(0, 1, 4).index_add_(0, quartile, detached);
  sums_.narrow(0, 5, 4).index_add_(0, quartile, torch::ones_like(detached));
}

void LossTracker::set_grad_norm(const torch::Tensor& norm) { sums_.narrow(0, 9, 1).copy_(norm.reshape({1})); }

LossTracker::Summary LossTracker::summarize(dist::Communicator& comm) {
  auto packed = sums_.clone();
  comm.all_reduce(packed, dist::ReduceOp::kSum);
  auto host = packed.cpu();
  const float* v = host.data_ptr<float>();
  Summary summary;
  double count = v[5] + v[6] + v[7] + v[8];
  summary.loss = count > 0 ? v[0] / count : NAN;
  for (int q = 0; q < 4; ++q) summary.quartile[q] = v[5 + q] > 0 ? v[1 + q] / v[5 + q] : NAN;
  summary.grad_norm = v[9] / comm.size();
  sums_.zero_();
  return summary;
}

}  // namespace diffuse::trainer
