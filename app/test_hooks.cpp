// app/test_hooks.cpp: see test_hooks.h.
#include "app/test_hooks.h"

#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>

namespace diffuse::app {

trainer::TrainerHooks trainer_hooks_from_environment(int rank) {
  trainer::TrainerHooks hooks;
  const char* stall = std::getenv("DIFFUSE_TEST_STALL_RANK");
  if (stall != nullptr && *stall != '\0' && std::atoi(stall) == rank) {
    hooks.before_batch = [](int64_t batch) {
      if (batch >= 3) std::this_thread::sleep_for(std::chrono::hours(1));
    };
  }
  const char* fail_rank = std::getenv("DIFFUSE_TEST_FAIL_CHECKPOINT_RANK");
  if (fail_rank != nullptr && *fail_rank != '\0') {
    const int failing = std::atoi(fail_rank);
    const char* fail_step = std::getenv("DIFFUSE_TEST_FAIL_CHECKPOINT_STEP");
    const bool any_step = fail_step == nullptr || *fail_step == '\0';
    const long long only_step = any_step ? -1 : std::atoll(fail_step);
    hooks.after_shard_written = [failing, any_step, only_step](int shard_rank, int64_t step,
                                                               const std::filesystem::path& shard) {
      if (shard_rank != failing || !(any_step || step == only_step)) return;
      throw std::runtime_error("test hook DIFFUSE_TEST_FAIL_CHECKPOINT_RANK=" + std::to_string(shard_rank) +
                               ": simulated failure after writing " + shard.string());
    };
  }
  return hooks;
}

}  // namespace diffuse::app
