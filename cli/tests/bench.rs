//! `syncctl bench locks|queue|cache` against a real 3-node cluster of `syncd` processes (started
//! by the cluster-test harness of `tests/`), and for queue and cache beside a real
//! `redis-server` started here (`--compare-redis`): the JSON report is parsed and checked
//! (operations done, none failed, percentiles in order, ratios present, the bench's own check
//! passed), and the run leaves no session, lock, topic, stream or key behind.
//!
//! Nothing here is timed: a slow machine does fewer operations, never none (every client starts
//! one operation before its deadline and that operation is allowed to finish), and `--timeout`
//! gives each call far longer than it needs.

use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;
use sync_tests::{Cluster, Options, scenario};

mod common;

const LIMIT: Duration = Duration::from_secs(90);
/// The queue and cache tests run several benches in one cluster.
const LONG_LIMIT: Duration = Duration::from_secs(240);

/// `syncctl --endpoints <the cluster> --timeout 30s ARGS --output json`, which must succeed;
/// its stdout, parsed.
async fn syncctl_json(c: &Cluster, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["--timeout", "30s"];
    all.extend(args);
    common::json(c, &all).await
}

/// The checks every result row passes: operations done, none failed, percentiles in order.
fn check_row(row: &Value) -> anyhow::Result<()> {
    let ops = row["ops"].as_u64().context("no ops")?;
    ensure!(ops > 0, "no operation done: {row}");
    ensure!(row["errors"] == 0 && row["first_error"].is_null(), "{row}");
    ensure!(
        row["ops_per_sec"].as_f64().is_some_and(|r| r > 0.0),
        "{row}"
    );
    let latency = |p: &str| row["latency_us"][p].as_u64().context("no latency");
    let (p50, p99, max) = (latency("p50")?, latency("p99")?, latency("max")?);
    ensure!(0 < p50 && p50 <= p99 && p99 <= max, "{row}");
    Ok(())
}

/// The rows of a report, by target name, in order; and the syncd/redis comparison present.
fn rows_and_ratios<'a>(report: &'a Value, targets: &[&str]) -> anyhow::Result<Vec<&'a Value>> {
    let rows: Vec<&Value> = report["results"]
        .as_array()
        .context("no results array")?
        .iter()
        .collect();
    let names: Vec<&str> = rows.iter().filter_map(|r| r["target"].as_str()).collect();
    ensure!(names == targets, "targets {names:?}: {report}");
    for row in &rows {
        check_row(row)?;
    }
    let c = &report["comparison"];
    ensure!(c["target"] == "syncd" && c["peer"] == "redis", "{report}");
    for ratio in ["ops_per_sec_ratio", "p50_ratio", "p99_ratio"] {
        ensure!(c[ratio].as_f64().is_some_and(|r| r > 0.0), "{ratio}: {c}");
    }
    Ok(rows)
}

/// The checks every `bench locks` report passes, whatever the mode.
fn check_report(report: &Value, mode: &str) -> anyhow::Result<()> {
    let workload = &report["workload"];
    ensure!(
        workload["mode"] == mode && workload["clients"] == 2,
        "{workload}"
    );
    ensure!(
        report["comparison"].is_null(),
        "no etcd was asked: {report}"
    );
    let results = report["results"].as_array().context("no results array")?;
    ensure!(results.len() == 1, "one target only: {report}");
    let syncd = &results[0];
    ensure!(syncd["target"] == "syncd", "{syncd}");
    let ops = syncd["ops"].as_u64().context("no ops")?;
    ensure!(ops > 0, "no operation done: {syncd}");
    ensure!(
        syncd["errors"] == 0 && syncd["first_error"].is_null(),
        "{syncd}"
    );
    ensure!(syncd["unclosed_sessions"] == 0, "{syncd}");
    ensure!(
        syncd["ops_per_sec"].as_f64().is_some_and(|r| r > 0.0),
        "{syncd}"
    );
    let latency = |p: &str| syncd["latency_us"][p].as_u64().context("no latency");
    let (p50, p99, max) = (latency("p50")?, latency("p99")?, latency("max")?);
    ensure!(0 < p50 && p50 <= p99 && p99 <= max, "{syncd}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_locks_uncontended_and_contended_report_json_and_clean_up() {
    scenario(3, Options::default(), LIMIT, async |c| {
        c.wait_for_leader(Duration::from_secs(10)).await?;
        let bench = ["bench", "locks", "--clients", "2", "--duration", "1s"];

        let uncontended = syncctl_json(c, &bench).await?;
        check_report(&uncontended, "uncontended")?;

        let mut contended_args = bench.to_vec();
        contended_args.push("--contended");
        let contended = syncctl_json(c, &contended_args).await?;
        check_report(&contended, "contended")?;

        // Every client released its lock and closed its session.
        let locks = syncctl_json(c, &["lock", "list", "syncctl-bench/"]).await?;
        let sessions = syncctl_json(c, &["session", "list"]).await?;
        for (list, field) in [(&locks, "locks"), (&sessions, "sessions")] {
            let left = list[field].as_array().context("no list")?;
            ensure!(left.is_empty(), "{field} left behind: {list}");
        }
        Ok(())
    })
    .await;
}

/// `bench queue` in its three modes, syncd then Redis Streams: every message is accounted for
/// (publish modes: stored; end-to-end: consumed, nothing left), and the topics and streams are
/// gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_queue_modes_beside_redis_account_for_every_message_and_clean_up() {
    let redis = sync_tests::redis::RedisServer::start()
        .await
        .expect("redis-server");
    let url = redis.url();
    scenario(3, Options::default(), LONG_LIMIT, async |c| {
        c.wait_for_leader(Duration::from_secs(10)).await?;
        for (mode, clients) in [
            ("publish", "2"),
            ("publish-batch", "2"),
            ("end-to-end", "3"),
        ] {
            let report = syncctl_json(
                c,
                &[
                    "bench",
                    "queue",
                    "--mode",
                    mode,
                    "--clients",
                    clients,
                    "--batch",
                    "8",
                    "--duration",
                    "1s",
                    "--warmup",
                    "200ms",
                    "--compare-redis",
                    &url,
                ],
            )
            .await?;
            ensure!(report["workload"]["mode"] == mode, "{report}");
            ensure!(report["workload"]["unit"] == "messages", "{report}");
            let rows = rows_and_ratios(&report, &["syncd", "redis"])?;
            for row in rows {
                let check = &row["check"];
                ensure!(
                    check["passed"] == true && check["problem"].is_null(),
                    "{row}"
                );
                ensure!(check["cleaned_up"] == true, "{row}");
                let published = check["published"].as_u64().context("published")?;
                ensure!(published >= row["ops"].as_u64().unwrap_or(0), "{row}");
                if mode == "end-to-end" {
                    ensure!(
                        check["consumed"] == published && check["in_topics"] == 0,
                        "{row}"
                    );
                } else {
                    ensure!(check["in_topics"] == published, "{row}");
                }
                if mode == "publish-batch" {
                    ensure!(row["ops"].as_u64().is_some_and(|n| n % 8 == 0), "{row}");
                }
            }
        }
        let topics = syncctl_json(c, &["queue", "list", "syncctl-bench-"]).await?;
        let left = topics["topics"].as_array().context("no topics list")?;
        ensure!(left.is_empty(), "topics left behind: {topics}");
        let keys = redis.cli(&["DBSIZE"]).await?;
        ensure!(keys == "0", "streams left behind in Redis: {keys}");
        Ok(())
    })
    .await;
}

/// `bench cache` hit, miss and write with 2 sharers, syncd then Redis: hits really hit, misses
/// really miss, the write comes with its plain-Raft-write reference, and the keys are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_cache_hits_misses_and_shared_writes_beside_redis() {
    let redis = sync_tests::redis::RedisServer::start()
        .await
        .expect("redis-server");
    let url = redis.url();
    scenario(3, Options::default(), LONG_LIMIT, async |c| {
        c.wait_for_leader(Duration::from_secs(10)).await?;
        let run = async |extra: &[&str]| {
            let mut args = vec![
                "bench",
                "cache",
                "--clients",
                "3",
                "--keys-per-client",
                "4",
                "--duration",
                "1s",
                "--warmup",
                "200ms",
                "--compare-redis",
                &url,
            ];
            args.extend(extra);
            syncctl_json(c, &args).await
        };
        let hit = run(&["--mode", "hit"]).await?;
        let rows = rows_and_ratios(&hit, &["syncd", "redis"])?;
        ensure!(
            rows[0]["hit_ratio"].as_f64().is_some_and(|r| r >= 0.99),
            "{hit}"
        );
        ensure!(
            rows[1]["hit_ratio"].is_null(),
            "redis has no hit flag: {hit}"
        );
        ensure!(hit["workload"]["nodes"] == 3, "{hit}");

        let miss = run(&["--mode", "miss"]).await?;
        let rows = rows_and_ratios(&miss, &["syncd", "redis"])?;
        ensure!(
            rows[0]["hit_ratio"] == 0.0 && rows[0]["hits"] == 0,
            "{miss}"
        );

        let write = run(&["--mode", "write", "--sharers", "2"]).await?;
        let rows = rows_and_ratios(&write, &["syncd", "syncd-kv-put", "redis"])?;
        let vs = &rows[0]["vs_kv_put"];
        ensure!(vs["peer"] == "syncd-kv-put", "{write}");
        ensure!(vs["p50_ratio"].as_f64().is_some_and(|r| r > 0.0), "{write}");
        ensure!(write["workload"]["sharers"] == 2, "{write}");

        // Three sharers need four nodes: a one-line error, before any load.
        let err = common::fails(
            c,
            &["bench", "cache", "--mode", "write", "--sharers", "3"],
            1,
        )
        .await?;
        ensure!(err.contains("needs 4 nodes"), "{err}");
        let keys = redis.cli(&["DBSIZE"]).await?;
        ensure!(keys == "0", "keys left behind in Redis: {keys}");
        Ok(())
    })
    .await;
}
