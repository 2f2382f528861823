//! The examples, run against a real 3-node cluster of `syncd` processes, with their outcomes
//! checked.
//!
//! Each example keeps its body in a `run` function and only parses `SYNC_ENDPOINTS` in `main`.
//! This file compiles the example's own source as a module (`#[path]`) and calls `run` with the
//! harness's cluster. That tests exactly the code `cargo run --example` runs, without a nested
//! `cargo` (slow, and it would contend for the build lock) and without depending on a binary
//! under `target/*/examples/` that `cargo test --test examples` does not build. The output the
//! examples print is for people; the checks here are on the summaries `run` returns.

use std::time::Duration;

use anyhow::ensure;
use sync_client::NearCacheConfig;
use sync_tests::{Options, scenario};
use tokio::time::Instant;

mod common;
use common::{client, short_cache_lease as options};

#[allow(dead_code)]
#[path = "../examples/lock_protected_job.rs"]
mod lock_protected_job;

#[allow(dead_code)]
#[path = "../examples/worker_pool.rs"]
mod worker_pool;

#[allow(dead_code)]
#[path = "../examples/read_through_cache.rs"]
mod read_through_cache;

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_protected_jobs_run_one_at_a_time_with_increasing_tokens() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let client = client(c).await?;
        // Two copies at once: the lock serializes them, so both finish, one after the other,
        // and the second holds a newer fencing token.
        let wait = Duration::from_secs(60);
        let (a, b) = tokio::join!(
            lock_protected_job::run(&client, wait),
            lock_protected_job::run(&client, wait)
        );
        let (a, b) = (
            a.map_err(|e| anyhow::anyhow!("{e}"))?,
            b.map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let tokens = match (a, b) {
            (
                lock_protected_job::Outcome::Done { token: t1, rows: 3 },
                lock_protected_job::Outcome::Done { token: t2, rows: 3 },
            ) => (t1, t2),
            other => anyhow::bail!("both jobs should write 3 rows: {other:?}"),
        };
        ensure!(tokens.0 != tokens.1, "two holds with one token: {tokens:?}");
        ensure!(
            client.get_lock(lock_protected_job::LOCK).await?.is_free(),
            "the lock is still held after both jobs"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_pool_runs_every_job_once_and_retries_the_failures() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let client = client(c).await?;
        let config = worker_pool::PoolConfig {
            topic: "worker-pool-test".into(),
            jobs: 10,
            workers: 3,
            // Jobs 5 and 10 run 4.5 s, past this: only auto-extend keeps them from a second
            // worker.
            visibility: Duration::from_secs(3),
            retry_delay: Duration::from_millis(300),
        };
        let summary = worker_pool::run(&client, config).await?;
        ensure!(
            summary.succeeded.len() == 10 && summary.succeeded.values().all(|&n| n == 1),
            "every job should succeed exactly once: {:?}",
            summary.succeeded
        );
        // Jobs 4 and 8 fail on their first attempt, once each.
        ensure!(summary.nacked == 2, "nacked {} times", summary.nacked);
        ensure!(summary.per_worker.iter().sum::<u32>() == 10);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_through_cache_loads_each_key_once_then_serves_it_from_memory() {
    scenario(3, options(), LIMIT, async |c| {
        let client = client(c).await?;
        // Wait out the server's no-caching grace after the election (bounded): until a value
        // read through a near cache is served from it.
        let probe = client.near_cache(NearCacheConfig::default())?;
        probe.wait_subscribed(Duration::from_secs(30)).await?;
        probe.set("probe", "x", None).await?;
        let started = Instant::now();
        while !probe.get("probe").await?.is_some_and(|v| v.near_hit) {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "no near hit within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let keys = ["ada", "grace", "edsger"];
        let summary = read_through_cache::run(&client, "users/", &keys, 4).await?;
        let (near, _cluster, database) = summary.sources;
        ensure!(
            database == 3 && summary.loads == 3,
            "each key should be loaded from the database once: {summary:?}"
        );
        // Round 1 loads, round 2 fills the near cache from the cluster, rounds 3 and 4 hit
        // (all 6 normally; a lease lapse on a loaded machine may invalidate a few).
        ensure!(near >= 1, "no near-cache hit in 4 rounds: {summary:?}");
        ensure!(
            summary.after_update.as_deref() == Some("updated profile"),
            "the update was not read back: {summary:?}"
        );
        Ok(())
    })
    .await;
}
