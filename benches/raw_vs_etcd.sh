#!/usr/bin/env bash
# syncd's replicated write (Kv.Put) against etcd's (KV.Put), on this machine, same workload.
#
# Starts a 3-member etcd cluster and a 3-node syncd cluster on 127.0.0.1, both with their data
# in one temporary directory (same disk, fsync on: etcd's default, syncd's only mode), then runs
#   syncctl bench raw --clients 1  --duration 10s --compare-etcd <etcd>
#   syncctl bench raw --clients 64 --duration 10s --compare-etcd <etcd>
# and prints both result tables. Everything it started is stopped on exit, Ctrl-C included.
#
# Needs: etcd and etcdctl (Debian/Ubuntu: apt-get install etcd-server etcd-client), cargo.
# It installs nothing. It builds syncd and syncctl in release mode (SKIP_BUILD=1 to skip).
#
# Usage: benches/raw_vs_etcd.sh [extra `syncctl bench raw` flags, e.g. --value-size 1024]
# Environment:
#   DURATION=10s         measured time per run
#   CLIENTS="1 64"       one run per client count
#   OUTPUT=table|json    result format
#   BENCH_DIR, SYNCD_BASE_PORT, KEEP, SKIP_BUILD: see benches/lib/clusters.sh
set -euo pipefail

DURATION=${DURATION:-10s}
CLIENTS=${CLIENTS:-"1 64"}
OUTPUT=${OUTPUT:-table}

# shellcheck source=lib/clusters.sh
. "$(dirname "$0")/lib/clusters.sh"
start_clusters

for clients in $CLIENTS; do
    echo
    echo "== $clients client(s), $DURATION"
    run_syncctl --output "$OUTPUT" bench raw \
        --clients "$clients" --duration "$DURATION" --compare-etcd "$ETCD_ENDPOINTS" "$@"
done
