//! The closed-loop load driver, the same for every workload (puts, locks) and every target
//! (syncd, etcd).
//!
//! N clients, each a tokio task with one operation in flight: it runs an operation, waits for
//! its end, and only then starts the next one, until the phase's deadline. An operation
//! completes one item (a put, a lock cycle) or several (the messages of a batch), each with its
//! latency: throughput and percentiles are per item (`Done`). What an operation is
//! belongs to the workload (`raw.rs`: one put of a new key; `locks.rs`: an acquire and a
//! release), and so does what is timed: an operation reports the latency of its timed part
//! (for a put, from handing the request to the target until the answer is back in the task;
//! for a contended lock, the wait for the grant). Each client records its latencies in its own
//! histogram (no shared lock on the hot path); they are merged when the phase ends.
//!
//! Throughput is the number of successful operations divided by the phase's wall time,
//! measured from the common start signal to the moment the last client finished its last
//! operation. An operation begun before the deadline is allowed to finish and counts; none
//! begins after it.
//!
//! The clients (workers) are created by the caller, before the clock starts (a lock client's
//! session is opened then), and handed back after the phase, so that the warm-up and the
//! measured phase run the same clients.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::sync::watch;
use tokio::time::{Instant, sleep};

/// The largest latency recorded exactly (60 s, in microseconds); longer ones are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;
/// Pause after a failed operation before the client tries its next one, so that an outage
/// produces a trickle of errors rather than a busy loop.
const ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// One benchmark client: its connection to the target and its own identity there.
pub trait Worker: Send + 'static {
    /// Runs one operation; on success, returns what it completed and the latency of each item's
    /// timed part.
    fn op(&mut self) -> impl Future<Output = Call<Done>> + Send;
}

/// What one successful operation completed.
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    /// One item (a put, an acquire + release), with its latency.
    One(Duration),
    /// `count` items done by one call (a batch publish), each with that call's latency.
    Batch { latency: Duration, count: u64 },
    /// Items with a latency each (the messages of a publish -> consume round, each from its
    /// publish to its delivery).
    Each(Vec<Duration>),
}

impl Done {
    /// How many items it completed.
    pub fn count(&self) -> u64 {
        match self {
            Done::One(_) => 1,
            Done::Batch { count, .. } => *count,
            Done::Each(latencies) => latencies.len() as u64,
        }
    }

    /// Records every item's latency, in microseconds (at least 1).
    fn record(&self, histogram: &mut Histogram<u64>) {
        let us = |latency: &Duration| {
            u64::try_from(latency.as_micros())
                .unwrap_or(u64::MAX)
                .max(1)
        };
        match self {
            Done::One(latency) => histogram.saturating_record(us(latency)),
            Done::Batch { latency, count } => {
                // saturating: a value past the histogram's range is clamped, never an error.
                let _ = histogram.record_n(us(latency).min(MAX_LATENCY_US), *count);
            }
            Done::Each(latencies) => {
                for latency in latencies {
                    histogram.saturating_record(us(latency));
                }
            }
        }
    }
}

/// The outcome of one logical call (or operation) to a target.
#[derive(Debug)]
pub struct Call<T> {
    /// `Err` holds why it failed, in words.
    pub result: Result<T, String>,
    /// Attempts after the first: redirects to a new leader, retries after UNAVAILABLE.
    pub retries: u32,
}

impl<T> Call<T> {
    /// A call that needed no retry.
    pub fn once(result: Result<T, String>) -> Self {
        Call { result, retries: 0 }
    }

    /// Checks or converts a successful answer; the retries stay counted.
    pub fn and_then<U>(self, f: impl FnOnce(T) -> Result<U, String>) -> Call<U> {
        Call {
            result: self.result.and_then(f),
            retries: self.retries,
        }
    }
}

/// The merged result of one phase.
pub struct PhaseResult {
    /// Latency of each successful operation, in microseconds.
    pub histogram: Histogram<u64>,
    /// Items completed by successful operations.
    pub ops: u64,
    /// Operations that failed.
    pub errors: u64,
    pub retries: u64,
    /// From the start signal until the last client finished.
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

/// What one client brings back.
struct ClientResult<W> {
    worker: W,
    histogram: Histogram<u64>,
    ops: u64,
    errors: u64,
    retries: u64,
    first_error: Option<String>,
    finished: Instant,
}

/// Runs one phase: all `workers` start together, run until `duration` has passed, and their
/// results are merged; the workers are handed back in their order. `progress` (possibly
/// hidden) shows the elapsed time and the rate of `unit`s (e.g. "puts").
pub async fn run<W: Worker>(
    workers: Vec<W>,
    duration: Duration,
    unit: &'static str,
    progress: &ProgressBar,
) -> anyhow::Result<(PhaseResult, Vec<W>)> {
    let empty = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)
        .context("cannot create a latency histogram")?;
    let done = Arc::new(AtomicU64::new(0));
    let (start_tx, start_rx) = watch::channel(None::<Instant>);

    let mut clients = Vec::with_capacity(workers.len());
    for mut worker in workers {
        let mut start_rx = start_rx.clone();
        let mut histogram = empty.clone();
        let done = Arc::clone(&done);
        clients.push(tokio::spawn(async move {
            // Every client waits for the same start instant, so that spawning 1,000 tasks
            // does not stagger the load.
            let start = match start_rx.wait_for(Option::is_some).await {
                Ok(start) => (*start).unwrap_or_else(Instant::now),
                Err(_) => Instant::now(),
            };
            let deadline = start + duration;
            let (mut ops, mut errors, mut retries) = (0u64, 0u64, 0u64);
            let mut first_error = None;
            while Instant::now() < deadline {
                let outcome = worker.op().await;
                retries += u64::from(outcome.retries);
                match outcome.result {
                    Ok(items) => {
                        items.record(&mut histogram);
                        ops += items.count();
                        done.fetch_add(items.count(), Ordering::Relaxed);
                    }
                    Err(reason) => {
                        errors += 1;
                        first_error.get_or_insert(reason);
                        sleep(ERROR_PAUSE).await;
                    }
                }
            }
            ClientResult {
                worker,
                histogram,
                ops,
                errors,
                retries,
                first_error,
                finished: Instant::now(),
            }
        }));
    }

    let start = Instant::now();
    start_tx.send_replace(Some(start));
    let ticker = tokio::spawn(tick_progress(
        progress.clone(),
        start,
        duration,
        unit,
        Arc::clone(&done),
    ));

    let mut merged = PhaseResult {
        histogram: empty,
        ops: 0,
        errors: 0,
        retries: 0,
        elapsed: Duration::ZERO,
        first_error: None,
    };
    let mut workers = Vec::with_capacity(clients.len());
    let mut finished = start;
    for client in clients {
        let result = client.await.context("a benchmark client panicked")?;
        merged
            .histogram
            .add(&result.histogram)
            .context("cannot merge latency histograms")?;
        merged.ops += result.ops;
        merged.errors += result.errors;
        merged.retries += result.retries;
        if merged.first_error.is_none() {
            merged.first_error = result.first_error;
        }
        finished = finished.max(result.finished);
        workers.push(result.worker);
    }
    ticker.abort();
    progress.finish_and_clear();
    merged.elapsed = finished - start;
    Ok((merged, workers))
}

/// Redraws the progress bar: position in milliseconds, message with the running rate.
async fn tick_progress(
    bar: ProgressBar,
    start: Instant,
    duration: Duration,
    unit: &'static str,
    done: Arc<AtomicU64>,
) {
    loop {
        let elapsed = start.elapsed();
        let ops = done.load(Ordering::Relaxed);
        let rate = ops as f64 / elapsed.as_secs_f64().max(1e-3);
        bar.set_position(elapsed.min(duration).as_millis() as u64);
        bar.set_message(format!("{ops} {unit}, {rate:.0}/s"));
        sleep(PROGRESS_TICK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker whose operations take 2 ms and fail every tenth time.
    struct Fake {
        index: usize,
        count: u64,
    }

    impl Worker for Fake {
        async fn op(&mut self) -> Call<Done> {
            self.count += 1;
            let sent = Instant::now();
            sleep(Duration::from_millis(2)).await;
            Call {
                result: if self.count.is_multiple_of(10) {
                    Err("injected".into())
                } else {
                    Ok(Done::One(sent.elapsed()))
                },
                retries: 1,
            }
        }
    }

    #[tokio::test]
    async fn clients_run_until_the_deadline_and_come_back_in_order() {
        let workers = (0..4).map(|index| Fake { index, count: 0 }).collect();
        let duration = Duration::from_millis(300);
        let (result, workers) = run(workers, duration, "ops", &ProgressBar::hidden())
            .await
            .unwrap();
        let attempts: u64 = workers.iter().map(|w| w.count).sum();
        assert_eq!(result.ops + result.errors, attempts);
        assert!(result.errors > 0 && result.ops > result.errors);
        assert_eq!(result.retries, attempts);
        assert_eq!(result.histogram.len(), result.ops);
        assert!(
            result.histogram.min() >= 2_000,
            "the latency is the operation's own"
        );
        assert_eq!(result.first_error.as_deref(), Some("injected"));
        let order: Vec<usize> = workers.iter().map(|w| w.index).collect();
        assert_eq!(order, [0, 1, 2, 3]);
        assert!(result.elapsed >= duration);
        assert!(result.elapsed < duration + Duration::from_millis(200));
    }

    #[test]
    fn items_of_a_batch_or_a_round_each_count_with_their_latency() {
        let mut h = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap();
        let ms = Duration::from_millis;
        let batch = Done::Batch {
            latency: ms(4),
            count: 32,
        };
        let round = Done::Each(vec![ms(1), ms(2), ms(3)]);
        assert_eq!(
            (Done::One(ms(1)).count(), batch.count(), round.count()),
            (1, 32, 3)
        );
        batch.record(&mut h);
        round.record(&mut h);
        Done::One(Duration::ZERO).record(&mut h);
        Done::One(Duration::from_secs(3_600)).record(&mut h);
        assert_eq!(h.len(), 37);
        assert_eq!(h.min(), 1, "a zero latency counts as 1 us");
        assert!(h.equivalent(h.value_at_quantile(0.5), 4_000));
        assert!(
            h.equivalent(h.max(), MAX_LATENCY_US),
            "clamped, not dropped"
        );
    }
}
