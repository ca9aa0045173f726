// tests/mpi_support.h: the MPI world of a multi-rank test binary (set up by mpi_main.cpp).
#pragma once

#include "dist/context.h"

namespace diffuse::testing {

/// The process's MPI context; valid inside tests of binaries linked with mpi_main.cpp.
const dist::Context& world();

}  // namespace diffuse::testing
