#!/usr/bin/env bash
# DDPM against EDM on the same data, the same training budget and the same quality metric.
#
# Trains configs/mnist32.yaml (diffusion.type: gaussian) and configs/mnist32-edm.yaml (elucidated:
# the same Unet, optimizer, batch, schedule and EMA) side by side, one CPU rank and one thread each,
# so both runs share whatever else the machine is doing; then samples each at about the same number
# of network evaluations per image and measures FID/KID/precision/recall against one reference:
#   ddpm   DDIM, NFE steps (eta 0)
#   heun   EDM's deterministic Heun, (NFE+1)/2 steps = 2*steps-1 evaluations
#   dpmpp  DPM-Solver++(2M), NFE steps
#   posthoc-S  Heun as above on the post-hoc EMA of relative width S (with --posthoc)
# Evaluations run two at a time, one rank each. Writes OUT/results.json (and keeps both runs).
#
# Usage: bench/formulations.sh --data mnist32.h5 --features F.pt --ref R.stats.h5
#          [--steps 1000] [--n 1000] [--nfe 20] [--posthoc 0.05,0.1,0.2] [--out bench-formulations]
# Cost on a 2-core machine: about 2 x steps x 64 / 21 s of training (both runs at once) plus
# 4 x n x nfe / 40 s of sampling (before --posthoc's extra evaluations).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
source "$here/launch/env.sh"

data="" features="" ref="" steps=1000 n=1000 nfe=20 posthoc="" out="bench-formulations"
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data="$2"; shift 2 ;;
    --features) features="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --n) n="$2"; shift 2 ;;
    --nfe) nfe="$2"; shift 2 ;;
    --posthoc) posthoc="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "formulations.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for pair in "data:$data" "features:$features" "ref:$ref"; do
  [ -f "${pair#*:}" ] || { echo "formulations.sh: --${pair%%:*} '${pair#*:}' is not a file" >&2; exit 2; }
done
[[ "$steps" =~ ^[0-9]+$ && "$steps" -ge 250 ]] || { echo "formulations.sh: --steps must be an integer >= 250 (the configs warm up for 200)" >&2; exit 2; }
[[ "$nfe" =~ ^[0-9]+$ && "$nfe" -ge 3 ]] || { echo "formulations.sh: --nfe must be an integer >= 3" >&2; exit 2; }
data="$(realpath "$data")" features="$(realpath "$features")" ref="$(realpath "$ref")"
mkdir -p "$out"
[ -z "$(ls -A "$out")" ] || { echo "formulations.sh: $out is not empty (choose another --out)" >&2; exit 2; }
out="$(cd "$out" && pwd)"
export OMP_NUM_THREADS=1

# One rank with the configs' global batch (2 ranks x 32); the schedule spans --steps.
common=(--set "data.path=$data" --set "train.steps=$steps" --set train.batch_size=64
        --set log.sample_every=0 --set "checkpoint.every=$steps")
train() {  # name config
  /usr/bin/time -f '{"user_s": %U, "sys_s": %S, "wall_s": %e, "max_rss_kb": %M}' -o "$out/$1.time" \
    "$DIFFUSE_EXE" train -c "$here/configs/$2" --run-dir "$out/$1" "${common[@]}" >"$out/$1.log" 2>&1
}
echo "training ddpm and edm for $steps steps each, side by side (logs: $out/{ddpm,edm}.log)"
train ddpm mnist32.yaml & ddpm_pid=$!
train edm mnist32-edm.yaml & edm_pid=$!
status=0
wait "$ddpm_pid" || { echo "ddpm training failed: tail $out/ddpm.log" >&2; status=1; }
wait "$edm_pid" || { echo "edm training failed: tail $out/edm.log" >&2; status=1; }
[ "$status" -eq 0 ] || exit 1

heun_steps=$(( (nfe + 1) / 2 ))
{
  echo "ddpm|$out/ddpm|--sampler ddim --steps $nfe --eta 0"
  echo "heun|$out/edm|--sampler heun --steps $heun_steps"
  echo "dpmpp|$out/edm|--sampler dpmpp --steps $nfe"
  for s in ${posthoc//,/ }; do echo "posthoc-$s|$out/edm|--sampler heun --steps $heun_steps --posthoc-sigma-rel $s"; done
} >"$out/evals.txt"
evaluate() {  # "name|run|options"
  local name="${1%%|*}" rest="${1#*|}"
  local run="${rest%%|*}" options="${rest#*|}"
  # shellcheck disable=SC2086  # options are words
  if /usr/bin/time -f '{"user_s": %U, "sys_s": %S, "wall_s": %e}' -o "$out/eval-$name.time" \
       "$DIFFUSE_EXE" eval --ckpt "$run" --fid --features "$features" --ref "$ref" --n "$n" --seed 0 $options >"$out/eval-$name.log" 2>&1; then
    grep '^{' "$out/eval-$name.log" | tail -1 >"$out/eval-$name.json"
    echo "  $name: $(cat "$out/eval-$name.json")"
  else
    echo "evaluation $name failed: tail $out/eval-$name.log" >&2; return 1
  fi
}
export -f evaluate; export out DIFFUSE_EXE features ref n
echo "evaluating at about $nfe network evaluations per image, n=$n, two at a time"
tr '\n' '\0' <"$out/evals.txt" | xargs -0 -P 2 -I{} bash -c 'evaluate "$1"' _ {} \
  || echo "formulations.sh: an evaluation failed; results.json has the others" >&2

"$DIFFUSE_PYTHON" - "$out" "$steps" "$n" "$nfe" <<'EOF'
import json, pathlib, sys
out, steps, n, nfe = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def last_loss(run):
    rows = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "loss" in r]
    return rows[-1]["loss"] if rows else None
result = {"steps": steps, "global_batch": 64, "ranks": 1, "threads": 1, "n": n, "nfe_target": nfe,
          "training": {run: {**json.loads((out / f"{run}.time").read_text()), "final_loss": last_loss(run)}
                       for run in ("ddpm", "edm")},
          "evaluations": {}}
for line in (out / "evals.txt").read_text().splitlines():
    name, _, options = line.split("|")
    f = out / f"eval-{name}.json"
    if f.exists():
        result["evaluations"][name] = {"options": options, **json.loads(f.read_text()),
                                       **{"cost": json.loads((out / f"eval-{name}.time").read_text())}}
(out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps({k: v.get("fid") for k, v in result["evaluations"].items()}))
EOF
