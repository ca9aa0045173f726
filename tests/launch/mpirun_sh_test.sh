#!/usr/bin/env bash
# tests/launch/mpirun_sh_test.sh: launch/mpirun.sh prints the mpirun command it runs (with the
# root flag only as root, oversubscription when ranks exceed cores), starts one world of N ranks
# (`diffuse doctor` reports every rank), passes DIFFUSE_* variables to the ranks, and refuses a
# bad rank count or host list. A rank that refuses its world ends the job instead of hanging it.
# (Across nodes, -H nodeA:2,nodeB:2: netns_test.sh mpirun.)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

mpirun_sh="$SRC/launch/mpirun.sh"
export DIFFUSE_BUILD_DIR="${DIFFUSE_BUILD_DIR:-$(dirname "$(dirname "$EXE")")}"
cores=$(getconf _NPROCESSORS_ONLN)
ranks=$(( cores + 1 ))  # more ranks than cores: the wrapper must oversubscribe

DIFFUSE_LAUNCH_PROBE=passed-through bash "$mpirun_sh" -n "$ranks" -- doctor >"$WORK/doctor.out" 2>&1 \
  || { cat "$WORK/doctor.out"; fail "launch/mpirun.sh -n $ranks -- doctor"; }
expect_in "$WORK/doctor.out" "^\+ mpirun -np $ranks " "the printed mpirun command"
expect_in "$WORK/doctor.out" "--oversubscribe" "oversubscription for $ranks ranks on $cores cores"
expect_in "$WORK/doctor.out" "-x DIFFUSE_LAUNCH_PROBE" "DIFFUSE_* variables passed to the ranks"
if [ "$(id -u)" -eq 0 ]; then
  expect_in "$WORK/doctor.out" "--allow-run-as-root" "the root flag (running as root)"
elif grep -q -- "--allow-run-as-root" "$WORK/doctor.out"; then
  fail "--allow-run-as-root added for a non-root user"
fi
for ((r = 0; r < ranks; ++r)); do
  expect_in "$WORK/doctor.out" "diffuse doctor: rank $r\$" "rank $r's report"
done
expect_in "$WORK/doctor.out" "rank +$(( ranks - 1 )) of $ranks" "one world of $ranks ranks"
[ "$(grep -c 'verdict *usable' "$WORK/doctor.out")" -eq "$ranks" ] || fail "every rank usable"

# A rank whose launcher meant another world (OMPI_COMM_WORLD_SIZE changed on rank 1 only) refuses
# to start: its message shows and mpirun ends the job within seconds. Before, that rank waited in
# MPI_Finalize for rank 0, which waited for it in the doctor's gather: silent until killed.
started=$(now)
timeout 60 mpirun -np 2 --oversubscribe --bind-to none \
  bash -c '[ "$OMPI_COMM_WORLD_RANK" = 1 ] && export OMPI_COMM_WORLD_SIZE=3; exec "$1" doctor' _ "$EXE" \
  >"$WORK/refused.out" 2>&1
status=$?
[ "$status" -ne 124 ] || { cat "$WORK/refused.out"; fail "a rank refusing the world left the job hanging (60 s)"; }
[ "$status" -ne 0 ] || fail "rank 1 accepted a world of 2 while its launcher meant 3"
expect_in "$WORK/refused.out" "started 3 tasks \(OMPI_COMM_WORLD_SIZE=3\) but MPI sees a world of 2" "rank 1's refusal"
note "one rank refusing the world: job ended in $(elapsed "$started") s (exit $status) with its message"

if bash "$mpirun_sh" -n zero -- doctor >"$WORK/bad.out" 2>&1; then fail "-n zero accepted"; fi
expect_in "$WORK/bad.out" "positive number of ranks" "the rank-count error"
if bash "$mpirun_sh" -n 2 -H "$WORK/no such hostfile" -- doctor >"$WORK/badhosts.out" 2>&1; then fail "a missing hostfile accepted"; fi
expect_in "$WORK/badhosts.out" "-H expects a hostfile or HOST:SLOTS" "the -H error"
if bash "$mpirun_sh" -n 2 >"$WORK/none.out" 2>&1; then fail "no subcommand accepted"; fi
expect_in "$WORK/none.out" "usage" "the usage line"
note "PASS"
