// The gradient reducer against a single process: the data-parallel gradient of N ranks with
// batch b each equals the gradient of one process on the concatenated batch of N·b. Runs as 1, 2
// and 4 ranks on tiny models.
#include "dist/reducer.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <numeric>
#include <set>

#include "dist/communicator.h"
#include "mpi_support.h"
#include "support.h"

namespace diffuse::dist {
namespace {

using testing::expect_allclose;
using testing::world;

struct Mlp : torch::nn::Module {
  explicit Mlp(int64_t width = 16) {
    l1 = register_module("l1", torch::nn::Linear(8, width));
    l2 = register_module("l2", torch::nn::Linear(width, width));
    l3 = register_module("l3", torch::nn::Linear(width, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return l3(torch::tanh(l2(torch::tanh(l1(x))))); }
  torch::nn::Linear l1{nullptr}, l2{nullptr}, l3{nullptr};
};

std::shared_ptr<Mlp> make_mlp(uint64_t seed) {
  testing::seed_everything(seed);
  return std::make_shared<Mlp>();
}

/// The global batch of step `step`: identical on every rank (fixed seed), each rank takes its rows.
struct Batch {
  torch::Tensor x, y;
};
Batch global_batch(int64_t rows, uint64_t step) {
  testing::seed_everything(1000 + step);
  auto x = torch::randn({rows, 8});
  auto y = torch::randn({rows, 4});
  return {x, y};
}
Batch rows_of(const Batch& batch, int64_t first, int64_t count) {
  return {batch.x.narrow(0, first, count), batch.y.narrow(0, first, count)};
}

torch::Tensor loss_of(Mlp& model, const Batch& batch) {
  return torch::mse_loss(model.forward(batch.x), batch.y);
}

std::vector<torch::Tensor> grads_of(torch::nn::Module& model) {
  std::vector<torch::Tensor> grads;
  for (auto& p : model.parameters()) grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
  return grads;
}

void clear_grads(torch::nn::Module& model, bool set_to_none) {
  for (auto& p : model.parameters()) {
    auto& grad = p.mutable_grad();
    if (!grad.defined()) continue;
    if (set_to_none) {
      grad.reset();
    } else {
      grad.zero_();
    }
  }
}

/// Forwards to a real communicator and counts what is asked of it.
class CountingCommunicator final : public Communicator {
 public:
  explicit CountingCommunicator(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string backend() const override { return inner_.backend(); }
  void all_reduce(torch::Tensor& tensor, ReduceOp op) override {
    ++calls;
    inner_.all_reduce(tensor, op);
  }
  std::shared_ptr<Work> all_reduce_async(torch::Tensor tensor, ReduceOp op) override {
    ++calls;
    ++async_all_reduces;
    return inner_.all_reduce_async(tensor, op);
  }
  void broadcast(torch::Tensor& tensor, int root) override {
    ++calls;
    inner_.broadcast(tensor, root);
  }
  torch::Tensor all_gather(const torch::Tensor& tensor) override {
    ++calls;
    return inner_.all_gather(tensor);
  }
  void barrier() override {
    ++calls;
    inner_.barrier();
  }
  int calls = 0;
  int async_all_reduces = 0;

 private:
  Communicator& inner_;
};

std::unique_ptr<Communicator> make_comm(MpiProgress progress = MpiProgress::kAuto) {
  CommunicatorOptions options;
  options.mpi_progress = progress;
  options.timeout = std::chrono::seconds(120);
  return make_mpi_communicator(world(), options);
}

// Tiny caps: the 3-layer MLP spreads over several buckets, so ordering and views are exercised.
ReducerOptions small_buckets() {
  ReducerOptions options;
  options.first_bucket_cap_mb = 64.0 / (1024 * 1024);
  options.bucket_cap_mb = 600.0 / (1024 * 1024);
  return options;
}

struct GradCase {
  bool as_view;
  bool small;
  MpiProgress progress;
};

class ReducerGradients : public ::testing::TestWithParam<GradCase> {};

TEST_P(ReducerGradients, EqualTheSingleProcessGradientOnTheConcatenatedBatch) {
  auto comm = make_comm(GetParam().progress);
  const int n = comm->size();
  const int r = comm->rank();
  const int64_t b = 3;
  auto model = make_mlp(7);
  auto reference = make_mlp(7);
  ReducerOptions options = GetParam().small ? small_buckets() : ReducerOptions{};
  options.gradient_as_bucket_view = GetParam().as_view;
  GradReducer reducer(model->parameters(), *comm, options);
  if (GetParam().small) {
    EXPECT_GE(reducer.bucket_count(), 3);
  } else {
    EXPECT_EQ(reducer.bucket_count(), 1);
  }
  // Several iterations: the first runs on the initial buckets, the later ones on the rebuilt.
  for (uint64_t step = 0; step < 3; ++step) {
    auto batch = global_batch(n * b, step);
    clear_grads(*model, /*set_to_none=*/step % 2 == 0);
    reducer.prepare_for_backward(true);
    loss_of(*model, rows_of(batch, r * b, b)).backward();
    reducer.finish();
    EXPECT_EQ(reducer.buckets_rebuilt(), true);

    clear_grads(*reference, true);
    loss_of(*reference, batch).backward();
    auto expected = grads_of(*reference);
    auto got = grads_of(*model);
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(got[i].defined());
      expect_allclose(got[i], expected[i], 1e-4, 1e-6,
                      "step " + std::to_string(step) + " parameter " + std::to_string(i));
    }
    const auto& stats = reducer.last_stats();
    EXPECT_EQ(stats.buckets, reducer.bucket_count());
    int64_t parameter_bytes = 0;
    for (auto& p : model->parameters()) parameter_bytes += p.numel() * 4;
    EXPECT_EQ(stats.bytes, parameter_bytes);
  }
  // As views, the gradients of a bucket share its buffer; as copies, each has its own storage.
  std::set<const void*> storages;
  for (auto& p : model->parameters()) storages.insert(p.grad().storage().data());
  EXPECT_EQ(static_cast<int64_t>(storages.size()),
            GetParam().as_view ? reducer.bucket_count() : static_cast<int64_t>(model->parameters().size()));
}

INSTANTIATE_TEST_SUITE_P(Variants, ReducerGradients,
                         ::testing::Values(GradCase{true, true, MpiProgress::kThread},
                                           GradCase{false, true, MpiProgress::kThread},
                                           GradCase{true, false, MpiProgress::kThread},
                                           GradCase{true, true, MpiProgress::kCaller}),
                         [](const auto& info) {
                           return std::string(info.param.as_view ? "View" : "Copy") +
                                  (info.param.small ? "SmallBuckets" : "OneBucket") +
                                  (info.param.progress == MpiProgress::kThread ? "Thread" : "Caller");
                         });

TEST(GradReducer, ParametersIdenticalAcrossRanksAfterTwentySteps) {
  auto comm = make_comm();
  const int n = comm->size();
  const int r = comm->rank();
  const int64_t b = 2;
  for (bool set_to_none : {false, true}) {
    auto model = make_mlp(11);
    auto reference = make_mlp(11);
    torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    torch::optim::SGD reference_optimizer(reference->parameters(),
                                          torch::optim::SGDOptions(0.05).momentum(0.9));
    GradReducer reducer(model->parameters(), *comm, small_buckets());
    for (uint64_t step = 0; step < 20; ++step) {
      auto batch = global_batch(n * b, 100 + step);
      optimizer.zero_grad(set_to_none);
      reducer.prepare_for_backward(true);
      loss_of(*model, rows_of(batch, r * b, b)).backward();
      reducer.finish();
      optimizer.step();

      reference_optimizer.zero_grad();
      loss_of(*reference, batch).backward();
      reference_optimizer.step();
    }
    EXPECT_NO_THROW(verify_identical(model->parameters(), *comm, "parameters after 20 steps"));
    auto params = model->parameters();
    auto expected = reference->parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      expect_allclose(
          params[i], expected[i], 1e-4, 1e-5,
          std::string(set_to_none ? "set_to_none " : "zeroed ") + "parameter " + std::to_string(i));
    }
  }
}

TEST(GradReducer, AccumulationMicroStepsEqualOneLargerBatchAndDoNotCommunicate) {
  auto base = make_comm();
  CountingCommunicator comm(*base);
  const int n = comm.size();
  const int r = comm.rank();
  const int64_t b = 2;
  const int k = 3;
  auto model = make_mlp(5);
  auto reference = make_mlp(5);
  GradReducer reducer(model->parameters(), comm, small_buckets());
  for (uint64_t step = 0; step < 2; ++step) {
    auto batch = global_batch(n * k * b, 200 + step);
    clear_grads(*model, true);
    int async_before = comm.async_all_reduces;
    for (int micro = 0; micro < k; ++micro) {
      int calls_before = comm.calls;
      reducer.prepare_for_backward(/*sync=*/micro == k - 1);
      // Each micro-step's loss is scaled by 1/k so the accumulated gradient is the mean.
      (loss_of(*model, rows_of(batch, (r * k + micro) * b, b)) / k).backward();
      if (micro < k - 1) {
        reducer.finish();  // a no-op after a no_sync backward
        EXPECT_EQ(comm.calls, calls_before) << "micro-step " << micro << " communicated";
      }
    }
    reducer.finish();
    EXPECT_EQ(comm.async_all_reduces - async_before, reducer.bucket_count());

    clear_grads(*reference, true);
    loss_of(*reference, batch).backward();
    auto expected = grads_of(*reference);
    auto got = grads_of(*model);
    for (size_t i = 0; i < got.size(); ++i) {
      expect_allclose(got[i], expected[i], 1e-4, 1e-6,
                      "step " + std::to_string(step) + " parameter " + std::to_string(i));
    }
  }
}

struct WithUnused : Mlp {
  WithUnused() {
    only_rank0 = register_parameter("only_rank0", torch::zeros({5}));
    nowhere = register_parameter("nowhere", torch::zeros({3}));
  }
  torch::Tensor only_rank0, nowhere;
};

TEST(GradReducer, ParametersWithoutGradientsCountAsZerosAndNeverHang) {
  auto comm = make_comm();
  const int n = comm->size();
  const int r = comm->rank();
  const int64_t b = 2;
  testing::seed_everything(3);
  auto model = std::make_shared<WithUnused>();
  testing::seed_everything(3);
  auto reference = std::make_shared<WithUnused>();
  GradReducer reducer(model->parameters(), *comm, small_buckets());
  for (uint64_t step = 0; step < 3; ++step) {
    auto batch = global_batch(n * b, 300 + step);
    clear_grads(*model, true);
    reducer.prepare_for_backward(true);
    auto loss = loss_of(*model, rows_of(batch, r * b, b));
    if (r == 0) loss = loss + model->only_rank0.sum();
    loss.backward();
    reducer.finish();

    clear_grads(*reference, true);
    loss_of(*reference, batch).backward();
    auto expected = reference->named_parameters();
    for (const auto& item : model->named_parameters()) {
      if (item.key() == "only_rank0" || item.key() == "nowhere") continue;
      expect_allclose(item.value().grad(), expected[item.key()].grad(), 1e-4, 1e-6, item.key());
    }
    // Used on rank 0 only: the world average of (ones on rank 0, zeros elsewhere).
    ASSERT_TRUE(model->only_rank0.grad().defined());
    expect_allclose(model->only_rank0.grad(), torch::full({5}, 1.0f / n), 1e-6, 1e-7, "only_rank0");
    ASSERT_TRUE(model->nowhere.grad().defined());
    EXPECT_TRUE(torch::equal(model->nowhere.grad(), torch::zeros({3})));
  }
}

/// Registered a, b, c but used c first: backward produces a's gradient first, the reverse of
/// the reverse-registration guess, which the rebuild must correct.
struct Reordered : torch::nn::Module {
  Reordered() {
    a = register_module("a", torch::nn::Linear(64, 4));
    b = register_module("b", torch::nn::Linear(64, 64));
    c = register_module("c", torch::nn::Linear(8, 64));
  }
  torch::Tensor forward(const torch::Tensor& x) { return a(torch::tanh(b(torch::tanh(c(x))))); }
  torch::nn::Linear a{nullptr}, b{nullptr}, c{nullptr};
};

TEST(GradReducer, RebuildsBucketsOnceFromTheObservedOrderIdenticallyOnEveryRank) {
  auto comm = make_comm();
  testing::seed_everything(9);
  auto model = std::make_shared<Reordered>();
  ReducerOptions options;
  options.first_bucket_cap_mb = 1.0 / 1024;  // ~ one layer per bucket
  options.bucket_cap_mb = 1.0 / 1024;
  GradReducer reducer(model->parameters(), *comm, options);
  // Parameters: a.weight 0, a.bias 1, b.weight 2, b.bias 3, c.weight 4, c.bias 5.
  auto initial = reducer.bucket_assignment();
  ASSERT_GE(initial.size(), 3u);
  EXPECT_EQ(std::set<int64_t>(initial.front().begin(), initial.front().end()), (std::set<int64_t>{4, 5}));
  EXPECT_FALSE(reducer.buckets_rebuilt());

  auto x = torch::randn({4, 8});
  auto run = [&] {
    reducer.prepare_for_backward(true);
    model->forward(x).square().mean().backward();
    reducer.finish();
    return reducer.last_stats();
  };
  auto first = run();
  // Bucket 0 held c, whose gradient came last: nothing could start before backward's end.
  EXPECT_GE(first.bucket_launch_times[0], first.last_grad_ready_time);
  ASSERT_TRUE(reducer.buckets_rebuilt());
  auto rebuilt = reducer.bucket_assignment();
  EXPECT_EQ(std::set<int64_t>(rebuilt.front().begin(), rebuilt.front().end()), (std::set<int64_t>{0, 1}));
  EXPECT_EQ(std::set<int64_t>(rebuilt.back().begin(), rebuilt.back().end()), (std::set<int64_t>{4, 5}));

  std::vector<int64_t> flat;
  for (const auto& bucket : rebuilt) {
    flat.push_back(-1);
    flat.insert(flat.end(), bucket.begin(), bucket.end());
  }
  auto gathered = comm->all_gather(torch::tensor(flat, torch::kLong));
  for (int k = 1; k < comm->size(); ++k) EXPECT_TRUE(torch::equal(gathered[k], gathered[0])) << "rank " << k;

  auto second = run();
  // Now bucket 0 (a) starts while the rest of backward still runs.
  EXPECT_LT(second.bucket_launch_times[0], second.last_grad_ready_time);
  EXPECT_EQ(reducer.bucket_assignment(), rebuilt) << "the buckets were rebuilt more than once";
}

/// Deep enough that backward takes a while: many layers, each its own bucket.
struct Deep : torch::nn::Module {
  explicit Deep(int layers) {
    for (int i = 0; i < layers; ++i) {
      this->layers.push_back(register_module("layer" + std::to_string(i), torch::nn::Linear(128, 128)));
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& layer : layers) x = torch::tanh(layer(x));
    return x;
  }
  std::vector<torch::nn::Linear> layers;
};

TEST(GradReducer, FirstBucketAllReduceStartsBeforeBackwardEnds) {
  auto comm = make_comm();
  testing::seed_everything(4);
  auto model = std::make_shared<Deep>(8);
  ReducerOptions options;
  options.first_bucket_cap_mb = 0.0625;  // one 128x128 float layer
  options.bucket_cap_mb = 0.0625;
  GradReducer reducer(model->parameters(), *comm, options);
  ASSERT_GE(reducer.bucket_count(), 8);
  auto x = torch::randn({256, 128});
  for (int iteration = 0; iteration < 2; ++iteration) {
    reducer.prepare_for_backward(true);
    model->forward(x).square().mean().backward();
    reducer.finish();
    const auto& stats = reducer.last_stats();
    // Recorded order, not wall time: bucket 0 was launched from a gradient hook, before the
    // hook of the last gradient, and buckets launched in index order.
    ASSERT_FALSE(stats.buckets_launched_in_backward.empty());
    EXPECT_EQ(stats.buckets_launched_in_backward.front(), 0);
    EXPECT_LT(stats.bucket_launch_times[0], stats.last_grad_ready_time);
    EXPECT_LE(stats.last_grad_ready_time, stats.backward_end_time);
    for (size_t k = 1; k < stats.bucket_launch_times.size(); ++k) {
      EXPECT_LE(stats.bucket_launch_times[k - 1], stats.bucket_launch_times[k]) << "bucket " << k;
    }
    for (size_t k = 0; k < stats.bucket_done_times.size(); ++k) {
      EXPECT_GE(stats.bucket_done_times[k], stats.bucket_launch_times[k]) << "bucket " << k;
    }
    // All but the last bucket (completed by the last hook) started during backward.
    EXPECT_GE(static_cast<int64_t>(stats.buckets_launched_in_backward.size()), reducer.bucket_count() - 1);
  }
}

class ReducerCompression : public ::testing::TestWithParam<torch::ScalarType> {};

TEST_P(ReducerCompression, GradientsInTransitAreCloseToFloat32) {
  auto comm = make_comm();
  const int n = comm->size();
  const int r = comm->rank();
  const int64_t b = 4;
  auto model = make_mlp(13);
  auto reference = make_mlp(13);
  ReducerOptions options = small_buckets();
  options.compress_dtype = GetParam();
  GradReducer reducer(model->parameters(), *comm, options);
  auto batch = global_batch(n * b, 400);
  reducer.prepare_for_backward(true);
  loss_of(*model, rows_of(batch, r * b, b)).backward();
  reducer.finish();
  loss_of(*reference, batch).backward();
  auto expected = grads_of(*reference);
  auto got = grads_of(*model);
  // Every rank's own gradient, to bound the rounding: each of the n contributions and n-1
  // partial sums is rounded once, by at most the unit roundoff u of the transit dtype times a
  // magnitude no larger than the largest per-rank gradient M. So |error| <= 2·n·u·M.
  std::vector<double> largest(got.size(), 0.0);
  for (int rank = 0; rank < n; ++rank) {
    auto single = make_mlp(13);
    loss_of(*single, rows_of(batch, rank * b, b)).backward();
    auto grads = grads_of(*single);
    for (size_t i = 0; i < grads.size(); ++i)
      largest[i] = std::max(largest[i], grads[i].abs().max().item<double>());
  }
  const double u = GetParam() == torch::kBFloat16 ? std::pow(2.0, -9) : std::pow(2.0, -11);
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].scalar_type(), torch::kFloat);
    double error = (got[i] - expected[i]).abs().max().item<double>();
    EXPECT_LE(error, 2 * n * u * largest[i] + 1e-7)
        << "parameter " << i << " (largest gradient " << largest[i] << ")";
  }
  int64_t parameter_bytes = 0;
  for (auto& p : model->parameters()) parameter_bytes += p.numel() * 4;
  EXPECT_EQ(reducer.last_stats().bytes, parameter_bytes / 2);
  EXPECT_NO_THROW(verify_identical(model->parameters(), *comm, "parameters"));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ReducerCompression, ::testing::Values(torch::kBFloat16, torch::kHalf),
                         [](const auto& info) {
                           return info.param == torch::kBFloat16 ? "BFloat16" : "Float16";
                         });

TEST(GradReducer, RefusesMisuse) {
  auto comm = make_comm();
  auto model = make_mlp(1);
  GradReducer reducer(model->parameters(), *comm);
  EXPECT_THROW(reducer.finish(), std::logic_error);
  reducer.prepare_for_backward(true);
  EXPECT_THROW(reducer.prepare_for_backward(true), std::logic_error);
  loss_of(*model, global_batch(2, 0)).backward();
  reducer.finish();
  ReducerOptions bad;
  bad.compress_dtype = torch::kInt;
  EXPECT_THROW(GradReducer(model->parameters(), *comm, bad), std::invalid_argument);
  bad = ReducerOptions{};
  bad.bucket_cap_mb = 0;
  EXPECT_THROW(GradReducer(model->parameters(), *comm, bad), std::invalid_argument);
}

TEST(GradReducer, TiedParametersListedTwiceAreReducedOnce) {
  auto comm = make_comm();
  const int n = comm->size();
  const int r = comm->rank();
  auto model = make_mlp(17);
  auto reference = make_mlp(17);
  auto params = model->parameters();
  params.push_back(model->l2->weight);  // as a module with tied weights lists it
  GradReducer reducer(params, *comm, small_buckets());
  size_t listed = 0;
  for (const auto& bucket : reducer.bucket_assignment()) listed += bucket.size();
  EXPECT_EQ(listed, model->parameters().size());
  auto batch = global_batch(n * 2, 500);
  reducer.prepare_for_backward(true);
  loss_of(*model, rows_of(batch, r * 2, 2)).backward();
  reducer.finish();
  loss_of(*reference, batch).backward();
  auto expected = grads_of(*reference);
  auto got = grads_of(*model);
  for (size_t i = 0; i < got.size(); ++i)
    expect_allclose(got[i], expected[i], 1e-4, 1e-6, "parameter " + std::to_string(i));
}

TEST(GradReducer, RanksWithDifferentModelsAreRefusedOnEveryRank) {
  auto comm = make_comm();
  if (comm->size() == 1) GTEST_SKIP() << "needs two ranks (runs under mpirun -np 2 and 4)";
  auto model = make_mlp(1);
  auto params = model->parameters();
  if (comm->rank() == 1) params.push_back(torch::zeros({2}, torch::requires_grad()));
  try {
    GradReducer reducer(params, *comm);
    FAIL() << "different models were accepted";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("rank 1"), std::string::npos) << error.what();
  }
}

/// Data-parallel gradients of a model on `device` (a CUDA device) through `comm` over `steps`
/// steps equal the single-process gradient on the concatenated batch, and stay on the device.
void expect_gpu_gradients_match_one_process(Communicator& comm, torch::Device device, uint64_t seed, int steps) {
  const int n = comm.size();
  const int r = comm.rank();
  auto model = make_mlp(seed);
  model->to(device);
  auto reference = make_mlp(seed);
  GradReducer reducer(model->parameters(), comm, small_buckets());
  EXPECT_GT(reducer.bucket_count(), 1);
  for (uint64_t step = 0; step < static_cast<uint64_t>(steps); ++step) {
    auto batch = global_batch(n * 2, 30 * seed + step);
    clear_grads(*model, false);
    reducer.prepare_for_backward(true);
    auto mine = rows_of(batch, r * 2, 2);
    torch::mse_loss(model->forward(mine.x.to(device)), mine.y.to(device)).backward();
    reducer.finish();
    clear_grads(*reference, true);
    loss_of(*reference, batch).backward();
    auto expected = grads_of(*reference);
    auto got = grads_of(*model);
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_TRUE(got[i].is_cuda()) << "parameter " << i;
      expect_allclose(got[i].cpu(), expected[i], 1e-4, 1e-5, "parameter " + std::to_string(i));
    }
  }
  EXPECT_NO_THROW(verify_identical(model->parameters(), comm, "parameters"));
}

TEST(GradReducer, GradientsOnTheGpuWithNccl_CUDA) {
  if (!nccl_available() || !torch::cuda::is_available()) GTEST_SKIP() << "no GPU";
  if (static_cast<int>(torch::cuda::device_count()) < world().local_world_size()) {
    GTEST_SKIP() << "fewer GPUs than ranks on this node";
  }
  auto device = select_device(world(), true);
  auto comm = make_nccl_communicator(world(), device);
  expect_gpu_gradients_match_one_process(*comm, device, 21, 2);
}

/// The MPI communicator for CUDA tensors: each collective copies to the host, runs on MPI and
/// copies back. Lets 2 ranks share one GPU (NCCL refuses that), so the reducer's CUDA path
/// (hooks on CUDA gradients, bucket views, async completion) runs multi-rank on a one-GPU machine.
class HostStagedCommunicator final : public Communicator {
 public:
  HostStagedCommunicator(Communicator& inner, torch::Device device) : inner_(inner), device_(device) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string backend() const override { return "mpi-staged"; }
  torch::Device device() const override { return device_; }
  void all_reduce(torch::Tensor& tensor, ReduceOp op) override {
    auto host = tensor.cpu().contiguous();
    inner_.all_reduce(host, op);
    tensor.copy_(host);
  }
  std::shared_ptr<Work> all_reduce_async(torch::Tensor tensor, ReduceOp op) override {
    auto host = tensor.cpu().contiguous();  // waits for the stream: the gradients are complete
    return std::make_shared<CopyBack>(inner_.all_reduce_async(host, op), host, tensor);
  }
  void broadcast(torch::Tensor& tensor, int root) override {
    auto host = tensor.cpu().contiguous();
    inner_.broadcast(host, root);
    tensor.copy_(host);
  }
  torch::Tensor all_gather(const torch::Tensor& tensor) override {
    return inner_.all_gather(tensor.cpu().contiguous()).to(tensor.device());
  }
  void barrier() override { inner_.barrier(); }

 private:
  struct CopyBack final : Work {
    CopyBack(std::shared_ptr<Work> inner, torch::Tensor host, torch::Tensor target)
        : inner(std::move(inner)), host(std::move(host)), target(std::move(target)) {}
    void wait() override {
      inner->wait();
      if (!copied) target.copy_(host);
      copied = true;
    }
    bool is_completed() override {
      if (!inner->is_completed()) return false;
      wait();
      return true;
    }
    std::shared_ptr<Work> inner;
    torch::Tensor host, target;
    bool copied = false;
  };
  Communicator& inner_;
  torch::Device device_;
};

TEST(GradReducer, CudaGradientsOverMpiOnASharedGpu_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto mpi = make_comm();
  const torch::Device device(torch::kCUDA, 0);  // every rank on GPU 0: this is about the reducer, not NCCL
  HostStagedCommunicator comm(*mpi, device);
  expect_gpu_gradients_match_one_process(comm, device, 23, 3);
}

TEST(BroadcastTensors, GivesEveryRankRootsValuesAndVerifyProvesIt) {
  auto comm = make_comm();
  auto model = make_mlp(100 + comm->rank());
  auto buffer = torch::full({3}, static_cast<int64_t>(comm->rank()));  // an int64 "buffer"
  auto tensors = model->parameters();
  tensors.push_back(buffer);
  if (comm->size() > 1) {
    try {
      verify_identical(tensors, *comm, "weights");
      FAIL() << "different weights passed verify_identical";
    } catch (const std::runtime_error& error) {
      std::string message = error.what();
      EXPECT_NE(message.find("weights differ across ranks: rank 1"), std::string::npos) << message;
    }
  }
  broadcast_tensors(tensors, *comm, 0);
  EXPECT_NO_THROW(verify_identical(tensors, *comm, "weights"));
  auto root_model = make_mlp(100);
  auto params = model->parameters();
  auto expected = root_model->parameters();
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_TRUE(torch::equal(params[i], expected[i])) << "parameter " << i;
  EXPECT_TRUE(torch::equal(buffer, torch::zeros({3}, torch::kLong)));
  EXPECT_TRUE(params[0].requires_grad()) << "broadcast must not change what the tensors are";

  // From the last rank, too.
  auto last = torch::full({5}, static_cast<float>(comm->rank()));
  broadcast_tensors({last}, *comm, comm->size() - 1);
  EXPECT_TRUE(torch::equal(last, torch::full({5}, static_cast<float>(comm->size() - 1))));
}

}  // namespace
}  // namespace diffuse::dist
