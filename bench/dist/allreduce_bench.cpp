// allreduce_bench: how fast the communicator all-reduces, and how much of the gradient
// communication the reducer hides behind backward.
//
//   mpirun -np 2 build/bin/allreduce_bench                      # both parts, MPI backend, CPU
//   mpirun -np 4 build/bin/allreduce_bench --skip-overlap --max-bytes 268435456
//   mpirun -np 8 build/bin/allreduce_bench --backend nccl --skip-overlap   # one GPU per rank
//
// Part 1, bandwidth: float32 all-reduce (sum) of 4 KiB .. 256 MiB through the Communicator
// (each MPI progress mode), beside a raw blocking MPI_Allreduce of the same bytes. Reported as
// nccl-tests do: time per operation (slowest rank), algbw = bytes / time and
// busbw = algbw * 2(n-1)/n, the bandwidth a ring all-reduce needs on each link.
//
// Part 2, overlap: one training step (forward + backward) of the default U-Net, measured three
// ways on every rank:
//   compute  forward + backward, no communication
//   reducer  forward + backward with GradReducer (buckets all-reduce during backward) + finish()
//   comm     the same buckets all-reduced back to back with nothing else running
// exposed = reducer - compute is the communication the step still waits for; hidden share =
// 1 - exposed / comm. The network is the default U-Net of model/unet.h (35.7 M parameters) when
// the model library is part of the build; otherwise a stand-in convolution stack with the same
// parameter count and channel widths (64..512), so the bucket structure is the same.
#include <mpi.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "dist/communicator.h"
#include "dist/context.h"
#include "dist/reducer.h"

#include "model/unet.h"

namespace {

using namespace diffuse;
using Clock = std::chrono::steady_clock;

struct Options {
  int64_t min_bytes = 4 << 10;
  int64_t max_bytes = 256 << 20;
  double seconds_per_size = 0.5;  // time budget per message size and transport
  bool bandwidth = true;
  bool overlap = true;
  std::string backend = "mpi";
  std::vector<std::string> progress = {"thread", "caller"};
  int64_t batch = 2;
  int64_t image = 32;
  int steps = 6;
  int warmup = 2;
  int threads = 0;             // intra-op threads per rank; 0: cores / ranks on the node
  int64_t poll_sleep_us = -1;  // CommunicatorOptions::mpi_max_poll_sleep; -1: its default
  std::string json;            // also write the figures to this JSON file (rank 0)
};

// JSON rows of the two parts, written by main() when --json is given.
std::vector<std::string> json_bandwidth, json_overlap;

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << "allreduce_bench: " << problem << "\n"
            << "options: --min-bytes N --max-bytes N --seconds-per-size S --skip-bandwidth --skip-overlap\n"
            << "         --backend mpi|nccl --progress thread|caller|both --batch N --image N --steps N\n"
            << "         --warmup N --threads N --poll-sleep-us N --json FILE" << std::endl;
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--min-bytes")
      options.min_bytes = std::stoll(value());
    else if (flag == "--max-bytes")
      options.max_bytes = std::stoll(value());
    else if (flag == "--seconds-per-size")
      options.seconds_per_size = std::stod(value());
    else if (flag == "--skip-bandwidth")
      options.bandwidth = false;
    else if (flag == "--skip-overlap")
      options.overlap = false;
    else if (flag == "--backend")
      options.backend = value();
    else if (flag == "--progress") {
      std::string mode = value();
      options.progress =
          mode == "both" ? std::vector<std::string>{"thread", "caller"} : std::vector<std::string>{mode};
    } else if (flag == "--batch")
      options.batch = std::stoll(value());
    else if (flag == "--image")
      options.image = std::stoll(value());
    else if (flag == "--steps")
      options.steps = std::stoi(value());
    else if (flag == "--warmup")
      options.warmup = std::stoi(value());
    else if (flag == "--threads")
      options.threads = std::stoi(value());
    else if (flag == "--json")
      options.json = value();
    else if (flag == "--poll-sleep-us")
      options.poll_sleep_us = std::stoll(value());
    else
      usage("unknown option " + flag);
  }
  if (options.backend != "mpi" && options.backend != "nccl") usage("--backend must be mpi or nccl");
  for (const auto& mode : options.progress) {
    if (mode != "thread" && mode != "caller") usage("--progress must be thread, caller or both");
  }
  return options;
}

/// The slowest rank's value: a collective finishes when its last rank does.
double slowest(double seconds) {
  double result = seconds;
  MPI_Allreduce(&seconds, &result, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return result;
}

std::string human(int64_t bytes) {
  char text[32];
  if (bytes >= (1 << 20)) {
    std::snprintf(text, sizeof(text), "%lld MiB", static_cast<long long>(bytes >> 20));
  } else {
    std::snprintf(text, sizeof(text), "%lld KiB", static_cast<long long>(bytes >> 10));
  }
  return text;
}

/// Seconds per operation of `op`: calibrated on one timed run, then repeated to fill the budget.
template <typename Op>
double time_per_op(Op op, double budget) {
  op();  // warm-up: first touch of the buffers, connection setup
  MPI_Barrier(MPI_COMM_WORLD);
  auto start = Clock::now();
  op();
  double once = slowest(std::chrono::duration<double>(Clock::now() - start).count());
  // Every rank computes the same count from the same agreed time, so all issue the same collectives.
  int iterations = static_cast<int>(std::clamp(budget / std::max(once, 1e-7), 2.0, 20000.0));
  MPI_Barrier(MPI_COMM_WORLD);
  start = Clock::now();
  for (int i = 0; i < iterations; ++i) op();
  return slowest(std::chrono::duration<double>(Clock::now() - start).count()) / iterations;
}

void bandwidth(const dist::Context& ctx, const Options& options,
               std::vector<std::pair<std::string, std::unique_ptr<dist::Communicator>>>& comms) {
  const int n = ctx.world_size();
  const double bus = n > 1 ? 2.0 * (n - 1) / n : 1.0;
  if (ctx.is_root()) {
    std::printf(
        "\n# all-reduce (sum, float32), %d ranks; time of the slowest rank; busbw = algbw * 2(n-1)/n\n", n);
    std::printf("%10s", "size");
    for (const auto& [name, comm] : comms)
      std::printf(" | %-30s", (name + ": us, algbw, busbw GB/s").c_str());
    if (options.backend == "mpi") std::printf(" | %-30s", "raw MPI_Allreduce");
    std::printf("\n");
  }
  MPI_Comm raw = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw);
  for (int64_t bytes = options.min_bytes; bytes <= options.max_bytes; bytes *= 4) {
    int64_t numel = bytes / 4;
    std::string line;
    std::string row = "{\"bytes\": " + std::to_string(bytes);
    char cell[96];
    std::string column;
    auto add = [&](double seconds) {
      double algbw = bytes / seconds / 1e9;
      row += ", \"" + column + "_busbw_gbs\": " + std::to_string(algbw * bus);
      std::snprintf(cell, sizeof(cell), " | %9.1f %9.3f %9.3f  ", seconds * 1e6, algbw, algbw * bus);
      line += cell;
    };
    for (auto& [name, comm] : comms) {
      column = name;
      auto tensor = torch::ones({numel}, torch::TensorOptions().device(comm->device()));
      add(time_per_op([&] { comm->all_reduce(tensor, dist::ReduceOp::kSum); }, options.seconds_per_size));
    }
    if (options.backend == "mpi") {
      column = "raw_mpi";
      auto tensor = torch::ones({numel});
      add(time_per_op(
          [&] {
            MPI_Allreduce(MPI_IN_PLACE, tensor.data_ptr(), static_cast<int>(numel), MPI_FLOAT, MPI_SUM, raw);
          },
          options.seconds_per_size));
    }
    json_bandwidth.push_back(row + "}");
    if (ctx.is_root()) std::printf("%10s%s\n", human(bytes).c_str(), line.c_str());
    std::fflush(stdout);
  }
  MPI_Comm_free(&raw);
}

// --- Part 2 --------------------------------------------------------------------------------

/// The network of the overlap measurement and how to run it forward.
struct Network {
  std::shared_ptr<torch::nn::Module> module;
  std::function<torch::Tensor(const torch::Tensor&)> forward;
};

Network make_network(const Options& options, torch::Device device) {
  torch::manual_seed(0);
  model::Unet unet{model::UnetOptions{}};
  unet->to(device);
  auto time =
      torch::randint(0, 1000, {options.batch}, torch::TensorOptions().dtype(torch::kLong).device(device));
  return {unet.ptr(), [unet, time](const torch::Tensor& x) mutable { return unet->forward(x, time); }};
}

const char* network_name() {
  return "the default U-Net";
}

void overlap(const dist::Context& ctx, const Options& options, dist::Communicator& comm,
             const std::string& label) {
  auto network = make_network(options, comm.device());
  auto model = network.module;
  int64_t parameters = 0;
  for (const auto& p : model->parameters()) parameters += p.numel();
  dist::broadcast_tensors(model->parameters(), comm);
  auto x = torch::randn({options.batch, 3, options.image, options.image},
                        torch::TensorOptions().device(comm.device()));
  auto target = torch::randn_like(x);
  auto zero_grads = [&] {
    for (auto& p : model->parameters()) {
      if (p.grad().defined()) p.mutable_grad().zero_();
    }
  };
  auto step = [&](dist::GradReducer* reducer) {
    zero_grads();
    if (reducer) reducer->prepare_for_backward(true);
    torch::mse_loss(network.forward(x), target).backward();
    if (reducer) reducer->finish();
    if (comm.device().is_cuda()) torch::cuda::synchronize();
  };
  dist::GradReducer reducer(model->parameters(), comm);
  auto timed_step = [&](dist::GradReducer* with) {
    comm.barrier();
    auto start = Clock::now();
    step(with);
    return slowest(std::chrono::duration<double>(Clock::now() - start).count());
  };
  for (int i = 0; i < options.warmup; ++i) {
    step(nullptr);
    step(&reducer);
  }
  // Alternating the two kinds of step cancels drift (other load, frequency changes).
  double compute = 0, with_reducer = 0, exposed_in_finish = 0, done_in_backward = 0;
  for (int i = 0; i < options.steps; ++i) {
    compute += timed_step(nullptr) / options.steps;
    with_reducer += timed_step(&reducer) / options.steps;
    const auto& stats = reducer.last_stats();
    exposed_in_finish += slowest(stats.exposed_comm_seconds) / options.steps;
    int64_t done = 0;
    for (double t : stats.bucket_done_times) done += t <= stats.backward_end_time;
    done_in_backward += static_cast<double>(done) / options.steps;
  }
  // The same buckets, all-reduced with nothing else running.
  std::vector<torch::Tensor> buckets;
  auto params = model->parameters();
  for (const auto& bucket : reducer.bucket_assignment()) {
    int64_t numel = 0;
    for (int64_t index : bucket) numel += params[index].numel();
    buckets.push_back(torch::ones({numel}, torch::TensorOptions().device(comm.device())));
  }
  auto timed = [&](auto body) {
    for (int i = 0; i < options.warmup; ++i) body();
    double total = 0;
    for (int i = 0; i < options.steps; ++i) {
      comm.barrier();
      auto start = Clock::now();
      body();
      total += slowest(std::chrono::duration<double>(Clock::now() - start).count());
    }
    return total / options.steps;
  };
  double comm_only = timed([&] {
    std::vector<std::shared_ptr<dist::Work>> works;
    for (auto& bucket : buckets) works.push_back(comm.all_reduce_async(bucket, dist::ReduceOp::kAverage));
    for (auto& work : works) work->wait();
  });
  double exposed = std::max(0.0, with_reducer - compute);
  double hidden = comm_only > 0 ? std::clamp(1.0 - exposed / comm_only, 0.0, 1.0) : 0.0;
  json_overlap.push_back("{\"comm\": \"" + label + "\", \"compute_s\": " + std::to_string(compute) +
                         ", \"with_reducer_s\": " + std::to_string(with_reducer) + ", \"comm_only_s\": " +
                         std::to_string(comm_only) + ", \"exposed_s\": " + std::to_string(exposed) +
                         ", \"hidden\": " + std::to_string(hidden) + "}");
  if (ctx.is_root()) {
    std::printf("%-10s %5d %8.2fM %7lld %9.3f %9.3f %9.3f %9.3f %9.3f %8.1f %8.0f%%\n", label.c_str(),
                ctx.world_size(), parameters / 1e6, static_cast<long long>(reducer.bucket_count()), compute,
                with_reducer, comm_only, exposed, exposed_in_finish, done_in_backward, 100 * hidden);
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  auto ctx = dist::Context::init(&argc, &argv);
  try {
    Options options = parse(argc, argv);
    int cores = static_cast<int>(std::thread::hardware_concurrency());
    int threads = options.threads > 0 ? options.threads : std::max(1, cores / ctx.local_world_size());
    torch::set_num_threads(threads);

    std::vector<std::pair<std::string, std::unique_ptr<dist::Communicator>>> comms;
    if (options.backend == "nccl") {
      comms.emplace_back("nccl", dist::make_nccl_communicator(ctx, dist::select_device(ctx, true)));
    } else {
      for (const auto& mode : options.progress) {
        dist::CommunicatorOptions comm_options;
        comm_options.mpi_progress =
            mode == "thread" ? dist::MpiProgress::kThread : dist::MpiProgress::kCaller;
        if (options.poll_sleep_us >= 0)
          comm_options.mpi_max_poll_sleep = std::chrono::microseconds(options.poll_sleep_us);
        comms.emplace_back("mpi/" + mode, dist::make_mpi_communicator(ctx, comm_options));
      }
    }
    if (ctx.is_root()) {
      std::printf(
          "allreduce_bench: %d ranks (%d on this node), %d intra-op threads per rank, MPI thread level %d\n",
          ctx.world_size(), ctx.local_world_size(), threads, ctx.thread_level());
      std::printf("%s\n", dist::mpi_library_version().c_str());
    }
    if (options.bandwidth) bandwidth(ctx, options, comms);
    if (options.overlap) {
      if (ctx.is_root()) {
        std::printf("\n# one training step of %s, batch %lld at %lldx%lld, seconds (slowest rank)\n",
                    network_name(), static_cast<long long>(options.batch),
                    static_cast<long long>(options.image), static_cast<long long>(options.image));
        std::printf("%-10s %5s %9s %7s %9s %9s %9s %9s %9s %8s %9s\n", "comm", "ranks", "params", "buckets",
                    "compute", "reducer", "comm", "exposed", "finish()", "done_bw", "hidden");
      }
      for (auto& [name, comm] : comms) overlap(ctx, options, *comm, name);
    }
    comms.clear();
    if (ctx.is_root() && !options.json.empty()) {
      auto join = [](const std::vector<std::string>& rows) {
        std::string out;
        for (size_t i = 0; i < rows.size(); ++i) out += (i ? ", " : "") + rows[i];
        return "[" + out + "]";
      };
      std::ofstream out(options.json);
      out << "{\"program\": \"allreduce_bench\", \"ranks\": " << ctx.world_size()
          << ", \"bandwidth\": " << join(json_bandwidth) << ", \"overlap\": " << join(json_overlap) << "}\n";
      if (!out) throw std::runtime_error("cannot write " + options.json);
    }
    return 0;
  } catch (const std::exception& error) {
    std::cerr << "[rank " << ctx.rank() << "] allreduce_bench: " << error.what() << std::endl;
    if (ctx.world_size() > 1) ctx.abort(1);
    return 1;
  }
}
