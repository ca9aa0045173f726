# tests/launch/common.sh: shared by the launcher tests (sourced). They drive the real `diffuse`
# CLI and the real launch/ scripts on tiny CPU runs; ctest sets DIFFUSE_EXE, DIFFUSE_SOURCE_DIR
# and, for the failure table, DIFFUSE_FAULT_TABLE_DIR.
set -uo pipefail

SKIP=77  # ctest's SKIP_RETURN_CODE for these tests
EXE="${DIFFUSE_EXE:?run through ctest (DIFFUSE_EXE names the built diffuse)}"
SRC="${DIFFUSE_SOURCE_DIR:?run through ctest (DIFFUSE_SOURCE_DIR names the source tree)}"
TINY="$SRC/configs/tiny.yaml"
export OMP_NUM_THREADS=1
# OpenMPI refuses root unless told twice; the tests run as root in CI.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

T0=$(date +%s.%N)
# Seconds since a now() value, one decimal (awk: bc is not on every machine).
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
note() { printf '[%6ss] %s\n' "$(elapsed "$T0")" "$*"; }
# fail MESSAGE: ends the test; a script may define on_failure (e.g. to print daemon logs).
fail() {
  note "FAIL: $*"
  declare -F on_failure >/dev/null && on_failure
  exit 1
}
skip() { note "SKIP: $*"; exit "$SKIP"; }
now() { date +%s.%N; }

# A fresh work folder, removed at exit (cleanup hooks run first, in order of registration);
# DIFFUSE_LAUNCH_KEEP=1 keeps it for a post-mortem.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/diffuse-launch-XXXXXX")"
_cleanups=()
on_exit() { _cleanups+=("$1"); }
_run_cleanups() {
  local status=$? c
  for c in "${_cleanups[@]}"; do eval "$c" || true; done
  if [ "${DIFFUSE_LAUNCH_KEEP:-0}" = 1 ]; then note "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$status"
}
trap _run_cleanups EXIT
trap 'exit 143' TERM  # ctest's timeout: clean up too
trap 'exit 130' INT

# mpirun with the flags these shared 2-core machines need (what tests/support.h's mpirun() adds).
mpirun_n() {
  local n="$1"; shift
  mpirun -np "$n" --oversubscribe --bind-to none "$@"
}

# The tiny synthetic dataset every scenario trains on (96 shapes, 16x16).
make_dataset() {
  DATA="$WORK/shapes16.h5"
  "$EXE" prep --synthetic shapes --count 96 --size 16 -o "$DATA" >"$WORK/prep.log" 2>&1 \
    || { cat "$WORK/prep.log"; fail "diffuse prep failed"; }
}

# The step of the last metrics.jsonl line of a run (0 when there is none).
last_logged_step() {
  local line
  line="$(tail -n 1 "$1/metrics.jsonl" 2>/dev/null)"
  [[ "$line" =~ \"step\":\ ([0-9]+) ]] && echo "${BASH_REMATCH[1]}" || echo 0
}

# The step `latest` points at (-1 when there is no checkpoint).
latest_step() {
  local target
  target="$(readlink "$1/checkpoints/latest" 2>/dev/null)" || { echo -1; return; }
  [[ "$target" =~ step-0*([0-9]+)$ ]] && echo "$((10#${BASH_REMATCH[1]:-0}))" || echo -1
}

# Epoch seconds of the first log line matching REGEX in FILE (spdlog's "[YYYY-MM-DD HH:MM:SS.mmm]").
log_time() {
  local stamp
  stamp="$(grep -m1 -E -- "$2" "$1" | grep -oE '^\[[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:.]+\]' | tr -d '[]')"
  [ -n "$stamp" ] && date -d "$stamp" +%s.%N
}

# Epoch seconds of a file's last modification.
mtime() { stat -c %.3Y "$1"; }

# wait_until SECONDS COMMAND...: polls COMMAND every 0.2 s; fails when it never succeeds.
wait_until() {
  local limit="$1" start
  shift
  start=$(now)
  until "$@"; do
    awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }' && return 1
    sleep 0.2
  done
}

# PIDs of the diffuse processes whose command line contains MARKER, one "rank pid" per line,
# the rank read from the launcher's environment (OpenMPI, Slurm or PMIx).
rank_pids() {
  local marker="$1" pid environ rank
  for pid in $(pgrep -x diffuse); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker" || continue
    environ="$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null)"
    rank="$(grep -m1 -E '^(OMPI_COMM_WORLD_RANK|SLURM_PROCID|PMIX_RANK)=' <<<"$environ" | cut -d= -f2)"
    [ -n "$rank" ] && echo "$rank $pid"
  done | sort -n
}

# table_row SCENARIO RANKS SECONDS LOST: one row of the failure table (README, "No hangs").
table_row() {
  local row="| $1 | $2 | $3 | $4 |"
  note "TABLE $row"
  if [ -n "${DIFFUSE_FAULT_TABLE_DIR:-}" ]; then
    mkdir -p "$DIFFUSE_FAULT_TABLE_DIR"
    echo "$row" >"$DIFFUSE_FAULT_TABLE_DIR/$(echo "$1-$2" | tr -c 'A-Za-z0-9\n' '_').row"
  fi
}

expect_in() {  # expect_in FILE REGEX WHAT
  grep -qE -- "$2" "$1" || { note "--- $1"; tail -n 40 "$1"; fail "expected $3 (/$2/) in $1"; }
}

# --- A training job in the background: a script starts its launcher with `&`, sets LAUNCHER_PID,
# and names its run directory RUN and console log LOG.

# For on_exit, whatever a failed scenario left running: the ranks (every diffuse process whose
# command line names a run in WORK: only ours) and the launchers that are still this shell's jobs.
stop_leftovers() {
  local rank pid
  while read -r rank pid; do [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null; done < <(rank_pids "$WORK/")
  for pid in $(jobs -p); do kill -KILL "$pid" 2>/dev/null; done
}
# Running (a zombie, exited but not reaped, is not).
alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [ "${stat%% *}" != "Z" ]
}
launcher_done() { ! alive "$LAUNCHER_PID"; }

# wait_exit LIMIT: waits for the launcher to exit (at most LIMIT s); sets STATUS.
wait_exit() {
  if ! wait_until "$1" launcher_done; then
    note "still running after $1 s: $(rank_pids "$RUN")"
    kill -KILL "$LAUNCHER_PID"
    wait "$LAUNCHER_PID"
    tail -n 40 "$LOG"
    fail "the job did not end within $1 s"
  fi
  wait "$LAUNCHER_PID"
  STATUS=$?
}

checkpoint_at_least() { [ "$(latest_step "$RUN")" -ge "$1" ]; }
logged_at_least() { [ "$(last_logged_step "$RUN")" -ge "$1" ]; }

# `diffuse inspect` verifies the manifest's sizes and SHA-256s of the checkpoint `latest` names.
expect_latest_intact() {
  local expected="$1"
  [ "$(latest_step "$RUN")" -eq "$expected" ] || fail "latest names step $(latest_step "$RUN"), expected $expected"
  "$EXE" inspect "$RUN/checkpoints/latest" >"$WORK/inspect.log" 2>&1 \
    || { cat "$WORK/inspect.log"; fail "checkpoint latest (step $expected) is damaged"; }
  local leftover
  leftover="$(find "$RUN/checkpoints" -mindepth 1 -maxdepth 1 ! -name latest ! -name 'step-*' | head -n 3)"
  [ -z "$leftover" ] || note "left in checkpoints/ (not checkpoints, ignored by --resume): $leftover"
  local d
  for d in "$RUN"/checkpoints/step-*; do
    case "$d" in
      # A save interrupted by the kill leaves its working folder; the next save removes it and
      # --resume never reads it. Only published step folders must be complete.
      *.tmp|*.trash|*.old) note "in-flight save left behind (ignored by --resume, removed by the next save): $d"; continue ;;
    esac
    [ -f "$d/manifest.json" ] || fail "$d looks like a checkpoint but has no manifest (half-written)"
  done
}
