#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (controller + compute node, munge auth), for trying
# launch/slurm.sbatch and running tests/train/test_slurm.py without a real cluster. Needs root and the
# Debian/Ubuntu packages:  apt-get install -y slurm-wlm munge
#   sudo bash launch/slurm_dev_cluster.sh start    # writes /etc/slurm/slurm.conf, starts munged, slurmctld, slurmd
#   sudo bash launch/slurm_dev_cluster.sh stop
# The node offers this machine's CPUs and memory, no GPUs; jobs run as the submitting user.
set -euo pipefail
action="${1:-start}"
[[ $EUID == 0 ]] || { echo "error: run as root (sudo): it writes /etc/slurm and starts daemons" >&2; exit 2; }
command -v slurmctld >/dev/null && command -v munged >/dev/null ||
  { echo "error: slurmctld or munged not found: apt-get install -y slurm-wlm munge" >&2; exit 2; }
STATE=/var/spool/slurm-dev

stop() {
  for pidfile in /run/slurmd-dev.pid /run/slurmctld-dev.pid; do
    [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

if [[ $action == stop ]]; then stop; exit 0; fi
[[ $action == start ]] || { echo "error: unknown action '$action': use start or stop" >&2; exit 2; }
stop

host="$(hostname -s)"
cpus="$(nproc)"
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=dev
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld-dev.pid
SlurmdPidFile=/run/slurmd-dev.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=dev Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- munged

slurmctld
slurmd
for _ in $(seq 30); do
  if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
    sinfo
    exit 0
  fi
  sleep 1
done
echo "error: the node did not come up idle in 30 s: see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1
