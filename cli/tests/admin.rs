//! `syncctl member add|promote|remove`, `syncctl leader transfer` and `syncctl snapshot` against
//! a real 3-node cluster of `syncd` processes: a fourth node started by the harness joins as a
//! learner, is promoted and a member is removed, each checked in every node's own
//! `Cluster.Status`; leadership moves to the named node; a snapshot is taken on the named node
//! and its index shows in that node's status. Mistakes fail with one line and exit code 1.

use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;
use sync_tests::wait::eventually;
use sync_tests::{Options, scenario};

mod common;

use common::{fails, json, u64_at};

const LIMIT: Duration = Duration::from_secs(120);
/// Bound on waits for the cluster to get somewhere (an election, a learner catching up):
/// generous, so that a loaded machine only makes the test slower.
const PATIENCE: Duration = Duration::from_secs(30);

/// `(id, learner)` of each member in a membership printed as JSON, in id order.
fn members(printed: &Value) -> anyhow::Result<Vec<(u64, bool)>> {
    let list = printed["members"]
        .as_array()
        .with_context(|| format!("no members in {printed}"))?;
    let mut m: Vec<(u64, bool)> = list
        .iter()
        .map(|m| (m["id"].as_u64().unwrap_or(0), m["learner"] == true))
        .collect();
    m.sort_unstable();
    Ok(m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_as_a_learner_is_promoted_and_a_member_is_removed() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let leader = c.wait_for_leader(PATIENCE).await?;
        let address = c.add_node(4).await?;

        let added = json(c, &["member", "add", "4", &address]).await?;
        let with_learner = [(1, false), (2, false), (3, false), (4, true)];
        ensure!(members(&added)? == with_learner, "{added}");
        ensure!(u64_at(&added, "/config_index")? > 0, "{added}");
        c.wait_for_configuration(&[1, 2, 3, 4], &with_learner, PATIENCE)
            .await?;
        // Adding it again with the same address changes nothing and succeeds.
        let again = json(c, &["member", "add", "4", &address]).await?;
        ensure!(members(&again)? == with_learner, "{again}");

        // The learner is promoted once it has caught up; until then the server refuses with
        // FAILED_PRECONDITION, which syncctl reports as one line and exit code 1.
        c.wait_caught_up(4, PATIENCE).await?;
        let promoted = eventually("member promote 4", PATIENCE, async || {
            json(c, &["member", "promote", "4"]).await
        })
        .await?;
        let four_voters = [(1, false), (2, false), (3, false), (4, false)];
        ensure!(members(&promoted)? == four_voters, "{promoted}");
        c.wait_for_configuration(&[1, 2, 3, 4], &four_voters, PATIENCE)
            .await?;
        let err = fails(c, &["member", "promote", "4"], 1).await?;
        ensure!(err.contains("failed precondition"), "{err}");

        // Remove a follower among the original three.
        let follower = (1..=3).find(|&id| id != leader.id).context("no follower")?;
        let removed = json(c, &["member", "remove", &follower.to_string()]).await?;
        let rest: Vec<(u64, bool)> = four_voters
            .iter()
            .copied()
            .filter(|&(id, _)| id != follower)
            .collect();
        ensure!(members(&removed)? == rest, "{removed}");
        let remaining: Vec<u64> = rest.iter().map(|&(id, _)| id).collect();
        c.wait_for_configuration(&remaining, &rest, PATIENCE)
            .await?;

        let err = fails(c, &["member", "remove", "99"], 1).await?;
        ensure!(err.contains("not found"), "{err}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_to_the_named_node_and_snapshots_are_taken_where_asked() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let leader = c.wait_for_leader(PATIENCE).await?;
        let target = (1..=3).find(|&id| id != leader.id).context("no follower")?;

        let moved = json(
            c,
            &[
                "leader",
                "transfer",
                "--to",
                &target.to_string(),
                "--timeout",
                "10s",
            ],
        )
        .await?;
        ensure!(u64_at(&moved, "/id")? == target, "{moved}");
        ensure!(u64_at(&moved, "/term")? > leader.term, "{moved}");
        let now = c
            .wait_for_leader_where(PATIENCE, "the named node to lead", |l| l.id == target)
            .await?;
        ensure!(now.term >= u64_at(&moved, "/term")?, "{moved} vs {now:?}");

        // Without --to, the leader picks another voter.
        let picked = json(c, &["leader", "transfer", "--timeout", "10s"]).await?;
        let picked_id = u64_at(&picked, "/id")?;
        ensure!(
            picked_id != target && (1..=3).contains(&picked_id),
            "{picked}"
        );
        c.wait_for_leader_where(PATIENCE, "the picked node to lead", |l| l.id == picked_id)
            .await?;

        // Something to snapshot, then a snapshot on node `target` (now a follower).
        for i in 0..5 {
            json(c, &["queue", "publish", "snap", &format!("m{i}")]).await?;
        }
        c.wait_caught_up(target, PATIENCE).await?;
        let taken = json(c, &["snapshot", "--node", &target.to_string()]).await?;
        ensure!(u64_at(&taken, "/node_id")? == target, "{taken}");
        let index = u64_at(&taken, "/index")?;
        ensure!(index > 0 && u64_at(&taken, "/term")? > 0, "{taken}");
        ensure!(u64_at(&taken, "/size_bytes")? > 0, "{taken}");
        ensure!(taken["took_us"].is_u64(), "{taken}");
        let status = c.status(target).await?;
        ensure!(
            status.snapshot_index >= index,
            "node {target} reports snapshot index {} after a snapshot at {index}",
            status.snapshot_index
        );

        // Without --node, the leader takes it.
        c.wait_for_agreement(PATIENCE).await?;
        let on_leader = json(c, &["snapshot"]).await?;
        ensure!(u64_at(&on_leader, "/node_id")? == picked_id, "{on_leader}");

        let err = fails(c, &["snapshot", "--node", "9"], 1).await?;
        ensure!(err.contains("no member has node id 9"), "{err}");
        let err = fails(c, &["leader", "transfer", "--to", "9"], 1).await?;
        ensure!(err.contains("not found"), "{err}");
        Ok(())
    })
    .await;
}
