//! `syncctl bench locks`: an exclusive lock taken and given back per operation.
//!
//! Every client has its own session (syncd) or lease (etcd), opened before the clock starts
//! with a TTL that outlives the run, so no keep-alive traffic competes with the measurement,
//! and closed after it.
//!
//! - Uncontended (default): client i loops Acquire then Release on a lock of its own
//!   (`PREFIX/lock/i`); an operation is the pair, and both calls are timed together. Two
//!   replicated writes per operation on either system.
//! - Contended (`--contended`): every client loops Acquire then Release on ONE lock
//!   (`PREFIX/lock/contended`). Each Acquire waits server-side, in the lock's queue, until the
//!   holder releases; an operation is one hand-off, so ops/s is hand-offs per second, and the
//!   latency is the Acquire's: the wait for the grant. The Release is not timed.
//!
//! No correctness check rides along, unlike `bench raw`'s read-back: a client that releases at
//! once cannot observe two holders at the same moment (it counts as a holder only between the
//! grant's arrival and the Release's departure, microseconds), so such a check would prove
//! nothing. The lock service's guarantees are tested by the cluster tests instead.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::future::join_all;
use serde::Serialize;
use tokio::time::Instant;

use super::driver::{Call, Done, Worker};
use super::summary::Summary;
use super::{Run, ensure_progress, print_results, timing};
use crate::args::{BenchLocksArgs, GlobalOpts};
use crate::output::duration;

/// How long a session outlives the run (warm-up and measured phase): setting up the clients
/// before, and the sessions still open while the last operations finish.
const SESSION_SLACK: Duration = Duration::from_secs(60);
/// The longest session syncd grants (lock.proto: TTL at most 600 000 ms).
const MAX_SESSION_TTL: Duration = Duration::from_secs(600);

/// A system `bench locks` can load.
pub trait LockTarget: Send + Sync + 'static {
    type Locker: Locker;

    /// A new client with a session (lease) of its own, living `ttl`, that will take the lock
    /// `name`. `index` picks which of the shared connections it uses.
    fn locker(
        &self,
        index: usize,
        name: String,
        ttl: Duration,
    ) -> impl Future<Output = Result<Self::Locker, String>> + Send;

    /// The member the clients send to now (after any redirect), `host:port`.
    fn endpoint(&self) -> String;
}

/// One client's session and lock.
pub trait Locker: Send + 'static {
    /// What a Release needs from the Acquire (etcd: the key that holds the lock).
    type Held: Send;

    /// Takes the lock exclusively, waiting for it server-side up to the request timeout.
    fn acquire(&mut self) -> impl Future<Output = Call<Self::Held>> + Send;

    /// Gives the lock back.
    fn release(&mut self, held: Self::Held) -> impl Future<Output = Call<()>> + Send;

    /// Ends the session (lease).
    fn close(self) -> impl Future<Output = Result<(), String>> + Send;
}

/// One target's measured phase.
#[derive(Serialize)]
struct Measured {
    #[serde(flatten)]
    summary: Summary,
    /// Sessions (leases) that could not be closed after the run; they expire with their TTL.
    unclosed_sessions: usize,
}

impl AsRef<Summary> for Measured {
    fn as_ref(&self) -> &Summary {
        &self.summary
    }
}

#[derive(Serialize)]
struct WorkloadJson {
    /// "uncontended" or "contended".
    mode: &'static str,
    clients: u32,
    connections: u32,
    duration_secs: f64,
    warmup_secs: f64,
    /// The TTL of every session (lease).
    session_ttl_secs: f64,
}

pub async fn run(global: &GlobalOpts, args: &BenchLocksArgs) -> anyhow::Result<()> {
    let load = &args.load;
    let ttl = load.warmup + load.duration + SESSION_SLACK;
    if ttl > MAX_SESSION_TTL {
        bail!(
            "--warmup plus --duration is at most {} for bench locks (each client's session must \
             outlive the run, and syncd sessions live at most {}); use a shorter --duration",
            duration(MAX_SESSION_TTL - SESSION_SLACK),
            duration(MAX_SESSION_TTL)
        );
    }
    let run = Run::new(
        global,
        load,
        if args.contended {
            "hand-offs"
        } else {
            "acquire+release"
        },
    );
    let targets = run.connect(global, "locks").await?;
    let plan = Plan {
        run: &run,
        contended: args.contended,
        ttl,
        // Random per invocation: locks of different runs never meet.
        prefix: format!("syncctl-bench/{:08x}/lock", rand::random::<u32>()),
    };

    let mut results = vec![plan.measure("syncd", &targets.syncd).await?];
    if let Some(etcd) = &targets.etcd {
        results.push(plan.measure("etcd", etcd).await?);
    }
    let workload = WorkloadJson {
        mode: if args.contended {
            "contended"
        } else {
            "uncontended"
        },
        clients: load.clients,
        connections: load.connections,
        duration_secs: load.duration.as_secs_f64(),
        warmup_secs: load.warmup.as_secs_f64(),
        session_ttl_secs: ttl.as_secs_f64(),
    };
    let describe = || {
        let what = if args.contended {
            "all on ONE lock; an op is a hand-off, its latency the wait for the grant"
        } else {
            "each on a lock of its own; an op is Acquire + Release, timed together"
        };
        format!(
            "{} client(s) with a session each, {what}; {} connection(s), {}",
            load.clients,
            load.connections,
            timing(load)
        )
    };
    print_results(global.output, workload, describe, &results)?;
    for m in &results {
        if run.people && m.unclosed_sessions > 0 {
            eprintln!(
                "warning: {} session(s) on {} could not be closed; they expire in {}",
                m.unclosed_sessions,
                m.summary.target,
                duration(ttl)
            );
        }
    }

    for m in &results {
        ensure_progress(&m.summary, "acquire+release")?;
    }
    Ok(())
}

/// What every target's run shares.
struct Plan<'a> {
    run: &'a Run<'a>,
    contended: bool,
    /// Every session's TTL.
    ttl: Duration,
    /// `syncctl-bench/<random run id>/lock`.
    prefix: String,
}

impl Plan<'_> {
    /// The lock client `index` takes.
    fn lock_name(&self, index: usize) -> String {
        if self.contended {
            format!("{}/contended", self.prefix)
        } else {
            format!("{}/{index:05}", self.prefix)
        }
    }

    async fn measure<T: LockTarget>(&self, name: &str, target: &T) -> anyhow::Result<Measured> {
        let clients = self.run.load.clients as usize;
        let lockers = join_all(
            (0..clients).map(|index| target.locker(index, self.lock_name(index), self.ttl)),
        )
        .await;
        let workers = lockers
            .into_iter()
            .map(|locker| {
                Ok(LockWorker {
                    locker: locker?,
                    contended: self.contended,
                })
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot open a session on {name}"))?;

        let (phase, workers) = self.run.measure(name, workers).await?;
        let closed = join_all(workers.into_iter().map(|w| w.locker.close())).await;
        Ok(Measured {
            summary: Summary::new(name, &target.endpoint(), clients, &phase),
            unclosed_sessions: closed.iter().filter(|c| c.is_err()).count(),
        })
    }
}

/// A client that takes its lock and gives it back, once per operation.
struct LockWorker<L> {
    locker: L,
    /// Time the Acquire alone (the hand-off), not Acquire + Release.
    contended: bool,
}

impl<L: Locker> Worker for LockWorker<L> {
    async fn op(&mut self) -> Call<Done> {
        let start = Instant::now();
        let acquired = self.locker.acquire().await;
        let wait = start.elapsed();
        let held = match acquired.result {
            Ok(held) => held,
            Err(reason) => {
                return Call {
                    result: Err(format!("acquire: {reason}")),
                    retries: acquired.retries,
                };
            }
        };
        let released = self.locker.release(held).await;
        let latency = if self.contended {
            wait
        } else {
            start.elapsed()
        };
        Call {
            result: released
                .result
                .map(|()| Done::One(latency))
                .map_err(|reason| format!("release: {reason}")),
            retries: acquired.retries + released.retries,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use indicatif::ProgressBar;
    use tokio::sync::Semaphore;
    use tokio::time::sleep;

    use super::*;
    use crate::bench::driver;

    /// An exclusive lock in memory: a one-permit semaphore (FIFO). Answers take 1 ms to
    /// travel each way; every call is recorded.
    struct Fake {
        lock: Arc<Semaphore>,
        client: usize,
        calls: Arc<Mutex<Vec<String>>>,
    }

    const HOP: Duration = Duration::from_millis(1);

    impl Locker for Fake {
        type Held = tokio::sync::OwnedSemaphorePermit;

        async fn acquire(&mut self) -> Call<Self::Held> {
            sleep(HOP).await;
            let permit = Arc::clone(&self.lock).acquire_owned().await;
            self.calls
                .lock()
                .unwrap()
                .push(format!("acquire {}", self.client));
            sleep(HOP).await;
            Call::once(permit.map_err(|e| e.to_string()))
        }

        async fn release(&mut self, held: Self::Held) -> Call<()> {
            sleep(HOP).await;
            self.calls
                .lock()
                .unwrap()
                .push(format!("release {}", self.client));
            drop(held);
            sleep(HOP).await;
            Call::once(Ok(()))
        }

        async fn close(self) -> Result<(), String> {
            Ok(())
        }
    }

    /// `clients` clients for 100 ms (of tokio's paused clock) on one lock.
    async fn on_one_lock(clients: usize, contended: bool) -> (driver::PhaseResult, Vec<String>) {
        let lock = Arc::new(Semaphore::new(1));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..clients)
            .map(|client| LockWorker {
                locker: Fake {
                    lock: Arc::clone(&lock),
                    client,
                    calls: Arc::clone(&calls),
                },
                contended,
            })
            .collect();
        let (phase, _) = driver::run(
            workers,
            Duration::from_millis(100),
            "ops",
            &ProgressBar::hidden(),
        )
        .await
        .unwrap();
        let calls = calls.lock().unwrap().clone();
        (phase, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn uncontended_an_operation_is_acquire_and_release_timed_together() {
        let (phase, _) = on_one_lock(1, false).await;
        // 4 ms per operation: two round trips.
        assert_eq!(phase.ops, 25);
        let h = &phase.histogram;
        assert!(h.equivalent(h.min(), 4_000) && h.equivalent(h.max(), 4_000));
    }

    #[tokio::test(start_paused = true)]
    async fn contended_an_operation_is_a_hand_off_timed_by_its_wait() {
        let (phase, calls) = on_one_lock(4, true).await;
        assert_eq!(phase.errors, 0);
        // Each grant is followed by its holder's release before the next grant.
        for pair in calls.chunks(2) {
            let client = pair[0].strip_prefix("acquire ").unwrap();
            assert_eq!(pair.get(1), Some(&format!("release {client}")), "{calls:?}");
        }
        // The lock is busy 2 ms per hand-off (the grant's answer, the release's request);
        // a waiter waits for the 3 others ahead of it.
        assert!(phase.ops >= 45, "{} hand-offs", phase.ops);
        assert!(phase.histogram.value_at_quantile(0.5) >= 6_000);
    }

    #[test]
    fn uncontended_clients_each_have_their_own_lock() {
        let load = crate::args::BenchLoadArgs {
            clients: 2,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            connections: 1,
            compare_etcd: None,
            compare_redis: None,
        };
        let run = Run {
            load: &load,
            people: false,
            progress: false,
            unit: "ops",
        };
        let mut plan = Plan {
            run: &run,
            contended: false,
            ttl: Duration::from_secs(61),
            prefix: "b/lock".into(),
        };
        assert_eq!(plan.lock_name(0), "b/lock/00000");
        assert_eq!(plan.lock_name(1), "b/lock/00001");
        plan.contended = true;
        assert_eq!(plan.lock_name(0), plan.lock_name(1));
    }
}
