// trainer/log_sink.h: the formatting-free half of logging, implemented with spdlog.
//
// Why a separate half: LibTorch ships fmt 12 headers on its include path while Debian's spdlog
// needs Debian's fmt 9, so spdlog lives in one translation unit (log_sink.cpp, target
// diffuse_log) built without LibTorch's include paths. Everything else formats with fmt 12
// (trainer/logging.h) and hands finished lines to this sink.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

namespace diffuse::trainer::log {

enum class Level { trace, debug, info, warn, error, critical, off };

struct Options {
  std::string level = "info";  ///< trace, debug, info, warn, error, critical, off
  /// When set, every rank writes `rank-<N>.log` here at the chosen level.
  std::optional<std::filesystem::path> directory;
};

/// Names accepted by --log-level, for help texts and validation.
const char* level_names();

/// Parses a level name; throws std::invalid_argument naming the value otherwise.
Level parse_level(const std::string& name);

/// Installs this process's logger once: rank 0 logs to the console (stderr) at the chosen level;
/// other ranks print only warnings and errors, tagged with their rank; every rank optionally
/// keeps a full log file of its own. Throws on an unknown level or unwritable directory.
void setup(int rank, int world_size, const Options& options);

/// Adds (or replaces) the per-rank file sink once the run directory is known.
void add_rank_file(int rank, const std::filesystem::path& directory);

/// True when a message at `level` would be written somewhere (skip formatting otherwise).
bool enabled(Level level);

/// Writes one finished message.
void write(Level level, const std::string& message);

/// Flushes every sink (before exit or abort).
void flush();

}  // namespace diffuse::trainer::log
