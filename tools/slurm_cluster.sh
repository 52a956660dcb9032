#!/usr/bin/env bash
# A SLURM cluster on this machine, for the test suite and for trying the SLURM launcher (submitit) without a
# real cluster.  Needs root and the Debian packages slurmctld slurmd slurm-client munge.
#
#   tools/slurm_cluster.sh start [--nodes N]  # idempotent; waits until every node is idle and srun works
#   tools/slurm_cluster.sh status             # each node's state; exit 0 if all are usable, else 1
#   tools/slurm_cluster.sh stop               # cancels jobs, stops what `start` started, removes what it added
#
# Without --nodes: one node, this machine itself.  With --nodes N: N nodes node1..nodeN, each a network namespace
# with its own hostname (UTS namespace), address 10.211.0.1N and slurmd, plus a namespace "storage"
# (10.211.0.2, no slurmd) for serving data to the nodes over the network.  They share a bridge with the host
# (10.211.0.1), where slurmctld runs, and this machine's filesystem (as nodes share NFS or Lustre).  Only
# addresses inside those namespaces are used; /etc/hosts gets one line per namespace, marked, removed on stop.
#
# The config goes to /etc/slurm/slurm.conf so that sbatch/sinfo/scontrol/scancel work from a plain shell;
# a slurm.conf this script did not write is never touched.  State, logs and pid files live under
# $SWAV_SLURM_DIR (default /var/lib/swav-scale-slurm).  Note: there is no slurmdbd, so `sacct` answers
# "accounting storage is disabled"; submitit then falls back to its own result files.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by swav_scale tools/slurm_cluster.sh"
HOSTS_MARK="# swav_scale tools/slurm_cluster.sh"
DIR=${SWAV_SLURM_DIR:-/var/lib/swav-scale-slurm}
# A requeued job is held until now + cred_expire + 1 s (slurmctld), so the 120 s default makes every
# requeue (preemption, `scontrol requeue`) wait 2 minutes.  5 is slurm's minimum; 10 leaves margin
# for slow step launches on a loaded machine.
CRED_EXPIRE=${SWAV_SLURM_CRED_EXPIRE:-10}
# SIGTERM-to-SIGKILL grace when a job ends or is requeued (slurm default 30 s).  submitit's ranks > 0
# ignore SIGTERM, so a requeued multi-task job sits in COMPLETING this long before that hold even starts.
KILL_WAIT=${SWAV_SLURM_KILL_WAIT:-5}
TIMEOUT=${SWAV_SLURM_TIMEOUT:-60}
HOST=$(hostname -s)
# the multi-node network: a private subnet on a bridge of our own
BRIDGE=swavbr0
NET=10.211.0
NS_PREFIX=swav-

log() { echo "slurm_cluster: $*"; }
die() { echo "slurm_cluster: ERROR: $*" >&2; exit 1; }

# The number of namespace nodes of the running (or last started) cluster; 0 = the one-node cluster.
nodes_file() { echo "$DIR/nodes"; }
running_nodes() { cat "$(nodes_file)" 2>/dev/null || echo 0; }
node_names() {  # node_names N
  if (($1 == 0)); then echo "$HOST"; else seq -f "node%g" 1 "$1"; fi
}
node_ip() { echo "$NET.$((10 + ${1#node}))"; }

# `scontrol ping` fails at once when slurmctld is down, whereas sinfo retries for ~9 s.
node_state() {
  scontrol ping >/dev/null 2>&1 || return 1
  timeout 10 sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n1
}

usable() { [[ -n $1 ]] && [[ ! $1 =~ down|drain|fail|inval|unknown|not_responding ]]; }

# Usable = controller answers and every node of an N-node cluster is neither down, drained nor unconfigured.
cluster_ok() {  # cluster_ok N
  [[ $(running_nodes) == "$1" ]] || return 1
  local name st
  for name in $(node_names "$1"); do
    st=$(node_state "$name") || return 1
    usable "$st" || return 1
  done
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  if [[ ! -f /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key; else create-munge-key -f; fi
  fi
  # munged refuses to start unless the key and its dirs belong to munge and are private.
  chown munge:munge /etc/munge /etc/munge/munge.key && chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  runuser -u munge -- munged || munged --force
  touch "$DIR/munged.ours"  # so that `stop` only stops a munged this script started
  for _ in $(seq 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.5; done
  die "munged did not come up (see /var/log/munge/munged.log)"
}

check_conf_ours() {
  if [[ -f $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite it (move it away first)"
  fi
}

write_conf() {  # write_conf N
  local n=$1 cpus mem addr="" name
  cpus=$(nproc)
  mem=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
  if ((n == 0)); then
    # Without a resolvable hostname slurmctld and slurmd cannot find each other: pin them to loopback.
    getent hosts "$HOST" >/dev/null || addr=127.0.0.1
  else
    addr=$NET.1  # slurmctld on the bridge, where the nodes reach it
  fi
  mkdir -p /etc/slurm
  {
    cat <<EOC
$MARKER
# $( ((n == 0)) && echo "One-node cluster on $HOST" || echo "$n nodes in network namespaces, slurmctld on $HOST" );
# regenerated by every \`start\`, edit the script instead.
ClusterName=swavscale
SlurmctldHost=$HOST${addr:+($addr)}
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
KillWait=$KILL_WAIT
# Trust the configured CPUs/memory: containers often report host values that would make the node INVAL.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# Look at pending jobs often, so a requeued job starts soon after its begin time has passed.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
EOC
    if ((n == 0)); then
      cat <<EOC
SlurmdSpoolDir=$DIR/spool
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST${addr:+ NodeAddr=$addr} CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOC
    else
      # every node gets all cores: the nodes take turns on them, as the tests' small jobs allow
      cat <<EOC
SlurmdSpoolDir=$DIR/spool-%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
EOC
      for name in $(node_names "$n"); do
        echo "NodeName=$name NodeAddr=$(node_ip "$name") CPUs=$cpus RealMemory=$((mem / n)) State=UNKNOWN"
      done
      echo "PartitionName=debug Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    fi
  } >"$CONF"
}

# /etc/hosts may be a bind mount (containers): rewrite it in place rather than replace it.
hosts_remove() {
  grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null || return 0
  local kept; kept=$(grep -vF "$HOSTS_MARK" /etc/hosts)
  printf '%s\n' "$kept" >/etc/hosts
}

# One namespace $NS_PREFIX$name with eth0 at $ip on the bridge, loopback up.
add_namespace() {  # add_namespace NAME IP
  local ns=$NS_PREFIX$1
  ip netns add "$ns"
  ip link add "$ns" type veth peer name eth0 netns "$ns"
  ip link set "$ns" master "$BRIDGE" up
  ip -n "$ns" addr add "$2/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  echo "$2 $1 $HOSTS_MARK" >>/etc/hosts
}

network_up() {  # network_up N
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local name
  for name in $(node_names "$1"); do add_namespace "$name" "$(node_ip "$name")"; done
  add_namespace storage "$NET.2"
}

# Everything network_up added, whatever N was; processes left inside the namespaces are killed first.
network_down() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  hosts_remove
}

# slurmd of node NAME, inside its namespace with its own hostname.  Not `ip netns exec`: it remounts /sys, and
# slurmd then finds no cgroup filesystem.
start_slurmd() {  # start_slurmd NAME
  nsenter --net="/var/run/netns/$NS_PREFIX$1" unshare -u sh -c "hostname $1 && exec slurmd -f $CONF"
}

fail_start() {
  echo "slurm_cluster: ERROR: cluster not usable after ${TIMEOUT}s: $1" >&2
  local f
  for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd*.log; do
    echo "--- last lines of $f" >&2; tail -n 15 "$f" >&2 2>/dev/null || true
  done
  exit 1
}

cmd_start() {
  local n=0
  while (($#)); do
    case $1 in
      --nodes) [[ ${2:-} =~ ^[1-9][0-9]?$ ]] || die "--nodes takes a number of nodes from 1 to 99"; n=$2; shift 2 ;;
      *) die "start: unknown argument '$1' (usage: start [--nodes N])" ;;
    esac
  done
  if cluster_ok "$n"; then log "already running"; cmd_status; return; fi
  [[ $EUID -eq 0 ]] || die "start needs root"
  check_conf_ours
  # A half-up cluster (a daemon dead, another size, an old config) is taken down and started from scratch.
  stop_daemons
  network_down
  mkdir -p "$DIR"/{state,run,log}
  start_munge
  write_conf "$n"
  echo "$n" >"$(nodes_file)"
  slurmctld
  local name
  if ((n == 0)); then
    mkdir -p "$DIR/spool"
    slurmd
  else
    network_up "$n"
    for name in $(node_names "$n"); do mkdir -p "$DIR/spool-$name"; start_slurmd "$name"; done
  fi
  local deadline=$((SECONDS + TIMEOUT)) st waiting
  while ((SECONDS < deadline)); do
    waiting=""
    for name in $(node_names "$n"); do
      st=$(node_state "$name" || true)
      [[ $st == idle* ]] && continue
      waiting="$waiting $name:${st:-no-answer}"
      # ReturnToService=2 usually clears DOWN; a node left drained by an earlier run needs a resume.
      if [[ $st =~ down|drain ]]; then scontrol update NodeName="$name" State=RESUME 2>/dev/null || true; fi
    done
    [[ -z $waiting ]] && break
    sleep 1
  done
  [[ -z $waiting ]] || fail_start "not idle:$waiting"
  local tasks=$((n > 0 ? n : ($(nproc) < 2 ? 1 : 2)))
  timeout $((deadline - SECONDS > 5 ? deadline - SECONDS : 5)) srun -N"$((n > 0 ? n : 1))" -n"$tasks" hostname \
    >/dev/null 2>&1 || fail_start "srun -n$tasks hostname failed"
  cmd_status
  log "config $CONF, state/logs under $DIR/log"
}

# Stop one daemon by its pid file and wait for it to go away.
stop_pid() {
  pid_alive "$1" || return 0
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
}

stop_daemons() {
  local f
  for f in "$DIR"/run/slurmd*.pid; do [[ -e $f ]] && stop_pid "$f"; done
  stop_pid "$DIR/run/slurmctld.pid"
}

cmd_stop() {
  if scontrol ping >/dev/null 2>&1; then
    # Cancel first so that job processes do not outlive slurmd.
    timeout 10 squeue -h -o %i 2>/dev/null | xargs -r timeout 10 scancel 2>/dev/null || true
    for _ in $(seq 20); do [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
  fi
  stop_daemons
  network_down
  rm -f "$(nodes_file)"
  if [[ -f $DIR/munged.ours ]]; then
    stop_pid /run/munge/munged.pid
    rm -f "$DIR/munged.ours"
  fi
  log "stopped"
}

cmd_status() {
  local n name st ok=0
  n=$(running_nodes)
  if ! scontrol ping >/dev/null 2>&1; then log "down"; exit 1; fi
  log "slurmctld on $HOST; $( ((n == 0)) && echo "one node, this machine" || echo "$n nodes in network namespaces")"
  for name in $(node_names "$n"); do
    st=$(node_state "$name" || true)
    usable "$st" || ok=1
    log "  $name $( ((n > 0)) && echo "$(node_ip "$name") ")${st:-no answer}"
  done
  ((n == 0)) || log "  storage $NET.2 (no slurmd)"
  return $ok
}

case ${1:-} in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 {start [--nodes N]|stop|status}" >&2; exit 2 ;;
esac
