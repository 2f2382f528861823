//! `syncctl cache …` against a real 3-node cluster of `syncd` processes: the original design's
//! scenario node by node with `--node` (set k1 on node 1; node 2 misses, node 1 hits; the MESI
//! states and the directory's holders), compare-and-set with its exit code 3 on a version
//! mismatch, TTLs, deletes and each node's counters. JSON output is parsed and checked.

use std::time::Duration;

use anyhow::ensure;
use serde_json::Value;
use sync_tests::wait::eventually;
use sync_tests::{Cluster, Options, scenario};

mod common;

use common::{fails, json, run, u64_at};

const LIMIT: Duration = Duration::from_secs(120);
/// Bound on waits for the cluster (an election; a new directory's first lease, 5 s by default,
/// during which writes wait): generous, so that a loaded machine only makes the test slower.
const PATIENCE: Duration = Duration::from_secs(40);

/// `cache get KEY --node ID` as JSON.
async fn get(c: &Cluster, key: &str, node: u64) -> anyhow::Result<Value> {
    json(c, &["cache", "get", key, "--node", &node.to_string()]).await
}

/// `cache state KEY --node ID` as JSON.
async fn state(c: &Cluster, key: &str, node: u64) -> anyhow::Result<Value> {
    json(c, &["cache", "state", key, "--node", &node.to_string()]).await
}

/// `cache set KEY VALUE --node ID [EXTRA...]` as JSON; returns the new version.
async fn set(
    c: &Cluster,
    key: &str,
    value: &str,
    node: u64,
    extra: &[&str],
) -> anyhow::Result<u64> {
    let node = node.to_string();
    let mut args = vec!["cache", "set", key, value, "--node", &node];
    args.extend_from_slice(extra);
    let written = json(c, &args).await?;
    u64_at(&written, "/version")
}

fn holders(s: &Value) -> Vec<(u64, String)> {
    s["holders"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|h| {
                    (
                        h["node_id"].as_u64().unwrap_or(0),
                        h["state"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_scenario_node_by_node_with_mesi_states() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let leader = c.wait_for_leader(PATIENCE).await?;
        // A new directory accepts writes only after its first lease; retried until it does.
        eventually("a first cache write", PATIENCE, async || {
            set(c, "warm-up", "x", 1, &["--timeout", "10s"]).await
        })
        .await?;

        let v1 = set(c, "k1", "v1", 1, &[]).await?;
        let s1 = state(c, "k1", 1).await?;
        ensure!(s1["state"] == "MODIFIED" && s1["version"] == v1, "{s1}");

        // Node 2 misses and fills its line; node 1's line is recalled to SHARED.
        let g2 = get(c, "k1", 2).await?;
        ensure!(
            g2["hit"] == false && g2["found"] == true,
            "node 2's first get: {g2}"
        );
        ensure!(g2["value"] == "v1" && g2["version"] == v1, "{g2}");
        ensure!(g2["state"] == "SHARED" && g2["node"] == 2, "{g2}");
        // Node 1 hits.
        let g1 = get(c, "k1", 1).await?;
        ensure!(
            g1["hit"] == true && g1["value"] == "v1",
            "node 1's get: {g1}"
        );
        ensure!(g1["ttl_left_ms"].is_null(), "no TTL was set: {g1}");

        // The table says the same in words.
        let table = run(c, &["cache", "get", "k1", "--node", "1"]).await?;
        let text = String::from_utf8_lossy(&table.stdout);
        ensure!(
            text.contains("HIT") && text.contains("SHARED") && text.contains("v1"),
            "{text}"
        );
        let table = run(c, &["cache", "get", "k1", "--node", "3"]).await?;
        let text = String::from_utf8_lossy(&table.stdout);
        ensure!(
            text.contains("MISS"),
            "node 3's first read is a miss: {text}"
        );

        // Node 2's line, and the directory's holders (fetched from the leader, which runs the
        // directory, when node 2 is not the leader).
        let s2 = state(c, "k1", 2).await?;
        ensure!(s2["node_id"] == 2 && s2["state"] == "SHARED", "{s2}");
        ensure!(
            s2["version"] == v1 && u64_at(&s2, "/lease_remaining_ms")? > 0,
            "{s2}"
        );
        ensure!(s2["directory_node_id"] == leader.id, "{s2}");
        ensure!(
            s2["dirty"] == false,
            "write-through lines are never dirty: {s2}"
        );
        ensure!(s2["directory_version"] == v1, "{s2}");
        let all_three = vec![
            (1, "SHARED".to_owned()),
            (2, "SHARED".to_owned()),
            (3, "SHARED".to_owned()),
        ];
        ensure!(holders(&s2) == all_three, "{s2}");
        let table = run(c, &["cache", "state", "k1", "--node", "2"]).await?;
        let text = String::from_utf8_lossy(&table.stdout);
        ensure!(
            text.contains("SHARED") && text.contains(&format!("directory on node {}", leader.id)),
            "{text}"
        );

        // A write on node 3 invalidates the others: node 1 misses and reads it.
        let v2 = set(c, "k1", "v2", 3, &[]).await?;
        ensure!(v2 > v1);
        ensure!(state(c, "k1", 3).await?["state"] == "MODIFIED");
        ensure!(state(c, "k1", 1).await?["state"] == "INVALID");
        let g1 = get(c, "k1", 1).await?;
        ensure!(g1["hit"] == false && g1["value"] == "v2", "{g1}");

        // The counters show it: hits on node 1, misses on node 2, invalidations received on
        // node 2 and sent by the directory.
        let stats1 = json(c, &["cache", "stats", "--node", "1"]).await?;
        ensure!(
            stats1["node_id"] == 1 && u64_at(&stats1, "/hits")? >= 1,
            "{stats1}"
        );
        let stats2 = json(c, &["cache", "stats", "--node", "2"]).await?;
        ensure!(u64_at(&stats2, "/misses")? >= 1, "{stats2}");
        ensure!(u64_at(&stats2, "/invalidations_received")? >= 1, "{stats2}");
        let on_leader = json(c, &["cache", "stats", "--node", &leader.id.to_string()]).await?;
        ensure!(
            u64_at(&on_leader, "/invalidations_sent")? >= 1,
            "{on_leader}"
        );
        for field in [
            "write_backs",
            "evictions",
            "bytes",
            "entries",
            "capacity_bytes",
            "local_writes",
            "dirty_lines",
            "dirty_lines_lost",
        ] {
            ensure!(on_leader[field].is_u64(), "no {field}: {on_leader}");
        }
        let table = run(c, &["cache", "stats", "--node", "2"]).await?;
        let text = String::from_utf8_lossy(&table.stdout);
        ensure!(
            text.contains("misses") && text.contains("write backs"),
            "{text}"
        );

        let err = fails(c, &["cache", "get", "k1", "--node", "9"], 1).await?;
        ensure!(err.contains("no member has node id 9"), "{err}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_exits_3_on_a_mismatch_and_ttl_and_delete_work() {
    scenario(3, Options::default(), LIMIT, async |c| {
        c.wait_for_leader(PATIENCE).await?;
        eventually("a first cache write", PATIENCE, async || {
            set(c, "warm-up", "x", 2, &["--timeout", "10s"]).await
        })
        .await?;

        // --if-version 0: only if the key does not exist.
        let v1 = set(c, "acct", "100", 2, &["--if-version", "0"]).await?;
        let err = fails(c, &["cache", "set", "acct", "50", "--if-version", "0"], 3).await?;
        ensure!(err.contains(&format!("is at version {v1}")), "{err}");
        // A stale version is refused and the value is unchanged.
        let stale = (v1 - 1).to_string();
        let err = fails(
            c,
            &["cache", "set", "acct", "50", "--if-version", &stale],
            3,
        )
        .await?;
        ensure!(err.contains("nothing written"), "{err}");
        let read = get(c, "acct", 1).await?;
        ensure!(read["value"] == "100" && read["version"] == v1, "{read}");
        // The current version is accepted, on any node.
        let v2 = set(c, "acct", "150", 3, &["--if-version", &v1.to_string()]).await?;
        ensure!(v2 > v1);
        ensure!(get(c, "acct", 1).await?["value"] == "150");

        // A TTL shows as time left.
        set(c, "session-token", "abc", 1, &["--ttl", "30s"]).await?;
        let read = get(c, "session-token", 1).await?;
        let left = u64_at(&read, "/ttl_left_ms")?;
        ensure!(left > 0 && left <= 30_000, "{read}");

        // Delete, then the key is gone everywhere; deleting again deletes nothing.
        let deleted = json(c, &["cache", "del", "acct"]).await?;
        ensure!(
            deleted["deleted"] == true && u64_at(&deleted, "/version")? > v2,
            "{deleted}"
        );
        for node in 1..=3 {
            let read = get(c, "acct", node).await?;
            ensure!(read["found"] == false, "node {node}: {read}");
        }
        let again = json(c, &["cache", "del", "acct"]).await?;
        ensure!(again["deleted"] == false, "{again}");

        // Values from a file; binary values are shown as hex.
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("value.bin");
        std::fs::write(&path, [0xff_u8, 0x00, 0x10])?;
        let path = path.to_string_lossy().into_owned();
        json(c, &["cache", "set", "blob", "--file", &path]).await?;
        let read = get(c, "blob", 2).await?;
        ensure!(
            read["value_hex"] == "ff0010" && read["value"].is_null(),
            "{read}"
        );
        Ok(())
    })
    .await;
}
