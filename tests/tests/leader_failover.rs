//! Failover: when the leader is killed (SIGKILL), the others elect a new leader within a few
//! election timeouts and no acknowledged write is lost; the old leader, restarted, catches up.

use std::time::Duration;

use anyhow::{Context, ensure};
use sync_tests::api::Consistency;
use sync_tests::{BackgroundWriter, Options, WriterConfig, scenario, write_keys};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_loses_no_acknowledged_write() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        let old = c.wait_for_leader(Duration::from_secs(5)).await?;
        let mut ledger = write_keys(&c.clients(), &c.ids(), "before", 30, 3).await;
        ledger.expect_all_acked()?;

        // Keep writing through every node while the leader dies.
        let writer = BackgroundWriter::spawn(&c.clients(), WriterConfig::new("during", c.ids()));
        writer.wait_for_acks(5, Duration::from_secs(5)).await?;
        let killed = Instant::now();
        c.kill9(old.id).await?;

        let bound = c.options().election_timeouts(10);
        let new = c
            .wait_for_leader_where(bound, "a new leader after the kill", |l| {
                l.id != old.id && l.term > old.term
            })
            .await?;
        let failover = killed.elapsed();
        ensure!(failover <= bound, "failover took {failover:?}");
        c.note(format!("failover took {failover:?}"));

        let acked = writer.acked();
        writer
            .wait_for_acks(acked + 10, Duration::from_secs(5))
            .await?;
        ledger.extend(writer.stop(Duration::from_secs(3)).await);
        ledger.expect_no_fatal()?;
        let after = write_keys(&c.clients(), &c.running(), "after", 20, 2).await;
        after.expect_all_acked()?;
        ledger.extend(after);

        for id in c.running() {
            ledger
                .verify(&c.client(id), Consistency::Linearizable)
                .await
                .with_context(|| format!("after failover to node {}", new.id))?;
        }

        // The old leader comes back as a follower and catches up from its own disk plus the
        // new leader's log.
        c.restart(old.id).await?;
        // Its applied index reaches what the leader had committed after every write above.
        c.wait_caught_up(old.id, Duration::from_secs(15)).await?;
        ledger
            .verify(&c.client(old.id), Consistency::Stale)
            .await
            .context("STALE reads on the restarted old leader")?;
        sync_tests::verify_converged(c, &ledger, Duration::from_secs(15)).await
    })
    .await;
}
