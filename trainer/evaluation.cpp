// trainer/evaluation.cpp: see evaluation.h.
#include "trainer/evaluation.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "data/dataset.h"

namespace diffuse::trainer {

BoundSummary evaluate_bits_per_dim(model::GaussianDiffusionImpl& diffusion, dist::Communicator& comm,
                                   const BoundRequest& request) {
  const auto info = data::read_dataset_info(request.data);
  const int64_t size = diffusion.options().image_size, channels = diffusion.channels();
  if (info.height != size || info.width != size || info.channels != channels) {
    throw std::invalid_argument(request.data.string() + " holds " + std::to_string(info.height) + "x" +
                                std::to_string(info.width) + "x" + std::to_string(info.channels) +
                                " images; the model expects " + std::to_string(size) + " px, " +
                                std::to_string(channels) + " channels");
  }
  const int64_t n = std::min(request.n, info.count);
  const int64_t first = n * comm.rank() / comm.size(), last = n * (comm.rank() + 1) / comm.size();
  const auto device = diffusion.betas.device();
  auto generator = at::make_generator<at::CPUGeneratorImpl>(request.seed + static_cast<uint64_t>(comm.rank()));
  // Sums over images: total, prior, decoder, the L_{t-1} terms, and the square of the total.
  auto sums = torch::zeros({5}, torch::kFloat64);
  for (int64_t i = first; i < last; i += request.batch) {
    int64_t count = std::min(request.batch, last - i);
    auto images = data::read_images(request.data, i, count).permute({0, 3, 1, 2}).to(torch::kFloat32) / 127.5 - 1.0;
    torch::NoGradGuard no_grad;
    auto result = diffusion.vlb_bits_per_dim(images.to(device), generator);
    auto total = result.total_bpd.to(torch::kCPU, torch::kFloat64);
    auto vb = result.vb_bpd.to(torch::kCPU, torch::kFloat64);
    sums[0] += total.sum();
    sums[1] += result.prior_bpd.to(torch::kCPU, torch::kFloat64).sum();
    sums[2] += vb.select(1, 0).sum();
    sums[3] += vb.narrow(1, 1, vb.size(1) - 1).sum();
    sums[4] += total.pow(2).sum();
    if (request.on_progress) request.on_progress(std::min(count * comm.size(), n));
  }
  auto reduced = sums.to(comm.device());
  comm.all_reduce(reduced, dist::ReduceOp::kSum);
  auto v = reduced.cpu();
  BoundSummary summary;
  summary.images = n;
  summary.total = v[0].item<double>() / n;
  double variance = std::max(0.0, v[4].item<double>() / n - summary.total * summary.total);
  summary.standard_error = std::sqrt(variance / n);
  summary.prior = v[1].item<double>() / n;
  summary.decoder = v[2].item<double>() / n;
  summary.terms = v[3].item<double>() / n;
  return summary;
}

}  // namespace diffuse::trainer
