// trainer/preflight.cpp: see preflight.h.
#include "trainer/preflight.h"

#include <fmt/format.h>

#include "data/dataset_identity.h"
#include "model/unet.h"
#include "trainer/memory.h"
#include "trainer/model_factory.h"

namespace diffuse::trainer {

void check_same_dataset(const dist::Context& ctx, const std::string& path) {
  std::string mine, summary, error;
  try {
    auto identity = data::dataset_identity(path);
    mine = identity.digest;
    summary = identity.summary();
  } catch (const std::exception& e) {
    error = e.what();
  }
  // A rank that cannot read the file fails on its own below, in the loader, with the file's error.
  const std::string reference = ctx.broadcast_string(mine, 0);
  const std::string reference_summary = ctx.broadcast_string(summary, 0);
  const bool differs = error.empty() && !reference.empty() && mine != reference;
  auto reports = ctx.gather_strings(differs ? "rank " + std::to_string(ctx.rank()) + " has " + summary : "");
  std::string message;
  if (ctx.is_root()) {
    for (const auto& report : reports) {
      if (!report.empty()) message += (message.empty() ? "" : "; ") + report;
    }
  }
  message = ctx.broadcast_string(message, 0);
  if (!message.empty()) {
    throw std::runtime_error("the ranks read different datasets at data.path=" + path + ": rank 0 has " +
                             reference_summary + "; " + message +
                             " (node-local copies that differ? copy the same file to every node)");
  }
}

void check_training_memory(const dist::Context& ctx, const Config& config, torch::Device device) {
  const auto& t = config.train;
  const double bytes_per_value = t.precision == Precision::kFp32 ? 4.0 : 2.0;
  const int64_t per_image = config.model.type == ModelType::kKarrasUnet
                               ? model::karras_unet_activation_elements(karras_unet_options(config))
                               : model::unet_activation_elements(unet_options(config.model), config.data.image_size);
  const double activations = static_cast<double>(per_image) * bytes_per_value * static_cast<double>(t.batch_size);
  const double pixels = static_cast<double>(config.data.image_size * config.data.image_size * config.model.channels);
  const double batches = (t.batch_size * pixels) * (1.0 + 4.0) * static_cast<double>(config.data.prefetch + 1);
  require_memory(fmt::format("train.batch_size={} at {}x{} (activations for the backward pass and the loader's "
                             "prefetched batches)",
                             t.batch_size, config.data.image_size, config.data.image_size),
                 activations + batches, device.is_cuda() ? 1 : ctx.local_world_size(), device,
                 "lower train.batch_size and raise train.accumulate to keep the global batch");
}

}  // namespace diffuse::trainer
