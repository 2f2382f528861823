//! Graceful shutdown: SIGTERM on the leader hands leadership over (faster than an election),
//! exits with status 0 and loses no acknowledged write; the node restarts cleanly. A follower
//! exits with status 0 too.

use std::time::Duration;

use anyhow::{Context, ensure};
use sync_tests::api::Consistency;
use sync_tests::{BackgroundWriter, Options, WriterConfig, scenario, write_keys};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_leader_hands_over_exits_zero_and_loses_nothing() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        let old = c.wait_for_agreement(Duration::from_secs(5)).await?;
        let mut ledger = write_keys(&c.clients(), &c.ids(), "before", 20, 2).await;
        ledger.expect_all_acked()?;
        let writer = BackgroundWriter::spawn(&c.clients(), WriterConfig::new("during", c.ids()));
        writer.wait_for_acks(5, Duration::from_secs(5)).await?;

        let sent = Instant::now();
        c.send_sigterm(old.id)?;
        let bound = c.options().election_timeouts(2);
        let new = c
            .wait_for_leader_where(
                Duration::from_secs(5),
                "a new leader after SIGTERM on the old one",
                |l| l.id != old.id && l.term > old.term,
            )
            .await?;
        let handover = sent.elapsed();
        c.note(format!("handover to node {} took {handover:?}", new.id));
        ensure!(
            handover <= bound,
            "leadership moved after {handover:?}, more than two election timeouts ({bound:?})"
        );
        let status = c.wait_exit(old.id, Duration::from_secs(10)).await?;
        ensure!(
            status.code() == Some(0),
            "the old leader exited with {status}"
        );

        let acked = writer.acked();
        writer
            .wait_for_acks(acked + 10, Duration::from_secs(5))
            .await?;
        ledger.extend(writer.stop(Duration::from_secs(3)).await);
        ledger.expect_no_fatal()?;
        ledger
            .verify(&c.client(new.id), Consistency::Linearizable)
            .await
            .context("after the handover")?;

        c.restart(old.id).await?;
        c.wait_caught_up(old.id, Duration::from_secs(10)).await?;
        ledger
            .verify(&c.client(old.id), Consistency::Stale)
            .await
            .context("STALE reads on the restarted node")?;
        sync_tests::verify_converged(c, &ledger, Duration::from_secs(15)).await?;

        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        let follower = c
            .ids()
            .into_iter()
            .find(|&id| id != leader.id)
            .context("no follower")?;
        let status = c.sigterm(follower).await?;
        ensure!(status.code() == Some(0), "a follower exited with {status}");
        Ok(())
    })
    .await;
}
