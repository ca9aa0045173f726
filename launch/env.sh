# launch/env.sh: sourced by the other scripts. Pins the dependency versions, names the cache
# folders (outside the clone, shared by every clone of this user), and the build folder.
#
# Override with environment variables:
#   DIFFUSE_CACHE               per-user cache root            (default: ~/.cache/diffuse)
#   DIFFUSE_TORCH_VENV          Python venv holding LibTorch     (default: $DIFFUSE_CACHE/torch-2.11.0-py3.X)
#   DIFFUSE_TORCH_CMAKE_PREFIX  your own LibTorch's share/cmake  (skips the venv; e.g. a cluster module)
#   DIFFUSE_BUILD_DIR           build folder                    (default: <repo>/build)
#   DIFFUSE_CUDA                AUTO | ON | OFF                 (default: AUTO)

DIFFUSE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIFFUSE_TORCH_VERSION="2.11.0"
DIFFUSE_TENSORBOARD_VERSION="2.21.0"
DIFFUSE_PYTHON="${DIFFUSE_PYTHON:-python3}"
DIFFUSE_CACHE="${DIFFUSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/diffuse}"
_pyver="$("$DIFFUSE_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || echo unknown)"
DIFFUSE_TORCH_VENV="${DIFFUSE_TORCH_VENV:-$DIFFUSE_CACHE/torch-$DIFFUSE_TORCH_VERSION-py$_pyver}"
DIFFUSE_BUILD_DIR="${DIFFUSE_BUILD_DIR:-$DIFFUSE_ROOT/build}"
DIFFUSE_CUDA="${DIFFUSE_CUDA:-AUTO}"
# A DIFFUSE_EXE from the caller wins (train.sbatch documents it, also for LAUNCHER=mpirun).
DIFFUSE_EXE="${DIFFUSE_EXE:-$DIFFUSE_BUILD_DIR/bin/diffuse}"

# ccache: keyed on content, shared across clones (paths made relative to the clone), and told
# that the precompiled torch header is safe to cache.
export CCACHE_DIR="${CCACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ccache}"
export CCACHE_BASEDIR="$DIFFUSE_ROOT"
export CCACHE_NOHASHDIR=1
export CCACHE_SLOPPINESS="pch_defines,time_macros,include_file_mtime,include_file_ctime"
export CCACHE_MAXSIZE="${CCACHE_MAXSIZE:-8G}"
# The CUDA toolkit, when present, is where LibTorch's CMake config looks for nvcc.
if [ -d /usr/local/cuda/bin ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi

say() { printf '\033[1m[diffuse]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[diffuse] error:\033[0m %s\n' "$*" >&2; exit 1; }

# Cores for the build; leave the machine usable on small boxes.
diffuse_jobs() { getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2; }  # not nproc: it answers OMP_NUM_THREADS

# mpirun with what this machine needs: root may run it only with an explicit flag, and small
# machines need oversubscription when ranks exceed cores.
diffuse_mpirun() {
  local ranks="$1"; shift
  local flags=(-np "$ranks" --bind-to none)
  if [ "$(id -u)" -eq 0 ]; then flags+=(--allow-run-as-root); fi
  if [ "$ranks" -gt "$(diffuse_jobs)" ]; then flags+=(--oversubscribe); fi
  echo "+ mpirun ${flags[*]} $*" >&2
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(diffuse_jobs) / ranks > 0 ? $(diffuse_jobs) / ranks : 1 ))}" \
    mpirun "${flags[@]}" "$@"
}
