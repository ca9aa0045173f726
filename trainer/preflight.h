// trainer/preflight.h: checks a run passes before it allocates or trains anything, agreed by all
// ranks where they need to agree, so an impossible run ends in seconds with the numbers.
#pragma once

#include <string>

#include "dist/context.h"
#include "trainer/config.h"

#include <torch/torch.h>

namespace diffuse::trainer {

/// Every rank must read the same dataset (node-local copies can differ): compared by identity
/// (count, shape, a hash of the header and of the first and last chunks). Collective; throws the
/// same message on every rank, naming the ranks whose copy differs from rank 0's.
void check_same_dataset(const dist::Context& ctx, const std::string& path);

/// Refuses a batch that cannot fit on `device` before anything is allocated (a too-large batch
/// otherwise grows until the kernel kills the job without a message): a lower bound of the
/// U-Net's activations and the loader's buffers against the available memory, shared by the
/// ranks of a node on the CPU.
void check_training_memory(const dist::Context& ctx, const Config& config, torch::Device device);

}  // namespace diffuse::trainer
