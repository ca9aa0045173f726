#!/usr/bin/env bash
# tests/launch/faults_test.sh SCENARIO [RANKS]: no job hangs, nothing is lost beyond the last
# checkpoint interval. Each scenario runs the real `diffuse train` (configs/tiny.yaml, CPU) under
# `mpirun -np RANKS`, breaks it one way, and checks how it ends: how fast, with which message, and
# what is left on disk. Each writes one row of the failure table (see README, "No hangs").
#
#   kill            SIGKILL one rank mid-run: every rank is gone within 60 s, mpirun names the
#                   killed rank; `--resume latest` continues from the last checkpoint
#   stall           one rank sleeps in its data loader (DIFFUSE_TEST_STALL_RANK): the others trip
#                   train.collective_timeout_s=5 with a message naming the operation
#   disk_full       the checkpoint filesystem (a tmpfs sized for one checkpoint) fills up: the
#                   error is reported, `latest` and its checkpoint stay intact, training stops
#   read_only       the checkpoint filesystem turns read-only mid-run, with
#                   checkpoint.stop_on_error=false: errors reported, training runs to the end
#   shard_fails     one rank's shard write fails (DIFFUSE_TEST_FAIL_CHECKPOINT_RANK): all ranks
#                   agree, the half-written checkpoint is removed, `latest` stays, training stops
#   oom             one rank runs out of memory (ulimit -v on that rank only): a message naming
#                   the rank and the batch size, and the job ends
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCENARIO="${1:?usage: faults_test.sh kill|stall|disk_full|read_only|shard_fails|oom [RANKS]}"
RANKS="${2:-2}"
EVERY=10  # checkpoint.every in every scenario: the most a failure may lose
make_dataset

# train RUN_DIR LOG [--set ...]: `diffuse train` in the background under mpirun; sets LAUNCHER_PID.
# Extra environment for the ranks goes in TRAIN_ENV (e.g. TRAIN_ENV=(DIFFUSE_TEST_STALL_RANK=1)).
TRAIN_ENV=()
WRAPPER=()
train_bg() {
  local run="$1" log="$2"
  shift 2
  env "${TRAIN_ENV[@]}" mpirun -np "$RANKS" --oversubscribe --bind-to none "${WRAPPER[@]}" "$EXE" train -c "$TINY" \
    --run-dir "$run" --set "data.path=$DATA" --set log.every=1 --set "checkpoint.every=$EVERY" "$@" \
    >"$log" 2>&1 &
  LAUNCHER_PID=$!
}

on_exit stop_leftovers

# resume_and_finish FROM: `--resume latest` continues from step FROM and trains 5 more steps.
resume_and_finish() {
  local from="$1" to=$(( $1 + 5 ))
  mpirun_n "$RANKS" "$EXE" train -c "$TINY" --run-dir "$RUN" --set "data.path=$DATA" --set log.every=1 \
    --set "checkpoint.every=$EVERY" --set "train.steps=$to" --resume latest >"$WORK/resume.log" 2>&1 \
    || { tail -n 30 "$WORK/resume.log"; fail "--resume latest failed"; }
  expect_in "$WORK/resume.log" "resumed from .*step-0*$from at step $from" "the resume from step $from"
  expect_in "$WORK/resume.log" "done: $to steps" "training to step $to"
  note "--resume latest continued from step $from to $to"
}

RUN="$WORK/run"
LOG="$WORK/train.log"
case "$SCENARIO" in
  kill)
    train_bg "$RUN" "$LOG" --set train.steps=100000
    # Mid-interval: past the checkpoint of step 20, towards the next one.
    wait_until 120 checkpoint_at_least "$(( 2 * EVERY ))" || { tail -n 30 "$LOG"; fail "no checkpoint at step $(( 2 * EVERY ))"; }
    wait_until 60 logged_at_least "$(( 2 * EVERY + EVERY / 2 ))" || fail "training stopped after step 20"
    victim_rank=$(( RANKS - 1 ))
    victim=$(rank_pids "$RUN" | awk -v r="$victim_rank" '$1 == r {print $2}')
    [ -n "$victim" ] || fail "rank $victim_rank not found among: $(rank_pids "$RUN")"
    kill -KILL "$victim"
    t=$(now)
    last=$(last_logged_step "$RUN")
    note "SIGKILL to rank $victim_rank (pid $victim) after step $last"
    wait_exit 60
    seconds=$(elapsed "$t")
    [ "$STATUS" -ne 0 ] || fail "mpirun exited 0 after a rank was killed"
    [ -z "$(rank_pids "$RUN")" ] || fail "ranks still alive after mpirun exited: $(rank_pids "$RUN")"
    expect_in "$LOG" "rank $victim_rank .*(signal 9|Killed)" "mpirun naming the killed rank"
    note "mpirun: $(grep -m1 -E "rank $victim_rank .*(signal 9|Killed)" "$LOG")"
    last=$(last_logged_step "$RUN")
    from=$(latest_step "$RUN")
    lost=$(( last - from ))
    [ "$lost" -le "$EVERY" ] || fail "lost $lost steps (last logged $last, latest $from), more than checkpoint.every=$EVERY"
    expect_latest_intact "$from"
    note "all $RANKS ranks gone ${seconds}s after the kill (exit $STATUS); $lost steps since checkpoint $from"
    resume_and_finish "$from"
    table_row "SIGKILL one rank (mpirun)" "$RANKS" "$seconds s" "$lost steps (last step $last, resumed at $from; interval $EVERY)"
    ;;

  stall)
    TRAIN_ENV=(DIFFUSE_TEST_STALL_RANK=1)
    train_bg "$RUN" "$LOG" --set train.steps=100000 --set train.collective_timeout_s=5
    wait_until 120 logged_at_least 3 || { tail -n 30 "$LOG"; fail "training did not reach step 3"; }
    wait_exit 90
    # Rank 1 stalls fetching its 4th batch: step 4 starts right after step 3's metrics line.
    seconds=$(elapsed "$(mtime "$RUN/metrics.jsonl")")
    [ "$STATUS" -ne 0 ] || fail "mpirun exited 0 although a rank was stuck"
    [ -z "$(rank_pids "$RUN")" ] || fail "ranks still alive after mpirun exited: $(rank_pids "$RUN")"
    expect_in "$LOG" "did not complete within 5000 ms" "the collective timeout"
    note "message: $(grep -m1 -oE 'MPI [^:]*did not complete within 5000 ms[^:]*' "$LOG")"
    last=$(last_logged_step "$RUN")
    [ "$last" -eq 3 ] || fail "expected the run to stop after step 3, last logged step $last"
    awk -v s="$seconds" 'BEGIN { exit !(s < 60) }' || fail "took ${seconds}s to end after the stall (timeout 5 s)"
    table_row "one rank stuck in its data loader (collective_timeout_s=5)" "$RANKS" "$seconds s" \
      "$last steps (stalled at step $(( last + 1 )) before the first checkpoint; interval $EVERY)"
    ;;

  disk_full | read_only)
    # A filesystem of our own for the checkpoints: a tmpfs mounted on RUN/checkpoints.
    mkdir -p "$RUN/checkpoints"
    mount -t tmpfs -o size=64m diffuse-test "$RUN/checkpoints" 2>"$WORK/mount.err" \
      || skip "cannot mount a tmpfs here ($(cat "$WORK/mount.err")): needs root; shard_fails covers the protocol"
    on_exit "umount -l '$RUN/checkpoints'"
    if [ "$SCENARIO" = disk_full ]; then
      # Sized from a real checkpoint of this run's configuration: room for one, not for two.
      mpirun_n "$RANKS" "$EXE" train -c "$TINY" --run-dir "$WORK/sizing" --set "data.path=$DATA" \
        --set "train.steps=$EVERY" >"$WORK/sizing.log" 2>&1 || { tail -n 20 "$WORK/sizing.log"; fail "sizing run"; }
      bytes=$(du -sb "$WORK/sizing/checkpoints/step-$(printf %06d "$EVERY")" | cut -f1)
      mount -o remount,size=$(( bytes * 3 / 2 )) "$RUN/checkpoints" || fail "cannot resize the tmpfs"
      note "checkpoints on a tmpfs of $(( bytes * 3 / 2 )) bytes; one checkpoint is $bytes bytes"
      train_bg "$RUN" "$LOG" --set train.steps=100000
      wait_exit 120
      seconds=$(elapsed "$(mtime "$RUN/metrics.jsonl")")  # the save starts after the step's metrics line
      [ "$STATUS" -ne 0 ] || fail "training went on with a full disk and checkpoint.stop_on_error=true"
      expect_in "$LOG" "[Nn]o space left on device" "the disk-full error"
      expect_in "$LOG" "step-0*$(( 2 * EVERY ))" "the checkpoint that failed named"
      note "error: $(grep -m1 -oE "[^]]*[Nn]o space left on device.{0,80}" "$LOG")"
      last=$(last_logged_step "$RUN")
      [ "$last" -eq $(( 2 * EVERY )) ] || fail "training should stop at the failed checkpoint (step $(( 2 * EVERY ))), last step $last"
      expect_latest_intact "$EVERY"
      mount -o remount,size=64m "$RUN/checkpoints" || fail "cannot grow the tmpfs"  # the user frees space
      resume_and_finish "$EVERY"
      table_row "disk full while checkpointing (stop_on_error=true)" "$RANKS" "$seconds s" \
        "$(( last - EVERY )) steps (failed save of step $last, latest stays $EVERY; interval $EVERY)"
    else
      train_bg "$RUN" "$LOG" --set train.steps=200 --set checkpoint.stop_on_error=false
      wait_until 120 checkpoint_at_least "$EVERY" || { tail -n 30 "$LOG"; fail "no first checkpoint"; }
      mount -o remount,ro "$RUN/checkpoints" || fail "cannot make the tmpfs read-only"
      good=$(latest_step "$RUN")
      note "checkpoint filesystem read-only after step $good"
      wait_exit 120
      [ "$STATUS" -eq 0 ] || { tail -n 30 "$LOG"; fail "training must finish (checkpoint.stop_on_error=false), exit $STATUS"; }
      expect_in "$LOG" "checkpoint at step [0-9]+ failed, training continues" "the reported failure"
      expect_in "$LOG" "[Rr]ead-only file system" "the cause"
      expect_in "$LOG" "done: 200 steps" "training to the end"
      failures=$(grep -c "\[rank 0\].*failed, training continues" "$LOG")  # every rank reports it
      note "error: $(grep -m1 -oE "checkpoint at step [0-9]+ failed.{0,160}" "$LOG")"
      mount -o remount,rw "$RUN/checkpoints"
      expect_latest_intact "$good"
      table_row "checkpoint filesystem turns read-only (stop_on_error=false)" "$RANKS" \
        "runs on to the end (exit 0)" "$failures saves failed and were reported; latest stays $good (200 steps trained)"
    fi
    ;;

  shard_fails)
    # Rank 1's shard of the step-20 checkpoint fails after it is written: every rank must agree
    # that the save failed, remove the half-made checkpoint, and leave latest at step 10.
    TRAIN_ENV=(DIFFUSE_TEST_FAIL_CHECKPOINT_RANK=1 "DIFFUSE_TEST_FAIL_CHECKPOINT_STEP=$(( 2 * EVERY ))")
    train_bg "$RUN" "$LOG" --set train.steps=100000
    wait_exit 120
    seconds=$(elapsed "$(mtime "$RUN/metrics.jsonl")")  # the save starts after the step's metrics line
    [ "$STATUS" -ne 0 ] || fail "training went on after a failed checkpoint with checkpoint.stop_on_error=true"
    expect_in "$LOG" "test hook DIFFUSE_TEST_FAIL_CHECKPOINT_RANK=1" "rank 1's failure, reported"
    note "error: $(grep -m1 -oE "saving checkpoint step.{0,250}" "$LOG")"
    last=$(last_logged_step "$RUN")
    [ ! -e "$RUN/checkpoints/step-$(printf %06d $(( 2 * EVERY )))" ] || fail "the failed checkpoint was left behind"
    expect_latest_intact "$EVERY"
    resume_and_finish "$EVERY"
    table_row "one rank's checkpoint shard fails (stop_on_error=true)" "$RANKS" "$seconds s" \
      "$(( last - EVERY )) steps (failed save of step $last, latest stays $EVERY; interval $EVERY)"
    ;;

  oom)
    # Rank 1 gets an address-space limit (ulimit -v) with room for a batch of 2, not 48. The
    # limit is measured, not guessed: the peak of this very configuration at batch 2, plus 160 MiB
    # (a batch of 48 needs about 500 MiB more; model.dim=64 makes the gap wide).
    cat >"$WORK/limit-rank.sh" <<'WRAP'
#!/usr/bin/env bash
# Runs the command with an address-space limit on rank $OOM_RANK only (OpenMPI's rank variable).
if [ "${OMPI_COMM_WORLD_RANK:-}" = "${OOM_RANK:-}" ] && [ -n "${OOM_LIMIT_KB:-}" ]; then ulimit -v "$OOM_LIMIT_KB"; fi
exec "$@"
WRAP
    chmod +x "$WORK/limit-rank.sh"
    WRAPPER=("$WORK/limit-rank.sh")
    train_bg "$WORK/calibrate" "$WORK/calibrate.log" --set train.steps=100000 --set model.dim=64 --set train.batch_size=2
    RUN="$WORK/calibrate"
    wait_until 120 logged_at_least 5 || { tail -n 20 "$WORK/calibrate.log"; fail "calibration run did not train"; }
    pid=$(rank_pids "$RUN" | awk '$1 == 1 {print $2}')
    peak_kb=$(awk '/VmPeak/ {print $2}' "/proc/$pid/status")
    kill -KILL "$LAUNCHER_PID"; wait "$LAUNCHER_PID" 2>/dev/null
    limit_kb=$(( peak_kb + 160 * 1024 ))
    note "rank 1 peaks at $(( peak_kb / 1024 )) MiB of address space at batch 2: limit $(( limit_kb / 1024 )) MiB"
    RUN="$WORK/run"
    TRAIN_ENV=(OOM_RANK=1 "OOM_LIMIT_KB=$limit_kb")
    train_bg "$RUN" "$LOG" --set train.steps=100000 --set model.dim=64 --set train.batch_size=48
    wait_exit 120
    failed_at=$(log_time "$LOG" "out of memory on rank") || fail "no out-of-memory message in $LOG"
    seconds=$(elapsed "$failed_at")
    [ "$STATUS" -ne 0 ] || fail "the job went on although rank 1 ran out of memory"
    [ -z "$(rank_pids "$RUN")" ] || fail "ranks still alive after mpirun exited: $(rank_pids "$RUN")"
    expect_in "$LOG" "out of memory on rank 1 of 2 .*train.batch_size=48" "a message naming the rank and the batch size"
    note "message: $(grep -m1 -oE "out of memory on rank 1.{0,250}" "$LOG")"
    last=$(last_logged_step "$RUN")
    table_row "out of memory on one rank (ulimit -v on rank 1, batch 48)" "$RANKS" "$seconds s" \
      "$last steps (fails in step 1; nothing to lose)"
    ;;

  *) fail "unknown scenario '$SCENARIO'" ;;
esac
note "PASS"
