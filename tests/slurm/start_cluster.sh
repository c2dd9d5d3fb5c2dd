#!/usr/bin/env bash
# Start (or reuse) a single-node SLURM cluster on this machine, for the launcher tests and CI.
#
#   tests/slurm/start_cluster.sh          install slurm-wlm + munge when missing, start munged, slurmctld, slurmds
#   tests/slurm/start_cluster.sh --stop   stop the daemons this script started (found by its pid files)
#
# Idempotent: when `scontrol ping` already reaches a controller with a usable node, nothing is touched.
# Exit status: 0 the cluster is up; 3 it cannot be started here (the reason is on stderr; tests skip with it).
# The cluster: partition `debug` (default) = this host as one node with its real CPU count and memory from
# `slurmd -C`; partition `multi` = two virtual 1-CPU nodes g3dr-vnode1/2 served by two more slurmd on this
# host (MULTIPLE_SLURMD; /etc/hosts maps their names to 127.0.0.1) for multi-node tests;
# proctrack/linuxproc + task/none (no cgroups needed), select/cons_tres, daemons running as root, no accounting
# database (so `sacct` is unavailable: the launcher reads job states with `scontrol show job`). Scheduling and
# kill delays are short so that tests take seconds.
set -uo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# g3dr-scale single-node test cluster (tests/slurm/start_cluster.sh)"
PARTITION=${G3DR_SLURM_PARTITION:-debug}
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
CTLD_PID=/run/slurmctld-g3dr.pid
SLURMD_PIDS=/run/slurmd-g3dr    # one pid file per node: $SLURMD_PIDS-<node>.pid
VNODES=(g3dr-vnode1 g3dr-vnode2)
VNODE_PORTS=(17001 17002)
MUNGE_PID=/run/munge/munged-g3dr.pid

say() { echo "start_cluster: $*" >&2; }
cannot() { say "cannot start SLURM here: $*"; exit 3; }

cluster_up() {
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    sinfo -h -o "%t" 2>/dev/null | grep -Eq "^(idle|mix|alloc|comp)" || return 1
}

stop_pidfile() {
    local f=$1
    [[ -f $f ]] || return 0
    local pid; pid=$(cat "$f")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$f"
}

render_conf() {  # this node's slurm.conf on stdout
    local node_line node
    node_line=$(slurmd -C 2>/dev/null | head -1)
    [[ $node_line == NodeName=* ]] || return 1
    node=$(hostname -s)
    # slurmd -C names the node after `hostname -s`; address it by loopback so no DNS is needed.
    NODE_LINE="${node_line/NodeName=* CPUs=/NodeName=$node NodeAddr=127.0.0.1 CPUs=} State=UNKNOWN"
    NODE=$node
    cat <<CONFEOF
$MARKER
ClusterName=g3drtest
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire+1 seconds before it may start again (default 120).
AuthInfo=cred_expire=5
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PIDS-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Short delays: tests wait seconds, not minutes.
SchedulerParameters=bf_interval=1,sched_interval=1,sched_min_interval=100000
MessageTimeout=5
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
MinJobAge=600
ReturnToService=2
JobRequeue=1
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
$NODE_LINE
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONFEOF
    if (( ${#VNODES[@]} == 2 )); then
        local i
        for i in 0 1; do
            echo "NodeName=${VNODES[$i]} NodeHostname=$NODE NodeAddr=127.0.0.1 Port=${VNODE_PORTS[$i]} CPUs=1" \
                 "RealMemory=1024 State=UNKNOWN"
        done
        echo "PartitionName=multi Nodes=${VNODES[0]},${VNODES[1]} MaxTime=INFINITE State=UP"
    fi
}

resolve_vnodes() {  # keep the virtual nodes only if their names resolve (root adds them to /etc/hosts)
    local v
    for v in "${VNODES[@]}"; do
        if ! getent hosts "$v" >/dev/null && [[ $(id -u) == 0 ]]; then
            echo "127.0.0.1 $v  # g3dr-scale test cluster" >>/etc/hosts 2>/dev/null
        fi
        if ! getent hosts "$v" >/dev/null; then
            say "the virtual nodes' names do not resolve (read-only /etc/hosts?): no partition multi"
            VNODES=()
            return 0
        fi
    done
}

stop_slurmds() {
    local f
    for f in $SLURMD_PIDS*.pid; do stop_pidfile "$f"; done
}

if [[ ${1:-} == "--stop" ]]; then
    stop_slurmds
    stop_pidfile $CTLD_PID
    stop_pidfile $MUNGE_PID
    say "stopped"
    exit 0
fi

resolve_vnodes

if command -v scontrol >/dev/null && cluster_up; then
    if [[ $(id -u) == 0 && -f $CONF ]] && grep -qF "$MARKER" $CONF && [[ "$(render_conf)" != "$(cat $CONF)" ]]; then
        say "the running test cluster has an older slurm.conf of ours: restarting it"
    else
        say "a SLURM cluster is already up: $(sinfo -h -o '%P %D nodes %c cpus %t' | tr '\n' ';')"
        exit 0
    fi
fi

[[ $(id -u) == 0 ]] || cannot "no SLURM controller answers and starting one needs root (running as $(id -un))"

# 1. Packages (Debian's slurm-wlm and munge).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || cannot "slurm-wlm is not installed and there is no apt-get to install it"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends slurm-wlm munge >/tmp/g3dr-slurm-apt.log 2>&1; then
        apt-get update >>/tmp/g3dr-slurm-apt.log 2>&1
        apt-get install -y --no-install-recommends slurm-wlm munge >>/tmp/g3dr-slurm-apt.log 2>&1 \
            || cannot "apt-get install slurm-wlm munge failed (see /tmp/g3dr-slurm-apt.log)"
    fi
fi

# 2. Munge: a key, its directories, the daemon.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none || cannot "could not write a munge key"
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=$MUNGE_PID 2>/tmp/g3dr-munged.err \
        || cannot "munged did not start: $(cat /tmp/g3dr-munged.err)"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null 2>&1 || cannot "munged started but credentials do not verify"
fi

# 3. slurm.conf: ours, unless someone else's is there.
if [[ -f $CONF ]] && ! grep -qF "$MARKER" $CONF; then
    cannot "$CONF exists and was not written by this script; refusing to replace it (and no controller answers)"
fi
NEW_CONF=$(mktemp)
render_conf >"$NEW_CONF" || cannot "slurmd -C could not describe this node"
NODE=$(hostname -s)
install -d -m 0755 $CONF_DIR $STATE $LOGS
for node in "$NODE" "${VNODES[@]}"; do install -d -m 0755 "$SPOOL/$node"; done
if ! cmp -s "$NEW_CONF" $CONF; then
    install -m 0644 "$NEW_CONF" $CONF
    CONF_CHANGED=1
else
    CONF_CHANGED=0
fi
rm -f "$NEW_CONF"

# 4. Daemons. A controller left from an older config of ours is restarted.
if [[ $CONF_CHANGED == 1 ]]; then
    stop_slurmds
    stop_pidfile $CTLD_PID
fi
if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
    slurmctld 2>/tmp/g3dr-slurmctld.err || cannot "slurmctld did not start: $(cat /tmp/g3dr-slurmctld.err)"
    for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.1; done
    scontrol ping 2>/dev/null | grep -q "is UP" \
        || cannot "slurmctld started but does not answer (see $LOGS/slurmctld.log)"
fi
for node in "$NODE" "${VNODES[@]}"; do
    pidfile=$SLURMD_PIDS-$node.pid
    if ! { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }; then
        slurmd -N "$node" 2>/tmp/g3dr-slurmd.err || cannot "slurmd -N $node did not start: $(cat /tmp/g3dr-slurmd.err)"
    fi
done
nodes_idle() {
    local node state
    for node in "$NODE" "${VNODES[@]}"; do
        state=$(sinfo -h -n "$node" -o "%t" 2>/dev/null | head -1)
        case $state in
            idle*|mix*|alloc*|comp*) ;;
            down*|drain*|drng*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1; return 1 ;;
            *) return 1 ;;
        esac
    done
}
for _ in $(seq 150); do nodes_idle && break; sleep 0.2; done
nodes_idle || cannot "the nodes did not become idle ($(sinfo -h -N -o '%N %t' | tr '\n' ' '); see $LOGS/slurmd-*.log)"
say "up: $(sinfo -h -o '%P %D node(s) %c cpus %m MB %t' | tr '\n' ';')"
exit 0
