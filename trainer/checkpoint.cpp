// Checkpoint store: the collective save/load protocols described in checkpoint.h and the filesystem
// steps that make a save atomic (fsync, rename). The protocols run on dist::HostCollective, so the
// same code serves MPI ranks (dist::Context), a single process (sample/export: SoloCollective), and
// tests that write a checkpoint "as if" from W ranks.
#include "trainer/checkpoint.h"

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

namespace {

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
           const std::function<void()>& root_cleanup = {}) {
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

/// Points the link `dir/link` at `name`: a relative symlink made beside it and renamed over it,
/// so readers see the old target or the new one, never neither.
void point_link_at(const fs::path& dir, const std::string& link, const std::string& name) {
  fs::path tmp = dir / (link + ".tmp");
  std::error_code ec;
  fs::remove(tmp, ec);
  fs::create_symlink(name, tmp);  // relative: the run directory may move
  fs::rename(tmp, dir / link);
}

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

// ------------------------------------------------------------------------------------------------
// Loading.

// The plan travels from rank 0 as JSON; it is this build's own text, so a parse failure is a bug.
std::string candidates_to_wire(const CheckpointCandidates& plan, const std::string& error) {
  std::string out = "{\"error\": " + json::quote(error) +
                    ", \"explicit\": " + (plan.explicit_dir ? "true" : "false") + ", \"dirs\": [";
  for (size_t i = 0; i < plan.dirs.size(); ++i) {
    out += (i ? ", " : "") + json::quote(fs::absolute(plan.dirs[i]).lexically_normal().string());
  }
  out += "], \"warnings\": [";
  for (size_t i = 0; i < plan.warnings.size(); ++i) out += (i ? ", " : "") + json::quote(plan.warnings[i]);
  return out + "]}";
}

CheckpointCandidates candidates_from_wire(const std::string& text) {
  const json::Value wire = json::parse(text);
  const std::string& error = wire.find("error")->as_string();
  if (!error.empty()) throw CheckpointError(error);
  CheckpointCandidates plan;
  plan.explicit_dir = wire.find("explicit")->as_bool();
  for (const json::Value& dir : wire.find("dirs")->as_array()) plan.dirs.emplace_back(dir.as_string());
  for (const json::Value& warning : wire.find("warnings")->as_array()) plan.warnings.push_back(warning.as_string());
  return plan;
}

/// The target `latest` names (a symlink, or a text file holding the directory name), if any.
std::optional<fs::path> read_latest(const fs::path& checkpoints_dir) {
  fs::path link = checkpoints_dir / kLatestLinkName;
  std::error_code ec;
  auto status = fs::symlink_status(link, ec);
  if (ec || !fs::exists(status)) return std::nullopt;
  fs::path target;
  if (fs::is_symlink(status)) {
    target = fs::read_symlink(link);
  } else if (fs::is_regular_file(status)) {
    std::string text = util::read_file(link);
    target = text.substr(0, text.find_first_of("\r\n"));
  } else {
    return std::nullopt;
  }
  return target.is_absolute() ? target : checkpoints_dir / target;
}

/// For "latest": the checkpoint `latest` names, then older complete ones, newest first. Newer
/// directories than `latest` are skipped: they belong to a timeline abandoned by resuming from an
/// older checkpoint (or were never published).
CheckpointCandidates plan_latest(const fs::path& checkpoints_dir) {
  CheckpointCandidates plan;
  auto complete = complete_checkpoints(checkpoints_dir);
  std::optional<int64_t> limit;
  if (auto target = read_latest(checkpoints_dir)) {
    limit = util::parse_step_name(target->filename().string());
    std::error_code ec;
    if (fs::is_regular_file(*target / kManifestFileName, ec)) {
      plan.dirs.push_back(*target);
    } else {
      plan.warnings.push_back("checkpoint " + target->string() + " (named by " +
                              (checkpoints_dir / kLatestLinkName).string() + ") is missing or has no manifest");
    }
  }
  for (const auto& [step, path] : complete) {
    std::error_code ec;
    if (!plan.dirs.empty() && fs::equivalent(path, plan.dirs.front(), ec)) continue;
    if (limit && step >= *limit) continue;
    plan.dirs.push_back(path);
  }
  return plan;
}

CheckpointCandidates plan_explicit(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    throw CheckpointError("checkpoint directory " + dir.string() + " does not exist");
  }
  CheckpointCandidates plan;
  plan.explicit_dir = true;
  plan.dirs.push_back(dir);
  return plan;
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

CheckpointCandidates locate_checkpoints(const fs::path& path) {
  std::error_code ec;
  if (path.filename() == kLatestLinkName) {
    fs::path base = path.parent_path().empty() ? fs::path(".") : path.parent_path();
    return plan_latest(fs::is_directory(base / "checkpoints", ec) ? base / "checkpoints" : base);
  }
  if (fs::exists(path / kManifestFileName, ec)) return plan_explicit(path);
  if (fs::is_directory(path / "checkpoints", ec)) return plan_latest(path / "checkpoints");
  if (fs::is_directory(path, ec)) {
    bool has_checkpoints = fs::exists(fs::symlink_status(path / kLatestLinkName, ec));
    for (const auto& entry : fs::directory_iterator(path, ec)) {
      if (util::parse_step_name(entry.path().filename().string())) has_checkpoints = true;
    }
    if (has_checkpoints) return plan_latest(path);
    if (util::parse_step_name(path.filename().string())) {
      return plan_explicit(path);  // no manifest: loading it fails and says so
    }
  }
  throw CheckpointError(path.string() + " is not a checkpoint: expected a checkpoint directory (with " +
                        kManifestFileName + "), a run directory (with checkpoints/), a checkpoints directory, " +
                        "or a latest link");
}

std::string verify_shard(const fs::path& dir, const ShardEntry& s, bool verify_hash) {
  fs::path path = dir / s.file;
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) {
    return "shard " + std::to_string(s.rank) + " (" + s.file + ") is missing";
  }
  auto size = static_cast<int64_t>(fs::file_size(path, ec));
  if (ec) return "shard " + std::to_string(s.rank) + " (" + s.file + ") cannot be read: " + ec.message();
  if (size != s.bytes) {
    return "shard " + std::to_string(s.rank) + " (" + s.file + ") has " + std::to_string(size) +
           " bytes, the manifest says " + std::to_string(s.bytes) + (size < s.bytes ? " (truncated)" : "");
  }
  if (!verify_hash) return "";
  std::string actual = util::sha256_file(path);
  if (actual != s.sha256) {
    return "shard " + std::to_string(s.rank) + " (" + s.file + ") fails its sha256 check (manifest " +
           s.sha256.substr(0, 16) + "..., file " + actual.substr(0, 16) + "...)";
  }
  return "";
}

namespace {

/// Loads one candidate on every rank; throws the same CheckpointError everywhere when it is bad.
LoadedCheckpoint load_one(const dist::HostCollective& comm, const fs::path& dir, bool include_per_rank,
                          const LoadProgress& progress) {
  // One reader of the manifest, so every rank works from the same text.
  std::string message;
  if (comm.is_root()) {
    message = "0";
    std::string error = capture([&] { message = "1" + util::read_file(dir / kManifestFileName); });
    if (!error.empty()) message = "0" + error;
  }
  message = comm.broadcast_string(message, 0);
  if (message.empty() || message[0] != '1') {
    throw CheckpointError(message.empty() ? "no manifest" : message.substr(1));
  }
  const Manifest m = parse_manifest(message.substr(1), (dir / kManifestFileName).string());
  std::error_code ec;
  const std::string dir_name = fs::weakly_canonical(dir, ec).filename().string();  // through `latest`
  auto dir_step = util::parse_step_name(dir_name);
  if (dir_step && *dir_step != m.step) {
    throw CheckpointError("the manifest says step " + std::to_string(m.step) + " but the directory is " +
                          dir_name);
  }

  // Each shard is hashed by one rank.
  std::string error;
  for (int s = comm.rank(); s < m.world_size; s += comm.world_size()) {
    error = capture([&] {
      std::string problem = verify_shard(dir, m.shards[static_cast<size_t>(s)], true);
      if (!problem.empty()) throw CheckpointError(problem);
    });
    if (!error.empty()) break;
  }
  agree(comm, "verification", error);

  LoadedCheckpoint out;
  out.directory = dir;
  out.step = m.step;
  out.saved_world_size = m.world_size;
  out.config_yaml = m.config;
  out.metadata.insert(m.metadata.begin(), m.metadata.end());
  out.created = m.created;
  out.diffuse_version = m.diffuse_version;
  out.git_hash = m.git_hash;
  if (include_per_rank) {
    out.per_rank_source = comm.rank() < m.world_size ? comm.rank() : comm.rank() % m.world_size;
    out.per_rank_inherited = comm.rank() >= m.world_size;
  }
  const std::string prefix = out.per_rank_source >= 0 ? per_rank_prefix(out.per_rank_source) : "";

  error = capture([&] {
    std::set<int> needed;
    for (const auto& t : m.tensors) {
      if (!t.per_rank || t.rank == out.per_rank_source) needed.insert(t.shard);
    }
    std::unordered_map<std::string, torch::Tensor> read;
    int64_t total = 0, done = 0;
    for (int s : needed) total += m.shards[static_cast<size_t>(s)].bytes;
    for (int s : needed) {
      auto file = data::read_hdf5_tensors(dir / m.shards[static_cast<size_t>(s)].file);
      for (auto& [name, tensor] : file.tensors) read.emplace(name, std::move(tensor));
      done += m.shards[static_cast<size_t>(s)].bytes;
      if (progress) progress(done, total);
    }
    for (const auto& t : m.tensors) {
      if (t.per_rank && t.rank != out.per_rank_source) continue;
      auto it = read.find(t.name);
      std::string where = "tensor \"" + t.name + "\" in " + m.shards[static_cast<size_t>(t.shard)].file;
      if (it == read.end()) throw CheckpointError(where + " is missing");
      const torch::Tensor& tensor = it->second;
      if (util::dtype_name(tensor.scalar_type()) != t.dtype || tensor.sizes().vec() != t.shape) {
        throw CheckpointError(where + " is " + util::dtype_name(tensor.scalar_type()) + " " +
                              util::format_shape(tensor.sizes().vec()) + ", the manifest says " + t.dtype + " " +
                              util::format_shape(t.shape));
      }
      if (t.per_rank) {
        out.per_rank.emplace_back(t.name.substr(prefix.size()), tensor.contiguous());
      } else {
        out.replicated.emplace_back(t.name, tensor.contiguous());
      }
    }
  });
  agree(comm, "reading", error);
  return out;
}

/// The load protocol: rank 0 plans (via `plan_on_root`), then the candidates are tried in order.
std::optional<LoadedCheckpoint> load_collective(const dist::HostCollective& comm,
                                                const std::function<CheckpointCandidates()>& plan_on_root,
                                                bool include_per_rank, const LoadProgress& progress) {
  std::string message;
  if (comm.is_root()) {
    CheckpointCandidates plan;
    std::string error = capture([&] { plan = plan_on_root(); });
    message = candidates_to_wire(plan, error);
  }
  CheckpointCandidates plan = candidates_from_wire(comm.broadcast_string(message, 0));
  std::vector<std::string> warnings = plan.warnings;
  for (size_t i = 0; i < plan.dirs.size(); ++i) {
    const fs::path& dir = plan.dirs[i];
    try {
      LoadedCheckpoint loaded = load_one(comm, dir, include_per_rank, progress);
      if (i > 0 || !warnings.empty()) {
        warnings.push_back("using the older checkpoint " + dir.string() + " (step " +
                           std::to_string(loaded.step) + ")");
      }
      loaded.warnings = warnings;
      return loaded;
    } catch (const CheckpointError& e) {
      std::string problem = "checkpoint " + dir.string() + " is unusable: " + e.what();
      if (plan.explicit_dir) throw CheckpointError(problem);
      warnings.push_back(problem);
    }
  }
  if (warnings.empty()) return std::nullopt;
  std::string all;
  for (const auto& w : warnings) all += "\n  " + w;
  throw CheckpointError("no usable checkpoint:" + all);
}

}  // namespace

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

LoadedCheckpoint read_checkpoint_single_process(const fs::path& path, const LoadProgress& progress) {
  dist::SoloCollective solo;
  auto loaded = load_collective(
      solo, [&] { return locate_checkpoints(path); }, /*include_per_rank=*/false, progress);
  if (!loaded) throw CheckpointError("no checkpoint found at " + path.string());
  return std::move(*loaded);
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
