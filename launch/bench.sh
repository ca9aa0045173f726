#!/usr/bin/env bash
# launch/bench.sh: the benchmark suite on this machine (CPU), in under 10 minutes on 2 cores.
# Runs model_bench, loader_bench, allreduce_bench (2 MPI ranks), step_bench for the tiny, demo and
# headline configs (headline with batch 2 on CPU), the checkpoint save/load benchmark and `dd`
# with fsync on the same disk; merges every program's JSON into one file and prints a table in
# which each figure has its ratio to the ceiling measured in the same run.
#
#   bash launch/bench.sh                       # writes bench-results.json in the current folder
#   bash launch/bench.sh -o out.json -d /scratch --no-build
#
# -d DIR: scratch folder on the disk to measure (checkpoint, dd, loader files; default: a new
# folder under $TMPDIR). The page cache is dropped before reads when we may (root), otherwise the
# read rates are page-cache rates and the table says so. Needs python3 (standard library only).
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

out="bench-results.json"
scratch=""
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out="$2"; shift 2 ;;
    -d) scratch="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
command -v python3 >/dev/null || die "python3 is needed to merge the results"
bin="$DIFFUSE_BUILD_DIR/bin"
targets=(model_bench loader_bench allreduce_bench step_bench)
if [ "$build" = 1 ]; then
  [ -f "$DIFFUSE_BUILD_DIR/build.ninja" ] || [ -f "$DIFFUSE_BUILD_DIR/Makefile" ] ||
    die "no configured build in $DIFFUSE_BUILD_DIR: run launch/setup.sh first"
  cmake "$DIFFUSE_BUILD_DIR" >/dev/null  # picks up bench/trainer when it is new
  cmake --build "$DIFFUSE_BUILD_DIR" -j "$(diffuse_jobs)" --target "${targets[@]}"
fi
for t in "${targets[@]}"; do [ -x "$bin/$t" ] || die "$bin/$t not built (run without --no-build)"; done

created=0
if [ -z "$scratch" ]; then scratch="$(mktemp -d "${TMPDIR:-/tmp}/diffuse-bench.XXXXXX")"; created=1; fi
mkdir -p "$scratch"
parts="$scratch/parts"
mkdir -p "$parts"
cores="$(diffuse_jobs)"
start=$SECONDS
cd "$DIFFUSE_ROOT"

drop_caches() {
  sync
  if { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then echo dropped; else echo page-cache; fi
}

# dd with fsync: bytes and seconds of writing, then of reading back, a file of `mb` MiB.
disk_rates() {
  local mb="$1" file="$scratch/dd.bin" w r cache
  w="$(LC_ALL=C dd if=/dev/zero of="$file" bs=1M count="$mb" conv=fsync 2>&1 | tail -n 1)"
  cache="$(drop_caches)"
  r="$(LC_ALL=C dd if="$file" of=/dev/null bs=1M 2>&1 | tail -n 1)"
  rm -f "$file"
  python3 - "$w" "$r" "$cache" <<'EOF'
import json, re, sys
def parse(line):  # "629145600 bytes (629 MB, 600 MiB) copied, 1.23 s, 510 MB/s"
    m = re.match(r"(\d+) bytes.*copied, ([0-9.]+) s", line)
    if not m: sys.exit("cannot parse dd output: " + line)
    return int(m.group(1)), float(m.group(2))
wb, ws = parse(sys.argv[1]); rb, rs = parse(sys.argv[2])
print(json.dumps({"program": "dd", "write_bytes_per_second": wb / ws, "read_bytes_per_second": rb / rs,
                  "bytes": wb, "read_cache": sys.argv[3]}))
EOF
}

# Before/after of the one change this suite recommends for CPU runs (bench/README.md): the demo
# step with the default environment, then with OpenMP threads that sleep instead of spinning at
# barriers and a glibc malloc that keeps freed activations instead of unmapping them.
# Batch 16 per rank, as in every demo-step figure in bench/README.md (the demo itself now runs batch 8).
say "step_bench: demo, default environment (before)"
"$bin/step_bench" --config configs/demo.yaml --set train.device=cpu --set train.batch_size=16 --steps 4 --warmup 1 --threads "$cores" \
  --json "$parts/step-demo-before.json"
# The tiny model's ops are too small to share between threads (and sleeping threads make each of
# its many small parallel regions pay a wake-up): one thread, default environment.
say "step_bench: tiny (1 thread)"
"$bin/step_bench" --config configs/tiny.yaml --steps 20 --warmup 3 --threads 1 --json "$parts/step-tiny.json"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296}"
say "from here on: OMP_WAIT_POLICY=$OMP_WAIT_POLICY GLIBC_TUNABLES=$GLIBC_TUNABLES"

say "model_bench (U-Net dim 32 at 32x32, batch 16 as in the demo-step figures; default mults 1,2,4,8)"
"$bin/model_bench" --dim 32 --size 32 --batch 16 --iters 5 --warmup 1 --threads "$cores" --json "$parts/model.json"

say "loader_bench (32x32 and 128x128, warm file)"
"$bin/loader_bench" --dir "$scratch" --megabytes 64 --seconds 1 --json "$parts/loader.json"

say "allreduce_bench on 2 MPI ranks"
OMP_NUM_THREADS=1 diffuse_mpirun 2 "$bin/allreduce_bench" --max-bytes $((64 << 20)) --seconds-per-size 0.2 \
  --progress thread --steps 3 --warmup 1 --json "$parts/allreduce.json"

say "step_bench: demo (fp32, batch 16, threads = $cores cores) (after)"
"$bin/step_bench" --config configs/demo.yaml --set train.device=cpu --set train.batch_size=16 --steps 5 --warmup 2 --threads "$cores" \
  --json "$parts/step-demo.json"
say "step_bench: headline (reference-128) reduced to batch 2 and fp32 on CPU"
"$bin/step_bench" --config configs/reference-128.yaml --set train.device=cpu --set train.batch_size=2 \
  --set train.precision=fp32 --set data.workers=1 --steps 2 --warmup 1 --skip-matmul \
  --json "$parts/step-headline.json"

say "checkpoint save/load of the headline state, and dd on the same disk"
"$bin/step_bench" --config configs/reference-128.yaml --checkpoint "$scratch/checkpoints" \
  --json "$parts/checkpoint.json"
ckpt_mb=$(python3 -c "import json;print(max(64, int(json.load(open('$parts/checkpoint.json'))['bytes'] / 2**20)))")
disk_rates "$ckpt_mb" > "$parts/dd.json"

python3 - "$parts" "$out" "$((SECONDS - start))" <<'EOF'
import json, os, sys
parts, out, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = {os.path.splitext(f)[0]: json.load(open(os.path.join(parts, f))) for f in sorted(os.listdir(parts))}
r["wall_seconds"] = seconds
r["cores"] = os.cpu_count()
# The headline run skips the matmul measurement (it would repeat the demo's): same process ceiling.
demo = r["step-demo"]
h = r["step-headline"]
h["matmul_fp32_flops"], h["matmul_bf16_flops"] = demo["matmul_fp32_flops"], demo["matmul_bf16_flops"]
h["mfu"] = h["step_flops"] / (h["matmul_fp32_flops"] if h["precision"] == "fp32" else h["matmul_bf16_flops"])
r["step-demo-before"]["mfu_vs_after_ceiling"] = r["step-demo-before"]["step_flops"] / demo["matmul_fp32_flops"]
json.dump(r, open(out, "w"), indent=1)

G = 1e9
rows = []
def row(name, value, ceiling_name, ceiling, ratio):
    rows.append((name, value, ceiling_name, ceiling, f"{100 * ratio:.1f}%"))
for key in ("step-demo-before", "step-tiny", "step-demo", "step-headline"):
    s = r[key]
    ph = s["step_seconds"]
    ceil = "fp32" if s["precision"] == "fp32" else "bf16"
    label = f"{s['config']} {s['precision']} b{int(s['batch_per_rank'])} {int(s['image_size'])}px"
    label += {"step-demo-before": " (before)", "step-demo": " (after)"}.get(key, "")
    row(f"step {label}", f"{s['images_per_second']:.1f} img/s, {s['step_flops'] / G:.1f} GFLOP/s",
        f"matmul {ceil}", f"{s['matmul_' + ceil + '_flops'] / G:.0f} GFLOP/s", s["mfu"])
    ms = lambda k: f"{1e3 * ph[k]:.1f}"
    rows.append((f"  phases ms (total {ms('total')})",
                 f"data {ms('data_wait')} fwd {ms('forward')} bwd {ms('backward')} comm {ms('exposed_comm')}"
                 f" opt {ms('optimizer')} ema {ms('ema')} other {ms('other')}",
                 "peak RSS", f"{s['peak_rss_bytes'] / 2**20:.0f} MiB", ""))
m = r["model"]
row(f"U-Net fwd+bwd dim {m['dim']} {m['image_size']}px b{m['batch']}",
    f"{m['forward_backward_flops_per_second'] / G:.1f} GFLOP/s", "matmul fp32",
    f"{demo['matmul_fp32_flops'] / G:.0f} GFLOP/s", m["forward_backward_flops_per_second"] / demo["matmul_fp32_flops"])
for l in r["loader"]["rows"]:
    if l["threads"] == 2:
        row(f"loader {l['side']}x{l['side']}, 2 workers", f"{l['images_per_second']:.0f} img/s",
            "cat (warm)", f"{l['cat_bytes_per_second'] / 1e6:.0f} MB/s", l["bytes_per_second"] / l["cat_bytes_per_second"])
c, d = r["checkpoint"], r["dd"]
row(f"checkpoint save ({c['bytes'] / 1e6:.0f} MB)", f"{c['save_bytes_per_second'] / G:.2f} GB/s",
    "dd write fsync", f"{d['write_bytes_per_second'] / G:.2f} GB/s", c["save_bytes_per_second"] / d["write_bytes_per_second"])
row(f"checkpoint load ({'disk' if c['load_cache'].startswith('dropped') else 'page cache'})",
    f"{c['load_bytes_per_second'] / G:.2f} GB/s", f"dd read ({d['read_cache']})",
    f"{d['read_bytes_per_second'] / G:.2f} GB/s", c["load_bytes_per_second"] / d["read_bytes_per_second"])
a = r["allreduce"]
for b in a["bandwidth"]:
    if b["bytes"] in (1 << 20, a["bandwidth"][-1]["bytes"]):
        row(f"all-reduce {b['bytes'] >> 20} MiB busbw, {a['ranks']} ranks", f"{b['mpi/thread_busbw_gbs']:.2f} GB/s",
            "raw MPI_Allreduce", f"{b['raw_mpi_busbw_gbs']:.2f} GB/s", b["mpi/thread_busbw_gbs"] / b["raw_mpi_busbw_gbs"])
for o in a["overlap"]:
    row(f"all-reduce hidden behind backward ({o['comm']})", f"exposed {1e3 * o['exposed_s']:.1f} ms",
        "comm alone", f"{1e3 * o['comm_only_s']:.1f} ms", o["hidden"])
widths = [max(len(x[i]) for x in rows) for i in range(5)]
print(f"\nbench results ({r['cores']} cores, {seconds} s): {out}")
for x in rows:
    print("  ".join(v.ljust(w) for v, w in zip(x, widths)).rstrip())
EOF
if [ "$created" = 1 ]; then rm -rf "$scratch"; else rm -rf "$parts"; fi
