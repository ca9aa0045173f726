// util/json.h: a small strict JSON reader and writer helpers, enough for safetensors headers and
// the model options stored in their `__metadata__`. Strict means RFC 8259 and nothing more: no
// comments, no trailing commas, no NaN, valid UTF-8 only, duplicate object keys rejected; parse
// errors name the byte offset. Numbers keep their text so 64-bit offsets never pass through a double.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace diffuse::util::json {

class Value;
/// Members in document order (order matters to nobody but keeps round trips stable).
using Object = std::vector<std::pair<std::string, Value>>;
using Array = std::vector<Value>;

/// A number as written in the document; converted on request with range and integrality checks.
struct Number {
  std::string text;
};

/// One JSON value. Accessors throw std::invalid_argument naming the expected and actual type.
class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Value() = default;
  explicit Value(bool b) : data_(b) {}
  explicit Value(Number n) : data_(std::move(n)) {}
  explicit Value(std::string s) : data_(std::move(s)) {}
  explicit Value(Array a) : data_(std::make_shared<Array>(std::move(a))) {}
  explicit Value(Object o) : data_(std::make_shared<Object>(std::move(o))) {}

  /// The kind of value this is.
  Type type() const;
  /// "null", "bool", "number", "string", "array" or "object".
  const char* type_name() const;
  bool is_null() const { return type() == Type::Null; }

  bool as_bool() const;
  const std::string& as_string() const;
  const Array& as_array() const;
  const Object& as_object() const;
  /// The number as an exact integer; throws when it has a fraction/exponent or is out of range.
  int64_t as_int64() const;
  uint64_t as_uint64() const;
  double as_double() const;

  /// The member named `key` of an object, or nullptr.
  const Value* find(std::string_view key) const;

 private:
  std::variant<std::monostate, bool, Number, std::string, std::shared_ptr<Array>, std::shared_ptr<Object>>
      data_;
};

/// Parses one JSON document (surrounding whitespace allowed). Throws std::invalid_argument with the
/// byte offset and the problem on any deviation from RFC 8259, on invalid UTF-8, on nesting deeper
/// than 64 levels and on duplicate keys within an object.
Value parse(std::string_view text);

/// `s` as a JSON string literal, quotes included.
std::string quote(std::string_view s);

/// The shortest decimal text that reads back as exactly `v` (throws for NaN and infinities).
std::string number(double v);

}  // namespace diffuse::util::json
