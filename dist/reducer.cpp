// The bucketed gradient reducer, plus the start-of-training helpers (broadcast, identity check).
// See dist/reducer.h for the behaviour; this file says why it is done this way.
#include "dist/reducer.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstring>
#include <map>
#include <numeric>
#include <set>

namespace diffuse::dist {

namespace {

using Clock = std::chrono::steady_clock;

// A 64-bit hash of bytes (FNV-style on 8-byte words): for equality checks, not security.
uint64_t hash_bytes(const void* data, size_t size, uint64_t seed) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  uint64_t hash = 1469598103934665603ULL ^ seed;
  size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    uint64_t word;
    std::memcpy(&word, bytes + i, 8);
    hash = (hash ^ word) * 1099511628211ULL;
    hash ^= hash >> 29;
  }
  for (; i < size; ++i) hash = (hash ^ bytes[i]) * 1099511628211ULL;
  return hash ^ (hash >> 32);
}

uint64_t tensor_bytes_hash(const torch::Tensor& tensor) {
  auto host = tensor.detach().contiguous().cpu();
  uint64_t hash = hash_bytes(host.sizes().data(), host.sizes().size() * sizeof(int64_t),
                             static_cast<uint64_t>(host.scalar_type()));
  return hash_bytes(host.data_ptr(), host.numel() * host.element_size(), hash);
}

bool same_memory(const torch::Tensor& a, const torch::Tensor& b) {
  return a.defined() && b.defined() && a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() &&
         a.strides() == b.strides() && a.scalar_type() == b.scalar_type();
}

// Row r of an all-gathered [size, n] int64 tensor differs from row 0 where? (-1, -1): nowhere.
std::pair<int, int64_t> first_difference(const torch::Tensor& gathered) {
  auto rows = gathered.cpu().contiguous();
  auto* data = rows.data_ptr<int64_t>();
  int64_t n = rows.size(1);
  for (int64_t r = 1; r < rows.size(0); ++r) {
    for (int64_t j = 0; j < n; ++j) {
      if (data[r * n + j] != data[j]) return {static_cast<int>(r), j};
    }
  }
  return {-1, -1};
}

}  // namespace

struct GradReducer::Bucket {
  std::vector<size_t> params;        // parameter indices, in bucket order
  std::vector<torch::Tensor> views;  // views of `buffer` shaped like each parameter
  torch::Tensor buffer;              // flat gradients of the bucket
  torch::Tensor transit;             // compressed copy sent instead of `buffer` (if compressing)
  size_t pending = 0;                // parameters not yet ready in this iteration
  bool launched = false;
  bool done = false;
  std::shared_ptr<Work> work;
};

struct GradReducer::Hook : torch::autograd::FunctionPostHook {
  Hook(GradReducer* reducer, size_t index) : reducer(reducer), index(index) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    reducer->mark_ready(index);
    return outputs;
  }
  GradReducer* reducer;
  size_t index;
};

GradReducer::GradReducer(std::vector<torch::Tensor> parameters, Communicator& comm, ReducerOptions options)
    : comm_(comm), options_(options) {
  if (options_.bucket_cap_mb <= 0 || options_.first_bucket_cap_mb <= 0) {
    throw std::invalid_argument("GradReducer: bucket_cap_mb and first_bucket_cap_mb must be positive, got " +
                                std::to_string(options_.bucket_cap_mb) + " and " +
                                std::to_string(options_.first_bucket_cap_mb));
  }
  if (options_.compress_dtype && *options_.compress_dtype != torch::kBFloat16 &&
      *options_.compress_dtype != torch::kHalf) {
    throw std::invalid_argument(std::string("GradReducer: compress_dtype must be bfloat16 or float16, got ") +
                                c10::toString(*options_.compress_dtype));
  }
  std::set<const void*> seen;
  for (size_t i = 0; i < parameters.size(); ++i) {
    const auto& p = parameters[i];
    if (!p.defined())
      throw std::invalid_argument("GradReducer: parameter " + std::to_string(i) + " is undefined");
    if (!p.requires_grad()) continue;
    if (!p.is_leaf()) {
      throw std::invalid_argument(
          "GradReducer: parameter " + std::to_string(i) +
          " is not a leaf tensor (pass the module's parameters, not results computed from them)");
    }
    if (p.is_sparse())
      throw std::invalid_argument("GradReducer: sparse parameter " + std::to_string(i) + " unsupported");
    // A tied parameter listed twice has one gradient and one accumulator: reduce it once.
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    params_.push_back(p);
  }

  // Every rank must bucket the same parameters identically, or collectives mismatch in size.
  {
    std::vector<int64_t> signature{static_cast<int64_t>(params_.size())};
    uint64_t hash = 0;
    for (const auto& p : params_) {
      int64_t fields[3] = {p.numel(), static_cast<int64_t>(p.scalar_type()),
                           static_cast<int64_t>(p.device().type())};
      hash = hash_bytes(fields, sizeof(fields), hash);
    }
    signature.push_back(static_cast<int64_t>(hash));
    auto mine = torch::tensor(signature, torch::TensorOptions().dtype(torch::kLong)).to(comm_.device());
    auto [rank, field] = first_difference(comm_.all_gather(mine));
    if (rank >= 0) {
      throw std::runtime_error("GradReducer: rank " + std::to_string(rank) + " registered " +
                               (field == 0 ? "a different number of" : "differently shaped or typed") +
                               " parameters than rank 0 (every rank must build the same model)");
    }
  }

  std::vector<size_t> order(params_.size());
  std::iota(order.rbegin(), order.rend(), size_t{0});  // reverse registration order
  build_buckets(order);
  ready_.assign(params_.size(), 0);

  for (size_t i = 0; i < params_.size(); ++i) {
    // The accumulator is held weakly by the parameter; keeping it here keeps the hook alive.
    auto accumulator = torch::autograd::impl::grad_accumulator(params_[i]);
    if (!accumulator)
      throw std::invalid_argument("GradReducer: parameter " + std::to_string(i) + " has no grad accumulator");
    uintptr_t key = accumulator->add_post_hook(std::make_unique<Hook>(this, i));
    hooks_.emplace_back(std::move(accumulator), key);
  }
}

GradReducer::~GradReducer() {
  for (auto& [accumulator, key] : hooks_) accumulator->del_post_hook(key);
  // Buckets still in flight (an exception interrupted the iteration) are left to the
  // communicator: their Works keep the buffers alive.
}

double GradReducer::now() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

std::vector<std::vector<int64_t>> GradReducer::bucket_assignment() const {
  std::vector<std::vector<int64_t>> result;
  for (const auto& bucket : buckets_) result.emplace_back(bucket->params.begin(), bucket->params.end());
  return result;
}

void GradReducer::build_buckets(const std::vector<size_t>& order) {
  torch::NoGradGuard no_grad;
  const double mib = 1024.0 * 1024.0;
  const auto first_cap = static_cast<int64_t>(options_.first_bucket_cap_mb * mib);
  const auto cap = static_cast<int64_t>(options_.bucket_cap_mb * mib);
  // Parameters of one dtype and device share a bucket; each kind fills its own open bucket.
  struct Open {
    std::vector<size_t> params;
    int64_t bytes = 0;
    int closed = 0;
  };
  std::map<std::pair<int, std::string>, Open> open;
  std::vector<std::vector<size_t>> groups;
  for (size_t index : order) {
    const auto& p = params_[index];
    auto& bucket = open[{static_cast<int>(p.scalar_type()), p.device().str()}];
    bucket.params.push_back(index);
    bucket.bytes += p.numel() * static_cast<int64_t>(p.element_size());
    if (bucket.bytes >= (bucket.closed == 0 ? first_cap : cap)) {
      groups.push_back(std::move(bucket.params));
      bucket.params.clear();
      bucket.bytes = 0;
      ++bucket.closed;
    }
  }
  for (auto& [key, bucket] : open) {
    if (!bucket.params.empty()) groups.push_back(std::move(bucket.params));
  }
  // Launch order follows the order the first gradient of each bucket is expected.
  std::vector<size_t> position(params_.size());
  for (size_t i = 0; i < order.size(); ++i) position[order[i]] = i;
  std::stable_sort(groups.begin(), groups.end(),
                   [&](const auto& a, const auto& b) { return position[a.front()] < position[b.front()]; });

  std::vector<std::unique_ptr<Bucket>> buckets;
  locators_.assign(params_.size(), Locator{});
  for (size_t k = 0; k < groups.size(); ++k) {
    auto bucket = std::make_unique<Bucket>();
    bucket->params = std::move(groups[k]);
    int64_t total = 0;
    for (size_t index : bucket->params) total += params_[index].numel();
    const auto& first = params_[bucket->params.front()];
    bucket->buffer = torch::zeros({total}, first.options().requires_grad(false));
    int64_t offset = 0;
    for (size_t slot = 0; slot < bucket->params.size(); ++slot) {
      auto& p = params_[bucket->params[slot]];
      // An alias made with set_() rather than an autograd view: LibTorch's
      // Optimizer::zero_grad() calls detach_() on each grad, which autograd refuses for views.
      auto view = torch::empty({0}, bucket->buffer.options());
      view.set_(bucket->buffer.storage(), bucket->buffer.storage_offset() + offset, p.sizes(),
                c10::contiguous_strides(p.sizes()));
      offset += p.numel();
      // Existing gradients (a rebuild, or grads from before construction) move into the bucket.
      auto& grad = p.mutable_grad();
      if (grad.defined()) {
        view.copy_(grad);
        if (options_.gradient_as_bucket_view) grad = view;
      }
      bucket->views.push_back(view);
      locators_[bucket->params[slot]] = Locator{k, slot};
    }
    bool compress = options_.compress_dtype && c10::isFloatingType(first.scalar_type()) &&
                    static_cast<int64_t>(c10::elementSize(*options_.compress_dtype)) <
                        static_cast<int64_t>(first.element_size());
    if (compress)
      bucket->transit =
          torch::empty({total}, first.options().dtype(*options_.compress_dtype).requires_grad(false));
    buckets.push_back(std::move(bucket));
  }
  buckets_ = std::move(buckets);
}

void GradReducer::rebuild_from_arrival_order() {
  // Rank 0's observed order, completed with the parameters that produced no gradient, decides
  // for everyone: the assignment must be identical on all ranks.
  std::vector<int64_t> order;
  std::vector<char> listed(params_.size(), 0);
  for (size_t index : arrival_order_) {
    order.push_back(static_cast<int64_t>(index));
    listed[index] = 1;
  }
  for (size_t i = params_.size(); i-- > 0;) {
    if (!listed[i]) order.push_back(static_cast<int64_t>(i));
  }
  auto shared = torch::tensor(order, torch::TensorOptions().dtype(torch::kLong)).to(comm_.device());
  comm_.broadcast(shared, 0);
  shared = shared.cpu();
  std::vector<size_t> decided;
  std::vector<char> seen(params_.size(), 0);
  for (int64_t i = 0; i < shared.numel(); ++i) {
    int64_t index = shared[i].item<int64_t>();
    if (index < 0 || index >= static_cast<int64_t>(params_.size()) || seen[index]) {
      throw std::runtime_error("GradReducer: rank 0's gradient order is not a permutation of this rank's " +
                               std::to_string(params_.size()) + " parameters");
    }
    seen[index] = 1;
    decided.push_back(static_cast<size_t>(index));
  }
  build_buckets(decided);
  rebuilt_ = true;
}

void GradReducer::prepare_for_backward(bool sync) {
  std::lock_guard lock(mutex_);
  if (in_iteration_ && sync_) {
    throw std::logic_error(
        "GradReducer::prepare_for_backward() called again before finish() of the previous "
        "synchronising backward");
  }
  in_iteration_ = true;
  sync_ = sync;
  expect_hooks_ = sync;
  if (!sync) return;
  start_ = Clock::now();
  std::fill(ready_.begin(), ready_.end(), 0);
  arrival_order_.clear();
  next_bucket_ = 0;
  for (auto& bucket : buckets_) {
    bucket->pending = bucket->params.size();
    bucket->launched = false;
    bucket->done = false;
    bucket->work.reset();
  }
  stats_ = ReducerStats{};
  stats_.buckets = bucket_count();
  stats_.bucket_launch_times.assign(buckets_.size(), 0.0);
  stats_.bucket_done_times.assign(buckets_.size(), 0.0);
}

void GradReducer::mark_ready(size_t index) {
  torch::NoGradGuard no_grad;
  std::lock_guard lock(mutex_);
  if (!expect_hooks_) return;  // a no_sync micro-step, or a backward the reducer was not told of
  mark_ready_locked(index, /*from_hook=*/true);
  poll_in_flight_locked();
}

void GradReducer::mark_ready_locked(size_t index, bool from_hook) {
  if (ready_[index]) {
    throw std::logic_error("GradReducer: parameter " + std::to_string(index) +
                           " received a gradient twice in one synchronising iteration; call "
                           "prepare_for_backward() before each backward");
  }
  ready_[index] = 1;
  if (from_hook) {
    arrival_order_.push_back(index);
    stats_.last_grad_ready_time = now();
  }
  const auto& locator = locators_[index];
  auto& bucket = *buckets_[locator.bucket];
  auto& view = bucket.views[locator.slot];
  auto& grad = params_[index].mutable_grad();
  if (grad.defined()) {
    if (!same_memory(grad, view)) {
      if (grad.scalar_type() != view.scalar_type() || grad.device() != view.device()) {
        throw std::runtime_error("GradReducer: parameter " + std::to_string(index) + "'s gradient is " +
                                 grad.toString() + " on " + grad.device().str() + ", expected " +
                                 view.toString() + " on " + view.device().str());
      }
      view.copy_(grad);
      if (options_.gradient_as_bucket_view) grad = view;
    }
  } else {
    // No gradient on this rank (see reducer.h): contribute zeros.
    view.zero_();
    if (options_.gradient_as_bucket_view) grad = view;
  }
  if (--bucket.pending == 0) launch_ready_buckets_locked();
}

void GradReducer::launch_ready_buckets_locked() {
  // Strictly in index order: every rank must issue the same collectives in the same order.
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_]->pending == 0)
    launch_locked(next_bucket_++);
}

void GradReducer::launch_locked(size_t k) {
  auto& bucket = *buckets_[k];
  bucket.launched = true;
  stats_.bucket_launch_times[k] = now();
  if (expect_hooks_) stats_.buckets_launched_in_backward.push_back(static_cast<int64_t>(k));
  if (bucket.transit.defined()) {
    // Divide before narrowing so float16 sums cannot overflow; the sum is then the average.
    torch::mul_out(bucket.transit, bucket.buffer,
                   torch::scalar_tensor(1.0 / comm_.size(), bucket.buffer.options().dtype(torch::kDouble)));
    stats_.bytes += bucket.transit.numel() * static_cast<int64_t>(bucket.transit.element_size());
    bucket.work = comm_.all_reduce_async(bucket.transit, ReduceOp::kSum);
  } else {
    stats_.bytes += bucket.buffer.numel() * static_cast<int64_t>(bucket.buffer.element_size());
    bucket.work = comm_.all_reduce_async(bucket.buffer, ReduceOp::kAverage);
  }
}

void GradReducer::poll_in_flight_locked() {
  // Also what makes a caller-driven MPI collective progress during backward.
  for (auto& bucket_ptr : buckets_) {
    auto& bucket = *bucket_ptr;
    if (!bucket.launched) break;
    if (bucket.done) continue;
    if (!bucket.work->is_completed()) break;
    bucket.done = true;
    stats_.bucket_done_times[&bucket_ptr - buckets_.data()] = now();
  }
}

void GradReducer::finish() {
  torch::NoGradGuard no_grad;
  std::lock_guard lock(mutex_);
  if (!in_iteration_) throw std::logic_error("GradReducer::finish() called without prepare_for_backward()");
  in_iteration_ = false;
  if (!sync_) return;
  expect_hooks_ = false;
  const double entered = now();
  stats_.backward_end_time = entered;
  // Parameters that produced no gradient complete their buckets, in bucket order.
  for (auto& bucket : buckets_) {
    for (size_t index : bucket->params) {
      if (!ready_[index]) mark_ready_locked(index, /*from_hook=*/false);
    }
  }
  launch_ready_buckets_locked();
  for (size_t k = 0; k < buckets_.size(); ++k) {
    auto& bucket = *buckets_[k];
    bucket.work->wait();
    if (!bucket.done) {
      bucket.done = true;
      stats_.bucket_done_times[k] = now();
    }
    bucket.work.reset();
    if (bucket.transit.defined()) bucket.buffer.copy_(bucket.transit);
    for (size_t slot = 0; slot < bucket.params.size(); ++slot) {
      auto& grad = params_[bucket.params[slot]].mutable_grad();
      if (!same_memory(grad, bucket.views[slot])) {
        if (grad.defined()) {
          grad.copy_(bucket.views[slot]);
        } else {
          grad = bucket.views[slot].clone();
        }
      }
    }
  }
  stats_.exposed_comm_seconds = now() - entered;
  if (!rebuilt_) rebuild_from_arrival_order();
}

void broadcast_tensors(const std::vector<torch::Tensor>& tensors, Communicator& comm, int root) {
  torch::NoGradGuard no_grad;
  // One collective per dtype instead of one per tensor (hundreds for a U-Net).
  std::map<int, std::vector<size_t>> by_dtype;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!tensors[i].defined())
      throw std::invalid_argument("broadcast_tensors: tensor " + std::to_string(i) + " is undefined");
    by_dtype[static_cast<int>(tensors[i].scalar_type())].push_back(i);
  }
  for (auto& [dtype, indices] : by_dtype) {
    std::vector<torch::Tensor> flat;
    for (size_t i : indices) flat.push_back(tensors[i].detach().reshape({-1}).to(comm.device()));
    auto buffer = torch::cat(flat);
    comm.broadcast(buffer, root);
    int64_t offset = 0;
    for (size_t i : indices) {
      auto& target = tensors[i];
      target.detach().copy_(buffer.narrow(0, offset, target.numel()).view(target.sizes()));
      offset += target.numel();
    }
  }
}

void verify_identical(const std::vector<torch::Tensor>& tensors, Communicator& comm,
                      const std::string& what) {
  auto options = torch::TensorOptions().dtype(torch::kLong);
  auto count = torch::tensor({static_cast<int64_t>(tensors.size())}, options).to(comm.device());
  auto [count_rank, ignored] = first_difference(comm.all_gather(count));
  if (count_rank >= 0) {
    throw std::runtime_error(what + " differ across ranks: rank " + std::to_string(count_rank) +
                             " has a different number of tensors than rank 0");
  }
  std::vector<int64_t> hashes;
  for (const auto& tensor : tensors) hashes.push_back(static_cast<int64_t>(tensor_bytes_hash(tensor)));
  auto mine = torch::tensor(hashes, options).to(comm.device());
  auto [rank, index] = first_difference(comm.all_gather(mine));
  if (rank >= 0) {
    throw std::runtime_error(what + " differ across ranks: rank " + std::to_string(rank) + "'s tensor " +
                             std::to_string(index) + " (of " + std::to_string(tensors.size()) +
                             ") is not bit-identical to rank 0's");
  }
}

}  // namespace diffuse::dist
