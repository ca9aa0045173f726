// trainer/sampling.cpp: see sampling.h.
#include "trainer/sampling.h"

#include <ATen/CPUGeneratorImpl.h>

#include "model/state_dict.h"
#include "trainer/checkpoint.h"
#include "trainer/model_factory.h"
#include "trainer/training_state.h"

namespace diffuse::trainer {

LoadedModel load_model(const std::filesystem::path& checkpoint_path, const std::string& which, torch::Device device,
                       const std::function<void(int64_t, int64_t)>& on_progress) {
  auto checkpoint = read_checkpoint_single_process(checkpoint_path, on_progress);
  LoadedModel loaded;
  loaded.config = Config::from_yaml(checkpoint.config_yaml, "checkpoint");
  loaded.step = checkpoint.step;
  loaded.warnings = checkpoint.warnings;
  loaded.diffusion = build_diffusion(loaded.config);
  std::vector<std::string> names;
  for (const auto& item : loaded.diffusion->model->named_parameters()) names.push_back(item.key());
  auto weights = model_weights(checkpoint, loaded.config, which, names);
  loaded.weights = weights.label;
  model::load_state_dict(*loaded.diffusion->model, weights.tensors);
  loaded.diffusion->to(device);
  loaded.diffusion->eval();
  return loaded;
}

torch::Tensor sample_images(model::GaussianDiffusionImpl& diffusion, dist::Communicator& comm,
                            const SampleRequest& request) {
  const int64_t c = diffusion.channels(), s = diffusion.options().image_size;
  const int64_t world = comm.size(), rank = comm.rank();
  const int64_t per_rank = (request.n + world - 1) / world;
  auto noise_generator = at::make_generator<at::CPUGeneratorImpl>(request.seed);
  auto all_noise = torch::randn({per_rank * world, c, s, s}, noise_generator);
  auto mine = all_noise.narrow(0, per_rank * rank, per_rank);
  const auto device = diffusion.betas.device();
  std::vector<torch::Tensor> chunks;
  for (int64_t first = 0; first < per_rank; first += request.batch) {
    int64_t count = std::min(request.batch, per_rank - first);
    const int64_t global_first = per_rank * rank + first;
    auto generator = at::make_generator<at::CPUGeneratorImpl>(request.seed * 1000003ULL +
                                                               static_cast<uint64_t>(global_first) + 1);
    torch::NoGradGuard no_grad;
    auto images = diffusion.sample_from(mine.narrow(0, first, count).to(device), request.options, generator);
    chunks.push_back(images.clamp(0, 1).contiguous());
    if (request.on_progress) request.on_progress(std::min(count * world, request.n));
  }
  auto local = torch::cat(chunks).to(comm.device());
  return comm.all_gather(local).reshape({-1, c, s, s}).narrow(0, 0, request.n).cpu();
}

}  // namespace diffuse::trainer
