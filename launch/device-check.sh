#!/usr/bin/env bash
# launch/device-check.sh: the one prepared check of diffuse's GPU paths on the lent H200 (issue 14;
# machine notes in ../shared/GPU.md). Two halves:
#
#   bash launch/device-check.sh pack [--rehearse]   # here: fills .device-pack/ (git-ignored, < 60 MiB)
#   bash launch/device-check.sh run                 # there: one call, at most 8 minutes
#   bash launch/device-check.sh run --rehearse      # here: the same run on CPU stand-ins (CI: ctest -L device)
#
# pack (seconds once its downloads are cached in $DIFFUSE_CACHE/device-pack; needs the build's
# binaries: cmake --build build --target diffuse step_bench model_test data_test dist_test
# training_parts_test checkpoint_test e2e_test) writes .device-pack/:
#   bin/       diffuse, step_bench and the test binaries of this build (CUDA-enabled; LibTorch linked
#              dynamically, so the image's torch 2.11.0+cu130 supplies it there)
#   debs/      the Debian packages the binaries and mpirun need beyond glibc/libstdc++/zlib (the closure
#              of ldd over the binaries and OpenMPI's own programs and plugins), plus the -dev packages
#              the on-device fallback build needs
#   wheels/    denoising_diffusion_pytorch==2.3.1, ema-pytorch, pytorch-fid (the image lacks them)
#   wheels-rehearse/  einops, packaging: only the CPU rehearsal installs these (the image has them)
#   manifest.json     git hash, CUDA or not, every file's size
# --rehearse accepts a build without CUDA (the pack is then marked rehearsal-only; `run` refuses it).
#
# run, on the device (each part time-boxed; the whole inside --budget, default 450 s):
#   setup         unpack debs into /tmp/device-check/deps (never /), LD_LIBRARY_PATH = those + the image's
#                 torch/lib + its nvidia/*/lib; ldd must resolve everything and libtorch must come from
#                 the image (the binaries' RUNPATH, printed from readelf, names this build machine's
#                 venv, which does not exist there). If they cannot run: fallback ninja build (-dev debs).
#   doctor        `diffuse doctor`: a GPU seen, one libnccl, versions
#   cuda_tests    every test binary with --gtest_filter='*_CUDA*' at world size 1 (NCCL communicator
#                 and GradReducer included); on the device a skipped _CUDA test fails the part
#   dist_np2      dist_test and checkpoint_test _CUDA under mpirun -np 2 on the one GPU: NCCL needs a
#                 GPU per rank (those tests skip, saying so); the reducer runs on MPI with CUDA tensors
#   e2e           diffuse train (tiny config, bf16, 30 steps, then a resume to 50; checkpoints every 10),
#                 sample, export;
#                 the checkpoint loads on the CPU (inspect, sample with no GPU visible) and the export
#                 loads strictly into the reference Unet
#   step_bench    configs/reference-128.yaml (dim 64, mults 1-2-4-8, 128², batch 32, bf16): images/s,
#                 phases, MFU against the bf16 matmul rate measured in the same process, peak memory
#   reference_eager / reference_compile   bench/reference_step.py, the same setup, same GPU
#   batch_search  the largest batch that fits (doubling from 64 until out of memory)
# then summary.json and a one-screen table (bench/device_report.py). $OUT gets 4 files (the tool
# brings back at most 8): summary.json, table.txt, console.log, logs.tar.gz (every log and JSON).
#
# The call to make when a GPU is lent (device tool `run`), after `pack` here:
#   command:  bash launch/device-check.sh run
#   carry:    [".device-pack"]
#   timeout_s: 540   (the script stops its parts by 450 s; leaves time in 15 minutes for one rerun)
#
# run --rehearse: the same lines here on CPU: the pack's binaries and debs, this machine's torch venv
# standing in for the image's python, tiny configs in fp32, the reference with --allow-stubs; _CUDA tests are
# expected to skip. About a minute on 2 cores. Results: build/device-rehearsal/ (or --out DIR).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
self="$root/launch/device-check.sh"
# shellcheck source=launch/env.sh
source "$root/launch/env.sh"

readonly PACK_LIMIT_MIB=60
readonly BINARIES=(diffuse step_bench model_test data_test dist_test training_parts_test checkpoint_test e2e_test)
readonly TEST_BINARIES=(model_test data_test dist_test training_parts_test checkpoint_test e2e_test)
# On every Ubuntu/Debian image, newer there than here (their libraries are backward compatible).
readonly BASE_PACKAGES=" libc6 libstdc++6 libgcc-s1 zlib1g "
# mpirun's own programs, data and plugins (found by the closure only through these seeds).
# (Not libhwloc-plugins: optional for hwloc, and its XML/X11/OpenCL plugins would pull in libicu, 10 MB.)
readonly SEED_PACKAGES=(openmpi-bin openmpi-common libopenmpi3 libpmix2)
# The fallback build's headers, CMake configs and link-time libraries.
readonly DEV_PACKAGES=(libopenmpi-dev libhdf5-dev libspdlog-dev libfmt-dev libyaml-cpp-dev libcli11-dev
                       libgtest-dev libstb-dev zlib1g-dev)
readonly WHEELS=("denoising_diffusion_pytorch==2.3.1" "ema-pytorch" "pytorch-fid")
readonly REHEARSE_WHEELS=("einops" "packaging")

usage() { sed -n '2,49p' "$self"; exit 0; }

# --- pack ------------------------------------------------------------------------------------

# Which Debian package owns each shared object, from dpkg's file lists (one read: dpkg -S per
# library takes minutes). usrmerge: a library may be listed under /lib or /usr/lib.
declare -A OWNER=()
load_owners() {
  local f p
  while IFS=$'\t' read -r f p; do OWNER[$f]="$p"; done < <(
    awk 'FNR == 1 { p = FILENAME; sub(".*/", "", p); sub("\\.list$", "", p); sub(":.*", "", p) }
         /\.so/ { print $0 "\t" p }' /var/lib/dpkg/info/*.list)
}
owner_of() {
  local path="$1" real candidate
  real="$(readlink -f "$path")"
  for candidate in "$path" "$real" "${real#/usr}" "/usr${path}" "${path#/usr}"; do
    if [ -n "${OWNER[$candidate]:-}" ]; then echo "${OWNER[$candidate]}"; return 0; fi
  done
  return 1
}

# ELF files (programs and shared objects) a package installs.
elf_files_of() {
  dpkg -L "$1" 2>/dev/null | while read -r f; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    case "$f" in *.so|*.so.*|*/bin/*|*/sbin/*) ;; *) continue ;; esac
    [ "$(head -c4 "$f" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ] && echo "$f"
  done
}

# Packages (beyond BASE_PACKAGES) that the given ELF files and SEED_PACKAGES load, transitively.
runtime_packages() {
  local -A have=() done_files=()
  local queue=("$@") f lib p
  [ ${#OWNER[@]} -gt 0 ] || load_owners
  for p in "${SEED_PACKAGES[@]}"; do
    have[$p]=1
    mapfile -t -O "${#queue[@]}" queue < <(elf_files_of "$p")
  done
  while [ ${#queue[@]} -gt 0 ]; do
    f="${queue[0]}"; queue=("${queue[@]:1}")
    [ -z "${done_files[$f]:-}" ] || continue
    done_files[$f]=1
    while read -r lib; do
      # LibTorch and the CUDA runtime: the image's torch and nvidia wheels supply those there.
      case "$lib" in "$DIFFUSE_TORCH_VENV"/*|*/site-packages/*|/usr/local/cuda*) continue ;; esac
      p="$(owner_of "$lib")" || { say "warning: $lib (needed by $f) belongs to no Debian package: not packed"; continue; }
      [[ "$BASE_PACKAGES" == *" $p "* ]] && continue
      [ -z "${have[$p]:-}" ] || continue
      have[$p]=1
      mapfile -t -O "${#queue[@]}" queue < <(elf_files_of "$p")
    done < <(ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}')
  done
  printf '%s\n' "${!have[@]}" | sort
}

pack() {
  local out="$root/.device-pack" build_dir="$DIFFUSE_BUILD_DIR" rehearse=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --out) out="$2"; shift 2 ;;
      --build-dir) build_dir="$2"; shift 2 ;;
      --rehearse) rehearse=1; shift ;;
      -h|--help) usage ;;
      *) die "pack: unknown option $1 (see --help)" ;;
    esac
  done
  local b missing=()
  for b in "${BINARIES[@]}"; do [ -x "$build_dir/bin/$b" ] || missing+=("$b"); done
  [ ${#missing[@]} -eq 0 ] || die "pack: $build_dir/bin lacks ${missing[*]}: build them with
  cmake --build $build_dir --target ${BINARIES[*]}"
  local cuda=0
  grep -q '#define DIFFUSE_WITH_CUDA 1' "$build_dir/generated/diffuse/build_config.h" 2>/dev/null && cuda=1
  if [ "$cuda" = 0 ] && [ "$rehearse" = 0 ]; then
    die "pack: $build_dir was built without CUDA (generated/diffuse/build_config.h): the device needs the CUDA
  paths. Configure with a CUDA LibTorch and the toolkit (launch/setup.sh does on this machine), or pass
  --rehearse for a pack only the CPU rehearsal can use."
  fi

  local cache="$DIFFUSE_CACHE/device-pack"
  mkdir -p "$cache/debs" "$cache/wheels" "$cache/wheels-rehearse"
  say "pack: finding the Debian packages the binaries and mpirun load (ldd closure)"
  local bins=() packages=()
  for b in "${BINARIES[@]}"; do bins+=("$build_dir/bin/$b"); done
  mapfile -t packages < <(runtime_packages "${bins[@]}")
  local runtime_count=${#packages[@]}
  packages+=("${DEV_PACKAGES[@]}")
  # The installed version where the archive still has it (headers then match the libraries),
  # else the archive's candidate (a newer security update of the same package).
  local p want=() debs=()
  for p in "${packages[@]}"; do
    dpkg-query -W "$p" >/dev/null 2>&1 || die "pack: $p is not installed here: run launch/setup.sh (it installs the build's packages)"
    compgen -G "$cache/debs/${p}_*.deb" >/dev/null || want+=("$p")
  done
  if [ ${#want[@]} -gt 0 ]; then
    say "pack: apt-get download ${#want[@]} packages into $cache/debs"
    for p in "${want[@]}"; do
      (cd "$cache/debs" && { apt-get download -q "$p=$(dpkg-query -W -f='${Version}' "$p")" || apt-get download -q "$p"; } \
        >/dev/null 2>>"$cache/apt.log") || {
        tail -5 "$cache/apt.log" >&2
        say "pack: apt-get could not download $p (no network or stale lists: try apt-get update)"
        exit 3
      }
    done
  fi
  for p in "${packages[@]}"; do
    debs+=("$(find "$cache/debs" -name "${p}_*.deb" | sort -V | tail -1)")
  done

  local spec
  for spec in "${WHEELS[@]}"; do fetch_wheel "$spec" "$cache/wheels" || exit 3; done
  for spec in "${REHEARSE_WHEELS[@]}"; do fetch_wheel "$spec" "$cache/wheels-rehearse" || exit 3; done

  local tmp="$out.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp/bin" "$tmp/debs" "$tmp/wheels" "$tmp/wheels-rehearse"
  for b in "${BINARIES[@]}"; do cp "$build_dir/bin/$b" "$tmp/bin/"; done
  cp "${debs[@]}" "$tmp/debs/"
  cp "$cache"/wheels/*.whl "$tmp/wheels/"
  cp "$cache"/wheels-rehearse/*.whl "$tmp/wheels-rehearse/"
  # RUNPATH (not RPATH) lets LD_LIBRARY_PATH win there; an RPATH would point the loader here first.
  for b in "${BINARIES[@]}"; do
    if readelf -d "$tmp/bin/$b" | grep -q '(RPATH)'; then
      die "pack: $b carries DT_RPATH, which outranks LD_LIBRARY_PATH on the device; link with --enable-new-dtags"
    fi
  done
  local git_hash
  git_hash="$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  git -C "$root" diff --quiet HEAD 2>/dev/null || git_hash="$git_hash-dirty"
  "$DIFFUSE_TORCH_VENV/bin/python" - "$tmp" "$cuda" "$rehearse" "$git_hash" "$("$build_dir/bin/diffuse" --version)" <<'EOF'
import json, os, sys, time
tmp, cuda, rehearse, git_hash, version = sys.argv[1:]
files = {}
for folder, _, names in os.walk(tmp):
    for n in sorted(names):
        path = os.path.join(folder, n)
        files[os.path.relpath(path, tmp)] = os.path.getsize(path)
manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_hash, "diffuse": version,
            "cuda_build": cuda == "1", "rehearsal_only": cuda != "1", "files": files,
            "bytes": sum(files.values())}
json.dump(manifest, open(os.path.join(tmp, "manifest.json"), "w"), indent=1)
EOF
  rm -rf "$out"
  mv "$tmp" "$out"
  local bytes mib
  bytes="$(du -sb "$out" | cut -f1)"
  mib=$(( (bytes + 1048575) / 1048576 ))
  say "pack: $out: $(du -sh "$out/bin" | cut -f1) binaries, $runtime_count runtime + ${#DEV_PACKAGES[@]} -dev packages ($(du -sh "$out/debs" | cut -f1)), $(ls "$out/wheels" | wc -l) wheels"
  echo "pack size: $bytes bytes ($mib MiB of the $PACK_LIMIT_MIB MiB limit; the device call carries 64 MiB in all)"
  [ "$mib" -le "$PACK_LIMIT_MIB" ] || die "pack: $mib MiB is over the $PACK_LIMIT_MIB MiB limit"
  [ "$cuda" = 1 ] || say "pack: rehearsal-only (this build has no CUDA): \`run\` without --rehearse refuses it"
}

# pip download of one pure-Python wheel into DIR, unless DIR already has it.
fetch_wheel() {
  local spec="$1" dir="$2" name
  name="$(echo "${spec%%[=<>]*}" | tr '-' '_')"
  compgen -G "$dir/${name}-*.whl" >/dev/null && return 0
  say "pack: pip download $spec"
  "$DIFFUSE_TORCH_VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d "$dir" "$spec" >/dev/null 2>&1 \
    || { say "pack: pip could not download $spec (is PyPI reachable?)"; return 1; }
}

# --- run -------------------------------------------------------------------------------------

note() { printf '[device-check %4ss] %s\n' "$(( $(date +%s) - DC_START ))" "$*"; }

# part NAME BOX_SECONDS: runs `device-check.sh _part NAME` under timeout, logs to logs/NAME.log,
# appends "NAME<TAB>status<TAB>seconds" to parts.tsv. A part never gets more than the budget left.
part() {
  local name="$1" box="$2" left t0 rc status
  left=$(( DC_DEADLINE - $(date +%s) - 15 ))
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped: budget spent\t0\n' "$name" >>"$DC_WORK/parts.tsv"
    note "$name: skipped (the budget is spent)"
    return
  fi
  [ "$box" -le "$left" ] || box="$left"
  note "$name (at most ${box}s)"
  t0=$(date +%s)
  timeout -k 10 "$box" "$self" _part "$name" >"$DC_WORK/logs/$name.log" 2>&1
  rc=$?
  case "$rc" in
    0) status=ok ;;
    124|137) status="timeout after ${box}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >>"$DC_WORK/parts.tsv"
  note "$name: $status ($(( $(date +%s) - t0 ))s)"
  if [ "$status" != ok ]; then tail -15 "$DC_WORK/logs/$name.log" | sed 's/^/    | /'; fi
}

# Environment for the parts: the pack's libraries, the image's torch, the binaries.
setup_environment() {
  local pack_dir="$1"
  export DC_PREFIX="$DC_WORK/deps"  # never / (GPU.md: it can break the machine's own libraries)
  rm -rf "$DC_PREFIX"; mkdir -p "$DC_PREFIX"
  local f
  for f in "$pack_dir"/debs/*.deb; do dpkg -x "$f" "$DC_PREFIX" || die "dpkg -x $f failed"; done
  local lib="$DC_PREFIX/usr/lib/x86_64-linux-gnu"
  local torch_dir site
  torch_dir="$("$DC_PYTHON" -c 'import torch, os; print(os.path.dirname(torch.__file__))')" \
    || die "$DC_PYTHON cannot import torch"
  site="$(dirname "$torch_dir")"
  export DC_TORCH_LIB="$torch_dir/lib"
  local nvidia_libs
  nvidia_libs="$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd: -)"
  export OPAL_PREFIX="$DC_PREFIX/usr" PATH="$DC_PREFIX/usr/bin:$PATH"
  export LD_LIBRARY_PATH="$lib:$lib/openmpi/lib:$lib/hdf5/serial:$DC_TORCH_LIB${nvidia_libs:+:$nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export DC_MPIRUN="$DC_PREFIX/usr/bin/mpirun.openmpi"
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
  # Reference packages, offline, exactly as on the device; the rehearsal adds what the image has.
  export DC_SITE="$DC_WORK/site"
  rm -rf "$DC_SITE"
  local wheels=("$pack_dir"/wheels/*.whl)
  [ "$DC_REHEARSE" = 1 ] && wheels+=("$pack_dir"/wheels-rehearse/*.whl)
  "$DC_PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$DC_SITE" "${wheels[@]}" \
    || die "pip could not install the pack's wheels"
  export PYTHONPATH="$DC_SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  {
    echo "python: $DC_PYTHON ($("$DC_PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)'))"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not available"
  } >"$DC_WORK/logs/environment.txt"
}

# Whether the binaries in $1 load here: every library found, libtorch from the image, one libnccl.
check_binaries() {
  local bin_dir="$1" ok=0 b report="$DC_WORK/logs/ldd.txt"
  : >"$report"
  for b in "${BINARIES[@]}"; do
    {
      echo "== $b"
      readelf -d "$bin_dir/$b" | grep -E 'RUNPATH|RPATH' || echo "(no RUNPATH)"
      ldd "$bin_dir/$b"
    } >>"$report" 2>&1
  done
  if grep -q 'not found' "$report"; then
    note "not found by the loader: $(grep 'not found' "$report" | sort -u | awk '{print $1}' | paste -sd' ' -)"
    ok=1
  fi
  local torch_paths
  torch_paths="$(grep -E 'libtorch_cpu.so|libc10.so' "$report" | awk '$3 ~ /^\// {print $3}' | xargs -r readlink -f | sort -u)"
  if [ -n "$torch_paths" ] && [ "$(echo "$torch_paths" | xargs -n1 dirname | sort -u)" != "$(readlink -f "$DC_TORCH_LIB")" ]; then
    note "LibTorch would load from $(echo "$torch_paths" | paste -sd' ' -), not $DC_TORCH_LIB"
    ok=1
  fi
  local nccls
  nccls="$(grep 'libnccl.so' "$report" | awk '$3 ~ /^\// {print $3}' | xargs -r readlink -f | sort -u)"
  if [ "$(echo "$nccls" | sed '/^$/d' | wc -l)" -gt 1 ]; then
    note "more than one libnccl: $(echo "$nccls" | paste -sd' ' -)"
    ok=1
  fi
  [ "$ok" = 0 ] && "$bin_dir/diffuse" --version >>"$report" 2>&1 || ok=1
  return "$ok"
}

# Fallback: build on the device against the image's torch and the unpacked -dev packages.
build_on_device() {
  local build=/tmp/diffuse-build torch_prefix
  torch_prefix="$("$DC_PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  note "fallback: configuring and building with ninja in $build (log: logs/fallback-build.log)"
  {
    cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$DC_PREFIX/usr;$torch_prefix" \
      -DMPI_C_COMPILER="$DC_PREFIX/usr/bin/mpicc.openmpi" -DMPI_CXX_COMPILER="$DC_PREFIX/usr/bin/mpicxx.openmpi" \
      -DHDF5_ROOT="$DC_PREFIX/usr" -DDIFFUSE_CUDA=ON &&
      timeout 330 cmake --build "$build" -j "$(diffuse_jobs)" --target "${BINARIES[@]}"
  } >"$DC_WORK/logs/fallback-build.log" 2>&1 || { tail -30 "$DC_WORK/logs/fallback-build.log"; return 1; }
  export DC_BIN="$build/bin"
}

run_check() {
  local pack_dir="$root/.device-pack" results="${OUT:-}" budget=450
  export DC_REHEARSE=0 DC_WORK=/tmp/device-check
  while [ $# -gt 0 ]; do
    case "$1" in
      --rehearse) DC_REHEARSE=1; shift ;;
      --pack) pack_dir="$2"; shift 2 ;;
      --out) results="$2"; shift 2 ;;
      --work) DC_WORK="$2"; shift 2 ;;
      --budget) budget="$2"; shift 2 ;;
      -h|--help) usage ;;
      *) die "run: unknown option $1 (see --help)" ;;
    esac
  done
  pack_dir="$(cd "$pack_dir" 2>/dev/null && pwd)" || die "run: no pack at $pack_dir: run \`launch/device-check.sh pack\` here first"
  [ -f "$pack_dir/manifest.json" ] || die "run: $pack_dir has no manifest.json: rerun \`launch/device-check.sh pack\`"
  if [ "$DC_REHEARSE" = 0 ] && grep -q '"rehearsal_only": true' "$pack_dir/manifest.json"; then
    die "run: $pack_dir was packed from a build without CUDA (rehearsal only)"
  fi
  if [ -z "$results" ]; then
    [ "$DC_REHEARSE" = 1 ] && results="$DIFFUSE_BUILD_DIR/device-rehearsal" || results=/tmp/device-check-results
  fi
  mkdir -p "$results"; results="$(cd "$results" && pwd)"
  rm -rf "$DC_WORK"; mkdir -p "$DC_WORK/logs" "$DC_WORK/json"
  export DC_START; DC_START=$(date +%s)
  export DC_DEADLINE=$(( DC_START + budget )) DC_PACK="$pack_dir" DC_ROOT="$root"
  exec > >(tee "$DC_WORK/console.log") 2>&1
  if [ "$DC_REHEARSE" = 1 ]; then
    export DC_PYTHON="$DIFFUSE_TORCH_VENV/bin/python" DC_DEVICE=cpu
  else
    export DC_PYTHON=python3 DC_DEVICE=cuda
    [ -x /opt/torch/.venv/bin/python3 ] && DC_PYTHON=/opt/torch/.venv/bin/python3
  fi
  note "$([ "$DC_REHEARSE" = 1 ] && echo "CPU rehearsal" || echo "device run"): pack $(grep -o '"git": "[^"]*"' "$pack_dir/manifest.json"), budget ${budget}s, work $DC_WORK"
  local t0; t0=$(date +%s)
  setup_environment "$pack_dir"
  export DC_BIN="$pack_dir/bin" DC_BUILD="prebuilt"
  if ! check_binaries "$DC_BIN"; then
    if [ "$DC_REHEARSE" = 1 ]; then
      die "the pack's binaries do not load here (logs in $DC_WORK/logs/ldd.txt)"
    fi
    build_on_device && DC_BUILD="built on the device" || die "the fallback build failed too"
    check_binaries "$DC_BIN" || die "the fallback build's binaries do not load (logs/ldd.txt)"
  fi
  printf 'setup\tok\t%s\t%s\n' "$(( $(date +%s) - t0 ))" "$DC_BUILD" >"$DC_WORK/parts.tsv"
  note "setup: binaries $DC_BUILD, LibTorch from $DC_TORCH_LIB"

  part doctor 60
  part cuda_tests 200
  part dist_np2 90
  part e2e 90
  part step_bench 90
  part reference_eager 90
  part reference_compile 240
  part batch_search 150

  "$DC_PYTHON" "$root/bench/device_report.py" summary "$DC_WORK" --rehearse "$DC_REHEARSE" | tee "$DC_WORK/table.txt"
  local status=${PIPESTATUS[0]}
  tar -czf "$results/logs.tar.gz" -C "$DC_WORK" logs json parts.tsv
  cp "$DC_WORK/summary.json" "$DC_WORK/table.txt" "$results/"
  cp "$DC_WORK/console.log" "$results/"
  note "results in $results: summary.json, table.txt, console.log, logs.tar.gz"
  return "$status"
}

# --- the parts (run as `device-check.sh _part NAME` under timeout) ---------------------------

part_doctor() {
  "$DC_BIN/diffuse" doctor | tee "$DC_WORK/json/doctor.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || return "$rc"
  if [ "$DC_DEVICE" = cuda ]; then
    grep -q '^ *GPU 0' "$DC_WORK/json/doctor.txt" || { echo "doctor lists no GPU"; return 1; }
  fi
}

part_cuda_tests() {
  local bin rc=0
  export DIFFUSE_EXE="$DC_BIN/diffuse" DIFFUSE_SOURCE_DIR="$DC_ROOT" DIFFUSE_BUILD_DIR="$DC_WORK" OMP_NUM_THREADS=1
  for bin in "${TEST_BINARIES[@]}"; do
    echo "== $bin"
    timeout -k 5 120 "$DC_BIN/$bin" --gtest_filter='*_CUDA*' --gtest_output="json:$DC_WORK/json/tests-$bin.json" || rc=1
  done
  "$DC_PYTHON" "$DC_ROOT/bench/device_report.py" tests "$DC_WORK" --ranks 1 --rehearse "$DC_REHEARSE" || rc=1
  return "$rc"
}

part_dist_np2() {
  local bin rc=0
  export DIFFUSE_EXE="$DC_BIN/diffuse" DIFFUSE_SOURCE_DIR="$DC_ROOT" DIFFUSE_BUILD_DIR="$DC_WORK" OMP_NUM_THREADS=1
  for bin in dist_test checkpoint_test; do
    echo "== mpirun -np 2 $bin"
    # One JSON report per rank (OpenMPI names the rank in OMPI_COMM_WORLD_RANK).
    timeout -k 5 80 "$DC_MPIRUN" -np 2 --oversubscribe --bind-to none bash -c \
      'exec "$1" --gtest_filter="*_CUDA*" --gtest_output="json:$2-rank$OMPI_COMM_WORLD_RANK.json"' \
      _ "$DC_BIN/$bin" "$DC_WORK/json/np2-$bin" || rc=1
  done
  "$DC_PYTHON" "$DC_ROOT/bench/device_report.py" tests "$DC_WORK" --ranks 2 --rehearse "$DC_REHEARSE" || rc=1
  return "$rc"
}

part_e2e() {
  set -e
  local d="$DC_WORK/e2e" exe="$DC_BIN/diffuse"
  mkdir -p "$d"
  local common=(-c "$DC_ROOT/configs/tiny.yaml" --set "data.path=$d/shapes16.h5" --set "train.device=$DC_DEVICE"
                --set "train.precision=$(stand_in_precision)" --set checkpoint.every=10 --set log.every=10
                --run-dir "$d/run")
  "$exe" prep --synthetic shapes --count 256 --size 16 -o "$d/shapes16.h5"
  "$exe" train "${common[@]}" --set train.steps=30
  "$exe" train "${common[@]}" --set train.steps=50 --resume latest 2>&1 | tee "$d/resume.log"
  grep -q "resumed from" "$d/resume.log" || { echo "the resume did not say 'resumed from'"; return 1; }
  grep -q '"step": 50' "$d/run/metrics.jsonl" || { echo "metrics.jsonl has no step 50"; return 1; }
  "$exe" sample --ckpt "$d/run/checkpoints/latest" --n 16 --steps 10 --seed 1 --out "$d/grid.png"
  "$exe" export --ckpt "$d/run/checkpoints/latest" --out "$d/model.safetensors"
  # The checkpoint written from the GPU loads on the CPU: hashes, then sampling with no GPU visible.
  "$exe" inspect "$d/run/checkpoints/latest" | tee "$d/inspect.txt"
  grep -q "result      OK" "$d/inspect.txt"
  CUDA_VISIBLE_DEVICES="" "$exe" sample --ckpt "$d/run/checkpoints/latest" --n 4 --steps 5 --seed 1 --out "$d/cpu-grid.png"
  local stubs=()
  [ "$DC_REHEARSE" = 1 ] && stubs=(--allow-stubs)
  "$DC_PYTHON" "$DC_ROOT/bench/reference_step.py" --check-export "$d/model.safetensors" --dim 8 --dim-mults 1,2 \
    --attn-heads 2 --attn-dim-head 8 --image-size 16 --timesteps 50 --json "$DC_WORK/json/export-check.json" \
    "${stubs[@]}"
  cp "$d/run/metrics.jsonl" "$DC_WORK/json/e2e-metrics.jsonl"
}

# bf16 on the device; fp32 for the CPU stand-ins (bf16 is emulated, 20x slower, on a CPU without it).
stand_in_precision() { [ "$DC_REHEARSE" = 1 ] && echo fp32 || echo bf16; }

# The headline setup, or its CPU stand-in.
bench_args() {
  if [ "$DC_REHEARSE" = 1 ]; then
    echo --config "$DC_ROOT/configs/tiny.yaml" --set train.device=cpu --set train.precision=fp32
  else
    echo --config "$DC_ROOT/configs/reference-128.yaml" --set train.device=cuda
  fi
}

part_step_bench() {
  local extra=(--steps 20 --warmup 5)
  [ "$DC_REHEARSE" = 1 ] && extra=(--steps 3 --warmup 1 --matmul-size 256 --matmul-seconds 0.2)
  # shellcheck disable=SC2046
  "$DC_BIN/step_bench" $(bench_args) "${extra[@]}" --json "$DC_WORK/json/step_bench.json"
}

part_reference() {
  local mode="$1" args
  if [ "$DC_REHEARSE" = 1 ]; then
    args=(--device cpu --dim 8 --dim-mults 1,2 --attn-heads 2 --attn-dim-head 8 --image-size 16 --timesteps 50
          --batch 4 --precision fp32 --steps 3 --warmup 1 --allow-stubs --compile-backend eager)
  else
    args=(--device cuda --dim 64 --dim-mults 1,2,4,8 --image-size 128 --batch 32 --precision bf16 --steps 20 --warmup 5)
  fi
  "$DC_PYTHON" "$DC_ROOT/bench/reference_step.py" "${args[@]}" --mode "$mode" --json "$DC_WORK/json/reference-$mode.json"
}

# Doubles the batch from the config's until a step fails; only out of memory ends it quietly.
part_batch_search() {
  local batch max log
  if [ "$DC_REHEARSE" = 1 ]; then batch=8; max=16; else batch=64; max=2048; fi
  while [ "$batch" -le "$max" ]; do
    log="$DC_WORK/logs/batch-$batch.log"
    # shellcheck disable=SC2046
    if "$DC_BIN/step_bench" $(bench_args) --set "train.batch_size=$batch" --steps 2 --warmup 1 --skip-matmul \
        --json "$DC_WORK/json/batch-$batch.json" >"$log" 2>&1; then
      echo "batch $batch fits: $(sed -n 3p "$log")"
      batch=$((batch * 2))
    elif grep -qi "out of memory" "$log"; then
      echo "batch $batch: out of memory"
      echo "{\"out_of_memory_at\": $batch}" >"$DC_WORK/json/batch-oom.json"
      return 0
    else
      echo "batch $batch failed for another reason than memory:"; cat "$log"
      return 1
    fi
  done
  echo "{\"search_ended_at\": $max}" >"$DC_WORK/json/batch-oom.json"
}

run_part() {
  case "$1" in
    doctor) part_doctor ;;
    cuda_tests) part_cuda_tests ;;
    dist_np2) part_dist_np2 ;;
    e2e) part_e2e ;;
    step_bench) part_step_bench ;;
    reference_eager) part_reference eager ;;
    reference_compile) part_reference compile ;;
    batch_search) part_batch_search ;;
    *) die "unknown part $1" ;;
  esac
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  run) shift; run_check "$@" ;;
  _part) run_part "$2" ;;
  -h|--help|"") usage ;;
  *) echo "device-check.sh: unknown command '$1' (pack | run [--rehearse])" >&2; exit 2 ;;
esac
