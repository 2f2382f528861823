#!/usr/bin/env bash
# syncd's coherent cache against Redis GET/SET on a local redis-server, on this machine, same run.
#
# Starts a 3-node syncd cluster (data in a temporary directory, fsync on: syncd's only mode)
# and a redis-server on 127.0.0.1 (unreplicated, no persistence: `--save '' --appendonly no`),
# then runs, for each case in CASES and each client count in CLIENTS,
#   syncctl bench cache --mode hit       --clients N ...   Get from the node's own line | GET
#   syncctl bench cache --mode miss      --clients N ...   Get just after another node's write | GET
#   syncctl bench cache --mode write --sharers S ...       Set invalidating S sharers | SET,
#                                                          beside bench raw's Kv.Put
# and prints each result table with the syncd/redis ratios and, for writes, the cache write's
# cost over the plain replicated write. Values are 256 bytes; the clients are spread over the
# three nodes. Everything it started is stopped on exit, Ctrl-C included.
#
# Needs: redis-server (Debian/Ubuntu: apt-get install redis-server), cargo. It installs
# nothing. It builds syncd and syncctl in release mode (SKIP_BUILD=1 to skip).
#
# Usage: benches/cache_vs_redis.sh [extra `syncctl bench cache` flags, e.g. --value-size 1024]
# Environment:
#   DURATION=10s                           measured time per run
#   CLIENTS="1 16 64"                      one run per client count and case
#   CASES="hit miss write0 write1 write2"  writeS: --mode write --sharers S
#   OUTPUT=table|json                      result format
#   REDIS_PORT=16379, BENCH_DIR, SYNCD_BASE_PORT, KEEP, SKIP_BUILD: see benches/lib/clusters.sh
set -euo pipefail

DURATION=${DURATION:-10s}
CLIENTS=${CLIENTS:-"1 16 64"}
CASES=${CASES:-"hit miss write0 write1 write2"}
OUTPUT=${OUTPUT:-table}

for case in $CASES; do
    [[ $case =~ ^(hit|miss|write[0-2])$ ]] || {
        echo "cache_vs_redis: error: case '$case' in CASES is not hit, miss, write0, write1 or write2" >&2
        exit 2
    }
done

# shellcheck source=lib/clusters.sh
. "$(dirname "$0")/lib/clusters.sh"
start_syncd_and_redis

for case in $CASES; do
    mode=(--mode "$case")
    if [[ $case == write* ]]; then
        mode=(--mode write --sharers "${case#write}")
    fi
    for clients in $CLIENTS; do
        echo
        echo "== ${mode[*]}, $clients client(s), $DURATION"
        run_syncctl --output "$OUTPUT" bench cache "${mode[@]}" \
            --clients "$clients" --duration "$DURATION" --compare-redis "$REDIS_URL" "$@"
    done
done
