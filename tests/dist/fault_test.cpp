// Failure handling across ranks, observed from outside: runs dist_fault_helper under mpirun and
// checks that one rank's exception ends every rank (non-zero exit, well within 30 s) and that a
// collective timeout names the collective.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>

#include "support.h"

namespace diffuse::testing {
namespace {

std::string helper() {
  const char* build = std::getenv("DIFFUSE_BUILD_DIR");
  return std::string(build ? build : ".") + "/bin/dist_fault_helper";
}

struct Timed {
  CommandResult result;
  double seconds = 0;
};

Timed run_job(int ranks, const std::string& arguments) {
  auto start = std::chrono::steady_clock::now();
  // The outer timeout only keeps a broken build from hanging ctest; the assertions are below it.
  std::string command = mpirun(ranks) + helper() + " " + arguments;
  command.insert(command.find("mpirun -np"), "timeout -s KILL 90 ");
  Timed timed{run_command(command), 0};
  timed.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return timed;
}

TEST(JobAbort, ARankThatThrowsEndsEveryRankWithinThirtySeconds) {
  auto job = run_job(4, "throw");
  EXPECT_NE(job.result.exit_code, 0) << job.result.output;
  EXPECT_LT(job.seconds, 30.0) << job.result.output;
  EXPECT_NE(job.result.output.find("[rank 1] injected failure on rank 1"), std::string::npos)
      << job.result.output;
  // No rank got past the all_reduce its peer never joined: they were ended, not released.
  EXPECT_EQ(job.result.output.find("survived"), std::string::npos) << job.result.output;
}

TEST(JobAbort, AnExceptionEscapingMainAlsoEndsEveryRank) {
  auto job = run_job(2, "terminate");
  EXPECT_NE(job.result.exit_code, 0) << job.result.output;
  EXPECT_NE(job.result.output.find("injected failure on rank 1"), std::string::npos) << job.result.output;
  EXPECT_LT(job.seconds, 30.0) << job.result.output;
  EXPECT_EQ(job.result.output.find("survived"), std::string::npos) << job.result.output;
}

TEST(CollectiveTimeout, ThrowsNamingTheOperationAndEndsTheJob) {
  for (std::string mode : {"thread", "caller"}) {
    auto job = run_job(2, "timeout " + mode);
    const auto& out = job.result.output;
    EXPECT_NE(job.result.exit_code, 0) << mode << ": " << out;
    EXPECT_LT(job.seconds, 30.0) << mode << ": " << out;
    EXPECT_NE(
        out.find("[rank 0] MPI all_reduce(sum) of 1000 x float32 (3.9 KiB) on rank 0 of 2 did not complete "
                 "within 1000 ms"),
        std::string::npos)
        << mode << ": " << out;
    EXPECT_EQ(out.find("survived"), std::string::npos) << mode << ": " << out;
  }
}

TEST(CollectiveTimeout, HostMessagesTooThrowNamingTheOperationAndEndTheJob) {
  auto job = run_job(2, "host_timeout");
  const auto& out = job.result.output;
  EXPECT_NE(job.result.exit_code, 0) << out;
  EXPECT_LT(job.seconds, 30.0) << out;
  EXPECT_NE(out.find("[rank 0] MPI gather(strings) of 5 bytes from this rank on rank 0 of 2 did not complete within "
                     "1000 ms"),
            std::string::npos)
      << out;
  EXPECT_EQ(out.find("survived"), std::string::npos) << out;
}

TEST(Bootstrap, TasksThatCameUpAsSeparateWorldsStopWithHowToLaunch) {
  // What `srun` without --mpi=pmix does: the task believes it is one of 2, MPI says world of 1.
  auto result = run_command(
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 SLURM_NTASKS=2 SLURM_STEP_ID=0 timeout -s "
      "KILL 60 " +
      helper() + " throw");
  EXPECT_EQ(result.exit_code, 2) << result.output;
  EXPECT_NE(result.output.find("started 2 tasks (SLURM_NTASKS=2) but MPI sees a world of 1"),
            std::string::npos)
      << result.output;
  EXPECT_NE(result.output.find("srun --mpi=pmix"), std::string::npos) << result.output;
  EXPECT_EQ(result.output.find("injected failure"), std::string::npos) << "it ran anyway: " << result.output;
}

}  // namespace
}  // namespace diffuse::testing
