// trainer/nonfinite_guard.cpp: see nonfinite_guard.h.
#include "trainer/nonfinite_guard.h"

namespace diffuse::trainer {

NonfiniteGuard::NonfiniteGuard(torch::Device device)
    : loss_bad_(torch::zeros({}, torch::TensorOptions().dtype(torch::kBool).device(device))),
      counters_(torch::tensor({int64_t{0}, int64_t{0}, int64_t{-1}, int64_t{0}, int64_t{-1}},
                              torch::TensorOptions().dtype(torch::kInt64)).to(device)) {}

void NonfiniteGuard::add_losses(const torch::Tensor& losses) {
  loss_bad_.logical_or_(torch::logical_not(torch::isfinite(losses.detach().sum())));
}

torch::Tensor NonfiniteGuard::end_step(const torch::Tensor& per_parameter_grad_norms, int64_t step) {
  torch::NoGradGuard no_grad;
  auto parameter_bad = torch::logical_not(torch::isfinite(per_parameter_grad_norms));
  auto bad = loss_bad_.logical_or(parameter_bad.any());
  auto bad_i = bad.to(torch::kInt64);
  auto first_now = bad.logical_and(counters_[2] < 0);
  auto first_parameter = torch::where(parameter_bad.any(), parameter_bad.to(torch::kInt64).argmax(),
                                      torch::full({}, -1, counters_.options()));
  auto updated = torch::stack({
      counters_[0] + bad_i,
      torch::where(bad, counters_[1] + 1, torch::zeros_like(counters_[1])),
      torch::where(first_now, torch::full({}, step, counters_.options()), counters_[2]),
      torch::where(first_now, loss_bad_.to(torch::kInt64), counters_[3]),
      torch::where(first_now, first_parameter, counters_[4]),
  });
  counters_.copy_(updated);
  loss_bad_.zero_();
  return bad.to(torch::kFloat32).reshape({1});
}

NonfiniteGuard::Report NonfiniteGuard::read() const {
  auto host = counters_.cpu();
  const int64_t* v = host.data_ptr<int64_t>();
  return {.bad_steps = v[0], .consecutive = v[1], .first_step = v[2], .first_was_loss = v[3] != 0,
          .first_parameter = v[4]};
}

}  // namespace diffuse::trainer
