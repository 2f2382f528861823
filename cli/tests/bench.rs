//! `syncctl bench locks` against a real 3-node cluster of `syncd` processes (started by the
//! cluster-test harness of `tests/`), uncontended and contended: the JSON report is parsed and
//! checked (operations done, none failed, percentiles in order), and the run leaves no session
//! and no lock behind.
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

/// `syncctl --endpoints <the cluster> --timeout 30s ARGS --output json`, which must succeed;
/// its stdout, parsed.
async fn syncctl_json(c: &Cluster, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["--timeout", "30s"];
    all.extend(args);
    common::json(c, &all).await
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
