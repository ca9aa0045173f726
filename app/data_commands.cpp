// `diffuse prep` and the dataset half of `diffuse inspect`: option definitions, progress on
// stderr, and printed summaries. The work itself lives in data/ (prep.h, dataset.h).
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>

#include <fmt/format.h>

#include "data/dataset.h"
#include "data/image_io.h"
#include "data/prep.h"
#include "data/synthetic.h"
#include "app/commands.h"
#include "trainer/logging.h"
#include "util/format.h"

namespace diffuse::app {
namespace log = trainer::log;
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

/// 1234567 -> "1,234,567".
std::string grouped(int64_t value) {
  std::string digits = std::to_string(value < 0 ? -value : value), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return (value < 0 ? "-" : "") + out;
}

std::string duration_text(double seconds) {
  if (!std::isfinite(seconds)) return "?";
  if (seconds < 10) return fmt::format("{:.1f}s", seconds);
  auto s = static_cast<int64_t>(std::llround(seconds));
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
}

/// Progress on stderr with rate and ETA: on a terminal one line rewritten in place (at most ten
/// times a second); otherwise (a log file, a batch job) a full line every ten seconds.
class ProgressPrinter {
 public:
  explicit ProgressPrinter(std::string label)
      : label_(std::move(label)), terminal_(::isatty(STDERR_FILENO) == 1), start_(Clock::now()), last_(start_) {}
  ~ProgressPrinter() {
    if (open_line_) std::fputc('\n', stderr);  // an error message must not land on the progress line
  }

  void update(int64_t done, int64_t total) {
    const auto now = Clock::now();
    const bool finished = done >= total;
    const double since = std::chrono::duration<double>(now - last_).count();
    if (!finished && since < (terminal_ ? 0.1 : 10.0)) return;
    if (finished && !terminal_ && !printed_) return;  // a quick run needs no progress lines
    last_ = now;
    printed_ = true;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double rate = elapsed > 0 ? done / elapsed : 0;
    const double eta = rate > 0 ? (total - done) / rate : NAN;
    std::string line = fmt::format("{}: {}/{} images ({:.1f}%), {} images/s, ETA {}", label_, grouped(done),
                                   grouped(total), total > 0 ? 100.0 * done / total : 100.0,
                                   grouped(static_cast<int64_t>(rate)), duration_text(eta));
    if (terminal_) {
      std::fprintf(stderr, "\r%s\033[K%s", line.c_str(), finished ? "\n" : "");
      open_line_ = !finished;
    } else {
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    std::fflush(stderr);
  }

 private:
  std::string label_;
  bool terminal_;
  bool printed_ = false, open_line_ = false;
  Clock::time_point start_, last_;
};

/// Everything `diffuse prep` parses; optional numbers use 0 for "not given".
struct PrepArguments {
  std::string input, output, labels, format = "auto", compression = "none", synthetic;
  int64_t size = 0, channels = 0, count = 0;
  uint64_t seed = 0;
  int threads = 0;
  bool labels_from_folders = false, skip_bad = false, overwrite = false;
};

int run_prep(const dist::Context& ctx, const PrepArguments& arguments) {
  if (ctx.world_size() > 1) {
    throw std::runtime_error("diffuse prep runs as one process (it uses --threads); start it without mpirun/srun");
  }
  data::PrepOptions options;
  options.input = arguments.input;
  options.output = arguments.output;
  options.format = arguments.format;
  if (!arguments.labels.empty()) options.labels = arguments.labels;
  if (arguments.size > 0) options.size = arguments.size;
  if (arguments.channels > 0) options.channels = arguments.channels;
  options.labels_from_folders = arguments.labels_from_folders;
  options.skip_bad = arguments.skip_bad;
  options.overwrite = arguments.overwrite;
  options.compression = arguments.compression;
  options.threads = arguments.threads;
  options.synthetic = arguments.synthetic;
  options.count = arguments.count;
  options.seed = arguments.seed;
  data::PrepReport report;
  {
    ProgressPrinter progress("prep " + (arguments.synthetic.empty() ? arguments.input : arguments.synthetic));
    options.progress = [&progress](const data::PrepProgress& p) { progress.update(p.done, p.total); };
    report = data::prep_dataset(options);
  }
  for (const auto& bad : report.skipped_bad) log::warn("skipped unreadable input {}: {}", bad.path.string(), bad.reason);
  for (const auto& entry : report.skipped_entries) log::warn("skipped {}: {}", entry.path.string(), entry.reason);
  for (const auto& stale : report.removed_stale) log::info("removed {}, left by a prep that was killed", stale.string());
  std::error_code error;
  const auto file_bytes = fs::file_size(report.output, error);
  log::info("wrote {}: {} images of {}x{}x{} (H x W x C){}{}, {}, in {} ({} images/s)", report.output.string(),
            grouped(report.written), report.height, report.width, report.channels,
            report.has_labels ? fmt::format(", {} classes", report.class_names.size()) : ", no labels",
            report.skipped_bad.empty() ? "" : fmt::format(", {} unreadable skipped", report.skipped_bad.size()),
            error ? "size unknown" : util::format_bytes(static_cast<double>(file_bytes)), duration_text(report.seconds),
            grouped(static_cast<int64_t>(report.written / std::max(report.seconds, 1e-9))));
  return 0;
}

}  // namespace

void add_prep_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand(
      "prep", "Convert images into a diffuse dataset (HDF5): a folder of PNG/JPEG/BMP, MNIST/Fashion-MNIST idx "
              "files, CIFAR-10 binary batches, or a built-in synthetic set");
  auto args = std::make_shared<PrepArguments>();
  auto* input = cmd->add_option("input", args->input,
                                "Folder of images (recursive), idx images file (.gz or not), CIFAR-10 .bin batch "
                                "or folder of data_batch_N.bin");
  cmd->add_option("-o,--output", args->output, "Dataset file to write (e.g. datasets/mnist32.h5)")->required();
  cmd->add_option("--size", args->size, "Centre-crop and resize every image to SIZE x SIZE")
      ->check(CLI::Range(int64_t{1}, int64_t{16384}));
  cmd->add_option("--channels", args->channels, "Output channels: 1 (grey) or 3 (RGB); default: the input's")
      ->check(CLI::IsMember({int64_t{1}, int64_t{3}}));
  cmd->add_flag("--labels-from-folders", args->labels_from_folders,
                "Folder input: label each image by its top-level sub-folder (sorted names)");
  cmd->add_option("--labels", args->labels, "idx labels file (default: the ...-labels-idx1-ubyte[.gz] beside it)");
  cmd->add_option("--format", args->format, "Input format: auto, folder, idx, cifar10")
      ->check(CLI::IsMember({"auto", "folder", "idx", "cifar10"}));
  cmd->add_flag("--skip-bad", args->skip_bad, "Leave out unreadable images (each is reported) instead of stopping");
  cmd->add_flag("--overwrite", args->overwrite, "Replace an existing output file");
  cmd->add_option("--compression", args->compression,
                  "none (default; fastest to read), gzip, or lzf (needs HDF5's LZF plugin)")
      ->check(CLI::IsMember({"none", "gzip", "lzf"}));
  cmd->add_option("--threads", args->threads, "Decoding threads (default: all cores)")->check(CLI::NonNegativeNumber);
  auto* synthetic = cmd->add_option("--synthetic", args->synthetic,
                                    "Make a built-in procedural dataset instead of reading input: shapes (labels: the shape), "
                                    "red-blue (labels: 0 red, 1 blue)")
                        ->check(CLI::IsMember(data::synthetic_dataset_names()));
  cmd->add_option("--count", args->count, "--synthetic: number of images")->needs(synthetic);
  cmd->add_option("--seed", args->seed, "--synthetic: seed (the same seed gives the same images)")->needs(synthetic);
  synthetic->excludes(input);
  cmd->callback([&action, args, cmd] {
    if (args->input.empty() && args->synthetic.empty()) {
      throw CLI::RequiredError("prep needs an input (folder, idx file, CIFAR-10 batch) or --synthetic NAME");
    }
    if (!args->synthetic.empty() && args->count < 1) throw CLI::RequiredError("--synthetic needs --count N (N >= 1)");
    action = [args](const dist::Context& ctx) { return run_prep(ctx, *args); };
  });
}

int inspect_dataset_command(const fs::path& file, const std::optional<fs::path>& grid, int64_t k, bool overwrite) {
  const data::DatasetInfo info = data::read_dataset_info(file);
  std::error_code error;
  const auto file_bytes = fs::file_size(file, error);
  auto row = [](const std::string& key, const std::string& value) { fmt::print("{:<12}{}\n", key, value); };
  row("dataset", fmt::format("{} ({})", file.string(), error ? "size unknown" : util::format_bytes(file_bytes)));
  row("format", fmt::format("diffuse image dataset, version {}", info.format_version));
  if (!info.source.empty()) row("source", info.source);
  row("images", fmt::format("{} x {} x {} x {} (N x H x W x C), uint8", grouped(info.count), info.height, info.width,
                            info.channels));
  if (info.chunk_shape.empty()) {
    row("chunks", "none (contiguous)");
  } else {
    int64_t chunk_bytes = 1;
    for (int64_t d : info.chunk_shape) chunk_bytes *= d;
    row("chunks", fmt::format("{} x {} x {} x {} ({} per chunk)", info.chunk_shape[0], info.chunk_shape[1],
                              info.chunk_shape[2], info.chunk_shape[3], util::format_bytes(chunk_bytes)));
  }
  row("compression", info.compression);
  if (!info.has_labels) {
    row("labels", "none");
  } else {
    auto labels = data::read_labels(file);
    std::map<int64_t, int64_t> histogram;
    const auto* values = labels.data_ptr<int64_t>();
    for (int64_t i = 0; i < labels.numel(); ++i) ++histogram[values[i]];
    row("labels", fmt::format("int64, {} distinct values", histogram.size()));
    fmt::print("{:<12}{:>8} {:>12} {:>7}  {}\n", "", "label", "count", "share", "name");
    for (const auto& [label, count] : histogram) {
      const bool named = label >= 0 && label < static_cast<int64_t>(info.class_names.size());
      fmt::print("{:<12}{:>8} {:>12} {:>6.1f}%  {}\n", "", label, grouped(count), 100.0 * count / info.count,
                 named ? info.class_names[label] : "");
    }
  }
  if (grid) {
    const int64_t n = std::clamp<int64_t>(k, 1, info.count);
    const auto nrow = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n))));
    data::save_image_grid(*grid, data::read_images(file, 0, n), nrow, /*padding=*/2, overwrite);
    row("grid", fmt::format("{}: the first {} images, {} per row", grid->string(), n, nrow));
  }
  return 0;
}

}  // namespace diffuse::app
