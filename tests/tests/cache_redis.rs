//! The coherent cache with Redis as main memory (`--cache-backend redis://…`), on real syncd
//! processes and a real `redis-server` that each test starts on a free port: the original
//! scenario with the value really in Redis; a retried write applied once; concurrent writers and readers with no stale read;
//! Redis restarted in the middle of a test; Redis down when the cluster starts; and the leader
//! killed, its successor's directory fencing Redis at the new epoch.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use sync_tests::api;
use sync_tests::cache::{
    CALL, concurrent_workload, first_set, get, measure_latency, original_scenario, request,
    request_within, retried_writes_apply_once, set, try_set,
};
use sync_tests::redis::RedisServer;
use sync_tests::wait::eventually;
use sync_tests::{Cluster, Options, scenario};
use tokio::time::Instant;
use tonic::Code;

/// Nodes whose cache memory is `redis`.
fn over(redis: &RedisServer) -> Options {
    Options {
        extra_args: vec![format!("--cache-backend={}", redis.url())],
        ..Options::default()
    }
}

/// The Redis key of cache key `key`, found by pattern (the prefix holds the cluster id).
async fn record_key(redis: &RedisServer, key: &str) -> anyhow::Result<String> {
    let found = redis
        .cli(&["--scan", "--pattern", &format!("syncd:cache:*:k:{key}")])
        .await?;
    let mut keys = found.lines();
    match (keys.next(), keys.next()) {
        (Some(k), None) => Ok(k.to_string()),
        _ => bail!("expected one Redis record for {key:?}, found {found:?}"),
    }
}

/// `(value, version)` of cache key `key` as Redis holds it, read with redis-cli.
async fn in_redis(redis: &RedisServer, key: &str) -> anyhow::Result<(String, u64)> {
    let record = record_key(redis, key).await?;
    let value = redis.cli(&["HGET", &record, "value"]).await?;
    let version = redis.cli(&["HGET", &record, "version"]).await?;
    Ok((value, version.parse().context("version")?))
}

/// The epoch fence Redis holds for the cluster.
async fn fence(redis: &RedisServer) -> anyhow::Result<u64> {
    let found = redis
        .cli(&["--scan", "--pattern", "syncd:cache:*:epoch"])
        .await?;
    let key = found.lines().next().context("no epoch key in Redis")?;
    Ok(redis.cli(&["GET", key]).await?.parse()?)
}

/// Sets `key` on node `id` until the call fails UNAVAILABLE naming Redis; a write that raced the
/// outage may time out (it may or may not have happened), any other answer is an error.
async fn wait_unavailable(
    c: &Cluster,
    redis: &RedisServer,
    id: u64,
    key: &str,
) -> anyhow::Result<tonic::Status> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        // A new key each time: a write that raced the outage holds its key until Redis settles
        // it, and the next write of that key would queue behind it.
        let started = Instant::now();
        let r = try_set(c, id, &format!("{key}-{n}"), "during-outage").await;
        let took = started.elapsed();
        match r {
            Err(s) if s.code() == Code::Unavailable => {
                ensure!(
                    s.message().contains(&redis.url()),
                    "UNAVAILABLE does not name Redis: {s:?}"
                );
                ensure!(took < CALL, "UNAVAILABLE only after {took:?}");
                return Ok(s);
            }
            Err(s) if s.code() == Code::DeadlineExceeded => {}
            other => bail!("a Set while Redis is down answered {other:?}"),
        }
        ensure!(
            Instant::now() < deadline,
            "no Set failed UNAVAILABLE in time"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_scenario_over_redis_the_value_in_redis_and_retries_applied_once() {
    let redis = RedisServer::start().await.expect("redis-server");
    scenario(3, over(&redis), Duration::from_secs(90), async |c| {
        let (_, v2) = original_scenario(c).await?;
        // Write-through: Redis held the value when the Set returned.
        ensure!(
            in_redis(&redis, "k1").await? == ("v2".to_string(), v2),
            "Redis does not hold k1=v2 at version {v2}"
        );
        // Fenced at the directory's epoch (a leader's term; an election since may have raised
        // the term without the new directory having touched Redis yet).
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        let epoch = fence(&redis).await?;
        ensure!(
            epoch > 0 && epoch <= leader.term,
            "fence {epoch}, term {}",
            leader.term
        );
        // A retried write is applied once by the Redis write script too.
        retried_writes_apply_once(c).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_over_redis_and_no_reader_sees_a_stale_value() {
    let redis = RedisServer::start().await.expect("redis-server");
    scenario(3, over(&redis), Duration::from_secs(120), async |c| {
        concurrent_workload(c, false).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_fails_writes_unavailable_loses_nothing_acknowledged_and_recovers() {
    let mut redis = RedisServer::start().await.expect("redis-server");
    let options = over(&redis);
    scenario(3, options, Duration::from_secs(150), async |c| {
        first_set(c, 1, "warm-up", "x").await?;
        let mut acked = Vec::new();
        for (i, id) in [1, 2, 3, 1, 2, 3].into_iter().enumerate() {
            let key = format!("kept-{i}");
            let value = format!("v{i}");
            acked.push((key.clone(), value.clone(), set(c, id, &key, &value).await?));
        }
        redis.stop().await?;
        c.note("redis-server stopped");
        let s = wait_unavailable(c, &redis, 2, "outage").await?;
        c.note(format!("Set during the outage: {s:?}"));
        // A miss needs memory too.
        let miss = c
            .client(3)
            .cache()
            .get(request_within(
                api::CacheGetRequest {
                    key: "never-cached".into(),
                },
                CALL,
            ))
            .await;
        ensure!(
            matches!(&miss, Err(s) if s.code() == Code::Unavailable),
            "a miss during the outage: {miss:?}"
        );
        redis.start_again().await?;
        c.note("redis-server started again");
        let after = eventually(
            "a Set after the restart",
            Duration::from_secs(30),
            async || set(c, 3, "after", "back").await,
        )
        .await?;
        for (key, value, version) in &acked {
            ensure!(after > *version, "version {after} not above {version}");
            ensure!(
                in_redis(&redis, key).await? == (value.clone(), *version),
                "Redis lost {key}={value}@{version}"
            );
            for id in c.ids() {
                let g = get(c, id, key).await?;
                ensure!(
                    g.found && g.value == value.as_bytes() && g.version == *version,
                    "node {id} reads {key} as {g:?}, not {value}@{version}"
                );
            }
        }
        let g = get(c, 1, "after").await?;
        ensure!(g.value == "back" && g.version == after, "{g:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_at_start_the_nodes_start_and_the_cache_works_once_redis_is_up() {
    let mut redis = RedisServer::stopped().expect("redis port");
    let options = over(&redis);
    scenario(3, options, Duration::from_secs(150), async |c| {
        c.wait_for_leader(Duration::from_secs(10)).await?;
        let s = wait_unavailable(c, &redis, 1, "early").await?;
        c.note(format!("Set before Redis runs: {s:?}"));
        let miss = c
            .client(2)
            .cache()
            .get(request(api::CacheGetRequest {
                key: "early".into(),
            }))
            .await;
        match miss {
            Err(s) if s.code() == Code::Unavailable && s.message().contains(&redis.url()) => {}
            other => bail!("a Get before Redis runs answered {other:?}"),
        }
        redis.start_again().await?;
        c.note("redis-server started");
        let v = first_set(c, 1, "early", "now").await?;
        for id in c.ids() {
            let g = get(c, id, "early").await?;
            ensure!(g.value == "now" && g.version == v, "node {id}: {g:?}");
        }
        ensure!(in_redis(&redis, "early").await? == ("now".to_string(), v));
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_leader_is_killed_the_new_directory_fences_redis_and_writes_read_back() {
    let redis = RedisServer::start().await.expect("redis-server");
    scenario(3, over(&redis), Duration::from_secs(150), async |c| {
        let old = c.wait_for_leader(Duration::from_secs(10)).await?;
        let others: Vec<u64> = c.ids().into_iter().filter(|&id| id != old.id).collect();
        let v1 = first_set(c, old.id, "a", "1").await?;
        let v2 = set(c, others[0], "b", "2").await?;
        // Node others[1] caches both.
        for key in ["a", "b"] {
            get(c, others[1], key).await?;
        }
        let before = fence(&redis).await?;
        ensure!(
            before == old.term,
            "fence {before} under the first leader of term {}",
            old.term
        );
        c.kill9(old.id).await?;
        let new = c
            .wait_for_leader_where(Duration::from_secs(20), "a new leader", |l| l.id != old.id)
            .await?;
        ensure!(new.term > old.term);
        // The new directory's first write (after its grace) raises the fence.
        let v3 = first_set(c, others[1], "a", "3").await?;
        ensure!(v3 > v2 && v2 > v1);
        let after = fence(&redis).await?;
        ensure!(
            after >= new.term && after > before,
            "Redis is fenced at {after}, not at the new epoch {}",
            new.term
        );
        for id in &others {
            let a = get(c, *id, "a").await?;
            let b = get(c, *id, "b").await?;
            ensure!(a.value == "3" && a.version == v3, "node {id}: {a:?}");
            ensure!(b.value == "2" && b.version == v2, "node {id}: {b:?}");
        }
        Ok(())
    })
    .await;
}

/// Not a check: prints the latency of hits, misses and writes with Redis as memory.
/// `cargo test -p sync-tests --test cache_redis -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_hit_miss_and_write_latency_over_redis() {
    let redis = RedisServer::start().await.expect("redis-server");
    scenario(3, over(&redis), Duration::from_secs(120), async |c| {
        measure_latency(c).await
    })
    .await;
}
