//! A paused leader (SIGSTOP: alive, sockets open, doing nothing) is replaced; once resumed it
//! steps down to follower in the newer term, serves no stale linearizable read, and catches up.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use sync_tests::api::{Consistency, Role};
use sync_tests::harness::summarize;
use sync_tests::wait::eventually;
use sync_tests::{Options, scenario, write_keys};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_replaced_and_steps_down_when_resumed() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        let old = c.wait_for_leader(Duration::from_secs(5)).await?;
        let mut ledger = write_keys(&c.clients(), &c.ids(), "before", 20, 2).await;
        ledger.expect_all_acked()?;

        c.sigstop(old.id)?;
        let new = c
            .wait_for_leader_where(
                c.options().election_timeouts(10),
                "a new leader while the old one is paused",
                |l| l.id != old.id && l.term > old.term,
            )
            .await?;
        let during = write_keys(&c.clients(), &c.running(), "during", 20, 2).await;
        during.expect_all_acked()?;
        ledger.extend(during.clone());

        c.sigcont(old.id)?;
        // Right after waking up the old leader may still believe it leads. A linearizable read
        // through it must either fail or see the writes made while it slept.
        let probe = during
            .histories
            .iter()
            .flat_map(|h| h.ops.last())
            .next()
            .context("no write during the pause")?;
        match c
            .client(old.id)
            .get(probe.key.clone(), Consistency::Linearizable)
            .await
        {
            Ok(r) if !r.found || r.value != probe.value => bail!(
                "the resumed old leader served a stale linearizable read of {:?}: found={} \
                 value={:?}",
                probe.key,
                r.found,
                r.value
            ),
            Ok(_) => c.note("the resumed leader's first linearizable read was fresh"),
            Err(e) => c.note(format!("the resumed leader's first read failed: {e}")),
        }

        let s = eventually(
            "the old leader to step down to follower in the newer term",
            c.options().election_timeouts(10),
            async || {
                let s = c.status(old.id).await?;
                ensure!(
                    s.role() == Role::Follower && s.term >= new.term && s.leader_id != old.id,
                    "{}",
                    summarize(&s)
                );
                Ok(s)
            },
        )
        .await?;
        c.note(format!("old leader now: {}", summarize(&s)));

        c.wait_caught_up(old.id, Duration::from_secs(10)).await?;
        ledger
            .verify(&c.client(old.id), Consistency::Stale)
            .await
            .context("STALE reads on the resumed old leader")?;
        ledger
            .verify(&c.client(old.id), Consistency::Linearizable)
            .await
            .context("linearizable reads through the resumed old leader")?;
        sync_tests::verify_converged(c, &ledger, Duration::from_secs(15)).await
    })
    .await;
}
