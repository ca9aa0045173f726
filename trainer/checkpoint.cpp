// Checkpoint store: the collective save protocol described in checkpoint.h and the filesystem
// steps that make a save atomic (fsync, rename); loading is in checkpoint_load.cpp. The protocols
// run on dist::HostCollective, so the same code serves MPI ranks (dist::Context), a single process
// (sample/export: SoloCollective), and tests that write a checkpoint "as if" from W ranks.
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_internal.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <numeric>
#include <set>
#include <unordered_map>

#include "data/hdf5_tensors.h"
#include "diffuse/build_config.h"
#include "util/durable_file.h"
#include "util/files.h"
#include "util/format.h"
#include "util/json.h"
#include "util/sha256.h"

namespace diffuse::trainer {
namespace fs = std::filesystem;
namespace json = util::json;
using checkpoint_internal::agree;
using checkpoint_internal::capture;
using checkpoint_internal::complete_checkpoints;
using checkpoint_internal::load_collective;
using checkpoint_internal::plan_explicit;
using checkpoint_internal::plan_latest;
using checkpoint_internal::point_link_at;

namespace checkpoint_internal {

/// Runs `body`; returns "" or what it threw.
std::string capture(const std::function<void()>& body) {
  try {
    body();
    return "";
  } catch (const std::exception& e) {
    std::string what = e.what();
    return what.empty() ? "unknown error" : what;
  } catch (...) {
    return "unknown (non-standard) exception";
  }
}

/// The ranks agree whether a phase succeeded. Returns when every rank passed ""; otherwise rank 0
/// runs `root_cleanup` first (so no rank returns before the cleanup is done) and every rank throws
/// the same CheckpointError naming each failing rank and its cause.
void agree(const dist::HostCollective& comm, const std::string& what, const std::string& my_error,
           const std::function<void()>& root_cleanup) {
  if (comm.max_over_ranks(my_error.empty() ? 0 : 1) == 0) return;
  auto errors = comm.gather_strings(my_error);
  std::string message;
  if (comm.is_root()) {
    message = what + " failed: ";
    bool first = true;
    for (size_t r = 0; r < errors.size(); ++r) {
      if (errors[r].empty()) continue;
      message += (first ? "" : "; ") + std::string("rank ") + std::to_string(r) + ": " + errors[r];
      first = false;
    }
    if (root_cleanup) {
      std::string cleanup_error = capture(root_cleanup);
      if (!cleanup_error.empty()) message += " (and cleaning up failed too: " + cleanup_error + ")";
    }
  }
  throw CheckpointError(comm.broadcast_string(message, 0));
}

}  // namespace checkpoint_internal

namespace {

// ------------------------------------------------------------------------------------------------
// Saving: the phases, each run by the rank(s) the protocol says.

void validate_contents(const CheckpointContents& c) {
  if (c.step < 0) throw CheckpointError("checkpoint step " + std::to_string(c.step) + " is negative");
  std::set<std::string> names;
  for (const auto& [name, tensor] : c.replicated) {
    if (name.empty()) throw CheckpointError("a replicated tensor has an empty name");
    if (looks_per_rank(name)) {
      throw CheckpointError("replicated tensor \"" + name + "\" uses the reserved per-rank prefix rank<r>.");
    }
    if (name.find('/') != std::string::npos) {
      throw CheckpointError("tensor name \"" + name + "\" contains '/'");
    }
    if (!tensor.defined()) throw CheckpointError("replicated tensor \"" + name + "\" is undefined");
    if (!names.insert(name).second) throw CheckpointError("replicated tensor \"" + name + "\" appears twice");
    checkpoint_dtype_name(tensor.scalar_type());
  }
  std::set<std::string> own;
  for (const auto& [name, tensor] : c.per_rank) {
    if (name.empty()) throw CheckpointError("a per-rank tensor has an empty name");
    if (!tensor.defined()) throw CheckpointError("per-rank tensor \"" + name + "\" is undefined");
    if (!own.insert(name).second) throw CheckpointError("per-rank tensor \"" + name + "\" appears twice");
    if (name.find('/') != std::string::npos) {
      throw CheckpointError("tensor name \"" + name + "\" contains '/'");
    }
    checkpoint_dtype_name(tensor.scalar_type());
  }
}

/// What every rank must agree on before a save: the step and the replicated tensors' layout.
std::string layout_signature(const CheckpointContents& c) {
  std::string text = "step " + std::to_string(c.step) + "\n";
  for (const auto& [name, tensor] : c.replicated) {
    text += name + " " + checkpoint_dtype_name(tensor.scalar_type()) + " " + util::format_shape(tensor.sizes().vec()) + "\n";
  }
  return util::sha256_hex(text);
}

/// Greedy balance by bytes (largest first, ties by name; into the lightest shard, ties by lowest
/// rank): deterministic, so every rank computes the same assignment without talking.
std::vector<int> assign_shards(const NamedTensors& replicated, int world_size) {
  std::vector<size_t> order(replicated.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    int64_t ba = tensor_bytes(replicated[a].second), bb = tensor_bytes(replicated[b].second);
    return ba != bb ? ba > bb : replicated[a].first < replicated[b].first;
  });
  std::vector<int64_t> load(static_cast<size_t>(world_size), 0);
  std::vector<int> shard(replicated.size(), 0);
  for (size_t i : order) {
    auto lightest = std::min_element(load.begin(), load.end()) - load.begin();
    shard[i] = static_cast<int>(lightest);
    load[static_cast<size_t>(lightest)] += tensor_bytes(replicated[i].second);
  }
  return shard;
}

fs::path tmp_dir_for(const fs::path& dir, int64_t step) { return dir / (util::step_name(step) + ".tmp"); }

/// Rank 0, before a save: make the directory, clear what crashed saves left, create step-N.tmp.
void prepare_save(const fs::path& dir, int64_t step) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir)) {
    throw std::runtime_error("cannot create the checkpoint directory " + dir.string() + ": " +
                             (ec ? ec.message() : "it exists and is not a directory"));
  }
  for (const auto& entry : fs::directory_iterator(dir)) {
    std::string name = entry.path().filename().string();
    auto dot = name.rfind('.');
    if (name == std::string(kLatestLinkName) + ".tmp" || name == std::string(kBestLinkName) + ".tmp") {
      fs::remove(entry.path(), ec);
      continue;
    }
    if (dot == std::string::npos || !util::parse_step_name(name.substr(0, dot))) continue;
    std::string suffix = name.substr(dot + 1);
    if (suffix == "old" && !fs::exists(dir / name.substr(0, dot))) {
      // A crash between moving an older copy of this step aside and renaming the new one in:
      // the older copy is complete, so put it back.
      fs::rename(entry.path(), dir / name.substr(0, dot), ec);
    } else if (suffix == "tmp" || suffix == "trash" || suffix == "old") {
      fs::remove_all(entry.path(), ec);
    }
  }
  fs::path tmp = tmp_dir_for(dir, step);
  if (fs::exists(tmp)) throw std::runtime_error("cannot remove the stale " + tmp.string());
  if (!fs::create_directory(tmp, ec) || ec) {
    throw std::runtime_error("cannot create " + tmp.string() + ": " + (ec ? ec.message() : "unknown error"));
  }
}

/// One rank's part of a save: writes its shard (fsynced by the writer), hashes it, and returns
/// the record rank 0 needs for the manifest.
ShardRecord write_shard(const fs::path& tmp, const CheckpointContents& c, int rank, int world_size,
                        const std::vector<int>& assignment, const ShardWrittenHook& after_written) {
  if (!fs::is_directory(tmp)) {
    throw std::runtime_error("does not see " + tmp.string() + ", which rank 0 created: the checkpoint " +
                             "directory must be on a filesystem shared by every rank");
  }
  NamedTensors tensors;
  for (size_t i = 0; i < c.replicated.size(); ++i) {
    if (assignment[i] == rank) {
      tensors.emplace_back(c.replicated[i].first,
                           c.replicated[i].second.detach().to(torch::kCPU).contiguous());
    }
  }
  ShardRecord record;
  for (const auto& [name, tensor] : c.per_rank) {
    TensorEntry e{.name = per_rank_prefix(rank) + name, .per_rank = true, .rank = rank, .shard = rank,
                  .dtype = checkpoint_dtype_name(tensor.scalar_type()), .shape = tensor.sizes().vec(),
                  .bytes = tensor_bytes(tensor)};
    tensors.emplace_back(e.name, tensor.detach().to(torch::kCPU).contiguous());
    record.per_rank_tensors.push_back(std::move(e));
  }
  fs::path path = tmp / shard_file_name(rank, world_size);
  std::map<std::string, std::string> attributes{{"format", "diffuse-checkpoint-shard"},
                                                {"format_version", std::to_string(kCheckpointFormatVersion)},
                                                {"step", std::to_string(c.step)},
                                                {"rank", std::to_string(rank)},
                                                {"world_size", std::to_string(world_size)}};
  data::write_hdf5_tensors(path, tensors, attributes);
  if (after_written) after_written(rank, c.step, path);
  record.shard = ShardEntry{path.filename().string(), rank, static_cast<int64_t>(fs::file_size(path)),
                            util::sha256_file(path)};
  return record;
}

/// Moves a checkpoint out of sight (rename) before deleting it, so a crash halfway through a
/// deletion never leaves a directory that still looks like a checkpoint.
void remove_checkpoint_dir(const fs::path& path) {
  fs::path trash = path;
  trash += ".trash";
  fs::remove_all(trash);
  fs::rename(path, trash);
  fs::remove_all(trash);
}

}  // namespace

namespace checkpoint_internal {

/// Complete checkpoints in `dir` (a step-N directory holding a manifest), newest step first.
std::vector<std::pair<int64_t, fs::path>> complete_checkpoints(const fs::path& dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return found;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    auto step = util::parse_step_name(entry.path().filename().string());
    if (step && entry.is_directory(ec) && fs::is_regular_file(entry.path() / kManifestFileName, ec)) {
      found.emplace_back(*step, entry.path());
    }
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return found;
}

}  // namespace checkpoint_internal

namespace {

void apply_retention(const fs::path& dir, int64_t saved_step, std::optional<int64_t> best_step,
                     const RetentionPolicy& policy, SavedCheckpoint& result) {
  auto all = complete_checkpoints(dir);
  for (size_t i = 0; i < all.size(); ++i) {
    int64_t step = all[i].first;
    bool keep = step == saved_step || step == best_step || policy.keep_last == 0 ||
                static_cast<int64_t>(i) < policy.keep_last || (policy.keep_every > 0 && step % policy.keep_every == 0);
    if (keep) continue;
    std::string error = capture([&] { remove_checkpoint_dir(all[i].second); });
    if (error.empty()) {
      result.removed.push_back(all[i].second);
    } else {
      result.warnings.push_back("retention could not remove " + all[i].second.string() + ": " + error);
    }
  }
}

}  // namespace

namespace checkpoint_internal {

/// Points the link `dir/link` at `name`: a relative symlink made beside it and renamed over it,
/// so readers see the old target or the new one, never neither.
void point_link_at(const fs::path& dir, const std::string& link, const std::string& name) {
  fs::path tmp = dir / (link + ".tmp");
  std::error_code ec;
  fs::remove(tmp, ec);
  fs::create_symlink(name, tmp);  // relative: the run directory may move
  fs::rename(tmp, dir / link);
}

}  // namespace checkpoint_internal

namespace {

/// Rank 0, after every shard is written: the manifest, then the atomic publication, then
/// retention. On failure the directory is left as it was before the save (tmp aside).
SavedCheckpoint publish(const fs::path& dir, const fs::path& tmp, const CheckpointContents& c,
                        const std::vector<ShardRecord>& records, const std::vector<int>& assignment,
                        const RetentionPolicy& policy) {
  const int world_size = static_cast<int>(records.size());
  Manifest m;
  m.step = c.step;
  m.world_size = world_size;
  m.created = util::utc_timestamp();
  m.diffuse_version = DIFFUSE_VERSION;
  m.git_hash = diffuse::git_hash();
  m.config = c.config_yaml;
  m.metadata.assign(c.metadata.begin(), c.metadata.end());
  for (size_t i = 0; i < c.replicated.size(); ++i) {
    const auto& t = c.replicated[i].second;
    m.tensors.push_back({.name = c.replicated[i].first, .shard = assignment[i],
                         .dtype = checkpoint_dtype_name(t.scalar_type()), .shape = t.sizes().vec(),
                         .bytes = tensor_bytes(t)});
  }
  for (const auto& record : records) {
    m.shards.push_back(record.shard);
    for (const auto& entry : record.per_rank_tensors) m.tensors.push_back(entry);
  }
  std::string text = manifest_to_json(m);
  // Checks the writer against the reader before anything is published.
  parse_manifest(text, "the manifest being written");
  util::write_file_durably(tmp / kManifestFileName, text);
  util::fsync_path(tmp, true);

  SavedCheckpoint result;
  for (const auto& s : m.shards) result.bytes += s.bytes;
  result.bytes += static_cast<int64_t>(text.size());

  const std::string name = util::step_name(c.step);
  const fs::path final_dir = dir / name;
  fs::path old_dir = final_dir;
  old_dir += ".old";
  bool replaced = false;
  std::error_code ec;
  if (fs::exists(fs::symlink_status(final_dir, ec))) {
    // The same step saved again (a run resumed from an older checkpoint): replace it, keeping the
    // old copy until the new one is published.
    if (!fs::is_directory(fs::symlink_status(final_dir, ec))) {
      throw std::runtime_error(final_dir.string() + " exists and is not a checkpoint directory");
    }
    fs::rename(final_dir, old_dir);
    replaced = true;
  }
  try {
    fs::rename(tmp, final_dir);
  } catch (...) {
    if (replaced) fs::rename(old_dir, final_dir, ec);
    throw;
  }
  try {
    util::fsync_path(dir, true);
    point_link_at(dir, kLatestLinkName, name);
  } catch (...) {
    // Unpublish: `latest` still names the previous checkpoint, so the new one must go too.
    fs::rename(final_dir, tmp, ec);
    if (replaced) fs::rename(old_dir, final_dir, ec);
    throw;
  }
  // `latest` has moved: from here on nothing may fail the save.
  std::string durability = capture([&] { util::fsync_path(dir, true); });
  if (!durability.empty()) result.warnings.push_back(durability);
  if (replaced) {
    std::string error = capture([&] { fs::remove_all(old_dir); });
    if (!error.empty()) result.warnings.push_back("could not remove " + old_dir.string() + ": " + error);
  }
  if (c.best_step) {
    // After `latest`: a failure here costs only the link, which the next save or resume restores.
    std::string error = capture([&] { point_best_at(dir, *c.best_step); });
    if (!error.empty()) result.warnings.push_back("could not move " + (dir / kBestLinkName).string() + ": " + error);
  }
  apply_retention(dir, c.step, c.best_step, policy, result);
  result.directory = final_dir;
  return result;
}

SavedCheckpoint save_collective(const dist::HostCollective& comm, const fs::path& dir,
                                const CheckpointContents& c, const RetentionPolicy& policy,
                                const ShardWrittenHook& after_written) {
  auto start = std::chrono::steady_clock::now();
  const std::string what = "saving checkpoint step " + std::to_string(c.step) + " in " + dir.string();
  const fs::path tmp = tmp_dir_for(dir, c.step);
  auto remove_tmp = [&] { fs::remove_all(tmp); };

  std::string signature;
  std::string error = capture([&] {
    validate_contents(c);
    signature = layout_signature(c);
  });
  auto signatures = comm.gather_strings(signature);
  if (comm.is_root() && error.empty()) {
    std::string differing;
    for (size_t r = 1; r < signatures.size(); ++r) {
      if (!signatures[r].empty() && signatures[r] != signature) {
        differing += (differing.empty() ? "" : ", ") + std::to_string(r);
      }
    }
    if (!differing.empty()) {
      error = "ranks " + differing +
              " passed a different step or different replicated tensors (names, dtypes, "
              "shapes) than rank 0; every rank must save the same replicated state";
    }
  }
  agree(comm, what, error);

  error = comm.is_root() ? capture([&] { prepare_save(dir, c.step); }) : "";
  agree(comm, what, error, remove_tmp);

  const auto assignment = assign_shards(c.replicated, comm.world_size());
  ShardRecord record;
  error = capture(
      [&] { record = write_shard(tmp, c, comm.rank(), comm.world_size(), assignment, after_written); });
  agree(comm, what, error, remove_tmp);

  // Records are structs everywhere but on the wire.
  auto wire = comm.gather_strings(shard_record_to_wire(record));
  std::vector<ShardRecord> records;
  error = capture([&] {
    for (size_t r = 0; r < wire.size(); ++r) {
      records.push_back(shard_record_from_wire(wire[r], "shard record of rank " + std::to_string(r)));
    }
  });
  agree(comm, what, error, remove_tmp);
  SavedCheckpoint result;
  error = comm.is_root() ? capture([&] { result = publish(dir, tmp, c, records, assignment, policy); }) : "";
  agree(comm, what, error, remove_tmp);

  result.directory = dir / util::step_name(c.step);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

}  // namespace

void point_best_at(const fs::path& checkpoints_dir, int64_t step) {
  const std::string name = util::step_name(step);
  std::error_code ec;
  if (!fs::is_regular_file(checkpoints_dir / name / kManifestFileName, ec)) {
    throw CheckpointError("cannot point " + (checkpoints_dir / kBestLinkName).string() + " at " + name +
                          ": it is not a complete checkpoint");
  }
  point_link_at(checkpoints_dir, kBestLinkName, name);
}

// ------------------------------------------------------------------------------------------------
// Public API.

CheckpointStore::CheckpointStore(fs::path checkpoints_dir, const dist::HostCollective& ranks, RetentionPolicy policy,
                                 ShardWrittenHook after_shard_written)
    : dir_(std::move(checkpoints_dir)),
      ranks_(ranks),
      policy_(policy),
      after_shard_written_(std::move(after_shard_written)) {
  if (policy_.keep_last < 0 || policy_.keep_every < 0) {
    throw std::invalid_argument("checkpoint retention needs keep_last >= 0 and keep_every >= 0, got " +
                                std::to_string(policy_.keep_last) + " and " +
                                std::to_string(policy_.keep_every));
  }
}

SavedCheckpoint CheckpointStore::save(const CheckpointContents& contents) {
  return save_collective(ranks_, dir_, contents, policy_, after_shard_written_);
}

std::optional<LoadedCheckpoint> CheckpointStore::load(const std::string& which, const LoadProgress& progress) {
  auto plan = [&]() -> CheckpointCandidates {
    if (which == kLatestLinkName) return plan_latest(dir_);
    fs::path path(which);
    std::error_code ec;
    if (path.is_relative() && !fs::exists(path, ec) && fs::exists(dir_ / path, ec)) path = dir_ / path;
    return plan_explicit(path);
  };
  return load_collective(ranks_, plan, /*include_per_rank=*/true, progress);
}

std::vector<fs::path> CheckpointStore::list() const {
  std::vector<fs::path> paths;
  for (const auto& [step, path] : complete_checkpoints(dir_)) paths.push_back(path);
  return paths;
}


fs::path write_checkpoint_as_world(const fs::path& checkpoints_dir,
                                   const std::vector<CheckpointContents>& ranks, RetentionPolicy policy) {
  if (ranks.empty()) {
    throw std::invalid_argument("write_checkpoint_as_world needs at least one rank's contents");
  }
  const int world_size = static_cast<int>(ranks.size());
  for (const auto& c : ranks) validate_contents(c);
  for (int r = 1; r < world_size; ++r) {
    if (layout_signature(ranks[static_cast<size_t>(r)]) != layout_signature(ranks[0])) {
      throw CheckpointError("rank " + std::to_string(r) +
                            " has a different step or replicated tensors than rank 0");
    }
  }
  const CheckpointContents& root = ranks[0];
  prepare_save(checkpoints_dir, root.step);
  const fs::path tmp = tmp_dir_for(checkpoints_dir, root.step);
  try {
    auto assignment = assign_shards(root.replicated, world_size);
    std::vector<ShardRecord> records;
    for (int r = 0; r < world_size; ++r) {
      records.push_back(write_shard(tmp, ranks[static_cast<size_t>(r)], r, world_size, assignment, {}));
    }
    return publish(checkpoints_dir, tmp, root, records, assignment, policy).directory;
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

}  // namespace diffuse::trainer
