// trainer/posthoc_training.h: post-hoc EMA in a training run and in the commands that read it.
//
// A run with `ema.posthoc: {sigma_rels: [0.05, 0.28], snapshot_every: K}` keeps one PowerEma per
// sigma_rel over the online weights (updated after every optimizer step) and, every K steps, saves
// each profile's average as a snapshot: a checkpoint of its own (sharded over the ranks, each shard
// checksummed, published atomically; trainer/checkpoint.h), in bf16 unless ema.posthoc.dtype: fp32:
//
//   RUN/posthoc/sigma_rel-0.05/step-000500/{shard-*.h5, manifest.json}
//   RUN/posthoc/sigma_rel-0.28/step-000500/...
//
// Each snapshot's manifest metadata carries posthoc_sigma_rel, posthoc_gamma and posthoc_ema_step
// (the average's update count, the step ema-pytorch's synthesis uses). The live fp32 averages and
// their counts are part of every training checkpoint ("posthoc.<sigma_rel>.<param>",
// "posthoc_state.<sigma_rel>.step/.initialized"), so a resume continues them exactly; snapshots
// newer than the resumed step (written after it by the interrupted run) are removed, and the
// resumed run writes them again, identically.
//
// Afterwards, synthesize_posthoc_weights() combines the snapshots up to a checkpoint's step into any
// sigma_rel (Karras et al. 2024, Algorithm 3), reading one snapshot at a time.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "dist/context.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/posthoc_ema.h"

namespace diffuse::trainer {

/// RUN/posthoc for a run directory.
std::filesystem::path posthoc_directory(const std::filesystem::path& run_dir);
/// The run directory of a checkpoint directory (RUN/checkpoints/step-N -> RUN).
std::filesystem::path run_of_checkpoint(const std::filesystem::path& checkpoint_dir);
/// The spelling of a sigma_rel in names (directory and tensor prefixes), e.g. "0.05".
std::string sigma_rel_text(double sigma_rel);

/// What one round of snapshots wrote (bytes filled on rank 0).
struct SnapshotReport {
  int64_t step = 0;
  int64_t bytes = 0;        ///< this round, all profiles, shards and manifests
  int64_t total_bytes = 0;  ///< everything under RUN/posthoc after it
  double seconds = 0.0;
};

class PosthocTraining {
 public:
  /// `params`: the online parameters (tracked in place); `names`: their state-dict names.
  PosthocTraining(const EmaConfig& config, std::vector<torch::Tensor> params, std::vector<std::string> names,
                  std::filesystem::path run_dir, const dist::HostCollective& host);
  ~PosthocTraining();

  /// After every optimizer step.
  void update();
  bool snapshot_due(int64_t step) const { return step % snapshot_every_ == 0; }
  /// Collective: saves every profile's average at `step`; throws CheckpointError as a save does.
  SnapshotReport snapshot(int64_t step, const std::string& config_yaml);

  /// The live averages and counts, for the training checkpoint.
  NamedTensors state() const;
  /// Restores state() from a checkpoint; throws naming a missing tensor (e.g. a checkpoint written
  /// before ema.posthoc was configured).
  void load_state(const NamedTensors& replicated);
  /// Rank 0: removes the snapshots of steps after `step` (those of an interrupted future).
  /// Returns how many were removed.
  int discard_snapshots_after(int64_t step) const;

  size_t profiles() const { return emas_.size(); }

 private:
  std::vector<double> sigma_rels_;
  int64_t snapshot_every_;
  bool bf16_;
  std::vector<std::string> names_;
  std::filesystem::path dir_;
  const dist::HostCollective& host_;
  std::vector<std::unique_ptr<PowerEma>> emas_;
};

/// One snapshot found on disk.
struct SnapshotFile {
  std::filesystem::path directory;
  double sigma_rel = 0.0;
  PosthocSnapshot snapshot;  ///< the average's update count and its gamma
};
/// Every complete snapshot of a run up to `max_step` (all profiles), ordered by profile then step.
/// Throws std::invalid_argument when the run has none, naming the directory.
std::vector<SnapshotFile> list_snapshots(const std::filesystem::path& run_dir, int64_t max_step);

/// The weights of the post-hoc profile `sigma_rel` at the last snapshot step <= `max_step`,
/// synthesized from the snapshots (each read and verified in turn, one in memory at a time), under
/// the names the snapshots hold (the network's state-dict names), float32.
NamedTensors synthesize_posthoc_weights(const std::filesystem::path& run_dir, int64_t max_step, double sigma_rel);

}  // namespace diffuse::trainer
