#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, from Debian's packages (slurm-wlm, munge; Slurm 22.05): one munged,
# one slurmctld and two slurmd (node1, node2) at 127.0.0.1 on free ports, all state in one folder. For trying Slurm
# submission without a cluster, and for the test suite (tests/slurm_cluster.py drives this script).
#
#   bash launchers/slurm/local_cluster.sh up [DIR]      # start; prints the SLURM_CONF line to export
#   export SLURM_CONF=DIR/slurm.conf                    # then sbatch, srun, squeue, scancel, scontrol as usual
#   bash launchers/slurm/local_cluster.sh down [DIR]    # stop every daemon by the pid it recorded; DIR keeps the logs
#   bash launchers/slurm/local_cluster.sh status [DIR]
#
# DIR defaults to ${TMPDIR:-/tmp}/fastclr-slurm-<uid>. Install the packages with `bash launchers/install.sh --test`
# as root, or `apt-get install slurm-wlm munge`. Runs as root (slurmd starts each job's processes as the submitting
# user, which needs root); nothing outside DIR is written or read but the packages' binaries and plugins, and no
# system daemon is touched: munged gets its own key and socket, and slurm.conf points Slurm's clients at that socket.
#
# Why these settings: two slurmd on one host need distinct ports and `-N <name>`; proctrack/linuxproc and task/none
# need no cgroup set-up (a container has none to give); select/cons_tres with CR_Core hands out cores, so 1 node x 2
# ranks and 2 nodes x 1 rank both fit a 2-core machine. Node names do not resolve (no /etc/hosts edit): fastclr's
# Slurm launch takes the first node's NodeAddr from `scontrol show node` when its name does not resolve.
set -euo pipefail

cmd=${1:-}
dir=${2:-${TMPDIR:-/tmp}/fastclr-slurm-$(id -u)}
PY=${PYTHON:-python3}

die() { echo "local_cluster.sh: error: $*" >&2; exit 1; }

pids() {  # name pidfile ... of every daemon the cluster in $dir started
  for f in "$dir"/munge/munged.pid "$dir"/slurmctld.pid "$dir"/slurmd-node1.pid "$dir"/slurmd-node2.pid; do
    [ -s "$f" ] && echo "$(basename "$f" .pid) $(cat "$f")"
  done
  return 0
}

alive() { kill -0 "$1" 2>/dev/null; }

stop() {
  local name pid t
  # Slurm's daemons first (they talk to munged while shutting down), then munged.
  for want in slurmd-node2 slurmd-node1 slurmctld munged; do
    while read -r name pid; do
      [ "$name" = "$want" ] || continue
      alive "$pid" || continue
      kill -TERM "$pid" 2>/dev/null || true
      for t in $(seq 50); do alive "$pid" || break; sleep 0.1; done
      if alive "$pid"; then
        echo "local_cluster.sh: $name (pid $pid) ignored SIGTERM for 5 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done < <(pids)
  done
  # Job processes a killed slurmd left behind carry the cluster's folder in their environment; end them by pid.
  local p
  for p in $(grep -lsz "SLURM_CONF=$dir/slurm.conf" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
    [ "$p" != $$ ] && kill -KILL "$p" 2>/dev/null || true
  done
}

up() {
  [ "$(id -u)" = 0 ] || die "run as root: slurmd starts job processes as the submitting user"
  for b in munged slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null \
      || die "$b not found; install Debian's slurm-wlm and munge (bash launchers/install.sh --test as root)"
  done
  if [ -n "$(pids)" ]; then
    while read -r name pid; do
      alive "$pid" && die "a cluster already runs in $dir ($name pid $pid); '$0 down $dir' first"
    done < <(pids)
  fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local parent=$dir
  while parent=$(dirname "$parent"); [ "$parent" != / ]; do  # munged's socket must be reachable by every user
    [ "$(stat -c %A "$parent" | cut -c10)" = x ] || [ "$(stat -c %A "$parent" | cut -c10)" = t ] \
      || die "$parent is not searchable by others (munged refuses a socket below it); pick a DIR under /tmp"
  done
  rm -rf "$dir/munge" "$dir/ctld" "$dir/node1" "$dir/node2" "$dir"/*.pid "$dir"/*.log
  mkdir -p "$dir/munge" "$dir/ctld" "$dir/node1" "$dir/node2"
  chmod 0755 "$dir" "$dir/munge"  # clients (job users) reach the socket; only root may write here

  # munged refuses a key readable by others, and a socket folder others may write to or cannot enter.
  head -c 1024 /dev/urandom > "$dir/munge/munge.key"
  chmod 0400 "$dir/munge/munge.key"
  munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
         --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
    || die "munged did not start; see $dir/munge/munged.log"

  # Three free TCP ports on 127.0.0.1: slurmctld, slurmd node1, slurmd node2.
  read -r p_ctld p_n1 p_n2 < <($PY - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
  # This machine's hardware as slurmd sees it (CPUs, sockets, cores, threads, memory); both nodes claim all of it.
  hw=$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ UpTime=.*//')
  user=$(id -un)
  cat > "$dir/slurm.conf" <<EOF
# Written by launchers/slurm/local_cluster.sh: a two-node cluster on one machine, state in $dir.
ClusterName=fastclr-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$p_ctld
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
# cred_expire: Slurm holds a requeued job back for the credential lifetime + 1 s (120 s by default; measured 121 s,
# then up to a minute more for the next scheduling pass). 10 s is ample for launches on one machine.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
# Listen on 127.0.0.1 only (SlurmctldHost, NodeAddr) rather than on every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# Finished jobs stay visible to scontrol for 10 minutes (state, exit code, restart count).
MinJobAge=600
# SIGTERM to SIGKILL on a cancel, requeue or time limit: the trainers' checkpoint must fit in it.
KillWait=30
InactiveLimit=0
SlurmdTimeout=300
SchedulerType=sched/backfill
# A full scheduling pass every 2 s instead of 60: a requeued job that became eligible starts within seconds.
SchedulerParameters=sched_interval=2
NodeName=node1 NodeAddr=127.0.0.1 Port=$p_n1 $hw
NodeName=node2 NodeAddr=127.0.0.1 Port=$p_n2 $hw
PartitionName=local Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -f "$SLURM_CONF" || die "slurmctld did not start; see $dir/slurmctld.log"
  slurmd -f "$SLURM_CONF" -N node1 || die "slurmd node1 did not start; see $dir/slurmd-node1.log"
  slurmd -f "$SLURM_CONF" -N node2 || die "slurmd node2 did not start; see $dir/slurmd-node2.log"
  local t state
  for t in $(seq 300); do
    state=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')
    [ "$state" = "node1 idle node2 idle " ] && break
    sleep 0.2
  done
  if [ "$state" != "node1 idle node2 idle " ]; then
    echo "local_cluster.sh: nodes not idle after 60 s (sinfo: '$state'); last log lines:" >&2
    tail -n 5 "$dir/slurmctld.log" "$dir"/slurmd-node*.log >&2 || true
    stop
    exit 1
  fi
  echo "local_cluster.sh: cluster up in $dir: slurmctld on 127.0.0.1:$p_ctld, node1 :$p_n1, node2 :$p_n2"
  echo "export SLURM_CONF=$SLURM_CONF"
}

case "$cmd" in
  up) up ;;
  down)
    [ -d "$dir" ] || die "no cluster folder $dir"
    dir=$(cd "$dir" && pwd)
    stop
    echo "local_cluster.sh: stopped; logs in $dir" ;;
  status)
    [ -d "$dir" ] || die "no cluster folder $dir"
    while read -r name pid; do
      if alive "$pid"; then echo "$name pid $pid running"; else echo "$name pid $pid gone"; fi
    done < <(pids)
    SLURM_CONF=$dir/slurm.conf sinfo -N 2>/dev/null || true ;;
  *) echo "usage: $0 up|down|status [DIR]" >&2; exit 2 ;;
esac
