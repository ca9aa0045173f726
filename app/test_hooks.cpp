// app/test_hooks.cpp: see test_hooks.h.
#include "app/test_hooks.h"

#include <chrono>
#include <cstdlib>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>

#include "trainer/sample_quality.h"

namespace diffuse::app {
namespace {

/// "5:5,10:3.5" -> {5: 5.0, 10: 3.5}; throws naming the variable and the entry that is malformed.
std::map<int64_t, double> planted_values(const std::string& variable, const std::string& text) {
  std::map<int64_t, double> values;
  std::stringstream in(text);
  for (std::string entry; std::getline(in, entry, ',');) {
    auto colon = entry.find(':');
    try {
      if (colon == std::string::npos) throw std::invalid_argument("no colon");
      values[std::stoll(entry.substr(0, colon))] = std::stod(entry.substr(colon + 1));
    } catch (const std::logic_error&) {
      throw std::invalid_argument(variable + "=" + text + ": entry '" + entry + "' is not step:value");
    }
  }
  return values;
}

}  // namespace

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
  const char* planted = std::getenv("DIFFUSE_TEST_PLANTED_FID");
  if (planted != nullptr && *planted != '\0') {
    auto fids = planted_values("DIFFUSE_TEST_PLANTED_FID", planted);
    hooks.after_quality_evaluation = [fids](int64_t step, trainer::QualityResult& result) {
      if (auto it = fids.find(step); it != fids.end()) result.fid = it->second;
    };
  }
  return hooks;
}

}  // namespace diffuse::app
