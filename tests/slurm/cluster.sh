#!/usr/bin/env bash
# A throwaway single-node SLURM cluster for tests/test_slurm.py: munged, slurmctld and slurmd of this machine,
# started without systemd, everything (config, state, sockets, logs, PID files) under one state folder.
#
#   cluster.sh start STATE_DIR   write STATE_DIR/etc/{slurm,gres}.conf from the templates beside this script,
#                                start the daemons, wait until the node is idle; then use the cluster with
#                                  export SLURM_CONF=STATE_DIR/etc/slurm.conf
#   cluster.sh stop STATE_DIR    stop the daemons by their PID files (TERM, then KILL after 10 s)
#
# /etc/slurm/slurm.conf becomes a symlink to STATE_DIR/etc/slurm.conf while the cluster runs (refused when
# that file exists and is not such a link): the executor plugin's job step (snakemake-executor-plugin-slurm-
# jobstep 0.6.1) drops every SLURM_* variable but a few before it calls srun, SLURM_CONF included, so srun
# inside a job only finds the configuration at the default path, as on a real cluster.
#
# Needs root and Debian's munge, slurmctld, slurmd (22.05). Ports: $SLURM_TEST_CTLD_PORT (16817) and
# $SLURM_TEST_SLURMD_PORT (16818). CPUs of the node: $SLURM_TEST_CPUS (default: nproc; more than the machine
# has is allowed, jobs then share the cores). One fake GPU (gres gpu:fake:1) backed by a character device node.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
cmd="${1:-}"
STATE="${2:-}"
[ -n "$cmd" ] && [ -n "$STATE" ] || { echo "usage: $0 start|stop STATE_DIR" >&2; exit 2; }
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
DAEMONS=(slurmd slurmctld munged)   # stop order
ETC_CONF=/etc/slurm/slurm.conf

log_tail() {
    for f in "$STATE"/munge/munged.log "$STATE"/slurmctld.log "$STATE"/slurmd.log "$STATE"/*.out; do
        [ -s "$f" ] && { echo "--- $f (last lines)"; tail -n 25 "$f"; }
    done >&2 || true
}

die() { echo "cluster.sh: $*" >&2; log_tail; exit 1; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_pidfile() {  # PIDFILE NAME: a daemonised process writes its PID file once it runs
    for _ in $(seq 1 100); do
        alive "$1" && return 0
        sleep 0.1
    done
    die "$2 did not start (no live PID in $1)"
}

stop() {
    local name pidfile pid
    for name in "${DAEMONS[@]}"; do
        pidfile="$STATE/$name.pid"
        [ "$name" = munged ] && pidfile="$STATE/munge/munged.pid"
        if alive "$pidfile"; then
            pid="$(cat "$pidfile")"
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            if kill -0 "$pid" 2>/dev/null; then
                echo "cluster.sh: $name ($pid) ignored TERM, killing" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
        rm -f "$pidfile"
    done
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$STATE/etc/slurm.conf" ]; then
        rm -f "$ETC_CONF"
    fi
}

start() {
    local host cpus mem_kb mem def_mem gpu_dev
    for exe in munged slurmctld slurmd sinfo scontrol; do
        command -v "$exe" >/dev/null || die "$exe not found on PATH"
    done
    [ "$(id -u)" = 0 ] || die "must run as root"
    stop  # leftovers of an earlier run with the same state folder

    host="$(hostname -s)"
    cpus="${SLURM_TEST_CPUS:-$(nproc)}"
    mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    mem=$(( mem_kb / 1024 * 85 / 100 ))           # MB, a bit below the machine's
    def_mem=$(( mem / cpus / 2 ))
    [ "$def_mem" -gt 1000 ] && def_mem=1000
    mkdir -p "$STATE"/{etc,ctld,slurmd,munge}
    chmod 700 "$STATE/munge"

    # the fake GPU: a character device with the NVIDIA major number (nothing opens it)
    gpu_dev="$STATE/fakegpu0"
    [ -e "$gpu_dev" ] || mknod "$gpu_dev" c 195 0 2>/dev/null || touch "$gpu_dev"

    for t in slurm.conf gres.conf; do
        sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM@|$mem|g" \
            -e "s|@DEF_MEM@|$def_mem|g" -e "s|@GPU_DEV@|$gpu_dev|g" \
            -e "s|@CTLD_PORT@|${SLURM_TEST_CTLD_PORT:-16817}|g" \
            -e "s|@SLURMD_PORT@|${SLURM_TEST_SLURMD_PORT:-16818}|g" \
            "$HERE/$t.in" > "$STATE/etc/$t"
    done
    export SLURM_CONF="$STATE/etc/slurm.conf"
    if [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
        [ -L "$ETC_CONF" ] && [ ! -e "$ETC_CONF" ] && rm -f "$ETC_CONF"   # dangling: an earlier run's
        [ -e "$ETC_CONF" ] && die "$ETC_CONF exists (a real SLURM installation?); not replacing it"
    fi
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -s "$SLURM_CONF" "$ETC_CONF"

    # munge with its own key and socket (slurm.conf's AuthInfo points there), as root
    if [ ! -s "$STATE/munge/munge.key" ]; then
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$STATE/munge/munge.key"
    fi
    munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed" > "$STATE/munged.out" 2>&1 \
        || die "munged failed to start"
    wait_pidfile "$STATE/munge/munged.pid" munged
    munge -n -S "$STATE/munge/munge.socket" | unmunge -S "$STATE/munge/munge.socket" >/dev/null \
        || die "munge does not work"

    # both daemonise and write their PID files; -c: start with a clean state
    slurmctld -c -f "$SLURM_CONF" > "$STATE/slurmctld.out" 2>&1 || die "slurmctld failed to start"
    wait_pidfile "$STATE/slurmctld.pid" slurmctld
    slurmd -f "$SLURM_CONF" -N "$host" > "$STATE/slurmd.out" 2>&1 || die "slurmd failed to start"
    wait_pidfile "$STATE/slurmd.pid" slurmd

    local state=""
    for _ in $(seq 1 120); do
        state="$(timeout 10 sinfo -h -N -n "$host" -o %t 2>/dev/null | head -n 1 || true)"
        case "$state" in
            idle) echo "cluster.sh: node $host idle (CPUs=$cpus RealMemory=$mem MB, gres gpu:fake:1)"
                  timeout 10 sinfo; return 0 ;;
            drain*|down*|fail*) timeout 10 scontrol show node "$host" >&2 || true
                  die "node $host is $state" ;;
        esac
        alive "$STATE/slurmctld.pid" || die "slurmctld died"
        alive "$STATE/slurmd.pid" || die "slurmd died"
        sleep 0.5
    done
    die "node $host not idle after 60 s (state '$state')"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop STATE_DIR" >&2; exit 2 ;;
esac
