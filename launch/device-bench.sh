#!/usr/bin/env bash
# launch/device-bench.sh: builds step_bench on the GPU machine (H200, see /work/shared/GPU.md) and
# measures the headline config (configs/reference-128.yaml: U-Net dim 64, mults 1,2,4,8, 128x128,
# batch 32, bf16): images/s, the step's phases, MFU against the H200's bf16 matmul rate measured
# in the same process, CUDA allocator peak; then the largest batch that fits (doubling until OOM).
#
# On the GPU machine, from the repository root (one call: unpack, configure, build, measure):
#   bash launch/device-bench.sh --debs .gpu-debs --out "$OUT"
# Here (no GPU), the CPU path checks the same steps on the existing build with the tiny config:
#   bash launch/device-bench.sh --cpu --out /tmp/device-bench-cpu
#
# Options:
#   --debs DIR       Debian .debs to unpack into --prefix (GPU.md's list); skipped with --cpu
#   --prefix DIR     where they are unpacked (default /opt/deps; never /)
#   --build-dir DIR  build folder (default build-device; --cpu: $DIFFUSE_BUILD_DIR)
#   --out DIR        results: headline.json, batch-<B>.json, summary.json, logs (default bench-device)
#   --config FILE    default configs/reference-128.yaml (--cpu: configs/tiny.yaml)
#   --steps N        timed steps (default 20; --cpu 3); --warmup N (default 5; --cpu 1)
#   --max-batch B    stop the batch search here (default 4096; --cpu 16)
#   --no-search      skip the largest-batch search
#   --dry-run        print the commands instead of running them
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

debs=".gpu-debs"
prefix="/opt/deps"
build_dir=""
out="${OUT:-bench-device}"  # the device tool collects $OUT
config=""
steps=""
warmup=""
max_batch=""
cpu=0
search=1
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --debs) debs="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --max-batch) max_batch="$2"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --no-search) search=0; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "device-bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for n in "$steps" "$warmup" "$max_batch"; do
  case "$n" in ''|*[!0-9]*) [ -z "$n" ] || { echo "device-bench.sh: '$n' is not a number" >&2; exit 2; } ;; esac
done
[ "$prefix" != "/" ] || { echo "device-bench.sh: never unpack into / (GPU.md)" >&2; exit 2; }

cd "$root"
if [ "$cpu" = 1 ]; then
  # shellcheck source=launch/env.sh
  source "$root/launch/env.sh"
  build_dir="${build_dir:-$DIFFUSE_BUILD_DIR}"
  config="${config:-configs/tiny.yaml}"
  steps="${steps:-3}"; warmup="${warmup:-1}"; max_batch="${max_batch:-16}"
  device=cpu
else
  build_dir="${build_dir:-build-device}"
  config="${config:-configs/reference-128.yaml}"
  steps="${steps:-20}"; warmup="${warmup:-5}"; max_batch="${max_batch:-4096}"
  device=cuda
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"

run() {
  echo "+ $*" >&2
  if [ "$dry" = 0 ]; then "$@"; fi
}

if [ "$cpu" = 0 ]; then
  # The image has torch, nvcc, CMake and ninja but no MPI/HDF5/spdlog/yaml-cpp/CLI11/stb: the
  # .debs from GPU.md, unpacked into a prefix.
  compgen -G "$debs/*.deb" >/dev/null || { echo "device-bench.sh: no .deb files in $debs" >&2; exit 2; }
  run mkdir -p "$prefix"
  for f in "$debs"/*.deb; do run dpkg -x "$f" "$prefix"; done
  lib="$prefix/usr/lib/x86_64-linux-gnu"
  export OPAL_PREFIX="$prefix/usr" PATH="$prefix/usr/bin:$PATH"
  export LD_LIBRARY_PATH="$lib:$lib/openmpi/lib:$lib/hdf5/serial:${LD_LIBRARY_PATH:-}"
  torch_prefix="<torch.utils.cmake_prefix_path>"
  if [ "$dry" = 0 ]; then torch_prefix="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')"; fi
  run cmake -S "$root" -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$prefix/usr;$torch_prefix" \
    -DMPI_C_COMPILER="$prefix/usr/bin/mpicc.openmpi" -DMPI_CXX_COMPILER="$prefix/usr/bin/mpicxx.openmpi" \
    -DHDF5_ROOT="$prefix/usr" -DDIFFUSE_CUDA=ON -DDIFFUSE_BUILD_TESTS=OFF
  run cmake --build "$build_dir" -j "$(nproc)" --target step_bench
  run nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
else
  run cmake --build "$build_dir" -j 2 --target step_bench
fi
bench="$build_dir/bin/step_bench"

# The headline measurement: the config's batch and precision, with the bf16/fp32 matmul ceilings.
run "$bench" --config "$config" --set "train.device=$device" --steps "$steps" --warmup "$warmup" \
  --json "$out/headline.json" 2>&1 | tee "$out/headline.log"

# Largest batch: double from the config's until a step fails; only an out-of-memory failure ends
# the search quietly, anything else is an error.
largest=""
limit="not searched"
if [ "$search" = 1 ] && [ "$dry" = 0 ]; then
  batch="$(python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["batch_per_rank"]))' "$out/headline.json")"
  limit="--max-batch $max_batch reached"
  while [ "$batch" -le "$max_batch" ]; do
    if "$bench" --config "$config" --set "train.device=$device" --set "train.batch_size=$batch" --steps 2 \
        --warmup 1 --skip-matmul --json "$out/batch-$batch.json" > "$out/batch-$batch.log" 2>&1; then
      largest="$batch"
      echo "batch $batch fits: $(sed -n 3p "$out/batch-$batch.log")"
      batch=$((batch * 2))
    elif grep -qi "out of memory" "$out/batch-$batch.log"; then
      echo "batch $batch: out of memory"
      limit="batch $batch: out of memory"
      break
    else
      echo "device-bench.sh: batch $batch failed for another reason than memory:" >&2
      cat "$out/batch-$batch.log" >&2
      exit 1
    fi
  done
fi

if [ "$dry" = 0 ]; then
  python3 - "$out" "$largest" "$limit" <<'EOF'
import glob, json, os, sys
out, largest, limit = sys.argv[1], sys.argv[2], sys.argv[3]
h = json.load(open(os.path.join(out, "headline.json")))
batches = {}
for f in glob.glob(os.path.join(out, "batch-*.json")):
    b = json.load(open(f))
    batches[int(b["batch_per_rank"])] = {"images_per_second": b["images_per_second"],
                                          "cuda_peak_allocated_bytes": b["cuda_peak_allocated_bytes"],
                                          "peak_rss_bytes": b["peak_rss_bytes"]}
summary = {"headline": h, "largest_batch": int(largest) if largest else None, "search_ended": limit,
           "batches": {str(k): batches[k] for k in sorted(batches)}}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
peak = h["cuda_peak_allocated_bytes"]
print(f"{h['config']} on {h['device']} {h['precision']}, batch {int(h['batch_per_rank'])}: "
      f"{h['images_per_second']:.1f} images/s, MFU {100 * h['mfu']:.1f}% of the measured "
      f"{h['mfu_ceiling']} rate ({h['matmul_bf16_flops'] / 1e12:.1f} TFLOP/s bf16, "
      f"{h['matmul_fp32_flops'] / 1e12:.1f} fp32), "
      + (f"CUDA allocator peak {peak / 2**30:.2f} GiB" if peak is not None else "no CUDA allocator")
      + f"; largest batch that fits: {largest or 'none'} ({limit})")
EOF
fi
