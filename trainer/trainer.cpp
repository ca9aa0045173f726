// The training loop. Read Trainer::run() first, then train_step(): everything else is the parts'
// construction, bookkeeping and the checkpoint calls.
#include "trainer/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <numeric>
#include <csignal>
#include <fstream>
#include <iostream>
#include <new>
#include <optional>
#include <string_view>
#include <utility>

#include "data/dataset.h"
#include "data/image_io.h"
#include "data/loader.h"
#include "diffuse/build_config.h"
#include "dist/communicator.h"
#include "dist/reducer.h"
#include "dist/timed_host_collective.h"
#include "trainer/device_scope.h"
#include "trainer/doctor.h"
#include "trainer/ema.h"
#include "trainer/logging.h"
#include "trainer/loss_tracker.h"
#include "trainer/memory.h"
#include "trainer/model_factory.h"
#include "trainer/nonfinite_guard.h"
#include "trainer/optimization.h"
#include "trainer/posthoc_training.h"
#include "trainer/preflight.h"
#include "trainer/progress.h"
#include "trainer/run_directory.h"
#include "trainer/run_lock.h"
#include "trainer/sampling.h"
#include "trainer/tensorboard.h"
#include "trainer/timestep_sampler.h"
#include "trainer/training_quality.h"
#include "trainer/training_state.h"
#include "trainer/trainer_parts.h"
#include "util/durable_file.h"
#include "util/files.h"
#include "util/format.h"


namespace diffuse::trainer {

std::atomic<int>& stop_signal() {
  static std::atomic<int> signal{0};
  return signal;
}

namespace {

extern "C" void on_stop_signal(int signal) {
  // A second Ctrl-C means "now": skip the checkpoint (only async-signal-safe calls here).
  if (signal == SIGINT && stop_signal().load() == SIGINT) ::_exit(128 + SIGINT);
  stop_signal().store(signal);
}

torch::Device training_device(const dist::Context& ctx, DeviceChoice choice) {
  bool want_cuda = choice == DeviceChoice::kCuda || (choice == DeviceChoice::kAuto && torch::cuda::is_available());
  return dist::select_device(ctx, want_cuda);
}

std::chrono::milliseconds collective_timeout(const TrainConfig& t) {
  return std::chrono::milliseconds(static_cast<int64_t>(t.collective_timeout_s * 1000));
}

std::unique_ptr<dist::Communicator> make_communicator(const dist::Context& ctx, torch::Device device,
                                                      const TrainConfig& t) {
  dist::CommunicatorOptions options{.timeout = collective_timeout(t)};
  return device.is_cuda() ? dist::make_nccl_communicator(ctx, device, options)
                          : dist::make_mpi_communicator(ctx, options);
}

data::LoaderOptions loader_options(const dist::Context& ctx, const Config& config, torch::Device device,
                                   const TrainerHooks& hooks) {
  check_same_dataset(ctx, config.data.path);
  data::LoaderOptions o;
  o.path = config.data.path;
  o.batch_size = config.train.batch_size;
  o.rank = ctx.rank();
  o.world_size = ctx.world_size();
  o.seed = static_cast<uint64_t>(config.train.seed);
  o.random_flip = config.data.random_flip;
  o.worker_threads = static_cast<int>(config.data.workers);
  o.prefetch_batches = static_cast<int>(config.data.prefetch);
  o.expected_size = config.data.image_size;
  o.expected_channels = config.model.channels;
  if (config.model.num_classes > 0) o.num_classes = config.model.num_classes;
  o.device = device;
  o.before_batch_hook = hooks.before_batch;
  return o;
}

dist::ReducerOptions reducer_options(const TrainConfig& t) {
  dist::ReducerOptions o;
  o.bucket_cap_mb = t.bucket_cap_mb;
  if (t.grad_compression == GradCompression::kBf16) o.compress_dtype = torch::kBFloat16;
  if (t.grad_compression == GradCompression::kFp16) o.compress_dtype = torch::kFloat16;
  return o;
}

const Config& validated(const Config& config) {
  config.validate();
  return config;
}

torch::Device checked_device(const dist::Context& ctx, const Config& config) {
  auto device = training_device(ctx, config.train.device);
  check_training_memory(ctx, config, device);
  return device;
}

/// The model's initial weights come from the global generator; seeding it first makes a run a
/// pure function of its config (rank 0's weights are then broadcast to everyone).
DiffusionModel seeded_model(const Config& config) {
  torch::manual_seed(mix_seed(static_cast<uint64_t>(config.train.seed), 0));
  return build_model(config);
}

}  // namespace

void install_stop_signal_handlers() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGUSR1, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
}

/// Every part of a training run (trainer_parts.h), built in dependency order.
Trainer::Parts::Parts(const dist::Context& context, Config cfg, RunOptions opts)
    : ctx(context),
      config(validated(cfg)),
      options(std::move(opts)),
      run{std::filesystem::absolute(options.run_dir.empty() ? std::filesystem::path("runs") / config.name
                                                              : options.run_dir)},
      device(checked_device(ctx, config)),
      comm(make_communicator(ctx, device, config.train)),
      host(ctx, collective_timeout(config.train)),
      // Data first among the expensive parts: its errors (missing file, wrong size) are the commonest.
      loader(loader_options(ctx, config, device, options.hooks)),
      // Before any training: a missing eval.features or eval.ref must not surface hours later.
      quality(config.eval.every > 0 ? std::make_unique<TrainingQuality>(config, device) : nullptr),
      diffusion(seeded_model(config)),
      ema_diffusion(build_model(config)),
      names(parameter_names()),
      params(on_device_parameters()),
      trainable(trainable_parameters()),
      trainable_names(trainable_parameter_names()),
      reducer(trainable, *comm, reducer_options(config.train)),
      optimizer(trainable, trainable_names,
                AdamWOptions{.beta1 = config.train.adam_beta1, .beta2 = config.train.adam_beta2,
                             .eps = config.train.adam_eps, .weight_decay = config.train.weight_decay}),
      ema(params, EmaOptions{.decays = config.ema.decay,
                             .update_every = config.ema.update_every,
                             .update_after_step = config.ema.update_after_step,
                             .inv_gamma = config.ema.inv_gamma,
                             .power = config.ema.power,
                             .min_value = config.ema.min_value}),
      posthoc(config.ema.posthoc_sigma_rels.empty()
                  ? nullptr
                  : std::make_unique<PosthocTraining>(config.ema, params, names, run.root, host)),
      scaler(GradScalerOptions{.enabled = config.train.precision == Precision::kFp16,
                               .init_scale = config.train.loss_scale_init,
                               .growth_interval = config.train.loss_scale_growth_interval,
                               .max_consecutive_skipped = config.train.max_consecutive_skipped,
                               .min_scale = config.train.min_loss_scale}),
      sampler(config.diffusion.timestep_sampler, config.diffusion.timesteps),
      generator(make_generator(device, mix_seed(static_cast<uint64_t>(config.train.seed),
                                                1 + static_cast<uint64_t>(ctx.rank())))),
      lr{.base_lr = config.train.lr, .warmup_steps = config.train.warmup_steps,
         .kind = config.train.lr_schedule, .total_steps = config.train.steps,
         .min_lr_ratio = config.train.min_lr_ratio},
      losses(config.diffusion.timesteps, device),
      guard(device),
      checkpoints(run.checkpoints(), host,
                  RetentionPolicy{.keep_last = config.checkpoint.keep_last,
                                  .keep_every = config.checkpoint.keep_every},
                  options.hooks.after_shard_written),
      metrics(run.metrics()),
      timer(options.step_timer ? options.step_timer : std::make_shared<StepTimer>()) {}

Trainer::Trainer(const dist::Context& ctx, Config config, RunOptions options)
    : parts_(std::make_unique<Parts>(ctx, std::move(config), std::move(options))) {}

Trainer::~Trainer() = default;

int Trainer::run() {
  auto& p = *parts_;
  const auto& ctx = p.ctx;
  int64_t parameters = 0;
  for (const auto& t : p.params) parameters += t.numel();
  double state_bytes = parameters * 4.0 * (1 /*weights*/ + 1 /*grads*/ + 2 /*AdamW*/ + p.config.ema.decay.size() + 1);
  if (ctx.is_root()) {
    log::info("run directory: {}", p.run.root.string());
    log::info("resolved configuration:\n{}", p.config.to_yaml());
    log::info("U-Net parameters: {} ({:.2f} M); weights+grads+AdamW+EMA: {}", parameters, parameters / 1e6,
              util::format_bytes(state_bytes));
    log::info("global batch = {} per rank x {} accumulation steps x {} ranks = {}", p.config.train.batch_size,
              p.config.train.accumulate, ctx.world_size(), p.global_batch());
    log::info("device: {}, precision {}, data: {} ({} images, {} batches per epoch per rank)", p.device.str(),
              to_string(p.config.train.precision), p.config.data.path, p.loader.info().count,
              p.loader.batches_per_epoch());
  }
  if (p.options.dry_run) {
    // The same verdict a real resume would reach, from the same checkpoint.
    std::string resume_note;
    if (!p.options.resume.empty()) {
      auto loaded = p.checkpoints.load(p.options.resume);
      if (loaded) {
        check_resume(*loaded);
        resume_note = fmt::format("; --resume {} would continue from {} at step {}", p.options.resume,
                                  loaded->directory.string(), loaded->step);
      } else {
        resume_note = fmt::format("; --resume {}: no checkpoint yet, training would start at step 0",
                                  p.options.resume);
      }
    }
    if (ctx.is_root()) std::cout << "dry run: configuration and data are valid" << resume_note << "\n";
    return 0;
  }
  start_or_resume();
  write_run_files();
  return train_loop();
}

void Trainer::start_or_resume() {
  auto& p = *parts_;
  // One job per run directory: rank 0 takes the lock and every rank learns the verdict.
  std::string refusal, takeover;
  if (p.ctx.is_root()) {
    try {
      p.run.create();
      p.lock.emplace(RunLock::acquire(p.run.root, &takeover));
    } catch (const std::exception& error) {
      refusal = error.what();
      if (refusal.empty()) refusal = "cannot take the run directory";
    }
  }
  refusal = p.ctx.broadcast_string(refusal, 0);
  if (!refusal.empty()) throw std::runtime_error(refusal);
  if (!takeover.empty()) log::warn("{}", takeover);
  log::add_rank_file(p.ctx.rank(), p.run.logs());
  if (p.options.resume.empty()) {
    if (!p.checkpoints.list().empty()) {
      throw std::runtime_error("run directory " + p.run.root.string() +
                               " already has checkpoints: pass --resume latest to continue it, or choose another "
                               "--run-dir");
    }
    if (p.ctx.is_root()) std::filesystem::remove(p.run.metrics());
    // Snapshots left by a run that never checkpointed belong to no history this run continues.
    if (p.posthoc && p.ctx.is_root()) p.posthoc->discard_snapshots_after(0);
    return;
  }
  BytesProgress reading({.label = "loading checkpoint", .enabled = p.ctx.is_root()});
  auto loaded = p.checkpoints.load(p.options.resume,
                                   [&](int64_t done, int64_t total) { reading.report(done, total); });
  reading.finish();
  if (!loaded) {
    if (p.ctx.is_root()) {
      log::warn("--resume {}: no checkpoint in {}, starting from step 0", p.options.resume,
                p.run.checkpoints().string());
    }
    return;
  }
  check_resume(*loaded);
  auto parts = p.training_parts();
  auto progress = restore_training_state(*loaded, parts);
  p.step = progress.step;
  if (p.posthoc) {
    p.posthoc->load_state(loaded->replicated);
    if (p.ctx.is_root()) {
      if (int removed = p.posthoc->discard_snapshots_after(p.step); removed > 0) {
        log::info("removed {} post-hoc EMA snapshot(s) after step {} (the interrupted run's; rewritten as it "
                  "trains on)", removed, p.step);
      }
    }
  }
  p.elapsed_before = std::stod(loaded->metadata.at("elapsed_seconds"));
  if (p.config.checkpoint.keep_best != BestMetric::kNone) restore_best(*loaded);
  if (progress.per_rank_inherited) {
    // A rank that did not exist in the saved world gets a fresh stream, still a pure function of
    // (seed, rank, step), so a resharded resume is reproducible too.
    p.generator = make_generator(p.device, mix_seed(mix_seed(p.config.train.seed, p.ctx.rank() + 1), p.step));
  }
  // Only rank 0 writes metrics: every rank rewriting the same file through the same temporary
  // name races (one rank's rename finds the temporary already moved by another).
  if (p.ctx.is_root()) {
    p.metrics.truncate_after(p.step);
    log::info("resumed from {} at step {}", loaded->directory.string(), p.step);
  }
}

void Trainer::restore_best(const LoadedCheckpoint& loaded) {
  auto& p = *parts_;
  const auto metric = p.config.checkpoint.keep_best;
  p.best = read_best_evaluation(loaded.metadata, metric);
  if (!p.best) {
    if (p.ctx.is_root()) {
      log::info("checkpoint.keep_best={}: {} records no best {} yet; the next evaluation sets it", to_string(metric),
                loaded.directory.string(), to_string(metric));
    }
    return;
  }
  // The checkpoint names its timeline's best; `best` may still point into a newer, abandoned one.
  std::string problem;
  if (p.ctx.is_root()) {
    try {
      point_best_at(p.run.checkpoints(), p.best->step);
    } catch (const std::exception& error) {
      problem = error.what();
    }
  }
  problem = p.ctx.broadcast_string(problem, 0);
  if (!problem.empty()) {
    if (p.ctx.is_root()) {
      log::warn("the best {} {} at step {} recorded in {} is gone ({}); the next evaluation sets a new best",
                to_string(metric), p.best->value, p.best->step, loaded.directory.string(), problem);
    }
    p.best.reset();
    return;
  }
  if (p.ctx.is_root()) {
    log::info("best {} so far: {} at step {} ({})", to_string(metric), p.best->value, p.best->step,
              (p.run.checkpoints() / kBestLinkName).string());
  }
}

void Trainer::check_resume(const LoadedCheckpoint& loaded) {
  auto& p = *parts_;
  if (p.ctx.is_root()) {
    for (const auto& warning : loaded.warnings) log::warn("{}", warning);
  }
  auto verdict = compare_for_resume(Config::from_yaml(loaded.config_yaml, p.config.name), p.config);
  if (!verdict.refused.empty()) {
    throw std::runtime_error(resume_refusal_message(loaded.directory.string(), verdict.refused));
  }
  if (p.ctx.is_root()) {
    for (const auto& change : verdict.allowed) {
      log::info("changed on resume: {} {} -> {}", change.key, change.before, change.after);
    }
  }
}

void Trainer::write_run_files() {
  auto& p = *parts_;
  if (!p.ctx.is_root()) return;
  // The run's own files, replaced on every start: checked writes, temporary + rename.
  util::write_file(p.run.config(), p.config.to_yaml(), /*overwrite=*/true);
  auto request = p.device.is_cuda() ? DeviceRequest::kCuda : DeviceRequest::kCpu;
  util::write_file(p.run.env(),
                   collect_doctor_report(p.ctx, request).to_text() + "  world size: " +
                       std::to_string(p.ctx.world_size()) + "\n",
                   /*overwrite=*/true);
  if (p.config.log.tensorboard) {
    // A resumed run continues in a new event file that starts after the resume step, so the
    // points a crashed attempt logged past its last checkpoint are replaced, not duplicated.
    auto dir = p.run.root / "tensorboard";
    if (p.step == 0) std::filesystem::remove_all(dir);
    p.tensorboard = std::make_unique<TensorBoardWriter>(
        dir, TensorBoardOptions{.resumed_from = p.step > 0 ? std::optional<int64_t>(p.step) : std::nullopt});
    p.tensorboard->add_text("config", "```yaml\n" + p.config.to_yaml() + "```\n", p.step);
  }
  if (p.step == 0) {
    auto count = std::min<int64_t>(p.config.log.num_samples, p.loader.info().count);
    auto real = p.run.samples() / "real.png";
    // The run's own files: a rerun of the same steps replaces them.
    data::save_image_grid(real, data::read_images(p.config.data.path, 0, count),
                          static_cast<int64_t>(std::ceil(std::sqrt(count))), /*padding=*/2, /*overwrite=*/true);
    if (p.tensorboard) p.tensorboard->add_image("real", util::read_file(real), 0);
  }
}

int Trainer::train_loop() {
  auto& p = *parts_;
  const auto& ctx = p.ctx;
  auto start = Clock::now();
  p.log_clock = start;
  auto elapsed = [&] { return p.elapsed_before + seconds_since(start); };
  if (ctx.max_over_ranks(stop_signal().load()) > 0) {
    // Signalled during set-up: nothing has been trained since the last checkpoint (or at all).
    if (ctx.is_root()) log::info("stop signal received before the first step: nothing new to save, exiting");
    return 0;
  }
  while (p.step < p.config.train.steps) {
    train_step();
    bool last = p.step == p.config.train.steps;
    if (p.step % p.config.log.every == 0 || last) log_step(elapsed());
    if (ctx.is_root() && isatty(STDERR_FILENO)) {
      double eta = elapsed() / static_cast<double>(p.step) * static_cast<double>(p.config.train.steps - p.step);
      std::cerr << fmt::format("\r  step {}/{}  loss {:.4f}  ETA {}   ", p.step, p.config.train.steps,
                               p.last_logged_loss, util::format_duration(eta))
                << std::flush;
    }
    if (p.config.log.sample_every > 0 && (p.step % p.config.log.sample_every == 0 || last)) sample_grid();
    const bool new_best = p.quality && p.quality->due(p.step, last) && evaluate_quality();
    if (p.posthoc && p.posthoc->snapshot_due(p.step)) snapshot_posthoc();
    // Every rank must agree before anyone checkpoints: a signal may reach only some ranks.
    bool stop = p.host.max_over_ranks(stop_signal().load()) > 0;
    if (p.step % p.config.checkpoint.every == 0 || last || stop || new_best) {
      p.elapsed_before = elapsed();  // the checkpoint carries the total training time so far
      start = Clock::now();
      save_checkpoint();
    }
    if (stop) {
      if (p.tensorboard) p.tensorboard->flush();
      if (ctx.is_root()) log::info("stop signal received: checkpointed step {} and exiting", p.step);
      return 0;
    }
  }
  if (p.tensorboard) p.tensorboard->flush();
  if (ctx.is_root()) {
    if (isatty(STDERR_FILENO)) std::cerr << "\n";
    log::info("done: {} steps in {}; checkpoints in {}", p.step, util::format_duration(elapsed()),
              p.run.checkpoints().string());
  }
  return 0;
}

void Trainer::train_steps_for_benchmark(int64_t steps) {
  for (int64_t i = 0; i < steps; ++i) train_step();
}

namespace {

/// Out of memory surfaces deep inside forward or backward with only the allocator's message; the
/// user needs to know which rank and which setting to change.
std::string out_of_memory_message(const Trainer::Parts& p, const std::exception& error) {
  const auto& t = p.config.train;
  return fmt::format(
      "out of memory on rank {} of {} ({}) in step {} with train.batch_size={} images per rank "
      "(train.accumulate={}, {}x{} images, precision {}): lower train.batch_size and raise train.accumulate to "
      "keep the global batch of {}{}. The allocator said: {}",
      p.ctx.rank(), p.ctx.world_size(), p.device.str(), p.step + 1, t.batch_size, t.accumulate,
      p.config.data.image_size, p.config.data.image_size, to_string(t.precision), p.global_batch(),
      t.precision == Precision::kFp32 ? ", or train with train.precision=bf16" : "", error_text(error));
}

}  // namespace

void Trainer::train_step() {
  auto& p = *parts_;
  const auto& t = p.config.train;
  auto& timer = *p.timer;
  try {
    timer.begin_step();
    p.diffusion.module().train();
    int64_t images = 0;
    for (int64_t micro = 0; micro < t.accumulate; ++micro) {
      auto wait_start = Clock::now();
      data::Batch batch = p.loader.next();
      p.data_wait += seconds_since(wait_start);
      timer.end_phase(StepPhase::kDataWait);
      auto x = batch.images;
      if (p.device.is_cuda() && t.channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);

      p.reducer.prepare_for_backward(/*sync=*/micro == t.accumulate - 1);
      DiffusionModel::TrainingStep drawn;
      {
        AutocastScope autocast(p.device, t.precision);
        drawn = p.diffusion.training_losses(x, batch.labels, p.sampler, p.generator,
                                                p.config.diffusion.timesteps);
      }
      auto loss = (drawn.losses.to(torch::kFloat32) * drawn.weights).mean() / static_cast<double>(t.accumulate);
      timer.end_phase(StepPhase::kForward);
      p.scaler.scale(loss).backward();
      timer.end_phase(StepPhase::kBackward);

      p.losses.add(drawn.losses, drawn.bucket);
      p.guard.add_losses(drawn.losses);
      if (p.sampler.needs_losses()) {
        auto detached = drawn.losses.detach().to(torch::kFloat32);
        p.sampler.update(p.comm->all_gather(drawn.bucket).reshape(-1), p.comm->all_gather(detached).reshape(-1));
      }
      images += x.size(0);
      timer.end_phase(StepPhase::kBookkeeping);
    }
    p.images_since_log += images * p.ctx.world_size();
    p.reducer.finish();
    p.exposed_comm += p.reducer.last_stats().exposed_comm_seconds;
    timer.end_phase(StepPhase::kExposedComm);

    std::vector<torch::Tensor> grads;
    for (auto& param : p.trainable) grads.push_back(param.grad());
    bool skip = p.scaler.unscale_(grads, [&](torch::Tensor& flag) { p.comm->all_reduce(flag, dist::ReduceOp::kMax); });
    if (!skip) {
      // Gradients are already the world average, so every rank clips by the same norm and drops
      // the same non-finite steps.
      torch::Tensor norms;
      p.losses.set_grad_norm(clip_grad_norm(grads, t.max_grad_norm, &norms));
      p.optimizer.step(p.lr.at(p.step), p.guard.end_step(norms, p.step + 1));
    } else {
      p.guard.discard_step();
    }
    p.scaler.update(skip);
    torch::_foreach_zero_(grads);
    timer.end_phase(StepPhase::kOptimizer);
    p.ema.update();
    if (p.posthoc) p.posthoc->update();
    timer.end_phase(StepPhase::kEma);
    timer.end_step(images);
    ++p.step;
  } catch (const std::exception& error) {
    if (!is_out_of_memory(error)) throw;
    throw std::runtime_error(out_of_memory_message(p, error));
  }
}

void Trainer::save_checkpoint() {
  auto& p = *parts_;
  auto start = Clock::now();
  check_divergence();
  // Never publish non-finite weights (huge updates can overflow them without a non-finite gradient).
  {
    torch::NoGradGuard no_grad;
    auto finite = torch::isfinite(torch::stack(torch::_foreach_norm(p.params, 2))).all().item<bool>();
    if (!finite) {
      auto kept = p.checkpoints.list();
      throw TrainingDiverged(fmt::format(
          "training diverged: the weights at step {} are not finite, so they were not saved; the last finite "
          "checkpoint: {}. Resume from it with a lower train.lr.",
          p.step, kept.empty() ? std::string("none was written") : kept.front().string()));
    }
  }
  try {
    auto contents = capture_training_state(p.training_parts(), p.step);
    if (p.posthoc) {
      auto state = p.posthoc->state();
      contents.replicated.insert(contents.replicated.end(), state.begin(), state.end());
    }
    contents.config_yaml = p.config.to_yaml();
    contents.metadata["elapsed_seconds"] = fmt::format("{:.3f}", p.elapsed_before);
    contents.metadata["samples_seen"] = std::to_string(p.loader.state().samples_seen);
    contents.metadata["unet_options"] = unet_options_json(p.config);
    contents.metadata["diffusion_options"] = diffusion_options_json(p.config);
    contents.metadata["diffuse_version"] = std::string(DIFFUSE_VERSION) + "+" + git_hash();
    // Every checkpoint records the best so far, so a resume from any of them knows it.
    if (const auto& best = p.pending_best ? p.pending_best : p.best) {
      write_best_evaluation(contents.metadata, *best);
      contents.best_step = best->step;
    }
    auto saved = p.checkpoints.save(contents);
    if (p.pending_best) p.best = std::exchange(p.pending_best, std::nullopt);
    if (p.ctx.is_root()) {
      log::info("checkpoint {} ({:.1f} MB in {:.1f}s)", saved.directory.string(), saved.bytes / 1e6,
                seconds_since(start));
      if (p.best && p.best->step == p.step) {
        log::info("best {} so far: {} at step {} ({})", to_string(p.best->metric), p.best->value, p.step,
                  (p.run.checkpoints() / kBestLinkName).string());
      }
      for (const auto& warning : saved.warnings) log::warn("{}", warning);
    }
  } catch (const std::exception& error) {
    if (p.pending_best && p.ctx.is_root()) {
      log::warn("the {} {} of step {} beat the best but its checkpoint failed; the best stays {}",
                to_string(p.pending_best->metric), p.pending_best->value, p.step,
                p.best ? fmt::format("{} at step {}", p.best->value, p.best->step) : std::string("unset"));
    }
    p.pending_best.reset();
    if (p.config.checkpoint.stop_on_error) throw;
    log::error("checkpoint at step {} failed, training continues (checkpoint.stop_on_error=false): {}", p.step,
               error.what());
  }
}

}  // namespace diffuse::trainer
