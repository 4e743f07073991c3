#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try `make sweep` (the SLURM path) without a
# cluster, and for the tests in tests/test_slurm.py.
#
#   sudo bash experiments/slurm/local_cluster.sh start    # install (apt) where missing, configure, start
#   bash experiments/slurm/local_cluster.sh status        # daemons, sinfo, squeue
#   make sweep EXPERIMENT=nan_map_smoke SLURM_LAUNCHER=slurm_local
#   sudo bash experiments/slurm/local_cluster.sh stop     # stops exactly the daemons `start` started
#   bash experiments/slurm/local_cluster.sh env           # `export SLURM_CONF=...` for this cluster
#
# One node with this machine's CPUs and memory, one default partition `local`, no accounting
# (squeue answers for finished jobs for MinJobAge seconds; nanlab/sweep/slurm.py polls squeue when
# sacct has no database), no cgroups (proctrack/linuxproc, task/none), so it runs in a
# container. Everything it writes lives in $NANLAB_SLURM_DIR (default /tmp/nanlab-slurm);
# it uses its own munge key and socket, so a munged or SLURM already on the machine is left
# alone, except that the ports below must be free. Where /etc/slurm/slurm.conf does not exist,
# `start` links it to this cluster's config (so sbatch, squeue and srun find it without
# SLURM_CONF) and `stop` removes that link again.
#
# Needs root: slurmd starts jobs as the submitting user. Debian/Ubuntu packages (SLURM 22.05 on
# Debian 12): slurm-wlm, munge; `start` installs them with apt-get when they are missing.
# Exit status of `start`: 0 running, 2 cannot run here (the reason on stderr), 1 failed.
set -euo pipefail

DIR=${NANLAB_SLURM_DIR:-/tmp/nanlab-slurm}
CTLD_PORT=${NANLAB_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${NANLAB_SLURMD_PORT:-6818}
KILL_WAIT=${NANLAB_SLURM_KILL_WAIT:-5}        # SIGTERM -> SIGKILL at the time limit, seconds
CRED_EXPIRE=${NANLAB_SLURM_CRED_EXPIRE:-10}   # also how long a requeued job waits (default 120 s)
CONF=$DIR/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

say() { echo "local_cluster: $*" >&2; }
cannot() { say "cannot run a SLURM cluster here: $*"; exit 2; }

pid_alive() {       # pid file -> 0 when that process runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

mark() {            # remember what this script started (and so stops)
    grep -qxF "$1" "$DIR/started" 2>/dev/null || echo "$1" >>"$DIR/started"
}

install_packages() {
    local missing=()
    for tool in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
        command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
    done
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || cannot "missing ${missing[*]}, and installing them needs root"
    command -v apt-get >/dev/null || cannot "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # the package scripts try to start the system services: refused in containers, harmless
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$DIR/apt.log" 2>&1; then
        apt-get update -q >>"$DIR/apt.log" 2>&1 || true
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$DIR/apt.log" 2>&1 \
            || cannot "apt-get install ${missing[*]} failed (see $DIR/apt.log)"
    fi
}

write_conf() {
    # slurmd -C: this machine's CPUs and memory as SLURM sees them
    local hw cpus mem
    hw=$(slurmd -C 2>/dev/null | head -1 || true)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $cpus && -n $mem ]] || cpus=$(nproc) mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024))
    mem=$((mem * 95 / 100))      # leave some to the OS; slurmd drains a node that has less than this
    cat >"$CONF" <<EOF
# written by experiments/slurm/local_cluster.sh: one node, this machine
ClusterName=nanlab
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
KillWait=$KILL_WAIT
MinJobAge=300
InactiveLimit=0
DefMemPerCPU=1024
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    mkdir -p "$DIR/munge"
    chmod 700 "$DIR/munge"
    if pid_alive "$DIR/munge/munged.pid"; then return 0; fi
    [[ -s $DIR/munge/munge.key ]] || {
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 600 "$DIR/munge/munge.key"
    }
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" || cannot "munged did not start (see $DIR/log/munged.log)"
    mark munged
}

wait_for() {        # seconds, description, command...
    local left=$1 what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((left-- > 0)) || { say "waited in vain for $what"; return 1; }
        sleep 1
    done
}

node_idle() {
    [[ $(sinfo -h -n "$NODE" -o %t 2>/dev/null) =~ ^(idle|mix|alloc) ]]
}

start() {
    if [[ -s $DIR/started ]] && pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"; then
        say "already running ($CONF)"
        return 0
    fi
    [[ $(id -u) == 0 ]] || cannot "slurmd must run as root (it starts jobs as their user); try sudo"
    mkdir -p "$DIR"/{state,spool,log}
    touch "$DIR/started"
    install_packages
    if ! pid_alive "$DIR/slurmctld.pid" && ! pid_alive "$DIR/slurmd.pid"; then
        for port in "$CTLD_PORT" "$SLURMD_PORT"; do
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                cannot "port $port is in use (another SLURM?); set NANLAB_SLURMCTLD_PORT / NANLAB_SLURMD_PORT"
            fi
        done
        write_conf
    fi
    export SLURM_CONF=$CONF
    start_munge
    if [[ ! -e $SYSTEM_CONF && -d ${SYSTEM_CONF%/*} ]]; then
        ln -s "$CONF" "$SYSTEM_CONF" && mark "link $SYSTEM_CONF"
    fi
    if ! pid_alive "$DIR/slurmctld.pid"; then
        slurmctld -c -f "$CONF" || { say "slurmctld failed:"; tail -20 "$DIR/log/slurmctld.log" >&2; stop; exit 1; }
        mark slurmctld
    fi
    if ! pid_alive "$DIR/slurmd.pid"; then
        slurmd -f "$CONF" || { say "slurmd failed:"; tail -20 "$DIR/log/slurmd.log" >&2; stop; exit 1; }
        mark slurmd
    fi
    if ! wait_for 30 "the node" node_idle; then
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        wait_for 15 "the node" node_idle || {
            say "the node did not come up:"; sinfo -N -l >&2 || true
            tail -20 "$DIR/log/slurmd.log" "$DIR/log/slurmctld.log" >&2; stop; exit 1; }
    fi
    say "running: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %t' | head -1); SLURM_CONF=$CONF"
}

stop_pid() {        # name, pid file: stop the process it names, wait until it is gone
    local name=$1 file=$2 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && { say "$name ($pid) ignores SIGTERM: SIGKILL"; kill -KILL "$pid" || true; }
    fi
    rm -f "$file"
}

stop() {
    [[ -s $DIR/started ]] || { say "nothing started here ($DIR/started)"; return 0; }
    export SLURM_CONF=$CONF
    # jobs first, so that no job outlives the cluster; then the daemons, newest first
    if grep -qx slurmctld "$DIR/started" && pid_alive "$DIR/slurmctld.pid"; then
        scancel --quiet --partition=local 2>/dev/null || true
    fi
    grep -qx slurmd "$DIR/started" && stop_pid slurmd "$DIR/slurmd.pid"
    grep -qx slurmctld "$DIR/started" && stop_pid slurmctld "$DIR/slurmctld.pid"
    grep -qx munged "$DIR/started" && stop_pid munged "$DIR/munge/munged.pid"
    if grep -qx "link $SYSTEM_CONF" "$DIR/started" && [[ $(readlink "$SYSTEM_CONF" || true) == "$CONF" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
    rm -f "$DIR/started"
    say "stopped"
}

status() {
    local up=0
    for d in slurmctld:$DIR/slurmctld.pid slurmd:$DIR/slurmd.pid munged:$DIR/munge/munged.pid; do
        if pid_alive "${d#*:}"; then echo "${d%%:*}: running (pid $(cat "${d#*:}"))"
        else echo "${d%%:*}: not running"; up=3; fi
    done
    if ((up == 0)); then
        SLURM_CONF=$CONF sinfo
        SLURM_CONF=$CONF squeue
    fi
    return $up
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 64 ;;
esac
