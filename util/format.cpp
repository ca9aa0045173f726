// util/format.cpp: see util/format.h.
#include "util/format.h"

#include <cmath>
#include <cstdio>
#include <ctime>
#include <utility>

namespace diffuse::util {

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int unit = 0;
  while (std::abs(bytes) >= 1024.0 && unit < 5) {
    bytes /= 1024.0;
    ++unit;
  }
  char text[48];
  std::snprintf(text, sizeof(text), unit == 0 ? "%.0f %s" : "%.1f %s", bytes, units[unit]);
  return text;
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  auto s = static_cast<long long>(seconds);
  char text[48];
  std::snprintf(text, sizeof(text), "%lld:%02lld:%02lld", s / 3600, (s / 60) % 60, s % 60);
  return text;
}

namespace {

const std::pair<c10::ScalarType, const char*> kDtypeNames[] = {
    {c10::ScalarType::Float, "float32"},   {c10::ScalarType::Double, "float64"},
    {c10::ScalarType::Half, "float16"},    {c10::ScalarType::BFloat16, "bfloat16"},
    {c10::ScalarType::Long, "int64"},      {c10::ScalarType::Int, "int32"},
    {c10::ScalarType::Short, "int16"},     {c10::ScalarType::Char, "int8"},
    {c10::ScalarType::Byte, "uint8"},      {c10::ScalarType::Bool, "bool"}};

}  // namespace

std::string dtype_name(c10::ScalarType dtype) {
  for (const auto& [type, name] : kDtypeNames) {
    if (type == dtype) return name;
  }
  return c10::toString(dtype);
}

std::optional<c10::ScalarType> dtype_from_name(const std::string& name) {
  for (const auto& [type, known] : kDtypeNames) {
    if (name == known) return type;
  }
  return std::nullopt;
}

std::string step_name(int64_t step) {
  char name[64];
  std::snprintf(name, sizeof(name), "step-%06lld", static_cast<long long>(step));
  return name;
}

std::optional<int64_t> parse_step_name(const std::string& name) {
  if (name.size() <= 5 || name.compare(0, 5, "step-") != 0 || name.size() > 5 + 18) return std::nullopt;
  int64_t step = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

std::string utc_timestamp() {
  std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

}  // namespace diffuse::util
