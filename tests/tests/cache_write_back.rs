//! The cache's write-back mode (`--cache-write-mode write-back`) on real processes, with the
//! replicated state machine as memory unless said otherwise:
//! - a header-less Set on a node holding the key Modified is answered by that node alone (the
//!   line dirty, memory still at the previous version), and a read on another node recalls it
//!   and reads the local write, value and version;
//! - the flush interval, and eviction, write a dirty line back (the line clean, memory holding
//!   it, so another node reads it);
//! - SIGKILL of the dirty holder loses its unflushed writes and nothing flushed, and the key's
//!   next version is above every version it gave (never reused);
//! - a write-through cluster (the default) writes nothing locally;
//! - writers and readers on every node (the shared workload of `tests/tests/cache.rs`): no
//!   stale read, no read going back, no phantom value, with local writes among the writes;
//! - the local write and its recall over Redis as memory (`--cache-backend redis://…`).
//!
//! The test clients send no `RequestHeader` (the SDK tags every write, and a tagged write is
//! never served locally; see docs/cache.md, "Retried writes"). Memory's version of a key is
//! what the State call answers on the leader (`directory_version`).

use std::time::Duration;

use anyhow::{Context, ensure};
use sync_tests::api::{self, MesiState};
use sync_tests::cache::{concurrent_workload, first_set, get, mesi, request, set, state};
use sync_tests::redis::RedisServer;
use sync_tests::wait::eventually;
use sync_tests::{Cluster, Options, scenario};

/// Nodes in write-back mode with `flush` as the flush interval, plus `more` flags.
fn write_back(flush: &str, more: &[&str]) -> Options {
    let mut extra_args = vec![
        "--cache-write-mode=write-back".to_string(),
        format!("--cache-flush-interval={flush}"),
    ];
    extra_args.extend(more.iter().map(|s| s.to_string()));
    Options {
        extra_args,
        ..Options::default()
    }
}

/// The leader and two other nodes: `(leader, writer, reader)`.
async fn roles(c: &Cluster) -> anyhow::Result<(u64, u64, u64)> {
    let leader = c.wait_for_leader(Duration::from_secs(10)).await?.id;
    let others: Vec<u64> = c.ids().into_iter().filter(|&id| id != leader).collect();
    ensure!(others.len() >= 2, "need two followers: {others:?}");
    Ok((leader, others[0], others[1]))
}

async fn stats(c: &Cluster, id: u64) -> anyhow::Result<api::CacheStatsResponse> {
    Ok(c.client(id)
        .cache()
        .stats(request(api::CacheStatsRequest {}))
        .await
        .with_context(|| format!("Stats on node {id}"))?
        .into_inner())
}

/// Memory's version of `key`: the State call on the leader reads it from the replicated state.
async fn in_memory(c: &Cluster, leader: u64, key: &str) -> anyhow::Result<u64> {
    Ok(state(c, leader, key).await?.directory_version)
}

/// The value of the series `name{labels}` on node `id` (0 if it has not been recorded).
async fn series(c: &Cluster, id: u64, name_and_labels: &str) -> anyhow::Result<f64> {
    let text = c.metrics(id).await?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(name_and_labels))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .sum())
}

/// A first (write-through) Set of `key` on `writer`, which leaves it Modified with a
/// reservation, then a second Set there, answered locally: returns both versions.
async fn write_locally(c: &Cluster, writer: u64, key: &str) -> anyhow::Result<(u64, u64)> {
    // Absorbs the new directory's first lease: a write sent before the writer held a lease is
    // applied but grants no line.
    first_set(c, writer, &format!("warm-up-{key}"), "x").await?;
    let v1 = set(c, writer, key, "through").await?;
    let s = state(c, writer, key).await?;
    ensure!(
        mesi(s.state) == MesiState::Modified && s.version == v1 && !s.dirty,
        "after the first Set (written through): {s:?}"
    );
    let local_before = stats(c, writer).await?.local_writes;
    let v2 = set(c, writer, key, "local").await?;
    ensure!(v2 > v1, "a local write's version {v2} is not above {v1}");
    let s = state(c, writer, key).await?;
    ensure!(
        mesi(s.state) == MesiState::Modified && s.version == v2 && s.dirty,
        "after the local Set: {s:?}"
    );
    let st = stats(c, writer).await?;
    ensure!(
        st.local_writes == local_before + 1 && st.dirty_lines >= 1,
        "the writer's stats after one local write: {st:?}"
    );
    // The gauge follows within a tick.
    eventually(
        "the dirty lines gauge counts the line",
        Duration::from_secs(5),
        async || {
            let dirty = series(c, writer, "syncd_cache_dirty_lines").await?;
            ensure!(dirty >= 1.0, "syncd_cache_dirty_lines = {dirty}");
            Ok(())
        },
    )
    .await?;
    Ok((v1, v2))
}

/// A local write on a follower, seen dirty with memory behind, then recalled by a read on
/// another follower, which gets its value and version; memory has it afterwards.
async fn local_write_then_recall(c: &Cluster) -> anyhow::Result<()> {
    let (leader, writer, reader) = roles(c).await?;
    let (v1, v2) = write_locally(c, writer, "k").await?;
    let m = in_memory(c, leader, "k").await?;
    ensure!(
        m == v1,
        "memory has {m}, not {v1}: the local write reached it"
    );
    // The writer's own Get hits its dirty line.
    let g = get(c, writer, "k").await?;
    ensure!(g.hit && g.value == "local" && g.version == v2, "{g:?}");
    // A read on another node recalls the dirty line: memory gets the write first.
    let g = get(c, reader, "k").await?;
    ensure!(!g.hit && g.found, "{g:?}");
    ensure!(
        g.value == "local" && g.version == v2,
        "the reader got {:?} v{}, not the local write v{v2}",
        g.value,
        g.version
    );
    let m = in_memory(c, leader, "k").await?;
    ensure!(m == v2, "memory has {m} after the recall, not {v2}");
    // A recalled dirty line is dropped, not kept Shared (docs/cache.md, "A deviation").
    let s = state(c, writer, "k").await?;
    ensure!(
        !s.dirty && mesi(s.state) == MesiState::Invalid,
        "the writer after the recall: {s:?}"
    );
    ensure!(stats(c, writer).await?.dirty_lines == 0, "still dirty");
    // A write elsewhere after that is above the local version.
    let v3 = set(c, reader, "k", "after").await?;
    ensure!(v3 > v2, "v{v3} after the local v{v2}");
    let local = series(c, writer, "syncd_cache_local_writes_total").await?;
    ensure!(local >= 1.0, "syncd_cache_local_writes_total = {local}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_is_answered_by_its_node_and_a_read_elsewhere_recalls_it() {
    // A flush interval far longer than the test: only the recall can write the line back.
    let options = write_back("60s", &[]);
    scenario(3, options, Duration::from_secs(120), async |c| {
        local_write_then_recall(c).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flush_interval_writes_a_dirty_line_back() {
    let options = write_back("1s", &[]);
    scenario(3, options, Duration::from_secs(120), async |c| {
        let (leader, writer, reader) = roles(c).await?;
        let (_, v2) = write_locally(c, writer, "f").await?;
        // Written back about half a flush interval after the write; the line stays Modified.
        eventually(
            "the dirty line is written back",
            Duration::from_secs(10),
            async || {
                let s = state(c, writer, "f").await?;
                ensure!(!s.dirty, "{s:?}");
                ensure!(
                    mesi(s.state) == MesiState::Modified && s.version == v2,
                    "{s:?}"
                );
                Ok(())
            },
        )
        .await?;
        let m = in_memory(c, leader, "f").await?;
        ensure!(m == v2, "memory has {m} after the flush, not {v2}");
        let g = get(c, reader, "f").await?;
        ensure!(g.value == "local" && g.version == v2, "{g:?}");
        let written = series(
            c,
            writer,
            "syncd_cache_write_backs_total{outcome=\"written\"}",
        )
        .await?;
        ensure!(written >= 1.0, "write-backs written: {written}");
        let flushes = series(c, writer, "syncd_cache_write_back_duration_seconds_count").await?;
        ensure!(flushes >= 1.0, "flush latencies recorded: {flushes}");
        let dirty = series(c, writer, "syncd_cache_dirty_lines").await?;
        ensure!(dirty == 0.0, "dirty lines gauge: {dirty}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_writes_a_dirty_line_back_before_dropping_it() {
    // Room for "other" (5 + 114 bytes) alone, not beside "e"; no flush during the test.
    let options = write_back("60s", &["--cache-capacity-bytes=120"]);
    scenario(3, options, Duration::from_secs(120), async |c| {
        let (leader, writer, _) = roles(c).await?;
        let (_, v2) = write_locally(c, writer, "e").await?;
        // Another line on the writer pushes the store over its capacity: the dirty line is
        // written back, then evicted.
        let big = "x".repeat(114);
        set(c, writer, "other", &big).await?;
        eventually(
            "the dirty line is written back and evicted",
            Duration::from_secs(10),
            async || {
                let s = state(c, writer, "e").await?;
                ensure!(!s.dirty && mesi(s.state) == MesiState::Invalid, "{s:?}");
                Ok(())
            },
        )
        .await?;
        let m = in_memory(c, leader, "e").await?;
        ensure!(m == v2, "memory has {m} after the eviction, not {v2}");
        let g = get(c, leader, "e").await?;
        ensure!(g.value == "local" && g.version == v2, "{g:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_dirty_holder_loses_only_its_unflushed_writes_and_no_version_is_reused() {
    // Written back 2 s after the first unflushed write: the test waits for one flush, then
    // kills the holder well before the next.
    let options = write_back("4s", &[]);
    scenario(3, options, Duration::from_secs(150), async |c| {
        let (leader, writer, reader) = roles(c).await?;
        let (_, v2) = write_locally(c, writer, "d").await?;
        eventually(
            "the first local write is flushed",
            Duration::from_secs(15),
            async || {
                ensure!(in_memory(c, leader, "d").await? == v2);
                Ok(())
            },
        )
        .await?;
        // Enough local writes that their versions run well ahead of the log's index: a next
        // version taken from the log alone (the reservation ignored) would reuse one of them.
        let mut lost = Vec::new();
        for i in 0..20 {
            lost.push(set(c, writer, "d", &format!("lost-{i}")).await?);
        }
        ensure!(
            lost.first() > Some(&v2) && lost.windows(2).all(|w| w[0] < w[1]),
            "local versions after v{v2}: {lost:?}"
        );
        let (v3, v4) = (lost[0], lost[lost.len() - 1]);
        let s = state(c, writer, "d").await?;
        ensure!(s.dirty && s.version == v4, "before the kill: {s:?}");
        c.kill9(writer).await?;
        c.note(format!(
            "node {writer} killed holding v{v3} to v{v4} unflushed"
        ));
        // The directory waits out the dead holder's lease, then reads memory: the flushed
        // write, not the lost ones.
        let g = get(c, reader, "d").await?;
        ensure!(
            g.found && g.value == "local" && g.version == v2,
            "after the holder died: {g:?} (flushed v{v2}, lost v{v3} to v{v4})"
        );
        // The next write's version is above every version the dead holder gave. Through the
        // leader, which holds no line of the key, so the write goes to memory (the reader's
        // exclusive line would write locally, numbered from its own reservation).
        let v5 = set(c, leader, "d", "next").await?;
        ensure!(
            v5 > v4,
            "v{v5} reuses a lost holder's version (up to v{v4})"
        );
        let given_up = series(
            c,
            leader,
            "syncd_cache_write_back_losses_total{event=\"given_up\"}",
        )
        .await?;
        ensure!(given_up >= 1.0, "given-up holders counted: {given_up}");
        // The restarted node reads what the others wrote.
        c.restart(writer).await?;
        let g = eventually(
            "the restarted node reads the next write",
            Duration::from_secs(30),
            async || {
                let g = get(c, writer, "d").await?;
                ensure!(g.found, "{g:?}");
                Ok(g)
            },
        )
        .await?;
        ensure!(g.value == "next" && g.version == v5, "{g:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_cluster_writes_nothing_locally() {
    scenario(3, Options::default(), Duration::from_secs(90), async |c| {
        let (leader, writer, reader) = roles(c).await?;
        first_set(c, writer, "warm-up", "x").await?;
        let v1 = set(c, writer, "t", "one").await?;
        let v2 = set(c, writer, "t", "two").await?;
        ensure!(v2 > v1);
        let s = state(c, writer, "t").await?;
        ensure!(
            mesi(s.state) == MesiState::Modified && s.version == v2 && !s.dirty,
            "{s:?}"
        );
        let m = in_memory(c, leader, "t").await?;
        ensure!(
            m == v2,
            "memory has {m}, not {v2}: the Set returned before memory had it"
        );
        let st = stats(c, writer).await?;
        ensure!(
            st.local_writes == 0 && st.dirty_lines == 0 && st.write_backs == 0,
            "{st:?}"
        );
        let g = get(c, reader, "t").await?;
        ensure!(g.value == "two" && g.version == v2, "{g:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_redis_a_local_write_is_answered_by_its_node_and_a_read_elsewhere_recalls_it() {
    let redis = RedisServer::start().await.expect("redis-server");
    let backend = format!("--cache-backend={}", redis.url());
    // Memory's version (State on the leader) is read from Redis here.
    let options = write_back("60s", &[&backend]);
    scenario(3, options, Duration::from_secs(120), async |c| {
        local_write_then_recall(c).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_in_write_back_mode_and_no_reader_sees_a_stale_value() {
    // The shared workload (writers and readers on every node, no crash, so nothing may be
    // lost): every completed write, local or not, must be visible to every later read.
    let options = write_back("200ms", &[]);
    scenario(3, options, Duration::from_secs(120), async |c| {
        concurrent_workload(c, false).await?;
        let mut local = 0;
        for id in c.ids() {
            local += stats(c, id).await?.local_writes;
        }
        ensure!(local > 0, "the workload made no local write");
        Ok(())
    })
    .await;
}
