#!/usr/bin/env bash
# launch/setup.sh: from a clean clone to a built diffuse, with one command. Idempotent: rerunning
# it checks each step and redoes only what is missing (a warm rerun takes seconds plus an
# incremental build).
#
#   1. Debian packages (build tools, OpenMPI, HDF5, spdlog, GoogleTest, yaml-cpp, CLI11, stb, OpenSSL,
#      protobuf and protoc)
#   2. LibTorch 2.11.0 from the PyPI wheel torch==2.11.0 (CUDA 13.0 build) in a venv under the
#      per-user cache (see launch/env.sh), linked as .deps/torch-venv; tensorboard in the same
#      venv (for `tensorboard --logdir runs/` and the test that TensorBoard reads our event files)
#   3. CMake configure (Release, Ninja, ccache, precompiled torch header) and build
#   4. A load check: the binary starts and finds all its libraries, with a single libnccl
#
# With --with-slurm (or DIFFUSE_WITH_SLURM=1; launch/test.sh asks for it) step 1 also installs
# Slurm and munge (slurmctld slurmd slurm-client munge, libpmix-dev for `srun --mpi=pmix`): the
# launcher tests start a private one-node cluster (tests/launch/slurm_cluster.sh). Not fatal
# when they cannot be installed: those tests then skip and say why.
#
# Usage: launch/setup.sh [--no-build] [--with-slurm]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

build=1
with_slurm="${DIFFUSE_WITH_SLURM:-0}"
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    --with-slurm) with_slurm=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) die "unknown argument '$arg' (expected --no-build or --with-slurm)" ;;
  esac
done

# --- 1. Debian packages -------------------------------------------------------------------
packages=(build-essential cmake ninja-build ccache pkg-config git python3-venv
          openmpi-bin libopenmpi-dev libhdf5-dev libspdlog-dev libfmt-dev
          libgtest-dev libyaml-cpp-dev libcli11-dev libstb-dev zlib1g-dev libssl-dev
          python3-h5py libprotobuf-dev protobuf-compiler)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# python3-venv is not needed when python3 is not Debian's (pyenv, conda ship venv themselves).
if [[ " ${missing[*]} " == *" python3-venv "* ]] && "$DIFFUSE_PYTHON" -m venv --help >/dev/null 2>&1; then
  missing=("${missing[@]/python3-venv}")
fi
missing=($(printf '%s\n' "${missing[@]}" | sed '/^$/d'))
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then sudo_cmd=(); elif sudo -n true 2>/dev/null; then sudo_cmd=(sudo -n); else
    die "missing Debian packages: ${missing[*]}. Install them with: sudo apt-get install -y ${missing[*]}"
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}" >/dev/null \
    || { "${sudo_cmd[@]}" apt-get update -q >/dev/null && "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}" >/dev/null; } \
    || die "apt-get could not install: ${missing[*]}"
else
  say "Debian packages: all ${#packages[@]} present"
fi

# --- 1b. Slurm for the launcher tests (opt-in) -------------------------------------------------
# Without recommends: those pull in every Slurm plugin's -dev package. mpi_pmix.so dlopens the
# unversioned libpmix.so, which only libpmix-dev ships.
if [ "$with_slurm" = 1 ]; then
  slurm_packages=(slurmctld slurmd slurm-client munge libpmix-dev)
  slurm_missing=()
  for p in "${slurm_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || slurm_missing+=("$p")
  done
  if [ ${#slurm_missing[@]} -eq 0 ]; then
    say "Slurm packages: all ${#slurm_packages[@]} present"
  elif [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; then
    say "installing Slurm packages for the launcher tests: ${slurm_missing[*]}"
    sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo -n)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${slurm_missing[@]}" >/dev/null \
      || { "${sudo_cmd[@]}" apt-get update -q >/dev/null \
           && "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${slurm_missing[@]}" >/dev/null; } \
      || say "warning: could not install ${slurm_missing[*]}: the Slurm launcher tests will skip"
  else
    say "warning: Slurm packages missing (${slurm_missing[*]}) and no root: the Slurm launcher tests will skip"
  fi
fi

# --- 2. LibTorch ----------------------------------------------------------------------------
if [ -n "${DIFFUSE_TORCH_CMAKE_PREFIX:-}" ]; then
  say "LibTorch: using DIFFUSE_TORCH_CMAKE_PREFIX=$DIFFUSE_TORCH_CMAKE_PREFIX"
  torch_prefix="$DIFFUSE_TORCH_CMAKE_PREFIX"
else
  marker="$DIFFUSE_TORCH_VENV/.diffuse-complete"
  if [ ! -f "$marker" ]; then
    say "LibTorch: installing torch==$DIFFUSE_TORCH_VERSION into $DIFFUSE_TORCH_VENV (a few GB, once per user)"
    rm -rf "$DIFFUSE_TORCH_VENV"
    mkdir -p "$(dirname "$DIFFUSE_TORCH_VENV")"
    "$DIFFUSE_PYTHON" -m venv "$DIFFUSE_TORCH_VENV" || die "could not create a venv with $DIFFUSE_PYTHON"
    "$DIFFUSE_TORCH_VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$DIFFUSE_TORCH_VENV/bin/python" -m pip install -q "torch==$DIFFUSE_TORCH_VERSION" \
      || die "pip could not install torch==$DIFFUSE_TORCH_VERSION (is PyPI reachable?)"
    got="$("$DIFFUSE_TORCH_VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    [[ "$got" == "$DIFFUSE_TORCH_VERSION"* ]] || die "expected torch $DIFFUSE_TORCH_VERSION in the venv, found $got"
    touch "$marker"
  fi
  # TensorBoard: not needed to build or train, so a failed install only warns (its reader test
  # then skips, except under CI where it fails).
  if [ "$("$DIFFUSE_TORCH_VENV/bin/python" -c 'import tensorboard; print(tensorboard.__version__)' 2>/dev/null)" \
       != "$DIFFUSE_TENSORBOARD_VERSION" ]; then
    say "TensorBoard: installing tensorboard==$DIFFUSE_TENSORBOARD_VERSION into $DIFFUSE_TORCH_VENV"
    "$DIFFUSE_TORCH_VENV/bin/python" -m pip install -q "tensorboard==$DIFFUSE_TENSORBOARD_VERSION" \
      || say "warning: pip could not install tensorboard==$DIFFUSE_TENSORBOARD_VERSION: tensorboard_reader_test will skip (and fail under CI)"
  fi
  torch_prefix="$("$DIFFUSE_TORCH_VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  mkdir -p "$DIFFUSE_ROOT/.deps"
  ln -sfn "$DIFFUSE_TORCH_VENV" "$DIFFUSE_ROOT/.deps/torch-venv"
  say "LibTorch: $("$DIFFUSE_TORCH_VENV/bin/python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "cxx11abi", torch._C._GLIBCXX_USE_CXX11_ABI)') in $DIFFUSE_TORCH_VENV"
fi

[ "$build" -eq 1 ] || exit 0

# --- 3. Configure and build -----------------------------------------------------------------
say "configuring $DIFFUSE_BUILD_DIR (Release, Ninja, ccache, DIFFUSE_CUDA=$DIFFUSE_CUDA)"
cmake -S "$DIFFUSE_ROOT" -B "$DIFFUSE_BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
  -DDIFFUSE_CUDA="$DIFFUSE_CUDA" \
  ${DIFFUSE_CMAKE_ARGS:-} >"$DIFFUSE_ROOT/.deps/configure.log" 2>&1 \
  || { tail -40 "$DIFFUSE_ROOT/.deps/configure.log" >&2; die "CMake configure failed (full log: .deps/configure.log)"; }
grep -E "LibTorch|NCCL|CUDA paths" "$DIFFUSE_ROOT/.deps/configure.log" | sed 's/^-- /  /' >&2 || true
say "building with $(diffuse_jobs) jobs"
cmake --build "$DIFFUSE_BUILD_DIR" -j "$(diffuse_jobs)" || die "build failed"

# --- 4. Load check --------------------------------------------------------------------------
"$DIFFUSE_EXE" --version >/dev/null || die "$DIFFUSE_EXE does not start: a library is not found (ldd $DIFFUSE_EXE)"
nccl_count=$(ldd "$DIFFUSE_EXE" | grep -c 'libnccl.so' || true)
[ "$nccl_count" -le 1 ] || die "$DIFFUSE_EXE would load $nccl_count copies of libnccl: $(ldd "$DIFFUSE_EXE" | grep libnccl)"
say "ready: $DIFFUSE_EXE ($("$DIFFUSE_EXE" --version))"
