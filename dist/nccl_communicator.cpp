// The NCCL backend and the choice of CUDA device.
//
// NCCL collectives run on the communicator's own CUDA stream. Each one is ordered after the
// caller's current stream with an event (so it sees gradients the compute stream produced), and
// records a completion event that Work::wait() polls on the host together with
// ncclCommGetAsyncError, against a deadline. On timeout or an asynchronous NCCL error the
// communicator is aborted (ncclCommAbort makes the kernels of a dead peer's collective return)
// and the wait throws, naming the collective. The communicator is created non-blocking for the
// same reason: a peer that never joins turns into an error, not a hang in ncclCommInitRank.
#include <mpi.h>
#include <sched.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "diffuse/build_config.h"
#include "dist/communicator.h"
#include "dist/mpi_check.h"

#if DIFFUSE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif

namespace diffuse::dist {

namespace {

std::vector<std::string> split_mask(const std::string& mask) {
  std::vector<std::string> entries;
  std::stringstream stream(mask);
  std::string entry;
  while (std::getline(stream, entry, ',')) {
    auto first = entry.find_first_not_of(" \t");
    auto last = entry.find_last_not_of(" \t");
    if (first != std::string::npos) entries.push_back(entry.substr(first, last - first + 1));
  }
  return entries;
}

std::string mask_text(const std::string& mask) { return mask.empty() ? "unset" : "'" + mask + "'"; }

#if DIFFUSE_WITH_CUDA
// Every rank of the node's CUDA_VISIBLE_DEVICES, in local-rank order (collective on the node).
std::vector<std::string> gather_node_masks() {
  const char* env = std::getenv("CUDA_VISIBLE_DEVICES");
  std::string mine = env ? env : "";
  MPI_Comm node = MPI_COMM_NULL;
  int rank = 0;
  DIFFUSE_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
  DIFFUSE_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node));
  int size = 1;
  MPI_Comm_size(node, &size);
  int length = static_cast<int>(mine.size());
  std::vector<int> lengths(size), offsets(size);
  DIFFUSE_MPI_CHECK(MPI_Allgather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, node));
  int total = 0;
  for (int r = 0; r < size; ++r) {
    offsets[r] = total;
    total += lengths[r];
  }
  std::string joined(static_cast<size_t>(total), '\0');
  DIFFUSE_MPI_CHECK(MPI_Allgatherv(mine.data(), length, MPI_CHAR, joined.data(), lengths.data(),
                                   offsets.data(), MPI_CHAR, node));
  MPI_Comm_free(&node);
  std::vector<std::string> masks;
  for (int r = 0; r < size; ++r) masks.push_back(joined.substr(offsets[r], lengths[r]));
  return masks;
}
#endif

}  // namespace

int choose_cuda_device(const LocalGpuView& view) {
  std::string who = "rank " + std::to_string(view.world_rank) + " (local rank " +
                    std::to_string(view.local_rank) + " of " + std::to_string(view.local_world_size) +
                    " on host '" + view.hostname + "')";
  std::string mine = view.local_rank < static_cast<int>(view.visible_masks.size())
                         ? view.visible_masks[view.local_rank]
                         : std::string();
  if (view.visible_gpus <= 0) {
    throw std::runtime_error(who + ": CUDA was requested but no GPU is visible (CUDA_VISIBLE_DEVICES " +
                             mask_text(mine) +
                             "). Check the driver with nvidia-smi and CUDA_VISIBLE_DEVICES, "
                             "or run on the CPU.");
  }
  bool complete = static_cast<int>(view.visible_masks.size()) == view.local_world_size;
  bool all_set = complete;
  bool all_same = true;
  for (const auto& mask : view.visible_masks) {
    all_set = all_set && !split_mask(mask).empty();
    all_same = all_same && mask == view.visible_masks.front();
  }
  // A launcher that binds GPUs per task (srun --gpus-per-task=1, a wrapper script) gives every
  // rank its own CUDA_VISIBLE_DEVICES: then each rank uses the first device it sees.
  if (view.local_world_size > 1 && all_set && !all_same) {
    std::set<std::string> seen;
    bool disjoint = true;
    for (const auto& mask : view.visible_masks) {
      for (const auto& entry : split_mask(mask)) disjoint = seen.insert(entry).second && disjoint;
    }
    if (disjoint) return 0;
  }
  if (!all_same) {
    std::string list;
    for (size_t r = 0; r < view.visible_masks.size(); ++r) {
      list += (r ? ", " : "") + std::string("local rank ") + std::to_string(r) + ": " +
              mask_text(view.visible_masks[r]);
    }
    throw std::runtime_error(
        who + ": the ranks on this host see different but overlapping GPUs (" + list +
        "). Give every rank the same CUDA_VISIBLE_DEVICES, or each rank GPUs of its own.");
  }
  if (view.local_world_size > view.visible_gpus) {
    throw std::runtime_error(
        who + ": " + std::to_string(view.local_world_size) + " ranks on host '" + view.hostname +
        "' but only " + std::to_string(view.visible_gpus) + " visible GPU(s) (CUDA_VISIBLE_DEVICES " +
        mask_text(mine) + "). Start at most " + std::to_string(view.visible_gpus) +
        " ranks per node (mpirun --npernode N, srun --ntasks-per-node=N) or bind one GPU per task "
        "(srun --gpus-per-task=1).");
  }
  return view.local_rank;
}

#if DIFFUSE_WITH_CUDA

bool nccl_available() { return true; }

torch::Device select_device(const Context& ctx, bool want_cuda) {
  if (!want_cuda) return torch::kCPU;
  LocalGpuView view;
  view.world_rank = ctx.rank();
  view.local_rank = ctx.local_rank();
  view.local_world_size = ctx.local_world_size();
  view.hostname = ctx.world().hostname;
  view.visible_masks = gather_node_masks();
  view.visible_gpus = static_cast<int>(torch::cuda::device_count());
  int index = choose_cuda_device(view);
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(index));
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
}

namespace {

using Clock = std::chrono::steady_clock;

#define DIFFUSE_CUDA_CHECK(call)                                                                         \
  do {                                                                                                   \
    cudaError_t diffuse_cuda_rc_ = (call);                                                               \
    if (diffuse_cuda_rc_ != cudaSuccess) {                                                               \
      throw std::runtime_error(std::string(#call) + " failed: " + cudaGetErrorString(diffuse_cuda_rc_) + \
                               " (" + __FILE__ + ":" + std::to_string(__LINE__) + ")");                  \
    }                                                                                                    \
  } while (0)

ncclDataType_t nccl_type(torch::ScalarType type) {
  switch (type) {
    case torch::kFloat:
      return ncclFloat32;
    case torch::kDouble:
      return ncclFloat64;
    case torch::kHalf:
      return ncclFloat16;
    case torch::kBFloat16:
      return ncclBfloat16;
    case torch::kInt:
      return ncclInt32;
    case torch::kLong:
      return ncclInt64;
    case torch::kByte:
    case torch::kBool:
      return ncclUint8;
    case torch::kChar:
      return ncclInt8;
    default:
      throw std::invalid_argument(std::string("NCCL communicator: unsupported dtype ") + c10::toString(type));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kAverage:
      return ncclAvg;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  throw std::invalid_argument("NCCL communicator: unknown reduce op");
}

std::string describe(const std::string& what, const torch::Tensor& tensor) {
  return what + " of " + std::to_string(tensor.numel()) + " x " + c10::toString(tensor.scalar_type()) + " (" +
         std::to_string(tensor.numel() * static_cast<int64_t>(tensor.element_size())) + " bytes)";
}

/// The NCCL communicator and its stream, shared with outstanding Works.
class NcclState {
 public:
  NcclState(const Context& ctx, torch::Device device, CommunicatorOptions options)
      : device_(device),
        rank_(ctx.rank()),
        size_(ctx.world_size()),
        options_(options),
        stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device.index())) {
    c10::cuda::CUDAGuard guard(device_);
    ncclUniqueId id;
    if (rank_ == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    // The id travels over MPI: every rank constructs its communicator at the same point.
    DIFFUSE_MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t rc = ncclCommInitRankConfig(&comm_, size_, id, rank_, &config);
    if (rc != ncclSuccess && rc != ncclInProgress) {
      throw std::runtime_error("ncclCommInitRankConfig" + where() + " failed: " + ncclGetErrorString(rc));
    }
    settle("communicator initialisation (ncclCommInitRankConfig)", Clock::now() + options_.timeout);
  }

  ~NcclState() {
    if (comm_ == nullptr) return;
    std::lock_guard lock(mutex_);
    if (!broken_.empty()) return;  // aborted already
    c10::cuda::CUDAGuard guard(device_);
    // Flush outstanding work, then free; a peer gone missing here must not hang shutdown.
    ncclResult_t rc = ncclCommFinalize(comm_);
    auto deadline =
        Clock::now() + std::min<std::chrono::milliseconds>(options_.timeout, std::chrono::seconds(30));
    ncclResult_t state = rc;
    while (state == ncclInProgress && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      ncclCommGetAsyncError(comm_, &state);
    }
    if (state == ncclSuccess) {
      ncclCommDestroy(comm_);
    } else {
      ncclCommAbort(comm_);
    }
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  torch::Device device() const { return device_; }
  std::string where() const {
    return " on rank " + std::to_string(rank_) + " of " + std::to_string(size_) + " (" + device_.str() + ")";
  }

  /// Enqueues `launch` on the communication stream after the caller's current stream.
  struct Launched {
    cudaEvent_t done;
    Clock::time_point deadline;
  };
  Launched launch(const std::string& description, const std::vector<torch::Tensor>& tensors,
                  const std::function<ncclResult_t(ncclComm_t, cudaStream_t)>& call) {
    std::lock_guard lock(mutex_);  // NCCL calls on one communicator must not interleave
    if (!broken_.empty()) {
      throw std::runtime_error("NCCL " + description + where() +
                               " refused: the communicator was aborted after an earlier failure: " + broken_);
    }
    c10::cuda::CUDAGuard guard(device_);
    auto deadline = Clock::now() + options_.timeout;
    cudaStream_t compute = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
    cudaEvent_t ready = nullptr;
    DIFFUSE_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    DIFFUSE_CUDA_CHECK(cudaEventRecord(ready, compute));
    DIFFUSE_CUDA_CHECK(cudaStreamWaitEvent(stream_.stream(), ready, 0));
    DIFFUSE_CUDA_CHECK(cudaEventDestroy(ready));  // released once the wait has been satisfied
    ncclResult_t rc = call(comm_, stream_.stream());
    if (rc != ncclSuccess && rc != ncclInProgress)
      fail_locked("NCCL " + description + where() + " failed: " + ncclGetErrorString(rc));
    settle_locked("NCCL " + description, deadline);
    // The caching allocator must not hand these blocks to the compute stream until the
    // communication stream is done with them.
    for (const auto& tensor : tensors) {
      c10::cuda::CUDACachingAllocator::recordStream(tensor.storage().data_ptr(), stream_);
    }
    cudaEvent_t done = nullptr;
    DIFFUSE_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    DIFFUSE_CUDA_CHECK(cudaEventRecord(done, stream_.stream()));
    return {done, deadline};
  }

  /// True once `done` has fired; throws on an asynchronous NCCL error or past the deadline
  /// (after aborting the communicator).
  bool test(cudaEvent_t done, Clock::time_point deadline, const std::string& description) {
    std::lock_guard lock(mutex_);
    if (!broken_.empty()) {
      throw std::runtime_error("NCCL " + description + where() +
                               " failed: the communicator was aborted: " + broken_);
    }
    cudaError_t status = cudaEventQuery(done);
    if (status == cudaSuccess) return true;
    if (status != cudaErrorNotReady) {
      fail_locked("NCCL " + description + where() + ": CUDA error " + cudaGetErrorString(status));
    }
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(comm_, &async);
    if (async != ncclSuccess && async != ncclInProgress) {
      fail_locked("NCCL " + description + where() + " failed asynchronously: " + ncclGetErrorString(async) +
                  " (" + ncclGetLastError(comm_) + ")");
    }
    if (Clock::now() > deadline) {
      fail_locked(
          "NCCL " + description + where() + " did not complete within " +
          std::to_string(options_.timeout.count()) +
          " ms: a peer rank died, is stuck, or issued a different collective. The communicator was aborted.");
    }
    return false;
  }

 private:
  static void check(ncclResult_t rc, const char* what) {
    if (rc != ncclSuccess) throw std::runtime_error(std::string(what) + " failed: " + ncclGetErrorString(rc));
  }

  void settle(const std::string& what, Clock::time_point deadline) {
    std::lock_guard lock(mutex_);
    settle_locked(what, deadline);
  }

  // A non-blocking communicator may still be busy with the last call: wait until it is not.
  void settle_locked(const std::string& what, Clock::time_point deadline) {
    ncclResult_t state = ncclInProgress;
    while (true) {
      ncclCommGetAsyncError(comm_, &state);
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) {
        fail_locked(what + where() + " failed: " + ncclGetErrorString(state) + " (" +
                    ncclGetLastError(comm_) + ")");
      }
      if (Clock::now() > deadline) {
        fail_locked(what + where() + " did not finish within " + std::to_string(options_.timeout.count()) +
                    " ms (is every rank starting it?). The communicator was aborted.");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  [[noreturn]] void fail_locked(const std::string& message) {
    if (broken_.empty()) {
      broken_ = message;
      ncclCommAbort(comm_);
    }
    throw std::runtime_error(message);
  }

  torch::Device device_;
  int rank_;
  int size_;
  CommunicatorOptions options_;
  c10::cuda::CUDAStream stream_;
  ncclComm_t comm_ = nullptr;
  std::mutex mutex_;
  std::string broken_;
};

class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<NcclState> state, std::string description, std::vector<torch::Tensor> tensors,
           NcclState::Launched launched)
      : state_(std::move(state)),
        description_(std::move(description)),
        tensors_(std::move(tensors)),
        launched_(launched) {}
  ~NcclWork() override { cudaEventDestroy(launched_.done); }

  bool is_completed() override {
    if (completed_) return true;
    if (!state_->test(launched_.done, launched_.deadline, description_)) return false;
    // Whatever the caller runs next on its stream sees the result.
    c10::cuda::CUDAGuard guard(state_->device());
    DIFFUSE_CUDA_CHECK(cudaStreamWaitEvent(c10::cuda::getCurrentCUDAStream(state_->device().index()).stream(),
                                           launched_.done, 0));
    completed_ = true;
    tensors_.clear();
    return true;
  }

  void wait() override {
    int rounds = 0;
    while (!is_completed()) {
      if (++rounds < 64) {
        sched_yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(std::min(20 * (rounds - 63), 500)));
      }
    }
  }

 private:
  std::shared_ptr<NcclState> state_;
  std::string description_;
  std::vector<torch::Tensor> tensors_;
  NcclState::Launched launched_;
  bool completed_ = false;
};

void check_cuda_tensor(const torch::Tensor& tensor, torch::Device device, const std::string& what) {
  if (!tensor.defined()) throw std::invalid_argument("NCCL " + what + ": the tensor is undefined");
  if (tensor.device() != device) {
    throw std::invalid_argument("NCCL " + what + ": the tensor is on " + tensor.device().str() +
                                ", the communicator on " + device.str());
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const Context& ctx, torch::Device device, CommunicatorOptions options)
      : state_(std::make_shared<NcclState>(ctx, device, options)) {}

  int rank() const override { return state_->rank(); }
  int size() const override { return state_->size(); }
  std::string backend() const override { return "nccl"; }
  torch::Device device() const override { return state_->device(); }

  void all_reduce(torch::Tensor& tensor, ReduceOp op) override { all_reduce_async(tensor, op)->wait(); }

  std::shared_ptr<Work> all_reduce_async(torch::Tensor tensor, ReduceOp op) override {
    std::string what = "all_reduce(" + to_string(op) + ")";
    check_cuda_tensor(tensor, device(), what);
    if (!tensor.is_contiguous())
      throw std::invalid_argument("NCCL " + what + ": the tensor must be contiguous");
    if (tensor.scalar_type() == torch::kBool)
      throw std::invalid_argument("NCCL all_reduce of bool tensors is not supported");
    auto type = nccl_type(tensor.scalar_type());
    auto reduction = nccl_op(op);
    std::string description = describe(what, tensor);
    auto launched = state_->launch(description, {tensor}, [&](ncclComm_t comm, cudaStream_t stream) {
      return ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), type, reduction, comm,
                           stream);
    });
    return std::make_shared<NcclWork>(state_, description, std::vector<torch::Tensor>{tensor}, launched);
  }

  void broadcast(torch::Tensor& tensor, int root) override {
    std::string what = "broadcast(root " + std::to_string(root) + ")";
    check_cuda_tensor(tensor, device(), what);
    if (!tensor.is_contiguous())
      throw std::invalid_argument("NCCL " + what + ": the tensor must be contiguous");
    if (root < 0 || root >= size()) throw std::invalid_argument("NCCL " + what + ": root outside the world");
    auto type = nccl_type(tensor.scalar_type());
    std::string description = describe(what, tensor);
    auto launched = state_->launch(description, {tensor}, [&](ncclComm_t comm, cudaStream_t stream) {
      return ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), type, root, comm, stream);
    });
    NcclWork(state_, description, {tensor}, launched).wait();
  }

  torch::Tensor all_gather(const torch::Tensor& tensor) override {
    check_cuda_tensor(tensor, device(), "all_gather");
    torch::Tensor input = tensor.contiguous();
    std::vector<int64_t> shape{size()};
    shape.insert(shape.end(), input.sizes().begin(), input.sizes().end());
    torch::Tensor output = torch::empty(shape, input.options());
    auto type = nccl_type(input.scalar_type());
    std::string description = describe("all_gather", input);
    auto launched = state_->launch(description, {input, output}, [&](ncclComm_t comm, cudaStream_t stream) {
      return ncclAllGather(input.data_ptr(), output.data_ptr(), input.numel(), type, comm, stream);
    });
    NcclWork(state_, description, {input, output}, launched).wait();
    return output;
  }

  void barrier() override {
    auto token = torch::zeros({1}, torch::TensorOptions().dtype(torch::kInt).device(device()));
    auto launched = state_->launch("barrier", {token}, [&](ncclComm_t comm, cudaStream_t stream) {
      return ncclAllReduce(token.data_ptr(), token.data_ptr(), 1, ncclInt32, ncclSum, comm, stream);
    });
    NcclWork(state_, "barrier", {token}, launched).wait();
  }

 private:
  std::shared_ptr<NcclState> state_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(const Context& ctx, torch::Device device,
                                                     CommunicatorOptions options) {
  if (options.timeout.count() <= 0) {
    throw std::invalid_argument("communicator timeout must be positive, got " +
                                std::to_string(options.timeout.count()) + " ms");
  }
  if (!device.is_cuda() || !device.has_index()) {
    throw std::invalid_argument(
        "make_nccl_communicator needs a CUDA device with an index (from select_device), got " + device.str());
  }
  if (!torch::cuda::is_available()) {
    throw std::runtime_error("make_nccl_communicator on rank " + std::to_string(ctx.rank()) +
                             ": CUDA is not available on this machine (no GPU or no driver)");
  }
  return std::make_unique<NcclCommunicator>(ctx, device, options);
}

#else  // !DIFFUSE_WITH_CUDA

bool nccl_available() { return false; }

torch::Device select_device(const Context& ctx, bool want_cuda) {
  if (!want_cuda) return torch::kCPU;
  throw std::runtime_error(
      "rank " + std::to_string(ctx.rank()) +
      ": CUDA was requested but this build of diffuse has no CUDA (DIFFUSE_WITH_CUDA=0); "
      "rebuild with a CUDA LibTorch and the CUDA toolkit, or train on the CPU");
}

std::unique_ptr<Communicator> make_nccl_communicator(const Context& ctx, torch::Device, CommunicatorOptions) {
  throw std::runtime_error(
      "rank " + std::to_string(ctx.rank()) +
      ": the NCCL communicator is not in this build (DIFFUSE_WITH_CUDA=0); rebuild with a "
      "CUDA LibTorch and the CUDA toolkit, or use the MPI communicator");
}

#endif

}  // namespace diffuse::dist
