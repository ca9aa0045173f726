// The MPI bootstrap: identity, helpers over the world, and the launcher/world consistency check
// that stops N tasks which came up as N separate worlds; TimedHostCollective delivers the same.
#include "dist/context.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <map>

#include "dist/timed_host_collective.h"
#include "mpi_support.h"

namespace diffuse::dist {
namespace {

using testing::world;

/// Sets launcher variables for one test and restores the process's own afterwards.
class LauncherEnvironment {
 public:
  LauncherEnvironment() {
    for (const char* name : kNames) {
      const char* value = std::getenv(name);
      if (value) saved_[name] = value;
      ::unsetenv(name);
    }
  }
  ~LauncherEnvironment() {
    for (const char* name : kNames) ::unsetenv(name);
    for (const auto& [name, value] : saved_) ::setenv(name.c_str(), value.c_str(), 1);
  }
  void set(const char* name, const char* value) { ::setenv(name, value, 1); }

 private:
  static constexpr const char* kNames[] = {"SLURM_NTASKS", "SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE",
                                           "PMI_SIZE", "PMIX_SIZE"};
  std::map<std::string, std::string> saved_;
};

TEST(LauncherWorld, NoLauncherMeansNoExpectation) {
  LauncherEnvironment env;
  EXPECT_FALSE(launcher_world_size().has_value());
}

TEST(LauncherWorld, ReadsTheLaunchersVariable) {
  LauncherEnvironment env;
  env.set("OMPI_COMM_WORLD_SIZE", "4");
  auto launcher = launcher_world_size();
  ASSERT_TRUE(launcher.has_value());
  EXPECT_EQ(launcher->variable, "OMPI_COMM_WORLD_SIZE");
  EXPECT_EQ(launcher->size, 4);
}

TEST(LauncherWorld, SlurmStepTasksWinButAnAllocationAloneDoesNotCount) {
  LauncherEnvironment env;
  env.set("SLURM_NTASKS", "8");  // inside salloc/sbatch, not an srun step
  env.set("PMI_SIZE", "2");
  EXPECT_EQ(launcher_world_size()->variable, "PMI_SIZE");
  env.set("SLURM_STEP_ID", "0");
  EXPECT_EQ(launcher_world_size()->variable, "SLURM_NTASKS");
  EXPECT_EQ(launcher_world_size()->size, 8);
}

// mpirun inside a Slurm allocation: on the other nodes the ranks are children of an orted that
// srun started as a step of one task, whose SLURM_* they inherit.
TEST(LauncherWorld, OpenMpisWorldWinsOverTheStepOfItsDaemon) {
  LauncherEnvironment env;
  env.set("SLURM_NTASKS", "1");
  env.set("SLURM_STEP_ID", "0");
  env.set("OMPI_COMM_WORLD_SIZE", "4");
  EXPECT_EQ(launcher_world_size()->variable, "OMPI_COMM_WORLD_SIZE");
  EXPECT_EQ(launcher_world_size()->size, 4);
}

TEST(LauncherWorld, IgnoresValuesThatAreNotCounts) {
  LauncherEnvironment env;
  env.set("OMPI_COMM_WORLD_SIZE", "four");
  env.set("PMI_SIZE", "0");
  EXPECT_FALSE(launcher_world_size().has_value());
}

TEST(LauncherWorld, SeparateWorldsAreRefusedWithHowToLaunch) {
  EXPECT_NO_THROW(check_launcher_world(std::nullopt, 1));
  EXPECT_NO_THROW(check_launcher_world(LauncherWorld{"SLURM_NTASKS", 4}, 4));
  try {
    check_launcher_world(LauncherWorld{"SLURM_NTASKS", 4}, 1);
    FAIL() << "4 tasks in worlds of one were accepted";
  } catch (const std::runtime_error& error) {
    std::string message = error.what();
    EXPECT_NE(message.find("started 4 tasks (SLURM_NTASKS=4) but MPI sees a world of 1"), std::string::npos)
        << message;
    EXPECT_NE(message.find("srun --mpi=pmix"), std::string::npos) << message;
  }
}

TEST(Context, IdentityIsConsistentAcrossRanks) {
  const auto& ctx = world();
  EXPECT_GE(ctx.rank(), 0);
  EXPECT_LT(ctx.rank(), ctx.world_size());
  EXPECT_EQ(ctx.is_root(), ctx.rank() == 0);
  EXPECT_GE(ctx.thread_level(), 1);  // at least MPI_THREAD_FUNNELED
  if (const char* size = std::getenv("OMPI_COMM_WORLD_SIZE")) {
    EXPECT_EQ(std::atoi(size), ctx.world_size());
  }
  // Local rank and size agree with the hostnames the ranks report.
  auto identities = ctx.gather_strings(ctx.world().hostname + " " + std::to_string(ctx.local_rank()) + " " +
                                       std::to_string(ctx.local_world_size()));
  long long ok = 1;
  if (ctx.is_root()) {
    std::map<std::string, int> per_host;
    for (const auto& identity : identities) ++per_host[identity.substr(0, identity.find(' '))];
    std::map<std::string, int> next_local;
    for (const auto& identity : identities) {
      auto host = identity.substr(0, identity.find(' '));
      std::string expected =
          host + " " + std::to_string(next_local[host]++) + " " + std::to_string(per_host[host]);
      EXPECT_EQ(identity, expected);
      ok = ok && identity == expected;
    }
  }
  EXPECT_EQ(ctx.max_over_ranks(ok ? 0 : 1), 0);
}

// The HostCollective contract, for Context and for TimedHostCollective alike.
void expect_gather_strings_in_rank_order(const HostCollective& host) {
  std::string mine(static_cast<size_t>(host.rank()), 'x');  // rank 0 sends an empty string
  mine += "rank " + std::to_string(host.rank());
  auto all = host.gather_strings(mine);
  if (!host.is_root()) {
    EXPECT_TRUE(all.empty());
    return;
  }
  ASSERT_EQ(static_cast<int>(all.size()), host.world_size());
  for (int r = 0; r < host.world_size(); ++r) {
    EXPECT_EQ(all[r], std::string(static_cast<size_t>(r), 'x') + "rank " + std::to_string(r));
  }
}

void expect_max_and_broadcast(const HostCollective& host) {
  EXPECT_EQ(host.max_over_ranks(host.rank()), host.world_size() - 1);
  EXPECT_EQ(host.max_over_ranks(-10LL * (host.rank() + 1)), -10);
  const int root = host.world_size() - 1;
  EXPECT_EQ(host.broadcast_string(host.rank() == root ? "from the last rank" : "ignored", root), "from the last rank");
  EXPECT_EQ(host.broadcast_string(host.rank() == 0 ? "" : "ignored", 0), "");
}

TEST(Context, GatherStringsDeliversEveryRanksStringToRootInRankOrder) {
  expect_gather_strings_in_rank_order(world());
}

TEST(Context, MaxOverRanksBroadcastAndBarrier) {
  expect_max_and_broadcast(world());
  world().barrier();
}

TEST(TimedHostCollective, DeliversWhatContextDoes) {
  TimedHostCollective host(world(), std::chrono::seconds(60));
  EXPECT_EQ(host.rank(), world().rank());
  EXPECT_EQ(host.world_size(), world().world_size());
  expect_gather_strings_in_rank_order(host);
  expect_max_and_broadcast(host);
}

TEST(TimedHostCollective, RefusesANonPositiveTimeout) {
  EXPECT_THROW(TimedHostCollective(world(), std::chrono::milliseconds(0)), std::invalid_argument);
}

}  // namespace
}  // namespace diffuse::dist
