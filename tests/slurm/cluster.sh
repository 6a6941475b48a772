#!/usr/bin/env bash
# A real two-node Slurm 22.05 on this one host, for the `slurm` tests (no systemd, no cgroups needed).
#   bash tests/slurm/cluster.sh start   # install (apt) if missing, configure, start daemons, wait idle
#   bash tests/slurm/cluster.sh stop    # stop the daemons by their PID files
#   bash tests/slurm/cluster.sh status
# Nodes node1/node2 both live on 127.0.0.1 (distinct slurmd ports, %n in every per-node path).
# State, spool, logs and the conf live under $KIMI_SLURM_DIR (default /tmp/kimi-slurm); the conf is
# exported to clients through SLURM_CONF, so the system's /etc/slurm is never touched.
set -euo pipefail

DIR="${KIMI_SLURM_DIR:-/tmp/kimi-slurm}"
CONF="$DIR/slurm.conf"
NODES=(node1 node2)

die() { echo "slurm cluster: $*" >&2; exit 1; }

install_slurm() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root"
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q slurmctld slurmd slurm-client munge >"$DIR/apt.log" 2>&1; then
    apt-get update -q >>"$DIR/apt.log" 2>&1 || true
    apt-get install -y -q slurmctld slurmd slurm-client munge >>"$DIR/apt.log" 2>&1 \
      || die "apt-get install slurmctld slurmd slurm-client munge failed (see $DIR/apt.log)"
  fi
}

alive() {  # alive PIDFILE: the process exists and is not a zombie (PID 1 here reaps slowly)
  local f="$1" pid state
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ -r "/proc/$pid/status" ] || return 1
  state=$(awk '/^State:/ {print $2}' "/proc/$pid/status")
  [ "$state" != "Z" ] && [ "$state" != "X" ]
}

stop_pidfile() {
  local f="$1" i
  alive "$f" || { rm -f "$f"; return 0; }
  kill "$(cat "$f")" 2>/dev/null || true
  for i in $(seq 1 50); do alive "$f" || break; sleep 0.1; done
  alive "$f" && kill -9 "$(cat "$f")" 2>/dev/null || true
  rm -f "$f"
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat >"$CONF" <<CONF
ClusterName=kimi-test
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
DependencyParameters=kill_invalid_depend
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=2
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=node1 NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start() {
  mkdir -p "$DIR"
  install_slurm
  [ "$(id -u)" = 0 ] || die "starting slurmctld/slurmd by hand needs root"
  mkdir -p "$DIR/state" "$DIR/run" "$DIR/log" "$DIR/spool/node1" "$DIR/spool/node2" "$DIR/munge"
  grep -qE '^127\.0\.0\.1\s.*\bnode1\b' /etc/hosts || echo "127.0.0.1 node1 node2" >>/etc/hosts
  write_conf
  export SLURM_CONF="$CONF"
  # munge: a key of our own, its socket in our dir (so a system munged, if any, is left alone)
  chown munge:munge "$DIR/munge" 2>/dev/null || true
  if ! alive "$DIR/munge/munged.pid"; then
    [ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
    chown munge:munge "$DIR/munge/munge.key" 2>/dev/null || true
    chmod 600 "$DIR/munge/munge.key"
    local as_munge=()
    id munge >/dev/null 2>&1 && as_munge=(runuser -u munge --)
    "${as_munge[@]}" munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
      --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munge.seed" \
      --force
  fi
  # point libmunge (slurm's auth plugin) at our socket
  grep -q "^AuthInfo=" "$CONF" || echo "AuthInfo=socket=$DIR/munge/munge.socket" >>"$CONF"
  alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF"
  for n in "${NODES[@]}"; do
    alive "$DIR/run/slurmd-$n.pid" || slurmd -f "$CONF" -N "$n"
  done
  local i
  for i in $(seq 1 150); do
    if [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u | tr -d '\n')" = "idle" ]; then
      echo "slurm cluster: ready (SLURM_CONF=$CONF)"
      return 0
    fi
    sleep 0.2
  done
  sinfo >&2 || true
  tail -n 20 "$DIR/log/slurmctld.log" >&2 || true
  die "nodes did not become idle in 30 s (logs in $DIR/log)"
}

stop() {
  export SLURM_CONF="$CONF"
  for n in "${NODES[@]}"; do stop_pidfile "$DIR/run/slurmd-$n.pid"; done
  stop_pidfile "$DIR/run/slurmctld.pid"
  stop_pidfile "$DIR/munge/munged.pid"
  echo "slurm cluster: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) export SLURM_CONF="$CONF"; sinfo ;;
  *) die "usage: $0 start|stop|status" ;;
esac
