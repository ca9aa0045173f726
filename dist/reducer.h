// dist/reducer.h: data-parallel gradient averaging that overlaps with backward, what PyTorch
// DDP's Reducer does.
//
//   dist::broadcast_tensors(model_state, comm);                 // same weights everywhere
//   dist::GradReducer reducer(model->parameters(), comm);
//   for (each step) {
//     for (int micro = 0; micro < k; ++micro) {
//       reducer.prepare_for_backward(/*sync=*/micro == k - 1);  // no communication before the last
//       loss(micro).backward();                                // buckets all-reduce as grads arrive
//     }
//     reducer.finish();                                        // grads now hold the world average
//     optimizer.step();
//     optimizer.zero_grad(/*set_to_none=*/false);              // keeps grads as bucket views
//   }
//
// How it works. Parameters (requiring grad) are grouped into buckets of about
// bucket_cap_mb (the first one smaller, so communication starts early), in reverse registration
// order, since backward produces gradients roughly last layer first. Each parameter gets a hook
// on its gradient accumulator (as DDP does) that fires once its gradient for this backward is
// complete; when a bucket's gradients are all in, its all-reduce starts asynchronously while
// backward goes on. Buckets start strictly in bucket-index order on every rank (a ready bucket
// waits for lower ones), because ranks must issue collectives in the same order. After the first
// synchronising iteration the buckets are rebuilt once from the order gradients actually arrived
// on rank 0 (broadcast, so identical everywhere).
//
// Gradients as bucket views (gradient_as_bucket_view): each parameter's grad becomes a view into
// its bucket's flat buffer, so backward accumulates straight into the buffer and no copy is made
// before or after the all-reduce. zero_grad(set_to_none=true) drops the views; the next
// synchronising backward then copies each new gradient into the bucket once and re-installs the
// view (correct, just one copy more per step).
//
// Parameters without a gradient. A parameter whose hook did not fire during a synchronising
// backward (unused in this forward on this rank) contributes its current grad if it has one
// (from earlier no_sync micro-steps) and zeros otherwise, so no rank ever waits for a bucket
// that cannot fill. After finish() every parameter's grad is defined and identical on all
// ranks; a parameter that no rank used gets a zero gradient (a single process would leave it
// undefined, which optimizers skip; with momentum or weight decay a zero gradient still moves
// it). Buckets holding an unused parameter start only in finish(), so they do not overlap.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dist/communicator.h"

namespace diffuse::dist {

/// Bucketing and transport settings of GradReducer.
struct ReducerOptions {
  double bucket_cap_mb = 25.0;  ///< target bucket size (MiB); a larger parameter gets a bucket of its own
  double first_bucket_cap_mb = 1.0;  ///< the first bucket(s), small so the first all-reduce starts early
  /// Gradients travel in this dtype (bfloat16 or float16), pre-divided by the world size; the
  /// result is cast back to the parameter dtype. Only applies to floating-point buckets wider
  /// than it.
  std::optional<torch::ScalarType> compress_dtype;
  bool gradient_as_bucket_view = true;  ///< grads are views into the bucket buffers (no copies)
};

/// What the last synchronising iteration did. Times are seconds since prepare_for_backward().
struct ReducerStats {
  double exposed_comm_seconds = 0;  ///< time finish() spent (communication not hidden behind backward)
  int64_t buckets = 0;
  int64_t bytes = 0;                        ///< bytes all-reduced by this rank (after compression)
  std::vector<double> bucket_launch_times;  ///< when each bucket's all-reduce started, by bucket index
  std::vector<double> bucket_done_times;    ///< when the reducer saw each bucket's all-reduce complete
  double last_grad_ready_time = 0;          ///< the last gradient hook of the backward
  double backward_end_time = 0;             ///< finish() was called (backward had returned)
  std::vector<int64_t> buckets_launched_in_backward;  ///< indices of buckets started before finish()
};

/// Averages gradients over all ranks, overlapping the communication with backward.
/// Not copyable or movable (its hooks point at it); destroy it before its Communicator.
class GradReducer {
 public:
  /// `parameters` in registration order (e.g. module->parameters()); those not requiring grad
  /// are ignored, and a tensor listed twice (tied weights) counts once. Every rank must pass the
  /// same shapes and dtypes in the same order (checked: collective).
  GradReducer(std::vector<torch::Tensor> parameters, Communicator& comm, ReducerOptions options = {});
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  /// Call before each backward. sync=false: a gradient-accumulation micro-step, no
  /// communication (DDP's no_sync); gradients just accumulate.
  void prepare_for_backward(bool sync);
  /// After a synchronising backward: starts what backward did not, waits for every bucket, and
  /// leaves every grad holding the world average. After a no_sync backward: does nothing.
  void finish();

  /// Statistics of the last synchronising iteration.
  const ReducerStats& last_stats() const { return stats_; }
  /// Number of buckets.
  int64_t bucket_count() const { return static_cast<int64_t>(buckets_.size()); }
  /// Parameter indices of each bucket, into the parameters requiring grad in the order given
  /// (duplicates removed).
  std::vector<std::vector<int64_t>> bucket_assignment() const;
  /// Whether the buckets were already rebuilt from the observed gradient order.
  bool buckets_rebuilt() const { return rebuilt_; }

 private:
  struct Bucket;
  struct Hook;
  void mark_ready(size_t index);
  void mark_ready_locked(size_t index, bool from_hook);
  void launch_ready_buckets_locked();
  void launch_locked(size_t bucket_index);
  void poll_in_flight_locked();
  void build_buckets(const std::vector<size_t>& order);
  void rebuild_from_arrival_order();
  double now() const;

  std::vector<torch::Tensor> params_;
  Communicator& comm_;
  ReducerOptions options_;
  std::vector<std::unique_ptr<Bucket>> buckets_;
  struct Locator {
    size_t bucket = 0;
    size_t slot = 0;
  };
  std::vector<Locator> locators_;
  std::vector<std::pair<std::shared_ptr<torch::autograd::Node>, uintptr_t>> hooks_;

  std::mutex mutex_;           // hooks may run on autograd worker threads
  bool expect_hooks_ = false;  // inside a synchronising backward
  bool in_iteration_ = false;  // prepare_for_backward(true) called, finish() not yet
  bool sync_ = false;
  std::vector<char> ready_;
  std::vector<size_t> arrival_order_;
  size_t next_bucket_ = 0;
  bool rebuilt_ = false;
  std::chrono::steady_clock::time_point start_;
  ReducerStats stats_;
};

/// Copies root's values of `tensors` (parameters and buffers) into every rank's, in place.
/// Coalesces by dtype into few collectives. Collective: every rank passes the same shapes.
void broadcast_tensors(const std::vector<torch::Tensor>& tensors, Communicator& comm, int root = 0);

/// Proves every rank holds bit-identical `tensors`: all-gathers a hash of each tensor's bytes and
/// throws, naming `what`, the first rank that differs from rank 0 and the first differing tensor.
void verify_identical(const std::vector<torch::Tensor>& tensors, Communicator& comm, const std::string& what);

}  // namespace diffuse::dist
