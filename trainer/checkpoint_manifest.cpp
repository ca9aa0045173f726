// trainer/checkpoint_manifest.cpp: the manifest's JSON, written with util::json's quoting and read
// back with its strict parser (which also reads anything a person or Python's json module writes
// in its place).
#include "trainer/checkpoint_manifest.h"

#include <algorithm>
#include <cctype>
#include <cstdio>

#include "util/format.h"
#include "util/json.h"

namespace diffuse::trainer {
namespace json = util::json;

namespace {


/// Parses `text`, naming `source` and the byte offset of the problem when it is not valid JSON.
json::Value parse_json(const std::string& text, const std::string& source) {
  try {
    return json::parse(text);
  } catch (const std::invalid_argument& e) {
    // util::json says "JSON error at byte N: problem"; keep its offset and problem.
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

}  // namespace

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

std::string checkpoint_dtype_name(torch::Dtype dtype) {
  std::string name = util::dtype_name(dtype);
  if (!util::dtype_from_name(name)) {
    throw CheckpointError("checkpoints cannot store tensors of dtype " + name);
  }
  return name;
}

int64_t tensor_bytes(const torch::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

namespace {

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

}  // namespace

std::string manifest_to_json(const Manifest& m) {
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

namespace {

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

}  // namespace

Manifest parse_manifest(const std::string& text, const std::string& source) {
  const json::Value root = parse_json(text, source);
  JsonReader r(source);
  Manifest m;
  if (root.type() != json::Value::Type::Object) r.error("the manifest is not a JSON object");
  if (r.string(root, "format", "manifest") != "diffuse-checkpoint") {
    r.error("\"format\" is not \"diffuse-checkpoint\"");
  }
  m.format_version = r.integer(root, "format_version", "manifest");
  if (m.format_version != kCheckpointFormatVersion) {
    const json::Value* writer = root.find("diffuse_version");
    r.error("format_version " + std::to_string(m.format_version) + " is not the one this build reads (" +
            std::to_string(kCheckpointFormatVersion) + "); use the diffuse version that wrote it (" +
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
    auto dtype = util::dtype_from_name(t.dtype);
    if (!dtype) r.error(where + " has unknown dtype \"" + t.dtype + "\"");
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    if (numel * static_cast<int64_t>(c10::elementSize(*dtype)) != t.bytes) {
      r.error(where + " has " + std::to_string(t.bytes) + " bytes, which does not match " + t.dtype + " " +
              util::format_shape(t.shape));
    }
    m.tensors.push_back(std::move(t));
  }
  return m;
}

std::string shard_record_to_wire(const ShardRecord& record) {
  std::string entries;
  for (const auto& e : record.per_rank_tensors) {
    entries += (entries.empty() ? "" : ", ") + json::quote(e.name) + ": " + tensor_entry_json(e);
  }
  return "{\"shard\": " + shard_entry_json(record.shard) + ", \"tensors\": {" + entries + "}}";
}

ShardRecord shard_record_from_wire(const std::string& text, const std::string& source) {
  const json::Value value = parse_json(text, source);
  JsonReader reader(source);
  ShardRecord record;
  record.shard = parse_shard_entry(reader, reader.member(value, "shard", "record"), "record.shard");
  for (const auto& [name, entry] : reader.object(value, "tensors", "record")) {
    record.per_rank_tensors.push_back(parse_tensor_entry(reader, name, entry));
  }
  return record;
}

}  // namespace diffuse::trainer
