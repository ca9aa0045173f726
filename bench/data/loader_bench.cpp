// loader_bench: how fast the loader delivers batches from a warm (page-cached) dataset file,
// beside the raw read rate of the same file (`cat file > /dev/null`), so its overhead is a ratio.
//
//   build/bin/loader_bench                          # 32x32x3 and 128x128x3; 0, 1 and 2 worker threads
//   build/bin/loader_bench --megabytes 512 --seconds 5 --batch 128 --side 128 --dir /scratch
//
// Each file holds about --megabytes of uint8 pixels (random, so nothing is unusually cheap).
// The loader reads random samples (a fresh permutation per epoch), flips half of them and
// converts to float [B, C, H, W] in [-1, 1], exactly as in training.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/loader.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct Arguments {
  fs::path dir = fs::temp_directory_path();
  double megabytes = 192;
  double seconds = 3;
  int64_t batch = 64;
  std::vector<int64_t> sides = {32, 128};
  bool keep = false;
  fs::path json;  // also write the figures to this JSON file
};

[[noreturn]] void usage(const char* problem) {
  std::fprintf(stderr,
               "%s\nusage: loader_bench [--dir DIR] [--megabytes MB] [--seconds S] [--batch B] [--side PIXELS] [--keep] [--json FILE]\n", problem);
  std::exit(2);
}

Arguments parse(int argc, char** argv) {
  Arguments a;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value for " + key).c_str());
      return argv[++i];
    };
    if (key == "--dir") a.dir = value();
    else if (key == "--megabytes") a.megabytes = std::stod(value());
    else if (key == "--seconds") a.seconds = std::stod(value());
    else if (key == "--batch") a.batch = std::stoll(value());
    else if (key == "--side") a.sides = {std::stoll(value())};
    else if (key == "--keep") a.keep = true;
    else if (key == "--json") a.json = value();
    else usage(("unknown option " + key).c_str());
  }
  return a;
}

// Writes `count` random images of side x side x 3 in blocks (never the whole file in memory).
void make_dataset(const fs::path& path, int64_t count, int64_t side) {
  diffuse::data::DatasetWriter writer(path, count, side, side, 3, /*with_labels=*/true, {.source = "loader_bench", .class_names = {}});
  const int64_t block = std::max<int64_t>(1, (16 << 20) / (side * side * 3));
  torch::manual_seed(0);
  for (int64_t start = 0; start < count; start += block) {
    const int64_t n = std::min(block, count - start);
    writer.append(torch::randint(0, 256, {n, side, side, 3}, torch::kUInt8), torch::randint(0, 10, {n}));
  }
  writer.finish();
}

// Best of three `cat file > /dev/null` runs on a warm page cache, in bytes per second.
double cat_rate(const fs::path& path) {
  const std::string command = "cat '" + path.string() + "' > /dev/null";
  double best = 0;
  for (int run = 0; run < 4; ++run) {  // the first run warms the cache
    auto start = Clock::now();
    if (std::system(command.c_str()) != 0) throw std::runtime_error("failed: " + command);
    double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    if (run > 0) best = std::max(best, static_cast<double>(fs::file_size(path)) / seconds);
  }
  return best;
}

struct LoaderRate {
  double images_per_second = 0;
  double wait_fraction = 0;  // of the timed span, how long next() blocked
  double read_us = 0, convert_us = 0;  // per image, on the I/O thread and on a worker
};

LoaderRate loader_rate(const fs::path& path, int64_t batch, int threads, double seconds) {
  diffuse::data::LoaderOptions options;
  options.path = path;
  options.batch_size = batch;
  options.worker_threads = threads;
  options.prefetch_batches = 4;
  options.seed = 1;
  diffuse::data::Loader loader(options);
  for (int k = 0; k < 10; ++k) loader.next();  // warm-up: threads started, queue full
  const auto before = loader.stats();
  int64_t images = 0;
  auto start = Clock::now();
  double elapsed = 0;
  while (elapsed < seconds) {
    images += loader.next().images.size(0);
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  }
  const auto after = loader.stats();
  // Batches read or converted ahead of next() are few (the prefetch depth) next to the count.
  const double n = static_cast<double>(after.batches - before.batches) * batch;
  return {images / elapsed, (after.wait_seconds - before.wait_seconds) / elapsed,
          1e6 * (after.read_seconds - before.read_seconds) / n, 1e6 * (after.convert_seconds - before.convert_seconds) / n};
}

}  // namespace

int main(int argc, char** argv) {
  const Arguments args = parse(argc, argv);
  std::printf("loader_bench: batch %lld, %.0f MB per file, %.1f s per measurement, %ld cores, files in %s\n",
              static_cast<long long>(args.batch), args.megabytes, args.seconds, ::sysconf(_SC_NPROCESSORS_ONLN),
              args.dir.c_str());
  std::printf("%-12s %9s %10s | %7s %11s %9s %8s %12s %9s %11s\n", "images", "count", "cat MB/s", "threads",
              "images/s", "MB/s", "vs cat", "next() wait", "read us", "convert us");
  std::string rows;
  for (int64_t side : args.sides) {
    const int64_t image_bytes = side * side * 3;
    const int64_t count = std::max<int64_t>(args.batch * 4, static_cast<int64_t>(args.megabytes * 1e6 / image_bytes));
    const fs::path path = args.dir / ("loader_bench_" + std::to_string(side) + ".h5");
    make_dataset(path, count, side);
    const double raw = cat_rate(path);
    // 0: the I/O thread also converts, the whole loader on one core.
    for (int threads : {0, 1, 2}) {
      LoaderRate rate = loader_rate(path, args.batch, threads, args.seconds);
      const double megabytes = rate.images_per_second * image_bytes / 1e6;
      std::printf("%-12s %9lld %10.0f | %7d %11.0f %9.0f %7.2fx %11.0f%% %9.1f %11.1f\n",
                  (std::to_string(side) + "x" + std::to_string(side) + "x3").c_str(), static_cast<long long>(count),
                  raw / 1e6, threads, rate.images_per_second, megabytes, megabytes / (raw / 1e6),
                  100 * rate.wait_fraction, rate.read_us, rate.convert_us);
      rows += std::string(rows.empty() ? "" : ", ") + "{\"side\": " + std::to_string(side) +
              ", \"threads\": " + std::to_string(threads) + ", \"images_per_second\": " +
              std::to_string(rate.images_per_second) + ", \"bytes_per_second\": " + std::to_string(megabytes * 1e6) +
              ", \"cat_bytes_per_second\": " + std::to_string(raw) + "}";
    }
    if (!args.keep) fs::remove(path);
  }
  if (!args.json.empty()) {
    std::ofstream out(args.json);
    out << "{\"program\": \"loader_bench\", \"batch\": " << args.batch << ", \"rows\": [" << rows << "]}\n";
    if (!out) {
      std::fprintf(stderr, "cannot write %s\n", args.json.c_str());
      return 1;
    }
  }
  return 0;
}
