// trainer/progress.h: progress of a long command (sampling, evaluation, dataset preparation,
// checkpoint loading), shown the way `train` shows its own: on a terminal, one line redrawn in
// place with done/total, rate and ETA; otherwise (a batch log) a plain log line every
// `interval_s` seconds; and a closing summary line either way. Only rank 0 shows anything.
//
//   Progress progress({.label = "sampling", .total = n, .unit = "images", .enabled = ctx.is_root()});
//   for (...) { ...; progress.advance(batch); }
//   progress.finish();   // "sampling: 64 images in 0:00:12 (5.33 images/s)"
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <ostream>
#include <string>

namespace diffuse::trainer {

struct ProgressOptions {
  std::string label;           ///< what is being done: "sampling", "loading checkpoint"
  int64_t total = 0;           ///< units to do; 0 when unknown (then no percentage or ETA)
  std::string unit = "items";  ///< what a unit is: "images", "batches"
  bool enabled = true;         ///< false shows nothing: pass ctx.is_root()
  /// Redraw one terminal line; default: when stderr is a terminal.
  std::optional<bool> live;
  double interval_s = 30.0;    ///< plain lines: at most one per this many seconds
  /// Where the live line goes; std::cerr when null.
  std::ostream* terminal = nullptr;
  /// Where plain lines and the summary go; the log at INFO when unset.
  std::function<void(const std::string&)> log_line;
  /// Monotonic seconds; std::chrono::steady_clock when unset (tests inject).
  std::function<double()> clock;
};

/// Reports progress of one long operation; see the header comment.
class Progress {
 public:
  explicit Progress(ProgressOptions options);
  /// Ends a live line that finish() did not (an exception unwinding), so later output starts on
  /// a fresh line; prints no summary.
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  /// Records `n` more units done and shows progress when it is time to.
  void advance(int64_t n = 1);
  /// Clears the live line and writes the summary: units done, elapsed time and rate. Once.
  void finish();

  int64_t done() const { return done_; }

 private:
  double now() const;
  /// "12/64 images (19%), 3.52 images/s, ETA 0:00:14"
  std::string status(double elapsed) const;
  void draw_live(const std::string& line);

  ProgressOptions options_;
  bool live_ = false;
  bool finished_ = false;
  int64_t done_ = 0;
  double start_ = 0, last_shown_ = 0;
  size_t live_width_ = 0;  ///< length of the line on screen, to blank it out on redraw
};

/// H:MM:SS (to the nearest second), or "?" for an unknown (negative or non-finite) duration.
std::string format_hms(double seconds);

/// Progress of a read whose size is known only once it starts (a checkpoint): bytes reported,
/// shown in MiB; the line appears with the first report.
class BytesProgress {
 public:
  /// `options` as for Progress; its total and unit are set by the first report.
  explicit BytesProgress(ProgressOptions options) : options_(std::move(options)) {}
  void report(int64_t done, int64_t total);
  void finish();

 private:
  ProgressOptions options_;
  std::optional<Progress> progress_;
};

}  // namespace diffuse::trainer
