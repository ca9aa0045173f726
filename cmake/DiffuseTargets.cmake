# Shared build settings and the helpers every folder uses to declare its targets.

configure_file(${PROJECT_SOURCE_DIR}/cmake/build_config.h.in
               ${PROJECT_BINARY_DIR}/generated/diffuse/build_config.h @ONLY)

# The git hash is refreshed at build time (not just at configure time) and only rewritten
# when it changes, so a commit does not trigger a rebuild of anything but one small file.
add_custom_target(diffuse_git_hash ALL
  COMMAND ${CMAKE_COMMAND} -DSOURCE_DIR=${PROJECT_SOURCE_DIR}
          -DOUTPUT=${PROJECT_BINARY_DIR}/generated/git_hash.cpp
          -P ${PROJECT_SOURCE_DIR}/cmake/GitHash.cmake
  BYPRODUCTS ${PROJECT_BINARY_DIR}/generated/git_hash.cpp
  COMMENT "Refreshing git hash")

# Every target links this: repo-root includes ("model/unet.h"), generated headers, warnings,
# and LibTorch (whose INTERFACE flags carry the C++ ABI).
add_library(diffuse_common INTERFACE)
target_include_directories(diffuse_common INTERFACE
  ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR}/generated)
# -Wno-missing-field-initializers: C++20 designated initialisers leave the rest at their defaults on purpose.
target_compile_options(diffuse_common INTERFACE -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers
  -Winvalid-pch)
target_link_libraries(diffuse_common INTERFACE ${TORCH_LIBRARIES} Threads::Threads)
# The torch wheel's libtorch*.so export pieces of a statically linked libstdc++ (std::filesystem
# among them, pytorch/pytorch#133437); if they are searched first, std::filesystem::remove_all
# jumps to a null pointer. Putting libstdc++ first in DT_NEEDED makes the dynamic linker bind
# the standard library's own definitions.
target_link_options(diffuse_common INTERFACE "LINKER:--push-state,--no-as-needed" "-lstdc++" "LINKER:--pop-state")
# Macros set for everyone: a translation unit whose -D flags differ from the precompiled
# header's cannot use it. GoogleTest puts GTEST_HAS_PTHREAD on its consumers; fmt is LibTorch's
# bundled fmt 12, used header-only (LibTorch exports no fmt symbols).
# OMPI_SKIP_MPICXX/MPICH_SKIP_MPICXX: we use the C API; the deprecated C++ bindings need a library we do not link.
target_compile_definitions(diffuse_common INTERFACE GTEST_HAS_PTHREAD=1 FMT_HEADER_ONLY=1
  OMPI_SKIP_MPICXX=1 MPICH_SKIP_MPICXX=1)

# One precompiled torch header shared by every target (REUSE_FROM): on 2 cores, compiling
# <torch/torch.h> once instead of once per target saves minutes per clean build.
add_library(diffuse_pch OBJECT ${PROJECT_SOURCE_DIR}/cmake/pch.cpp)
target_link_libraries(diffuse_pch PUBLIC diffuse_common)
target_precompile_headers(diffuse_pch PRIVATE ${PROJECT_SOURCE_DIR}/cmake/pch.h)

function(diffuse_use_pch target)
  target_precompile_headers(${target} REUSE_FROM diffuse_pch)
endfunction()

# diffuse_library(NAME SOURCES ... DEPS ...): a static library of one folder.
function(diffuse_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_link_libraries(${name} PUBLIC diffuse_common ${ARG_DEPS})
  diffuse_use_pch(${name})
endfunction()

# diffuse_test(NAME SOURCES ... DEPS ... [RANKS n1 n2 ...] [TIMEOUT s] [LABELS ...])
# Registers one GoogleTest binary. Without RANKS it runs as one process; with RANKS it is also
# registered once per rank count under mpirun (oversubscribed: CI has 2 cores).
function(diffuse_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;DEPS;RANKS;LABELS" ${ARGN})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  if(ARG_RANKS)
    # Multi-rank suites bring up MPI in their own main (tests/mpi_main.cpp).
    add_executable(${name} ${ARG_SOURCES} ${PROJECT_SOURCE_DIR}/tests/mpi_main.cpp)
    target_link_libraries(${name} PRIVATE diffuse_common ${ARG_DEPS} diffuse_dist GTest::gtest)
  else()
    add_executable(${name} ${ARG_SOURCES})
    target_link_libraries(${name} PRIVATE diffuse_common ${ARG_DEPS} GTest::gtest GTest::gtest_main)
  endif()
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/tests)
  diffuse_use_pch(${name})
  set(_env "DIFFUSE_BUILD_DIR=${PROJECT_BINARY_DIR}" "DIFFUSE_SOURCE_DIR=${PROJECT_SOURCE_DIR}"
           "DIFFUSE_EXE=$<TARGET_FILE:diffuse>" "OMP_NUM_THREADS=1")
  if(NOT ARG_RANKS)
    add_test(NAME ${name} COMMAND ${name})
    set_tests_properties(${name} PROPERTIES TIMEOUT ${ARG_TIMEOUT} ENVIRONMENT "${_env}" LABELS "${ARG_LABELS}")
  else()
    foreach(n IN LISTS ARG_RANKS)
      if(n EQUAL 1)
        set(_tname ${name})
        add_test(NAME ${_tname} COMMAND ${name})
      else()
        set(_tname ${name}_np${n})
        add_test(NAME ${_tname}
                 COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${n} --oversubscribe
                         --bind-to none $<TARGET_FILE:${name}>)
      endif()
      set_tests_properties(${_tname} PROPERTIES TIMEOUT ${ARG_TIMEOUT} LABELS "mpi;${ARG_LABELS}"
        ENVIRONMENT "${_env};OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
    endforeach()
  endif()
endfunction()
