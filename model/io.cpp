// model/io.cpp: weights in and out of modules and files: the JSON reader behind safetensors headers
// and options metadata, safetensors itself, and PyTorch-ordered state dicts.
#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "model/json.h"
#include "model/safetensors.h"
#include "model/state_dict.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this build assumes a little-endian host");

namespace diffuse::model {

// ---------------------------------------------------------------------------------------------
// JSON

namespace json {

Value::Type Value::type() const { return static_cast<Type>(data_.index()); }

const char* Value::type_name() const {
  static const char* names[] = {"null", "bool", "number", "string", "array", "object"};
  return names[data_.index()];
}

namespace {

[[noreturn]] void wrong_type(const Value& v, const char* expected) {
  throw std::invalid_argument(std::string("expected ") + expected + ", got " + v.type_name());
}

}  // namespace

bool Value::as_bool() const {
  if (type() != Type::Bool) wrong_type(*this, "a boolean");
  return std::get<bool>(data_);
}

const std::string& Value::as_string() const {
  if (type() != Type::String) wrong_type(*this, "a string");
  return std::get<std::string>(data_);
}

const Array& Value::as_array() const {
  if (type() != Type::Array) wrong_type(*this, "an array");
  return *std::get<std::shared_ptr<Array>>(data_);
}

const Object& Value::as_object() const {
  if (type() != Type::Object) wrong_type(*this, "an object");
  return *std::get<std::shared_ptr<Object>>(data_);
}

namespace {

template <typename T>
T integer_from(const Value& v, const std::string& text, const char* what) {
  if (text.find_first_of(".eE") != std::string::npos) {
    throw std::invalid_argument("expected " + std::string(what) + ", got the non-integer " + text);
  }
  T out{};
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  if (ec != std::errc() || end != text.data() + text.size()) {
    throw std::invalid_argument("expected " + std::string(what) + ", got " + text + " (out of range)");
  }
  return out;
}

}  // namespace

int64_t Value::as_int64() const {
  if (type() != Type::Number) wrong_type(*this, "an integer");
  return integer_from<int64_t>(*this, std::get<Number>(data_).text, "an integer");
}

uint64_t Value::as_uint64() const {
  if (type() != Type::Number) wrong_type(*this, "a non-negative integer");
  const auto& text = std::get<Number>(data_).text;
  if (!text.empty() && text[0] == '-') throw std::invalid_argument("expected a non-negative integer, got " + text);
  return integer_from<uint64_t>(*this, text, "a non-negative integer");
}

double Value::as_double() const {
  if (type() != Type::Number) wrong_type(*this, "a number");
  const auto& text = std::get<Number>(data_).text;
  double out = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  if (ec != std::errc() || end != text.data() + text.size()) {
    throw std::invalid_argument("number " + text + " is out of the range of a double");
  }
  return out;
}

const Value* Value::find(std::string_view key) const {
  for (const auto& [k, v] : as_object()) {
    if (k == key) return &v;
  }
  return nullptr;
}

namespace {

// Returns the byte offset of the first invalid UTF-8 sequence (overlong forms, surrogates and
// code points beyond U+10FFFF are invalid), or npos.
size_t first_invalid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = 0;
    uint32_t cp = 0, min = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07, min = 0x10000;
    } else {
      return i;
    }
    if (i + len > s.size()) return i;
    for (size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

class Parser {
 public:
  explicit Parser(std::string_view text) : s_(text) {}

  Value document() {
    if (auto bad = first_invalid_utf8(s_); bad != std::string_view::npos) {
      pos_ = bad;
      fail("invalid UTF-8");
    }
    Value v = value();
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 64;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument("JSON error at byte " + std::to_string(pos_) + ": " + what);
  }

  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  char peek() {
    if (pos_ >= s_.size()) fail("unexpected end of input");
    return s_[pos_];
  }

  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "', found '" + s_[pos_] + "'");
    ++pos_;
  }

  Value value() {
    skip_ws();
    const char c = peek();
    switch (c) {
      case '{': return object();
      case '[': return array();
      case '"': return Value(string());
      case 't': literal("true"); return Value(true);
      case 'f': literal("false"); return Value(false);
      case 'n': literal("null"); return Value();
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return Value(number());
        fail(std::string("unexpected character '") + c + "'");
    }
  }

  void literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) fail("invalid literal (expected " + std::string(word) + ")");
    pos_ += word.size();
  }

  Value object() {
    if (++depth_ > kMaxDepth) fail("nesting deeper than 64 levels");
    ++pos_;
    Object members;
    std::set<std::string, std::less<>> seen;
    skip_ws();
    if (peek() == '}') {
      ++pos_;
    } else {
      while (true) {
        skip_ws();
        if (peek() != '"') fail("expected a string key");
        const size_t key_pos = pos_;
        std::string key = string();
        if (!seen.insert(key).second) {
          pos_ = key_pos;
          fail("duplicate key \"" + key + "\"");
        }
        skip_ws();
        expect(':');
        Value v = value();
        members.emplace_back(std::move(key), std::move(v));
        skip_ws();
        if (peek() == ',') {
          ++pos_;
          continue;
        }
        expect('}');
        break;
      }
    }
    --depth_;
    return Value(std::move(members));
  }

  Value array() {
    if (++depth_ > kMaxDepth) fail("nesting deeper than 64 levels");
    ++pos_;
    Array items;
    skip_ws();
    if (peek() == ']') {
      ++pos_;
    } else {
      while (true) {
        items.push_back(value());
        skip_ws();
        if (peek() == ',') {
          ++pos_;
          continue;
        }
        expect(']');
        break;
      }
    }
    --depth_;
    return Value(std::move(items));
  }

  uint32_t hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<uint32_t>(c - 'A' + 10);
      else fail("invalid hex digit in \\u escape");
    }
    return v;
  }

  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      const char c = s_[pos_];
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("unescaped control character in string");
      if (c != '\\') {
        out += c;
        ++pos_;
        continue;
      }
      ++pos_;
      if (pos_ >= s_.size()) fail("unterminated escape");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail("unpaired low surrogate in \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (s_.substr(pos_, 2) != "\\u") fail("unpaired high surrogate in \\u escape");
            pos_ += 2;
            const uint32_t low = hex4();
            if (low < 0xDC00 || low > 0xDFFF) fail("invalid low surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: --pos_; fail(std::string("invalid escape '\\") + e + "'");
      }
    }
  }

  Number number() {
    const size_t start = pos_;
    auto digits = [&]() {
      const size_t from = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      if (pos_ == from) fail("expected a digit");
    };
    if (s_[pos_] == '-') ++pos_;
    if (pos_ < s_.size() && s_[pos_] == '0') {
      ++pos_;
      if (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') fail("leading zeros are not allowed");
    } else {
      digits();
    }
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      digits();
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      digits();
    }
    return Number{std::string(s_.substr(start, pos_ - start))};
  }

  std::string_view s_;
  size_t pos_ = 0;
  int depth_ = 0;
};

}  // namespace

Value parse(std::string_view text) { return Parser(text).document(); }

std::string quote(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string number(double v) {
  if (!std::isfinite(v)) throw std::invalid_argument("JSON cannot represent " + std::to_string(v));
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  if (ec != std::errc()) throw std::invalid_argument("cannot format number");
  return std::string(buf, end);
}

}  // namespace json

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

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
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
                      const std::map<std::string, std::string>& metadata) {
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
              "\",\"shape\":" + shape_text(cpu.sizes().vec()) + ",\"data_offsets\":[" + std::to_string(offset) +
              "," + std::to_string(offset + bytes) + "]}";
    offset += bytes;
    data.push_back(std::move(cpu));
  }
  header += "}";
  // Pad with spaces so the data starts 8-byte aligned, as the reference implementation does.
  header.append((8 - header.size() % 8) % 8, ' ');

  const auto tmp = path.string() + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot open " + tmp + " for writing");
    const uint64_t n = header.size();
    out.write(reinterpret_cast<const char*>(&n), sizeof(n));
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const auto& t : data) out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    out.close();
    if (!out) {
      ::unlink(tmp.c_str());
      fail("write to " + tmp + " failed (disk full?)");
    }
  }
  // POSIX calls rather than std::filesystem: libtorch.so exports its own (newer) copy of the
  // std::filesystem operations, and which copy a binary binds to depends on its link order.
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    ::unlink(tmp.c_str());
    fail("cannot rename " + tmp + " into place: " + reason);
  }
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
             std::to_string(e.end - e.begin) + " bytes, but shape " + shape_text(e.shape) + " of " + e.dtype->name +
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

// ---------------------------------------------------------------------------------------------
// state dicts

namespace {

void collect(const torch::nn::Module& module, const std::string& prefix,
             std::vector<std::pair<std::string, torch::Tensor>>& out) {
  for (const auto& p : module.named_parameters(/*recurse=*/false)) out.emplace_back(prefix + p.key(), p.value().detach());
  for (const auto& b : module.named_buffers(/*recurse=*/false)) out.emplace_back(prefix + b.key(), b.value().detach());
  for (const auto& child : module.named_children()) collect(*child.value(), prefix + child.key() + ".", out);
}

std::string sizes_text(const torch::Tensor& t) { return shape_text(t.sizes().vec()); }

}  // namespace

std::vector<std::pair<std::string, torch::Tensor>> state_dict(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  collect(module, "", out);
  return out;
}

void load_state_dict(torch::nn::Module& module, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                     bool strict) {
  auto targets = state_dict(module);
  std::unordered_map<std::string, size_t> index;
  for (size_t i = 0; i < targets.size(); ++i) index.emplace(targets[i].first, i);

  std::vector<std::string> missing, unexpected, other;
  std::vector<bool> given(targets.size(), false);
  std::vector<std::pair<size_t, const torch::Tensor*>> copies;
  for (const auto& [name, tensor] : tensors) {
    auto it = index.find(name);
    if (it == index.end()) {
      if (strict) unexpected.push_back(name + " " + (tensor.defined() ? sizes_text(tensor) : "(undefined)"));
      continue;
    }
    if (given[it->second]) {
      other.push_back("key '" + name + "' given twice");
      continue;
    }
    given[it->second] = true;
    const auto& target = targets[it->second].second;
    if (!tensor.defined() || tensor.sizes() != target.sizes()) {
      other.push_back("shape mismatch for '" + name + "': the module expects " + sizes_text(target) + ", got " +
                      (tensor.defined() ? sizes_text(tensor) : "an undefined tensor"));
      continue;
    }
    copies.emplace_back(it->second, &tensor);
  }
  if (strict) {
    for (size_t i = 0; i < targets.size(); ++i) {
      if (!given[i]) missing.push_back(targets[i].first + " " + sizes_text(targets[i].second));
    }
  }
  if (!missing.empty() || !unexpected.empty() || !other.empty()) {
    std::ostringstream msg;
    msg << "load_state_dict: " << missing.size() << " missing, " << unexpected.size() << " unexpected, "
        << other.size() << " other problem(s)";
    auto list = [&](const char* title, const std::vector<std::string>& items) {
      constexpr size_t kShown = 20;
      for (size_t i = 0; i < items.size() && i < kShown; ++i) msg << "\n  " << title << items[i];
      if (items.size() > kShown) msg << "\n  ... and " << items.size() - kShown << " more " << title;
    };
    list("missing key: ", missing);
    list("unexpected key: ", unexpected);
    list("", other);
    throw std::runtime_error(msg.str());
  }
  torch::NoGradGuard no_grad;
  for (const auto& [i, tensor] : copies) targets[i].second.copy_(*tensor);
}

int64_t parameter_count(const torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  return n;
}

}  // namespace diffuse::model
