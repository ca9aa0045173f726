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
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#include "dist/context.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/step_timer.h"

namespace diffuse::trainer {

struct QualityResult;  // trainer/sample_quality.h

/// Fault-injection points for the launcher tests; empty in real runs. The program installs them
/// from DIFFUSE_TEST_* variables (app/test_hooks.cpp); library code never reads the environment.
struct TrainerHooks {
  /// Called by the loader's I/O thread before it reads batch `index` (e.g. to stall one rank).
  std::function<void(int64_t index)> before_batch;
  /// Called after each rank writes its checkpoint shard (a throw fails that rank's save).
  ShardWrittenHook after_shard_written;
  /// Called on every rank after each evaluation of the eval: section, before its result is used
  /// (e.g. to plant a sequence of FIDs for the checkpoint.keep_best test).
  std::function<void(int64_t step, QualityResult& result)> after_quality_evaluation;
};

struct RunOptions {
  std::filesystem::path run_dir;  ///< empty: runs/<config name>
  std::string resume;             ///< "" (fresh; refuses a run dir that has checkpoints), "latest", or a checkpoint dir
  bool dry_run = false;           ///< validate config and data, print sizes, exit
  std::shared_ptr<StepTimer> step_timer;  ///< null: no timing (no device syncs)
  TrainerHooks hooks;
};

/// Set by the SIGTERM/SIGUSR1/SIGINT handler; the training loop polls it at step boundaries.
std::atomic<int>& stop_signal();
/// Installs handlers for SIGTERM, SIGUSR1 and SIGINT that only set stop_signal(); a second SIGINT
/// exits at once (status 130). Install before any slow set-up, so an early signal is not lost.
void install_stop_signal_handlers();

/// The run stopped because the loss or a gradient became NaN or infinite (train.on_nonfinite).
class TrainingDiverged : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Trainer {
 public:
  /// Builds every part: validates the config, opens the data, picks the device, creates the
  /// communicators and broadcasts rank 0's initial weights. Collective.
  Trainer(const dist::Context& ctx, Config config, RunOptions options);
  ~Trainer();
  /// Trains to config.train.steps (or until a stop signal, after checkpointing). Returns the exit code.
  int run();
  /// Benchmark entry: runs `steps` optimizer steps without a run directory, checkpoints or logs
  /// (the injected StepTimer sees each one).
  void train_steps_for_benchmark(int64_t steps);

 public:
  struct Parts;  ///< every part of a run (trainer.cpp)

 private:
  std::unique_ptr<Parts> parts_;

  void start_or_resume();
  /// Throws naming every key that changes the saved weights' meaning; logs the other changes.
  void check_resume(const LoadedCheckpoint& loaded);
  /// checkpoint.keep_best on resume: the best the checkpoint records, and `best` pointed at it.
  void restore_best(const LoadedCheckpoint& loaded);
  void write_run_files();
  int train_loop();
  void train_step();
  void log_step(double elapsed);
  /// Applies train.on_nonfinite to what the device-side guard recorded (syncs; call where the
  /// loop syncs anyway). Throws TrainingDiverged to stop.
  void check_divergence();
  void sample_grid();
  /// The eval: section's evaluation of this step (collective); true when it beat the best so far
  /// under checkpoint.keep_best, which then checkpoints this step.
  bool evaluate_quality();
  /// ema.posthoc: saves every profile's average as a snapshot (collective) and logs its size.
  void snapshot_posthoc();
  void save_checkpoint();
};

}  // namespace diffuse::trainer
