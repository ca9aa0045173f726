// End-to-end checks of the `diffuse` command line: help, errors, and `doctor` alone and under mpirun.
#include <gtest/gtest.h>

#include <regex>

#include "support.h"

namespace diffuse::testing {
namespace {

bool contains_regex(const std::string& text, const std::string& pattern) {
  return std::regex_search(text, std::regex(pattern));
}

TEST(Cli, HelpListsSubcommandsAndExitsZero) {
  auto result = run_command(diffuse_exe() + " --help");
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("doctor"), std::string::npos) << result.output;
}

TEST(Cli, VersionPrintsVersionAndHash) {
  auto result = run_command(diffuse_exe() + " --version");
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("diffuse 0."), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("git "), std::string::npos) << result.output;
}

TEST(Cli, UnknownSubcommandFailsWithMessage) {
  auto result = run_command(diffuse_exe() + " frobnicate");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("frobnicate"), std::string::npos) << result.output;
}

TEST(Cli, MissingSubcommandFails) {
  auto result = run_command(diffuse_exe());
  EXPECT_NE(result.exit_code, 0) << result.output;
}

TEST(Cli, BadLogLevelFails) {
  auto result = run_command(diffuse_exe() + " --log-level loud doctor");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("loud"), std::string::npos) << result.output;
}

TEST(Doctor, SingleProcessIsWorldOfOne) {
  auto result = run_command(diffuse_exe() + " doctor --device cpu");
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_TRUE(contains_regex(result.output, R"(rank\s+0 of 1)")) << result.output;
  EXPECT_NE(result.output.find("LibTorch"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("HDF5"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("verdict"), std::string::npos) << result.output;
}

TEST(Doctor, TwoRanksBothReport) {
  auto result = run_command(mpirun(2) + diffuse_exe() + " doctor --device cpu");
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("diffuse doctor: rank 0"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("diffuse doctor: rank 1"), std::string::npos) << result.output;
  EXPECT_TRUE(contains_regex(result.output, R"(rank\s+0 of 2)")) << result.output;
  EXPECT_TRUE(contains_regex(result.output, R"(rank\s+1 of 2)")) << result.output;
  EXPECT_NE(result.output.find("Open MPI"), std::string::npos) << result.output;
}

TEST(Doctor, CudaRunWithoutGpuIsNotUsable) {
  // On a machine with a GPU this run is usable; the check is only meaningful without one.
  if (torch::cuda::is_available()) GTEST_SKIP() << "a GPU is visible";
  auto result = run_command(diffuse_exe() + " doctor --device cuda");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("PROBLEM"), std::string::npos) << result.output;
}

TEST(Doctor, LauncherWorldMismatchStopsWithHowTo) {
  // srun without PMIx: the launcher says 4 tasks, MPI sees a world of one.
  auto result = run_command("SLURM_NTASKS=4 SLURM_STEP_ID=0 " + diffuse_exe() + " doctor --device cpu");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("--mpi=pmix"), std::string::npos) << result.output;
}

}  // namespace
}  // namespace diffuse::testing
