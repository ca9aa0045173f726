// data/hdf5_info.h: which HDF5 library this process runs against.
#pragma once

#include <string>

namespace diffuse::data {

struct Hdf5Info {
  unsigned major = 0, minor = 0, release = 0;
  /// Debian's HDF5 is not built thread-safe: every HDF5 call must then stay on one thread.
  bool thread_safe = false;
  std::string version() const;
};

/// Version and thread-safety of the HDF5 library loaded at run time (not the headers').
Hdf5Info hdf5_library_info();

}  // namespace diffuse::data
