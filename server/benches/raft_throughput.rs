//! Proposals per second through a 3-engine in-memory cluster (one core): the leader proposes a
//! batch, the engines replicate it over a loss-free in-memory network with instant storage,
//! and all three apply it. This measures the engine's own cost per entry — the ceiling the
//! node runtime can reach before the network and disks — at several batch sizes.
//!
//! Run: `cargo bench -p syncd --bench raft_throughput`

use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use syncd::raft::sim::mem_cluster::MemCluster;

/// Entries of 64 bytes, as small commands are.
const PAYLOAD: usize = 64;

fn bench_propose_commit_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_3_engines_in_memory");
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_secs(1));
    for batch in [1u64, 64, 1024, 4096] {
        group.throughput(Throughput::Elements(batch));
        group.bench_function(format!("propose_commit_apply/batch_{batch}"), |b| {
            let mut cluster = MemCluster::new(3, |c| {
                c.max_entries_per_msg = 4096;
                c.max_bytes_per_msg = 4 << 20;
            });
            cluster.elect(1);
            let payload = Bytes::from(vec![7u8; PAYLOAD]);
            let mut since_compaction = 0;
            b.iter(|| {
                cluster
                    .node(1)
                    .propose_batch((0..batch).map(|_| (payload.clone(), None)))
                    .expect("node 1 leads");
                cluster.flush();
                since_compaction += batch;
                if since_compaction >= 1 << 16 {
                    cluster.compact_all();
                    since_compaction = 0;
                }
            });
            // Every member applied everything that was proposed.
            let applied: Vec<u64> = cluster.applied.values().copied().collect();
            assert!(applied.windows(2).all(|w| w[0] == w[1]), "{applied:?}");
        });
    }
    group.finish();
}

criterion_group!(benches, bench_propose_commit_apply);
criterion_main!(benches);
