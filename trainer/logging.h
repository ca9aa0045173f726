// trainer/logging.h: logging for the trainer and the CLI. Model, data and dist never log: they throw.
//
//   log::setup(ctx.rank(), ctx.world_size(), {.level = "info"});
//   log::info("step {} loss {:.4f}", step, loss);
#pragma once

#include <fmt/format.h>

#include <utility>

#include "trainer/log_sink.h"

namespace diffuse::trainer::log {

template <typename... Args>
void at(Level level, fmt::format_string<Args...> format, Args&&... args) {
  if (enabled(level)) write(level, fmt::format(format, std::forward<Args>(args)...));
}
template <typename... Args>
void debug(fmt::format_string<Args...> format, Args&&... args) {
  at(Level::debug, format, std::forward<Args>(args)...);
}
template <typename... Args>
void info(fmt::format_string<Args...> format, Args&&... args) {
  at(Level::info, format, std::forward<Args>(args)...);
}
template <typename... Args>
void warn(fmt::format_string<Args...> format, Args&&... args) {
  at(Level::warn, format, std::forward<Args>(args)...);
}
template <typename... Args>
void error(fmt::format_string<Args...> format, Args&&... args) {
  at(Level::error, format, std::forward<Args>(args)...);
}
template <typename... Args>
void critical(fmt::format_string<Args...> format, Args&&... args) {
  at(Level::critical, format, std::forward<Args>(args)...);
}

}  // namespace diffuse::trainer::log
