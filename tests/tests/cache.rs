//! The coherent cache on real processes: the original design's scenario with each node's MESI
//! state; concurrent writers on every node with readers everywhere, none of which may read a
//! stale value; and a node that restarts reads the writes it missed.
//!
//! A new directory (a new leader) caches nothing and writes nothing for one lease (5 s by
//! default) after it starts, so the first write of each test waits that long.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use sync_tests::api::{self, MesiState};
use sync_tests::wait::eventually;
use sync_tests::{Cluster, Options, scenario};
use tokio::time::Instant;
use tonic::Request;

/// Deadline of one cache call: a write may wait out a new directory's first lease.
const CALL: Duration = Duration::from_secs(10);

fn request<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(CALL);
    r
}

async fn set(c: &Cluster, id: u64, key: &str, value: &str) -> anyhow::Result<u64> {
    let r = c
        .client(id)
        .cache()
        .set(request(api::CacheSetRequest {
            key: key.into(),
            value: Bytes::from(value.to_string()),
            ..Default::default()
        }))
        .await
        .with_context(|| format!("Set {key}={value} on node {id}"))?;
    Ok(r.into_inner().version)
}

async fn get(c: &Cluster, id: u64, key: &str) -> anyhow::Result<api::CacheGetResponse> {
    let r = c
        .client(id)
        .cache()
        .get(request(api::CacheGetRequest { key: key.into() }))
        .await
        .with_context(|| format!("Get {key} on node {id}"))?;
    Ok(r.into_inner())
}

async fn state(c: &Cluster, id: u64, key: &str) -> anyhow::Result<api::CacheStateResponse> {
    let r = c
        .client(id)
        .cache()
        .state(request(api::CacheStateRequest { key: key.into() }))
        .await
        .with_context(|| format!("State {key} on node {id}"))?;
    Ok(r.into_inner())
}

fn mesi(s: i32) -> MesiState {
    MesiState::try_from(s).unwrap_or(MesiState::Invalid)
}

/// Sets `key` through node `id`, retrying while the new directory waits out its first lease.
async fn first_set(c: &Cluster, id: u64, key: &str, value: &str) -> anyhow::Result<u64> {
    eventually(
        &format!("Set {key} on node {id}"),
        Duration::from_secs(30),
        async || set(c, id, key, value).await,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_scenario_set_on_node_1_misses_then_hits_and_shows_mesi_states() {
    scenario(3, Options::default(), Duration::from_secs(90), async |c| {
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        // Absorbs the new directory's first lease, by which time every node holds a lease.
        first_set(c, 1, "warm-up", "x").await?;
        let v1 = set(c, 1, "k1", "v1").await?;
        ensure!(v1 > 0, "Set answered version 0");
        let s1 = state(c, 1, "k1").await?;
        ensure!(
            mesi(s1.state) == MesiState::Modified && s1.version == v1,
            "node 1 after its Set: {s1:?}"
        );

        // Node 2 misses, fills, and both lines end Shared (node 1's M line was recalled).
        let g2 = get(c, 2, "k1").await?;
        ensure!(!g2.hit, "node 2's first Get hit: {g2:?}");
        ensure!(g2.found && g2.value == "v1" && g2.version == v1, "{g2:?}");
        ensure!(
            mesi(g2.state) == MesiState::Shared,
            "node 2 after its fill: {g2:?}"
        );

        // Node 1 hits.
        let g1 = get(c, 1, "k1").await?;
        ensure!(g1.hit && g1.value == "v1" && g1.version == v1, "{g1:?}");
        ensure!(
            mesi(g1.state) == MesiState::Shared,
            "node 1 after the recall: {g1:?}"
        );
        // So does node 2 now.
        let g2 = get(c, 2, "k1").await?;
        ensure!(g2.hit && g2.version == v1, "node 2's second Get: {g2:?}");

        // State per node: 1 and 2 Shared with a lease, 3 Invalid; the directory (on the
        // leader) records 1 and 2 as Shared.
        for (id, want) in [
            (1, MesiState::Shared),
            (2, MesiState::Shared),
            (3, MesiState::Invalid),
        ] {
            let s = state(c, id, "k1").await?;
            ensure!(mesi(s.state) == want, "node {id}: {s:?}");
            ensure!(s.directory_node_id == leader.id, "node {id}: {s:?}");
            if want != MesiState::Invalid {
                ensure!(
                    s.version == v1 && s.lease_remaining_ms > 0,
                    "node {id}: {s:?}"
                );
            }
        }
        let s = state(c, leader.id, "k1").await?;
        let holders: Vec<(u64, MesiState)> = s
            .holders
            .iter()
            .map(|h| (h.node_id, mesi(h.state)))
            .collect();
        ensure!(
            holders == vec![(1, MesiState::Shared), (2, MesiState::Shared)],
            "the directory's holders: {s:?}"
        );
        ensure!(s.directory_version == v1, "{s:?}");

        // A write on node 3 invalidates both; node 1 then misses and reads it.
        let v2 = set(c, 3, "k1", "v2").await?;
        ensure!(v2 > v1);
        let s3 = state(c, 3, "k1").await?;
        ensure!(
            mesi(s3.state) == MesiState::Modified,
            "node 3 after its Set: {s3:?}"
        );
        let g1 = get(c, 1, "k1").await?;
        ensure!(!g1.hit && g1.value == "v2" && g1.version == v2, "{g1:?}");
        Ok(())
    })
    .await;
}

/// A completed operation, timed on the test's clock.
#[derive(Clone, Debug)]
struct Op {
    key: String,
    version: u64,
    value: String,
    start: Instant,
    end: Instant,
}

/// Per key: operations by completion time, each with the highest version completed by then.
fn prefix_max(ops: &[Op]) -> BTreeMap<String, Vec<(Instant, u64)>> {
    let mut by_key: BTreeMap<String, Vec<(Instant, u64)>> = BTreeMap::new();
    for o in ops {
        by_key
            .entry(o.key.clone())
            .or_default()
            .push((o.end, o.version));
    }
    for list in by_key.values_mut() {
        list.sort();
        let mut max = 0;
        for entry in list.iter_mut() {
            max = max.max(entry.1);
            entry.1 = max;
        }
    }
    by_key
}

/// The highest version of `key` among operations completed before `t`.
fn floor_at(prefix: &BTreeMap<String, Vec<(Instant, u64)>>, key: &str, t: Instant) -> u64 {
    let Some(list) = prefix.get(key) else {
        return 0;
    };
    match list.partition_point(|(end, _)| *end < t) {
        0 => 0,
        i => list[i - 1].1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_every_node_and_no_reader_sees_a_stale_value() {
    scenario(3, Options::default(), Duration::from_secs(120), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let keys = ["a", "b", "c"];
        for k in keys {
            first_set(c, 1, k, "init").await?;
        }
        let writes: Arc<Mutex<Vec<Op>>> = Arc::default();
        let reads: Arc<Mutex<Vec<Op>>> = Arc::default();
        let stop = Instant::now() + Duration::from_secs(8);
        let mut tasks = Vec::new();
        for id in c.ids() {
            let client = c.client(id);
            let writes = writes.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < stop {
                    n += 1;
                    let key = keys[(n as usize) % keys.len()];
                    let value = format!("n{id}-{n}");
                    let start = Instant::now();
                    let r = client
                        .cache()
                        .set(request(api::CacheSetRequest {
                            key: key.into(),
                            value: Bytes::from(value.clone()),
                            ..Default::default()
                        }))
                        .await;
                    // A failed or timed-out write is simply not counted as completed.
                    if let Ok(r) = r {
                        writes.lock().expect("lock").push(Op {
                            key: key.into(),
                            version: r.into_inner().version,
                            value,
                            start,
                            end: Instant::now(),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
            for reader in 0..2 {
                let client = c.client(id);
                let reads = reads.clone();
                tasks.push(tokio::spawn(async move {
                    let mut n = reader;
                    while Instant::now() < stop {
                        n += 1;
                        let key = keys[n % keys.len()];
                        let start = Instant::now();
                        let r = client
                            .cache()
                            .get(request(api::CacheGetRequest { key: key.into() }))
                            .await;
                        if let Ok(r) = r {
                            let r = r.into_inner();
                            reads.lock().expect("lock").push(Op {
                                key: key.into(),
                                version: r.version,
                                value: String::from_utf8_lossy(&r.value).into_owned(),
                                start,
                                end: Instant::now(),
                            });
                        }
                        // Leaves the two shared cores to the nodes.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }));
            }
        }
        for t in tasks {
            t.await?;
        }
        let writes = writes.lock().expect("lock").clone();
        let reads = reads.lock().expect("lock").clone();
        ensure!(writes.len() >= 30, "only {} writes completed", writes.len());
        ensure!(reads.len() >= 100, "only {} reads completed", reads.len());
        let by_version: BTreeMap<(String, u64), String> = writes
            .iter()
            .map(|w| ((w.key.clone(), w.version), w.value.clone()))
            .collect();
        let write_floor = prefix_max(&writes);
        let read_floor = prefix_max(&reads);
        for r in &reads {
            // No phantom: a version some write was acknowledged with carries that write's value.
            if let Some(v) = by_version.get(&(r.key.clone(), r.version)) {
                ensure!(
                    *v == r.value,
                    "read {r:?} but version {} was {v}",
                    r.version
                );
            }
            // No stale read: not older than a write completed before the read began.
            let floor = floor_at(&write_floor, &r.key, r.start);
            ensure!(
                r.version >= floor,
                "stale read {r:?}: a write of version {floor} had completed"
            );
            // Reads do not go back in time.
            let seen = floor_at(&read_floor, &r.key, r.start);
            ensure!(
                r.version >= seen,
                "read {r:?} went back before version {seen}"
            );
        }
        let hits: u64 = {
            let mut total = 0;
            for id in c.ids() {
                let s = c
                    .client(id)
                    .cache()
                    .stats(request(api::CacheStatsRequest {}))
                    .await?
                    .into_inner();
                total += s.hits;
            }
            total
        };
        ensure!(hits > 0, "no read was a hit");
        let summary = format!(
            "{} writes, {} reads, {hits} hits, no stale read",
            writes.len(),
            reads.len()
        );
        eprintln!("{summary}");
        c.note(summary);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_reads_the_writes_it_missed() {
    scenario(3, Options::default(), Duration::from_secs(120), async |c| {
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        let other = c
            .ids()
            .into_iter()
            .find(|&id| id != leader.id)
            .context("no follower")?;
        let v1 = first_set(c, leader.id, "r", "before").await?;
        let g = get(c, other, "r").await?;
        ensure!(g.value == "before" && g.version == v1, "{g:?}");
        c.kill9(other).await?;
        let v2 = set(c, leader.id, "r", "while-down").await?;
        ensure!(v2 > v1);
        c.restart(other).await?;
        let g = eventually(
            "the restarted node reads the new value",
            Duration::from_secs(30),
            async || {
                let g = get(c, other, "r").await?;
                ensure!(g.found, "{g:?}");
                Ok(g)
            },
        )
        .await?;
        ensure!(
            g.value == "while-down" && g.version == v2,
            "after the restart: {g:?}"
        );
        let again = eventually(
            "the restarted node hits",
            Duration::from_secs(15),
            async || {
                let g = get(c, other, "r").await?;
                ensure!(g.hit, "{g:?}");
                Ok(g)
            },
        )
        .await?;
        ensure!(again.version == v2, "{again:?}");
        Ok(())
    })
    .await;
}
