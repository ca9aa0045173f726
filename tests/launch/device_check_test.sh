#!/usr/bin/env bash
# tests/launch/device_check_test.sh: the CPU rehearsal of the GPU-machine check (issue 14):
# `launch/device-check.sh pack --rehearse` into a scratch folder, then `run --rehearse` on it, so
# every line the device will run has run here (pack's binaries and unpacked debs, the offline
# wheel install, each part on its CPU stand-in, the report). About a minute on 2 cores once pack's
# downloads are cached ($DIFFUSE_CACHE/device-pack); skips (77) when they cannot be fetched.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

script="$SRC/launch/device-check.sh"
build_dir="${DIFFUSE_BUILD_DIR:-$(dirname "$(dirname "$EXE")")}"

bash "$script" pack --rehearse --build-dir "$build_dir" --out "$WORK/pack" >"$WORK/pack.log" 2>&1
rc=$?
[ "$rc" != 3 ] || { cat "$WORK/pack.log"; skip "pack could not download its Debian packages or wheels (offline?)"; }
[ "$rc" = 0 ] || { cat "$WORK/pack.log"; fail "device-check.sh pack exited $rc"; }
size_line="$(grep '^pack size: ' "$WORK/pack.log")" || { cat "$WORK/pack.log"; fail "pack printed no size"; }
note "$size_line"
mib="$(echo "$size_line" | sed -E 's/.*\(([0-9]+) MiB of the ([0-9]+) MiB limit.*/\1/')"
[ "$mib" -le 60 ] || fail "the pack is $mib MiB, over 60"
for f in bin/diffuse bin/step_bench bin/dist_test manifest.json; do
  [ -e "$WORK/pack/$f" ] || fail "the pack lacks $f"
done
compgen -G "$WORK/pack/wheels/denoising_diffusion_pytorch-2.3.1-*.whl" >/dev/null || fail "no reference wheel in the pack"
compgen -G "$WORK/pack/debs/libopenmpi3_*.deb" >/dev/null || fail "no OpenMPI runtime in the pack"

bash "$script" run --rehearse --pack "$WORK/pack" --work "$WORK/run" --out "$WORK/results" >"$WORK/run.log" 2>&1
rc=$?
cat "$WORK/results/table.txt" 2>/dev/null || cat "$WORK/run.log"
[ "$rc" = 0 ] || { cat "$WORK/run.log"; fail "device-check.sh run --rehearse exited $rc"; }
for f in summary.json table.txt console.log logs.tar.gz; do
  [ -s "$WORK/results/$f" ] || fail "run left no $f"
done
for p in setup doctor cuda_tests dist_np2 e2e step_bench reference_eager reference_compile batch_search; do
  grep -qE "^$p +ok " "$WORK/results/table.txt" || fail "part $p is not ok in the table"
done
grep -q "diffuse/reference" "$WORK/results/table.txt" || fail "the table has no diffuse/reference ratio"
note "rehearsal ok"
