#!/usr/bin/env bash
# launch/mpirun.sh: run diffuse on N ranks with OpenMPI, one rank per GPU, printing the command.
#
#   launch/mpirun.sh [-n RANKS] [-H HOSTS] -- train -c configs/reference-128.yaml
#   launch/mpirun.sh -n 2 -- doctor                 # check the ranks come up as one world
#   launch/mpirun.sh -n 4 -H nodeA:2,nodeB:2 -- doctor
#
# RANKS defaults to the allocation's tasks inside Slurm (SLURM_NTASKS), else the GPUs visible on
# this node (nvidia-smi), or 2 on a machine without GPUs. Inside a Slurm/PBS allocation OpenMPI
# picks up the allocation itself; otherwise give -H: a hostfile, or a list HOST:SLOTS,HOST:SLOTS
# (OpenMPI's --host). Other hosts are reached the way OpenMPI is configured to (ssh by default;
# OMPI_MCA_plm_rsh_agent and other OMPI_MCA_* variables of this shell apply). Ranks are placed in
# slot order (ranks 0..k-1 fill the first host), unbound (each rank's threads use its share of
# the cores through OMP_NUM_THREADS).
# Environment passed to every rank, also on other hosts: PATH, LD_LIBRARY_PATH, OMP_NUM_THREADS,
# CUDA_VISIBLE_DEVICES, NCCL_*, DIFFUSE_*, TORCH_* (OpenMPI's -x). Root-only flags are added only
# when running as root. The binary is $DIFFUSE_BUILD_DIR/bin/diffuse (see launch/env.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

ranks=""
hosts=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n) ranks="$2"; shift 2 ;;
    -H) hosts="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || die "usage: launch/mpirun.sh [-n RANKS] [-H hostfile|HOST:SLOTS,...] -- <diffuse subcommand and options>"
if [ -z "$ranks" ] && [ -n "${SLURM_NTASKS:-}" ]; then
  ranks="$SLURM_NTASKS"
elif [ -z "$ranks" ]; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  ranks=$(( gpus > 0 ? gpus : 2 ))
fi
[[ "$ranks" =~ ^[1-9][0-9]*$ ]] || die "-n expects a positive number of ranks, got '$ranks'"
[ -x "$DIFFUSE_EXE" ] || die "$DIFFUSE_EXE not found: run launch/setup.sh first"

cores=$(getconf _NPROCESSORS_ONLN)  # not nproc, which answers OMP_NUM_THREADS when that is set
flags=(-np "$ranks" --bind-to none --map-by slot)
if [ -f "$hosts" ]; then
  flags+=(--hostfile "$hosts")
elif [ -n "$hosts" ]; then
  [[ "$hosts" =~ ^[A-Za-z0-9._-]+(:[1-9][0-9]*)?(,[A-Za-z0-9._-]+(:[1-9][0-9]*)?)*$ ]] \
    || die "-H expects a hostfile or HOST:SLOTS,HOST:SLOTS,..., got '$hosts' (no such file either)"
  flags+=(--host "$hosts")
fi
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
# Outside an allocation or hostfile the slots are this node's cores; a CPU run with more ranks
# than cores (tests, small boxes) needs oversubscription.
[ "$ranks" -gt "$cores" ] && [ -z "$hosts" ] && [ -z "${SLURM_JOB_ID:-}" ] && flags+=(--oversubscribe)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / ranks > 0 ? cores / ranks : 1 ))}"
for v in PATH LD_LIBRARY_PATH OMP_NUM_THREADS CUDA_VISIBLE_DEVICES \
         $(compgen -e | grep -E '^(NCCL_|DIFFUSE_|TORCH_)' || true); do
  [ -n "${!v:-}" ] && flags+=(-x "$v")
done
echo "+ mpirun ${flags[*]} $DIFFUSE_EXE $*" >&2
exec mpirun "${flags[@]}" "$DIFFUSE_EXE" "$@"
