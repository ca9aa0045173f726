// dist/communicator.h: collective communication between the ranks of a job, one interface with
// two backends: MPI on host tensors (CPU training, and every multi-rank test on GPU-less
// machines) and NCCL on CUDA tensors.
//
//   auto comm = diffuse::dist::make_mpi_communicator(ctx);
//   comm->all_reduce(grads, ReduceOp::kAverage);                  // blocking, in place
//   auto work = comm->all_reduce_async(bucket, ReduceOp::kSum);   // overlaps with the caller
//   ...; work->wait();                                            // throws on error or timeout
//
// Every rank must issue the same collectives in the same order (as with MPI and NCCL
// themselves). Calls from several threads are safe but their order is then the caller's to fix
// (the gradient reducer issues everything under its own lock). A collective that does not complete within CommunicatorOptions::timeout throws
// a message naming the operation, its size and the rank, and leaves the communicator unusable:
// the caller lets the exception reach main(), which aborts the job.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "dist/context.h"

namespace diffuse::dist {

/// Reduction applied by all_reduce. kAverage divides the sum by the world size (integer
/// tensors truncate toward zero, as NCCL's ncclAvg does).
enum class ReduceOp { kSum, kAverage, kMax, kMin };

/// "sum", "average", "max", "min".
std::string to_string(ReduceOp op);

/// Handle of an asynchronous collective. The tensors it works on must not be touched until it
/// has completed.
class Work {
 public:
  virtual ~Work() = default;
  /// Blocks until the collective has completed; throws on error or timeout, naming the
  /// operation, its size and the rank. After it returns the result is in place.
  virtual void wait() = 0;
  /// Non-blocking: true once the result is in place (also drives progress where the backend
  /// needs the caller's help). Throws like wait() when the collective failed.
  virtual bool is_completed() = 0;
};

/// How the MPI backend makes a non-blocking collective progress (OpenMPI moves data only inside
/// MPI calls).
enum class MpiProgress {
  kAuto,    ///< kThread when MPI granted MPI_THREAD_MULTIPLE, else kCaller
  kThread,  ///< a communication thread owns the MPI communicator and polls it
  kCaller,  ///< collectives start on the calling thread; wait()/is_completed() drive them
};

/// Settings shared by both backends.
struct CommunicatorOptions {
  /// A collective not completed within this time throws (and the communicator is unusable).
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};
  /// MPI backend only.
  MpiProgress mpi_progress = MpiProgress::kAuto;
  /// MPI backend: the longest pause between two MPI_Test calls while a collective is in flight
  /// and not completing (polling first yields, then sleeps 2, 4, ... up to this). Shorter
  /// moves data sooner, longer leaves more CPU to computation; 0 only yields.
  std::chrono::microseconds mpi_max_poll_sleep{50};
};

/// Collectives over every rank of the job.
class Communicator {
 public:
  virtual ~Communicator() = default;
  /// This process's rank in the communicator (the world rank).
  virtual int rank() const = 0;
  /// Number of ranks.
  virtual int size() const = 0;
  /// "mpi" or "nccl".
  virtual std::string backend() const = 0;
  /// Where this communicator's tensors live (host for MPI, the GPU for NCCL).
  virtual torch::Device device() const { return torch::kCPU; }

  /// In-place reduction of a contiguous tensor over all ranks. Dtypes: float32, float64,
  /// bfloat16, float16, int32, int64 (and uint8/int8 for kSum/kMax/kMin).
  virtual void all_reduce(torch::Tensor& tensor, ReduceOp op) = 0;
  /// all_reduce without waiting; the Work keeps the tensor alive.
  virtual std::shared_ptr<Work> all_reduce_async(torch::Tensor tensor, ReduceOp op) = 0;
  /// Copies root's tensor into every rank's tensor (same shape and dtype everywhere).
  virtual void broadcast(torch::Tensor& tensor, int root) = 0;
  /// Every rank's tensor stacked in rank order: shape [size, ...tensor.sizes()].
  virtual torch::Tensor all_gather(const torch::Tensor& tensor) = 0;
  /// Returns once every rank has entered it.
  virtual void barrier() = 0;
};

/// MPI backend on host tensors. Duplicates MPI_COMM_WORLD, so its traffic never mixes with the
/// Context's. Destroy it before the Context (which finalises MPI).
std::unique_ptr<Communicator> make_mpi_communicator(const Context& ctx, CommunicatorOptions options = {});

/// NCCL backend on `device` (a CUDA device, normally select_device(ctx, true)). The NCCL unique
/// id is made on rank 0 and broadcast with MPI; collectives run on the communicator's own CUDA
/// stream, ordered after the caller's current stream. Throws a clear error in a build without
/// CUDA or when no GPU is usable.
std::unique_ptr<Communicator> make_nccl_communicator(const Context& ctx, torch::Device device,
                                                     CommunicatorOptions options = {});

/// Whether this build has the NCCL backend.
bool nccl_available();

/// The device this rank should compute on: CPU when !want_cuda, else the CUDA device of its
/// local rank (which it also makes current). Respects CUDA_VISIBLE_DEVICES, including launchers
/// that give each task its own GPU. Collective over the ranks of a node: every rank calls it.
/// Throws when there is no GPU or more ranks on a node than visible GPUs.
torch::Device select_device(const Context& ctx, bool want_cuda);

/// The inputs of select_device's rule, gathered from the ranks of one node.
struct LocalGpuView {
  int local_rank = 0;
  int local_world_size = 1;
  int visible_gpus = 0;                    ///< devices this rank's CUDA runtime reports
  std::vector<std::string> visible_masks;  ///< CUDA_VISIBLE_DEVICES of each local rank ("" = unset)
  std::string hostname;
  int world_rank = 0;
};

/// select_device's rule, without touching CUDA: the index of the visible device this rank
/// uses. Ranks whose CUDA_VISIBLE_DEVICES name disjoint GPUs (the launcher bound one per task)
/// use their first visible device; otherwise local rank i uses device i. Throws with the
/// numbers and how to launch correctly when that cannot work.
int choose_cuda_device(const LocalGpuView& view);

}  // namespace diffuse::dist
