// trainer/device_scope.h: the device-side settings of a training step: per-rank random streams and
// an autocast scope for mixed precision.
#pragma once

#include <torch/torch.h>

#include <cstdint>

#include "trainer/config.h"

namespace diffuse::trainer {

/// splitmix64: decorrelates (seed, stream) pairs so rank r's stream never overlaps rank r+1's.
uint64_t mix_seed(uint64_t seed, uint64_t stream);

/// A generator on `device` (CUDA or CPU) seeded with `seed`.
torch::Generator make_generator(torch::Device device, uint64_t seed);

/// Autocast for one forward pass (bf16 or fp16; nothing for fp32); restores the previous state
/// and clears the cast cache.
class AutocastScope {
 public:
  AutocastScope(torch::Device device, Precision precision);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType type_;
  bool enabled_;
  bool previous_enabled_ = false;
  at::ScalarType previous_dtype_ = at::kFloat;
};

}  // namespace diffuse::trainer
