// model/safetensors.cpp: the safetensors format (a JSON header, then little-endian tensor bytes),
// read with full validation of offsets, dtypes and sizes.
#include "model/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "util/durable_file.h"
#include "util/format.h"
#include "util/json.h"

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this build assumes a little-endian host");

namespace diffuse::model {
namespace json = util::json;

// ---------------------------------------------------------------------------------------------
// safetensors

namespace {

struct DtypeInfo {
  const char* name;
  torch::ScalarType type;
  int64_t size;
};

constexpr DtypeInfo kDtypes[] = {
    {"BOOL", torch::kBool, 1},          {"U8", torch::kByte, 1},
    {"I8", torch::kChar, 1},            {"I16", torch::kShort, 2},
    {"U16", torch::kUInt16, 2},         {"I32", torch::kInt, 4},
    {"U32", torch::kUInt32, 4},         {"I64", torch::kLong, 8},
    {"U64", torch::kUInt64, 8},         {"F16", torch::kHalf, 2},
    {"BF16", torch::kBFloat16, 2},      {"F32", torch::kFloat, 4},
    {"F64", torch::kDouble, 8},         {"F8_E4M3", torch::kFloat8_e4m3fn, 1},
    {"F8_E5M2", torch::kFloat8_e5m2, 1},
};

const DtypeInfo* dtype_by_name(const std::string& name) {
  for (const auto& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

std::string known_dtypes() {
  std::string out;
  for (const auto& d : kDtypes) out += std::string(out.empty() ? "" : ", ") + d.name;
  return out;
}

}  // namespace

std::string safetensors_dtype_name(torch::ScalarType dtype) {
  for (const auto& d : kDtypes) {
    if (d.type == dtype) return d.name;
  }
  throw std::runtime_error(std::string("safetensors cannot store dtype ") + c10::toString(dtype));
}

void save_safetensors(const std::filesystem::path& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata, bool overwrite) {
  auto fail = [&](const std::string& what) {
    throw std::runtime_error("save_safetensors(" + path.string() + "): " + what);
  };
  std::vector<torch::Tensor> data;
  data.reserve(tensors.size());
  std::set<std::string> names;
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      header += (first ? "" : ",") + json::quote(k) + ":" + json::quote(v);
      first = false;
    }
    header += "}";
  }
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name.empty() || name == "__metadata__") fail("invalid tensor name '" + name + "'");
    if (!names.insert(name).second) fail("duplicate tensor name '" + name + "'");
    if (!tensor.defined()) fail("tensor '" + name + "' is undefined");
    std::string dtype;
    try {
      dtype = safetensors_dtype_name(tensor.scalar_type());
    } catch (const std::runtime_error& e) {
      fail("tensor '" + name + "': " + e.what());
    }
    auto cpu = tensor.detach().to(torch::kCPU).contiguous();
    const auto bytes = static_cast<uint64_t>(cpu.nbytes());
    header += std::string(header.size() > 1 ? "," : "") + json::quote(name) + ":{\"dtype\":\"" + dtype +
              "\",\"shape\":" + util::format_shape(cpu.sizes().vec()) + ",\"data_offsets\":[" + std::to_string(offset) +
              "," + std::to_string(offset + bytes) + "]}";
    offset += bytes;
    data.push_back(std::move(cpu));
  }
  header += "}";
  // Pad with spaces so the data starts 8-byte aligned, as the reference implementation does.
  header.append((8 - header.size() % 8) % 8, ' ');

  // Checked writes to a temporary beside the file, fsynced and renamed: a full disk or a killed
  // export never leaves a truncated file under the final name, and nothing but a regular file
  // (with overwrite) is ever replaced.
  util::AtomicFile file(path, overwrite);
  const uint64_t n = header.size();
  file.write(&n, sizeof(n));
  file.write(header.data(), header.size());
  for (const auto& t : data) file.write(t.data_ptr(), t.nbytes());
  file.commit();
}

SafetensorsFile load_safetensors(const std::filesystem::path& path) {
  auto fail = [&](const std::string& what) -> void {
    throw std::runtime_error("load_safetensors(" + path.string() + "): " + what);
  };
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) fail(std::string("cannot open the file: ") + std::strerror(errno));
  if (!S_ISREG(info.st_mode)) fail("not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open the file");
  const auto file_size = static_cast<uint64_t>(info.st_size);
  if (file_size < 8) {
    fail("the file is " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length: not a safetensors file");
  }
  uint64_t header_size = 0;
  in.read(reinterpret_cast<char*>(&header_size), sizeof(header_size));
  if (!in) fail("cannot read the header length");
  if (header_size > kSafetensorsMaxHeaderBytes) {
    fail("header length " + std::to_string(header_size) + " exceeds the limit of " +
         std::to_string(kSafetensorsMaxHeaderBytes) + " bytes: corrupt or not a safetensors file");
  }
  if (header_size > file_size - 8) {
    fail("header length " + std::to_string(header_size) + " runs past the end of the file (" +
         std::to_string(file_size) + " bytes): truncated?");
  }
  std::string header(header_size, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_size));
  if (!in) fail("cannot read the header");
  const uint64_t data_size = file_size - 8 - header_size;

  json::Value root;
  try {
    root = json::parse(header);
  } catch (const std::invalid_argument& e) {
    fail(std::string("the header is not valid JSON: ") + e.what());
  }
  if (root.type() != json::Value::Type::Object) fail(std::string("the header must be a JSON object, got ") + root.type_name());

  struct Entry {
    std::string name;
    const DtypeInfo* dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  SafetensorsFile file;
  for (const auto& [name, value] : root.as_object()) {
    if (name == "__metadata__") {
      if (value.type() != json::Value::Type::Object) fail("__metadata__ must be an object of strings");
      for (const auto& [k, v] : value.as_object()) {
        if (v.type() != json::Value::Type::String) {
          fail("__metadata__ value of \"" + k + "\" must be a string, got " + v.type_name());
        }
        file.metadata[k] = v.as_string();
      }
      continue;
    }
    const std::string where = "tensor '" + name + "': ";
    if (value.type() != json::Value::Type::Object) fail(where + "entry must be an object, got " + value.type_name());
    const auto* dtype_v = value.find("dtype");
    const auto* shape_v = value.find("shape");
    const auto* offsets_v = value.find("data_offsets");
    if (!dtype_v || !shape_v || !offsets_v) fail(where + "entry needs dtype, shape and data_offsets");
    Entry e{name, nullptr, {}, 0, 0};
    try {
      const auto& dtype_name = dtype_v->as_string();
      e.dtype = dtype_by_name(dtype_name);
      if (!e.dtype) fail(where + "unknown dtype '" + dtype_name + "' (known: " + known_dtypes() + ")");
      uint64_t numel = 1;
      for (const auto& d : shape_v->as_array()) {
        const uint64_t dim = d.as_uint64();
        if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
            __builtin_mul_overflow(numel, dim, &numel)) {
          fail(where + "the shape's element count overflows");
        }
        e.shape.push_back(static_cast<int64_t>(dim));
      }
      const auto& offsets = offsets_v->as_array();
      if (offsets.size() != 2) fail(where + "data_offsets must be [begin, end]");
      e.begin = offsets[0].as_uint64();
      e.end = offsets[1].as_uint64();
      if (e.end < e.begin) fail(where + "data_offsets end " + std::to_string(e.end) + " < begin " + std::to_string(e.begin));
      uint64_t nbytes = 0;
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(e.dtype->size), &nbytes) || nbytes != e.end - e.begin) {
        fail(where + "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + ") hold " +
             std::to_string(e.end - e.begin) + " bytes, but shape " + util::format_shape(e.shape) + " of " + e.dtype->name +
             " needs " + std::to_string(numel * static_cast<uint64_t>(e.dtype->size)));
      }
    } catch (const std::invalid_argument& err) {
      fail(where + err.what());
    }
    entries.push_back(std::move(e));
  }

  // Data must be tiled exactly: sorted by offset, each tensor starts where the previous ended,
  // the last ends at the end of the file.
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  const Entry* previous = nullptr;
  for (const auto& e : entries) {
    if (e.begin < expected) {
      fail("tensor '" + e.name + "' data [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
           ") overlaps tensor '" + previous->name + "' [" + std::to_string(previous->begin) + ", " +
           std::to_string(previous->end) + ")");
    }
    if (e.begin > expected) {
      fail("gap of " + std::to_string(e.begin - expected) + " unused bytes before tensor '" + e.name + "' at offset " +
           std::to_string(expected));
    }
    if (e.end > data_size) {
      fail("tensor '" + e.name + "' data ends at " + std::to_string(e.end) + " but the file holds only " +
           std::to_string(data_size) + " data bytes: truncated?");
    }
    expected = e.end;
    previous = &e;
  }
  if (expected != data_size) {
    fail(std::to_string(data_size - expected) + " bytes after the last tensor's data: corrupt file");
  }

  for (const auto& e : entries) {
    auto tensor = torch::empty(e.shape, torch::TensorOptions(e.dtype->type));
    in.seekg(static_cast<std::streamoff>(8 + header_size + e.begin));
    in.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(e.end - e.begin));
    if (!in) fail("reading the data of tensor '" + e.name + "' failed");
    if (e.dtype->type == torch::kBool && tensor.numel() > 0 && tensor.view(torch::kByte).max().item<uint8_t>() > 1) {
      fail("tensor '" + e.name + "' is BOOL but holds bytes other than 0 and 1");
    }
    file.tensors.emplace_back(e.name, std::move(tensor));
  }
  return file;
}

}  // namespace diffuse::model
