//! Election: a new cluster elects a leader quickly, every node agrees on it, and it keeps
//! leading while nothing fails.

use std::time::Duration;

use anyhow::{Context, ensure};
use sync_tests::api::Role;
use sync_tests::harness::{configuration, summarize};
use sync_tests::{Options, scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_is_elected_within_two_seconds_and_every_node_agrees_on_it() {
    scenario(3, Options::default(), Duration::from_secs(30), async |c| {
        let budget = Duration::from_secs(2);
        let remaining = budget.saturating_sub(c.spawned_at().elapsed());
        let leader = c
            .wait_for_agreement(remaining)
            .await
            .context("no leader that every node agrees on within 2 s of start")?;
        let elapsed = c.spawned_at().elapsed();
        ensure!(elapsed <= budget, "agreement took {elapsed:?}");

        for id in c.ids() {
            let s = c.status(id).await?;
            let expected = if id == leader.id {
                Role::Leader
            } else {
                Role::Follower
            };
            ensure!(s.role() == expected, "node {id}: {}", summarize(&s));
            ensure!(
                s.node_id == id && s.leader_id == leader.id && s.term == leader.term,
                "node {id}: {}",
                summarize(&s)
            );
            ensure!(
                configuration(&s) == [(1, false), (2, false), (3, false)],
                "node {id} reports another configuration: {}",
                summarize(&s)
            );
        }
        Ok(())
    })
    .await;
}

/// Heartbeats must keep followers from campaigning: over ten election timeouts of a healthy
/// cluster the leader and the term stay the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_leader_keeps_its_term() {
    scenario(3, Options::default(), Duration::from_secs(30), async |c| {
        let leader = c.wait_for_agreement(Duration::from_secs(5)).await?;
        tokio::time::sleep(c.options().election_timeouts(10)).await;
        let now = c.wait_for_agreement(Duration::from_secs(2)).await?;
        ensure!(
            now == leader,
            "leadership changed in a healthy cluster: {leader:?} became {now:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_cluster_elects_itself() {
    scenario(1, Options::default(), Duration::from_secs(20), async |c| {
        let leader = c.wait_for_agreement(Duration::from_secs(2)).await?;
        ensure!(leader.id == 1, "{leader:?}");
        Ok(())
    })
    .await;
}
