// bench/model_bench.cpp: time of one U-Net forward, and of forward + backward (the training
// step's compute), with the analytic FLOP count and the rate it implies.
//
//   build/bin/model_bench                          # default U-Net (dim 64, mults 1,2,4,8), 64x64, batch 4, CPU
//   build/bin/model_bench --dim 128 --size 128 --batch 16 --device cuda --iters 20
//
// Each measurement: `--warmup` untimed iterations, then `--iters` timed ones; the table shows the
// median and the fastest. FLOP/s uses unet_forward_flops (2 x multiply-adds of convs, linears and
// attention matmuls) and 3x that for forward + backward.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "model/diffusion.h"
#include "model/state_dict.h"
#include "model/unet.h"

namespace {

struct Args {
  int64_t dim = 64, size = 64, batch = 4, iters = 10, warmup = 2, threads = 0;
  std::string device = "cpu";
  std::string json;  ///< also write the figures to this JSON file
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--dim") a.dim = std::stoll(value());
    else if (flag == "--size") a.size = std::stoll(value());
    else if (flag == "--batch") a.batch = std::stoll(value());
    else if (flag == "--iters") a.iters = std::stoll(value());
    else if (flag == "--warmup") a.warmup = std::stoll(value());
    else if (flag == "--threads") a.threads = std::stoll(value());
    else if (flag == "--device") a.device = value();
    else if (flag == "--json") a.json = value();
    else if (flag == "--help" || flag == "-h") {
      std::cout << "model_bench [--dim 64] [--size 64] [--batch 4] [--iters 10] [--warmup 2] [--threads N] "
                   "[--device cpu|cuda] [--json FILE]\n";
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown flag " + flag + " (see --help)");
    }
  }
  if (a.iters < 1 || a.warmup < 0 || a.batch < 1) throw std::invalid_argument("iters, batch must be >= 1, warmup >= 0");
  return a;
}

struct Timing {
  double median_ms, min_ms;
};

template <typename Fn>
Timing measure(const Args& a, const torch::Device& device, Fn&& fn) {
  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize();
  };
  for (int64_t i = 0; i < a.warmup; ++i) fn();
  sync();
  std::vector<double> ms;
  for (int64_t i = 0; i < a.iters; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    sync();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front()};
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    if (a.threads > 0) torch::set_num_threads(static_cast<int>(a.threads));
    const torch::Device device(a.device);
    diffuse::model::UnetOptions options;
    options.dim = a.dim;
    torch::manual_seed(0);
    diffuse::model::Unet unet(options);
    unet->to(device);
    unet->train();
    diffuse::model::DiffusionOptions dopts;
    dopts.image_size = a.size;
    diffuse::model::GaussianDiffusion diffusion(unet, dopts);
    diffusion->to(device);

    auto x = torch::randn({a.batch, options.channels, a.size, a.size}, torch::TensorOptions().device(device));
    auto t = torch::randint(0, 1000, {a.batch}, torch::TensorOptions(torch::kLong).device(device));
    auto img = torch::rand_like(x);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
    const double flops = static_cast<double>(diffuse::model::unet_forward_flops(options, a.size, a.batch));

    const auto forward = measure(a, device, [&] {
      torch::NoGradGuard no_grad;
      unet->forward(x, t);
    });
    const auto forward_backward = measure(a, device, [&] {
      unet->zero_grad();
      unet->forward(x, t).square().mean().backward();
    });
    const auto train_step = measure(a, device, [&] {
      diffusion->zero_grad();
      diffusion->forward(img, gen).backward();
    });

    std::printf("U-Net dim %lld, dim_mults 1,2,4,8: %lld parameters; %lldx%lld, batch %lld, %s, %d threads\n",
                static_cast<long long>(a.dim), static_cast<long long>(diffuse::model::parameter_count(*unet)),
                static_cast<long long>(a.size), static_cast<long long>(a.size), static_cast<long long>(a.batch),
                a.device.c_str(), torch::get_num_threads());
    std::printf("analytic forward: %.3f GFLOP (%.3f GFLOP per image)\n\n", flops / 1e9, flops / 1e9 / a.batch);
    std::printf("%-34s %12s %12s %12s\n", "measurement", "median ms", "min ms", "GFLOP/s");
    auto row = [&](const char* name, const Timing& tm, double work) {
      std::printf("%-34s %12.1f %12.1f %12.1f\n", name, tm.median_ms, tm.min_ms, work / (tm.median_ms * 1e-3) / 1e9);
    };
    row("forward (no grad)", forward, flops);
    row("forward + backward", forward_backward, 3 * flops);
    row("diffusion training step (f + b)", train_step, 3 * flops);
    if (!a.json.empty()) {
      std::ofstream out(a.json);
      auto rate = [&](const Timing& tm, double work) { return std::to_string(work / (tm.median_ms * 1e-3)); };
      out << "{\"program\": \"model_bench\", \"dim\": " << a.dim << ", \"image_size\": " << a.size
          << ", \"batch\": " << a.batch << ", \"threads\": " << torch::get_num_threads()
          << ", \"forward_flops\": " << std::to_string(flops) << ", \"forward_ms\": " << forward.median_ms
          << ", \"forward_flops_per_second\": " << rate(forward, flops)
          << ", \"forward_backward_ms\": " << forward_backward.median_ms
          << ", \"forward_backward_flops_per_second\": " << rate(forward_backward, 3 * flops)
          << ", \"train_step_ms\": " << train_step.median_ms
          << ", \"train_step_flops_per_second\": " << rate(train_step, 3 * flops) << "}\n";
      if (!out) throw std::runtime_error("cannot write " + a.json);
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "model_bench: " << e.what() << "\n";
    return 1;
  }
}
