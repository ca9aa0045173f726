#!/usr/bin/env bash
# tests/launch/netns_test.sh SCENARIO: the real `diffuse` on a two-node cluster simulated on this
# machine (tests/launch/netns_cluster.sh: nodeA and nodeB, each its own network, hostname and
# /etc/hosts, joined by a switch). mpirun runs on nodeA and reaches nodeB through OpenMPI's remote
# launch (an agent standing in for ssh); ranks talk over TCP (OMPI_MCA_btl=tcp,self: no shared
# memory, so nodeA's ranks reach nodeB's through the veth links). configs/tiny.yaml, CPU.
#
#   mpirun      launch/mpirun.sh -n 4 -H nodeA:2,nodeB:2: ranks 0,1 on nodeA and 2,3 on nodeB with
#               local ranks 0,1 on each, DIFFUSE_* variables reach nodeB's ranks (which start
#               with a clean login environment), `diffuse doctor` reports both hosts, and a short
#               training run's all-reduces cross the link (nodeB's interface counters)
#   identical   2 nodes x 2 ranks train to the same weights, byte for byte, as 1 node x 4 ranks
#   node_lost   every process of nodeB killed mid-run: nodeA's ranks are gone within 60 s, the log
#               names the lost node, `latest` is intact, and `--resume latest` on nodeA alone
#               (world 4 -> 2) continues from the step it names
#   partition   nodeB's link cut mid-run (processes alive): the collective timeout fires on both
#               sides naming the operation, every rank exits; then a cut the moment a checkpoint
#               save starts: no checkpoint is published half-written, `latest` stays intact
#   slow_link   nodeB's link capped at 100 Mbit/s (tc tbf): training completes; reports the
#               exposed all-reduce time with the reducer's overlap on and off
#
# Each writes its row of the failure table (README, "No hangs") where it measures one. Skips
# (exit 77) when namespaces cannot be made here (not root, no CAP_SYS_ADMIN, no veth).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/netns_cluster.sh"

SCENARIO="${1:?usage: netns_test.sh mpirun|identical|node_lost|partition|slow_link}"
EVERY=10  # checkpoint.every: the most a failure may lose
export DIFFUSE_BUILD_DIR="${DIFFUSE_BUILD_DIR:-$(dirname "$(dirname "$EXE")")}"
MPIRUN_SH="$SRC/launch/mpirun.sh"

on_exit netns_cluster_stop
netns_cluster_start "$WORK/cluster" 2 || skip "no namespace cluster: $NETNS_CLUSTER_ERROR"
note "cluster up: $(for n in "${NETNS_NODES[@]}"; do printf '%s ' "$(on_node "$n" hostname)"; done)(subnet $NETNS_SUBNET)"
export OMPI_MCA_btl=tcp,self
cd "$WORK" || fail "cannot enter $WORK"
make_dataset

# nodeB's bytes sent and received on its link.
link_bytes() { ip -n "$(_netns_of "$1")" -s link show eth0 | awk '/RX:/ {getline; rx=$1} /TX:/ {getline; tx=$1} END {print rx + tx}'; }

# train_on HOSTS RANKS RUN LOG [args...]: `diffuse train` through launch/mpirun.sh, started on nodeA,
# in the background (sets LAUNCHER_PID); every rank logs to RUN/logs/rank-N.log.
train_on() {
  local hosts="$1" ranks="$2" run="$3" log="$4"
  shift 4
  on_node nodeA bash "$MPIRUN_SH" -n "$ranks" -H "$hosts" -- --log-dir "$run/logs" train -c "$TINY" \
    --run-dir "$run" --set "data.path=$DATA" --set log.every=1 --set "checkpoint.every=$EVERY" "$@" \
    >"$log" 2>&1 &
  LAUNCHER_PID=$!
}

on_exit stop_leftovers
no_ranks_left() { [ -z "$(rank_pids "$RUN")" ]; }

# export_weights RUN NAME: online and EMA weights of RUN's latest checkpoint as WORK/NAME-*.safetensors.
export_weights() {
  local weights
  for weights in online ema; do
    "$EXE" export --ckpt "$1/checkpoints/latest" --weights "$weights" --out "$WORK/$2-$weights.safetensors" \
      --overwrite >"$WORK/export.log" 2>&1 || { cat "$WORK/export.log"; fail "export $2 $weights"; }
  done
}

RUN="$WORK/run"
LOG="$WORK/train.log"
case "$SCENARIO" in
  mpirun)
    DIFFUSE_NETNS_PROBE=reached-remote on_node nodeA bash "$MPIRUN_SH" -n 4 -H nodeA:2,nodeB:2 -- doctor \
      >"$WORK/doctor.out" 2>&1 || { cat "$WORK/doctor.out"; fail "launch/mpirun.sh -n 4 -H nodeA:2,nodeB:2 -- doctor"; }
    expect_in "$WORK/doctor.out" "^\+ mpirun -np 4 .*--host nodeA:2,nodeB:2" "the printed mpirun command"
    expect_in "$WORK/doctor.out" "-x DIFFUSE_NETNS_PROBE" "DIFFUSE_* variables passed to the ranks"
    # One block per rank: "diffuse doctor: rank N" then its facts.
    awk '/diffuse doctor: rank/ {r = $NF} /^  host / {print r, $2} /^  local rank / {print r, "local", $3, $5}' \
      "$WORK/doctor.out" | sort >"$WORK/placement"
    printf '%s\n' "0 local 0 2" "0 nodeA" "1 local 1 2" "1 nodeA" "2 local 0 2" "2 nodeB" "3 local 1 2" "3 nodeB" \
      | sort | diff - "$WORK/placement" || { cat "$WORK/doctor.out"; fail "ranks 0,1 on nodeA and 2,3 on nodeB, local ranks 0,1 on each"; }
    [ "$(grep -c 'verdict *usable' "$WORK/doctor.out")" -eq 4 ] || { cat "$WORK/doctor.out"; fail "every rank usable"; }
    note "doctor: ranks 0,1 on nodeA and 2,3 on nodeB (local ranks 0,1 on each), all usable"

    # The environment: nodeB's ranks start from the agent's clean login environment (like ssh),
    # so a DIFFUSE_* variable there came through mpirun.sh's -x; one it does not forward must not.
    DIFFUSE_NETNS_PROBE=reached-remote NETNS_NOT_FORWARDED=leaked on_node nodeA bash "$MPIRUN_SH" -n 4 \
      -H nodeA:2,nodeB:2 -- doctor >/dev/null 2>&1 &  # only to read a remote rank's environment
    probe_pid=$!
    remote_env() {
      local pid
      for pid in $(node_pids nodeB); do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = diffuse ] && tr '\0' '\n' <"/proc/$pid/environ" && return 0
      done
      return 1
    }
    found=""
    for _ in $(seq 1 100); do found="$(remote_env)" && [ -n "$found" ] && break; sleep 0.05; done
    wait "$probe_pid"
    if [ -n "$found" ]; then
      grep -qx "DIFFUSE_NETNS_PROBE=reached-remote" <<<"$found" || fail "DIFFUSE_NETNS_PROBE did not reach nodeB's ranks"
      grep -q "^NETNS_NOT_FORWARDED=" <<<"$found" && fail "a variable mpirun.sh does not forward reached nodeB (the agent leaks the environment)"
      grep -qx "OMPI_COMM_WORLD_LOCAL_RANK=[01]" <<<"$found" || fail "no local rank in a nodeB rank's environment"
      note "nodeB's rank environment: DIFFUSE_NETNS_PROBE forwarded, NETNS_NOT_FORWARDED not"
    else
      fail "no diffuse process seen on nodeB while doctor ran"
    fi

    # A short training run: the gradients' all-reduce crosses nodeB's link.
    before=$(link_bytes nodeB)
    train_on nodeA:2,nodeB:2 4 "$RUN" "$LOG" --set train.steps=10
    wait_exit 120
    [ "$STATUS" -eq 0 ] || { tail -n 30 "$LOG"; fail "training on 2 nodes x 2 ranks failed"; }
    expect_in "$LOG" "done: 10 steps" "training to the end"
    crossed=$(( $(link_bytes nodeB) - before ))
    params=$(grep -oE 'parameters?[^0-9]*[0-9,]+' "$RUN/logs/rank-0.log" | head -n 1 | grep -oE '[0-9,]+$' | tr -d ,)
    note "training: $crossed bytes crossed nodeB's link in 10 steps (model: ${params:-?} parameters)"
    # Each step all-reduces every gradient (float32) through nodeB: far more than start-up chatter.
    if [ -n "$params" ]; then
      [ "$crossed" -gt $(( 10 * params * 4 )) ] || fail "only $crossed bytes crossed nodeB's link for 10 all-reduces of $params floats"
    else
      [ "$crossed" -gt 1000000 ] || fail "only $crossed bytes crossed nodeB's link in 10 training steps"
    fi
    ;;

  identical)
    # The same world size either way, so the same data shards, seeds and all-reduce algorithm:
    # only the transport differs (shared memory on one node, TCP across the link on two).
    steps=20
    train_on nodeA:2,nodeB:2 4 "$WORK/two-nodes" "$WORK/two-nodes.log" --set "train.steps=$steps"
    RUN="$WORK/two-nodes" LOG="$WORK/two-nodes.log" wait_exit 120
    [ "$STATUS" -eq 0 ] || { tail -n 30 "$WORK/two-nodes.log"; fail "2 nodes x 2 ranks failed"; }
    OMPI_MCA_btl=self,vader,tcp train_on nodeA:4 4 "$WORK/one-node" "$WORK/one-node.log" --set "train.steps=$steps"
    RUN="$WORK/one-node" LOG="$WORK/one-node.log" wait_exit 120
    [ "$STATUS" -eq 0 ] || { tail -n 30 "$WORK/one-node.log"; fail "1 node x 4 ranks failed"; }
    export_weights "$WORK/two-nodes" two-nodes
    export_weights "$WORK/one-node" one-node
    for weights in online ema; do
      cmp "$WORK/two-nodes-$weights.safetensors" "$WORK/one-node-$weights.safetensors" \
        || fail "$weights weights of 2 nodes x 2 ranks differ from 1 node x 4 ranks"
    done
    note "$steps steps: online and EMA weights of 2 nodes x 2 ranks (TCP) identical to 1 node x 4 ranks (shared memory)"
    ;;

  node_lost)
    train_on nodeA:2,nodeB:2 4 "$RUN" "$LOG" --set train.steps=100000
    wait_until 180 checkpoint_at_least "$(( 2 * EVERY ))" || { tail -n 30 "$LOG"; fail "no checkpoint at step $(( 2 * EVERY ))"; }
    wait_until 60 logged_at_least "$(( 2 * EVERY + EVERY / 2 ))" || fail "training stopped after step $(( 2 * EVERY ))"
    kill_node nodeB || fail "cannot kill nodeB's processes"
    t=$(now)
    last=$(last_logged_step "$RUN")
    note "nodeB lost (every process SIGKILLed) after step $last"
    wait_exit 60
    seconds=$(elapsed "$t")
    wait_until 5 no_ranks_left || fail "ranks still alive after mpirun exited: $(rank_pids "$RUN")"
    [ "$STATUS" -ne 0 ] || fail "mpirun exited 0 after a node was lost"
    # OpenMPI: "ORTE has lost communication with a remote daemon. ... Remote daemon: [[j,0],1] on node nodeB"
    expect_in "$LOG" "Remote daemon: .* on node nodeB" "mpirun naming the lost node"
    note "mpirun: $(grep -m1 -B3 -E 'Remote daemon: .* on node nodeB' "$LOG" | grep -m1 -iE 'lost|communication') $(grep -m1 -oE 'Remote daemon: .* on node nodeB' "$LOG")"
    last=$(last_logged_step "$RUN")
    from=$(latest_step "$RUN")
    lost=$(( last - from ))
    [ "$lost" -le "$EVERY" ] || fail "lost $lost steps (last logged $last, latest $from), more than checkpoint.every=$EVERY"
    expect_latest_intact "$from"
    note "nodeA's ranks gone ${seconds}s after nodeB was lost (exit $STATUS); $lost steps since checkpoint $from"
    # The survivors carry on alone: world 4 -> 2, resharded from the 4-rank checkpoint.
    to=$(( from + 5 ))
    train_on nodeA:2 2 "$RUN" "$WORK/resume.log" --set "train.steps=$to" --resume latest
    LOG="$WORK/resume.log" wait_exit 120
    [ "$STATUS" -eq 0 ] || { tail -n 30 "$WORK/resume.log"; fail "--resume latest on nodeA alone failed"; }
    expect_in "$WORK/resume.log" "resumed from .*step-0*$from at step $from" "the resume from step $from"
    expect_in "$WORK/resume.log" "done: $to steps" "training to step $to"
    note "--resume latest on nodeA alone (2 ranks) continued from step $from to $to"
    table_row "node lost: every process of one node killed (2 nodes x 2 ranks, mpirun)" 4 "$seconds s" \
      "$lost steps (last step $last, resumed at $from on the surviving node, world 4 -> 2; interval $EVERY)"
    ;;

  partition)
    # The collective timeout is what ends the ranks: their TCP connections to the other side see
    # no error at all while the cable is out (packets just vanish).
    TIMEOUT_S=10  # not 5: on a starved CPU a healthy rank can take 5 s to reach its first collectives
    # timed_out_ranks RUN: the ranks whose log has the collective timeout, e.g. "0 1 2 3".
    timed_out_ranks() {
      grep -lE "did not complete within $(( TIMEOUT_S * 1000 )) ms" "$1"/logs/rank-*.log 2>/dev/null \
        | grep -oE '[0-9]+\.log$' | sed 's/\.log//' | sort -n | tr '\n' ' '
    }
    # partition_until_ranks_exit: waits (60 s at most) for every rank to exit with nodeB's link
    # cut, then heals it; mpirun, which keeps waiting for nodeB's daemon while the link is out,
    # must exit within 60 s of that. Sets SECONDS_TO_EXIT (cut to the last rank gone), STATUS.
    partition_until_ranks_exit() {
      local cut_at="$1"
      wait_until 60 no_ranks_left || { tail -n 30 "$LOG"; fail "ranks still running 60 s after the cut: $(rank_pids "$RUN" | tr '\n' ' ')"; }
      SECONDS_TO_EXIT=$(elapsed "$cut_at")
      launcher_done && note "mpirun exited while the link was out" || note "every rank exited; mpirun still waits for nodeB's daemon"
      restore_link nodeB
      healed=$(now)
      wait_exit 60
      note "link restored: mpirun exited $(elapsed "$healed") s later (status $STATUS)"
      [ "$STATUS" -ne 0 ] || fail "mpirun exited 0 after a partition"
    }

    # 1. Mid-run: most of a step is its gradient all-reduce.
    train_on nodeA:2,nodeB:2 4 "$RUN" "$LOG" --set train.steps=100000 --set "train.collective_timeout_s=$TIMEOUT_S"
    wait_until 180 checkpoint_at_least "$EVERY" || { tail -n 30 "$LOG"; fail "no checkpoint at step $EVERY"; }
    wait_until 60 logged_at_least "$(( EVERY + EVERY / 2 ))" || fail "training stopped after step $EVERY"
    cut_link nodeB
    cut_at=$(now)
    last=$(last_logged_step "$RUN")
    note "nodeB's link cut after step $last (processes alive)"
    partition_until_ranks_exit "$cut_at"
    timed_out="$(timed_out_ranks "$RUN")"
    note "collective timeout in the logs of ranks: $timed_out"
    [[ " $timed_out" =~ \ [01]\  ]] || fail "no rank on nodeA reported the collective timeout (ranks: '$timed_out')"
    [[ " $timed_out" =~ \ [23]\  ]] || fail "no rank on nodeB reported the collective timeout (ranks: '$timed_out')"
    message="$(grep -h -m1 -oE "MPI [a-z_]+(\([a-z]+\))? [^:]*did not complete within [0-9]+ ms" "$RUN"/logs/rank-*.log | head -n 1)"
    [ -n "$message" ] || fail "the timeout message does not name the operation"
    note "message: $message"
    last=$(last_logged_step "$RUN")
    from=$(latest_step "$RUN")
    expect_latest_intact "$from"
    table_row "network partition mid-run: one node's link cut, processes alive (collective_timeout_s=$TIMEOUT_S)" 4 \
      "$SECONDS_TO_EXIT s (every rank; mpirun waits for the lost daemon until the link heals)" \
      "$(( last - from )) steps (last step $last, latest $from; interval $EVERY)"

    # 2. The moment a checkpoint save starts (its step-N.tmp folder appears), after a first one.
    # model.dim=32: a checkpoint of ~10 MB, whose save lasts long enough to be cut in the middle.
    RUN="$WORK/run-save"
    LOG="$WORK/train-save.log"
    train_on nodeA:2,nodeB:2 4 "$RUN" "$LOG" --set train.steps=100000 --set "train.collective_timeout_s=$TIMEOUT_S" \
      --set checkpoint.every=5 --set model.dim=32
    wait_until 180 checkpoint_at_least 5 || { tail -n 30 "$LOG"; fail "no checkpoint at step 5"; }
    saving=""
    before=$(latest_step "$RUN")
    for _ in $(seq 1 3000); do  # 30 s in 10 ms polls: a save of this model takes ~0.2 s
      saving="$(compgen -G "$RUN/checkpoints/step-*.tmp" | grep -v "step-0*5\.tmp" | head -n 1)" && [ -n "$saving" ] && break
      sleep 0.01
    done
    [ -n "$saving" ] || fail "no checkpoint save seen in 30 s"
    cut_link nodeB
    cut_at=$(now)
    note "nodeB's link cut while $(basename "$saving") was being written (latest: step $before)"
    partition_until_ranks_exit "$cut_at"
    note "collective timeout in the logs of ranks: $(timed_out_ranks "$RUN")"
    after=$(latest_step "$RUN")
    saved_step=$(( 10#$(basename "$saving" .tmp | tr -dc 0-9) ))
    if [ "$after" -eq "$saved_step" ]; then
      note "the save of step $saved_step had passed its last agreement and was published whole"
    else
      [ "$after" -eq "$before" ] || fail "latest moved from $before to $after, neither the old nor the saved step $saved_step"
      [ ! -e "$RUN/checkpoints/step-$(printf %06d "$saved_step")" ] || fail "step $saved_step published although the save did not complete"
      note "the save of step $saved_step did not complete: not published, latest stays $before"
    fi
    expect_latest_intact "$after"
    for d in "$RUN"/checkpoints/step-*; do
      case "$d" in *.tmp|*.trash|*.old) continue ;; esac
      "$EXE" inspect "$d" >"$WORK/inspect.log" 2>&1 || { cat "$WORK/inspect.log"; fail "published checkpoint $d is damaged"; }
    done
    table_row "network partition during a checkpoint save (collective_timeout_s=$TIMEOUT_S)" 4 "$SECONDS_TO_EXIT s" \
      "no checkpoint published half-written; latest step $after (save of step $saved_step $( [ "$after" -eq "$saved_step" ] && echo completed || echo abandoned))"
    ;;

  slow_link)
    # Exposed all-reduce time: the part of the gradient all-reduce not hidden behind backward
    # (metrics.jsonl's allreduce_exposed_s, per log interval; rank 0's). Overlap on: tiny.yaml's
    # small buckets start all-reducing while backward runs; off: one bucket holding every
    # gradient, which can only start once backward is over. First a run on the full link.
    steps=20
    exposed_sum() { awk -F'"allreduce_exposed_s": *' 'NF > 1 {split($2, v, /[,}]/); s += v[1]} END {printf "%.2f", s}' "$1/metrics.jsonl"; }
    declare -A exposed wall
    for mode in full-on capped-on capped-off; do
      [ "$mode" = capped-on ] && { cap_bandwidth nodeB 100mbit || fail "tc tbf on nodeB's link"; note "nodeB's link capped at 100 Mbit/s (tc tbf, both directions)"; }
      buckets=(); [ "${mode#*-}" = off ] && buckets=(--set train.bucket_cap_mb=1024)
      t=$(now)
      train_on nodeA:2,nodeB:2 4 "$WORK/$mode" "$WORK/$mode.log" --set "train.steps=$steps" "${buckets[@]}"
      RUN="$WORK/$mode" LOG="$WORK/$mode.log" wait_exit 180
      [ "$STATUS" -eq 0 ] || { tail -n 30 "$WORK/$mode.log"; fail "training ($mode) failed"; }
      expect_in "$WORK/$mode.log" "done: $steps steps" "training to the end ($mode)"
      wall[$mode]=$(elapsed "$t")
      exposed[$mode]=$(exposed_sum "$WORK/$mode")
      note "link ${mode%-*}, overlap ${mode#*-}: $steps steps in ${wall[$mode]} s, exposed all-reduce ${exposed[$mode]} s"
    done
    table_row "slow link: one node capped at 100 Mbit/s (tc tbf; 2 nodes x 2 ranks)" 4 "completes" \
      "none; exposed all-reduce over $steps steps: ${exposed[capped-on]} s with overlap, ${exposed[capped-off]} s without (one bucket); ${exposed[full-on]} s on the full link"
    ;;

  *) fail "unknown scenario '$SCENARIO'" ;;
esac
note "PASS"
