# Finds every third-party dependency once, as imported targets the folders link against.
# Nothing here adds compile definitions to consumers: all targets must share one set of
# flags so they can reuse one precompiled torch header (see DiffuseTargets.cmake).

# --- LibTorch ----------------------------------------------------------------------------
# launch/setup.sh passes CMAKE_PREFIX_PATH from `torch.utils.cmake_prefix_path`; a cluster
# user points it at their own LibTorch (see README).
# diffuse compiles no CUDA kernels of its own, so the architecture list only has to be valid:
# naming it stops LibTorch's config from compiling a GPU-detection program (which fails on a
# machine without a GPU and with a C++ dialect nvcc does not know).
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0" CACHE STRING "CUDA architectures LibTorch's config reports")
endif()
find_package(Torch REQUIRED)
message(STATUS "LibTorch: ${Torch_DIR} (flags: ${TORCH_CXX_FLAGS})")

# The C++ ABI must be the one LibTorch was built with, or std::string crossing the boundary breaks.
string(REGEX MATCH "_GLIBCXX_USE_CXX11_ABI=([01])" _abi "${TORCH_CXX_FLAGS}")
if(_abi)
  set(DIFFUSE_TORCH_CXX11_ABI ${CMAKE_MATCH_1})
else()
  set(DIFFUSE_TORCH_CXX11_ABI 1) # LibTorch >= 2.7 builds with the new ABI and omits the flag
endif()
message(STATUS "LibTorch C++11 ABI: ${DIFFUSE_TORCH_CXX11_ABI}")

set(DIFFUSE_TORCH_HAS_CUDA OFF)
if(TORCH_CUDA_LIBRARIES OR TARGET torch_cuda OR CAFFE2_USE_CUDA)
  set(DIFFUSE_TORCH_HAS_CUDA ON)
endif()

# --- CUDA / NCCL ---------------------------------------------------------------------------
set(DIFFUSE_WITH_CUDA OFF)
if(DIFFUSE_CUDA STREQUAL "ON" OR DIFFUSE_CUDA STREQUAL "AUTO")
  find_package(CUDAToolkit QUIET)
  if(DIFFUSE_TORCH_HAS_CUDA AND CUDAToolkit_FOUND)
    set(DIFFUSE_WITH_CUDA ON)
  elseif(DIFFUSE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "DIFFUSE_CUDA=ON but LibTorch has CUDA: ${DIFFUSE_TORCH_HAS_CUDA}, "
                        "CUDA toolkit found: ${CUDAToolkit_FOUND}. Use a CUDA build of LibTorch "
                        "and set CUDAToolkit_ROOT, or configure with -DDIFFUSE_CUDA=OFF.")
  endif()
elseif(NOT DIFFUSE_CUDA STREQUAL "OFF")
  message(FATAL_ERROR "DIFFUSE_CUDA must be AUTO, ON or OFF, got '${DIFFUSE_CUDA}'")
endif()

if(DIFFUSE_WITH_CUDA)
  # Link the NCCL that LibTorch itself loads (the wheel's nvidia-nccl), so the process holds
  # exactly one libnccl.so.2; fall back to the toolkit's for a LibTorch zip distribution.
  get_filename_component(_torch_root "${TORCH_INSTALL_PREFIX}" ABSOLUTE)
  find_path(DIFFUSE_NCCL_INCLUDE_DIR nccl.h
            HINTS "${_torch_root}/../nvidia/nccl/include" ${CUDAToolkit_INCLUDE_DIRS}
            NO_DEFAULT_PATH)
  find_library(DIFFUSE_NCCL_LIBRARY NAMES libnccl.so.2 nccl
               HINTS "${_torch_root}/../nvidia/nccl/lib" "${_torch_root}/lib" ${CUDAToolkit_LIBRARY_DIR}
               NO_DEFAULT_PATH)
  if(NOT DIFFUSE_NCCL_INCLUDE_DIR OR NOT DIFFUSE_NCCL_LIBRARY)
    message(FATAL_ERROR "CUDA is on but NCCL was not found (looked beside LibTorch in "
                        "${_torch_root}/../nvidia/nccl and in the CUDA toolkit). Set "
                        "DIFFUSE_NCCL_INCLUDE_DIR and DIFFUSE_NCCL_LIBRARY, or -DDIFFUSE_CUDA=OFF.")
  endif()
  add_library(diffuse::nccl SHARED IMPORTED)
  set_target_properties(diffuse::nccl PROPERTIES
    IMPORTED_LOCATION "${DIFFUSE_NCCL_LIBRARY}"
    IMPORTED_NO_SONAME OFF
    INTERFACE_INCLUDE_DIRECTORIES "${DIFFUSE_NCCL_INCLUDE_DIR}")
  message(STATUS "NCCL: ${DIFFUSE_NCCL_LIBRARY}")
endif()
message(STATUS "diffuse CUDA paths: ${DIFFUSE_WITH_CUDA} (DIFFUSE_CUDA=${DIFFUSE_CUDA}, LibTorch CUDA: ${DIFFUSE_TORCH_HAS_CUDA})")

# --- MPI -----------------------------------------------------------------------------------
find_package(MPI REQUIRED COMPONENTS C)
# MPI::MPI_C may carry compile options; keep only includes and libraries (shared PCH flags).
add_library(diffuse::mpi INTERFACE IMPORTED)
set_target_properties(diffuse::mpi PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${MPI_C_INCLUDE_DIRS}"
  INTERFACE_LINK_LIBRARIES "${MPI_C_LIBRARIES}")

# --- HDF5 ----------------------------------------------------------------------------------
find_package(HDF5 REQUIRED COMPONENTS C)
add_library(diffuse::hdf5 INTERFACE IMPORTED)
set_target_properties(diffuse::hdf5 PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${HDF5_C_INCLUDE_DIRS}"
  INTERFACE_LINK_LIBRARIES "${HDF5_C_LIBRARIES}")

# --- Small libraries ---------------------------------------------------------------------
find_package(spdlog REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(CLI11 QUIET CONFIG)
if(NOT CLI11_FOUND)
  find_path(CLI11_INCLUDE_DIR CLI/CLI.hpp REQUIRED)
  add_library(CLI11::CLI11 INTERFACE IMPORTED)
  set_target_properties(CLI11::CLI11 PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${CLI11_INCLUDE_DIR}")
endif()
find_path(STB_INCLUDE_DIR stb_image.h PATH_SUFFIXES stb REQUIRED)
# protobuf (Debian's 3.21, lite runtime) and protoc: TensorBoard event files (trainer/tensorboard.h).
find_package(Protobuf REQUIRED)
find_package(ZLIB REQUIRED)
find_package(Threads REQUIRED)
if(DIFFUSE_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

find_package(Git QUIET)
set(DIFFUSE_GIT_HASH "unknown")
if(GIT_FOUND AND EXISTS "${PROJECT_SOURCE_DIR}/.git")
  execute_process(COMMAND ${GIT_EXECUTABLE} rev-parse --short=12 HEAD
                  WORKING_DIRECTORY ${PROJECT_SOURCE_DIR} OUTPUT_VARIABLE _hash
                  OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
  if(_rc EQUAL 0)
    set(DIFFUSE_GIT_HASH "${_hash}")
  endif()
endif()
