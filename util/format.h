// util/format.h: the one place that turns sizes, durations, shapes, dtypes and step numbers into
// the text users see in logs, error messages, file names and manifests.
//
//   format_bytes(3.5 * 1024 * 1024)   -> "3.5 MiB"
//   format_duration(3725)             -> "1:02:05"
//   format_shape({64, 3, 3, 3})       -> "[64, 3, 3, 3]"
//   dtype_name(torch::kBFloat16)      -> "bfloat16"
//   step_name(1200)                   -> "step-001200"
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace diffuse::util {

/// Binary units with one decimal ("512 B", "1.5 KiB", "3.0 GiB").
std::string format_bytes(double bytes);

/// "H:MM:SS" for ETAs and run times; "?" for a negative or non-finite value.
std::string format_duration(double seconds);

/// "[a, b, c]" (also valid JSON, which the checkpoint manifest relies on).
template <typename Int>
  requires std::is_integral_v<Int>
std::string format_shape(const std::vector<Int>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

/// NumPy-style names ("float32", "bfloat16", "int64", "uint8", "bool"); c10's name for the rest.
std::string dtype_name(c10::ScalarType dtype);
/// The inverse of dtype_name for the NumPy-style names; nothing for any other text.
std::optional<c10::ScalarType> dtype_from_name(const std::string& name);

/// "step-000123": checkpoint directories and sample grids.
std::string step_name(int64_t step);
/// The step of a name "step-<digits>" (at most 18 digits), or nothing.
std::optional<int64_t> parse_step_name(const std::string& name);

/// The current UTC time as ISO 8601, e.g. "2026-12-02T03:04:05Z".
std::string utc_timestamp();

}  // namespace diffuse::util
