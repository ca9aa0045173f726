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

  slow_link)
    # Exposed all-reduce time: the part of the gradient all-reduce not hidden behind backward
    # (metrics.jsonl's allreduce_exposed_s, per log interval). Overlap on: tiny.yaml's small
    # buckets start all-reducing while backward runs; off: one bucket holding every gradient,
    # which can only start once backward is over.
    steps=30
    cap_bandwidth nodeB 100mbit || fail "tc tbf on nodeB's link"
    note "nodeB's link capped at 100 Mbit/s (tc tbf, both directions)"
    exposed_sum() { awk -F'"allreduce_exposed_s": *' 'NF > 1 {split($2, v, /[,}]/); s += v[1]} END {printf "%.2f", s}' "$1/metrics.jsonl"; }
    declare -A exposed wall
    for mode in on off; do
      buckets=(); [ "$mode" = off ] && buckets=(--set train.bucket_cap_mb=1024)
      t=$(now)
      train_on nodeA:2,nodeB:2 4 "$WORK/overlap-$mode" "$WORK/overlap-$mode.log" --set "train.steps=$steps" "${buckets[@]}"
      RUN="$WORK/overlap-$mode" LOG="$WORK/overlap-$mode.log" wait_exit 180
      [ "$STATUS" -eq 0 ] || { tail -n 30 "$WORK/overlap-$mode.log"; fail "training over the capped link (overlap $mode) failed"; }
      expect_in "$WORK/overlap-$mode.log" "done: $steps steps" "training to the end (overlap $mode)"
      wall[$mode]=$(elapsed "$t")
      exposed[$mode]=$(exposed_sum "$WORK/overlap-$mode")
      note "overlap $mode: $steps steps in ${wall[$mode]} s, exposed all-reduce ${exposed[$mode]} s (rank 0)"
    done
    table_row "slow link: one node capped at 100 Mbit/s (tc tbf; 2 nodes x 2 ranks)" 4 "completes" \
      "none; $steps steps: exposed all-reduce ${exposed[on]} s with overlap, ${exposed[off]} s without (one bucket)"
    ;;

  *) fail "unknown scenario '$SCENARIO'" ;;
esac
note "PASS"
