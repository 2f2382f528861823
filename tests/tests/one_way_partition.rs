//! One-way cuts: when one direction of the link between the leader and a follower fails (the
//! other still works), the cluster keeps committing, and after the heal every node converges.

use std::time::Duration;

use anyhow::Context;
use sync_tests::{BackgroundWriter, Ledger, Options, WriterConfig, scenario};

/// Which direction of the leader–follower link to cut.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// The leader cannot reach the follower (no AppendEntries arrive there), but the follower
    /// still reaches the leader (its votes and forwarded writes do).
    LeaderToFollower,
    /// The follower cannot reach the leader (it cannot forward writes or ask for votes), but
    /// the leader still replicates to it.
    FollowerToLeader,
}

async fn keeps_committing_across(cut: Cut) {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        let leader = c.wait_for_agreement(Duration::from_secs(5)).await?;
        let follower = c
            .ids()
            .into_iter()
            .find(|&id| id != leader.id)
            .context("no follower")?;
        let other = c
            .ids()
            .into_iter()
            .find(|&id| id != leader.id && id != follower)
            .context("no second follower")?;
        let (from, to) = match cut {
            Cut::LeaderToFollower => (leader.id, follower),
            Cut::FollowerToLeader => (follower, leader.id),
        };
        c.network().cut_one_way(from, to);
        c.note(format!("{cut:?}: cut {from}→{to} one way"));

        // One writer starts at the cut follower (its writes may have to go elsewhere), one at
        // the healthy follower.
        let at_cut = BackgroundWriter::spawn(
            &c.clients(),
            WriterConfig::new("via-cut", vec![follower, other, leader.id]),
        );
        let at_other = BackgroundWriter::spawn(
            &c.clients(),
            WriterConfig::new("via-other", vec![other, leader.id, follower]),
        );
        // Let the cut play out for several election timeouts, then demand steady progress.
        tokio::time::sleep(c.options().election_timeouts(5)).await;
        let acked = at_other.acked();
        at_other
            .wait_for_acks(acked + 20, Duration::from_secs(10))
            .await
            .context("the cluster stopped committing during a one-way cut")?;
        let mut ledger = Ledger::default();
        ledger.extend(at_cut.stop(Duration::from_secs(3)).await);
        ledger.extend(at_other.stop(Duration::from_secs(3)).await);
        ledger.expect_no_fatal()?;
        c.note(format!("during the cut: {}", ledger.summary()));

        c.network().heal();
        c.note("healed");
        sync_tests::verify_converged(c, &ledger, Duration::from_secs(15)).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_keeps_committing_when_the_leader_cannot_reach_a_follower() {
    keeps_committing_across(Cut::LeaderToFollower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_keeps_committing_when_a_follower_cannot_reach_the_leader() {
    keeps_committing_across(Cut::FollowerToLeader).await;
}
