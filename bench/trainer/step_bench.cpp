// bench/trainer/step_bench.cpp: one training step of a config, broken into phases, beside the
// machine's matmul FLOP/s measured in the same run; and checkpoint save/load rates.
//
//   build/bin/step_bench --config configs/demo.yaml --steps 5 --json demo.json
//   build/bin/step_bench --config configs/reference-128.yaml --set train.batch_size=2 --set
//   train.precision=fp32 build/bin/step_bench --checkpoint /scratch/ckpt --config configs/reference-128.yaml
//   --json ckpt.json
//
// Step mode drives the real trainer (Trainer::train_steps_for_benchmark with a ProfilingStepTimer:
// the same set-up and train_step as `diffuse train`, with a device sync between phases) on a synthetic dataset of random pixels of
// the config's image size written to a temporary file (or --data FILE). Reported per phase: the
// median over --steps timed steps after --warmup untimed ones. The achieved FLOP/s counts
// 3 x the analytic U-Net forward FLOPs (forward + backward = 2 x forward) per image; the ratio is
// over the best at::matmul rate of square fp32 / bf16 matrices measured just before.
//
// Checkpoint mode saves the trainer's checkpoint state for the config's U-Net (weights, AdamW
// moments, one EMA shadow per decay; the shapes the trainer saves) with CheckpointStore, then, after
// dropping the page cache when it may (root), loads it back; rates in GB/s of the bytes written.
#include <fmt/format.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "data/dataset.h"
#include "diffuse/build_config.h"
#include "dist/context.h"
#include "util/json.h"
#include "model/state_dict.h"
#include "model/unet.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/model_factory.h"
#include "trainer/run_directory.h"
#include "trainer/trainer.h"

#if DIFFUSE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace {

namespace fs = std::filesystem;
namespace tr = diffuse::trainer;
using Clock = std::chrono::steady_clock;

struct Args {
  fs::path config;
  std::vector<std::string> overrides;
  fs::path data;        ///< empty: synthesize
  fs::path checkpoint;  ///< non-empty: checkpoint mode, in this directory
  fs::path json;
  int64_t steps = 5, warmup = 2, threads = 0, matmul_size = 0;
  double matmul_seconds = 1.0;
  bool skip_matmul = false;
};

[[noreturn]] void usage(const std::string& problem) {
  std::cerr << (problem.empty() ? "" : "step_bench: " + problem + "\n")
            << "usage: step_bench --config FILE [--set section.key=value]... [--steps 5] [--warmup 2] "
               "[--threads N]\n"
               "                  [--data FILE.h5] [--matmul-size N] [--matmul-seconds S] [--skip-matmul]\n"
               "                  [--checkpoint DIR] [--json FILE]\n";
  std::exit(problem.empty() ? 0 : 2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--config")
      a.config = value();
    else if (flag == "--set")
      a.overrides.push_back(value());
    else if (flag == "--data")
      a.data = value();
    else if (flag == "--checkpoint")
      a.checkpoint = value();
    else if (flag == "--json")
      a.json = value();
    else if (flag == "--steps")
      a.steps = std::stoll(value());
    else if (flag == "--warmup")
      a.warmup = std::stoll(value());
    else if (flag == "--threads")
      a.threads = std::stoll(value());
    else if (flag == "--matmul-size")
      a.matmul_size = std::stoll(value());
    else if (flag == "--matmul-seconds")
      a.matmul_seconds = std::stod(value());
    else if (flag == "--skip-matmul")
      a.skip_matmul = true;
    else if (flag == "--help" || flag == "-h")
      usage("");
    else
      usage("unknown flag " + flag);
  }
  if (a.config.empty()) usage("--config is required");
  if (a.steps < 1 || a.warmup < 0) usage("--steps must be >= 1 and --warmup >= 0");
  return a;
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void sync(const torch::Device& device) {
#if DIFFUSE_WITH_CUDA
  if (device.is_cuda()) c10::cuda::device_synchronize();
#endif
  (void)device;
}

/// Best FLOP/s of an n x n x n matmul: one warm-up, then repeats until `budget` seconds (at least 3).
double matmul_flops(const torch::Device& device, torch::ScalarType dtype, int64_t n, double budget) {
  auto options = torch::TensorOptions().dtype(dtype).device(device);
  auto a = torch::randn({n, n}, options), b = torch::randn({n, n}, options);
  at::matmul(a, b);
  sync(device);
  double best = 1e30, spent = 0;
  for (int i = 0; i < 3 || spent < budget; ++i) {
    auto start = Clock::now();
    at::matmul(a, b);
    sync(device);
    double s = seconds_since(start);
    best = std::min(best, s);
    spent += s;
  }
  return 2.0 * static_cast<double>(n) * n * n / best;
}

double peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) * 1024.0;  // Linux: KiB
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/// A flat JSON object written in insertion order.
class JsonObject {
 public:
  void number(const std::string& key, double value) {
    fields_.push_back("\"" + key + "\": " + (std::isfinite(value) ? fmt::format("{:.6g}", value) : "null"));
  }
  void text(const std::string& key, const std::string& value) {
    fields_.push_back("\"" + key + "\": " + diffuse::util::json::quote(value));
  }
  void object(const std::string& key, const JsonObject& value) {
    fields_.push_back("\"" + key + "\": " + value.str());
  }
  std::string str() const {
    std::string out = "{";
    for (size_t i = 0; i < fields_.size(); ++i) out += (i ? ", " : "") + fields_[i];
    return out + "}";
  }

 private:
  std::vector<std::string> fields_;
};

void write_json(const fs::path& path, const JsonObject& object) {
  if (path.empty()) return;
  std::ofstream out(path);
  out << object.str() << "\n";
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

tr::Config load_config(const Args& a) {
  auto config = tr::Config::from_yaml_file(a.config);
  for (const auto& assignment : a.overrides) config.apply_override(assignment);
  return config;
}

/// Random uint8 pixels of the config's size: enough for warm-up + timed steps without a new epoch.
fs::path synthesize_dataset(const tr::Config& config, int64_t batches, const fs::path& dir) {
  int64_t count = std::max<int64_t>(64, config.train.batch_size * config.train.accumulate * batches);
  int64_t s = config.data.image_size;
  auto images = torch::randint(0, 256, {count, s, s, config.model.channels}, torch::kUInt8);
  auto path = dir / fmt::format("step_bench_{}_{}.h5", s, ::getpid());
  diffuse::data::write_dataset(path, images, torch::Tensor());
  return path;
}

int run_step(const diffuse::dist::Context& ctx, const Args& a) {
  auto config = load_config(a);
  auto tmp = fs::temp_directory_path();
  fs::path synthetic;
  if (a.data.empty()) {
    synthetic = synthesize_dataset(config, a.warmup + a.steps + 1, tmp);
    config.apply_override("data.path=" + synthetic.string());
  } else {
    config.apply_override("data.path=" + a.data.string());
  }
  bool want_cuda = config.train.device == tr::DeviceChoice::kCuda ||
                   (config.train.device == tr::DeviceChoice::kAuto && torch::cuda::is_available());
  torch::Device device = want_cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);

  JsonObject out;
  out.text("program", "step_bench");
  out.text("config", config.name);
  out.text("device", device.str());
  out.text("precision", tr::to_string(config.train.precision));
  out.number("threads", torch::get_num_threads());
  out.number("world_size", ctx.world_size());
  out.number("batch_per_rank", static_cast<double>(config.train.batch_size * config.train.accumulate));
  out.number("image_size", static_cast<double>(config.data.image_size));

  double fp32 = NAN, bf16 = NAN;
  if (!a.skip_matmul) {
    int64_t n = a.matmul_size > 0 ? a.matmul_size : (device.is_cuda() ? 8192 : 2048);
    fp32 = matmul_flops(device, torch::kFloat32, n, a.matmul_seconds);
    bf16 = matmul_flops(device, torch::kBFloat16, n, a.matmul_seconds);
    out.number("matmul_size", static_cast<double>(n));
  }
  out.number("matmul_fp32_flops", fp32);
  out.number("matmul_bf16_flops", bf16);

#if DIFFUSE_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#endif
  auto unet = tr::unet_options(config.model);
  int64_t images_per_step = config.train.batch_size * config.train.accumulate;
  double forward_flops =
      static_cast<double>(diffuse::model::unet_forward_flops(unet, config.data.image_size, 1));
  std::vector<tr::StepProfile> profiles;
  {
    auto timer = std::make_shared<tr::ProfilingStepTimer>(device);
    tr::Trainer trainer(ctx, config,
                        tr::RunOptions{.run_dir = tmp / fmt::format("step_bench_run_{}", ::getpid()),
                                       .step_timer = timer});
    trainer.train_steps_for_benchmark(a.warmup + a.steps);
    profiles = timer->profiles();
  }
  if (!synthetic.empty()) fs::remove(synthetic);
  profiles.erase(profiles.begin(), profiles.begin() + a.warmup);

  auto phase = [&](double tr::StepProfile::*field) {
    std::vector<double> v;
    for (const auto& p : profiles) v.push_back(p.*field);
    return median(v);
  };
  std::vector<double> other;
  for (const auto& p : profiles) {
    other.push_back(p.total - p.data_wait - p.forward - p.backward - p.exposed_comm - p.optimizer - p.ema);
  }
  JsonObject phases;
  phases.number("data_wait", phase(&tr::StepProfile::data_wait));
  phases.number("forward", phase(&tr::StepProfile::forward));
  phases.number("backward", phase(&tr::StepProfile::backward));
  phases.number("exposed_comm", phase(&tr::StepProfile::exposed_comm));
  phases.number("optimizer", phase(&tr::StepProfile::optimizer));
  phases.number("ema", phase(&tr::StepProfile::ema));
  phases.number("other", median(other));
  double total = phase(&tr::StepProfile::total);
  phases.number("total", total);
  out.object("step_seconds", phases);

  double images_per_second = static_cast<double>(images_per_step * ctx.world_size()) / total;
  double step_flops = 3.0 * forward_flops * static_cast<double>(images_per_step) / total;  // per rank
  double ceiling = config.train.precision == tr::Precision::kFp32 ? fp32 : bf16;
  out.number("steps_timed", static_cast<double>(a.steps));
  out.number("forward_flops_per_image", forward_flops);
  out.number("images_per_second", images_per_second);
  out.number("step_flops", step_flops);
  out.number("mfu", step_flops / ceiling);
  out.text("mfu_ceiling", config.train.precision == tr::Precision::kFp32 ? "matmul_fp32" : "matmul_bf16");
  out.number("peak_rss_bytes", peak_rss_bytes());
  double cuda_peak = NAN;
#if DIFFUSE_WITH_CUDA
  if (device.is_cuda()) {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    cuda_peak = static_cast<double>(
        stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak);
  }
#endif
  out.number("cuda_peak_allocated_bytes", cuda_peak);

  if (ctx.is_root()) {
    std::printf("%s: %s %s, batch %lld/rank x %d rank(s), %dx%d, %d threads\n", config.name.c_str(),
                device.str().c_str(), tr::to_string(config.train.precision).c_str(), static_cast<long long>(images_per_step),
                ctx.world_size(), static_cast<int>(config.data.image_size),
                static_cast<int>(config.data.image_size), torch::get_num_threads());
    std::printf("  step %.4fs: data %.4f fwd %.4f bwd %.4f comm %.4f optim %.4f ema %.4f (median of %lld)\n",
                total, phase(&tr::StepProfile::data_wait), phase(&tr::StepProfile::forward),
                phase(&tr::StepProfile::backward), phase(&tr::StepProfile::exposed_comm),
                phase(&tr::StepProfile::optimizer), phase(&tr::StepProfile::ema),
                static_cast<long long>(a.steps));
    std::string versus =
        a.skip_matmul
            ? std::string("no matmul ceiling (--skip-matmul)")
            : fmt::format("{:.1f}% of matmul {} (fp32 {:.1f}, bf16 {:.1f} GFLOP/s)",
                          100 * step_flops / ceiling, config.train.precision == tr::Precision::kFp32 ? "fp32" : "bf16",
                          fp32 / 1e9, bf16 / 1e9);
    std::printf("  %.1f images/s, %.2f GFLOP/s = %s, peak RSS %.0f MiB\n", images_per_second,
                step_flops / 1e9, versus.c_str(), peak_rss_bytes() / 1048576);
    if (std::isfinite(cuda_peak)) std::printf("  CUDA allocator peak %.2f GiB\n", cuda_peak / (1 << 30));
    write_json(a.json, out);
  }
  return 0;
}

/// Drops the page cache (root only), so a load reads the disk. Returns whether it could.
bool drop_page_cache() {
  ::sync();
  std::ofstream control("/proc/sys/vm/drop_caches");
  if (!control) return false;
  control << "3\n";
  control.flush();
  return static_cast<bool>(control);
}

int run_checkpoint(const diffuse::dist::Context& ctx, const Args& a) {
  auto config = load_config(a);
  torch::manual_seed(0);
  auto model = tr::build_diffusion(config);
  tr::CheckpointContents contents;
  contents.step = 1;
  auto add_all = [&](const std::string& prefix, bool copy) {
    for (const auto& item : model->model->named_parameters()) {
      auto tensor = copy ? item.value().detach().clone() : item.value().detach();
      contents.replicated.emplace_back(prefix + item.key(), tensor);
    }
  };
  add_all("model.", false);
  add_all("optim.exp_avg.", true);
  add_all("optim.exp_avg_sq.", true);
  for (size_t i = 0; i < config.ema.decay.size(); ++i) add_all(fmt::format("ema.{}.", i), true);
  contents.config_yaml = config.to_yaml();
  int64_t tensor_bytes = 0;
  for (const auto& [name, tensor] : contents.replicated)
    tensor_bytes += tensor.numel() * tensor.element_size();

  fs::remove_all(a.checkpoint);
  tr::CheckpointStore store(a.checkpoint, ctx, tr::RetentionPolicy{.keep_last = 1});
  auto start = Clock::now();
  auto saved = store.save(contents);
  double save_seconds = seconds_since(start);
  bool dropped = ctx.is_root() ? drop_page_cache() : false;
  ctx.barrier();
  start = Clock::now();
  auto loaded = store.load("latest");
  double load_seconds = seconds_since(start);
  if (!loaded)
    throw std::runtime_error("checkpoint saved in " + a.checkpoint.string() + " did not load back");
  fs::remove_all(a.checkpoint);

  double bytes = static_cast<double>(saved.bytes);
  JsonObject out;
  out.text("program", "step_bench checkpoint");
  out.text("config", config.name);
  out.number("world_size", ctx.world_size());
  out.number("tensor_bytes", static_cast<double>(tensor_bytes));
  out.number("bytes", bytes);
  out.number("save_seconds", save_seconds);
  out.number("load_seconds", load_seconds);
  out.number("save_bytes_per_second", bytes / save_seconds);
  out.number("load_bytes_per_second", bytes / load_seconds);
  out.text("load_cache", dropped ? "dropped (disk read)" : "not dropped (page-cache read)");
  if (ctx.is_root()) {
    std::printf(
        "checkpoint of %s state: %.1f MB; save %.2fs (%.2f GB/s), load %.2fs (%.2f GB/s, page cache %s)\n",
        config.name.c_str(), bytes / 1e6, save_seconds, bytes / save_seconds / 1e9, load_seconds,
        bytes / load_seconds / 1e9, dropped ? "dropped" : "NOT dropped");
    write_json(a.json, out);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  auto ctx = diffuse::dist::Context::init(&argc, &argv);
  try {
    Args a = parse(argc, argv);
    int threads =
        a.threads > 0 ? static_cast<int>(a.threads) : static_cast<int>(std::thread::hardware_concurrency());
    torch::set_num_threads(std::max(threads, 1));
    return a.checkpoint.empty() ? run_step(ctx, a) : run_checkpoint(ctx, a);
  } catch (const std::exception& error) {
    std::cerr << "step_bench (rank " << ctx.rank() << "): " << error.what() << "\n";
    return 1;
  }
}
