# Shared by the benches/*_vs_etcd.sh and *_vs_redis.sh scripts (sourced, not run): a 3-member
# etcd cluster (or a redis-server) and a 3-node syncd cluster on 127.0.0.1, both with their data in one temporary directory (same disk,
# fsync on: etcd's default, syncd's only mode), the release binaries, and a cleanup that stops
# everything it started on exit, Ctrl-C included.
#
# The sourcing script calls `start_clusters` (etcd) or `start_syncd_and_redis`, then
# `run_syncctl ARGS...` once per run; after it, SYNC_ENDPOINTS and ETCD_ENDPOINTS (or
# REDIS_URL) name the two systems. The redis-server is unreplicated and keeps nothing on disk
# (`--save '' --appendonly no`): the in-memory reference the queue and cache issues name.
#
# Needs: etcd and etcdctl (Debian/Ubuntu: apt-get install etcd-server etcd-client), cargo.
# It installs nothing. It builds syncd and syncctl in release mode (SKIP_BUILD=1 to skip).
# Environment:
#   BENCH_DIR=/tmp       where the temporary data directory goes (choose the disk to measure)
#   SYNCD_BASE_PORT=17000  syncd nodes on 17001-17003, metrics on 19001-19003
#   KEEP=1               keep the data directory and logs afterwards
#   SKIP_BUILD=1         use the binaries already built in target/release

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SYNCD_BASE_PORT=${SYNCD_BASE_PORT:-17000}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SYNCCTL=$TARGET_DIR/release/syncctl
SYNCD=$TARGET_DIR/release/syncd

ETCD_CLIENT_PORTS=(23791 23792 23793)
ETCD_PEER_PORTS=(23801 23802 23803)
ETCD_ENDPOINTS=http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793
REDIS_PORT=${REDIS_PORT:-16379}
REDIS_URL=redis://127.0.0.1:$REDIS_PORT
SYNC_ENDPOINTS=$(printf '127.0.0.1:%d,' $((SYNCD_BASE_PORT + 1)) $((SYNCD_BASE_PORT + 2)) $((SYNCD_BASE_PORT + 3)))
SYNC_ENDPOINTS=${SYNC_ENDPOINTS%,}

BENCH_NAME=$(basename "$0" .sh)
say() { echo "$BENCH_NAME: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# Bounded wait: `wait_until SECONDS COMMAND...` polls COMMAND every 0.2 s until it succeeds.
wait_until() {
    local seconds=$1
    shift
    local tries=$((seconds * 5))
    until "$@" > /dev/null 2>&1; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        sleep 0.2
    done
}

port_busy() { (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }

WORK=
ETCD_PIDS=()
REDIS_PID=
DEV_PID=
BENCH_PID=

# Stops a process: SIGTERM (SIGINT for `dev up`, which then stops its nodes), then SIGKILL if it
# is still there after a grace period. Bounded.
stop() {
    local pid=$1 signal=$2 grace=$3
    kill -0 "$pid" 2> /dev/null || return 0
    kill "-$signal" "$pid" 2> /dev/null || true
    local tries=$((grace * 5))
    while kill -0 "$pid" 2> /dev/null && [ "$tries" -gt 0 ]; do
        sleep 0.2
        tries=$((tries - 1))
    done
    if kill -0 "$pid" 2> /dev/null; then
        say "pid $pid did not stop in ${grace}s; killing it"
        kill -KILL "$pid" 2> /dev/null || true
    fi
    wait "$pid" 2> /dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    [ -z "$BENCH_PID" ] || stop "$BENCH_PID" TERM 5
    [ -z "$DEV_PID" ] || stop "$DEV_PID" INT 20
    for pid in "${ETCD_PIDS[@]}"; do stop "$pid" TERM 10; done
    [ -z "$REDIS_PID" ] || stop "$REDIS_PID" TERM 10
    [ -n "$WORK" ] || exit "$status"
    # Kept when asked, and after a failure (130 and 143 are Ctrl-C and SIGTERM, not failures).
    if [ "${KEEP:-0}" = 1 ] || { [ "$status" -ne 0 ] && [ "$status" -ne 130 ] && [ "$status" -ne 143 ]; }; then
        say "logs and data kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}

# Builds, starts both clusters and waits until each has a leader.
start_clusters() {
    local tool port
    for tool in etcd etcdctl; do
        command -v "$tool" > /dev/null ||
            die "$tool not found; install it (Debian/Ubuntu: apt-get install etcd-server etcd-client)"
    done
    for port in "${ETCD_CLIENT_PORTS[@]}" "${ETCD_PEER_PORTS[@]}"; do
        ! port_busy "$port" || die "port $port is in use on 127.0.0.1; is another etcd running?"
    done
    prepare_work
    start_etcd
    start_syncd
    say "versions: $(etcd --version | head -1), syncd $("$SYNCD" --version 2> /dev/null | awk '{print $2}')"
}

# The syncd cluster and a local redis-server (no persistence) on REDIS_PORT.
start_syncd_and_redis() {
    command -v redis-server > /dev/null ||
        die "redis-server not found; install it (Debian/Ubuntu: apt-get install redis-server)"
    ! port_busy "$REDIS_PORT" || die "port $REDIS_PORT is in use on 127.0.0.1; set REDIS_PORT"
    prepare_work
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize no --dir "$WORK" > "$WORK/redis.log" 2>&1 &
    REDIS_PID=$!
    say "waiting for redis ($REDIS_URL)"
    wait_until 30 port_busy "$REDIS_PORT" || die "redis-server did not start; see $WORK/redis.log"
    start_syncd
    say "versions: $(redis-server --version | awk '{print $1, $2, $3}'), syncd $("$SYNCD" --version 2> /dev/null | awk '{print $2}')"
}

# The release binaries, the data directory, the traps.
prepare_work() {
    if [ "${SKIP_BUILD:-0}" != 1 ]; then
        say "building syncd and syncctl (release)"
        (cd "$ROOT" && cargo build --release --quiet -p syncd -p syncctl)
    fi
    [ -x "$SYNCCTL" ] && [ -x "$SYNCD" ] || die "no release binaries in $TARGET_DIR/release; run without SKIP_BUILD"

    WORK=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/$BENCH_NAME.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    local fs_type
    fs_type=$(stat -f -c %T "$WORK")
    case $fs_type in
        tmpfs | ramfs) say "warning: $WORK is on $fs_type: fsync costs nothing there; set BENCH_DIR to a directory on a disk" ;;
    esac
    say "machine: $(nproc) cores, $(uname -sr), data on $fs_type ($WORK), load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

start_etcd() {
    local i client peer initial=""
    # --- etcd: 3 members on loopback, default settings (fsync on, 100 ms heartbeat, 1 s election).
    for i in 1 2 3; do initial+="e$i=http://127.0.0.1:${ETCD_PEER_PORTS[$((i - 1))]},"; done
    initial=${initial%,}
    mkdir -p "$WORK/etcd"
    for i in 1 2 3; do
        client=http://127.0.0.1:${ETCD_CLIENT_PORTS[$((i - 1))]}
        peer=http://127.0.0.1:${ETCD_PEER_PORTS[$((i - 1))]}
        etcd --name "e$i" --data-dir "$WORK/etcd/e$i" \
            --listen-client-urls "$client" --advertise-client-urls "$client" \
            --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
            --initial-cluster "$initial" --initial-cluster-token "syncd-bench-$$" \
            --initial-cluster-state new \
            --logger zap --log-outputs stderr > "$WORK/etcd/e$i.log" 2>&1 &
        ETCD_PIDS+=($!)
    done
    say "waiting for etcd ($ETCD_ENDPOINTS)"
    wait_until 30 etcdctl --endpoints "$ETCD_ENDPOINTS" --command-timeout=1s endpoint health ||
        die "etcd did not become healthy within 30s; see $WORK/etcd/e*.log"
}

start_syncd() {
    # --- syncd: 3 nodes through `syncctl dev up`, which supervises them and stops them on SIGINT.
    "$SYNCCTL" dev up --nodes 3 --base-port "$SYNCD_BASE_PORT" --data-dir "$WORK/syncd" --syncd "$SYNCD" \
        > "$WORK/syncd-dev.out" 2> "$WORK/syncd-dev.err" &
    DEV_PID=$!
    say "waiting for syncd ($SYNC_ENDPOINTS)"
    local tries=200 # 40 s; `dev up` itself gives up after 30 s without a leader
    until grep -qs '^leader' "$WORK/syncd-dev.out"; do
        if ! kill -0 "$DEV_PID" 2> /dev/null || [ "$tries" -eq 0 ]; then
            cat "$WORK/syncd-dev.err" >&2
            die "syncd did not start; see $WORK/syncd-dev.err and $WORK/syncd/*/syncd.log"
        fi
        tries=$((tries - 1))
        sleep 0.2
    done
}

# `run_syncctl ARGS...`: syncctl against the syncd cluster, e.g. `run_syncctl bench raw ...`.
# In the background, and waited for: bash runs its traps (Ctrl-C, SIGTERM) at once during
# `wait`, but only after a foreground command has finished.
run_syncctl() {
    "$SYNCCTL" --endpoints "$SYNC_ENDPOINTS" "$@" &
    BENCH_PID=$!
    wait "$BENCH_PID"
    BENCH_PID=
}
