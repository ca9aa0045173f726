// trainer/tensorboard.h: writes TensorBoard event files (scalars, PNG images, text), so that
// `tensorboard --logdir runs/` plots a run. Rank 0 owns the writer; the others never create one.
//
//   TensorBoardWriter tb(run.root / "tensorboard", {.resumed_from = checkpoint_step});  // unset: fresh
//   tb.add_text("config", config.to_yaml(), 0);
//   tb.add_scalars({{"loss", 0.05}, {"lr", 8e-5}}, step);        // reaches the OS before returning
//   tb.add_image("samples", read_file(run.sample_grid(step)), step);
//
// Format: TFRecord framing (trainer/tfrecord.h) of protobuf `Event` messages with TensorBoard's
// field numbers (trainer/tensorboard_event.proto). Scalars are `simple_value`s, images
// `Summary.Image`s holding the PNG bytes as given, text a DT_STRING tensor with the text plugin's
// metadata: the forms TensorBoard's own legacy writers produce, which every reader accepts.
//
// Resumes. Each writer starts a new file, named like TensorFlow's
// (`events.out.tfevents.<unix time>.<host>.<pid>.<n>`), so TensorBoard reads a resumed run's
// file after the files of its earlier attempts, as one run. An attempt that crashed may have
// logged steps after its last checkpoint S; the resumed attempt logs them again. To keep one
// curve with nothing twice, every file's second event is a SessionLog START, as TensorFlow's
// supervisor wrote at each session start: at step 0 for a fresh run, at S + 1 for a run given
// `resumed_from = S`. TensorBoard's readers then agree:
//   - its Python loaders (EventAccumulator, and the server's with --load_fast=false; both purge
//     orphaned data by default) drop, at a START after the run's first one, every scalar and
//     image that earlier files hold at that step or later;
//   - its Rust data server (the default loader) ignores SessionLog but, per tag, drops the points
//     at steps >= s when a later file brings a point at step s, so each re-logged step replaces
//     its orphan.
// The caller's part: after a resume log only steps > S (the trainer continues at S + 1), and
// start a fresh run with an empty directory (as it starts metrics.jsonl afresh).
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::trainer {

struct TensorBoardOptions {
  /// The checkpoint step a resumed run continues from: what earlier files logged after it is
  /// orphaned (see the header comment). Unset for a fresh run.
  std::optional<int64_t> resumed_from;
  /// Seconds since the epoch, for each event's wall_time; the system clock when unset (tests inject).
  std::function<double()> wall_clock;
};

/// Appends events to a new event file in a directory; see the header comment for the format.
/// Every add_* call writes its event through to the OS before returning, so a run that crashes
/// still shows everything it logged. Not thread-safe: one thread (rank 0's trainer) writes.
class TensorBoardWriter {
 public:
  /// Creates `directory` if needed and a new event file in it, starting with the file_version
  /// event ("brain.Event:2") and a SessionLog START. Throws std::runtime_error naming the path
  /// when it cannot.
  explicit TensorBoardWriter(const std::filesystem::path& directory, TensorBoardOptions options = {});
  /// Closes the file after an fsync; reports (never throws) a failure.
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  /// The event file this writer appends to.
  const std::filesystem::path& path() const { return path_; }

  /// One scalar (stored as float32, TensorBoard's scalar type) at `step`.
  void add_scalar(const std::string& tag, double value, int64_t step);
  /// Several scalars at one step, in one event (a metrics row).
  void add_scalars(const std::vector<std::pair<std::string, double>>& values, int64_t step);
  /// A PNG image at `step`; height, width and colour type come from its header. Throws
  /// std::invalid_argument when `png` is not a PNG.
  void add_image(const std::string& tag, const std::string& png, int64_t step);
  /// A text (rendered as Markdown by TensorBoard's text plugin) at `step`.
  void add_text(const std::string& tag, const std::string& text, int64_t step);

  /// Pushes everything written to the disk (fsync). The add_* calls already reach the OS; this
  /// is for a point that should survive a machine crash (before exit, after a checkpoint).
  void flush();

 private:
  void write_event(const std::string& serialized_event);
  double now() const;

  std::filesystem::path path_;
  TensorBoardOptions options_;
  std::FILE* file_ = nullptr;
};

/// TensorBoard's event file name for a file created at `unix_seconds` by process `pid` on
/// `host`, the `sequence`-th of that process: events.out.tfevents.<10-digit time>.<host>.<pid>.<n>.
std::string tensorboard_event_file_name(int64_t unix_seconds, const std::string& host, int64_t pid,
                                        int64_t sequence);

}  // namespace diffuse::trainer
