// trainer/checkpoint_inspect.h: a human-readable summary of one checkpoint for `diffuse inspect`.
#pragma once

#include <filesystem>
#include <string>

namespace diffuse::trainer {

struct CheckpointSummary {
  std::string text;
  bool ok = false;  ///< manifest readable and every shard's size (and hash, if verified) correct
};

/// Summarises a checkpoint directory (or a run directory, a checkpoints directory or a `latest`
/// link, meaning the checkpoint `latest` points to): step, saving world size, creation time,
/// metadata, tensor counts and bytes, each shard with OK/FAILED, and the config. No MPI. Throws
/// CheckpointError when no manifest can be found or parsed.
CheckpointSummary describe_checkpoint(const std::filesystem::path& path, bool verify_hashes = true);

}  // namespace diffuse::trainer
