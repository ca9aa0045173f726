#include "trainer/doctor.h"

#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <thread>

#include "data/hdf5_info.h"
#include "diffuse/build_config.h"

#if DIFFUSE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <cuda_runtime_api.h>
#endif

namespace diffuse::trainer {
namespace {

std::string cuda_version_text(int code) {
  if (code <= 0) return "none";
  return std::to_string(code / 1000) + "." + std::to_string((code % 1000) / 10);
}

std::string env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value ? value : fallback;
}

/// Paths of every libnccl mapped into this process: more than one means two NCCLs disagree
/// about their communicators' internals (LibTorch's and ours), a crash waiting to happen.
std::set<std::string> loaded_nccl_libraries() {
  std::set<std::string> paths;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    auto slash = line.find('/');
    if (slash == std::string::npos) continue;
    std::string path = line.substr(slash);
    if (path.find("libnccl.so") != std::string::npos) paths.insert(path);
  }
  return paths;
}

}  // namespace

DeviceRequest parse_device_request(const std::string& text) {
  if (text == "auto") return DeviceRequest::kAuto;
  if (text == "cpu") return DeviceRequest::kCpu;
  if (text == "cuda") return DeviceRequest::kCuda;
  throw std::invalid_argument("--device must be auto, cpu or cuda, got '" + text + "'");
}

std::string DoctorReport::to_text() const {
  size_t width = 0;
  for (const auto& [key, value] : facts) width = std::max(width, key.size());
  std::ostringstream out;
  for (const auto& [key, value] : facts) {
    out << "  " << key << std::string(width - key.size() + 2, ' ') << value << "\n";
  }
  for (const auto& problem : problems) out << "  PROBLEM: " << problem << "\n";
  out << "  verdict" << std::string(width > 7 ? width - 7 + 2 : 2, ' ')
      << (problems.empty() ? "usable" : "NOT usable") << "\n";
  return out.str();
}

DoctorReport collect_doctor_report(const dist::Context& ctx, DeviceRequest device) {
  DoctorReport report;
  auto add = [&](std::string key, std::string value) {
    report.facts.emplace_back(std::move(key), std::move(value));
  };
  const auto& world = ctx.world();
  add("diffuse", std::string(DIFFUSE_VERSION) + " (git " + git_hash() + ", " + DIFFUSE_BUILD_TYPE +
                     ", " + DIFFUSE_CXX_COMPILER + ")");
  add("host", world.hostname);
  add("rank", std::to_string(world.rank) + " of " + std::to_string(world.world_size));
  add("local rank", std::to_string(world.local_rank) + " of " + std::to_string(world.local_world_size) +
                        " on this node");
  add("MPI", dist::mpi_library_version().substr(0, dist::mpi_library_version().find('\n')));
  auto launcher = dist::launcher_world_size();
  add("launcher", launcher ? launcher->variable + "=" + std::to_string(launcher->size)
                           : std::string("none (single process)"));
  add("LibTorch", std::string(TORCH_VERSION) + (DIFFUSE_WITH_CUDA ? " (CUDA paths built)"
                                                                 : " (CPU-only build of diffuse)"));
  add("C++ ABI", std::string("_GLIBCXX_USE_CXX11_ABI=") + std::to_string(_GLIBCXX_USE_CXX11_ABI));
  auto hdf5 = data::hdf5_library_info();
  add("HDF5", hdf5.version() + (hdf5.thread_safe ? " (thread-safe)" : " (not thread-safe: one I/O thread)"));
  add("threads", "torch intra-op " + std::to_string(torch::get_num_threads()) + ", hardware " +
                     std::to_string(std::thread::hardware_concurrency()) + ", OMP_NUM_THREADS=" +
                     env_or("OMP_NUM_THREADS", "unset"));

  bool cuda_available = torch::cuda::is_available();
  int gpu_count = cuda_available ? static_cast<int>(torch::cuda::device_count()) : 0;
#if DIFFUSE_WITH_CUDA
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  add("CUDA", "runtime " + cuda_version_text(runtime) + ", driver " + cuda_version_text(driver));
  long cudnn = at::detail::getCUDAHooks().versionCuDNN();
  add("cuDNN", std::to_string(cudnn / 10000) + "." + std::to_string((cudnn % 10000) / 100) + "." +
                   std::to_string(cudnn % 100));
  add("NCCL", dist::nccl_version().value_or("unavailable"));
  auto nccls = loaded_nccl_libraries();
  std::string nccl_paths;
  for (const auto& path : nccls) nccl_paths += (nccl_paths.empty() ? "" : ", ") + path;
  add("NCCL loaded from", nccl_paths.empty() ? "not loaded" : nccl_paths);
  if (nccls.size() > 1) {
    report.problems.push_back("more than one libnccl is loaded (" + nccl_paths +
                              "); LD_LIBRARY_PATH probably points at a second NCCL");
  }
  add("CUDA_VISIBLE_DEVICES", env_or("CUDA_VISIBLE_DEVICES", "unset"));
  for (int i = 0; i < gpu_count; ++i) {
    const cudaDeviceProp* props = at::cuda::getDeviceProperties(i);
    std::ostringstream text;
    text << props->name << ", " << (props->totalGlobalMem >> 20) << " MiB, sm_" << props->major
         << props->minor;
    add("GPU " + std::to_string(i), text.str());
  }
#else
  add("CUDA", "not built (configure with a CUDA LibTorch and DIFFUSE_CUDA=AUTO|ON)");
#endif
  add("GPUs visible", std::to_string(gpu_count));

  bool want_cuda = device == DeviceRequest::kCuda || (device == DeviceRequest::kAuto && gpu_count > 0);
  if (want_cuda) {
    if (!DIFFUSE_WITH_CUDA) {
      report.problems.push_back("a CUDA run was requested but this diffuse was built without CUDA");
    } else if (gpu_count == 0) {
      report.problems.push_back("a CUDA run was requested but no GPU is visible (check "
                                "CUDA_VISIBLE_DEVICES and the driver)");
    } else if (world.local_world_size > gpu_count) {
      report.problems.push_back(std::to_string(world.local_world_size) + " ranks on node " +
                                world.hostname + " but only " + std::to_string(gpu_count) +
                                " GPUs visible: start at most one rank per GPU");
    }
    if (report.problems.empty()) add("device", "cuda:" + std::to_string(world.local_rank));
  } else {
    add("device", "cpu");
  }
  return report;
}

}  // namespace diffuse::trainer
