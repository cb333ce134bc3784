#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, to try bdexp's cluster path (hydra/launcher=slurm)
# on a laptop and to test it in CI. Needs root and apt (Debian / Ubuntu).
#
#   scripts/local_slurm.sh up       install what is missing, write the configs, start munged,
#                                   MariaDB + slurmdbd (accounting, so `sacct` answers submitit),
#                                   slurmctld and slurmd; wait (bounded) until the node is idle
#   scripts/local_slurm.sh down     stop the daemons `up` started (nothing else)
#   scripts/local_slurm.sh status   sinfo and the daemons' pids
#
# Then, e.g.:
#   bdexp -m hydra/launcher=slurm hydra.launcher.partition=bdexp hydra.launcher.gpus_per_node=0 \
#         hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=1 'hydra.launcher.setup=[]' \
#         attack=patched,blended train.epochs=3
#
# Everything lives under $BDEXP_SLURM_STATE (default /var/tmp/bdexp-slurm): configs' state, logs,
# pid files and the list of daemons this script started. The node gets all CPUs and
# $BDEXP_SLURM_MEM_MB of memory (default 4096); the partition is $BDEXP_SLURM_PARTITION (bdexp).
set -euo pipefail

STATE=${BDEXP_SLURM_STATE:-/var/tmp/bdexp-slurm}
PARTITION=${BDEXP_SLURM_PARTITION:-bdexp}
MEM_MB=${BDEXP_SLURM_MEM_MB:-4096}
WAIT_S=${BDEXP_SLURM_WAIT_S:-90}
CLUSTER=bdexp
HOST=$(hostname -s)
ETC=/etc/slurm
DB_PASS=bdexp-local  # a local MariaDB user for slurmdbd only; the database listens on localhost

say() { echo "local_slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v munged >/dev/null || missing+=(munge)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    # policy-rc.d may refuse to start services during install (containers); we start them ourselves
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

started() { echo "$1" >> "$STATE/started"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local t=0
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1))
    [ "$t" -le "$limit" ] || return 1
    sleep 1
  done
  say "$what after ${t}s"
}

write_configs() {
  mkdir -p "$ETC" "$STATE"/{ctld,d,log}
  cat > "$ETC/slurm.conf" <<EOF
# Written by bdexp's scripts/local_slurm.sh: one node, one partition, accounting via slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=10
SchedulerType=sched/backfill
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStoreFlags=job_comment
NodeName=$HOST CPUs=$(nproc) RealMemory=$MEM_MB Features=bdexp State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$ETC/slurmdbd.conf" <<EOF
# Written by bdexp's scripts/local_slurm.sh.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
EOF
  chmod 600 "$ETC/slurmdbd.conf"
}

start_munge() {
  if munge -n >/dev/null 2>&1; then return; fi  # a munged that answers (another one is shutting down: wait)
  for _ in $(seq 20); do pgrep -x munged >/dev/null || break; sleep 0.5; done
  [ -s /etc/munge/munge.key ] || { (mungekey --create 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null); }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  started munged
  wait_for 10 "munged answers" munge -n || die "munged did not start (see /var/log/munge/munged.log)"
}

start_mariadb() {
  if ! mysqladmin ping >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    (mysqld_safe --skip-networking=0 --bind-address=127.0.0.1 >"$STATE/log/mariadb.log" 2>&1 &)
    started mariadb
    wait_for 60 "MariaDB answers" mysqladmin ping || die "MariaDB did not start (see $STATE/log/mariadb.log)"
  fi
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurm() {
  pgrep -x slurmdbd >/dev/null || { slurmdbd; started slurmdbd; }  # (after munged: it signs with it)
  wait_for 30 "slurmdbd answers" sacctmgr -n list cluster || die "slurmdbd did not start (see $STATE/log/slurmdbd.log)"
  sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
  # an account for root, so `hydra.launcher.account=bdexp` (sbatch --account) is a real one
  sacctmgr -i -Q add account bdexp cluster="$CLUSTER" >/dev/null 2>&1 || true
  sacctmgr -i -Q add user root account=bdexp cluster="$CLUSTER" >/dev/null 2>&1 || true
  pgrep -x slurmctld >/dev/null || { slurmctld; started slurmctld; }
  pgrep -x slurmd >/dev/null || { slurmd; started slurmd; }
  node_idle() { sinfo -h -N -o %t | grep -qx idle; }
  if ! wait_for "$WAIT_S" "node $HOST idle" node_idle; then
    sinfo -N -l >&2 || true
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    die "the node did not become idle within ${WAIT_S}s"
  fi
}

up() {
  need_root
  install_packages
  mkdir -p "$STATE"
  : > "$STATE/started"
  write_configs
  start_munge
  start_mariadb
  start_slurm
  say "up: partition $PARTITION on $HOST ($(nproc) CPUs, ${MEM_MB} MB); down: $0 down"
}

stop_pidfile() {
  local f=$1
  [ -s "$f" ] || return 0
  local pid; pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  need_root
  [ -f "$STATE/started" ] || { say "nothing started by this script"; return 0; }
  scancel --user=root >/dev/null 2>&1 || true
  tac "$STATE/started" | while read -r daemon; do
    case $daemon in
      slurmd) stop_pidfile "$STATE/slurmd.pid" ;;
      slurmctld) stop_pidfile "$STATE/slurmctld.pid" ;;
      slurmdbd) stop_pidfile "$STATE/slurmdbd.pid" ;;
      mariadb) mysqladmin shutdown >/dev/null 2>&1 || true ;;
      munged) pkill -x munged || true; for _ in $(seq 20); do pgrep -x munged >/dev/null || break; sleep 0.5; done ;;
    esac
    say "stopped $daemon"
  done
  rm -f "$STATE/started"
}

status() {
  sinfo -N -l || true
  for d in munged mariadbd slurmdbd slurmctld slurmd; do printf '%-10s %s\n' "$d" "$(pgrep -x "$d" | tr '\n' ' ')"; done
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
