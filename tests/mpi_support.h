// tests/mpi_support.h: the MPI world of a multi-rank test binary (set up by mpi_main.cpp), and a
// temporary directory every rank sees.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <random>
#include <string>
#include <system_error>

#include "dist/context.h"

namespace diffuse::testing {

/// The process's MPI context; valid inside tests of binaries linked with mpi_main.cpp.
const dist::Context& world();

/// A temporary directory every rank sees (rank 0 makes it and tells the others; removed by rank 0
/// after a barrier). Construct and destroy it on every rank.
class SharedDir {
 public:
  explicit SharedDir(const std::string& prefix = "diffuse-test") {
    std::string path;
    if (world().is_root()) {
      std::random_device device;
      path = (std::filesystem::temp_directory_path() /
              (prefix + "-" + std::to_string(::getpid()) + "-" + std::to_string(device())))
                 .string();
      std::filesystem::create_directories(path);
    }
    path_ = world().broadcast_string(path, 0);
  }
  ~SharedDir() {
    world().barrier();
    std::error_code ignored;
    if (world().is_root()) std::filesystem::remove_all(path_, ignored);
  }
  SharedDir(const SharedDir&) = delete;
  SharedDir& operator=(const SharedDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

}  // namespace diffuse::testing
