// trainer/memory.h: memory before it runs out, and a clear message when it does anyway.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <exception>
#include <optional>
#include <string>

namespace diffuse::trainer {

/// An allocation failure on any device: CUDA's OutOfMemoryError, the CPU allocator's failure
/// (a plain c10::Error, "DefaultCPUAllocator: can't allocate memory"), or std::bad_alloc.
bool is_out_of_memory(const std::exception& error);

/// The error's own words, without the C++ backtrace a c10::Error carries.
std::string error_text(const std::exception& error);

/// Memory a process may still use on `device`: MemAvailable of /proc/meminfo for the CPU, the
/// device's free memory for CUDA. Nothing when it cannot be told.
std::optional<int64_t> available_memory_bytes(torch::Device device);

/// Throws std::runtime_error with both numbers and `advice` when `needed` bytes (shared by
/// `sharers` processes on the device, e.g. the ranks of a node) exceed what is available.
void require_memory(const std::string& what, double needed_per_process, int sharers, torch::Device device,
                    const std::string& advice);

}  // namespace diffuse::trainer
