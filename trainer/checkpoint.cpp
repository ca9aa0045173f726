// Checkpoint store: the save/load protocols described in checkpoint.h, the manifest's JSON, and
// the filesystem steps that make a save atomic (fsync, rename). The protocols run on a small
// `Collective` interface so the same code serves MPI ranks, a single process (sample/export), and
// tests that write a checkpoint "as if" from W ranks.
#include "trainer/checkpoint.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <set>
#include <sstream>
#include <unordered_map>

#include "data/hdf5_tensors.h"
#include "diffuse/build_config.h"
#include "model/json.h"

namespace diffuse::trainer {
namespace fs = std::filesystem;
namespace json = model::json;

namespace {

constexpr int kFormatVersion = 1;
constexpr const char* kManifestName = "manifest.json";
constexpr const char* kLatestName = "latest";

// ------------------------------------------------------------------------------------------------
// Collectives: the few host messages the protocols need.

class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual bool any(bool mine) const = 0;
  /// Rank 0 receives every rank's string in rank order; the others an empty vector.
  virtual std::vector<std::string> gather(const std::string& mine) const = 0;
  /// Every rank receives rank 0's string.
  virtual std::string broadcast(const std::string& value) const = 0;
  bool is_root() const { return rank() == 0; }
};

class MpiCollective final : public Collective {
 public:
  explicit MpiCollective(const dist::Context& ctx) : ctx_(ctx) {}
  int rank() const override { return ctx_.rank(); }
  int world_size() const override { return ctx_.world_size(); }
  bool any(bool mine) const override { return ctx_.max_over_ranks(mine ? 1 : 0) != 0; }
  std::vector<std::string> gather(const std::string& mine) const override {
    return ctx_.gather_strings(mine);
  }
  std::string broadcast(const std::string& value) const override { return ctx_.broadcast_string(value, 0); }

 private:
  const dist::Context& ctx_;
};

class SoloCollective final : public Collective {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  bool any(bool mine) const override { return mine; }
  std::vector<std::string> gather(const std::string& mine) const override { return {mine}; }
  std::string broadcast(const std::string& value) const override { return value; }
};

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
void agree(const Collective& comm, const std::string& what, const std::string& my_error,
           const std::function<void()>& root_cleanup = {}) {
  if (!comm.any(!my_error.empty())) return;
  auto errors = comm.gather(my_error);
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
  throw CheckpointError(comm.broadcast(message));
}

// ------------------------------------------------------------------------------------------------
// Files.

std::string errno_text(int code) { return std::strerror(code); }

/// fsync of a file or directory: without the directory's, a rename may not survive a power cut.
void fsync_path(const fs::path& path, bool directory) {
  int fd = ::open(path.c_str(), O_RDONLY | (directory ? O_DIRECTORY : 0) | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + path.string() + " to fsync it: " + errno_text(errno));
  int result = ::fsync(fd);
  int code = errno;
  ::close(fd);
  // Some filesystems refuse fsync on directories (EINVAL); their renames are durable anyway.
  if (result != 0 && !(directory && code == EINVAL)) {
    throw std::runtime_error("fsync of " + path.string() + " failed: " + errno_text(code));
  }
}

void write_file_durably(const fs::path& path, const std::string& content) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + path.string() + ": " + errno_text(errno));
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int code = errno;
      ::close(fd);
      throw std::runtime_error("cannot write " + path.string() + ": " + errno_text(code));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    int code = errno;
    ::close(fd);
    throw std::runtime_error("fsync of " + path.string() + " failed: " + errno_text(code));
  }
  if (::close(fd) != 0) throw std::runtime_error("cannot close " + path.string() + ": " + errno_text(errno));
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path.string() + ": " + errno_text(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) throw std::runtime_error("cannot read " + path.string());
  return buffer.str();
}

std::string to_hex(const unsigned char* bytes, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string hex(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    hex[2 * i] = digits[bytes[i] >> 4];
    hex[2 * i + 1] = digits[bytes[i] & 15];
  }
  return hex;
}

class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new(), &EVP_MD_CTX_free) {
    if (!ctx_ || EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr) != 1) {
      throw std::runtime_error("OpenSSL could not start a SHA-256 digest");
    }
  }
  void update(const void* data, size_t n) {
    if (EVP_DigestUpdate(ctx_.get(), data, n) != 1) throw std::runtime_error("OpenSSL SHA-256 update failed");
  }
  std::string hex() {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int length = 0;
    if (EVP_DigestFinal_ex(ctx_.get(), digest, &length) != 1) {
      throw std::runtime_error("OpenSSL SHA-256 failed");
    }
    return to_hex(digest, length);
  }

 private:
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx_;
};

std::string sha256_of_file(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + path.string() + ": " + errno_text(errno));
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  Sha256 sha;
  std::vector<char> buffer(4 << 20);
  while (true) {
    ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int code = errno;
      ::close(fd);
      throw std::runtime_error("cannot read " + path.string() + ": " + errno_text(code));
    }
    if (n == 0) break;
    sha.update(buffer.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  return sha.hex();
}

std::string sha256_of_string(const std::string& text) {
  Sha256 sha;
  sha.update(text.data(), text.size());
  return sha.hex();
}

std::string step_dir_name(int64_t step) {
  char name[64];
  std::snprintf(name, sizeof(name), "step-%06lld", static_cast<long long>(step));
  return name;
}

/// The step of a directory named "step-<digits>", or nothing.
std::optional<int64_t> parse_step_dir_name(const std::string& name) {
  if (name.size() <= 5 || name.compare(0, 5, "step-") != 0 || name.size() > 5 + 18) return std::nullopt;
  int64_t step = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

std::string shard_file_name(int rank, int world_size) {
  char name[64];
  std::snprintf(name, sizeof(name), "shard-%05d-of-%05d.h5", rank, world_size);
  return name;
}

// HDF5 dataset names cannot hold '/' (it separates groups), hence a dot.
std::string per_rank_prefix(int rank) { return "rank" + std::to_string(rank) + "."; }

/// True for names of the form "rank<digits>.<...>", reserved for per-rank tensors.
bool looks_per_rank(const std::string& name) {
  if (name.compare(0, 4, "rank") != 0) return false;
  size_t i = 4;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i;
  return i > 4 && i < name.size() && name[i] == '.';
}

std::string iso_time_now() {
  std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

std::string human_bytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof(text), unit == 0 ? "%.0f %s" : "%.1f %s", value, units[unit]);
  return text;
}

// ------------------------------------------------------------------------------------------------
// JSON: written with model::json's quoting, read back with its strict parser (which also reads
// anything a person or Python's json module writes in its place).

/// Parses `text`, naming `source` and the byte offset of the problem when it is not valid JSON.
json::Value parse_json(const std::string& text, const std::string& source) {
  try {
    return json::parse(text);
  } catch (const std::invalid_argument& e) {
    // model::json says "JSON error at byte N: problem"; keep its offset and problem.
    const std::string what = e.what(), prefix = "JSON error ";
    if (what.compare(0, prefix.size(), prefix) == 0) {
      throw CheckpointError(source + ": invalid JSON " + what.substr(prefix.size()));
    }
    throw CheckpointError(source + ": invalid JSON: " + what);
  }
}

/// Typed access with errors that name the file and the key.
class JsonReader {
 public:
  explicit JsonReader(std::string source) : source_(std::move(source)) {}

  const json::Value& member(const json::Value& object, const std::string& key,
                            const std::string& where) const {
    if (object.type() != json::Value::Type::Object) error(where + " is not an object");
    const json::Value* value = object.find(key);
    if (value == nullptr) error(where + " has no \"" + key + "\"");
    return *value;
  }
  /// `read` applied to `value`, its type or range error reported as a CheckpointError about `what`.
  template <typename T>
  T as(const json::Value& value, T (json::Value::*read)() const, const std::string& what) const {
    try {
      return (value.*read)();
    } catch (const std::invalid_argument& e) {
      error(what + ": " + e.what());
    }
  }
  int64_t integer(const json::Value& o, const std::string& key, const std::string& where) const {
    return as(member(o, key, where), &json::Value::as_int64, where + "." + key);
  }
  bool boolean(const json::Value& o, const std::string& key, const std::string& where) const {
    return as(member(o, key, where), &json::Value::as_bool, where + "." + key);
  }
  const std::string& string(const json::Value& o, const std::string& key, const std::string& where) const {
    return as(member(o, key, where), &json::Value::as_string, where + "." + key);
  }
  const json::Object& object(const json::Value& o, const std::string& key, const std::string& where) const {
    return as(member(o, key, where), &json::Value::as_object, where + "." + key);
  }
  const json::Array& array(const json::Value& o, const std::string& key, const std::string& where) const {
    return as(member(o, key, where), &json::Value::as_array, where + "." + key);
  }
  [[noreturn]] void error(const std::string& what) const { throw CheckpointError(source_ + ": " + what); }

 private:
  std::string source_;
};

// ------------------------------------------------------------------------------------------------
// Dtypes.

const std::vector<std::pair<torch::Dtype, const char*>>& dtype_names() {
  static const std::vector<std::pair<torch::Dtype, const char*>> names{
      {torch::kFloat32, "float32"},   {torch::kFloat64, "float64"}, {torch::kFloat16, "float16"},
      {torch::kBFloat16, "bfloat16"}, {torch::kInt64, "int64"},     {torch::kInt32, "int32"},
      {torch::kInt16, "int16"},       {torch::kInt8, "int8"},       {torch::kUInt8, "uint8"},
      {torch::kBool, "bool"}};
  return names;
}

std::string dtype_name(torch::Dtype dtype) {
  for (const auto& [d, name] : dtype_names()) {
    if (d == dtype) return name;
  }
  throw CheckpointError(std::string("checkpoints cannot store tensors of dtype ") + c10::toString(dtype));
}

std::optional<torch::Dtype> dtype_from_name(const std::string& name) {
  for (const auto& [d, n] : dtype_names()) {
    if (name == n) return d;
  }
  return std::nullopt;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

int64_t tensor_bytes(const torch::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

// ------------------------------------------------------------------------------------------------
// The manifest.

struct TensorEntry {
  std::string name;  ///< as stored: "model.x" or "rank1/rng"
  bool per_rank = false;
  int rank = -1;  ///< per-rank tensors only
  int shard = 0;
  std::string dtype;
  std::vector<int64_t> shape;
  int64_t bytes = 0;
};

struct ShardEntry {
  std::string file;
  int rank = 0;
  int64_t bytes = 0;
  std::string sha256;
};

struct Manifest {
  int64_t format_version = kFormatVersion;
  int64_t step = 0;
  int world_size = 0;
  std::string created, diffuse_version, git_hash, config;
  std::vector<std::pair<std::string, std::string>> metadata;
  std::vector<ShardEntry> shards;
  std::vector<TensorEntry> tensors;
};

std::string tensor_entry_json(const TensorEntry& t) {
  std::string out = "{\"kind\": " + json::quote(t.per_rank ? "per_rank" : "replicated");
  if (t.per_rank) out += ", \"rank\": " + std::to_string(t.rank);
  out +=
      ", \"shard\": " + std::to_string(t.shard) + ", \"dtype\": " + json::quote(t.dtype) + ", \"shape\": [";
  for (size_t i = 0; i < t.shape.size(); ++i) out += (i ? ", " : "") + std::to_string(t.shape[i]);
  return out + "], \"bytes\": " + std::to_string(t.bytes) + "}";
}

std::string shard_entry_json(const ShardEntry& s) {
  return "{\"file\": " + json::quote(s.file) + ", \"rank\": " + std::to_string(s.rank) +
         ", \"bytes\": " + std::to_string(s.bytes) + ", \"sha256\": " + json::quote(s.sha256) + "}";
}

std::string manifest_json(const Manifest& m) {
  std::string out = "{\n";
  out += "  \"format\": \"diffuse-checkpoint\",\n";
  out += "  \"format_version\": " + std::to_string(m.format_version) + ",\n";
  out += "  \"step\": " + std::to_string(m.step) + ",\n";
  out += "  \"world_size\": " + std::to_string(m.world_size) + ",\n";
  out += "  \"created\": " + json::quote(m.created) + ",\n";
  out += "  \"diffuse_version\": " + json::quote(m.diffuse_version) + ",\n";
  out += "  \"git_hash\": " + json::quote(m.git_hash) + ",\n";
  out += "  \"metadata\": {";
  for (size_t i = 0; i < m.metadata.size(); ++i) {
    out += (i ? ",\n    " : "\n    ") + json::quote(m.metadata[i].first) + ": " +
            json::quote(m.metadata[i].second);
  }
  out += m.metadata.empty() ? "},\n" : "\n  },\n";
  out += "  \"config\": " + json::quote(m.config) + ",\n";
  out += "  \"shards\": [";
  for (size_t i = 0; i < m.shards.size(); ++i) {
    out += (i ? ",\n    " : "\n    ") + shard_entry_json(m.shards[i]);
  }
  out += "\n  ],\n";
  out += "  \"tensors\": {";
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    out +=
        (i ? ",\n    " : "\n    ") + json::quote(m.tensors[i].name) + ": " + tensor_entry_json(m.tensors[i]);
  }
  out += m.tensors.empty() ? "}\n" : "\n  }\n";
  return out + "}\n";
}

TensorEntry parse_tensor_entry(const JsonReader& r, const std::string& name, const json::Value& j) {
  std::string where = "tensor \"" + name + "\"";
  TensorEntry t;
  t.name = name;
  const std::string& kind = r.string(j, "kind", where);
  if (kind != "replicated" && kind != "per_rank") r.error(where + " has unknown kind \"" + kind + "\"");
  t.per_rank = kind == "per_rank";
  if (t.per_rank) t.rank = static_cast<int>(r.integer(j, "rank", where));
  t.shard = static_cast<int>(r.integer(j, "shard", where));
  t.dtype = r.string(j, "dtype", where);
  for (const json::Value& d : r.array(j, "shape", where)) {
    const int64_t size = r.as(d, &json::Value::as_int64, where + " has a bad shape");
    if (size < 0) r.error(where + " has a bad shape: " + std::to_string(size));
    t.shape.push_back(size);
  }
  t.bytes = r.integer(j, "bytes", where);
  return t;
}

ShardEntry parse_shard_entry(const JsonReader& r, const json::Value& j, const std::string& where) {
  ShardEntry s;
  s.file = r.string(j, "file", where);
  s.rank = static_cast<int>(r.integer(j, "rank", where));
  s.bytes = r.integer(j, "bytes", where);
  s.sha256 = r.string(j, "sha256", where);
  return s;
}

/// Parses and checks a manifest: everything later code relies on (shard count, names, ranges) is
/// verified here, so a damaged or hand-edited manifest fails with a message, not a crash.
Manifest parse_manifest(const std::string& text, const std::string& source) {
  const json::Value root = parse_json(text, source);
  JsonReader r(source);
  Manifest m;
  if (root.type() != json::Value::Type::Object) r.error("the manifest is not a JSON object");
  if (r.string(root, "format", "manifest") != "diffuse-checkpoint") {
    r.error("\"format\" is not \"diffuse-checkpoint\"");
  }
  m.format_version = r.integer(root, "format_version", "manifest");
  if (m.format_version != kFormatVersion) {
    const json::Value* writer = root.find("diffuse_version");
    r.error("format_version " + std::to_string(m.format_version) + " is not the one this build reads (" +
            std::to_string(kFormatVersion) + "); use the diffuse version that wrote it (" +
            (writer && writer->type() == json::Value::Type::String ? writer->as_string() : "?") + ")");
  }
  m.step = r.integer(root, "step", "manifest");
  int64_t world = r.integer(root, "world_size", "manifest");
  if (world < 1 || world > 1000000) r.error("world_size " + std::to_string(world) + " is out of range");
  m.world_size = static_cast<int>(world);
  m.created = r.string(root, "created", "manifest");
  m.diffuse_version = r.string(root, "diffuse_version", "manifest");
  m.git_hash = r.string(root, "git_hash", "manifest");
  m.config = r.string(root, "config", "manifest");
  for (const auto& [key, value] : r.object(root, "metadata", "manifest")) {
    m.metadata.emplace_back(key, r.as(value, &json::Value::as_string, "metadata \"" + key + "\""));
  }
  const json::Array& shards = r.array(root, "shards", "manifest");
  if (static_cast<int64_t>(shards.size()) != world) {
    r.error("lists " + std::to_string(shards.size()) + " shards for world_size " +
            std::to_string(world));
  }
  for (size_t i = 0; i < shards.size(); ++i) {
    std::string where = "shards[" + std::to_string(i) + "]";
    ShardEntry s = parse_shard_entry(r, shards[i], where);
    if (s.rank != static_cast<int>(i) || s.file != shard_file_name(s.rank, m.world_size)) {
      r.error(where + " is \"" + s.file + "\" of rank " + std::to_string(s.rank) + ", expected \"" +
              shard_file_name(static_cast<int>(i), m.world_size) + "\"");
    }
    bool hex = s.sha256.size() == 64 &&
               std::all_of(s.sha256.begin(), s.sha256.end(), [](char c) { return std::isxdigit(c) != 0; });
    if (!hex || s.bytes < 0) r.error(where + " has a malformed size or sha256");
    m.shards.push_back(std::move(s));
  }
  // Tensor names are unique: the parser rejects duplicate keys.
  for (const auto& [name, value] : r.object(root, "tensors", "manifest")) {
    TensorEntry t = parse_tensor_entry(r, name, value);
    std::string where = "tensor \"" + name + "\"";
    if (t.shard < 0 || t.shard >= m.world_size) {
      r.error(where + " is in shard " + std::to_string(t.shard) + " of " + std::to_string(m.world_size));
    }
    if (t.per_rank && (t.rank != t.shard ||
                       name.compare(0, per_rank_prefix(t.rank).size(), per_rank_prefix(t.rank)) != 0)) {
      r.error(where + " is per-rank for rank " + std::to_string(t.rank) + " but named or placed otherwise");
    }
    if (!t.per_rank && looks_per_rank(name)) {
      r.error(where + " is replicated but named like a per-rank tensor");
    }
    auto dtype = dtype_from_name(t.dtype);
    if (!dtype) r.error(where + " has unknown dtype \"" + t.dtype + "\"");
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    if (numel * static_cast<int64_t>(c10::elementSize(*dtype)) != t.bytes) {
      r.error(where + " has " + std::to_string(t.bytes) + " bytes, which does not match " + t.dtype + " " +
              shape_text(t.shape));
    }
    m.tensors.push_back(std::move(t));
  }
  return m;
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
    dtype_name(tensor.scalar_type());
  }
  std::set<std::string> own;
  for (const auto& [name, tensor] : c.per_rank) {
    if (name.empty()) throw CheckpointError("a per-rank tensor has an empty name");
    if (!tensor.defined()) throw CheckpointError("per-rank tensor \"" + name + "\" is undefined");
    if (!own.insert(name).second) throw CheckpointError("per-rank tensor \"" + name + "\" appears twice");
    if (name.find('/') != std::string::npos) {
      throw CheckpointError("tensor name \"" + name + "\" contains '/'");
    }
    dtype_name(tensor.scalar_type());
  }
}

/// What every rank must agree on before a save: the step and the replicated tensors' layout.
std::string layout_signature(const CheckpointContents& c) {
  std::string text = "step " + std::to_string(c.step) + "\n";
  for (const auto& [name, tensor] : c.replicated) {
    text += name + " " + dtype_name(tensor.scalar_type()) + " " + shape_text(tensor.sizes().vec()) + "\n";
  }
  return sha256_of_string(text);
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

fs::path tmp_dir_for(const fs::path& dir, int64_t step) { return dir / (step_dir_name(step) + ".tmp"); }

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
    if (name == "latest.tmp") {
      fs::remove(entry.path(), ec);
      continue;
    }
    if (dot == std::string::npos || !parse_step_dir_name(name.substr(0, dot))) continue;
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

/// The test hook (see checkpoint.h): true when this rank's shard write must fail.
bool test_hook_fails(int rank, int64_t step) {
  const char* rank_var = std::getenv("DIFFUSE_TEST_FAIL_CHECKPOINT_RANK");
  if (rank_var == nullptr || *rank_var == '\0' || std::atoi(rank_var) != rank) return false;
  const char* step_var = std::getenv("DIFFUSE_TEST_FAIL_CHECKPOINT_STEP");
  return step_var == nullptr || *step_var == '\0' || std::atoll(step_var) == step;
}

/// One rank's part of a save: writes its shard (fsynced by the writer), hashes it, and returns
/// the record rank 0 needs for the manifest: {"shard": {...}, "tensors": {per-rank entries}}.
std::string write_shard(const fs::path& tmp, const CheckpointContents& c, int rank, int world_size,
                        const std::vector<int>& assignment) {
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
  std::string entries;
  for (const auto& [name, tensor] : c.per_rank) {
    TensorEntry e{.name = per_rank_prefix(rank) + name, .per_rank = true, .rank = rank, .shard = rank,
                  .dtype = dtype_name(tensor.scalar_type()), .shape = tensor.sizes().vec(),
                  .bytes = tensor_bytes(tensor)};
    entries += (entries.empty() ? "" : ", ") + json::quote(e.name) + ": " + tensor_entry_json(e);
    tensors.emplace_back(e.name, tensor.detach().to(torch::kCPU).contiguous());
  }
  fs::path path = tmp / shard_file_name(rank, world_size);
  std::map<std::string, std::string> attributes{{"format", "diffuse-checkpoint-shard"},
                                                {"format_version", std::to_string(kFormatVersion)},
                                                {"step", std::to_string(c.step)},
                                                {"rank", std::to_string(rank)},
                                                {"world_size", std::to_string(world_size)}};
  data::write_hdf5_tensors(path, tensors, attributes);
  if (test_hook_fails(rank, c.step)) {
    throw std::runtime_error("test hook DIFFUSE_TEST_FAIL_CHECKPOINT_RANK=" + std::to_string(rank) +
                             ": simulated failure after writing " + path.string());
  }
  ShardEntry shard{path.filename().string(), rank, static_cast<int64_t>(fs::file_size(path)),
                   sha256_of_file(path)};
  return "{\"shard\": " + shard_entry_json(shard) + ", \"tensors\": {" + entries + "}}";
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
    auto step = parse_step_dir_name(entry.path().filename().string());
    if (step && entry.is_directory(ec) && fs::is_regular_file(entry.path() / kManifestName, ec)) {
      found.emplace_back(*step, entry.path());
    }
  }
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return found;
}

void apply_retention(const fs::path& dir, int64_t saved_step, const RetentionPolicy& policy,
                     SavedCheckpoint& result) {
  auto all = complete_checkpoints(dir);
  for (size_t i = 0; i < all.size(); ++i) {
    int64_t step = all[i].first;
    bool keep = step == saved_step || policy.keep_last == 0 || static_cast<int64_t>(i) < policy.keep_last ||
                (policy.keep_every > 0 && step % policy.keep_every == 0);
    if (keep) continue;
    std::string error = capture([&] { remove_checkpoint_dir(all[i].second); });
    if (error.empty()) {
      result.removed.push_back(all[i].second);
    } else {
      result.warnings.push_back("retention could not remove " + all[i].second.string() + ": " + error);
    }
  }
}

void point_latest_at(const fs::path& dir, const std::string& name) {
  fs::path tmp = dir / "latest.tmp";
  std::error_code ec;
  fs::remove(tmp, ec);
  fs::create_symlink(name, tmp);  // relative: the run directory may move
  fs::rename(tmp, dir / kLatestName);
}

/// Rank 0, after every shard is written: the manifest, then the atomic publication, then
/// retention. On failure the directory is left as it was before the save (tmp aside).
SavedCheckpoint publish(const fs::path& dir, const fs::path& tmp, const CheckpointContents& c,
                        const std::vector<std::string>& records, const std::vector<int>& assignment,
                        const RetentionPolicy& policy) {
  const int world_size = static_cast<int>(records.size());
  Manifest m;
  m.step = c.step;
  m.world_size = world_size;
  m.created = iso_time_now();
  m.diffuse_version = DIFFUSE_VERSION;
  m.git_hash = diffuse::git_hash();
  m.config = c.config_yaml;
  m.metadata.assign(c.metadata.begin(), c.metadata.end());
  for (size_t i = 0; i < c.replicated.size(); ++i) {
    const auto& t = c.replicated[i].second;
    m.tensors.push_back({.name = c.replicated[i].first, .shard = assignment[i],
                         .dtype = dtype_name(t.scalar_type()), .shape = t.sizes().vec(),
                         .bytes = tensor_bytes(t)});
  }
  JsonReader reader("shard record");
  for (int r = 0; r < world_size; ++r) {
    const json::Value record =
        parse_json(records[static_cast<size_t>(r)], "shard record of rank " + std::to_string(r));
    m.shards.push_back(parse_shard_entry(reader, reader.member(record, "shard", "record"), "record.shard"));
    for (const auto& [name, value] : reader.object(record, "tensors", "record")) {
      m.tensors.push_back(parse_tensor_entry(reader, name, value));
    }
  }
  std::string text = manifest_json(m);
  // Checks the writer against the reader before anything is published.
  parse_manifest(text, "the manifest being written");
  write_file_durably(tmp / kManifestName, text);
  fsync_path(tmp, true);

  SavedCheckpoint result;
  for (const auto& s : m.shards) result.bytes += s.bytes;
  result.bytes += static_cast<int64_t>(text.size());

  const std::string name = step_dir_name(c.step);
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
    fsync_path(dir, true);
    point_latest_at(dir, name);
  } catch (...) {
    // Unpublish: `latest` still names the previous checkpoint, so the new one must go too.
    fs::rename(final_dir, tmp, ec);
    if (replaced) fs::rename(old_dir, final_dir, ec);
    throw;
  }
  // `latest` has moved: from here on nothing may fail the save.
  std::string durability = capture([&] { fsync_path(dir, true); });
  if (!durability.empty()) result.warnings.push_back(durability);
  if (replaced) {
    std::string error = capture([&] { fs::remove_all(old_dir); });
    if (!error.empty()) result.warnings.push_back("could not remove " + old_dir.string() + ": " + error);
  }
  apply_retention(dir, c.step, policy, result);
  result.directory = final_dir;
  return result;
}

SavedCheckpoint save_collective(const Collective& comm, const fs::path& dir, const CheckpointContents& c,
                                const RetentionPolicy& policy) {
  auto start = std::chrono::steady_clock::now();
  const std::string what = "saving checkpoint step " + std::to_string(c.step) + " in " + dir.string();
  const fs::path tmp = tmp_dir_for(dir, c.step);
  auto remove_tmp = [&] { fs::remove_all(tmp); };

  std::string signature;
  std::string error = capture([&] {
    validate_contents(c);
    signature = layout_signature(c);
  });
  auto signatures = comm.gather(signature);
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
  std::string record;
  error = capture([&] { record = write_shard(tmp, c, comm.rank(), comm.world_size(), assignment); });
  agree(comm, what, error, remove_tmp);

  auto records = comm.gather(record);
  SavedCheckpoint result;
  error = comm.is_root() ? capture([&] { result = publish(dir, tmp, c, records, assignment, policy); }) : "";
  agree(comm, what, error, remove_tmp);

  result.directory = dir / step_dir_name(c.step);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

// ------------------------------------------------------------------------------------------------
// Loading.

/// Which checkpoints to try, in order, decided by rank 0.
struct LoadPlan {
  bool explicit_dir = false;  ///< one named directory: any defect is an error
  std::vector<fs::path> dirs;
  std::vector<std::string> warnings;
};

std::string plan_to_json(const LoadPlan& plan, const std::string& error) {
  std::string out = "{\"error\": " + json::quote(error) +
                     ", \"explicit\": " + (plan.explicit_dir ? "true" : "false") + ", \"dirs\": [";
  for (size_t i = 0; i < plan.dirs.size(); ++i) {
    out += (i ? ", " : "") + json::quote(fs::absolute(plan.dirs[i]).lexically_normal().string());
  }
  out += "], \"warnings\": [";
  for (size_t i = 0; i < plan.warnings.size(); ++i) out += (i ? ", " : "") + json::quote(plan.warnings[i]);
  return out + "]}";
}

LoadPlan plan_from_json(const std::string& text) {
  const json::Value j = parse_json(text, "load plan");
  JsonReader r("load plan");
  const std::string& error = r.string(j, "error", "plan");
  if (!error.empty()) throw CheckpointError(error);
  LoadPlan plan;
  plan.explicit_dir = r.boolean(j, "explicit", "plan");
  for (const json::Value& d : r.array(j, "dirs", "plan")) {
    plan.dirs.emplace_back(r.as(d, &json::Value::as_string, "plan.dirs"));
  }
  for (const json::Value& w : r.array(j, "warnings", "plan")) {
    plan.warnings.push_back(r.as(w, &json::Value::as_string, "plan.warnings"));
  }
  return plan;
}

/// The target `latest` names (a symlink, or a text file holding the directory name), if any.
std::optional<fs::path> read_latest(const fs::path& checkpoints_dir) {
  fs::path link = checkpoints_dir / kLatestName;
  std::error_code ec;
  auto status = fs::symlink_status(link, ec);
  if (ec || !fs::exists(status)) return std::nullopt;
  fs::path target;
  if (fs::is_symlink(status)) {
    target = fs::read_symlink(link);
  } else if (fs::is_regular_file(status)) {
    std::string text = read_file(link);
    target = text.substr(0, text.find_first_of("\r\n"));
  } else {
    return std::nullopt;
  }
  return target.is_absolute() ? target : checkpoints_dir / target;
}

/// For "latest": the checkpoint `latest` names, then older complete ones, newest first. Newer
/// directories than `latest` are skipped: they belong to a timeline abandoned by resuming from an
/// older checkpoint (or were never published).
LoadPlan plan_latest(const fs::path& checkpoints_dir) {
  LoadPlan plan;
  auto complete = complete_checkpoints(checkpoints_dir);
  std::optional<int64_t> limit;
  if (auto target = read_latest(checkpoints_dir)) {
    limit = parse_step_dir_name(target->filename().string());
    std::error_code ec;
    if (fs::is_regular_file(*target / kManifestName, ec)) {
      plan.dirs.push_back(*target);
    } else {
      plan.warnings.push_back("checkpoint " + target->string() + " (named by " +
                              (checkpoints_dir / kLatestName).string() + ") is missing or has no manifest");
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

LoadPlan plan_explicit(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    throw CheckpointError("checkpoint directory " + dir.string() + " does not exist");
  }
  LoadPlan plan;
  plan.explicit_dir = true;
  plan.dirs.push_back(dir);
  return plan;
}

/// How a path given on the command line names a checkpoint (see read_checkpoint_single_process).
LoadPlan plan_for_path(const fs::path& path) {
  std::error_code ec;
  if (path.filename() == kLatestName) {
    fs::path base = path.parent_path().empty() ? fs::path(".") : path.parent_path();
    return plan_latest(fs::is_directory(base / "checkpoints", ec) ? base / "checkpoints" : base);
  }
  if (fs::exists(path / kManifestName, ec)) return plan_explicit(path);
  if (fs::is_directory(path / "checkpoints", ec)) return plan_latest(path / "checkpoints");
  if (fs::is_directory(path, ec)) {
    bool has_checkpoints = fs::exists(fs::symlink_status(path / kLatestName, ec));
    for (const auto& entry : fs::directory_iterator(path, ec)) {
      if (parse_step_dir_name(entry.path().filename().string())) has_checkpoints = true;
    }
    if (has_checkpoints) return plan_latest(path);
    if (parse_step_dir_name(path.filename().string())) {
      return plan_explicit(path);  // no manifest: loading it fails and says so
    }
  }
  throw CheckpointError(path.string() + " is not a checkpoint: expected a checkpoint directory (with " +
                        kManifestName + "), a run directory (with checkpoints/), a checkpoints directory, " +
                        "or a latest link");
}

/// Size and hash of one shard against the manifest; "" when it checks out.
std::string check_shard(const fs::path& dir, const ShardEntry& s, bool verify_hash) {
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
  std::string actual = sha256_of_file(path);
  if (actual != s.sha256) {
    return "shard " + std::to_string(s.rank) + " (" + s.file + ") fails its sha256 check (manifest " +
           s.sha256.substr(0, 16) + "..., file " + actual.substr(0, 16) + "...)";
  }
  return "";
}

/// Loads one candidate on every rank; throws the same CheckpointError everywhere when it is bad.
LoadedCheckpoint load_one(const Collective& comm, const fs::path& dir, bool include_per_rank) {
  // One reader of the manifest, so every rank works from the same text.
  std::string message;
  if (comm.is_root()) {
    message = "0";
    std::string error = capture([&] { message = "1" + read_file(dir / kManifestName); });
    if (!error.empty()) message = "0" + error;
  }
  message = comm.broadcast(message);
  if (message.empty() || message[0] != '1') {
    throw CheckpointError(message.empty() ? "no manifest" : message.substr(1));
  }
  const Manifest m = parse_manifest(message.substr(1), (dir / kManifestName).string());
  std::error_code ec;
  const std::string dir_name = fs::weakly_canonical(dir, ec).filename().string();  // through `latest`
  auto dir_step = parse_step_dir_name(dir_name);
  if (dir_step && *dir_step != m.step) {
    throw CheckpointError("the manifest says step " + std::to_string(m.step) + " but the directory is " +
                          dir_name);
  }

  // Each shard is hashed by one rank.
  std::string error;
  for (int s = comm.rank(); s < m.world_size; s += comm.world_size()) {
    error = capture([&] {
      std::string problem = check_shard(dir, m.shards[static_cast<size_t>(s)], true);
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
    for (int s : needed) {
      auto file = data::read_hdf5_tensors(dir / m.shards[static_cast<size_t>(s)].file);
      for (auto& [name, tensor] : file.tensors) read.emplace(name, std::move(tensor));
    }
    for (const auto& t : m.tensors) {
      if (t.per_rank && t.rank != out.per_rank_source) continue;
      auto it = read.find(t.name);
      std::string where = "tensor \"" + t.name + "\" in " + m.shards[static_cast<size_t>(t.shard)].file;
      if (it == read.end()) throw CheckpointError(where + " is missing");
      const torch::Tensor& tensor = it->second;
      if (dtype_name(tensor.scalar_type()) != t.dtype || tensor.sizes().vec() != t.shape) {
        throw CheckpointError(where + " is " + dtype_name(tensor.scalar_type()) + " " +
                              shape_text(tensor.sizes().vec()) + ", the manifest says " + t.dtype + " " +
                              shape_text(t.shape));
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
std::optional<LoadedCheckpoint> load_collective(const Collective& comm,
                                                const std::function<LoadPlan()>& plan_on_root,
                                                bool include_per_rank) {
  std::string message;
  if (comm.is_root()) {
    LoadPlan plan;
    std::string error = capture([&] { plan = plan_on_root(); });
    message = plan_to_json(plan, error);
  }
  LoadPlan plan = plan_from_json(comm.broadcast(message));
  std::vector<std::string> warnings = plan.warnings;
  for (size_t i = 0; i < plan.dirs.size(); ++i) {
    const fs::path& dir = plan.dirs[i];
    try {
      LoadedCheckpoint loaded = load_one(comm, dir, include_per_rank);
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

CheckpointStore::CheckpointStore(fs::path checkpoints_dir, const dist::Context& ctx, RetentionPolicy policy)
    : dir_(std::move(checkpoints_dir)), ctx_(ctx), policy_(policy) {
  if (policy_.keep_last < 0 || policy_.keep_every < 0) {
    throw std::invalid_argument("checkpoint retention needs keep_last >= 0 and keep_every >= 0, got " +
                                std::to_string(policy_.keep_last) + " and " +
                                std::to_string(policy_.keep_every));
  }
}

SavedCheckpoint CheckpointStore::save(const CheckpointContents& contents) {
  return save_collective(MpiCollective(ctx_), dir_, contents, policy_);
}

std::optional<LoadedCheckpoint> CheckpointStore::load(const std::string& which) {
  auto plan = [&]() -> LoadPlan {
    if (which == kLatestName) return plan_latest(dir_);
    fs::path path(which);
    std::error_code ec;
    if (path.is_relative() && !fs::exists(path, ec) && fs::exists(dir_ / path, ec)) path = dir_ / path;
    return plan_explicit(path);
  };
  return load_collective(MpiCollective(ctx_), plan, /*include_per_rank=*/true);
}

std::vector<fs::path> CheckpointStore::list() const {
  std::vector<fs::path> paths;
  for (const auto& [step, path] : complete_checkpoints(dir_)) paths.push_back(path);
  return paths;
}

LoadedCheckpoint read_checkpoint_single_process(const fs::path& path) {
  auto loaded = load_collective(
      SoloCollective(), [&] { return plan_for_path(path); }, /*include_per_rank=*/false);
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
    std::vector<std::string> records;
    for (int r = 0; r < world_size; ++r) {
      records.push_back(write_shard(tmp, ranks[static_cast<size_t>(r)], r, world_size, assignment));
    }
    return publish(checkpoints_dir, tmp, root, records, assignment, policy).directory;
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

CheckpointSummary describe_checkpoint(const fs::path& path, bool verify_hashes) {
  LoadPlan plan = plan_for_path(path);
  if (plan.dirs.empty()) {
    throw CheckpointError("no complete checkpoint at " + path.string() +
                          (plan.warnings.empty() ? "" : " (" + plan.warnings.front() + ")"));
  }
  // `latest` is described as it is, without falling back: inspect shows the truth.
  const fs::path dir = plan.dirs.front();
  const Manifest m = parse_manifest(read_file(dir / kManifestName), (dir / kManifestName).string());

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
  out << "tensors     " << replicated << " replicated (" << human_bytes(replicated_bytes) << "), " << per_rank
      << " per-rank (" << human_bytes(per_rank_bytes) << ")\n";
  out << "shards      " << (verify_hashes ? "size and sha256 checked" : "size checked, sha256 not checked")
      << "\n";
  int failed = 0;
  for (const auto& s : m.shards) {
    std::string problem = capture([&] {
      std::string p = check_shard(dir, s, verify_hashes);
      if (!p.empty()) throw std::runtime_error(p);
    });
    failed += problem.empty() ? 0 : 1;
    char line[512];
    std::snprintf(line, sizeof(line), "  %-26s %10s  tensors %10s  sha256 %.12s  ", s.file.c_str(),
                  human_bytes(s.bytes).c_str(),
                  human_bytes(shard_tensor_bytes[static_cast<size_t>(s.rank)]).c_str(), s.sha256.c_str());
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
