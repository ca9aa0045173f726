// trainer/checkpoint.h: sharded, atomic, verifiable, reshardable checkpoints.
//
//   CheckpointStore store(run.checkpoints(), ctx, {.keep_last = 3, .keep_every = 10000});
//   store.save({.step = step, .replicated = state, .per_rank = {{"rng", rng}}, .config_yaml = yaml});
//   if (auto loaded = store.load("latest")) { ... loaded->replicated ... }   // every rank calls both
//
// On disk (RUN/checkpoints/):
//
//   latest                          symlink to "step-000200" (relative), replaced atomically by rename
//   best                            (checkpoint.keep_best only) symlink to the best evaluation's
//                                   checkpoint, moved the same way; retention never removes it
//   step-000200/
//     shard-00000-of-00002.h5       one HDF5 file per saving rank
//     shard-00001-of-00002.h5
//     manifest.json                 written last: a directory without it is not a checkpoint
//   step-000200.tmp/                only while a save is in flight (removed if the save fails)
//
// Shards. Every replicated tensor (model, EMA shadows, optimizer moments, loss-scaler and timestep
// resampler state: identical on every rank) is stored exactly once, in one shard, as a dataset at
// the file's root named as given (e.g. "model.downs.0.0.block1.proj.weight"). The ranks split them
// balanced by bytes (greedy, largest first, ties by name, into the lightest shard, ties by lowest
// rank), so saving costs each rank about 1/W of the state. A rank's own tensors (its RNG and loader
// state) go into its own shard as "rank<r>.<name>". Each dataset has the tensor's shape and dtype
// (bfloat16 as uint16 bits with the dataset attribute dtype = "bfloat16": in Python
// torch.from_numpy(a).view(torch.bfloat16); see data/hdf5_tensors.h).
// Root attributes (strings): format = "diffuse-checkpoint-shard", format_version, step, rank,
// world_size. In Python:
//
//   import h5py, json; m = json.load(open("step-000200/manifest.json"))
//   t = m["tensors"]["model.final_conv.weight"]
//   w = h5py.File("step-000200/" + m["shards"][t["shard"]]["file"])["model.final_conv.weight"][()]
//
// manifest.json (UTF-8 JSON, keys in this order, tensors in save order):
//
//   { "format": "diffuse-checkpoint", "format_version": 1, "step": 200, "world_size": 2,
//     "created": "2025-01-31T12:00:00Z", "diffuse_version": "0.1.0", "git_hash": "abc1234",
//     "metadata": {"elapsed_seconds": "812.5", ...},        // strings, as the trainer gave them
//     "config": "model:\n  dim: 64\n...",                   // the resolved YAML of the run
//     "shards": [{"file": "shard-00000-of-00002.h5", "rank": 0, "bytes": 123, "sha256": "9f..."}, ...],
//     "tensors": {"model.x": {"kind": "replicated", "shard": 0, "dtype": "float32", "shape": [64, 3],
//                             "bytes": 768},
//                 "rank1.rng": {"kind": "per_rank", "rank": 1, "shard": 1, "dtype": "uint8", ...}, ...} }
//
// Save protocol (collective): rank 0 creates step-N.tmp/; each rank writes and fsyncs its shard,
// then hashes it; the ranks agree (all-reduce) that every shard is written; rank 0 writes the
// manifest, fsyncs it and the directory, renames step-N.tmp to step-N, fsyncs the parent, points
// `latest` at it (symlink + rename) and applies retention. A failure anywhere is agreed on by all
// ranks: the temporary directory is removed, older checkpoints and `latest` are untouched, and every
// rank throws the same CheckpointError naming the failing ranks and causes, so a caller may carry on.
// The checkpoint directory must be on a filesystem every rank sees (checked at each save).
//
// Load protocol (collective): rank 0 picks the candidates (for "latest": the directory `latest`
// points to, then older complete ones, newest first); for each, the manifest is parsed, each shard's
// size and SHA-256 are checked (shard i by rank i mod W, each shard hashed once), and every rank
// reads the tensors it needs and checks their presence, dtype and shape. A corrupt, truncated or
// incomplete `latest` is reported in the warnings and the next good one is used; an explicitly named
// directory that fails is an error. Every rank reads every shard's replicated tensors, so loading
// reads the checkpoint W times (fine up to a few GB of state on a shared filesystem).
//
// Resharding: a checkpoint saved by W ranks loads on any number of ranks. Replicated tensors do not
// care. Per-rank tensors: rank r gets saved rank r's when r < W, otherwise saved rank (r mod W)'s
// with `per_rank_inherited` set (the caller decides what inherited state means, e.g. re-derive the
// loader position from the global sample count and re-seed the RNG from (seed, rank)).
//
// The manifest's schema and JSON live in trainer/checkpoint_manifest.h; `diffuse inspect`'s summary
// in trainer/checkpoint_inspect.h.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "dist/context.h"
#include "trainer/checkpoint_manifest.h"

namespace diffuse::trainer {

/// Named tensors in a fixed order.
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

/// What a checkpoint holds. Tensors may live on any device; they are saved from a CPU copy.
struct CheckpointContents {
  int64_t step = 0;
  /// Identical on every rank (checked: names, dtypes and shapes must agree); each stored once.
  /// Names must be unique, without '/', and must not start with "rank<digits>.".
  NamedTensors replicated;
  /// This rank's own tensors, stored in its shard as "rank<r>.<name>" (names without '/').
  NamedTensors per_rank;
  /// The resolved configuration (taken from rank 0).
  std::string config_yaml;
  /// Free-form string facts, e.g. elapsed_seconds, samples_seen (taken from rank 0).
  std::map<std::string, std::string> metadata;
  /// The step `best` names once this save is published: this step or an earlier complete
  /// checkpoint, which retention then keeps whatever keep_last says (taken from rank 0).
  /// nullopt: `best` is neither written nor moved, and retention ignores it.
  std::optional<int64_t> best_step;
};

/// A checkpoint read back. Tensors are on the CPU, contiguous, in the order they were saved.
struct LoadedCheckpoint {
  std::filesystem::path directory;
  int64_t step = 0;
  int saved_world_size = 0;
  NamedTensors replicated;
  /// The per-rank tensors of saved rank `per_rank_source` (names without the "rank<r>." prefix).
  NamedTensors per_rank;
  /// The saved rank this rank's per-rank tensors come from; -1 when they were not loaded.
  int per_rank_source = -1;
  /// True when this rank did not exist in the saved world and got saved rank (r mod W)'s state.
  bool per_rank_inherited = false;
  std::string config_yaml;
  std::map<std::string, std::string> metadata;
  std::string created;          ///< ISO 8601 UTC time of the save
  std::string diffuse_version;  ///< of the program that wrote it
  std::string git_hash;         ///< of the program that wrote it
  /// Checkpoints skipped on the way (e.g. "checkpoint .../step-000200 is unusable: shard 1 ...").
  std::vector<std::string> warnings;
};

/// Which checkpoints survive a save: the newest `keep_last` by step (0: all), every step that is a
/// multiple of `keep_every` (0: none), and always the one just written.
struct RetentionPolicy {
  int64_t keep_last = 3;
  int64_t keep_every = 0;
};

/// What a save did. `bytes`, `removed` and `warnings` are filled on rank 0 only.
struct SavedCheckpoint {
  std::filesystem::path directory;
  int64_t bytes = 0;                           ///< all shards and the manifest
  double seconds = 0.0;                        ///< wall time of the whole save, retention included
  std::vector<std::filesystem::path> removed;  ///< checkpoints deleted by retention
  std::vector<std::string> warnings;           ///< e.g. a retention deletion that failed
};

/// Called by each rank right after it wrote its shard of step `step`; a throw fails that rank's
/// part of the save (after the file exists, so cleanup is exercised). For fault tests only: the
/// program installs one from DIFFUSE_TEST_FAIL_CHECKPOINT_RANK/_STEP (app/test_hooks.cpp).
using ShardWrittenHook = std::function<void(int rank, int64_t step, const std::filesystem::path& shard)>;

/// Called while a checkpoint is read, after each shard this rank reads: bytes read so far and in
/// all (the manifest's sizes), for a progress line.
using LoadProgress = std::function<void(int64_t bytes_done, int64_t bytes_total)>;

/// The checkpoints of one run directory, shared by all ranks.
class CheckpointStore {
 public:
  /// `checkpoints_dir` is created on the first save. Throws std::invalid_argument on a negative policy.
  CheckpointStore(std::filesystem::path checkpoints_dir, const dist::HostCollective& ranks,
                  RetentionPolicy policy = {}, ShardWrittenHook after_shard_written = {});

  /// Collective: every rank calls it with the same step. Writes step-NNNNNN/ atomically, then
  /// points `latest` at it, then applies retention. Throws CheckpointError on every rank when any
  /// rank failed, leaving the previous checkpoints and `latest` as they were.
  SavedCheckpoint save(const CheckpointContents& contents);

  /// Collective. `which` is "latest" or a checkpoint directory (absolute, relative to the working
  /// directory, or a name inside the checkpoints directory such as "step-000100"); rank 0's value
  /// is used. Returns nullopt for "latest" when there is no checkpoint at all; throws
  /// CheckpointError when checkpoints exist but none is usable, or an explicit directory is bad.
  std::optional<LoadedCheckpoint> load(const std::string& which, const LoadProgress& progress = {});

  /// Complete checkpoints (those with a manifest), newest step first. Local: any rank, no MPI.
  std::vector<std::filesystem::path> list() const;

  const std::filesystem::path& directory() const { return dir_; }

 private:
  std::filesystem::path dir_;
  const dist::HostCollective& ranks_;
  RetentionPolicy policy_;
  ShardWrittenHook after_shard_written_;
};

/// Points `checkpoints_dir/best` at step-NNNNNN (which must be a complete checkpoint) with the
/// atomic symlink-and-rename `latest` uses. Local (rank 0 calls it, e.g. to restore the link a
/// resumed checkpoint names); a save moves it itself (CheckpointContents::best_step).
void point_best_at(const std::filesystem::path& checkpoints_dir, int64_t step);

/// Where a path given on the command line points: a checkpoint directory (with a manifest), or
/// a run directory, a checkpoints directory or a `latest` link (then the newest good checkpoint
/// first, older ones after it as fallbacks). `warnings` name what was skipped. Throws
/// CheckpointError when the path is none of these.
struct CheckpointCandidates {
  bool explicit_dir = false;  ///< one named directory: any defect is an error
  std::vector<std::filesystem::path> dirs;
  std::vector<std::string> warnings;
};
CheckpointCandidates locate_checkpoints(const std::filesystem::path& path);

/// Size and (optionally) SHA-256 of one shard against the manifest; "" when it checks out,
/// otherwise the problem in words.
std::string verify_shard(const std::filesystem::path& dir, const ShardEntry& shard, bool verify_hash);

/// Reads one checkpoint in a single process without collectives (for `diffuse sample/export/eval`
/// and scripts). `path` is a checkpoint directory (strict: any defect throws), or a run directory,
/// a checkpoints directory or a `latest` link (the newest good checkpoint, falling back with
/// warnings like load("latest")). Verifies every shard's hash. Returns the replicated tensors only
/// (per_rank empty, per_rank_source -1). Throws CheckpointError when nothing usable is found.
LoadedCheckpoint read_checkpoint_single_process(const std::filesystem::path& path,
                                                const LoadProgress& progress = {});

/// Writes a checkpoint into `checkpoints_dir` exactly as a save by `ranks.size()` ranks would
/// (rank r's contents at index r), from one process, retention included. For tests and tools that
/// need a checkpoint of another world size; the real trainer uses CheckpointStore::save.
std::filesystem::path write_checkpoint_as_world(const std::filesystem::path& checkpoints_dir,
                                                const std::vector<CheckpointContents>& ranks,
                                                RetentionPolicy policy = {});

}  // namespace diffuse::trainer
