# tests/launch/slurm_cluster.sh: a throwaway one-node Slurm cluster for the launcher tests.
# Source it, then:
#
#   trap 'slurm_cluster_stop; rm -rf "$DIR"' EXIT            # tear down even on failure
#   slurm_cluster_start DIR || skip "$SLURM_CLUSTER_ERROR"   # munged + slurmctld + slurmd
#   sbatch ...; squeue ...; srun ...                           # SLURM_CONF points at DIR/slurm.conf
#
# Everything lives in DIR: its own munge key and socket (AuthInfo=socket=...), slurm.conf, state,
# spool and logs; the daemons listen on free loopback ports, so the cluster disturbs nothing on the
# machine and several can run at once. The node is this host (its name, all its CPUs); one partition
# "test". Settings that work without cgroups and as root: proctrack/linuxproc, task/none,
# SlurmUser=root. Needs Debian's slurmctld slurmd slurm-client munge (launch/setup.sh --with-slurm).
#
# Several nodes: on a cluster of tests/launch/netns_cluster.sh, `slurm_cluster_start DIR nodeA nodeB`
# runs slurmctld on the first node and one slurmd on each (NodeAddr: its switch address); munged
# stays on this host (its socket is a file, which every node sees). The controller is reachable
# only from the nodes: run Slurm's commands with slurm_client (on the first node).

SLURM_CLUSTER_DIR=""
SLURM_CLUSTER_ERROR=""
SLURM_CLUSTER_NODES=()
_slurm_cluster_pids=()
_slurm_client_prefix=()

# slurm_client COMMAND...: a Slurm command (sbatch, srun, scontrol, ...) where the controller is reachable.
# (`command`: a caller may wrap sbatch & co. in functions that call this.)
slurm_client() {
  if [ ${#_slurm_client_prefix[@]} -gt 0 ]; then "${_slurm_client_prefix[@]}" "$@"; else command "$@"; fi
}

# A TCP port nobody listens on now (the kernel's choice), on loopback.
_slurm_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_slurm_fail() {
  SLURM_CLUSTER_ERROR="$1"
  local log
  for log in "$SLURM_CLUSTER_DIR"/log/*.log; do
    [ -s "$log" ] && { echo "--- $log (last lines)"; tail -n 15 "$log"; } >&2
  done
  slurm_cluster_stop
  return 1
}

# slurm_cluster_start DIR [NODE...]: starts the cluster; returns non-zero with SLURM_CLUSTER_ERROR
# set when Slurm is missing or cannot start (the caller decides whether that is a skip or a failure).
slurm_cluster_start() {
  SLURM_CLUSTER_DIR="$(mkdir -p "$1" && cd "$1" && pwd)"
  shift
  SLURM_CLUSTER_NODES=("$@")
  local d="$SLURM_CLUSTER_DIR" tool
  # The daemons live in sbin, which a non-login PATH may lack.
  case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac
  for tool in munged slurmctld slurmd sbatch srun scontrol squeue python3; do
    command -v "$tool" >/dev/null 2>&1 || {
      SLURM_CLUSTER_ERROR="'$tool' not found: install Slurm with launch/setup.sh --with-slurm"
      return 1
    }
  done
  # The daemons drop nothing to another user here: they must run as root (SlurmUser=root), as in CI.
  if [ "$(id -u)" -ne 0 ]; then
    SLURM_CLUSTER_ERROR="a private Slurm cluster needs root (slurmd starts jobs as their owner)"
    return 1
  fi
  mkdir -p "$d/munge" "$d/state" "$d/spool" "$d/log" "$d/run"
  chmod 700 "$d/munge"

  # --- munge: its own key and socket ----------------------------------------------------------
  dd if=/dev/urandom of="$d/munge/munge.key" bs=1024 count=1 status=none
  chmod 600 "$d/munge/munge.key"
  # In the foreground, as our child: we own its pid, and stopping it reaps it.
  munged --foreground --force --key-file="$d/munge/munge.key" --socket="$d/munge/munge.socket" \
    --pid-file="$d/munge/munged.pid" --log-file="$d/log/munged.log" --seed-file="$d/munge/munged.seed" \
    >"$d/log/munged.out" 2>&1 &
  _slurm_cluster_pids+=("$!")
  local i
  for i in $(seq 1 50); do
    [ -S "$d/munge/munge.socket" ] && break
    _slurm_alive "$!" || { _slurm_fail "munged exited during start-up (see $d/log/munged.out)"; return 1; }
    sleep 0.1
  done
  [ -S "$d/munge/munge.socket" ] || { _slurm_fail "munged made no socket in 5 s"; return 1; }

  # --- slurm.conf -------------------------------------------------------------------------------
  local host ctld_port slurmd_port cpus memory ctld_addr node nodes_conf="" tmpfs
  if [ ${#SLURM_CLUSTER_NODES[@]} -gt 0 ]; then
    host="${SLURM_CLUSTER_NODES[0]}"
    ctld_addr="$(node_address "$host")"
    node_command "$host" || { _slurm_fail "no node '$host'"; return 1; }
    _slurm_client_prefix=("${NODE_COMMAND[@]}")
    tmpfs="$NETNS_NODE_LOCAL"  # per node: PMIx makes its step folders there
  else
    tmpfs="$d/run"
    host="$(hostname -s)"
    ctld_addr=127.0.0.1
    SLURM_CLUSTER_NODES=("$host")
    _slurm_client_prefix=()
  fi
  ctld_port="$(_slurm_free_port)"
  slurmd_port="$(_slurm_free_port)"
  while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port="$(_slurm_free_port)"; done
  cpus="$(getconf _NPROCESSORS_ONLN)"  # not nproc: it answers OMP_NUM_THREADS when that is set
  for node in "${SLURM_CLUSTER_NODES[@]}"; do mkdir -p "$d/spool/$node"; done
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 / ${#SLURM_CLUSTER_NODES[@]} ))
  for node in "${SLURM_CLUSTER_NODES[@]}"; do
    local addr=127.0.0.1
    [ "$ctld_addr" = 127.0.0.1 ] || addr="$(node_address "$node")"
    nodes_conf+="NodeName=$node NodeAddr=$addr CPUs=$cpus RealMemory=$memory State=UNKNOWN"$'\n'
  done
  cat >"$d/slurm.conf" <<EOF
# A one-node test cluster made by tests/launch/slurm_cluster.sh.
ClusterName=diffusetest
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s). Starting
# it earlier (scontrol update StartTime=now) races the revoked credential of its previous run on
# the node: "Killing non-startable batch job: Job credential revoked".
AuthInfo=socket=$d/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool/%n
SlurmctldPidFile=$d/run/slurmctld.pid
SlurmdPidFile=$d/run/slurmd-%n.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
# A requeued job becomes eligible at its BeginTime but starts at the next pass of the main loop
# (every 60 s by default).
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# Short timers: a test waits for these.
SlurmctldTimeout=10
SlurmdTimeout=10
MessageTimeout=10
KillWait=5
InactiveLimit=0
MinJobAge=300
TmpFS=$tmpfs
${nodes_conf}PartitionName=test Nodes=$(IFS=,; echo "${SLURM_CLUSTER_NODES[*]}") Default=YES MaxTime=60 State=UP OverSubscribe=NO
EOF
  export SLURM_CONF="$d/slurm.conf"
  # Variables of an enclosing real job (a test run inside an allocation) would confuse srun/sbatch.
  local v
  for v in $(compgen -e | grep -E '^(SLURM_|SBATCH_|SRUN_|SALLOC_)' | grep -v '^SLURM_CONF$'); do unset "$v"; done

  # --- daemons ----------------------------------------------------------------------------------
  # Each daemon on its node; the prefix execs it, so $! is the daemon itself.
  slurm_client slurmctld -D -i -f "$d/slurm.conf" >"$d/log/slurmctld.out" 2>&1 &
  _slurm_cluster_pids+=("$!")
  for node in "${SLURM_CLUSTER_NODES[@]}"; do
    local NODE_COMMAND=()
    [ "$ctld_addr" = 127.0.0.1 ] || node_command "$node"
    "${NODE_COMMAND[@]}" slurmd -D -f "$d/slurm.conf" -N "$node" >"$d/log/slurmd-$node.out" 2>&1 &
    _slurm_cluster_pids+=("$!")
  done

  # Ready when every node is idle (its slurmd registered with slurmctld).
  local state=""
  for i in $(seq 1 60); do
    state="$(slurm_client sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)"
    [ "$state" = "idle " ] && [ "$(slurm_client sinfo -h -N -o '%N' 2>/dev/null | wc -l)" -eq ${#SLURM_CLUSTER_NODES[@]} ] && return 0
    local pid
    for pid in "${_slurm_cluster_pids[@]}"; do
      _slurm_alive "$pid" || { _slurm_fail "a Slurm daemon (pid $pid) exited during start-up"; return 1; }
    done
    sleep 0.5
  done
  _slurm_fail "the nodes did not become idle in 30 s (states '${state:-none}')"
}

# Running (a zombie, exited but not yet reaped by its parent, is not).
_slurm_alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [ "${stat%% *}" != "Z" ]
}

# Processes of this cluster's jobs: slurmstepd and the tasks it started inherit SLURM_CONF from
# slurmd, and DIR is unique, so this finds them (and only them) by their environment.
_slurm_job_pids() {
  local environ
  for environ in /proc/[0-9]*/environ; do
    if { tr "\0" "\n" <"$environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CLUSTER_DIR/slurm.conf"; then
      local pid="${environ#/proc/}"
      pid="${pid%/environ}"
      [ "$pid" != "$$" ] && [ "$pid" != "$BASHPID" ] && echo "$pid"
    fi
  done
}

# slurm_cluster_stop: cancels the jobs, stops the daemons this file started and whatever their
# jobs left (by pid, never by name), and leaves DIR for the caller to remove. Safe to call twice.
slurm_cluster_stop() {
  local pid i
  [ ${#_slurm_cluster_pids[@]} -gt 0 ] || return 0
  if [ -n "${SLURM_CONF:-}" ]; then
    slurm_client timeout 5 scancel --full --quiet 2>/dev/null || true
    for i in $(seq 1 50); do
      [ -z "$(slurm_client timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  # slurmctld saves its state and reaps its helper (slurmscriptd) on TERM: give it the time.
  for pid in "${_slurm_cluster_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for i in $(seq 1 150); do
    local alive=0
    for pid in "${_slurm_cluster_pids[@]}"; do _slurm_alive "$pid" && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.1
  done
  for pid in "${_slurm_cluster_pids[@]}"; do
    _slurm_alive "$pid" && { echo "slurm_cluster_stop: pid $pid ignored TERM, killing it" >&2; kill -KILL "$pid"; }
  done
  wait "${_slurm_cluster_pids[@]}" 2>/dev/null
  _slurm_cluster_pids=()
  # Steps whose slurmstepd outlived the cancel (they are not the daemons' children).
  for pid in $(_slurm_job_pids); do kill -KILL "$pid" 2>/dev/null || true; done
}
