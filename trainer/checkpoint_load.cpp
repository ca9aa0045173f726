// Checkpoint loading: locating the candidates (latest, an explicit directory, a run), verifying
// shards and the collective load protocol described in checkpoint.h. Saving: checkpoint.cpp.
#include <algorithm>
#include <map>
#include <set>
#include <unordered_map>

#include "data/hdf5_tensors.h"
#include "diffuse/build_config.h"
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_internal.h"
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

namespace {

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

}  // namespace

namespace checkpoint_internal {

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

}  // namespace checkpoint_internal

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

}  // namespace

namespace checkpoint_internal {

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

}  // namespace checkpoint_internal

LoadedCheckpoint read_checkpoint_single_process(const fs::path& path, const LoadProgress& progress) {
  dist::SoloCollective solo;
  auto loaded = load_collective(
      solo, [&] { return locate_checkpoints(path); }, /*include_per_rank=*/false, progress);
  if (!loaded) throw CheckpointError("no checkpoint found at " + path.string());
  return std::move(*loaded);
}

}  // namespace diffuse::trainer
