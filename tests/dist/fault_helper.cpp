// dist_fault_helper: a tiny MPI program that fails on purpose, for dist_fault_test. Its main()
// handles errors the way trainer/main.cpp does (log with the rank, then Context::abort), so the
// test proves that one rank's failure ends the whole job instead of leaving peers in a collective.
//
//   mpirun -np 4 dist_fault_helper throw       rank 1 throws while the others wait in an all_reduce
//   mpirun -np 2 dist_fault_helper terminate   rank 1's exception escapes main (std::terminate)
//   SLURM_NTASKS=2 SLURM_STEP_ID=0 dist_fault_helper throw
//                                              no launcher: a world of one that was meant to be two
//   mpirun -np 2 dist_fault_helper timeout thread|caller
//                                              rank 1 joins the all_reduce after rank 0's timeout
//   mpirun -np 2 dist_fault_helper host_timeout
//                                              the same for TimedHostCollective's gather_strings
#include <torch/torch.h>

#include <iostream>
#include <optional>
#include <thread>

#include "dist/communicator.h"
#include "dist/context.h"
#include "dist/timed_host_collective.h"

namespace {

using namespace diffuse::dist;

int run(const Context& ctx, const std::string& scenario, const std::string& mode) {
  if (scenario == "host_timeout") {
    TimedHostCollective host(ctx, std::chrono::milliseconds(1000));
    if (ctx.rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(4));
    host.gather_strings("hello");
    std::cout << "[rank " << ctx.rank() << "] survived the gather" << std::endl;
    return 0;
  }
  CommunicatorOptions options;
  if (scenario == "timeout") options.timeout = std::chrono::milliseconds(1000);
  options.mpi_progress = mode == "caller" ? MpiProgress::kCaller : MpiProgress::kThread;
  auto comm = make_mpi_communicator(ctx, options);
  auto tensor = torch::ones({1000});
  if (ctx.rank() == 1) {
    if (scenario == "timeout") {
      std::this_thread::sleep_for(std::chrono::seconds(4));
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the others are inside the all_reduce
      throw std::runtime_error("injected failure on rank 1");
    }
  }
  comm->all_reduce(tensor, ReduceOp::kSum);
  std::cout << "[rank " << ctx.rank() << "] survived the all_reduce" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string scenario = argc > 1 ? argv[1] : "";
  std::string mode = argc > 2 ? argv[2] : "thread";
  if (scenario != "throw" && scenario != "terminate" && scenario != "timeout" && scenario != "host_timeout") {
    std::cerr << "usage: dist_fault_helper throw|terminate|timeout|host_timeout [thread|caller]" << std::endl;
    return 2;
  }
  std::optional<Context> started;
  try {
    started.emplace(Context::init(&argc, &argv));
  } catch (const std::exception& error) {
    std::cerr << "dist_fault_helper: cannot start: " << error.what() << std::endl;
    return 2;
  }
  const Context& ctx = *started;
  if (scenario == "terminate") return run(ctx, scenario, mode);  // no handler: std::terminate
  try {
    return run(ctx, scenario, mode);
  } catch (const std::exception& error) {
    std::cerr << "[rank " << ctx.rank() << "] " << error.what() << std::endl;
    if (ctx.world_size() > 1) ctx.abort(1);
    return 1;
  }
}
