// trainer/checkpoint_inspect.cpp: `diffuse inspect` on a checkpoint. Shows the checkpoint as it is
// on disk, without the fallbacks a load would take.
#include "trainer/checkpoint_inspect.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

#include "trainer/checkpoint.h"
#include "util/files.h"
#include "util/format.h"
#include "util/json.h"

namespace diffuse::trainer {
namespace fs = std::filesystem;
namespace json = util::json;

CheckpointSummary describe_checkpoint(const fs::path& path, bool verify_hashes) {
  CheckpointCandidates plan = locate_checkpoints(path);
  if (plan.dirs.empty()) {
    throw CheckpointError("no complete checkpoint at " + path.string() +
                          (plan.warnings.empty() ? "" : " (" + plan.warnings.front() + ")"));
  }
  // `latest` is described as it is, without falling back: inspect shows the truth.
  const fs::path dir = plan.dirs.front();
  const Manifest m = parse_manifest(util::read_file(dir / kManifestFileName), (dir / kManifestFileName).string());

  std::ostringstream out;
  out << "checkpoint  " << fs::absolute(dir).lexically_normal().string() << "\n";
  for (const auto& w : plan.warnings) out << "warning     " << w << "\n";
  out << "step        " << m.step << "\n";
  out << "saved by    " << m.world_size << (m.world_size == 1 ? " rank" : " ranks") << "\n";
  out << "created     " << m.created << " by diffuse " << m.diffuse_version << " (git " << m.git_hash
      << ")\n";
  if (!m.metadata.empty()) {
    out << "metadata\n";
    for (const auto& [key, value] : m.metadata) {
      // One line each: values with line breaks or quotes are shown JSON-escaped.
      bool plain = std::none_of(value.begin(), value.end(),
                                [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == '"'; });
      out << "  " << key << ": " << (plain ? value : json::quote(value)) << "\n";
    }
  }
  int64_t replicated = 0, replicated_bytes = 0, per_rank = 0, per_rank_bytes = 0;
  std::vector<int64_t> shard_tensor_bytes(static_cast<size_t>(m.world_size), 0);
  for (const auto& t : m.tensors) {
    (t.per_rank ? per_rank : replicated) += 1;
    (t.per_rank ? per_rank_bytes : replicated_bytes) += t.bytes;
    shard_tensor_bytes[static_cast<size_t>(t.shard)] += t.bytes;
  }
  out << "tensors     " << replicated << " replicated (" << util::format_bytes(replicated_bytes) << "), " << per_rank
      << " per-rank (" << util::format_bytes(per_rank_bytes) << ")\n";
  out << "shards      " << (verify_hashes ? "size and sha256 checked" : "size checked, sha256 not checked")
      << "\n";
  int failed = 0;
  for (const auto& s : m.shards) {
    std::string problem;
    try {
      problem = verify_shard(dir, s, verify_hashes);
    } catch (const std::exception& e) {
      problem = e.what();
    }
    failed += problem.empty() ? 0 : 1;
    char line[512];
    std::snprintf(line, sizeof(line), "  %-26s %10s  tensors %10s  sha256 %.12s  ", s.file.c_str(),
                  util::format_bytes(s.bytes).c_str(),
                  util::format_bytes(shard_tensor_bytes[static_cast<size_t>(s.rank)]).c_str(), s.sha256.c_str());
    out << line << (problem.empty() ? "OK" : "FAILED: " + problem) << "\n";
  }
  out << "result      "
      << (failed == 0
              ? "OK"
              : "FAILED (" + std::to_string(failed) + " of " + std::to_string(m.world_size) + " shards)")
      << "\n";
  out << "config\n";
  std::istringstream config(m.config);
  for (std::string line; std::getline(config, line);) out << "  " << line << "\n";
  return {out.str(), failed == 0};
}

}  // namespace diffuse::trainer
