#!/usr/bin/env bash
# syncd's queue against Redis Streams on a local redis-server, on this machine, same run.
#
# Starts a 3-node syncd cluster (data in a temporary directory, fsync on: syncd's only mode)
# and a redis-server on 127.0.0.1 (unreplicated, no persistence: `--save '' --appendonly no`),
# then runs, for each client count in CLIENTS and each mode in MODES,
#   syncctl bench queue --mode MODE --clients N --duration D --compare-redis <redis>
# and prints each result table with the syncd/redis ratios (throughput, p50, p99).
# Modes: publish (one message per Publish / XADD), publish-batch (BATCH messages per
# PublishBatch / pipelined XADDs), end-to-end (rounds of publish BATCH, consume them, ack them:
# XADD, XREADGROUP, XACK; latency from publish start to delivery, per message).
# Messages are 256 bytes; each client has its own topic (stream). Everything it started is
# stopped on exit, Ctrl-C included.
#
# Needs: redis-server (Debian/Ubuntu: apt-get install redis-server), cargo. It installs
# nothing. It builds syncd and syncctl in release mode (SKIP_BUILD=1 to skip).
#
# Usage: benches/queue_vs_redis.sh [extra `syncctl bench queue` flags, e.g. --topics 3]
# Environment:
#   DURATION=10s                          measured time per run
#   CLIENTS="1 16 64"                     one run per client count and mode
#   MODES="publish publish-batch end-to-end"
#   BATCH=32                              messages per batch
#   OUTPUT=table|json                     result format
#   REDIS_PORT=16379, BENCH_DIR, SYNCD_BASE_PORT, KEEP, SKIP_BUILD: see benches/lib/clusters.sh
set -euo pipefail

DURATION=${DURATION:-10s}
CLIENTS=${CLIENTS:-"1 16 64"}
MODES=${MODES:-"publish publish-batch end-to-end"}
BATCH=${BATCH:-32}
OUTPUT=${OUTPUT:-table}

for mode in $MODES; do
    case $mode in
        publish | publish-batch | end-to-end) ;;
        *)
            echo "queue_vs_redis: error: mode '$mode' in MODES is not publish, publish-batch or end-to-end" >&2
            exit 2
            ;;
    esac
done

# shellcheck source=lib/clusters.sh
. "$(dirname "$0")/lib/clusters.sh"
start_syncd_and_redis

for mode in $MODES; do
    for clients in $CLIENTS; do
        echo
        echo "== $mode, $clients client(s), $DURATION"
        run_syncctl --output "$OUTPUT" bench queue --mode "$mode" --batch "$BATCH" \
            --clients "$clients" --duration "$DURATION" --compare-redis "$REDIS_URL" "$@"
    done
done
