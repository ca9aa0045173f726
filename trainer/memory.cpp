// trainer/memory.cpp: see memory.h.
#include "trainer/memory.h"

#include <fstream>
#include <new>
#include <sstream>
#include <string_view>

#include "diffuse/build_config.h"
#include "util/format.h"

#if DIFFUSE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace diffuse::trainer {

bool is_out_of_memory(const std::exception& error) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&error) != nullptr) return true;
  if (dynamic_cast<const std::bad_alloc*>(&error) != nullptr) return true;
  std::string_view what = error.what();
  return what.find("can't allocate memory") != std::string_view::npos ||
         what.find("not enough memory") != std::string_view::npos;
}

std::string error_text(const std::exception& error) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&error)) return c10_error->what_without_backtrace();
  return error.what();
}

std::optional<int64_t> available_memory_bytes(torch::Device device) {
#if DIFFUSE_WITH_CUDA
  if (device.is_cuda()) {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) return std::nullopt;
    return static_cast<int64_t>(free_bytes);
  }
#endif
  if (!device.is_cpu()) return std::nullopt;
  std::ifstream meminfo("/proc/meminfo");
  for (std::string line; std::getline(meminfo, line);) {
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    std::istringstream fields(line.substr(13));
    int64_t kib = 0;
    if (fields >> kib) return kib * 1024;
  }
  return std::nullopt;
}

void require_memory(const std::string& what, double needed_per_process, int sharers, torch::Device device,
                    const std::string& advice) {
  auto available = available_memory_bytes(device);
  if (!available) return;
  const double needed = needed_per_process * sharers;
  if (needed <= static_cast<double>(*available)) return;
  throw std::runtime_error(what + " needs at least " + util::format_bytes(needed) +
                           (sharers > 1 ? " (" + util::format_bytes(needed_per_process) + " for each of " +
                                              std::to_string(sharers) + " processes on this node)"
                                        : std::string()) +
                           " but " + device.str() + " has " + util::format_bytes(static_cast<double>(*available)) +
                           " available: " + advice);
}

}  // namespace diffuse::trainer
