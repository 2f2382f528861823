//! `syncctl queue …` against a real 3-node cluster of `syncd` processes (started by the
//! cluster-test harness of `tests/`): every queue command runs and its JSON output is parsed and
//! checked: publish → consume → ack, nack and redelivery with the next attempt, extend, stats
//! counts, requeue, purge, dead letters and redrive, list, and `tail` printing a message
//! published while it runs.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;
use sync_tests::{Cluster, Options, scenario};
use tokio::io::{AsyncBufReadExt, BufReader};

mod common;

use common::{fails, json, syncctl, u64_at};

const LIMIT: Duration = Duration::from_secs(60);

/// Publishes `payload` to `topic` and returns the message id.
async fn publish(c: &Cluster, topic: &str, payload: &str) -> anyhow::Result<String> {
    let p = json(c, &["queue", "publish", topic, payload]).await?;
    ensure!(p["deduplicated"] == false, "{p}");
    p["message_id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .with_context(|| format!("no message id in {p}"))
}

/// `queue consume TOPIC ARGS…`: its deliveries.
async fn consume(c: &Cluster, topic: &str, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut all = vec!["queue", "consume", topic];
    all.extend(args);
    let out = json(c, &all).await?;
    out["deliveries"]
        .as_array()
        .cloned()
        .with_context(|| format!("no deliveries array in {out}"))
}

fn field<'a>(v: &'a Value, name: &str) -> anyhow::Result<&'a str> {
    v[name]
        .as_str()
        .with_context(|| format!("no string `{name}` in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_ack_nack_extend_stats_requeue_purge_and_list() {
    scenario(3, Options::default(), LIMIT, async |c| {
        c.wait_for_leader(Duration::from_secs(10)).await?;
        let created = json(c, &["queue", "create", "jobs", "--visibility", "30s"]).await?;
        ensure!(created["created"] == true, "{created}");
        ensure!(
            u64_at(&created, "/settings/visibility_timeout_ms")? == 30_000,
            "{created}"
        );
        let again = json(c, &["queue", "create", "jobs", "--visibility", "30s"]).await?;
        ensure!(again["created"] == false, "{again}");

        // publish → consume → ack, with the key and the attributes delivered.
        let p = json(
            c,
            &[
                "queue", "publish", "jobs", "first", "--key", "k1", "--attr", "a=1", "--attr",
                "b=x=y",
            ],
        )
        .await?;
        let first = field(&p, "message_id")?.to_owned();
        let got = consume(c, "jobs", &["--max", "10", "--wait", "2s"]).await?;
        ensure!(got.len() == 1, "{got:?}");
        let d = &got[0];
        ensure!(field(d, "message_id")? == first && d["attempt"] == 1, "{d}");
        ensure!(d["payload"] == "first" && d["ordering_key"] == "k1", "{d}");
        ensure!(
            d["attributes"]["a"] == "1" && d["attributes"]["b"] == "x=y",
            "{d}"
        );
        ensure!(
            d["acked"] == false && u64_at(d, "/visible_again_unix_ms")? > 0,
            "{d}"
        );
        let stats = json(c, &["queue", "stats", "jobs"]).await?;
        ensure!(
            u64_at(&stats, "/in_flight")? == 1 && u64_at(&stats, "/visible")? == 0,
            "{stats}"
        );
        ensure!(u64_at(&stats, "/owner_node_id")? > 0, "{stats}");
        let acked = json(c, &["queue", "ack", "jobs", &first, "--attempt", "1"]).await?;
        ensure!(
            acked["acked"] == true && acked["message_id"] == first.as_str(),
            "{acked}"
        );
        let stats = json(c, &["queue", "stats", "jobs"]).await?;
        ensure!(u64_at(&stats, "/in_flight")? == 0, "{stats}");
        // Acking it again: the message is gone, one line, exit 1.
        fails(c, &["queue", "ack", "jobs", &first], 1).await?;

        // nack → delivered again with the next attempt; the old receipt is stale.
        let second = publish(c, "jobs", "second").await?;
        let got = consume(c, "jobs", &["--wait", "2s"]).await?;
        ensure!(
            got.len() == 1 && got[0]["message_id"] == second.as_str(),
            "{got:?}"
        );
        let nacked = json(c, &["queue", "nack", "jobs", &second, "--attempt", "1"]).await?;
        ensure!(nacked["nacked"] == true, "{nacked}");
        let got = consume(c, "jobs", &["--wait", "2s"]).await?;
        ensure!(got.len() == 1 && got[0]["attempt"] == 2, "{got:?}");
        let stale = fails(c, &["queue", "ack", "jobs", &second, "--attempt", "1"], 1).await?;
        ensure!(stale.contains("delivered again"), "{stale}");

        // extend: invisible for longer, reported in the answer.
        let before = u64_at(&got[0], "/visible_again_unix_ms")?;
        let extended = json(
            c,
            &[
                "queue",
                "extend",
                "jobs",
                &second,
                "--attempt",
                "2",
                "--visibility",
                "5m",
            ],
        )
        .await?;
        ensure!(
            u64_at(&extended, "/visible_again_unix_ms")? > before + 60_000,
            "{extended} (was {before})"
        );
        let acked = json(c, &["queue", "consume", "jobs", "--wait", "0s", "--ack"]).await?;
        ensure!(
            acked["deliveries"] == Value::Array(vec![]),
            "extended, so invisible: {acked}"
        );
        json(c, &["queue", "ack", "jobs", &second]).await?;

        // A lapsed visibility timeout: the message is delivered again; requeue reports a count.
        let third = publish(c, "jobs", "third").await?;
        consume(c, "jobs", &["--visibility", "1s", "--wait", "2s"]).await?;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let requeued = json(c, &["queue", "requeue", "jobs"]).await?;
        ensure!(u64_at(&requeued, "/requeued")? <= 1, "{requeued}");
        let got = consume(c, "jobs", &["--wait", "5s", "--ack"]).await?;
        ensure!(
            got.len() == 1 && got[0]["message_id"] == third.as_str() && got[0]["attempt"] == 2,
            "{got:?}"
        );
        ensure!(got[0]["acked"] == true, "{got:?}");

        // Stats count visible messages; purge deletes them.
        for i in 0..3 {
            publish(c, "jobs", &format!("p{i}")).await?;
        }
        let stats = json(c, &["queue", "stats", "jobs"]).await?;
        ensure!(u64_at(&stats, "/visible")? == 3, "{stats}");
        let purged = json(c, &["queue", "purge", "jobs"]).await?;
        ensure!(u64_at(&purged, "/purged")? == 3, "{purged}");
        let stats = json(c, &["queue", "stats", "jobs"]).await?;
        ensure!(u64_at(&stats, "/visible")? == 0, "{stats}");

        // Dedup: a repeat of the id stores nothing and returns the first id.
        let a = json(c, &["queue", "publish", "jobs", "x", "--dedup-id", "d1"]).await?;
        let b = json(c, &["queue", "publish", "jobs", "x", "--dedup-id", "d1"]).await?;
        ensure!(
            b["deduplicated"] == true && a["message_id"] == b["message_id"],
            "{a} {b}"
        );

        let list = json(c, &["queue", "list"]).await?;
        let topics = list["topics"].as_array().context("no topics array")?;
        let jobs = topics
            .iter()
            .find(|t| t["name"] == "jobs")
            .with_context(|| format!("jobs not listed: {list}"))?;
        ensure!(
            u64_at(jobs, "/settings/visibility_timeout_ms")? == 30_000,
            "{jobs}"
        );
        let none = json(c, &["queue", "list", "nothing-"]).await?;
        ensure!(none["topics"] == Value::Array(vec![]), "{none}");

        // The table output names its columns.
        let out = syncctl(c, &["queue", "stats", "jobs"]).output().await?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success() && text.contains("IN FLIGHT"), "{text}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_redriven_and_tail_prints_what_is_published() {
    scenario(3, Options::default(), LIMIT, async |c| {
        c.wait_for_leader(Duration::from_secs(10)).await?;
        json(c, &["queue", "create", "orders-dlq"]).await?;
        json(
            c,
            &[
                "queue",
                "create",
                "orders",
                "--max-deliveries",
                "1",
                "--dead-letter",
                "orders-dlq",
            ],
        )
        .await?;
        let id = publish(c, "orders", "poison").await?;
        consume(c, "orders", &["--wait", "2s"]).await?;
        json(c, &["queue", "nack", "orders", &id]).await?;
        let dlq = json(c, &["queue", "stats", "orders-dlq"]).await?;
        ensure!(u64_at(&dlq, "/visible")? == 1, "{dlq}");
        let moved = json(c, &["queue", "redrive", "orders-dlq"]).await?;
        ensure!(u64_at(&moved, "/moved")? == 1, "{moved}");
        let got = consume(c, "orders", &["--wait", "2s", "--ack"]).await?;
        ensure!(got.len() == 1 && got[0]["payload"] == "poison", "{got:?}");
        // And with --to, to another topic (which must exist).
        json(c, &["queue", "create", "retry"]).await?;
        let id = publish(c, "orders", "again").await?;
        consume(c, "orders", &["--wait", "2s"]).await?;
        json(c, &["queue", "nack", "orders", &id]).await?;
        let moved = json(c, &["queue", "redrive", "orders-dlq", "--to", "retry"]).await?;
        ensure!(u64_at(&moved, "/moved")? == 1, "{moved}");
        let got = consume(c, "retry", &["--wait", "2s", "--ack"]).await?;
        ensure!(got.len() == 1 && got[0]["payload"] == "again", "{got:?}");

        // tail: a message published while it runs is printed (and acked) within a bound.
        let mut tailing = syncctl(c, &["queue", "tail", "feed", "--output", "json"])
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = tailing.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let id = publish(c, "feed", "live").await?;
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("tail printed nothing within 10s")??
            .context("tail exited")?;
        let printed: Value = serde_json::from_str(&line)?;
        ensure!(
            printed["message_id"] == id.as_str() && printed["payload"] == "live",
            "{printed}"
        );
        ensure!(printed["acked"] == true, "{printed}");
        tailing.kill().await?;
        let stats = json(c, &["queue", "stats", "feed"]).await?;
        ensure!(
            u64_at(&stats, "/visible")? == 0 && u64_at(&stats, "/in_flight")? == 0,
            "acked by tail: {stats}"
        );
        Ok(())
    })
    .await;
}
