// tests/support.h: helpers shared by every test binary: seeding, tensor comparison, temporary
// directories, and running the real `diffuse` executable.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <torch/torch.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>

namespace diffuse::testing {

/// Seeds torch's default generator (tests that need their own stream pass a torch::Generator).
inline void seed_everything(uint64_t seed = 0) { torch::manual_seed(seed); }

/// Fails the test when |a - b| > atol + rtol * |b| anywhere; reports the worst element.
inline void expect_allclose(const torch::Tensor& a, const torch::Tensor& b, double rtol = 1e-5,
                            double atol = 1e-6, const std::string& what = "") {
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  auto da = a.to(torch::kFloat64), db = b.to(torch::kFloat64);
  auto excess = (da - db).abs() - (atol + rtol * db.abs());
  double worst = excess.max().item<double>();
  EXPECT_LE(worst, 0.0) << what << ": max |a-b| = " << (da - db).abs().max().item<double>()
                        << " beyond tolerance (rtol " << rtol << ", atol " << atol << ")";
}

/// The message of the exception `fn` throws, or "(no error)" when it returns normally.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& error) {
    return error.what();
  }
  return "(no error)";
}

/// A fresh directory under the system temp dir, removed when the object goes away.
class TempDir {
 public:
  TempDir() {
    std::random_device device;
    path_ = std::filesystem::temp_directory_path() /
            ("diffuse-test-" + std::to_string(::getpid()) + "-" + std::to_string(device()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;  ///< stdout and stderr together
};

/// Runs a shell command, capturing its combined output and exit status.
inline CommandResult run_command(const std::string& command) {
  CommandResult result;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buffer{};
  size_t n = 0;
  while ((n = std::fread(buffer.data(), 1, buffer.size(), pipe)) > 0) result.output.append(buffer.data(), n);
  int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

/// Path of the built `diffuse` executable (ctest sets DIFFUSE_EXE).
inline std::string diffuse_exe() {
  const char* exe = std::getenv("DIFFUSE_EXE");
  return exe ? exe : "diffuse";
}

/// `mpirun -np N` with the flags these shared 2-core machines need (oversubscription, root).
inline std::string mpirun(int ranks) {
  return "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 mpirun -np " +
         std::to_string(ranks) + " --oversubscribe --bind-to none ";
}

/// Whether `fn` throws an exception whose message contains every one of `needles`.
template <typename Fn>
::testing::AssertionResult throws_with(Fn&& fn, const std::vector<std::string>& needles) {
  try {
    fn();
  } catch (const std::exception& e) {
    const std::string what = e.what();
    for (const auto& n : needles) {
      if (what.find(n) == std::string::npos) {
        return ::testing::AssertionFailure() << "message lacks '" << n << "': " << what;
      }
    }
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "no exception thrown";
}

/// A file's whole content (binary).
inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// The source tree (ctest sets DIFFUSE_SOURCE_DIR), for committed configs and fixtures.
inline std::filesystem::path source_dir() {
  const char* dir = std::getenv("DIFFUSE_SOURCE_DIR");
  return dir ? dir : ".";
}

}  // namespace diffuse::testing
