#!/usr/bin/env bash
# launch/demo.sh: the README's main command. Sets up (if needed), builds, makes the built-in
# synthetic "shapes" dataset (32x32 coloured shapes on backgrounds), trains configs/demo.yaml on
# 2 MPI ranks on CPU (1600 steps of 8 images per rank, 10 minutes on an idle 2-core machine), then
# samples a grid from the EMA weights.
#
#   bash launch/demo.sh                 # everything
#   DEMO_STEPS=600 bash launch/demo.sh  # a shorter run
#
# Leaves: runs/demo/ (checkpoints, metrics.jsonl, samples/step-*.png, samples/real.png) and
# runs/demo/samples/final.png. Rerunning continues from the last checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$DIFFUSE_ROOT/launch/setup.sh"
cd "$DIFFUSE_ROOT"

ranks="${DEMO_RANKS:-2}"
data="datasets/shapes32.h5"
run="runs/demo"
if [ ! -f "$data" ]; then
  mkdir -p datasets
  "$DIFFUSE_EXE" prep --synthetic shapes --count 20000 --size 32 -o "$data"
fi
extra=()
if [ -n "${DEMO_STEPS:-}" ]; then extra+=(--set "train.steps=$DEMO_STEPS"); fi
say "training configs/demo.yaml on $ranks MPI ranks (CPU) into $run"
diffuse_mpirun "$ranks" "$DIFFUSE_EXE" train -c configs/demo.yaml --set "data.path=$data" \
  --run-dir "$run" --resume latest "${extra[@]}"
say "sampling 36 images from the EMA weights"
# sample never replaces an existing file unasked; a rerun of the demo redraws its own grid.
diffuse_mpirun "$ranks" "$DIFFUSE_EXE" sample --ckpt "$run/checkpoints/latest" --n 36 --steps 50 --seed 0 \
  --out "$run/samples/final.png" --overwrite
say "done. Samples: $run/samples/final.png (training images for comparison: $run/samples/real.png);"
say "grids during training: $run/samples/step-*.png; checkpoints: $run/checkpoints/; metrics: $run/metrics.jsonl"
