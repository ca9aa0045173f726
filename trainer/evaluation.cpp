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
  const int64_t k = diffusion.num_classes();
  torch::Tensor labels;  // [n] int64, conditional models only
  if (!diffusion.conditional()) {
    if (request.fixed_class) {
      throw std::invalid_argument("--classes given, but the model is unconditional (model.num_classes=0)");
    }
  } else if (request.fixed_class) {
    if (*request.fixed_class < 0 || *request.fixed_class >= k) {
      throw std::invalid_argument("class " + std::to_string(*request.fixed_class) + " is outside [0, " +
                                  std::to_string(k) + ") of this model");
    }
    labels = torch::full({n}, *request.fixed_class, torch::kInt64);
  } else {
    if (!info.has_labels) {
      throw std::invalid_argument(request.data.string() + " has no labels, and the model is class-conditional (" +
                                  std::to_string(k) + " classes): give --classes K to condition every image on class K");
    }
    labels = data::read_labels(request.data).narrow(0, 0, n).contiguous();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t label = labels.data_ptr<int64_t>()[i];
      if (label < 0 || label >= k) {
        throw std::invalid_argument(request.data.string() + ": image " + std::to_string(i) + " has label " +
                                    std::to_string(label) + ", outside [0, " + std::to_string(k) +
                                    ") of this model");
      }
    }
  }
  const int64_t first = n * comm.rank() / comm.size(), last = n * (comm.rank() + 1) / comm.size();
  const auto device = diffusion.betas.device();
  auto generator = at::make_generator<at::CPUGeneratorImpl>(request.seed + static_cast<uint64_t>(comm.rank()));
  // Sums over images: total, prior, decoder, the L_{t-1} terms, and the square of the total.
  auto sums = torch::zeros({5}, torch::kFloat64);
  for (int64_t i = first; i < last; i += request.batch) {
    int64_t count = std::min(request.batch, last - i);
    auto images = data::read_images(request.data, i, count).permute({0, 3, 1, 2}).to(torch::kFloat32) / 127.5 - 1.0;
    torch::NoGradGuard no_grad;
    model::ClassCondition condition;
    if (labels.defined()) condition = {labels.narrow(0, i, count).to(device), /*cond_scale=*/1.0, /*rescaled_phi=*/0.0};
    auto result = diffusion.vlb_bits_per_dim(images.to(device), generator, /*clip_denoised=*/true, condition);
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
