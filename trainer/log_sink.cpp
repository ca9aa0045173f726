#include "trainer/log_sink.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <stdexcept>

namespace diffuse::trainer::log {
namespace {

spdlog::level::level_enum to_spdlog(Level level) {
  return static_cast<spdlog::level::level_enum>(static_cast<int>(level));
}

std::string pattern_for(int rank) {
  return "[%Y-%m-%d %H:%M:%S.%e] [rank " + std::to_string(rank) + "] [%^%l%$] %v";
}

}  // namespace

const char* level_names() { return "trace, debug, info, warn, error, critical, off"; }

Level parse_level(const std::string& name) {
  static const char* names[] = {"trace", "debug", "info", "warn", "error", "critical", "off"};
  for (int i = 0; i < 7; ++i) {
    if (name == names[i]) return static_cast<Level>(i);
  }
  throw std::invalid_argument("unknown log level '" + name + "', expected one of: " + level_names());
}

void setup(int rank, int world_size, const Options& options) {
  auto level = to_spdlog(parse_level(options.level));
  // stderr, so that stdout stays clean for machine-readable output (doctor, inspect).
  auto console = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  console->set_level(rank == 0 ? level : std::max(level, spdlog::level::warn));
  console->set_pattern(world_size > 1 ? pattern_for(rank) : "[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
  auto logger = std::make_shared<spdlog::logger>("diffuse", console);
  logger->set_level(level);
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(logger);
  if (options.directory) add_rank_file(rank, *options.directory);
}

void add_rank_file(int rank, const std::filesystem::path& directory) {
  std::error_code error;
  std::filesystem::create_directories(directory, error);
  if (error) {
    throw std::runtime_error("cannot create log directory " + directory.string() + ": " + error.message());
  }
  auto path = directory / ("rank-" + std::to_string(rank) + ".log");
  auto file = std::make_shared<spdlog::sinks::basic_file_sink_mt>(path.string(), /*truncate=*/false);
  file->set_pattern(pattern_for(rank));
  file->set_level(spdlog::default_logger()->level());
  auto& sinks = spdlog::default_logger()->sinks();
  if (sinks.size() > 1) sinks.resize(1);  // keep the console sink, replace the file sink
  sinks.push_back(file);
}

bool enabled(Level level) { return spdlog::default_logger()->should_log(to_spdlog(level)); }

void write(Level level, const std::string& message) { spdlog::default_logger()->log(to_spdlog(level), message); }

void flush() { spdlog::default_logger()->flush(); }

}  // namespace diffuse::trainer::log
