//! Crash loop: while clients write through every node (numbering their requests and retrying
//! them unchanged), random nodes are killed with SIGKILL and restarted. At the end every
//! acknowledged write is readable on every node, and no write was applied twice.
//!
//! The victims and pauses come from a seed, printed in the failure report; set
//! `SYNCD_TEST_SEED` to replay the same choices.

use std::time::Duration;

use anyhow::ensure;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sync_tests::{BackgroundWriter, Ledger, Options, WriterConfig, scenario};

/// Kill-and-restart rounds.
const ROUNDS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_crash_loop_and_none_is_applied_twice() {
    let seed = std::env::var("SYNCD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    scenario(3, Options::default(), Duration::from_secs(120), async |c| {
        c.note(format!("seed {seed} (replay with SYNCD_TEST_SEED={seed})"));
        let mut rng = StdRng::seed_from_u64(seed);
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;

        // One writer per node: it sends there first and retries elsewhere. Every third write
        // sets the writer's counter key, which must never go back to an older value.
        let ids = c.ids();
        let writers: Vec<BackgroundWriter> = (0..ids.len())
            .map(|i| {
                let mut route = ids.clone();
                route.rotate_left(i);
                let config = WriterConfig {
                    counter_every: Some(3),
                    ..WriterConfig::new(format!("w{}", route[0]), route)
                };
                BackgroundWriter::spawn(&c.clients(), config)
            })
            .collect();
        for w in &writers {
            w.wait_for_acks(3, Duration::from_secs(10)).await?;
        }

        for round in 0..ROUNDS {
            // The first victim is the leader, so forwarded and in-flight writes are retried.
            let victim = if round == 0 {
                leader.id
            } else {
                ids[rng.random_range(0..ids.len())]
            };
            c.kill9(victim).await?;
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
            c.restart(victim).await?;
            c.wait_for_leader(Duration::from_secs(10)).await?;
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;
        }

        let mut ledger = Ledger::default();
        for w in writers {
            ledger.extend(w.stop(Duration::from_secs(5)).await);
        }
        c.note(format!("writes: {}", ledger.summary()));
        ledger.expect_no_fatal()?;
        ensure!(
            ledger.acked() >= 30,
            "too little was written to test anything: {}",
            ledger.summary()
        );
        sync_tests::verify_converged(c, &ledger, Duration::from_secs(20)).await
    })
    .await;
}
