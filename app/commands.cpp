// app/commands.cpp: the subcommands' options and what each prints. The work is done by the
// trainer library (trainer/trainer.h, sampling.h, evaluation.h, checkpoint_inspect.h).
#include "app/commands.h"

#include <cmath>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>

#include "app/test_hooks.h"
#include "data/dataset_identity.h"
#include "data/hdf5_tensors.h"
#include "data/image_io.h"
#include "dist/communicator.h"
#include "model/safetensors.h"
#include "model/state_dict.h"
#include "trainer/checkpoint_inspect.h"
#include "trainer/doctor.h"
#include "trainer/evaluation.h"
#include "trainer/feature_statistics.h"
#include "trainer/logging.h"
#include "trainer/memory.h"
#include "trainer/model_factory.h"
#include "trainer/posthoc_ema.h"
#include "trainer/progress.h"
#include "trainer/sample_quality.h"
#include "trainer/sampling.h"
#include "trainer/trainer.h"
#include "util/durable_file.h"
#include "util/json.h"

namespace diffuse::app {
namespace {

/// The model of a checkpoint, with a progress line on rank 0 while the checkpoint is read.
trainer::LoadedModel load_with_progress(const dist::Context& ctx, const std::string& ckpt, const std::string& weights,
                                        torch::Device device) {
  trainer::BytesProgress reading({.label = "loading checkpoint", .enabled = ctx.is_root()});
  auto loaded = trainer::load_model(ckpt, weights, device,
                                    [&](int64_t done, int64_t total) { reading.report(done, total); });
  reading.finish();
  if (ctx.is_root()) {
    for (const auto& warning : loaded.warnings) trainer::log::warn("{}", warning);
  }
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
  std::string ckpt, sampler = "auto", out, out_dir, out_h5, weights = "ema", device = "auto";
  int64_t n = 64, steps = 50, seed = 0, batch = 16;
  double eta = 0.0;
  bool overwrite = false;
  // Class-conditional checkpoints: --classes LIST (--n images of each, one grid row per class) or
  // --classes-file FILE (one class per image); guidance as the reference's sampler.
  std::string classes, classes_file;
  double guidance = 6.0, rescaled_phi = 0.7;
  std::string posthoc;  ///< --posthoc-sigma-rel: synthesized post-hoc EMA weights instead of --weights
};

/// "0.05,0.1" -> {"0.05", "0.1"} (empty entries dropped).
std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

/// The weights a command loads: --posthoc-sigma-rel's synthesized profile, else --weights.
std::string chosen_weights(const std::string& weights, const std::string& posthoc) {
  return posthoc.empty() ? weights : trainer::kPosthocWeights + posthoc;
}

/// The per-image classes a sample command asks for (undefined for an unconditional model), and the
/// images per grid row; updates n for --classes-file.
torch::Tensor sample_classes(SampleArgs& args, const trainer::LoadedModel& loaded, int64_t& per_row) {
  const int64_t k = loaded.config.model.num_classes;
  per_row = static_cast<int64_t>(std::ceil(std::sqrt(args.n)));
  const bool given = !args.classes.empty() || !args.classes_file.empty();
  if (k == 0) {
    if (given) {
      throw std::invalid_argument("--classes / --classes-file: " + args.ckpt +
                                  " holds an unconditional model (model.num_classes=0); sample without them");
    }
    return {};
  }
  if (!given) {
    throw std::invalid_argument(args.ckpt + " holds a class-conditional model (" + std::to_string(k) +
                                " classes): give --classes all, --classes 0,3,7 or --classes-file FILE");
  }
  if (!args.classes_file.empty()) {
    auto classes = trainer::read_class_file(args.classes_file, k);
    args.n = static_cast<int64_t>(classes.size());
    per_row = static_cast<int64_t>(std::ceil(std::sqrt(args.n)));
    return torch::tensor(classes, torch::kInt64);
  }
  auto classes = trainer::parse_class_list(args.classes, k);
  per_row = args.n;
  args.n *= static_cast<int64_t>(classes.size());
  return trainer::class_rows(classes, per_row);
}

std::filesystem::path sample_file(const std::string& dir, int64_t index) {
  return std::filesystem::path(dir) / fmt::format("sample-{:06d}.png", index);
}

/// Checks the outputs before any sampling: a run of hours must not end in "cannot write".
void check_sample_outputs(const SampleArgs& args) {
  namespace fs = std::filesystem;
  if (!args.out.empty() && fs::path(args.out).extension() != ".png") {
    throw std::invalid_argument("--out " + args.out + ": the grid is written as PNG; name the file *.png");
  }
  if (!args.out.empty()) {
    auto parent = fs::absolute(args.out).parent_path();
    if (!fs::is_directory(parent)) {
      throw std::invalid_argument("--out " + args.out + ": the folder " + parent.string() + " does not exist");
    }
  }
  if (!args.out_dir.empty() && fs::exists(args.out_dir) && !fs::is_directory(args.out_dir)) {
    throw std::invalid_argument("--out-dir " + args.out_dir + " exists and is not a directory");
  }
  if (!args.out.empty()) util::check_destination(args.out, args.overwrite);
  if (!args.out_h5.empty()) util::check_destination(args.out_h5, args.overwrite);
  if (!args.out_dir.empty() && fs::is_directory(args.out_dir)) {
    for (int64_t i = 0; i < args.n; ++i) util::check_destination(sample_file(args.out_dir, i), args.overwrite);
  }
}

int run_sample(const dist::Context& ctx, const SampleArgs& args_in) {
  if (args_in.out.empty() && args_in.out_dir.empty() && args_in.out_h5.empty()) {
    throw std::invalid_argument("diffuse sample: give --out grid.png, --out-dir DIR or --out-h5 FILE");
  }
  check_sample_outputs(args_in);
  auto device = command_device(ctx, args_in.device);
  auto loaded = load_with_progress(ctx, args_in.ckpt, chosen_weights(args_in.weights, args_in.posthoc), device);
  SampleArgs args = args_in;
  args.sampler = loaded.diffusion.sampler_name(args.sampler);
  int64_t per_row = 0;
  auto classes = sample_classes(args, loaded, per_row);
  if (args.n != args_in.n) check_sample_outputs(args);  // --out-dir: the files of every class's images
  int64_t c = loaded.config.model.channels, s = loaded.config.data.image_size;
  // Rank 0 gathers every image as float32 and converts them to uint8 for the outputs.
  trainer::require_memory(fmt::format("sample --n {} at {}x{}x{}", args.n, s, s, c),
                          static_cast<double>(args.n) * static_cast<double>(c * s * s) * (4.0 + 4.0 + 1.0), 1,
                          torch::kCPU, "sample fewer images per call (several calls with different --seed)");
  auto comm = command_communicator(ctx, device);
  trainer::Progress progress({.label = "sampling", .total = args.n, .unit = "images", .enabled = ctx.is_root()});
  trainer::SampleRequest request{.n = args.n, .seed = static_cast<uint64_t>(args.seed), .batch = args.batch,
                                 .options = {.sampler = args.sampler, .steps = args.steps, .eta = args.eta,
                                             .cond_scale = args.guidance, .rescaled_phi = args.rescaled_phi},
                                 .classes = classes,
                                 .on_progress = [&progress](int64_t images) { progress.advance(images); }};
  auto all = trainer::sample_images(loaded.diffusion, *comm, request);
  progress.finish();
  if (ctx.is_root()) {
    if (!args.out.empty()) {
      data::save_image_grid(args.out, all, per_row, /*padding=*/2, args.overwrite);
      std::cout << "wrote " << args.out << " (" << args.n << " images, " << loaded.weights << " weights, step "
                << loaded.step << ")\n";
    }
    auto hwc = (all * 255).round().clamp(0, 255).to(torch::kUInt8).permute({0, 2, 3, 1}).contiguous();
    if (!args.out_dir.empty()) {
      std::filesystem::create_directories(args.out_dir);
      for (int64_t i = 0; i < args.n; ++i) {
        data::save_png(sample_file(args.out_dir, i), hwc[i], args.overwrite);
      }
      std::cout << "wrote " << args.n << " PNGs to " << args.out_dir << "\n";
    }
    if (!args.out_h5.empty()) {
      std::vector<std::pair<std::string, torch::Tensor>> tensors{{"images", hwc}};
      std::map<std::string, std::string> attributes{{"step", std::to_string(loaded.step)},
                                                    {"weights", loaded.weights},
                                                    {"sampler", args.sampler},
                                                    {"steps", std::to_string(args.steps)}};
      if (classes.defined()) {
        tensors.emplace_back("labels", classes);
        attributes["guidance"] = fmt::format("{}", args.guidance);
        attributes["rescaled_phi"] = fmt::format("{}", args.rescaled_phi);
      }
      data::write_hdf5_tensors(args.out_h5, tensors, attributes, args.overwrite);
      std::cout << "wrote " << args.out_h5 << " (images: uint8 [" << args.n << ", " << s << ", " << s << ", " << c
                << "]" << (classes.defined() ? ", labels: int64 [" + std::to_string(args.n) + "]" : "") << ")\n";
    }
  }
  return 0;
}

int run_export(const dist::Context& ctx, const std::string& ckpt, const std::string& out, const std::string& weights,
               bool overwrite) {
  util::check_destination(out, overwrite);  // before the checkpoint is read
  auto loaded = load_with_progress(ctx, ckpt, weights, torch::kCPU);
  std::map<std::string, std::string> metadata{
      {"format", "diffuse"},
      {"model_type", trainer::to_string(loaded.config.model.type)},
      {"unet_options", trainer::unet_options_json(loaded.config)},
      {"diffusion_type", trainer::to_string(loaded.config.diffusion.type)},
      {"diffusion_options", trainer::diffusion_options_json(loaded.config)},
      {"step", std::to_string(loaded.step)},
      {"weights", loaded.weights},
  };
  model::save_safetensors(out, model::state_dict(*loaded.diffusion.denoiser()), metadata, overwrite);
  const std::string network = loaded.diffusion.network_class();
  std::cout << "wrote " << out << " (" << network << " state dict, " << loaded.weights << " weights, step "
            << loaded.step << "); in Python: "
            << (network == "ConditionalUnet" ? "denoising_diffusion_pytorch.classifier_free_guidance.Unet" : network)
            << "(...).load_state_dict(safetensors.torch.load_file('" << out << "'))\n";
  return 0;
}

struct EvalArgs {
  std::string ckpt, data, weights = "ema", device = "auto";
  std::string classes = "labels";  ///< conditional model: "labels" (each image's own) or one class K
  int64_t n = 1000, batch = 16, seed = 0;
  bool fid = false;
  std::string features, ref, sampler = "auto", images;
  std::string posthoc;  ///< --posthoc-sigma-rel: one width, or a comma-separated sweep (--fid)
  int64_t steps = 50, kid_subsets = 100, kid_subset_size = 1000;
  double eta = 0.0, guidance = 6.0, rescaled_phi = 0.7;
};

/// The feature network and the reference statistics of `eval --fid`, checked to belong together.
struct QualityInputs {
  trainer::FeatureNetwork network;
  trainer::ReferenceStatistics reference;
};

QualityInputs quality_inputs(const EvalArgs& args, torch::Device device) {
  QualityInputs inputs{trainer::FeatureNetwork(args.features, device), trainer::read_reference_statistics(args.ref)};
  trainer::check_reference_statistics(inputs.reference, args.ref, inputs.network.info());
  return inputs;
}

/// The short table under the JSON line.
void print_quality_table(const trainer::QualityResult& result, const std::string& what) {
  std::cout << what << fmt::format(":\n  FID        {:.4f}\n", result.fid);
  if (result.kid) std::cout << fmt::format("  KID        {:.6f} ± {:.6f}\n", result.kid->mean, result.kid->std);
  if (result.precision_recall) {
    std::cout << fmt::format("  precision  {:.4f}\n  recall     {:.4f}\n", result.precision_recall->precision,
                             result.precision_recall->recall);
  }
}

/// FID, KID and precision/recall of the checkpoint's samples against --ref (`eval --fid`). A
/// class-conditional model's sample i gets class i mod K (--classes K: every sample class K),
/// guided as `diffuse sample` guides, like the training run's evaluations.
trainer::QualityResult run_eval_quality(const dist::Context& ctx, const EvalArgs& args, trainer::LoadedModel& loaded,
                                        std::optional<int64_t> fixed_class, torch::Device device,
                                        dist::Communicator& comm) {
  auto [network, reference] = quality_inputs(args, device);
  const std::string sampler = loaded.diffusion.sampler_name(args.sampler);
  trainer::Progress progress({.label = "sampling for FID", .total = args.n, .unit = "images", .enabled = ctx.is_root()});
  trainer::QualityRequest request{
      .sampling = {.n = args.n, .seed = static_cast<uint64_t>(args.seed), .batch = args.batch,
                   .options = {.sampler = sampler, .steps = args.steps, .eta = args.eta,
                               .cond_scale = args.guidance, .rescaled_phi = args.rescaled_phi},
                   .on_progress = [&progress](int64_t images) { progress.advance(images); }},
      .metrics = {.kid = {.subsets = args.kid_subsets, .subset_size = args.kid_subset_size, .seed = 0}}};
  std::vector<std::pair<std::string, std::string>> extra{{"checkpoint", util::json::quote(args.ckpt)},
                                                         {"step", std::to_string(loaded.step)},
                                                         {"weights", util::json::quote(loaded.weights)},
                                                         {"ranks", std::to_string(comm.size())}};
  if (const int64_t k = loaded.diffusion.num_classes(); k > 0) {
    auto classes = fixed_class ? std::vector<int64_t>{*fixed_class} : trainer::parse_class_list("all", k);
    request.sampling.classes = trainer::cycled_classes(args.n, classes);
    extra.emplace_back("classes", util::json::quote(fixed_class ? std::to_string(*fixed_class)
                                                                : fmt::format("i mod {}", k)));
    extra.emplace_back("guidance", util::json::number(args.guidance));
    extra.emplace_back("rescaled_phi", util::json::number(args.rescaled_phi));
  }
  auto result = trainer::evaluate_sample_quality(loaded.diffusion, comm, network, reference, request);
  progress.finish();
  if (!ctx.is_root()) return result;
  for (const auto& warning : result.warnings) trainer::log::warn("{}", warning);
  std::cout << trainer::quality_json(result, network.info(), reference, trainer::sampling_json_fields(request), extra)
            << "\n";
  print_quality_table(result, fmt::format("sample quality of {} samples ({} {} steps, eta {}, {} weights, step {}) "
                                          "against {} ({} images), features {}",
                                          result.n, sampler, args.steps, args.eta, loaded.weights, loaded.step,
                                          args.ref, reference.n, network.info().name));
  return result;
}

/// `eval --fid --posthoc-sigma-rel 0.05,0.1,0.2`: each profile synthesized and measured in turn (the
/// same samples' noise for each), then the best by FID.
int run_posthoc_sweep(const dist::Context& ctx, const EvalArgs& args, const std::vector<std::string>& sigma_rels) {
  if (!args.fid || !args.data.empty() || args.classes != "labels") {
    throw std::invalid_argument("eval --posthoc-sigma-rel " + args.posthoc +
                                ": a list of widths is a sweep by FID; give it with --fid (and without --data or "
                                "--classes)");
  }
  for (const auto& sigma_rel : sigma_rels) trainer::parse_posthoc_sigma_rel(sigma_rel);  // all refused up front
  auto device = command_device(ctx, args.device);
  auto comm = command_communicator(ctx, device);
  std::vector<std::pair<std::string, double>> fids;
  for (const auto& sigma_rel : sigma_rels) {
    auto loaded = load_with_progress(ctx, args.ckpt, trainer::kPosthocWeights + sigma_rel, device);
    fids.emplace_back(sigma_rel, run_eval_quality(ctx, args, loaded, std::nullopt, device, *comm).fid);
  }
  if (!ctx.is_root()) return 0;
  auto best = std::min_element(fids.begin(), fids.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
  std::string rows;
  for (const auto& [sigma_rel, fid] : fids) {
    rows += (rows.empty() ? "" : ", ") + fmt::format("{{\"sigma_rel\": {}, \"fid\": {}}}", sigma_rel,
                                                     util::json::number(fid));
  }
  std::cout << fmt::format("{{\"posthoc_sweep\": [{}], \"best_sigma_rel\": {}, \"best_fid\": {}}}\n", rows,
                           best->first, util::json::number(best->second));
  std::cout << fmt::format("best post-hoc EMA width by FID: sigma_rel {} (FID {:.4f}); export it with diffuse export "
                           "--ckpt {} --posthoc-sigma-rel {} --out ...\n",
                           best->first, best->second, args.ckpt, best->first);
  return 0;
}

/// The same metrics for a dataset's first --n images instead of samples (`eval --fid --images`):
/// the floor a model can reach at that N.
int run_eval_images(const dist::Context& ctx, const EvalArgs& args) {
  auto device = command_device(ctx, args.device);
  auto [network, reference] = quality_inputs(args, device);
  auto comm = command_communicator(ctx, device);
  auto count = data::dataset_identity(args.images).count;
  trainer::Progress progress({.label = "features", .total = std::min(args.n, count), .unit = "images",
                              .enabled = ctx.is_root()});
  auto result = trainer::evaluate_image_quality(
      network, *comm, reference,
      {.data = args.images, .n = args.n, .batch = args.batch,
       .on_progress = [&progress](int64_t images) { progress.advance(images); }},
      {.kid = {.subsets = args.kid_subsets, .subset_size = args.kid_subset_size, .seed = 0}});
  progress.finish();
  if (!ctx.is_root()) return 0;
  for (const auto& warning : result.warnings) trainer::log::warn("{}", warning);
  std::cout << trainer::quality_json(result, network.info(), reference,
                                     {{"images", util::json::quote(args.images)},
                                      {"images_content_sha256", util::json::quote(result.images_content_sha256)}},
                                     {{"ranks", std::to_string(comm->size())}})
            << "\n";
  print_quality_table(result, fmt::format("quality of the first {} images of {} against {} ({} images), features {}",
                                          result.n, args.images, args.ref, reference.n, network.info().name));
  return 0;
}

int run_eval(const dist::Context& ctx, const EvalArgs& args) {
  if (args.fid && (args.features.empty() || args.ref.empty())) {
    throw std::invalid_argument("diffuse eval --fid: give --features NET.pt and --ref X.stats.h5 (from `diffuse stats`)");
  }
  if (!args.images.empty()) {
    if (!args.fid || !args.ckpt.empty() || !args.data.empty()) {
      throw std::invalid_argument("diffuse eval --images FILE.h5: measures a dataset's images instead of samples; "
                                  "give it with --fid, --features and --ref, without --ckpt or --data");
    }
    return run_eval_images(ctx, args);
  }
  if (args.ckpt.empty()) {
    throw std::invalid_argument("diffuse eval: give --ckpt DIR (a checkpoint), or --fid --images FILE.h5 to measure "
                                "a dataset");
  }
  if (!args.fid && args.data.empty()) {
    throw std::invalid_argument("diffuse eval: give --data FILE.h5 (the variational bound) and/or --fid");
  }
  if (auto sigma_rels = split_list(args.posthoc); sigma_rels.size() > 1) return run_posthoc_sweep(ctx, args, sigma_rels);
  auto device = command_device(ctx, args.device);
  auto loaded = load_with_progress(ctx, args.ckpt, chosen_weights(args.weights, args.posthoc), device);
  std::optional<int64_t> fixed_class;
  if (args.classes != "labels") {
    if (!loaded.diffusion.conditional()) {
      throw std::invalid_argument("--classes " + args.classes + ": " + args.ckpt +
                                  " holds an unconditional model (model.num_classes=0); evaluate without --classes");
    }
    auto list = trainer::parse_class_list(args.classes, loaded.diffusion.num_classes());
    if (list.size() != 1) {
      throw std::invalid_argument("eval --classes " + args.classes +
                                  ": give 'labels' (each image's label; --fid: class i mod K for sample i) or one "
                                  "class K (every image conditioned on K)");
    }
    fixed_class = list[0];
  }
  if (!args.data.empty() && loaded.diffusion.gaussian() == nullptr) {
    throw std::invalid_argument("diffuse eval --data: the variational bound (bits/dim) is defined for diffusion.type: "
                                "gaussian; " + args.ckpt + " holds an elucidated model: measure it with --fid");
  }
  auto comm = command_communicator(ctx, device);
  if (args.fid) run_eval_quality(ctx, args, loaded, fixed_class, device, *comm);
  if (args.data.empty()) return 0;
  trainer::Progress progress({.label = "evaluating the bound", .total = args.n, .unit = "images",
                              .enabled = ctx.is_root()});
  auto bound = trainer::evaluate_bits_per_dim(
      *loaded.diffusion.gaussian(), *comm,
      {.data = args.data, .n = args.n, .batch = args.batch, .seed = static_cast<uint64_t>(args.seed),
       .fixed_class = fixed_class,
       .on_progress = [&progress](int64_t images) { progress.advance(images); }});
  progress.finish();
  if (ctx.is_root()) {
    std::cout << fmt::format(
        "variational bound on {} images of {} ({} weights, step {}):\n"
        "  total      {:.4f} bits/dim  (± {:.4f} standard error)\n"
        "  prior L_T  {:.6f}\n  decoder L_0 {:.4f}\n  sum L_t-1  {:.4f}\n",
        bound.images, args.data, loaded.weights, loaded.step, bound.total, bound.standard_error, bound.prior,
        bound.decoder, bound.terms);
  }
  return 0;
}

int run_doctor(const dist::Context& ctx, trainer::DeviceRequest device) {
  auto report = trainer::collect_doctor_report(ctx, device);
  auto all = ctx.gather_strings(report.to_text());
  if (ctx.is_root()) {
    for (size_t rank = 0; rank < all.size(); ++rank) {
      std::cout << "diffuse doctor: rank " << rank << "\n" << all[rank];
    }
    std::cout.flush();
  }
  return static_cast<int>(ctx.max_over_ranks(report.problems.empty() ? 0 : 1));
}

}  // namespace

CLI::Validator positive_integer() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        try {
          size_t used = 0;
          long long value = std::stoll(text, &used);
          if (used == text.size() && value >= 1) return "";
        } catch (const std::exception&) {
        }
        return "must be an integer >= 1, got '" + text + "'";
      },
      "INT>=1");
}

void add_doctor_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand(
      "doctor", "Report this environment per rank (versions, GPUs, MPI, HDF5) and check it is usable");
  auto device = std::make_shared<std::string>("auto");
  cmd->add_option("--device", *device, "Which run to check for: auto (CUDA when a GPU is visible), cpu, cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->callback([&action, device] {
    action = [device](const dist::Context& ctx) { return run_doctor(ctx, trainer::parse_device_request(*device)); };
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
      trainer::install_stop_signal_handlers();  // before the slow set-up: an early signal is kept
      auto config = trainer::Config::from_yaml_file(args->config);
      for (const auto& assignment : args->overrides) config.apply_override(assignment);
      config.validate();
      trainer::Trainer trainer(ctx, config,
                               {.run_dir = args->run_dir, .resume = args->resume, .dry_run = args->dry_run,
                                .hooks = trainer_hooks_from_environment(ctx.rank())});
      return trainer.run();
    };
  });
}

void add_sample_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand("sample", "Sample images from a checkpoint (ranks split the images)");
  auto args = std::make_shared<SampleArgs>();
  cmd->add_option("--ckpt", args->ckpt, "Checkpoint directory, RUN/checkpoints/latest or RUN")->required();
  auto* n = cmd->add_option("--n", args->n, "Number of images (with --classes: of each class)")
                ->check(positive_integer());
  cmd->add_option("--sampler", args->sampler, "auto (ddim; heun for an elucidated model), ddim or ddpm; heun or dpmpp")
      ->check(CLI::IsMember({"auto", "ddim", "ddpm", "heun", "dpmpp"}));
  cmd->add_option("--steps", args->steps, "DDIM steps (ddpm uses every timestep)")->check(positive_integer());
  cmd->add_option("--eta", args->eta, "DDIM eta (0: deterministic given the noise)");
  cmd->add_option("--seed", args->seed, "Seed of the initial noise");
  cmd->add_option("--batch", args->batch, "Images per forward pass")->check(positive_integer());
  auto* weights = cmd->add_option("--weights", args->weights, "ema (first rate), an EMA rate like 0.9999, or online");
  cmd->add_option("--posthoc-sigma-rel", args->posthoc,
                  "Post-hoc EMA weights of this relative width, synthesized from the run's snapshots (ema.posthoc)")
      ->excludes(weights);
  cmd->add_option("--device", args->device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_option("--out", args->out, "Write one grid PNG");
  cmd->add_option("--out-dir", args->out_dir, "Write one PNG per image into this folder");
  cmd->add_option("--out-h5", args->out_h5,
                  "Write an HDF5 file with images uint8 [N,H,W,C] (and labels int64 [N] for a conditional model)");
  auto* classes = cmd->add_option("--classes", args->classes,
                                  "Conditional model: 'all' or a list such as 0,3,7; --n images of each, one grid row "
                                  "per class");
  cmd->add_option("--classes-file", args->classes_file,
                  "Conditional model: a text file with one class per image (integers; the file gives --n)")
      ->excludes(classes)
      ->excludes(n);
  cmd->add_option("--guidance", args->guidance,
                  "Conditional model: classifier-free guidance scale (1: the conditional model alone; default 6)");
  cmd->add_option("--rescaled-phi", args->rescaled_phi,
                  "Conditional model: share of the std-rescaled guided prediction, 0..1 (default 0.7)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_flag("--overwrite", args->overwrite, "Replace existing output files (never anything but regular files)");
  cmd->callback([&action, args] { action = [args](const dist::Context& ctx) { return run_sample(ctx, *args); }; });
}

void add_export_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand("export", "Export U-Net weights as safetensors, loadable by denoising-diffusion-pytorch");
  auto ckpt = std::make_shared<std::string>(), out = std::make_shared<std::string>(),
       weights = std::make_shared<std::string>("ema"), posthoc = std::make_shared<std::string>();
  auto overwrite = std::make_shared<bool>(false);
  cmd->add_option("--ckpt", *ckpt, "Checkpoint directory, RUN/checkpoints/latest or RUN")->required();
  cmd->add_option("--out", *out, "Output .safetensors file")->required();
  auto* weights_option = cmd->add_option("--weights", *weights, "ema (first rate), an EMA rate like 0.9999, or online");
  cmd->add_option("--posthoc-sigma-rel", *posthoc,
                  "Post-hoc EMA weights of this relative width, synthesized from the run's snapshots (ema.posthoc)")
      ->excludes(weights_option);
  cmd->add_flag("--overwrite", *overwrite, "Replace an existing output file (never anything but a regular file)");
  cmd->callback([&action, ckpt, out, weights, posthoc, overwrite] {
    action = [ckpt, out, weights, posthoc, overwrite](const dist::Context& ctx) {
      return ctx.is_root() ? run_export(ctx, *ckpt, *out, chosen_weights(*weights, *posthoc), *overwrite) : 0;
    };
  });
}

void add_eval_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand("eval", "Variational bound in bits/dim on held-out images; FID, KID, precision/recall");
  auto args = std::make_shared<EvalArgs>();
  cmd->add_option("--ckpt", args->ckpt, "Checkpoint directory, RUN/checkpoints/latest or RUN");
  cmd->add_option("--data", args->data, "HDF5 dataset (diffuse prep) of held-out images: the bound");
  cmd->add_flag("--fid", args->fid, "Sample --n images and compare their features with --ref");
  cmd->add_option("--images", args->images,
                  "--fid without a checkpoint: the first --n images of this HDF5 dataset instead of samples (the "
                  "floor: e.g. a test set against the training set's --ref)");
  cmd->add_option("--features", args->features, "--fid: TorchScript feature network (.pt with diffuse_features.json)");
  cmd->add_option("--ref", args->ref, "--fid: reference statistics from `diffuse stats` with the same --features");
  cmd->add_option("--sampler", args->sampler, "--fid: auto (ddim; heun for an elucidated model), ddim or ddpm; heun or dpmpp")
      ->check(CLI::IsMember({"auto", "ddim", "ddpm", "heun", "dpmpp"}));
  cmd->add_option("--steps", args->steps, "--fid: DDIM steps (ddpm uses every timestep)")->check(positive_integer());
  cmd->add_option("--eta", args->eta, "--fid: DDIM eta");
  cmd->add_option("--kid-subsets", args->kid_subsets, "--fid: KID subsets")->check(positive_integer());
  cmd->add_option("--kid-subset-size", args->kid_subset_size, "--fid: KID subset size (capped at the smaller side)")
      ->check(positive_integer());
  cmd->add_option("--n", args->n, "Number of images")->check(positive_integer());
  cmd->add_option("--batch", args->batch, "Images per forward pass")->check(positive_integer());
  cmd->add_option("--seed", args->seed, "Seed of the noise of the bound's terms and of the samples (--fid)");
  cmd->add_option("--classes", args->classes,
                  "Conditional model: 'labels' (default: each image's label in --data; --fid: sample i gets class "
                  "i mod K) or one class K to condition every image (and every --fid sample) on; the bound is "
                  "unguided (cond_scale 1)");
  cmd->add_option("--guidance", args->guidance,
                  "--fid, conditional model: classifier-free guidance scale of the samples (default 6, as sample)");
  cmd->add_option("--rescaled-phi", args->rescaled_phi, "--fid, conditional model: as sample's (default 0.7)")
      ->check(CLI::Range(0.0, 1.0));
  auto* weights = cmd->add_option("--weights", args->weights, "ema (first rate), an EMA rate like 0.9999, or online");
  cmd->add_option("--posthoc-sigma-rel", args->posthoc,
                  "Post-hoc EMA weights of this relative width (ema.posthoc snapshots); with --fid a list such as "
                  "0.05,0.1,0.2 evaluates each and names the best by FID")
      ->excludes(weights);
  cmd->add_option("--device", args->device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->callback([&action, args] { action = [args](const dist::Context& ctx) { return run_eval(ctx, *args); }; });
}

void add_stats_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand("stats", "Reference feature statistics of a dataset (for eval --fid)");
  struct Args {
    std::string data, features, out, device = "auto";
    int64_t n = 0, batch = 64;
    bool overwrite = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--data", args->data, "HDF5 dataset (diffuse prep)")->required();
  cmd->add_option("--features", args->features, "TorchScript feature network (.pt with diffuse_features.json)")
      ->required();
  cmd->add_option("--out,-o", args->out, "Output statistics file (X.stats.h5)")->required();
  cmd->add_option("--n", args->n, "First n images (default: all)")->check(positive_integer());
  cmd->add_option("--batch", args->batch, "Images per feature-network pass")->check(positive_integer());
  cmd->add_option("--device", args->device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_flag("--overwrite", args->overwrite, "Replace an existing output file (never anything but a regular file)");
  cmd->callback([&action, args] {
    action = [args](const dist::Context& ctx) {
      util::check_destination(args->out, args->overwrite);  // before hours of features
      auto device = command_device(ctx, args->device);
      trainer::FeatureNetwork network(args->features, device);
      auto comm = command_communicator(ctx, device);
      auto count = data::dataset_identity(args->data).count;
      auto total = args->n > 0 ? std::min(args->n, count) : count;
      trainer::Progress progress({.label = "features", .total = total, .unit = "images", .enabled = ctx.is_root()});
      auto stats = trainer::compute_reference_statistics(
          network, *comm,
          {.data = args->data, .n = args->n, .batch = args->batch,
           .on_progress = [&progress](int64_t images) { progress.advance(images); }});
      progress.finish();
      if (ctx.is_root()) {
        trainer::write_reference_statistics(args->out, stats, args->overwrite);
        std::cout << fmt::format("wrote {} ({} images of {}, {} features of {} sha256 {})\n", args->out, stats.n,
                                 args->data, network.info().dimension, network.info().name,
                                 network.info().sha256.substr(0, 12));
      }
      return 0;
    };
  });
}

void add_inspect_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand("inspect", "Summarise a dataset file or a checkpoint directory");
  auto path = std::make_shared<std::string>(), grid = std::make_shared<std::string>();
  auto k = std::make_shared<int64_t>(64);
  auto no_verify = std::make_shared<bool>(false), overwrite = std::make_shared<bool>(false);
  cmd->add_option("path", *path, "FILE.h5 (dataset) or a checkpoint directory")->required();
  cmd->add_flag("--overwrite", *overwrite, "Dataset: replace an existing --grid file");
  cmd->add_option("--grid", *grid, "Dataset: write a PNG grid of the first k images");
  cmd->add_option("--k", *k, "Dataset: images in the grid")->check(positive_integer());
  cmd->add_flag("--no-verify", *no_verify, "Checkpoint: skip the SHA-256 check of the shards");
  cmd->callback([&action, path, grid, k, no_verify, overwrite] {
    action = [path, grid, k, no_verify, overwrite](const dist::Context& ctx) {
      if (!ctx.is_root()) return 0;
      if (std::filesystem::is_directory(*path)) {
        auto summary = trainer::describe_checkpoint(*path, !*no_verify);
        std::cout << summary.text;
        return summary.ok ? 0 : 1;
      }
      std::optional<std::filesystem::path> grid_path;
      if (!grid->empty()) grid_path = *grid;
      return inspect_dataset_command(*path, grid_path, *k, *overwrite);
    };
  });
}

}  // namespace diffuse::app
