#include "data/hdf5_info.h"

#include <hdf5.h>

#include "data/impl/hdf5.h"

namespace diffuse::data {

std::string Hdf5Info::version() const {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(release);
}

Hdf5Info hdf5_library_info() {
  impl::Hdf5Lock lock;  // the first HDF5 call of a process may be this one
  Hdf5Info info;
  H5get_libversion(&info.major, &info.minor, &info.release);
  hbool_t thread_safe = 0;
  H5is_library_threadsafe(&thread_safe);
  info.thread_safe = thread_safe > 0;
  return info;
}

}  // namespace diffuse::data
