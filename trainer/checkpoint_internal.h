// Shared by checkpoint.cpp (saving, retention, the store) and checkpoint_load.cpp (locating and
// loading); not part of the trainer's interface.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "trainer/checkpoint.h"

namespace diffuse::trainer::checkpoint_internal {

/// Runs `body`; returns "" or what it threw.
std::string capture(const std::function<void()>& body);

/// The ranks agree whether a phase succeeded. Returns when every rank passed ""; otherwise rank 0
/// runs `root_cleanup` first (so no rank returns before the cleanup is done) and every rank throws
/// the same CheckpointError naming each failing rank and its cause.
void agree(const dist::HostCollective& comm, const std::string& what, const std::string& my_error,
           const std::function<void()>& root_cleanup = {});

/// Complete checkpoints in `dir` (a step-N directory holding a manifest), newest step first.
std::vector<std::pair<int64_t, std::filesystem::path>> complete_checkpoints(const std::filesystem::path& dir);

/// Points the link `dir/link` at `name` atomically (readers see the old target or the new one).
void point_link_at(const std::filesystem::path& dir, const std::string& link, const std::string& name);

/// Rank 0's candidates for `latest` of a checkpoints directory, newest first.
CheckpointCandidates plan_latest(const std::filesystem::path& checkpoints_dir);

/// The candidates for an explicitly named checkpoint directory (just that one).
CheckpointCandidates plan_explicit(const std::filesystem::path& dir);

/// The load protocol: rank 0 plans (via `plan_on_root`), then the candidates are tried in order.
std::optional<LoadedCheckpoint> load_collective(const dist::HostCollective& comm,
                                                const std::function<CheckpointCandidates()>& plan_on_root,
                                                bool include_per_rank, const LoadProgress& progress);

}  // namespace diffuse::trainer::checkpoint_internal
