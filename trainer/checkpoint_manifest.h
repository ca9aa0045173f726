// trainer/checkpoint_manifest.h: the on-disk schema of a checkpoint: the manifest (manifest.json)
// with its JSON writer and strict reader, the names of shard files and per-rank tensors, and the
// record each rank sends rank 0 after writing its shard. Pure data and text: no MPI, no files, so
// it is tested on its own (tests/trainer/checkpoint_manifest_test.cpp). The layout is documented
// in trainer/checkpoint.h.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::trainer {

/// A checkpoint could not be written, read or verified. On a collective save or load every rank
/// throws the same message.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The manifest format this build writes and reads.
inline constexpr int kCheckpointFormatVersion = 1;
inline constexpr const char* kManifestFileName = "manifest.json";
inline constexpr const char* kLatestLinkName = "latest";
/// The checkpoint of the best evaluation so far (checkpoint.keep_best), beside `latest`.
inline constexpr const char* kBestLinkName = "best";

/// One tensor as the manifest lists it.
struct TensorEntry {
  std::string name;  ///< as stored: "model.x" or "rank1.rng"
  bool per_rank = false;
  int rank = -1;  ///< per-rank tensors only
  int shard = 0;
  std::string dtype;
  std::vector<int64_t> shape;
  int64_t bytes = 0;
};

/// One shard file as the manifest lists it.
struct ShardEntry {
  std::string file;
  int rank = 0;
  int64_t bytes = 0;
  std::string sha256;
};

/// What one rank reports to rank 0 after writing its shard: the shard and its per-rank tensors.
struct ShardRecord {
  ShardEntry shard;
  std::vector<TensorEntry> per_rank_tensors;
};

struct Manifest {
  int64_t format_version = kCheckpointFormatVersion;
  int64_t step = 0;
  int world_size = 0;
  std::string created, diffuse_version, git_hash, config;
  std::vector<std::pair<std::string, std::string>> metadata;
  std::vector<ShardEntry> shards;
  std::vector<TensorEntry> tensors;
};

/// The manifest as UTF-8 JSON (keys in a fixed order, tensors in save order).
std::string manifest_to_json(const Manifest& manifest);
/// Parses and checks a manifest: everything later code relies on (shard count, names, ranges,
/// dtypes, byte counts) is verified, so a damaged or hand-edited manifest fails with a
/// CheckpointError naming `source` and the problem, never a crash.
Manifest parse_manifest(const std::string& text, const std::string& source);

/// A shard record on the wire between ranks (JSON), and back.
std::string shard_record_to_wire(const ShardRecord& record);
ShardRecord shard_record_from_wire(const std::string& text, const std::string& source);

/// "shard-00001-of-00004.h5"
std::string shard_file_name(int rank, int world_size);
/// "rank3.": the prefix of rank 3's own tensors (HDF5 dataset names cannot hold '/').
std::string per_rank_prefix(int rank);
/// True for names of the form "rank<digits>.<...>", reserved for per-rank tensors.
bool looks_per_rank(const std::string& name);

/// The manifest's name of a dtype ("float32", ...); throws CheckpointError for a dtype checkpoints
/// cannot store.
std::string checkpoint_dtype_name(torch::Dtype dtype);
int64_t tensor_bytes(const torch::Tensor& tensor);

}  // namespace diffuse::trainer
