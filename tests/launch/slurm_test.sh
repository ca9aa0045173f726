#!/usr/bin/env bash
# tests/launch/slurm_test.sh: the Slurm launchers on a real (private, one-node) Slurm cluster.
#
#  1. `diffuse doctor` under `srun --mpi=pmix -n 2` reports both ranks as one world; without
#     --mpi=pmix the tasks do not start a world at all (OpenMPI refuses, pointing at PMIx).
#  2. Preemption: the real launch/slurm/train.sbatch (2 tasks, CPU, configs/tiny.yaml) is sent
#     `scancel --signal=USR1 --batch` mid-run; the ranks checkpoint and exit 0, the script
#     requeues the job, the requeued job resumes from `latest` and finishes with the same online
#     and EMA weights, byte for byte, as an uninterrupted `mpirun -np 2` run. Once with the ranks
#     started by srun --mpi=pmix, once by mpirun inside the allocation (LAUNCHER=mpirun).
#     Then sample.sbatch samples from the result on 2 ranks.
#     `scancel` (SIGTERM): the script forwards it, the ranks checkpoint, the job is not requeued.
#  3. A rank killed (SIGKILL) inside the job: srun --kill-on-bad-exit ends the other rank, the
#     job fails (no requeue) within 60 s, and the log names the task.
#
# `slurm_test.sh two-nodes`: the same on two nodes (tests/launch/netns_cluster.sh: network + UTS
# namespaces, slurmctld on nodeA, a slurmd on each): doctor under `srun --mpi=pmix -N 2` places
# ranks 0,1 on nodeA and 2,3 on nodeB, under `mpirun` inside `salloc -N 2` all 4 ranks see one
# world (OMPI_COMM_WORLD_SIZE=4), and the preemption cycle (2 above) runs train.sbatch with
# --nodes=2 --ntasks-per-node=2, once with srun --mpi=pmix and once with LAUNCHER=mpirun (OpenMPI
# starts its daemon on nodeB through srun), each against an uninterrupted 2 x 2 mpirun run. Ranks
# talk over TCP across the nodes' links (OMPI_MCA_btl=tcp,self).
#
# Skips (exit 77) only when the cluster cannot start (no Slurm installed, not root, no
# namespaces); the reason is printed. launch/test.sh installs Slurm, so in CI this runs. About 2.5
# minutes on 2 cores (two-nodes: about 3; 9.5 when the 2 cores also run a 2-rank training).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/slurm_cluster.sh"
source "$(dirname "${BASH_SOURCE[0]}")/netns_cluster.sh"

MODE="${1:-one-node}"
case "$MODE" in
  one-node) NODES=1; STEPS=${SLURM_TEST_STEPS:-200} ;;
  two-nodes) NODES=2; STEPS=${SLURM_TEST_STEPS:-80} ;;  # 4 ranks on 2 cores: slower steps
  *) fail "usage: slurm_test.sh [one-node|two-nodes]" ;;
esac
RANKS=$(( 2 * NODES ))
# Identical training arguments for the Slurm job and the uninterrupted reference.
TRAIN_ARGS=(--set "data.path=$WORK/shapes16.h5" --set "train.steps=$STEPS" --set log.every=5
            --set checkpoint.every=50)

on_exit slurm_cluster_stop
on_exit netns_cluster_stop  # after Slurm's: its commands run on nodeA
on_failure() {
  local f
  for f in "$WORK"/cluster/log/slurmctld.log "$WORK"/cluster/log/slurmd-*.log; do
    [ -f "$f" ] && { echo "--- $f (last 25 lines)"; tail -n 25 "$f"; }
  done
}
if [ "$NODES" -gt 1 ]; then
  netns_cluster_start "$WORK/nodes" "$NODES" || skip "no namespace cluster: $NETNS_CLUSTER_ERROR"
  export OMPI_MCA_btl=tcp,self
  slurm_cluster_start "$WORK/cluster" "${NETNS_NODES[@]}" || skip "no Slurm cluster: $SLURM_CLUSTER_ERROR"
else
  slurm_cluster_start "$WORK/cluster" || skip "no Slurm cluster: $SLURM_CLUSTER_ERROR"
fi
note "Slurm up: $(slurm_client sinfo -h -o '%P %D %c %T')  (SLURM_CONF=$SLURM_CONF)"
# Slurm's commands where the controller is reachable (nodeA's namespace with two nodes).
sbatch() { slurm_client sbatch "$@"; }
scontrol() { slurm_client scontrol "$@"; }
scancel() { slurm_client scancel "$@"; }
cd "$WORK" || fail "cannot enter $WORK"
make_dataset

# --- 1. doctor under srun ---------------------------------------------------------------------
slurm_client timeout 120 srun --mpi=pmix -N "$NODES" --ntasks-per-node=2 "$EXE" doctor >"$WORK/doctor.out" 2>&1 \
  || { cat "$WORK/doctor.out"; fail "doctor under srun --mpi=pmix"; }
for ((r = 0; r < RANKS; ++r)); do expect_in "$WORK/doctor.out" "diffuse doctor: rank $r" "rank $r's report"; done
expect_in "$WORK/doctor.out" "rank +$(( RANKS - 1 )) of $RANKS" "rank $(( RANKS - 1 )) of a world of $RANKS"
expect_in "$WORK/doctor.out" "SLURM_NTASKS=$RANKS" "the launcher's world size"
[ "$(grep -c 'verdict *usable' "$WORK/doctor.out")" -eq "$RANKS" ] || { cat "$WORK/doctor.out"; fail "every rank usable"; }
if [ "$NODES" -gt 1 ]; then
  # Each rank's block starts "diffuse doctor: rank N".
  awk '/diffuse doctor: rank/ {r = $NF} /^ *host / {print r, $2} /^ *local rank / {print r, "local", $3}' \
    "$WORK/doctor.out" | sort >"$WORK/placement"
  printf '%s\n' "0 local 0" "0 nodeA" "1 local 1" "1 nodeA" "2 local 0" "2 nodeB" "3 local 1" "3 nodeB" | sort \
    | diff - "$WORK/placement" || { cat "$WORK/doctor.out"; fail "ranks 0,1 on nodeA and 2,3 on nodeB, local ranks 0,1 on each"; }
  note "doctor under srun --mpi=pmix -N 2: ranks 0,1 on nodeA, 2,3 on nodeB, local ranks 0,1 on each"
  # mpirun inside the allocation starts its daemon on nodeB with srun: the ranks there inherit
  # that step's SLURM_NTASKS=1 and must still count the world of 4 (before, they refused it and
  # hung in MPI_Finalize, silently).
  slurm_client timeout 120 salloc -N 2 --ntasks-per-node=2 mpirun -np "$RANKS" --bind-to none "$EXE" doctor \
    >"$WORK/doctor-mpirun.out" 2>&1 || { cat "$WORK/doctor-mpirun.out"; fail "doctor under mpirun inside salloc -N 2"; }
  [ "$(grep -c "launcher *OMPI_COMM_WORLD_SIZE=$RANKS" "$WORK/doctor-mpirun.out")" -eq "$RANKS" ] \
    && [ "$(grep -c 'verdict *usable' "$WORK/doctor-mpirun.out")" -eq "$RANKS" ] \
    || { cat "$WORK/doctor-mpirun.out"; fail "every rank usable, with launcher OMPI_COMM_WORLD_SIZE=$RANKS, under mpirun"; }
  note "doctor under mpirun inside salloc -N 2: $RANKS ranks, one world"
fi
if [ "$NODES" -eq 1 ]; then
  if slurm_client timeout 120 srun --mpi=none -n 2 "$EXE" doctor >"$WORK/doctor-nopmix.out" 2>&1; then
    cat "$WORK/doctor-nopmix.out"; fail "doctor must fail when srun starts 2 worlds of one (no --mpi=pmix)"
  fi
  expect_in "$WORK/doctor-nopmix.out" "[Pp][Mm][Ii][Xx]" "the advice to use PMIx"
  note "doctor: both ranks report under srun --mpi=pmix; --mpi=none is refused"
fi

# --- 2. preemption: USR1 -> checkpoint -> requeue -> resume -------------------------------------
# The reference: the same run, never interrupted.
if [ "$NODES" -gt 1 ]; then
  on_node nodeA mpirun -np "$RANKS" --host nodeA:2,nodeB:2 --bind-to none "$EXE" train -c "$TINY" \
    --run-dir "$WORK/reference" "${TRAIN_ARGS[@]}" >"$WORK/reference.log" 2>&1
else
  mpirun_n 2 "$EXE" train -c "$TINY" --run-dir "$WORK/reference" "${TRAIN_ARGS[@]}" >"$WORK/reference.log" 2>&1
fi || { tail -n 30 "$WORK/reference.log"; fail "uninterrupted reference run"; }
note "reference: $STEPS steps uninterrupted under mpirun, $NODES node(s) x 2 ranks"

# submit RUN_DIR [train args...]: the real train.sbatch, its #SBATCH lines overridden for a 2-core box.
submit() {
  local run_dir="$1"
  shift
  CONFIG="$TINY" RUN_DIR="$run_dir" DIFFUSE_EXE="$EXE" DIFFUSE_ROOT="$SRC" LAUNCHER="${LAUNCHER:-srun}" \
    sbatch --parsable --chdir="$WORK" --output="$WORK/slurm-%j.out" --nodes="$NODES" --ntasks-per-node=2 \
    --cpus-per-task=1 --gpus-per-node=0 --time=5 "$SRC/launch/slurm/train.sbatch" "$@"
}
job_field() { scontrol show job "$1" 2>/dev/null | grep -oE "(^| )$2=[^ ]*" | head -n 1 | cut -d= -f2; }
has_metrics() { [ -s "$1/metrics.jsonl" ]; }
job_state_is() { [ "$(job_field "$1" JobState)" = "$2" ]; }

# preempt_and_resume LAUNCHER: the whole preemption cycle with train.sbatch's LAUNCHER (srun|mpirun).
preempt_and_resume() {
  local launcher="$1" run="$WORK/preempted-$1" job log signalled stop_seconds stopped_at weights r
  job=$(LAUNCHER="$launcher" submit "$run" "${TRAIN_ARGS[@]}") || fail "sbatch refused the job"
  log="$WORK/slurm-$job.out"
  note "submitted job $job (LAUNCHER=$launcher)"
  wait_until 90 has_metrics "$run" || { cat "$log"; fail "job $job: training did not start in 90 s"; }
  scancel --signal=USR1 --batch "$job" || fail "scancel --signal=USR1 --batch $job"
  signalled=$(now)
  note "sent USR1 to the batch script at step $(last_logged_step "$run")"
  requeued() { [ "$(job_field "$job" Restarts)" = 1 ] && [[ "$(job_field "$job" JobState)" =~ ^(PENDING|REQUEUED)$ ]]; }
  wait_until 60 requeued || { scontrol show job "$job"; cat "$log"; fail "job $job was not requeued within 60 s"; }
  stop_seconds=$(elapsed "$signalled")
  expect_in "$log" "stop signal received: checkpointed step [0-9]+" "the ranks' checkpoint on USR1"
  expect_in "$log" "requeued job $job" "the script's requeue"
  stopped_at=$(grep -oE "checkpointed step [0-9]+" "$log" | tail -n 1 | grep -oE "[0-9]+$")
  [ "$stopped_at" -lt "$STEPS" ] || fail "the job finished before the signal (step $stopped_at of $STEPS): raise SLURM_TEST_STEPS"
  [ "$(latest_step "$run")" -eq "$stopped_at" ] || fail "latest is step $(latest_step "$run"), expected $stopped_at"
  note "job $job requeued ${stop_seconds}s after USR1 (state $(job_field "$job" JobState), Restarts=1), checkpointed step $stopped_at"

  # The requeued job waits for its BeginTime: cred_expire + 1 s after the requeue (the cluster sets
  # cred_expire=10; 120 s by default). Moving it earlier with `scontrol update StartTime=now` would
  # race the revoked credential of its first run on the node ("Job credential revoked").
  note "requeued job $job begins at $(job_field "$job" StartTime)"
  wait_until 120 job_state_is "$job" COMPLETED || { scontrol show job "$job"; cat "$log"; fail "requeued job $job did not complete"; }
  [ "$(job_field "$job" ExitCode)" = "0:0" ] || fail "job $job exit code $(job_field "$job" ExitCode)"
  expect_in "$log" "\(restart 1\)" "the second start of the batch script"
  expect_in "$log" "resumed from .*step-0*$stopped_at at step $stopped_at" "the resume from the preemption checkpoint"
  expect_in "$log" "done: $STEPS steps" "the end of training"
  for weights in online ema; do
    for r in reference "preempted-$launcher"; do
      "$EXE" export --ckpt "$WORK/$r/checkpoints/latest" --weights "$weights" --out "$WORK/$r-$weights.safetensors" --overwrite \
        >"$WORK/export.log" 2>&1 || { cat "$WORK/export.log"; fail "export $r $weights"; }
    done
    cmp "$WORK/reference-$weights.safetensors" "$WORK/preempted-$launcher-$weights.safetensors" \
      || fail "$weights weights after preemption + requeue ($launcher) differ from the uninterrupted run"
  done
  note "requeued job resumed at step $stopped_at, finished $STEPS steps; online and EMA weights identical to the uninterrupted run"
  local where=""; [ "$NODES" -gt 1 ] && where=", $NODES nodes"
  table_row "preemption: USR1 to train.sbatch, checkpoint, requeue, resume (Slurm, LAUNCHER=$launcher$where)" "$RANKS" \
    "${stop_seconds} s to checkpoint and requeue" "0 steps (stopped and resumed at step $stopped_at)"
}
preempt_and_resume srun
# On two nodes mpirun starts its daemon on nodeB with srun, so the ranks there inherit that
# step's SLURM_NTASKS=1: they must still count the world from OpenMPI's variables.
preempt_and_resume mpirun
# The rest (sample.sbatch, scancel, a killed rank) does not depend on the number of nodes.
if [ "$NODES" -gt 1 ]; then note "PASS"; exit 0; fi

# --- sample.sbatch on the finished run --------------------------------------------------------------
CKPT="$WORK/preempted-srun/checkpoints/latest" N=5 STEPS=2 OUT="$WORK/samples.h5" DIFFUSE_EXE="$EXE" \
  sbatch --wait --chdir="$WORK" --output="$WORK/sample-job.out" --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 \
  --gpus-per-node=0 --time=5 "$SRC/launch/slurm/sample.sbatch" >"$WORK/sample-submit.out" 2>&1 \
  || { cat "$WORK/sample-submit.out" "$WORK/sample-job.out"; fail "sample.sbatch job failed"; }
[ -s "$WORK/samples.h5" ] && [ "$(head -c 4 "$WORK/samples.png" | tail -c 3)" = PNG ] \
  || { cat "$WORK/sample-job.out"; fail "sample.sbatch wrote no samples.h5 / samples.png"; }
expect_in "$WORK/sample-job.out" "^0: .*wrote .*samples.h5 \(images: uint8 \[5, 16, 16, 3\]\)" \
  "rank 0's report of 5 images written"
note "sample.sbatch: 5 images from the preempted run's checkpoint on 2 ranks"

# --- scancel: SIGTERM, the ranks checkpoint, the job stays cancelled -------------------------------
run="$WORK/cancelled"
job=$(submit "$run" --set "data.path=$WORK/shapes16.h5" --set train.steps=100000 --set log.every=1 \
  --set checkpoint.every=100000) || fail "sbatch refused the job"
log="$WORK/slurm-$job.out"
wait_until 90 has_metrics "$run" || { cat "$log"; fail "job $job: training did not start in 90 s"; }
scancel "$job" || fail "scancel $job"
cancelled=$(now)
job_ended() { [[ "$(job_field "$job" JobState)" =~ ^(FAILED|CANCELLED|COMPLETED|NODE_FAIL)$ ]]; }
wait_until 60 job_ended || { scontrol show job "$job"; cat "$log"; fail "job $job still $(job_field "$job" JobState) 60 s after scancel"; }
cancel_seconds=$(elapsed "$cancelled")
[ "$(job_field "$job" JobState)" = CANCELLED ] || fail "job $job ended $(job_field "$job" JobState), expected CANCELLED"
sleep 3  # a requeue, if the script wrongly made one, shows within the scheduler's 2 s pass
[ "$(job_field "$job" Restarts)" = 0 ] && [ "$(job_field "$job" JobState)" = CANCELLED ] \
  || fail "a cancelled job must stay cancelled (state $(job_field "$job" JobState), Restarts=$(job_field "$job" Restarts))"
expect_in "$log" "TERM: asking the ranks to checkpoint" "the script forwarding SIGTERM"
expect_in "$log" "stop signal received: checkpointed step [0-9]+" "the ranks' checkpoint on SIGTERM"
stopped_at=$(grep -oE "checkpointed step [0-9]+" "$log" | tail -n 1 | grep -oE "[0-9]+$")
[ "$(latest_step "$run")" -eq "$stopped_at" ] || fail "latest is step $(latest_step "$run"), expected $stopped_at"
note "scancel: job $job checkpointed step $stopped_at and ended CANCELLED (not requeued) in ${cancel_seconds}s"
table_row "scancel (SIGTERM to the job): checkpoint, no requeue (Slurm, srun)" 2 "$cancel_seconds s" \
  "0 steps (checkpointed step $stopped_at)"

# --- 3. a rank killed inside the job ---------------------------------------------------------------
run="$WORK/killed"
job=$(submit "$run" --set "data.path=$WORK/shapes16.h5" --set train.steps=100000 --set log.every=1 \
  --set checkpoint.every=10) || fail "sbatch refused the job"
log="$WORK/slurm-$job.out"
wait_until 90 has_metrics "$run" || { cat "$log"; fail "job $job: training did not start in 90 s"; }
beyond_first_checkpoint() { [ "$(latest_step "$run")" -ge 10 ]; }
wait_until 60 beyond_first_checkpoint || fail "job $job wrote no checkpoint in 60 s"
victim=$(rank_pids "$run" | awk '$1 == 1 {print $2}')
[ -n "$victim" ] || fail "rank 1 of job $job not found"
kill -KILL "$victim"
killed=$(now)
last=$(last_logged_step "$run")
note "SIGKILL to rank 1 (pid $victim) of job $job at step $last"
wait_until 60 job_ended || { scontrol show job "$job"; cat "$log"; fail "job $job still $(job_field "$job" JobState) 60 s after a rank was killed"; }
exit_seconds=$(elapsed "$killed")
[ "$(job_field "$job" JobState)" = FAILED ] || fail "job $job ended $(job_field "$job" JobState), expected FAILED"
[ "$(job_field "$job" Restarts)" = 0 ] || fail "a failed job must not be requeued"
[ -z "$(rank_pids "$run")" ] || fail "ranks of job $job still alive: $(rank_pids "$run")"
expect_in "$log" "task 1.*(Killed|signal 9)" "srun naming the killed task"
lost=$(( last - $(latest_step "$run") ))
[ "$lost" -le 10 ] || fail "lost $lost steps, more than one checkpoint interval (10)"
note "job $job FAILED ${exit_seconds}s after rank 1 was killed; srun: $(grep -m1 -E 'task 1' "$log")"
table_row "SIGKILL one rank inside a Slurm job (srun --kill-on-bad-exit)" 2 "${exit_seconds} s" \
  "$lost steps (last step $last, latest checkpoint $(latest_step "$run"); interval 10)"
note "PASS"
