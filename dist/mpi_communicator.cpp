// The MPI backend: non-blocking MPI collectives (MPI_Iallreduce, ...) on a duplicate of
// MPI_COMM_WORLD, driven to completion by MPI_Test calls with a deadline.
//
// Why a progress strategy at all: OpenMPI (like most MPI libraries without a progress thread)
// moves the data of a non-blocking collective only while some thread is inside an MPI call.
// An MPI_Iallreduce started in a gradient hook and left alone makes no progress until
// finish() waits for it, so nothing would overlap with backward. Two ways out:
//  - kThread (needs MPI_THREAD_MULTIPLE): a communication thread owns this communicator. It
//    starts collectives in submission order and polls MPI_Testall, yielding and then sleeping
//    (woken early by new submissions) so it costs little CPU while idle.
//  - kCaller: collectives start on the calling thread; Work::is_completed() and wait() call
//    MPI_Test. The gradient reducer polls its in-flight buckets from every hook.
// Either way the deadline is checked while polling, so a dead or diverged peer turns into an
// exception naming the collective instead of a hang.
#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <thread>

#include "dist/communicator.h"
#include "dist/mpi_check.h"

namespace diffuse::dist {

std::string to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAverage:
      return "average";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kMin:
      return "min";
  }
  return "unknown";
}

namespace {

using Clock = std::chrono::steady_clock;

// --- bfloat16 / float16 reductions: MPI has no 16-bit float types, so they travel as a
// 2-byte opaque type with user-defined operations that compute in float.
template <typename T, typename Combine>
void reduce_16bit(void* in, void* inout, const int* length) {
  const auto* a = static_cast<const T*>(in);
  auto* b = static_cast<T*>(inout);
  Combine combine;
  for (int i = 0; i < *length; ++i) b[i] = T(combine(static_cast<float>(a[i]), static_cast<float>(b[i])));
}
struct Plus {
  float operator()(float a, float b) const { return a + b; }
};
struct Max {
  float operator()(float a, float b) const { return std::isnan(a) || a > b ? a : b; }
};
struct Min {
  float operator()(float a, float b) const { return std::isnan(a) || a < b ? a : b; }
};
template <typename T, typename Combine>
void mpi_reduce_16bit(void* in, void* inout, int* length, MPI_Datatype*) {
  reduce_16bit<T, Combine>(in, inout, length);
}

struct HalfTypes {
  MPI_Datatype bf16 = MPI_DATATYPE_NULL, fp16 = MPI_DATATYPE_NULL;
  MPI_Op bf16_sum, bf16_max, bf16_min, fp16_sum, fp16_max, fp16_min;
};

// Created once per process (MPI handles, not state about ranks); MPI frees them at finalize.
const HalfTypes& half_types() {
  static const HalfTypes types = [] {
    HalfTypes t;
    DIFFUSE_MPI_CHECK(MPI_Type_contiguous(2, MPI_BYTE, &t.bf16));
    DIFFUSE_MPI_CHECK(MPI_Type_commit(&t.bf16));
    DIFFUSE_MPI_CHECK(MPI_Type_contiguous(2, MPI_BYTE, &t.fp16));
    DIFFUSE_MPI_CHECK(MPI_Type_commit(&t.fp16));
    DIFFUSE_MPI_CHECK(MPI_Op_create(&mpi_reduce_16bit<c10::BFloat16, Plus>, 1, &t.bf16_sum));
    DIFFUSE_MPI_CHECK(MPI_Op_create(&mpi_reduce_16bit<c10::BFloat16, Max>, 1, &t.bf16_max));
    DIFFUSE_MPI_CHECK(MPI_Op_create(&mpi_reduce_16bit<c10::BFloat16, Min>, 1, &t.bf16_min));
    DIFFUSE_MPI_CHECK(MPI_Op_create(&mpi_reduce_16bit<c10::Half, Plus>, 1, &t.fp16_sum));
    DIFFUSE_MPI_CHECK(MPI_Op_create(&mpi_reduce_16bit<c10::Half, Max>, 1, &t.fp16_max));
    DIFFUSE_MPI_CHECK(MPI_Op_create(&mpi_reduce_16bit<c10::Half, Min>, 1, &t.fp16_min));
    return t;
  }();
  return types;
}

std::string dtype_name(torch::ScalarType type) {
  switch (type) {
    case torch::kFloat:
      return "float32";
    case torch::kDouble:
      return "float64";
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kHalf:
      return "float16";
    case torch::kInt:
      return "int32";
    case torch::kLong:
      return "int64";
    default:
      return c10::toString(type);
  }
}

/// The MPI type that copies `type` bit for bit (broadcast, all_gather).
MPI_Datatype transfer_type(torch::ScalarType type) {
  switch (type) {
    case torch::kFloat:
      return MPI_FLOAT;
    case torch::kDouble:
      return MPI_DOUBLE;
    case torch::kBFloat16:
    case torch::kHalf:
      return MPI_UINT16_T;
    case torch::kInt:
      return MPI_INT32_T;
    case torch::kLong:
      return MPI_INT64_T;
    case torch::kShort:
      return MPI_INT16_T;
    case torch::kByte:
    case torch::kBool:
      return MPI_UINT8_T;
    case torch::kChar:
      return MPI_INT8_T;
    default:
      throw std::invalid_argument("MPI communicator: unsupported dtype " + dtype_name(type));
  }
}

struct Reduction {
  MPI_Datatype type;
  MPI_Op op;
};

Reduction reduction_for(torch::ScalarType type, ReduceOp op) {
  if (type == torch::kBFloat16 || type == torch::kHalf) {
    const auto& h = half_types();
    bool bf = type == torch::kBFloat16;
    switch (op) {
      case ReduceOp::kSum:
      case ReduceOp::kAverage:
        return {bf ? h.bf16 : h.fp16, bf ? h.bf16_sum : h.fp16_sum};
      case ReduceOp::kMax:
        return {bf ? h.bf16 : h.fp16, bf ? h.bf16_max : h.fp16_max};
      case ReduceOp::kMin:
        return {bf ? h.bf16 : h.fp16, bf ? h.bf16_min : h.fp16_min};
    }
  }
  if (type == torch::kBool) {
    throw std::invalid_argument("MPI communicator: all_reduce of bool tensors is not supported");
  }
  MPI_Datatype mpi_type = transfer_type(type);
  if (op == ReduceOp::kAverage && !c10::isFloatingType(type) && type != torch::kInt && type != torch::kLong) {
    throw std::invalid_argument("MPI communicator: average of " + dtype_name(type) + " is not supported");
  }
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAverage:
      return {mpi_type, MPI_SUM};
    case ReduceOp::kMax:
      return {mpi_type, MPI_MAX};
    case ReduceOp::kMin:
      return {mpi_type, MPI_MIN};
  }
  throw std::invalid_argument("MPI communicator: unknown reduce op");
}

std::string human_bytes(int64_t bytes) {
  char text[32];
  if (bytes < 1024) {
    std::snprintf(text, sizeof(text), "%lld B", static_cast<long long>(bytes));
  } else if (bytes < (int64_t{1} << 20)) {
    std::snprintf(text, sizeof(text), "%.1f KiB", bytes / 1024.0);
  } else {
    std::snprintf(text, sizeof(text), "%.1f MiB", bytes / (1024.0 * 1024.0));
  }
  return text;
}

std::string describe(const std::string& what, const torch::Tensor& tensor) {
  return what + " of " + std::to_string(tensor.numel()) + " x " + dtype_name(tensor.scalar_type()) + " (" +
         human_bytes(tensor.numel() * static_cast<int64_t>(tensor.element_size())) + ")";
}

// MPI counts are int: longer tensors go as several requests of at most this many elements.
constexpr int64_t kMaxChunk = int64_t{1} << 30;

/// One collective: how to start it, how to finish it, and where it stands.
struct Operation {
  std::string description;  // "all_reduce(sum) of 1024 x float32 (4.0 KiB)"
  uint64_t sequence = 0;    // position on this communicator, for error messages
  Clock::time_point deadline;
  std::function<void(MPI_Comm, std::vector<MPI_Request>&)> start;
  std::function<void()> finish;        // on the caller's thread, once, after completion
  std::vector<torch::Tensor> tensors;  // kept alive while MPI may touch them

  enum class State { kQueued, kRunning, kDone, kFailed };
  std::mutex mutex;
  std::condition_variable changed;
  State state = State::kQueued;
  std::string error;
  std::vector<MPI_Request> requests;
  bool finished = false;  // finish() has run
};

/// An operation on `tensor` (contiguous, on the host) started as one nonblocking call per chunk of
/// at most kMaxChunk elements: `post(chunk, count, comm, request)` posts the call for one chunk.
template <typename Post>
std::shared_ptr<Operation> chunked_operation(const std::string& what, const torch::Tensor& tensor,
                                             Post post) {
  auto operation = std::make_shared<Operation>();
  operation->description = describe(what, tensor);
  operation->tensors = {tensor};
  char* data = static_cast<char*>(tensor.data_ptr());
  const int64_t numel = tensor.numel();
  const int64_t element_size = static_cast<int64_t>(tensor.element_size());
  operation->start = [=](MPI_Comm comm, std::vector<MPI_Request>& requests) {
    for (int64_t offset = 0; offset < numel; offset += kMaxChunk) {
      const int count = static_cast<int>(std::min(kMaxChunk, numel - offset));
      requests.emplace_back(MPI_REQUEST_NULL);
      post(data + offset * element_size, count, comm, &requests.back());
    }
  };
  return operation;
}

class MpiEngine;

class MpiWork final : public Work {
 public:
  MpiWork(std::shared_ptr<MpiEngine> engine, std::shared_ptr<Operation> op)
      : engine_(std::move(engine)), op_(std::move(op)) {}
  void wait() override;
  bool is_completed() override;

 private:
  std::shared_ptr<MpiEngine> engine_;
  std::shared_ptr<Operation> op_;
};

/// Owns the MPI communicator; shared by the Communicator and its outstanding Works, so a Work
/// kept past its Communicator does not dangle.
class MpiEngine : public std::enable_shared_from_this<MpiEngine> {
 public:
  MpiEngine(MPI_Comm comm, int rank, int size, CommunicatorOptions options, bool threaded)
      : comm_(comm), rank_(rank), size_(size), options_(options), threaded_(threaded) {
    if (threaded_) thread_ = std::thread([this] { progress_loop(); });
  }

  ~MpiEngine() { shutdown(); }

  int rank() const { return rank_; }
  int size() const { return size_; }

  std::shared_ptr<Work> submit(std::shared_ptr<Operation> op) {
    {
      std::lock_guard lock(mutex_);
      throw_if_broken(op->description);
      op->sequence = ++sequence_;
      op->deadline = Clock::now() + options_.timeout;
      if (threaded_) queue_.push_back(op);
    }
    if (threaded_) {
      wake_.notify_one();
    } else {
      std::lock_guard lock(caller_mpi_mutex_);
      if (!start(*op)) throw std::runtime_error(op->error);
    }
    return std::make_shared<MpiWork>(shared_from_this(), op);
  }

  /// Non-blocking check; throws when the operation failed.
  bool test(Operation& op) {
    if (!threaded_) {
      std::lock_guard lock(caller_mpi_mutex_);
      poll(op);
    }
    std::lock_guard lock(op.mutex);
    if (op.state == Operation::State::kFailed) throw std::runtime_error(op.error);
    if (op.state != Operation::State::kDone) return false;
    run_finish(op);
    return true;
  }

  void wait(Operation& op) {
    if (!threaded_) {
      Backoff backoff(options_.mpi_max_poll_sleep);
      while (!test(op)) backoff.pause();
      return;
    }
    std::unique_lock lock(op.mutex);
    // The progress thread enforces the deadline; the margin only guards against a progress
    // thread that is itself stuck inside MPI.
    auto give_up = op.deadline + std::chrono::seconds(30);
    auto running = [&] {
      return op.state == Operation::State::kQueued || op.state == Operation::State::kRunning;
    };
    while (running()) {
      if (op.changed.wait_until(lock, give_up) == std::cv_status::timeout && running()) {
        throw std::runtime_error(timeout_message(op) + " (the communication thread stopped responding)");
      }
    }
    if (op.state == Operation::State::kFailed) throw std::runtime_error(op.error);
    run_finish(op);
  }

  /// Stops the progress thread. Collectives still in flight are abandoned, not waited for (a
  /// rank unwinding after an error must reach MPI_Abort quickly); the MPI communicator is then
  /// leaked rather than freed under a pending request.
  void shutdown() {
    if (thread_.joinable()) {
      {
        std::lock_guard lock(mutex_);
        stop_ = true;
      }
      wake_.notify_one();
      thread_.join();
    }
    if (comm_ == MPI_COMM_NULL) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    bool clean = in_flight_.load() == 0;
    {
      std::lock_guard lock(mutex_);
      clean = clean && broken_.empty() && queue_.empty();
    }
    if (!finalized && clean) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }

 private:
  /// Paces polling while nothing completes: first yields (cheap, and lets compute threads run
  /// on an oversubscribed node), then sleeps with a growing interval up to max_sleep, so a
  /// long wait costs little CPU. max_sleep 0: never sleep, only yield.
  struct Backoff {
    explicit Backoff(std::chrono::microseconds max_sleep) : max_sleep(max_sleep) {}
    std::chrono::microseconds next_sleep() {
      ++rounds;
      if (rounds <= kYieldRounds || max_sleep.count() == 0) return std::chrono::microseconds(0);
      int doublings = std::min(rounds - kYieldRounds, 10);
      return std::min(max_sleep, std::chrono::microseconds(1) * (1 << doublings));
    }
    void pause() {
      auto sleep = next_sleep();
      if (sleep.count() == 0) {
        sched_yield();
      } else {
        std::this_thread::sleep_for(sleep);
      }
    }
    void reset() { rounds = 0; }
    static constexpr int kYieldRounds = 64;
    std::chrono::microseconds max_sleep;
    int rounds = 0;
  };

  std::string where() const { return " on rank " + std::to_string(rank_) + " of " + std::to_string(size_); }

  std::string timeout_message(const Operation& op) const {
    return "MPI " + op.description + where() + " did not complete within " +
           std::to_string(options_.timeout.count()) + " ms (collective #" + std::to_string(op.sequence) +
           " on this communicator): a peer rank died, is stuck, or issued a different collective. "
           "The communicator is no longer usable.";
  }

  // mutex_ held.
  void throw_if_broken(const std::string& description) const {
    if (!broken_.empty()) {
      throw std::runtime_error("MPI " + description + where() +
                               " refused: the communicator is unusable after an earlier failure: " + broken_);
    }
  }

  void set_broken(const std::string& message) {
    std::lock_guard lock(mutex_);
    if (broken_.empty()) broken_ = message;
  }

  // Starts the MPI requests of `op` (on the thread owning MPI calls). Never throws: a failure
  // marks the operation failed and the communicator broken, and returns false.
  bool start(Operation& op) {
    ++in_flight_;
    try {
      op.start(comm_, op.requests);
    } catch (const std::exception& error) {
      mark_failed(op, "MPI " + op.description + where() + " could not start: " + error.what());
      set_broken(op.error);
      return false;
    }
    std::lock_guard lock(op.mutex);
    op.state = Operation::State::kRunning;
    return true;
  }

  // Tests one running operation (the thread owning MPI calls); marks it done, or failed at its
  // deadline. Never throws. Returns true when the operation left the running state.
  bool poll(Operation& op) {
    {
      std::lock_guard lock(op.mutex);
      if (op.state != Operation::State::kRunning) return false;
    }
    int done = 1;
    int rc = MPI_SUCCESS;
    if (!op.requests.empty()) {
      rc = MPI_Testall(static_cast<int>(op.requests.size()), op.requests.data(), &done, MPI_STATUSES_IGNORE);
    }
    if (rc != MPI_SUCCESS) {
      char text[MPI_MAX_ERROR_STRING];
      int length = 0;
      MPI_Error_string(rc, text, &length);
      mark_failed(op, "MPI " + op.description + where() + " failed: " + std::string(text, length));
      set_broken(op.error);
      return true;
    }
    if (done) {
      --in_flight_;
      std::lock_guard lock(op.mutex);
      op.state = Operation::State::kDone;
      op.changed.notify_all();
      return true;
    }
    if (Clock::now() > op.deadline) {
      // The request stays pending inside MPI (a collective cannot be cancelled), so the
      // communicator is marked unusable and never freed.
      mark_failed(op, timeout_message(op));
      set_broken(op.error);
      return true;
    }
    return false;
  }

  static void mark_failed(Operation& op, std::string message) {
    std::lock_guard lock(op.mutex);
    op.state = Operation::State::kFailed;
    op.error = std::move(message);
    op.changed.notify_all();
  }

  // op.mutex held.
  static void run_finish(Operation& op) {
    if (op.finished) return;
    op.finished = true;
    if (op.finish) op.finish();
    op.tensors.clear();
  }

  void progress_loop() {
    std::vector<std::shared_ptr<Operation>> active;
    Backoff backoff(options_.mpi_max_poll_sleep);
    while (true) {
      std::vector<std::shared_ptr<Operation>> to_start;
      {
        std::unique_lock lock(mutex_);
        if (active.empty()) wake_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (stop_) {
          // Whoever still waits on these learns why instead of waiting for the deadline.
          for (auto& op : queue_) mark_failed(*op, abandoned_message(*op));
          queue_.clear();
          break;
        }
        to_start.assign(queue_.begin(), queue_.end());
        queue_.clear();
      }
      for (auto& op : to_start) {
        std::string refusal;
        {
          std::lock_guard lock(mutex_);
          if (!broken_.empty()) {
            refusal = "MPI " + op->description + where() +
                      " refused: the communicator is unusable after an earlier failure: " + broken_;
          }
        }
        if (!refusal.empty()) {
          mark_failed(*op, refusal);
          continue;
        }
        if (start(*op)) active.push_back(op);
      }
      bool changed = !to_start.empty();
      for (auto& op : active) changed = poll(*op) || changed;
      // Completed and failed operations leave; a failed one's MPI request is abandoned.
      active.erase(std::remove_if(active.begin(), active.end(),
                                  [](const std::shared_ptr<Operation>& op) {
                                    std::lock_guard lock(op->mutex);
                                    return op->state != Operation::State::kRunning;
                                  }),
                   active.end());
      if (active.empty()) continue;  // sleeps on wake_ at the top
      if (changed) backoff.reset();
      auto sleep = backoff.next_sleep();
      if (sleep.count() == 0) {
        sched_yield();
      } else {
        std::unique_lock lock(mutex_);
        wake_.wait_for(lock, sleep, [&] { return stop_ || !queue_.empty(); });
      }
    }
    for (auto& op : active) mark_failed(*op, abandoned_message(*op));
  }

  std::string abandoned_message(const Operation& op) const {
    return "MPI " + op.description + where() +
           " abandoned: the communicator was destroyed before it completed";
  }

  MPI_Comm comm_;
  int rank_;
  int size_;
  CommunicatorOptions options_;
  bool threaded_;

  std::mutex mutex_;  // guards queue_, broken_, sequence_, stop_
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Operation>> queue_;
  std::string broken_;  // first fatal error; the communicator refuses work afterwards
  uint64_t sequence_ = 0;
  bool stop_ = false;
  std::atomic<int64_t> in_flight_{0};  // started and not completed (failed ones stay counted)
  std::mutex caller_mpi_mutex_;        // kCaller: serialises this communicator's MPI calls
  std::thread thread_;
};

void MpiWork::wait() { engine_->wait(*op_); }
bool MpiWork::is_completed() { return engine_->test(*op_); }

void check_host_tensor(const torch::Tensor& tensor, const std::string& what) {
  if (!tensor.defined()) throw std::invalid_argument("MPI " + what + ": the tensor is undefined");
  if (!tensor.device().is_cpu()) {
    throw std::invalid_argument("MPI " + what + ": the tensor is on " + tensor.device().str() +
                                "; the MPI communicator takes host tensors (use make_nccl_communicator "
                                "for CUDA tensors)");
  }
}

void check_contiguous(const torch::Tensor& tensor, const std::string& what) {
  if (!tensor.is_contiguous()) {
    throw std::invalid_argument("MPI " + what + ": the tensor must be contiguous (it is updated in place)");
  }
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(const Context& ctx, CommunicatorOptions options) {
    if (options.timeout.count() <= 0) {
      throw std::invalid_argument("communicator timeout must be positive, got " +
                                  std::to_string(options.timeout.count()) + " ms");
    }
    bool multiple = ctx.thread_level() >= MPI_THREAD_MULTIPLE;
    bool threaded = options.mpi_progress == MpiProgress::kThread ||
                    (options.mpi_progress == MpiProgress::kAuto && multiple);
    if (threaded && !multiple) {
      throw std::invalid_argument(
          "MpiProgress::kThread needs MPI_THREAD_MULTIPLE but the MPI library granted thread level " +
          std::to_string(ctx.thread_level()) +
          "; use MpiProgress::kCaller or an MPI built with thread support");
    }
    half_types();  // create the 16-bit types and ops on this thread, before any collective
    MPI_Comm comm = MPI_COMM_NULL;
    DIFFUSE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm));
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    engine_ = std::make_shared<MpiEngine>(comm, ctx.rank(), ctx.world_size(), options, threaded);
  }

  ~MpiCommunicator() override { engine_->shutdown(); }

  int rank() const override { return engine_->rank(); }
  int size() const override { return engine_->size(); }
  std::string backend() const override { return "mpi"; }

  void all_reduce(torch::Tensor& tensor, ReduceOp op) override { all_reduce_async(tensor, op)->wait(); }

  std::shared_ptr<Work> all_reduce_async(torch::Tensor tensor, ReduceOp op) override {
    std::string what = "all_reduce(" + to_string(op) + ")";
    check_host_tensor(tensor, what);
    check_contiguous(tensor, what);
    Reduction reduction = reduction_for(tensor.scalar_type(), op);
    auto post = [reduction](char* chunk, int count, MPI_Comm comm, MPI_Request* request) {
      DIFFUSE_MPI_CHECK(
          MPI_Iallreduce(MPI_IN_PLACE, chunk, count, reduction.type, reduction.op, comm, request));
    };
    auto operation = chunked_operation(what, tensor, post);
    if (op == ReduceOp::kAverage && size() > 1) {
      int world = size();
      operation->finish = [tensor, world]() mutable {
        torch::NoGradGuard no_grad;
        if (c10::isFloatingType(tensor.scalar_type())) {
          tensor.div_(world);
        } else {
          tensor.div_(world, "trunc");
        }
      };
    }
    return engine_->submit(operation);
  }

  void broadcast(torch::Tensor& tensor, int root) override {
    std::string what = "broadcast(root " + std::to_string(root) + ")";
    check_host_tensor(tensor, what);
    check_contiguous(tensor, what);
    if (root < 0 || root >= size()) {
      throw std::invalid_argument("MPI broadcast: root " + std::to_string(root) + " outside 0.." +
                                  std::to_string(size() - 1));
    }
    MPI_Datatype type = transfer_type(tensor.scalar_type());
    auto post = [type, root](char* chunk, int count, MPI_Comm comm, MPI_Request* request) {
      DIFFUSE_MPI_CHECK(MPI_Ibcast(chunk, count, type, root, comm, request));
    };
    auto operation = chunked_operation(what, tensor, post);
    engine_->submit(operation)->wait();
  }

  torch::Tensor all_gather(const torch::Tensor& tensor) override {
    check_host_tensor(tensor, "all_gather");
    torch::Tensor input = tensor.contiguous();
    if (input.numel() > INT_MAX) {
      throw std::invalid_argument("MPI all_gather: " + std::to_string(input.numel()) +
                                  " elements per rank exceed MPI's int count");
    }
    std::vector<int64_t> shape{size()};
    shape.insert(shape.end(), input.sizes().begin(), input.sizes().end());
    torch::Tensor output = torch::empty(shape, input.options());
    MPI_Datatype type = transfer_type(input.scalar_type());
    auto operation = std::make_shared<Operation>();
    operation->description = describe("all_gather", input);
    operation->tensors = {input, output};
    void* send = input.data_ptr();
    void* receive = output.data_ptr();
    int count = static_cast<int>(input.numel());
    operation->start = [=](MPI_Comm comm, std::vector<MPI_Request>& requests) {
      requests.emplace_back(MPI_REQUEST_NULL);
      DIFFUSE_MPI_CHECK(MPI_Iallgather(send, count, type, receive, count, type, comm, &requests.back()));
    };
    engine_->submit(operation)->wait();
    return output;
  }

  void barrier() override {
    auto operation = std::make_shared<Operation>();
    operation->description = "barrier";
    operation->start = [](MPI_Comm comm, std::vector<MPI_Request>& requests) {
      requests.emplace_back(MPI_REQUEST_NULL);
      DIFFUSE_MPI_CHECK(MPI_Ibarrier(comm, &requests.back()));
    };
    engine_->submit(operation)->wait();
  }

 private:
  std::shared_ptr<MpiEngine> engine_;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(const Context& ctx, CommunicatorOptions options) {
  return std::make_unique<MpiCommunicator>(ctx, options);
}

}  // namespace diffuse::dist
