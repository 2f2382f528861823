//! Membership changes: a fourth node joins as a learner, catches up and is promoted; then a
//! follower and finally the leader itself are removed. Every node that remains reports the new
//! configuration, and writes commit at every step.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use sync_tests::api::{
    AddMemberRequest, Consistency, Member, PromoteLearnerRequest, RemoveMemberRequest, Role,
};
use sync_tests::harness::{configuration, summarize};
use sync_tests::wait::eventually;
use sync_tests::workload::{Session, show};
use sync_tests::{Cluster, Ledger, NodeClient, Options, scenario, write_keys};
use tokio::time::Instant;
use tonic::{Code, Status};

/// How long one membership call may keep being retried.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Sends one administrative call until it succeeds, to each running node in turn (they forward
/// to the leader). The call must reuse its RequestHeader, so a retry of a change that was
/// applied returns the first answer. FAILED_PRECONDITION is retried as well: a previous change
/// may not be committed yet, or a learner may not have caught up.
async fn admin<T>(
    c: &Cluster,
    what: &str,
    mut call: impl AsyncFnMut(NodeClient) -> Result<T, Status>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + ADMIN_TIMEOUT;
    let mut turn = 0;
    loop {
        let running = c.running();
        let node = running[turn % running.len()];
        turn += 1;
        match call(c.client(node)).await {
            Ok(answer) => {
                c.note(format!("{what}: done through node {node}"));
                return Ok(answer);
            }
            Err(e) => {
                let transient = matches!(
                    e.code(),
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::FailedPrecondition
                        | Code::Unknown
                        | Code::Cancelled
                );
                if !transient || Instant::now() >= deadline {
                    bail!("{what} through node {node}: {}", show(&e));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn members(list: &[Member]) -> Vec<(u64, bool)> {
    let mut m: Vec<(u64, bool)> = list.iter().map(|m| (m.id, m.learner)).collect();
    m.sort_unstable();
    m
}

/// Waits until every node of `nodes` reports `expected` as its configuration.
async fn wait_for_configuration(
    c: &Cluster,
    nodes: &[u64],
    expected: &[(u64, bool)],
) -> anyhow::Result<()> {
    let what = format!("nodes {nodes:?} to report configuration {expected:?}");
    eventually(&what, Duration::from_secs(10), async || {
        for &id in nodes {
            let s = c.status(id).await?;
            ensure!(configuration(&s) == expected, "{}", summarize(&s));
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_joins_is_promoted_and_voters_including_the_leader_are_removed() {
    scenario(3, Options::default(), Duration::from_secs(90), async |c| {
        let mut session = Session::new();
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let mut ledger = Ledger::default();
        let three = write_keys(&c.clients(), &c.ids(), "three", 20, 2).await;
        three.expect_all_acked()?;
        ledger.extend(three);

        // --- a fourth node joins as a learner ---
        let address = c.add_node(4).await?;
        let add = AddMemberRequest {
            header: Some(session.next_header()),
            id: 4,
            address: address.clone(),
            learner: true,
        };
        let added = admin(c, "AddMember 4 (learner)", async |n| {
            n.add_member(add.clone()).await
        })
        .await?;
        let with_learner = [(1, false), (2, false), (3, false), (4, true)];
        ensure!(members(&added.members) == with_learner, "{added:?}");
        // Adding it again, same address and kind, changes nothing.
        let again = AddMemberRequest {
            header: Some(session.next_header()),
            ..add.clone()
        };
        let same = admin(c, "AddMember 4 again", async |n| {
            n.add_member(again.clone()).await
        })
        .await?;
        // No new configuration entry: the index is not past the first one. (What index a
        // no-op reports is not pinned down by cluster.proto; 0 and the first index both pass.)
        ensure!(
            members(&same.members) == with_learner && same.config_index <= added.config_index,
            "a repeated AddMember changed the configuration: {same:?} after {added:?}"
        );

        let caught_up = c.wait_caught_up(4, Duration::from_secs(10)).await?;
        ensure!(
            caught_up.role() == Role::Learner,
            "node 4 should be a learner: {}",
            summarize(&caught_up)
        );
        wait_for_configuration(c, &[1, 2, 3, 4], &with_learner).await?;
        ledger
            .verify(&c.client(4), Consistency::Stale)
            .await
            .context("the learner's STALE reads")?;

        // --- the learner becomes a voter ---
        let promote = PromoteLearnerRequest {
            header: Some(session.next_header()),
            id: 4,
        };
        let promoted = admin(c, "PromoteLearner 4", async |n| {
            n.promote_learner(promote).await
        })
        .await?;
        let four = [(1, false), (2, false), (3, false), (4, false)];
        ensure!(members(&promoted.members) == four, "{promoted:?}");
        wait_for_configuration(c, &[1, 2, 3, 4], &four).await?;
        let w = write_keys(&c.clients(), &c.running(), "four", 10, 2).await;
        w.expect_all_acked()?;
        ledger.extend(w);

        // --- a voter that is not the leader leaves ---
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        let victim = [1, 2, 3]
            .into_iter()
            .find(|&id| id != leader.id)
            .context("no follower")?;
        let remove = RemoveMemberRequest {
            header: Some(session.next_header()),
            id: victim,
        };
        let removed = admin(c, &format!("RemoveMember {victim}"), async |n| {
            n.remove_member(remove).await
        })
        .await?;
        let three_left: Vec<(u64, bool)> = four.into_iter().filter(|m| m.0 != victim).collect();
        ensure!(members(&removed.members) == three_left, "{removed:?}");
        let remaining: Vec<u64> = three_left.iter().map(|m| m.0).collect();
        wait_for_configuration(c, &remaining, &three_left).await?;
        c.kill9(victim).await?;
        let w = write_keys(&c.clients(), &remaining, "three-again", 10, 2).await;
        w.expect_all_acked()?;
        ledger.extend(w);

        // --- the leader removes itself, and hands over leadership ---
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        let remove = RemoveMemberRequest {
            header: Some(session.next_header()),
            id: leader.id,
        };
        let removed = admin(
            c,
            &format!("RemoveMember {} (the leader)", leader.id),
            async |n| n.remove_member(remove).await,
        )
        .await?;
        let two_left: Vec<(u64, bool)> = three_left
            .into_iter()
            .filter(|m| m.0 != leader.id)
            .collect();
        ensure!(members(&removed.members) == two_left, "{removed:?}");
        let remaining: Vec<u64> = two_left.iter().map(|m| m.0).collect();
        let new = c
            .wait_for_leader_where(
                c.options().election_timeouts(10),
                "a leader after the old one removed itself",
                |l| l.id != leader.id && remaining.contains(&l.id),
            )
            .await?;
        wait_for_configuration(c, &remaining, &two_left).await?;
        c.kill9(leader.id).await?;
        c.note(format!("node {} leads the last two", new.id));
        let w = write_keys(&c.clients(), &remaining, "two", 10, 2).await;
        w.expect_all_acked()?;
        ledger.extend(w);

        sync_tests::verify_converged(c, &ledger, Duration::from_secs(15)).await
    })
    .await;
}
