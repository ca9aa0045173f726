// trainer/sampling.cpp: see sampling.h.
#include "trainer/sampling.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "model/state_dict.h"
#include "trainer/checkpoint.h"
#include "trainer/model_factory.h"
#include "trainer/posthoc_training.h"
#include "trainer/training_state.h"

namespace diffuse::trainer {

LoadedModel load_model(const std::filesystem::path& checkpoint_path, const std::string& which, torch::Device device,
                       const std::function<void(int64_t, int64_t)>& on_progress) {
  auto checkpoint = read_checkpoint_single_process(checkpoint_path, on_progress);
  LoadedModel loaded;
  loaded.config = Config::from_yaml(checkpoint.config_yaml, "checkpoint");
  loaded.step = checkpoint.step;
  loaded.warnings = checkpoint.warnings;
  loaded.diffusion = build_model(loaded.config);
  std::vector<std::string> names;
  for (const auto& item : loaded.diffusion.denoiser()->named_parameters()) names.push_back(item.key());
  if (which.rfind(kPosthocWeights, 0) == 0) {
    const double sigma_rel = parse_posthoc_sigma_rel(which.substr(std::string(kPosthocWeights).size()));
    // The snapshots of the checkpoint's own history: those written up to its step.
    model::load_state_dict(*loaded.diffusion.denoiser(),
                           synthesize_posthoc_weights(run_of_checkpoint(checkpoint.directory), checkpoint.step,
                                                      sigma_rel));
    loaded.weights = "posthoc." + sigma_rel_text(sigma_rel);
  } else {
    auto weights = model_weights(checkpoint, loaded.config, which, names);
    loaded.weights = weights.label;
    model::load_state_dict(*loaded.diffusion.denoiser(), weights.tensors);
  }
  loaded.diffusion.module().to(device);
  loaded.diffusion.module().eval();
  return loaded;
}

double parse_posthoc_sigma_rel(const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (text.empty() || used != text.size() || !(value > 0 && value <= max_sigma_rel())) {
    throw std::invalid_argument("post-hoc EMA sigma_rel '" + text + "': expected a relative width in (0, " +
                                std::to_string(max_sigma_rel()) + "], e.g. 0.1");
  }
  return value;
}

torch::Tensor class_rows(const std::vector<int64_t>& classes, int64_t per_class) {
  std::vector<int64_t> labels;
  for (auto label : classes) labels.insert(labels.end(), static_cast<size_t>(per_class), label);
  return torch::tensor(labels, torch::kInt64);
}

namespace {

int64_t parse_class(const std::string& text, int64_t num_classes, const std::string& where) {
  size_t used = 0;
  int64_t value = -1;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (text.empty() || used != text.size()) {
    throw std::invalid_argument(where + ": '" + text + "' is not a class number (expected integers in [0, " +
                                std::to_string(num_classes) + "))");
  }
  if (value < 0 || value >= num_classes) {
    throw std::invalid_argument(where + ": class " + text + " is outside [0, " + std::to_string(num_classes) +
                                ") of this model (model.num_classes=" + std::to_string(num_classes) + ")");
  }
  return value;
}

}  // namespace

std::vector<int64_t> parse_class_list(const std::string& spec, int64_t num_classes) {
  std::vector<int64_t> classes;
  if (spec == "all") {
    for (int64_t k = 0; k < num_classes; ++k) classes.push_back(k);
    return classes;
  }
  std::stringstream in(spec);
  for (std::string item; std::getline(in, item, ',');) {
    classes.push_back(parse_class(item, num_classes, "--classes " + spec));
  }
  if (classes.empty()) throw std::invalid_argument("--classes: give 'all' or a list such as 0,3,7");
  return classes;
}

std::vector<int64_t> read_class_file(const std::filesystem::path& path, int64_t num_classes) {
  std::ifstream in(path);
  if (!in) throw std::invalid_argument("--classes-file " + path.string() + ": cannot read it");
  std::stringstream text;
  text << in.rdbuf();
  std::string all = text.str();
  std::replace(all.begin(), all.end(), ',', ' ');
  std::stringstream words(all);
  std::vector<int64_t> classes;
  for (std::string word; words >> word;) {
    classes.push_back(parse_class(word, num_classes,
                                  "--classes-file " + path.string() + " entry " + std::to_string(classes.size() + 1)));
  }
  if (classes.empty()) {
    throw std::invalid_argument("--classes-file " + path.string() + " holds no classes (one integer per image)");
  }
  return classes;
}

namespace {

void check_classes(const DiffusionModel& diffusion, const SampleRequest& request) {
  if (!diffusion.conditional()) {
    if (request.classes.defined()) {
      throw std::invalid_argument("classes given, but the model is unconditional (model.num_classes=0): sample "
                                  "without classes");
    }
    return;
  }
  const int64_t k = diffusion.num_classes();
  if (!request.classes.defined()) {
    throw std::invalid_argument("the model is class-conditional (" + std::to_string(k) +
                                " classes): give the classes to sample (e.g. --classes all)");
  }
  if (request.classes.dim() != 1 || request.classes.size(0) != request.n) {
    throw std::invalid_argument("classes: expected one per image (" + std::to_string(request.n) + "), got " +
                                std::to_string(request.classes.numel()));
  }
  auto labels = request.classes.to(torch::kCPU, torch::kInt64).contiguous();
  for (int64_t i = 0; i < labels.numel(); ++i) {
    const int64_t label = labels.data_ptr<int64_t>()[i];
    if (label < 0 || label >= k) {
      throw std::invalid_argument("class " + std::to_string(label) + " (image " + std::to_string(i) +
                                  ") is outside [0, " + std::to_string(k) + ") of this model");
    }
  }
}

}  // namespace

torch::Tensor sample_images(DiffusionModel& diffusion, dist::Communicator& comm, const SampleRequest& request) {
  check_classes(diffusion, request);
  // Before any work: a sampler of the other formulation is refused on every rank alike.
  diffusion.sampler_name(request.options.sampler);
  if (request.n < 1 || request.batch < 1) {
    throw std::invalid_argument("sample_images: n and batch must be positive, got n=" + std::to_string(request.n) +
                                " batch=" + std::to_string(request.batch));
  }
  const int64_t c = diffusion.channels(), s = diffusion.image_size();
  const int64_t world = comm.size(), rank = comm.rank();
  // Image i is always made in chunk i / batch with the same companions, whatever the number of
  // ranks: a convolution's rounding can depend on its batch, and the samples must not depend on
  // the world size. Ranks take consecutive runs of chunks, so the gathered chunks are in order.
  const int64_t chunks = (request.n + request.batch - 1) / request.batch;
  const int64_t chunks_per_rank = (chunks + world - 1) / world;
  auto noise_generator = at::make_generator<at::CPUGeneratorImpl>(request.seed);
  auto all_noise = torch::randn({request.n, c, s, s}, noise_generator);
  const auto device = diffusion.device();
  auto local = torch::zeros({chunks_per_rank * request.batch, c, s, s}, torch::TensorOptions(device));
  const int64_t first_chunk = chunks_per_rank * rank;
  const int64_t last_chunk = std::min(chunks, first_chunk + chunks_per_rank);
  for (int64_t chunk = first_chunk; chunk < last_chunk; ++chunk) {
    const int64_t global_first = chunk * request.batch;
    const int64_t count = std::min(request.batch, request.n - global_first);
    auto generator = at::make_generator<at::CPUGeneratorImpl>(request.seed * 1000003ULL +
                                                               static_cast<uint64_t>(global_first) + 1);
    torch::NoGradGuard no_grad;
    torch::Tensor classes;
    if (request.classes.defined()) {
      classes = request.classes.to(torch::kInt64).cpu().narrow(0, global_first, count).to(device);
    }
    auto images =
        diffusion.sample_from(all_noise.narrow(0, global_first, count).to(device), request.options, generator, classes);
    local.narrow(0, (chunk - first_chunk) * request.batch, count).copy_(images.clamp(0, 1));
    if (request.on_progress) request.on_progress(std::min(count * world, request.n));
  }
  return comm.all_gather(local.to(comm.device())).reshape({-1, c, s, s}).narrow(0, 0, request.n).cpu();
}

}  // namespace diffuse::trainer
