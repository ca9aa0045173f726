#include "trainer/progress.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>

#include "trainer/log_sink.h"

namespace diffuse::trainer {
namespace {

// A terminal line redraws at most this often: advance() may be called per image, and writing
// the line each time would cost more than the work on a fast GPU.
constexpr double kLiveRedrawSeconds = 0.2;

/// About three significant digits, never an exponent: 1234 -> "1234", 12.345 -> "12.3", 0.5 -> "0.50".
std::string format_rate(double rate) {
  char text[64];
  int decimals = rate >= 100 ? 0 : rate >= 10 ? 1 : 2;
  std::snprintf(text, sizeof(text), "%.*f", decimals, rate);
  return text;
}

}  // namespace

std::string format_hms(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  auto s = static_cast<int64_t>(std::llround(seconds));
  char text[64];
  std::snprintf(text, sizeof(text), "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                static_cast<long long>((s / 60) % 60), static_cast<long long>(s % 60));
  return text;
}

Progress::Progress(ProgressOptions options) : options_(std::move(options)) {
  live_ = options_.live.value_or(::isatty(STDERR_FILENO) == 1);
  if (options_.terminal == nullptr) options_.terminal = &std::cerr;
  if (!options_.log_line) options_.log_line = [](const std::string& line) { log::write(log::Level::info, line); };
  start_ = last_shown_ = now();
}

Progress::~Progress() {
  if (options_.enabled && live_ && !finished_ && live_width_ > 0) *options_.terminal << "\n" << std::flush;
}

double Progress::now() const {
  if (options_.clock) return options_.clock();
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string Progress::status(double elapsed) const {
  double rate = elapsed > 0 ? static_cast<double>(done_) / elapsed : 0.0;
  std::string line = std::to_string(done_);
  if (options_.total > 0) line += "/" + std::to_string(options_.total);
  line += " " + options_.unit;
  if (options_.total > 0) line += " (" + std::to_string(100 * done_ / options_.total) + "%)";
  line += ", " + format_rate(rate) + " " + options_.unit + "/s";
  if (options_.total > 0) {
    // ETA from the mean rate so far: steadier than the latest interval's.
    double eta = rate > 0 ? static_cast<double>(options_.total - done_) / rate : NAN;
    line += ", ETA " + format_hms(eta);
  }
  return line;
}

void Progress::draw_live(const std::string& line) {
  std::string padding(live_width_ > line.size() ? live_width_ - line.size() : 0, ' ');
  *options_.terminal << "\r" << line << padding << std::flush;
  live_width_ = line.size();
}

void Progress::advance(int64_t n) {
  done_ += n;
  if (!options_.enabled || finished_) return;
  double t = now();
  bool complete = options_.total > 0 && done_ >= options_.total;
  if (live_) {
    if (t - last_shown_ >= kLiveRedrawSeconds || complete || live_width_ == 0) {
      draw_live(options_.label + ": " + status(t - start_));
      last_shown_ = t;
    }
  } else if (t - last_shown_ >= options_.interval_s && !complete) {
    // The last unit is left to finish()'s summary, so a batch log does not get two lines for it.
    options_.log_line(options_.label + ": " + status(t - start_));
    last_shown_ = t;
  }
}

void Progress::finish() {
  if (!options_.enabled || finished_) return;
  finished_ = true;
  double elapsed = now() - start_;
  if (live_ && live_width_ > 0) {
    // Blank the live line: the summary goes to the log, which prints on this terminal too.
    *options_.terminal << "\r" << std::string(live_width_, ' ') << "\r" << std::flush;
  }
  double rate = elapsed > 0 ? static_cast<double>(done_) / elapsed : 0.0;
  options_.log_line(options_.label + ": " + std::to_string(done_) + " " + options_.unit + " in " +
                    format_hms(elapsed) + " (" + format_rate(rate) + " " + options_.unit + "/s)");
}

void BytesProgress::report(int64_t done, int64_t total) {
  constexpr int64_t kMiB = 1 << 20;
  if (!progress_) {
    options_.total = (total + kMiB - 1) / kMiB;
    options_.unit = "MiB";
    progress_.emplace(options_);
  }
  progress_->advance((done + kMiB - 1) / kMiB - progress_->done());
}

void BytesProgress::finish() {
  if (progress_) progress_->finish();
}

}  // namespace diffuse::trainer
