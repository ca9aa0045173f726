// Shared by config.cpp (the key table, parsing, writing) and config_validation.cpp (the checks);
// not part of the trainer's interface.
#pragma once

#include <string>

#include "trainer/config.h"

namespace diffuse::trainer::config_internal {

/// Shortest text that reads back to the same double (so to_yaml round-trips exactly), kept a
/// float in YAML's eyes (1 -> 1.0).
std::string shortest_text(double value);

/// Throws std::invalid_argument "config key KEY: got VALUE, expected ALLOWED" unless `ok`.
void require(bool ok, const std::string& key, const std::string& value, const std::string& allowed);

/// Refuses an infinite or NaN value of any float key, naming the key.
void require_finite_floats(const Config& config);

}  // namespace diffuse::trainer::config_internal
