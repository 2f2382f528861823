//! Partitions: a leader cut off from the majority acknowledges no write and answers no
//! linearizable read, while the majority elects a leader and goes on; after the heal every node
//! converges. A follower cut off and healed does not unseat the leader (pre-vote).

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use sync_tests::api::{Consistency, Role};
use sync_tests::harness::summarize;
use sync_tests::workload::{History, Op, Outcome, Session};
use sync_tests::{Cluster, NodeClient, Options, scenario, write_keys};
use tonic::{Code, Status};

/// The deadline of calls to a node that must refuse them.
const REFUSAL_DEADLINE: Duration = Duration::from_millis(1500);

/// A node without a leader must answer UNAVAILABLE, or DEADLINE_EXCEEDED when the call's
/// deadline passes first (common.proto, kv.proto). Note: tonic's own server-side enforcement of
/// `grpc-timeout` answers CANCELLED "Timeout expired", so a runtime that leaves the deadline to
/// tonic fails this check; it has to time the call out itself.
fn check_refusal(what: &str, e: &Status) -> anyhow::Result<()> {
    ensure!(
        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{what} was refused with {:?} ({}), but the contract says UNAVAILABLE or \
         DEADLINE_EXCEEDED",
        e.code(),
        e.message()
    );
    Ok(())
}

/// Sends one write to a node that must not acknowledge it, and records it in `attempted` as a
/// write of unknown outcome (after the heal it must be absent or have exactly its value).
async fn refused_write(
    c: &Cluster,
    node: &NodeClient,
    session: &mut Session,
    attempted: &mut History,
) -> anyhow::Result<()> {
    let header = session.next_header();
    let key = format!("minority/{}", header.sequence);
    let value = format!("m{}", header.sequence);
    attempted.ops.push(Op {
        sequence: header.sequence,
        key: Bytes::from(key.clone()),
        value: Bytes::from(value.clone()),
        counter: false,
        attempts: 1,
        outcome: Outcome::Unknown,
    });
    match node.put(Some(header), key.clone(), value).await {
        Ok(r) => bail!(
            "the cut-off node {} acknowledged a write of {key} at index {}",
            node.id(),
            r.index
        ),
        Err(e) => {
            c.note(format!(
                "write {key} on the cut-off node: {:?} {}",
                e.code(),
                e.message()
            ));
            check_refusal(&format!("the write of {key} on the cut-off node"), &e)
        }
    }
}

/// A linearizable read on a node that must refuse it.
async fn refused_read(c: &Cluster, node: &NodeClient, key: Bytes) -> anyhow::Result<()> {
    match node.get(key.clone(), Consistency::Linearizable).await {
        Ok(r) => bail!(
            "the cut-off node {} answered a linearizable read of {key:?} (found={}, value={:?})",
            node.id(),
            r.found,
            r.value
        ),
        Err(e) => {
            c.note(format!(
                "read on the cut-off node: {:?} {}",
                e.code(),
                e.message()
            ));
            check_refusal("a linearizable read on the cut-off node", &e)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_majority_acknowledges_nothing_and_the_majority_moves_on() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        let old = c.wait_for_leader(Duration::from_secs(5)).await?;
        let majority: Vec<u64> = c.ids().into_iter().filter(|&id| id != old.id).collect();
        let mut ledger = write_keys(&c.clients(), &c.ids(), "before", 20, 2).await;
        ledger.expect_all_acked()?;
        let known = ledger.histories[0].ops[0].clone();

        c.network().partition(&[old.id], &majority);
        c.note(format!("partition: {} | {majority:?}", old.id));
        let cut_off = c.client(old.id).with_timeout(REFUSAL_DEADLINE);
        let mut session = Session::new();
        let mut attempted = History {
            name: "minority".into(),
            client_id: session.client_id(),
            ..History::default()
        };

        // At once, while it may still believe it leads: no acknowledgement, no read.
        refused_write(c, &cut_off, &mut session, &mut attempted).await?;
        refused_read(c, &cut_off, known.key.clone()).await?;

        let new = c
            .wait_for_leader_where(
                c.options().election_timeouts(10),
                "a leader on the majority side",
                |l| l.id != old.id && l.term > old.term,
            )
            .await?;
        let during = write_keys(&c.clients(), &majority, "during", 20, 2).await;
        during.expect_all_acked()?;
        let fresh = during.histories[0].ops[0].clone();
        ledger.extend(during);

        // Once the majority moved on: still no acknowledgement, and no stale answer to a
        // linearizable read of a key written on the other side.
        refused_write(c, &cut_off, &mut session, &mut attempted).await?;
        refused_read(c, &cut_off, fresh.key.clone()).await?;
        // A STALE read works anywhere, from what the node applied.
        let stale = cut_off
            .get(known.key.clone(), Consistency::Stale)
            .await
            .context("a STALE read on the cut-off node")?;
        ensure!(
            stale.found && stale.value == known.value,
            "STALE read on the cut-off node: {stale:?}"
        );
        let s = c.status(old.id).await?;
        ensure!(
            s.role() != Role::Leader || s.term < new.term,
            "the cut-off node still leads in the new term: {}",
            summarize(&s)
        );

        c.network().heal();
        c.note("healed");
        ledger.extend(attempted);
        sync_tests::verify_converged(c, &ledger, Duration::from_secs(15)).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_follower_rejoins_without_unseating_the_leader() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        let leader = c.wait_for_agreement(Duration::from_secs(5)).await?;
        let follower = c
            .ids()
            .into_iter()
            .find(|&id| id != leader.id)
            .context("no follower")?;
        let others: Vec<u64> = c.ids().into_iter().filter(|&id| id != follower).collect();

        c.network().isolate(follower);
        c.note(format!("isolated node {follower}"));
        let ledger = write_keys(&c.clients(), &others, "during", 20, 2).await;
        ledger.expect_all_acked()?;
        // Long enough for the follower to time out several times.
        tokio::time::sleep(c.options().election_timeouts(5)).await;
        let s = c.status(follower).await?;
        ensure!(
            s.term == leader.term,
            "the isolated follower raised its term (pre-vote should prevent it): {}",
            summarize(&s)
        );
        let cut_off = c.client(follower).with_timeout(REFUSAL_DEADLINE);
        refused_read(c, &cut_off, ledger.histories[0].ops[0].key.clone()).await?;

        c.network().heal();
        c.note("healed");
        c.wait_caught_up(follower, Duration::from_secs(10)).await?;
        let now = c.wait_for_agreement(Duration::from_secs(5)).await?;
        ensure!(
            now == leader,
            "the rejoining follower unseated the leader: {leader:?} became {now:?}"
        );
        sync_tests::verify_converged(c, &ledger, Duration::from_secs(15)).await
    })
    .await;
}
