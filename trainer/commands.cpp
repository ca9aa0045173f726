// The subcommands: their options, and the glue from a checkpoint to sampling, export and
// likelihood evaluation. Training itself lives in trainer.cpp.
#include "trainer/commands.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <iostream>
#include <memory>

#include "data/dataset.h"
#include "data/hdf5_tensors.h"
#include "data/image_io.h"
#include "dist/communicator.h"
#include "model/safetensors.h"
#include "model/state_dict.h"
#include "trainer/checkpoint.h"
#include "trainer/doctor.h"
#include "trainer/logging.h"
#include "trainer/trainer.h"

namespace diffuse::trainer {
namespace {

/// Which weights of a checkpoint to use: an EMA rate ("0.9999"), "ema" (the first rate), or "online".
struct LoadedModel {
  Config config;
  model::GaussianDiffusion diffusion{nullptr};
  int64_t step = 0;
  std::string weights;
};

LoadedModel load_model(const std::filesystem::path& ckpt, const std::string& which, torch::Device device) {
  auto checkpoint = read_checkpoint_single_process(ckpt);
  LoadedModel loaded;
  loaded.config = Config::from_yaml(checkpoint.config_yaml, "checkpoint");
  loaded.step = checkpoint.step;
  loaded.diffusion = build_diffusion(loaded.config);
  std::string prefix;
  if (which == "online") {
    prefix = "model.";
  } else {
    const auto& decays = loaded.config.ema.decay;
    std::string rate = which == "ema" ? "" : which;
    for (double decay : decays) {
      std::ostringstream key;
      key << "ema." << decay << ".";
      std::ostringstream as_text;
      as_text << decay;
      if (rate.empty() || rate == as_text.str() || std::abs(std::atof(rate.c_str()) - decay) < 1e-12) {
        prefix = key.str();
        break;
      }
    }
    if (prefix.empty()) {
      std::string available;
      for (double decay : decays) available += (available.empty() ? "" : ", ") + std::to_string(decay);
      throw std::invalid_argument("--weights " + which + ": the checkpoint keeps EMA rates " + available +
                                  " (or use 'online')");
    }
  }
  loaded.weights = prefix.substr(0, prefix.size() - 1);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::map<std::string, torch::Tensor> by_name(checkpoint.replicated.begin(), checkpoint.replicated.end());
  for (const auto& item : loaded.diffusion->model->named_parameters()) {
    auto it = by_name.find(prefix + item.key());
    if (it == by_name.end()) throw std::runtime_error(ckpt.string() + " has no tensor '" + prefix + item.key() + "'");
    tensors.emplace_back(item.key(), it->second);
  }
  model::load_state_dict(*loaded.diffusion->model, tensors);
  loaded.diffusion->to(device);
  loaded.diffusion->eval();
  return loaded;
}

torch::Device command_device(const dist::Context& ctx, const std::string& device) {
  bool want_cuda = device == "cuda" || (device == "auto" && torch::cuda::is_available());
  return dist::select_device(ctx, want_cuda);
}

std::unique_ptr<dist::Communicator> command_communicator(const dist::Context& ctx, torch::Device device) {
  return device.is_cuda() ? dist::make_nccl_communicator(ctx, device) : dist::make_mpi_communicator(ctx);
}

struct SampleArgs {
  std::string ckpt, sampler = "ddim", out, out_dir, out_h5, weights = "ema", device = "auto";
  int64_t n = 64, steps = 50, seed = 0, batch = 16;
  double eta = 0.0;
};

int run_sample(const dist::Context& ctx, const SampleArgs& args) {
  if (args.out.empty() && args.out_dir.empty() && args.out_h5.empty()) {
    throw std::invalid_argument("diffuse sample: give --out grid.png, --out-dir DIR or --out-h5 FILE");
  }
  auto device = command_device(ctx, args.device);
  auto loaded = load_model(args.ckpt, args.weights, device);
  auto comm = command_communicator(ctx, device);
  int64_t c = loaded.config.model.channels, s = loaded.config.data.image_size;
  // The initial noise of all n images comes from one seeded CPU stream, so the images do not
  // depend on how many ranks share the work.
  int64_t per_rank = (args.n + ctx.world_size() - 1) / ctx.world_size();
  auto noise_generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(args.seed));
  auto all_noise = torch::randn({per_rank * ctx.world_size(), c, s, s}, noise_generator);
  auto mine = all_noise.narrow(0, per_rank * ctx.rank(), per_rank);
  model::SampleOptions options{.sampler = args.sampler, .steps = args.steps, .eta = args.eta};
  std::vector<torch::Tensor> chunks;
  for (int64_t first = 0; first < per_rank; first += args.batch) {
    int64_t count = std::min(args.batch, per_rank - first);
    // Each chunk's sampler noise is keyed by its first image's global index: reproducible for any W.
    int64_t global_first = per_rank * ctx.rank() + first;
    auto generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(args.seed) * 1000003ULL +
                                                               static_cast<uint64_t>(global_first) + 1);
    torch::NoGradGuard no_grad;
    auto images = loaded.diffusion->sample_from(mine.narrow(0, first, count).to(device), options, generator);
    chunks.push_back(images.clamp(0, 1).contiguous());
  }
  auto local = torch::cat(chunks);
  auto all = comm->all_gather(local).reshape({-1, c, s, s}).narrow(0, 0, args.n).cpu();
  if (ctx.is_root()) {
    if (!args.out.empty()) {
      data::save_image_grid(args.out, all, static_cast<int64_t>(std::ceil(std::sqrt(args.n))));
      std::cout << "wrote " << args.out << " (" << args.n << " images, " << loaded.weights << " weights, step "
                << loaded.step << ")\n";
    }
    auto hwc = (all * 255).round().clamp(0, 255).to(torch::kUInt8).permute({0, 2, 3, 1}).contiguous();
    if (!args.out_dir.empty()) {
      std::filesystem::create_directories(args.out_dir);
      for (int64_t i = 0; i < args.n; ++i) {
        data::save_png(std::filesystem::path(args.out_dir) / fmt::format("sample-{:06d}.png", i), hwc[i]);
      }
      std::cout << "wrote " << args.n << " PNGs to " << args.out_dir << "\n";
    }
    if (!args.out_h5.empty()) {
      data::write_hdf5_tensors(args.out_h5, {{"images", hwc}},
                               {{"step", std::to_string(loaded.step)}, {"weights", loaded.weights},
                                {"sampler", args.sampler}, {"steps", std::to_string(args.steps)}});
      std::cout << "wrote " << args.out_h5 << " (images: uint8 [" << args.n << ", " << s << ", " << s << ", " << c
                << "])\n";
    }
  }
  return 0;
}

int run_export(const std::string& ckpt, const std::string& out, const std::string& weights) {
  auto loaded = load_model(ckpt, weights, torch::kCPU);
  std::map<std::string, std::string> metadata{
      {"format", "diffuse"},
      {"unet_options", unet_options(loaded.config.model).to_json()},
      {"diffusion_options", diffusion_options(loaded.config).to_json()},
      {"step", std::to_string(loaded.step)},
      {"weights", loaded.weights},
  };
  model::save_safetensors(out, model::state_dict(*loaded.diffusion->model), metadata);
  std::cout << "wrote " << out << " (U-Net state dict, " << loaded.weights << " weights, step " << loaded.step
            << "); in Python: Unet(...).load_state_dict(safetensors.torch.load_file('" << out << "'))\n";
  return 0;
}

struct EvalArgs {
  std::string ckpt, data, weights = "ema", device = "auto";
  int64_t n = 1000, batch = 16, seed = 0;
};

int run_eval(const dist::Context& ctx, const EvalArgs& args) {
  auto device = command_device(ctx, args.device);
  auto loaded = load_model(args.ckpt, args.weights, device);
  auto comm = command_communicator(ctx, device);
  auto info = data::read_dataset_info(args.data);
  if (info.height != loaded.config.data.image_size || info.channels != loaded.config.model.channels) {
    throw std::invalid_argument(args.data + " holds " + std::to_string(info.height) + "x" + std::to_string(info.width) +
                                "x" + std::to_string(info.channels) + " images; the model expects " +
                                std::to_string(loaded.config.data.image_size) + " px, " +
                                std::to_string(loaded.config.model.channels) + " channels");
  }
  int64_t n = std::min(args.n, info.count);
  int64_t first = n * ctx.rank() / ctx.world_size(), last = n * (ctx.rank() + 1) / ctx.world_size();
  auto generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(args.seed) + ctx.rank());
  // Sums over images: total, prior, decoder, the L_{t-1} terms, and the square of the total.
  auto sums = torch::zeros({5}, torch::kFloat64);
  for (int64_t i = first; i < last; i += args.batch) {
    int64_t count = std::min(args.batch, last - i);
    auto images = data::read_images(args.data, i, count).permute({0, 3, 1, 2}).to(torch::kFloat32) / 127.5 - 1.0;
    torch::NoGradGuard no_grad;
    auto result = loaded.diffusion->vlb_bits_per_dim(images.to(device), generator);
    auto total = result.total_bpd.to(torch::kCPU, torch::kFloat64);
    auto vb = result.vb_bpd.to(torch::kCPU, torch::kFloat64);
    sums[0] += total.sum();
    sums[1] += result.prior_bpd.to(torch::kCPU, torch::kFloat64).sum();
    sums[2] += vb.select(1, 0).sum();
    sums[3] += vb.narrow(1, 1, vb.size(1) - 1).sum();
    sums[4] += total.pow(2).sum();
  }
  auto reduced = sums.to(device);
  comm->all_reduce(reduced, dist::ReduceOp::kSum);
  auto v = reduced.cpu();
  double mean = v[0].item<double>() / n;
  double variance = std::max(0.0, v[4].item<double>() / n - mean * mean);
  if (ctx.is_root()) {
    std::cout << fmt::format(
        "variational bound on {} images of {} ({} weights, step {}):\n"
        "  total      {:.4f} bits/dim  (± {:.4f} standard error)\n"
        "  prior L_T  {:.6f}\n  decoder L_0 {:.4f}\n  sum L_t-1  {:.4f}\n",
        n, args.data, loaded.weights, loaded.step, mean, std::sqrt(variance / n), v[1].item<double>() / n,
        v[2].item<double>() / n, v[3].item<double>() / n);
  }
  return 0;
}

}  // namespace

void add_doctor_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand(
      "doctor", "Report this environment per rank (versions, GPUs, MPI, HDF5) and check it is usable");
  auto device = std::make_shared<std::string>("auto");
  cmd->add_option("--device", *device, "Which run to check for: auto (CUDA when a GPU is visible), cpu, cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->callback([&action, device] {
    action = [device](const dist::Context& ctx) { return run_doctor(ctx, parse_device_request(*device)); };
  });
}

void add_train_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand("train", "Train a diffusion model (launch under mpirun/srun for several ranks)");
  struct Args {
    std::string config, run_dir, resume;
    std::vector<std::string> overrides;
    bool dry_run = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--config,-c", args->config, "YAML configuration (see configs/)")->required();
  cmd->add_option("--set", args->overrides, "Override a key: --set section.key=value (repeatable)");
  cmd->add_option("--run-dir", args->run_dir, "Run directory (default: runs/<config name>)");
  cmd->add_option("--resume", args->resume, "Resume from 'latest' or a checkpoint directory");
  cmd->add_flag("--dry-run", args->dry_run, "Validate config and data, print sizes and the global batch, exit");
  cmd->callback([&action, args] {
    action = [args](const dist::Context& ctx) {
      auto config = Config::from_yaml_file(args->config);
      for (const auto& assignment : args->overrides) config.apply_override(assignment);
      config.validate();
      Trainer trainer(ctx, config,
                      RunOptions{.run_dir = args->run_dir, .resume = args->resume, .dry_run = args->dry_run});
      return trainer.run();
    };
  });
}

void add_sample_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand("sample", "Sample images from a checkpoint (ranks split the images)");
  auto args = std::make_shared<SampleArgs>();
  cmd->add_option("--ckpt", args->ckpt, "Checkpoint directory, RUN/checkpoints/latest or RUN")->required();
  cmd->add_option("--n", args->n, "Number of images")->check(CLI::PositiveNumber);
  cmd->add_option("--sampler", args->sampler, "ddim or ddpm")->check(CLI::IsMember({"ddim", "ddpm"}));
  cmd->add_option("--steps", args->steps, "DDIM steps (ddpm uses every timestep)")->check(CLI::PositiveNumber);
  cmd->add_option("--eta", args->eta, "DDIM eta (0: deterministic given the noise)");
  cmd->add_option("--seed", args->seed, "Seed of the initial noise");
  cmd->add_option("--batch", args->batch, "Images per forward pass")->check(CLI::PositiveNumber);
  cmd->add_option("--weights", args->weights, "ema (first rate), an EMA rate like 0.9999, or online");
  cmd->add_option("--device", args->device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_option("--out", args->out, "Write one grid PNG");
  cmd->add_option("--out-dir", args->out_dir, "Write one PNG per image into this folder");
  cmd->add_option("--out-h5", args->out_h5, "Write an HDF5 file with images uint8 [N,H,W,C]");
  cmd->callback([&action, args] { action = [args](const dist::Context& ctx) { return run_sample(ctx, *args); }; });
}

void add_export_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand("export", "Export U-Net weights as safetensors, loadable by denoising-diffusion-pytorch");
  auto ckpt = std::make_shared<std::string>(), out = std::make_shared<std::string>(),
       weights = std::make_shared<std::string>("ema");
  cmd->add_option("--ckpt", *ckpt, "Checkpoint directory, RUN/checkpoints/latest or RUN")->required();
  cmd->add_option("--out", *out, "Output .safetensors file")->required();
  cmd->add_option("--weights", *weights, "ema (first rate), an EMA rate like 0.9999, or online");
  cmd->callback([&action, ckpt, out, weights] {
    action = [ckpt, out, weights](const dist::Context& ctx) {
      return ctx.is_root() ? run_export(*ckpt, *out, *weights) : 0;
    };
  });
}

void add_eval_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand("eval", "Variational bound in bits/dim on held-out images");
  auto args = std::make_shared<EvalArgs>();
  cmd->add_option("--ckpt", args->ckpt, "Checkpoint directory, RUN/checkpoints/latest or RUN")->required();
  cmd->add_option("--data", args->data, "HDF5 dataset (diffuse prep) of held-out images")->required();
  cmd->add_option("--n", args->n, "Number of images")->check(CLI::PositiveNumber);
  cmd->add_option("--batch", args->batch, "Images per forward pass")->check(CLI::PositiveNumber);
  cmd->add_option("--seed", args->seed, "Seed of the noise of the bound's terms");
  cmd->add_option("--weights", args->weights, "ema (first rate), an EMA rate like 0.9999, or online");
  cmd->add_option("--device", args->device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->callback([&action, args] { action = [args](const dist::Context& ctx) { return run_eval(ctx, *args); }; });
}

void add_inspect_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand("inspect", "Summarise a dataset file or a checkpoint directory");
  auto path = std::make_shared<std::string>(), grid = std::make_shared<std::string>();
  auto k = std::make_shared<int64_t>(64);
  auto no_verify = std::make_shared<bool>(false);
  cmd->add_option("path", *path, "FILE.h5 (dataset) or a checkpoint directory")->required();
  cmd->add_option("--grid", *grid, "Dataset: write a PNG grid of the first k images");
  cmd->add_option("--k", *k, "Dataset: images in the grid")->check(CLI::PositiveNumber);
  cmd->add_flag("--no-verify", *no_verify, "Checkpoint: skip the SHA-256 check of the shards");
  cmd->callback([&action, path, grid, k, no_verify] {
    action = [path, grid, k, no_verify](const dist::Context& ctx) {
      if (!ctx.is_root()) return 0;
      if (std::filesystem::is_directory(*path)) {
        auto summary = describe_checkpoint(*path, !*no_verify);
        std::cout << summary.text;
        return summary.ok ? 0 : 1;
      }
      std::optional<std::filesystem::path> grid_path;
      if (!grid->empty()) grid_path = *grid;
      return inspect_dataset_command(*path, grid_path, *k);
    };
  });
}

}  // namespace diffuse::trainer
