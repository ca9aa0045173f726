// dist/mpi_check.h: turns an MPI return code into an exception naming the call, file and line.
#pragma once

#include <mpi.h>

#include <stdexcept>
#include <string>

namespace diffuse::dist::detail {

[[noreturn]] inline void throw_mpi_error(int code, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  int rank = -1;
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  throw std::runtime_error(std::string(call) + " failed on rank " + std::to_string(rank) + ": " +
                           std::string(text, static_cast<size_t>(length)) + " (" + file + ":" +
                           std::to_string(line) + ")");
}

}  // namespace diffuse::dist::detail

#define DIFFUSE_MPI_CHECK(call)                                                              \
  do {                                                                                       \
    int diffuse_mpi_rc_ = (call);                                                            \
    if (diffuse_mpi_rc_ != MPI_SUCCESS)                                                      \
      ::diffuse::dist::detail::throw_mpi_error(diffuse_mpi_rc_, #call, __FILE__, __LINE__);  \
  } while (0)
