// trainer/trainer.h: `diffuse train`. Composes the model (diffuse_model), the sharded loader
// (diffuse_data) and the communicators and gradient reducer (diffuse_dist) into the training
// loop, with mixed precision, gradient accumulation, EMA, checkpoints and exact resume.
//
//   Trainer trainer(ctx, config, {.run_dir = "runs/demo", .resume = "latest"});
//   return trainer.run();
//
// A newcomer's path through the code: Trainer::run() -> Trainer::train_step().
#pragma once

#include <atomic>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dist/context.h"
#include "model/diffusion.h"
#include "trainer/config.h"

namespace diffuse::trainer {

/// The U-Net and diffusion the configuration describes (on CPU, fp32).
model::GaussianDiffusion build_diffusion(const Config& config);
model::UnetOptions unet_options(const ModelConfig& model);
model::DiffusionOptions diffusion_options(const Config& config);

struct RunOptions {
  std::filesystem::path run_dir;  ///< empty: runs/<config name>
  std::string resume;             ///< "" (fresh; refuses a run dir that has checkpoints), "latest", or a checkpoint dir
  bool dry_run = false;           ///< validate config and data, print sizes, exit
};

/// Set by the SIGTERM/SIGUSR1 handler; the training loop polls it at step boundaries.
std::atomic<int>& stop_signal();
/// Installs handlers for SIGTERM and SIGUSR1 that only set stop_signal().
void install_stop_signal_handlers();

/// Wall seconds of the phases of one training step, for benchmarks (bench/trainer/step_bench).
/// Each phase ends with a device synchronisation, which is why only profile_steps() fills it.
struct StepProfile {
  double data_wait = 0;     ///< loader->next(), summed over micro-batches
  double forward = 0;       ///< timestep draw, noise, autocast forward and loss
  double backward = 0;      ///< backward, including the bucket all-reduces it overlaps
  double exposed_comm = 0;  ///< GradReducer::finish(): all-reduce not hidden behind backward
  double optimizer = 0;     ///< unscale, clip, fused AdamW, loss-scale update, zero grads
  double ema = 0;           ///< Ema::update
  double total = 0;         ///< the whole train_step (the rest is loss bookkeeping)
  int64_t images = 0;       ///< images this rank trained on
};

class Trainer {
 public:
  Trainer(const dist::Context& ctx, Config config, RunOptions options);
  ~Trainer();
  /// Trains to config.train.steps (or until a stop signal, after checkpointing). Returns the exit code.
  int run();
  /// Benchmark entry: validates and sets up as run() does, but creates no run directory, loads and
  /// saves no checkpoint and never logs; runs `steps` training steps and returns their profiles.
  std::vector<StepProfile> profile_steps(int64_t steps);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace diffuse::trainer
