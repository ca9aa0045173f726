// data/loader.h: the sharded, prefetching, resumable batch loader over a dataset file.
//
//   diffuse::data::Loader loader({.path = "shapes.h5", .batch_size = 64, .rank = ctx.rank(),
//                                 .world_size = ctx.world_size(), .seed = 42, .expected_size = 32});
//   loader.restore(saved_state);          // optional: continue a run exactly
//   for (...) { auto batch = loader.next(); ... checkpoint.loader = loader.state(); }
//
// Sampling (DistributedSampler semantics, made exact under a change of world size):
// - epoch e visits the samples in the order perm_e, a permutation of [0, N) that depends only
//   on (seed, e) (Fisher-Yates driven by splitmix64; no global RNG, no thread timing);
// - a global batch is B * W consecutive entries of perm_e from the global position p; rank r
//   takes perm_e[p + r + W * m] for m = 0..B-1 (strided), so after k steps the W ranks together
//   consumed exactly perm_e[0, k * B * W), whatever W was;
// - the last incomplete global batch of an epoch is dropped: an epoch has floor(N / (B * W))
//   batches on every rank, and the next epoch starts at p = 0;
// - the random horizontal flip of the sample at position q of epoch e is a pure function of
//   (seed, e, q), so it does not depend on W or on threads either.
// Pixels v in 0..255 become v / 127.5 - 1 in [-1, 1], laid out [B, C, H, W].
//
// Threads: one I/O thread makes the loader's HDF5 reads (a batch's indices sorted, one read per
// run of neighbouring indices; every HDF5 call in the process also takes one process-wide
// lock); worker threads reorder, flip and convert to float; at most `prefetch_batches` batches
// are read ahead of next(). Errors on those threads are carried to next() (std::exception_ptr)
// with the image index and the file.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>

#include "data/dataset.h"

namespace diffuse::data {

/// What a Loader reads and how: the file, this rank's share, the seed, threads and checks.
struct LoaderOptions {
  std::filesystem::path path;
  int64_t batch_size = 32;  ///< per rank
  int rank = 0;
  int world_size = 1;
  uint64_t seed = 0;
  bool random_flip = true;
  int worker_threads = 2;    ///< 0: the I/O thread also converts
  int prefetch_batches = 4;  ///< batches read ahead of next(), >= 1
  /// Checked at open time against the model: image side (height and width) and channels.
  std::optional<int64_t> expected_size;
  std::optional<int64_t> expected_channels;
  /// A class-conditional model's class count: the dataset must have labels, all in [0, num_classes)
  /// (checked at open time, naming the file and the first offending index).
  std::optional<int64_t> num_classes;
  /// CUDA: batches are converted into pinned host memory and copied with non_blocking on the
  /// stream current when next() is called.
  torch::Device device = torch::kCPU;
  /// Test hook, called on the I/O thread before it reads global batch k (k = the global step
  /// the batch belongs to: samples consumed before it / (batch_size * world_size)); e.g. to
  /// simulate a stuck rank or a failing read. An exception it throws surfaces from next().
  std::function<void(int64_t)> before_batch_hook;
};

/// Where the sample stream stands; a checkpoint stores it (see Loader::restore).
struct LoaderState {
  int64_t epoch = 0;
  int64_t position = 0;      ///< samples of this epoch's permutation consumed globally (all ranks)
  uint64_t seed = 0;
  int64_t samples_seen = 0;  ///< global, all epochs
};

/// Where a loader's time went, summed over its lifetime (seconds).
struct LoaderStats {
  int64_t batches = 0;         ///< batches next() returned
  double wait_seconds = 0;     ///< next() blocked waiting for a batch: the loader's cost to training
  double read_seconds = 0;     ///< the I/O thread reading from the file (HDF5)
  double convert_seconds = 0;  ///< worker threads reordering, flipping, converting to float
};

/// One batch of this rank.
struct Batch {
  torch::Tensor images;   ///< [B, C, H, W] float32 in [-1, 1], on options.device
  torch::Tensor labels;   ///< [B] int64 on options.device; undefined when the dataset has none
  torch::Tensor indices;  ///< [B] int64 dataset indices, on the CPU
};

/// Batches of one rank from a dataset file; see the top of this header for the semantics.
class Loader {
 public:
  /// Opens and validates the dataset (read_dataset_info's checks, plus the expected size and
  /// channels and at least batch_size * world_size images). Reading ahead starts with the
  /// first next(), so restoring right after construction wastes no reads.
  explicit Loader(LoaderOptions options);
  /// Stops and joins its threads (waiting for a before_batch_hook that is running).
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  /// The next batch of this rank; blocks until it is ready. Rethrows an error of the I/O or
  /// worker threads (naming the file and image index); once failed, every call rethrows it.
  Batch next();
  /// The state right after the last batch next() returned (prefetched batches not counted).
  LoaderState state() const;
  /// Stops and drops prefetched work and continues from `state` (adopting its seed); reading
  /// resumes with the next next(). The next batches are
  /// those an uninterrupted run would produce next, also when world size or batch size differ
  /// from the run that saved it (then the global position carries over with the new sharding).
  void restore(const LoaderState& state);
  /// floor(N / (batch_size * world_size)): the same on every rank.
  int64_t batches_per_epoch() const;
  const DatasetInfo& info() const;
  const LoaderOptions& options() const;
  /// Seconds next() spent waiting for batches in total: the loader's cost to training.
  double wait_seconds_total() const;
  /// Batches delivered and the time spent waiting, reading and converting.
  LoaderStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Epoch `epoch`'s sample order: a permutation of [0, count) that depends only on (seed, epoch).
std::vector<int64_t> epoch_permutation(int64_t count, uint64_t seed, int64_t epoch);

/// Whether the sample at position `position` of epoch `epoch`'s permutation is mirrored.
bool flip_sample(uint64_t seed, int64_t epoch, int64_t position);

}  // namespace diffuse::data
