#!/usr/bin/env bash
# syncd's locks against etcd 3.4's lock API, on this machine, same workloads, same run.
#
# Starts a 3-member etcd cluster and a 3-node syncd cluster on 127.0.0.1, both with their data
# in one temporary directory (same disk, fsync on: etcd's default, syncd's only mode), then runs
# the four cases of issue 4's bench, each against syncd and then etcd:
#   syncctl bench locks --clients 1  --duration 10s --compare-etcd <etcd>   uncontended
#   syncctl bench locks --clients 16 --duration 10s --compare-etcd <etcd>   uncontended
#   syncctl bench locks --clients 64 --duration 10s --compare-etcd <etcd>   uncontended
#   syncctl bench locks --clients 16 --duration 10s --compare-etcd <etcd> --contended
# and prints each result table with the syncd/etcd ratios (throughput, p50, p99).
# Uncontended, every client has its own session (etcd: lease) and its own lock, and an op is an
# exclusive Acquire plus a Release. Contended, all clients loop on one lock: an op is a hand-off,
# its latency the wait for the grant. Everything it started is stopped on exit, Ctrl-C included.
#
# Needs: etcd and etcdctl (Debian/Ubuntu: apt-get install etcd-server etcd-client), cargo.
# It installs nothing. It builds syncd and syncctl in release mode (SKIP_BUILD=1 to skip).
#
# Usage: benches/locks_vs_etcd.sh [extra `syncctl bench locks` flags, e.g. --connections 4]
# Environment:
#   DURATION=10s         measured time per case
#   CASES="1 16 64 16c"  one run per case: a client count, with a `c` suffix for contended
#   OUTPUT=table|json    result format
#   BENCH_DIR, SYNCD_BASE_PORT, KEEP, SKIP_BUILD: see benches/lib/clusters.sh
set -euo pipefail

DURATION=${DURATION:-10s}
CASES=${CASES:-"1 16 64 16c"}
OUTPUT=${OUTPUT:-table}

for case in $CASES; do
    [[ $case =~ ^[0-9]+c?$ ]] || {
        echo "locks_vs_etcd: error: case '$case' in CASES is not a client count, optionally with a c suffix (e.g. \"1 16 64 16c\")" >&2
        exit 2
    }
done

# shellcheck source=lib/clusters.sh
. "$(dirname "$0")/lib/clusters.sh"
start_clusters

for case in $CASES; do
    clients=${case%c}
    mode=()
    label="uncontended, a lock per client"
    if [ "$clients" != "$case" ]; then
        mode=(--contended)
        label="contended, all on one lock"
    fi
    echo
    echo "== $clients client(s), $label, $DURATION"
    run_syncctl --output "$OUTPUT" bench locks "${mode[@]}" \
        --clients "$clients" --duration "$DURATION" --compare-etcd "$ETCD_ENDPOINTS" "$@"
done
