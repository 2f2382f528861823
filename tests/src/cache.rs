//! Cache calls for the cluster tests, and the concurrent workload with its checks (no phantom
//! value, no stale read, no read going back in time), shared by the tests of both memory
//! backends (`tests/tests/cache.rs`, `tests/tests/cache_redis.rs`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use tokio::time::Instant;
use tonic::Request;

use crate::Cluster;
use crate::api::{self, MesiState};
use crate::wait::eventually;

/// Deadline of one cache call: a write may wait out a new directory's first lease.
pub const CALL: Duration = Duration::from_secs(10);

pub fn request<T>(msg: T) -> Request<T> {
    request_within(msg, CALL)
}

pub fn request_within<T>(msg: T, deadline: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(deadline);
    r
}

/// Sets `key` through node `id`: the version, or the call's status.
pub async fn try_set(c: &Cluster, id: u64, key: &str, value: &str) -> Result<u64, tonic::Status> {
    c.client(id)
        .cache()
        .set(request(api::CacheSetRequest {
            key: key.into(),
            value: Bytes::from(value.to_string()),
            ..Default::default()
        }))
        .await
        .map(|r| r.into_inner().version)
}

pub async fn set(c: &Cluster, id: u64, key: &str, value: &str) -> anyhow::Result<u64> {
    try_set(c, id, key, value)
        .await
        .with_context(|| format!("Set {key}={value} on node {id}"))
}

pub async fn get(c: &Cluster, id: u64, key: &str) -> anyhow::Result<api::CacheGetResponse> {
    let r = c
        .client(id)
        .cache()
        .get(request(api::CacheGetRequest { key: key.into() }))
        .await
        .with_context(|| format!("Get {key} on node {id}"))?;
    Ok(r.into_inner())
}

pub async fn state(c: &Cluster, id: u64, key: &str) -> anyhow::Result<api::CacheStateResponse> {
    let r = c
        .client(id)
        .cache()
        .state(request(api::CacheStateRequest { key: key.into() }))
        .await
        .with_context(|| format!("State {key} on node {id}"))?;
    Ok(r.into_inner())
}

pub fn mesi(s: i32) -> MesiState {
    MesiState::try_from(s).unwrap_or(MesiState::Invalid)
}

/// Sets `key` through node `id`, retrying while the new directory waits out its first lease.
pub async fn first_set(c: &Cluster, id: u64, key: &str, value: &str) -> anyhow::Result<u64> {
    eventually(
        &format!("Set {key} on node {id}"),
        Duration::from_secs(30),
        async || set(c, id, key, value).await,
    )
    .await
}

/// The original design's scenario: Set k1=v1 on node 1 (M there); Get on node 2 misses and fills
/// (both end Shared, node 1's line recalled); Get on node 1 hits; State shows each node's line
/// and the directory's holders; a Set of v2 on node 3 invalidates both, and node 1 then misses
/// and reads v2. Returns the versions of v1 and v2.
pub async fn original_scenario(c: &Cluster) -> anyhow::Result<(u64, u64)> {
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
    Ok((v1, v2))
}

/// Prints the latency of hits, misses and writes through gRPC (one client, on a follower; the
/// writes on the leader). Not a check: a measurement.
pub async fn measure_latency(c: &Cluster) -> anyhow::Result<()> {
    let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
    let node = c
        .ids()
        .into_iter()
        .find(|&id| id != leader.id)
        .context("no follower")?;
    first_set(c, node, "warm-up", "x").await?;
    let mut cache = c.client(node).cache();
    let p = |mut v: Vec<Duration>, q: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * q) as usize]
    };
    let mut hits = Vec::new();
    let mut misses = Vec::new();
    let mut writes = Vec::new();
    for i in 0..200 {
        let key = format!("lat{i}");
        let t = Instant::now();
        set(c, leader.id, &key, "v").await?;
        writes.push(t.elapsed());
        let t = Instant::now();
        cache
            .get(request(api::CacheGetRequest { key: key.clone() }))
            .await?;
        misses.push(t.elapsed());
    }
    for i in 0..2000 {
        let t = Instant::now();
        let g = cache
            .get(request(api::CacheGetRequest {
                key: format!("lat{}", i % 200),
            }))
            .await?
            .into_inner();
        hits.push(t.elapsed());
        ensure!(g.hit, "{g:?}");
    }
    for (name, v) in [
        ("hit", hits),
        ("miss (recalls the writer's M line)", misses),
        ("write on the leader (no sharer)", writes),
    ] {
        eprintln!(
            "{name}: p50 {:?} p99 {:?} ({} calls, one client)",
            p(v.clone(), 0.5),
            p(v.clone(), 0.99),
            v.len()
        );
    }
    Ok(())
}

/// A completed operation, timed on the test's clock.
#[derive(Clone, Debug)]
pub struct Op {
    /// The key.
    pub key: String,
    /// The version read or written.
    pub version: u64,
    /// The value read or written.
    pub value: String,
    /// When the call was made.
    pub start: Instant,
    /// When it was answered.
    pub end: Instant,
}

/// Per key: operations by completion time, each with the highest version completed by then.
pub fn prefix_max(ops: &[Op]) -> BTreeMap<String, Vec<(Instant, u64)>> {
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
pub fn floor_at(prefix: &BTreeMap<String, Vec<(Instant, u64)>>, key: &str, t: Instant) -> u64 {
    let Some(list) = prefix.get(key) else {
        return 0;
    };
    match list.partition_point(|(end, _)| *end < t) {
        0 => 0,
        i => list[i - 1].1,
    }
}

/// Writers on every node and two readers per node for 8 s, then the checks: no phantom value,
/// no stale read, no read going back in time, and some hits. With `kill_leader`, the leader is
/// killed 2 s in and restarted 1 s later: writes fail or wait for the new directory meanwhile,
/// and none of the checks may break.
pub async fn concurrent_workload(c: &mut Cluster, kill_leader: bool) -> anyhow::Result<()> {
    let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
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
    if kill_leader {
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.kill9(leader.id).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.restart(leader.id).await?;
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
}

/// A header no other test uses: a random client id, at `sequence`.
fn header(client_id: u64, sequence: u64) -> Option<api::RequestHeader> {
    Some(api::RequestHeader {
        client_id,
        sequence,
        lowest_unacked: 1,
    })
}

/// A retried write (the same request header, sent again through another node after its first
/// answer was "lost") is applied once: it answers as the first attempt did and does not undo a
/// write made by another client in between. Checked for Set, Delete, CompareAndSet (a retry
/// succeeds rather than mismatching against its own first attempt) and SetMany. Needs the
/// directory past its first lease (call after any `first_set`).
pub async fn retried_writes_apply_once(c: &Cluster) -> anyhow::Result<()> {
    let me = rand::random::<u64>() | 1;
    let cache = |id: u64| c.client(id).cache();
    let value = |s: &str| Bytes::from(s.to_string());

    // Set: first attempt through node 2; another client writes; the retry through node 3.
    let set_once = api::CacheSetRequest {
        header: header(me, 1),
        key: "retried".into(),
        value: value("first"),
        ttl_ms: 0,
    };
    let first = cache(2).set(request(set_once.clone())).await?.into_inner();
    let other = set(c, 1, "retried", "other").await?;
    ensure!(other > first.version, "{other} after {first:?}");
    let retry = cache(3).set(request(set_once)).await?.into_inner();
    ensure!(
        retry.version == first.version,
        "a retried Set answered {retry:?}, its first attempt {first:?}"
    );
    for id in c.ids() {
        let g = get(c, id, "retried").await?;
        ensure!(
            g.value == "other" && g.version == other,
            "node {id} after a retried Set: {g:?} (want other@{other})"
        );
    }

    // CompareAndSet: the retry succeeds with the first attempt's version.
    let cas_once = api::CompareAndSetRequest {
        header: header(me, 2),
        key: "retried".into(),
        expected_version: other,
        value: value("swapped"),
        ttl_ms: 0,
    };
    let first = cache(1)
        .compare_and_set(request(cas_once.clone()))
        .await?
        .into_inner();
    ensure!(
        first.success,
        "CompareAndSet at the current version: {first:?}"
    );
    let retry = cache(2)
        .compare_and_set(request(cas_once))
        .await?
        .into_inner();
    ensure!(
        retry.success && retry.version == first.version,
        "a retried CompareAndSet answered {retry:?}, its first attempt {first:?}"
    );

    // Delete: the retry does not delete the value written after the first attempt.
    let delete_once = api::CacheDeleteRequest {
        header: header(me, 3),
        key: "retried".into(),
    };
    let first = cache(3)
        .delete(request(delete_once.clone()))
        .await?
        .into_inner();
    ensure!(first.deleted, "Delete of a present key: {first:?}");
    let again = set(c, 2, "retried", "after-delete").await?;
    let retry = cache(1).delete(request(delete_once)).await?.into_inner();
    ensure!(
        retry.deleted && retry.version == first.version,
        "a retried Delete answered {retry:?}, its first attempt {first:?}"
    );
    let g = get(c, 3, "retried").await?;
    ensure!(
        g.found && g.value == "after-delete" && g.version == again,
        "a retried Delete deleted a later write: {g:?}"
    );

    // SetMany: each entry is applied once.
    let many_once = api::SetManyRequest {
        header: header(me, 4),
        entries: ["many-a", "many-b"]
            .into_iter()
            .map(|k| api::CacheSetEntry {
                key: k.into(),
                value: value("batch"),
                ttl_ms: 0,
            })
            .collect(),
    };
    let first = cache(1)
        .set_many(request(many_once.clone()))
        .await?
        .into_inner();
    let later = set(c, 3, "many-a", "later").await?;
    let retry = cache(2).set_many(request(many_once)).await?.into_inner();
    ensure!(
        retry.versions == first.versions,
        "a retried SetMany answered {retry:?}, its first attempt {first:?}"
    );
    let g = get(c, 1, "many-a").await?;
    ensure!(
        g.value == "later" && g.version == later,
        "a retried SetMany overwrote a later write: {g:?}"
    );
    Ok(())
}
