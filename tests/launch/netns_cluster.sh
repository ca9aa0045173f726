# tests/launch/netns_cluster.sh: a throwaway cluster of N "nodes" on this machine, each a network
# + UTS + mount namespace: its own hostname, network stack and address on a private switch.
# Source it (after common.sh), then:
#
#   on_exit netns_cluster_stop                                  # tear down even on failure
#   netns_cluster_start DIR [N] || skip "$NETNS_CLUSTER_ERROR"  # nodes nodeA, nodeB, ...
#   on_node nodeA hostname                                      # "nodeA"
#   on_node nodeA mpirun -H nodeA:2,nodeB:2 ...                 # remote launch: OMPI_MCA_* below
#   cut_link nodeB; restore_link nodeB                          # a partition, processes alive
#   cap_bandwidth nodeB 100mbit                                 # tc tbf, both directions
#   netem_available || skip "..."                               # delay/loss need sch_netem
#   kill_node nodeB                                             # every process of nodeB, SIGKILL
#
# The network: a "switch" namespace holds a bridge; each node's eth0 is a veth whose other end is
# a port of that bridge. Addresses 10.213.0.1, .2, ... /24 live only inside these namespaces (the
# machine's own namespace gains no interface, route or address), so the same subnet can serve
# several clusters at once and nothing leaves the machine. Names resolve through a hosts file
# bind-mounted on /etc/hosts in each node's mount namespace; the file system is otherwise shared,
# like an NFS home on a real cluster, except NETNS_NODE_LOCAL: the same path, a different folder
# on each node (node-local scratch, e.g. Slurm's TmpFS).
#
# A node is held by one process (`sleep`) that owns its UTS and mount namespaces; on_node enters
# them with nsenter. Every process of a node is in its network namespace, so `ip netns pids`
# finds them all (kill_node, teardown) without cgroups.
#
# OpenMPI's remote launch: netns_cluster_start exports OMPI_MCA_plm_rsh_agent (DIR/netns-agent,
# which stands in for ssh: it enters the named node with a clean login environment, so only what
# mpirun forwards reaches remote ranks), and restricts OpenMPI's TCP traffic to the test subnet
# (oob_tcp_if_include, btl_tcp_if_include). A test that wants the TCP BTL between ranks sets
# OMPI_MCA_btl=tcp,self itself.

NETNS_CLUSTER_DIR=""
NETNS_CLUSTER_ERROR=""
NETNS_SUBNET="10.213.0.0/24"
NETNS_NODES=()
NETNS_NODE_LOCAL=""  # DIR/node-local: on each node, a folder of its own (like a node's local /tmp)
_netns_prefix="diffuse$$"  # namespace names are global: unique per test process
_netns_switch=""

_netns_fail() {
  NETNS_CLUSTER_ERROR="$1"
  netns_cluster_stop
  return 1
}

_netns_of() { echo "$_netns_prefix-$1"; }
_netns_holder() { cat "$NETNS_CLUSTER_DIR/nodes/$1.pid" 2>/dev/null; }

# netns_cluster_start DIR [N]: N nodes (default 2) named nodeA, nodeB, ...; returns non-zero with
# NETNS_CLUSTER_ERROR set when this machine cannot make namespaces (not root, no CAP_SYS_ADMIN,
# no veth/bridge support): the caller skips.
netns_cluster_start() {
  NETNS_CLUSTER_DIR="$(mkdir -p "$1" && cd "$1" && pwd)"
  local count="${2:-2}" d="$NETNS_CLUSTER_DIR" tool i
  case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac
  for tool in ip tc unshare nsenter; do
    command -v "$tool" >/dev/null 2>&1 || { NETNS_CLUSTER_ERROR="'$tool' not found (iproute2, util-linux)"; return 1; }
  done
  [ "$(id -u)" -eq 0 ] || { NETNS_CLUSTER_ERROR="network namespaces need root"; return 1; }
  [[ "$count" =~ ^[1-9][0-9]*$ ]] && [ "$count" -le 26 ] || { NETNS_CLUSTER_ERROR="1 to 26 nodes, not '$count'"; return 1; }
  NETNS_NODE_LOCAL="$d/node-local"
  mkdir -p "$d/nodes" "$d/log" "$NETNS_NODE_LOCAL"

  _netns_switch="$(_netns_of switch)"
  ip netns add "$_netns_switch" 2>"$d/log/netns.err" \
    || { _netns_fail "cannot create a network namespace: $(cat "$d/log/netns.err")"; return 1; }
  ip -n "$_netns_switch" link add br0 type bridge 2>"$d/log/netns.err" \
    || { _netns_fail "cannot create a bridge: $(cat "$d/log/netns.err")"; return 1; }
  ip -n "$_netns_switch" link set br0 up

  echo "127.0.0.1 localhost" >"$d/hosts"
  for ((i = 0; i < count; ++i)); do
    local letters=ABCDEFGHIJKLMNOPQRSTUVWXYZ name
    name="node${letters:i:1}"
    echo "10.213.0.$(( i + 1 )) $name" >>"$d/hosts"
    NETNS_NODES+=("$name")
  done
  for ((i = 0; i < count; ++i)); do
    local name="${NETNS_NODES[$i]}" ns
    ns="$(_netns_of "${NETNS_NODES[$i]}")"
    mkdir -p "$d/local/$name"
    ip netns add "$ns" 2>"$d/log/netns.err" || { _netns_fail "ip netns add $ns: $(cat "$d/log/netns.err")"; return 1; }
    ip link add eth0 netns "$ns" type veth peer name "port-$name" netns "$_netns_switch" 2>"$d/log/netns.err" \
      || { _netns_fail "cannot create a veth pair: $(cat "$d/log/netns.err")"; return 1; }
    ip -n "$_netns_switch" link set "port-$name" master br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "10.213.0.$(( i + 1 ))/24" dev eth0
    ip -n "$ns" link set eth0 up
    # The holder: owns the node's hostname and its /etc/hosts; detached from our output so that
    # ctest does not wait on it. Not `ip netns exec`, which mounts a fresh /sys over the machine's
    # (hiding /sys/fs/cgroup, which slurmd needs).
    nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
      sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && mount --bind "$3" "$4" && exec sleep 1000000' \
      sh "$name" "$d/hosts" "$d/local/$name" "$NETNS_NODE_LOCAL" \
      </dev/null >"$d/log/$name.holder" 2>&1 &
    echo "$!" >"$d/nodes/$name.pid"
    disown "$!"  # no "Killed" job report when kill_node ends it
  done
  # Up when every node answers to its own name with its own hostname and sees the others.
  for name in "${NETNS_NODES[@]}"; do
    local ready=0
    for i in $(seq 1 50); do
      [ "$(on_node "$name" hostname 2>/dev/null)" = "$name" ] && { ready=1; break; }
      sleep 0.1
    done
    [ "$ready" = 1 ] || { _netns_fail "node $name did not come up ($(cat "$d/log/$name.holder"))"; return 1; }
  done

  cat >"$d/netns-agent" <<EOF
#!/usr/bin/env bash
# OpenMPI's plm_rsh_agent for the test cluster in $d: "netns-agent [options] HOST COMMAND...",
# like ssh. Enters HOST's namespaces and runs COMMAND with bash -c and a fresh login environment.
while [ \$# -gt 0 ] && [ "\${1#-}" != "\$1" ]; do shift; done
host="\${1:?netns-agent: no host}"
shift
pid="\$(cat "$d/nodes/\$host.pid" 2>/dev/null)" || { echo "netns-agent: no node '\$host' in $d" >&2; exit 255; }
exec nsenter -t "\$pid" -u -n -m -- env -i HOME="\${HOME:-/root}" USER="\$(id -un)" SHELL=/bin/bash \\
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin bash -c "\$*"
EOF
  chmod +x "$d/netns-agent"
  export OMPI_MCA_plm_rsh_agent="$d/netns-agent"
  export OMPI_MCA_oob_tcp_if_include="$NETNS_SUBNET" OMPI_MCA_btl_tcp_if_include="$NETNS_SUBNET"
  # Every node is "remote" to OpenMPI except the one mpirun runs on; no daemon tree: one hop.
  export OMPI_MCA_plm_rsh_no_tree_spawn=1
  return 0
}

# node_command NODE: sets NODE_COMMAND to the prefix that runs a command on NODE (nsenter, which
# execs the command: started in the background, $! is the command's own pid).
node_command() {
  local pid
  pid="$(_netns_holder "$1")" || { echo "no node '$1' in this cluster" >&2; return 255; }
  NODE_COMMAND=(nsenter -t "$pid" -u -n -m --wd="$PWD" --)
}

# on_node NODE COMMAND...: runs COMMAND on NODE (its hostname, network, /etc/hosts), in this
# shell's environment and working directory, as a job on a login node would.
on_node() {
  local NODE_COMMAND
  node_command "$1" || return 255
  shift
  "${NODE_COMMAND[@]}" "$@"
}

# node_address NODE: NODE's address on the switch.
node_address() { awk -v n="$1" '$2 == n {print $1}' "$NETNS_CLUSTER_DIR/hosts"; }

# cut_link NODE: unplugs NODE's cable from the switch. Its interface stays up with its address,
# so its processes see no error: packets just stop arriving (TCP retries, collectives wait).
cut_link() { ip -n "$_netns_switch" link set "port-$1" nomaster; }
restore_link() { ip -n "$_netns_switch" link set "port-$1" master br0; }

# cap_bandwidth NODE RATE: a token bucket (tc tbf) on NODE's link, both directions (e.g. 100mbit).
cap_bandwidth() {
  local node="$1" rate="$2"
  tc -n "$(_netns_of "$node")" qdisc replace dev eth0 root tbf rate "$rate" burst 64kb latency 100ms &&
    tc -n "$_netns_switch" qdisc replace dev "port-$node" root tbf rate "$rate" burst 64kb latency 100ms
}
uncap_bandwidth() {
  tc -n "$(_netns_of "$1")" qdisc del dev eth0 root 2>/dev/null
  tc -n "$_netns_switch" qdisc del dev "port-$1" root 2>/dev/null
  return 0
}

# netem_available: whether tc can add a netem (delay, loss) qdisc on this kernel.
netem_available() {
  local port="port-${NETNS_NODES[0]}"
  tc -n "$_netns_switch" qdisc add dev "$port" root netem delay 1ms 2>/dev/null || return 1
  tc -n "$_netns_switch" qdisc del dev "$port" root
}

# node_pids NODE: every process of NODE (also ones that left its UTS namespace: all share its network).
node_pids() { ip netns pids "$(_netns_of "$1")" 2>/dev/null; }

# kill_node NODE: SIGKILL to every process of NODE, until none is left (the node is then gone:
# on_node no longer reaches it). Fails when processes survive 5 s.
kill_node() {
  local node="$1" pids i
  for i in $(seq 1 50); do
    pids="$(node_pids "$node")"
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
    sleep 0.1
  done
  echo "kill_node $node: still alive: $(node_pids "$node")" >&2
  return 1
}

# netns_cluster_stop: kills every node's processes and removes the namespaces. Safe to call twice.
netns_cluster_stop() {
  local node
  for node in "${NETNS_NODES[@]}"; do
    kill_node "$node" >/dev/null 2>&1
    ip netns del "$(_netns_of "$node")" 2>/dev/null
  done
  [ -n "$_netns_switch" ] && ip netns del "$_netns_switch" 2>/dev/null
  NETNS_NODES=()
  _netns_switch=""
  return 0
}
