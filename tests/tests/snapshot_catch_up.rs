//! Catch-up by snapshot: a follower that was down while the others wrote far past their
//! snapshot threshold (so the leader compacted its log beyond the follower's last entry)
//! catches up when it restarts, with every acknowledged write.

use std::time::Duration;

use anyhow::{Context, ensure};
use sync_tests::api::Consistency;
use sync_tests::harness::summarize;
use sync_tests::wait::eventually;
use sync_tests::{Options, scenario, write_keys};

/// Entries between snapshots.
const THRESHOLD: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_compacted_log_catches_up_by_snapshot() {
    let options = Options::default().with_snapshot_threshold(THRESHOLD);
    scenario(3, options, Duration::from_secs(60), async |c| {
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        let follower = c
            .ids()
            .into_iter()
            .find(|&id| id != leader.id)
            .context("no follower")?;
        let mut ledger = write_keys(&c.clients(), &c.ids(), "before", 10, 2).await;
        ledger.expect_all_acked()?;
        let s = c.wait_caught_up(follower, Duration::from_secs(5)).await?;
        let behind = s.last_log_index;
        c.kill9(follower).await?;
        c.note(format!(
            "node {follower} stopped with its last entry at {behind}"
        ));

        let during = write_keys(&c.clients(), &c.running(), "during", 300, 8).await;
        during.expect_all_acked()?;
        ledger.extend(during);

        // The live nodes snapshot every THRESHOLD entries and compact their logs. Status has no
        // first-log-index, so the proof that the leader no longer holds the entry after
        // `behind` (and the follower can only catch up from a snapshot) combines its
        // `last_log_index` with the `syncd_log_entries` gauge (entries retained after the last
        // snapshot): the first retained index is `last - retained + 1`.
        let (leader_status, retained) = eventually(
            "the leader to compact its log past the stopped follower's last entry",
            Duration::from_secs(10),
            async || {
                let (l, s) = c.leader_status(Duration::from_secs(2)).await?;
                ensure!(s.snapshot_index > behind + 1, "{}", summarize(&s));
                let retained = c.metric(l.id, "syncd_log_entries").await? as u64;
                let first = (s.last_log_index + 1).saturating_sub(retained);
                ensure!(
                    first > behind + 1,
                    "the leader retains {retained} entries up to {}, from {first}: it still \
                     holds entry {} ({})",
                    s.last_log_index,
                    behind + 1,
                    summarize(&s)
                );
                Ok((s, retained))
            },
        )
        .await?;
        c.note(format!(
            "leader before restart: {} ({retained} entries retained)",
            summarize(&leader_status)
        ));

        c.restart(follower).await?;
        let caught_up = c.wait_caught_up(follower, Duration::from_secs(20)).await?;
        c.note(format!(
            "follower after catch-up: {}",
            summarize(&caught_up)
        ));
        ensure!(
            caught_up.snapshot_index > behind,
            "the follower caught up but reports no snapshot past its old last entry {behind}: {}",
            summarize(&caught_up)
        );
        ledger
            .verify(&c.client(follower), Consistency::Stale)
            .await
            .context("STALE reads on the follower after catch-up")?;

        // An explicit snapshot covers (at least) what the node had applied when asked.
        let applied = c.status(follower).await?.applied_index;
        let snapshot = c
            .client(follower)
            .snapshot()
            .await
            .context("Cluster.Snapshot on the follower")?;
        ensure!(
            snapshot.index >= applied,
            "Snapshot at {} but {applied} was applied before the call",
            snapshot.index
        );
        let after = c.status(follower).await?;
        ensure!(
            after.snapshot_index >= snapshot.index,
            "Status does not report the snapshot just taken at {}: {}",
            snapshot.index,
            summarize(&after)
        );

        sync_tests::verify_converged(c, &ledger, Duration::from_secs(15)).await
    })
    .await;
}
