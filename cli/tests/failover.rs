//! syncctl across a leader failure: a loop of `syncctl queue publish` and `syncctl cache set`
//! runs while the leader is killed with SIGKILL. Every call either succeeds or fails with exit
//! code 1 and one line on stderr (never a panic, a hang, or another code), and once a new
//! leader is elected calls succeed again with the same `--endpoints`, which still name the dead
//! node.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure};
use sync_tests::wait::eventually;
use sync_tests::{Options, scenario};
use tokio::time::Instant;

mod common;

use common::{endpoints, json, syncctl_at};

const LIMIT: Duration = Duration::from_secs(180);
const PATIENCE: Duration = Duration::from_secs(40);
/// Bound on one syncctl call, far above its own `--timeout`: a call that takes longer hangs.
const CALL_LIMIT: Duration = Duration::from_secs(30);

/// One syncctl call of the loop.
#[derive(Clone, Debug)]
struct Call {
    what: &'static str,
    started: Instant,
    code: Option<i32>,
    stderr: String,
}

impl Call {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_cleanly_while_the_leader_dies_and_succeed_again_after() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let old = c.wait_for_leader(PATIENCE).await?;
        let endpoints = endpoints(c);
        // A new directory accepts cache writes only after its first lease.
        eventually("a first cache write", PATIENCE, async || {
            json(c, &["cache", "set", "warm-up", "x", "--timeout", "10s"]).await
        })
        .await?;

        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let looping = tokio::spawn({
            let (calls, stop) = (calls.clone(), stop.clone());
            async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let n = i.to_string();
                    let (what, args): (&'static str, Vec<&str>) = if i.is_multiple_of(2) {
                        ("queue publish", vec!["queue", "publish", "failover", &n])
                    } else {
                        ("cache set", vec!["cache", "set", "failover-key", &n])
                    };
                    let started = Instant::now();
                    let outcome =
                        tokio::time::timeout(CALL_LIMIT, syncctl_at(&endpoints, &args).output())
                            .await;
                    let call = match outcome {
                        Ok(Ok(out)) => Call {
                            what,
                            started,
                            code: out.status.code(),
                            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                        },
                        Ok(Err(e)) => Call {
                            what,
                            started,
                            code: None,
                            stderr: format!("cannot run syncctl: {e}"),
                        },
                        Err(_) => Call {
                            what,
                            started,
                            code: None,
                            stderr: format!("hung for more than {CALL_LIMIT:?}"),
                        },
                    };
                    calls.lock().unwrap().push(call);
                }
            }
        });
        let successes_since = |since: Instant, what: &str| {
            calls
                .lock()
                .unwrap()
                .iter()
                .filter(|call| call.what == what && call.started >= since && call.ok())
                .count()
        };

        // Both kinds of call work before the failure.
        let start = Instant::now();
        eventually("calls to succeed before the kill", PATIENCE, async || {
            for what in ["queue publish", "cache set"] {
                ensure!(successes_since(start, what) >= 2, "not yet 2 × {what}");
            }
            Ok(())
        })
        .await?;

        c.kill9(old.id).await?;
        let killed_at = Instant::now();
        let new = c
            .wait_for_leader_where(PATIENCE, "a new leader", |l| l.id != old.id)
            .await?;
        let elected_at = Instant::now();
        c.note(format!(
            "node {} leads after {:?}",
            new.id,
            elected_at - killed_at
        ));

        // After the election, both kinds of call succeed again (a cache write may first wait
        // out the new directory's lease, so a few may fail before).
        eventually(
            "calls to succeed after the election",
            PATIENCE,
            async || {
                for what in ["queue publish", "cache set"] {
                    ensure!(successes_since(elected_at, what) >= 2, "not yet 2 × {what}");
                }
                Ok(())
            },
        )
        .await?;
        stop.store(true, Ordering::Relaxed);
        looping.await?;

        let calls = calls.lock().unwrap().clone();
        let during = calls.iter().filter(|c| c.started >= killed_at).count();
        let failed: Vec<&Call> = calls.iter().filter(|c| !c.ok()).collect();
        for call in &failed {
            let one_line = call.stderr.lines().count() == 1 && call.stderr.starts_with("error: ");
            if call.code != Some(1) || !one_line {
                bail!(
                    "{} started {:?} after the kill: exit {:?}, stderr {:?}",
                    call.what,
                    call.started.saturating_duration_since(killed_at),
                    call.code,
                    call.stderr
                );
            }
        }
        c.note(format!(
            "{} calls, {during} from the kill on, {} failed with one line and exit 1",
            calls.len(),
            failed.len()
        ));
        for call in &failed {
            c.note(format!("{}: {}", call.what, call.stderr.trim_end()));
        }
        Ok(())
    })
    .await;
}
