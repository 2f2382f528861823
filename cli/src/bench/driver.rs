//! The closed-loop load driver, the same for every target (syncd, etcd).
//!
//! N clients, each a tokio task with one put in flight: it sends a put, waits for the answer,
//! and only then sends the next one, until the phase's deadline. Every put writes a new key
//! (`PREFIX/CLIENT/SEQUENCE`) with the same value, so no two writes of a run touch the same key.
//!
//! What is timed, per put: from just before the client hands the request to the target's
//! `put` (the request is encoded, sent over the HTTP/2 connection, replicated and made durable
//! by the server, answered, decoded) to the moment the answer is back in the task, including
//! any redirect to a new leader. Building the key is outside the timed span; so is the pause
//! after an error. Each client records its latencies in its own histogram (no shared lock on
//! the hot path); they are merged when the phase ends.
//!
//! Throughput is the number of acknowledged puts divided by the phase's wall time, measured
//! from the common start signal to the moment the last client finished its last put. A put
//! begun before the deadline is allowed to finish and counts; none begins after it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::sync::watch;
use tokio::time::{Instant, sleep};

/// The largest latency recorded exactly (60 s, in microseconds); longer ones are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;
/// Pause after a failed put before the client tries its next one, so that an outage produces
/// a trickle of errors rather than a busy loop.
const ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// A system under test.
pub trait Target: Send + Sync + 'static {
    type Worker: Worker;

    /// A new client, with its own identity (for syncd: its own RequestHeader client id).
    /// `index` picks which of the shared connections it uses.
    fn worker(&self, index: usize) -> Self::Worker;

    /// The member the clients send to now (after any redirect), `host:port`.
    fn endpoint(&self) -> String;

    /// Reads a key back, linearizably, for the check after the run.
    fn read_back(&self, key: Bytes) -> impl Future<Output = Result<Option<Bytes>, String>> + Send;
}

/// One client's connection to the target.
pub trait Worker: Send + 'static {
    /// Writes `key = value` and returns once the target acknowledged it (or gave up).
    fn put(&mut self, key: Bytes, value: Bytes) -> impl Future<Output = PutOutcome> + Send;
}

/// The outcome of one logical put.
#[derive(Debug)]
pub struct PutOutcome {
    /// `Err` holds why the put failed, in words.
    pub result: Result<(), String>,
    /// Attempts after the first: redirects to a new leader, retries after UNAVAILABLE.
    pub retries: u32,
}

/// What one phase runs.
pub struct Workload {
    pub clients: usize,
    pub duration: Duration,
    /// The value of every put; shared, never copied.
    pub value: Bytes,
    /// Keys are `PREFIX/CLIENT/SEQUENCE`; the prefix names the run and the phase.
    pub key_prefix: String,
}

/// The merged result of one phase.
pub struct PhaseResult {
    /// Latency of each acknowledged put, in microseconds.
    pub histogram: Histogram<u64>,
    /// Acknowledged puts.
    pub ops: u64,
    /// Puts that failed.
    pub errors: u64,
    pub retries: u64,
    /// From the start signal until the last client finished.
    pub elapsed: Duration,
    pub first_error: Option<String>,
    /// The last key each client wrote successfully: what the read-back check reads.
    pub last_keys: Vec<Bytes>,
}

/// What one client brings back.
struct ClientResult {
    histogram: Histogram<u64>,
    ops: u64,
    errors: u64,
    retries: u64,
    first_error: Option<String>,
    last_key: Option<Bytes>,
    finished: Instant,
}

/// The key of put number `sequence` of client `client`.
pub fn key(prefix: &str, client: usize, sequence: u64) -> Bytes {
    Bytes::from(format!("{prefix}/{client:05}/{sequence:010}"))
}

/// Runs one phase: all clients start together, run until `workload.duration` has passed, and
/// their results are merged. `progress` (possibly hidden) shows the elapsed time and the rate.
pub async fn run<T: Target>(
    target: &T,
    workload: &Workload,
    progress: &ProgressBar,
) -> anyhow::Result<PhaseResult> {
    let empty = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)
        .context("cannot create a latency histogram")?;
    let acked = Arc::new(AtomicU64::new(0));
    let (start_tx, start_rx) = watch::channel(None::<Instant>);

    let mut clients = Vec::with_capacity(workload.clients);
    for index in 0..workload.clients {
        let mut worker = target.worker(index);
        let mut start_rx = start_rx.clone();
        let mut histogram = empty.clone();
        let acked = Arc::clone(&acked);
        let value = workload.value.clone();
        let prefix = workload.key_prefix.clone();
        let duration = workload.duration;
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
            let mut last_key = None;
            let mut sequence = 0u64;
            while Instant::now() < deadline {
                sequence += 1;
                let key = key(&prefix, index, sequence);
                let sent = Instant::now();
                let outcome = worker.put(key.clone(), value.clone()).await;
                let latency = sent.elapsed();
                retries += u64::from(outcome.retries);
                match outcome.result {
                    Ok(()) => {
                        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                        histogram.saturating_record(us.max(1));
                        ops += 1;
                        last_key = Some(key);
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(reason) => {
                        errors += 1;
                        first_error.get_or_insert(reason);
                        sleep(ERROR_PAUSE).await;
                    }
                }
            }
            ClientResult {
                histogram,
                ops,
                errors,
                retries,
                first_error,
                last_key,
                finished: Instant::now(),
            }
        }));
    }

    let start = Instant::now();
    start_tx.send_replace(Some(start));
    let ticker = tokio::spawn(tick_progress(
        progress.clone(),
        start,
        workload.duration,
        Arc::clone(&acked),
    ));

    let mut merged = PhaseResult {
        histogram: empty,
        ops: 0,
        errors: 0,
        retries: 0,
        elapsed: Duration::ZERO,
        first_error: None,
        last_keys: Vec::new(),
    };
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
        merged.last_keys.extend(result.last_key);
        finished = finished.max(result.finished);
    }
    ticker.abort();
    progress.finish_and_clear();
    merged.elapsed = finished - start;
    Ok(merged)
}

/// Redraws the progress bar: position in milliseconds, message with the running rate.
async fn tick_progress(
    bar: ProgressBar,
    start: Instant,
    duration: Duration,
    acked: Arc<AtomicU64>,
) {
    loop {
        let elapsed = start.elapsed();
        let ops = acked.load(Ordering::Relaxed);
        let rate = ops as f64 / elapsed.as_secs_f64().max(1e-3);
        bar.set_position(elapsed.min(duration).as_millis() as u64);
        bar.set_message(format!("{ops} puts, {rate:.0}/s"));
        sleep(PROGRESS_TICK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    /// A target that acknowledges every put after a fixed delay and fails every tenth.
    #[derive(Clone, Default)]
    struct Fake {
        seen: Arc<Mutex<Vec<Bytes>>>,
    }

    struct FakeWorker {
        seen: Arc<Mutex<Vec<Bytes>>>,
        count: u64,
    }

    impl Target for Fake {
        type Worker = FakeWorker;
        fn worker(&self, _index: usize) -> FakeWorker {
            FakeWorker {
                seen: Arc::clone(&self.seen),
                count: 0,
            }
        }
        fn endpoint(&self) -> String {
            "fake:1".into()
        }
        async fn read_back(&self, _key: Bytes) -> Result<Option<Bytes>, String> {
            Ok(None)
        }
    }

    impl Worker for FakeWorker {
        async fn put(&mut self, key: Bytes, _value: Bytes) -> PutOutcome {
            self.count += 1;
            sleep(Duration::from_millis(2)).await;
            self.seen.lock().unwrap().push(key);
            PutOutcome {
                result: if self.count.is_multiple_of(10) {
                    Err("injected".into())
                } else {
                    Ok(())
                },
                retries: 1,
            }
        }
    }

    #[tokio::test]
    async fn clients_write_unique_keys_until_the_deadline() {
        let fake = Fake::default();
        let workload = Workload {
            clients: 4,
            duration: Duration::from_millis(300),
            value: Bytes::from_static(b"v"),
            key_prefix: "p".into(),
        };
        let result = run(&fake, &workload, &ProgressBar::hidden()).await.unwrap();
        let seen = fake.seen.lock().unwrap().clone();
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "a key was written twice");
        assert_eq!(result.ops + result.errors, seen.len() as u64);
        assert!(result.errors > 0 && result.ops > result.errors);
        assert_eq!(result.retries, seen.len() as u64);
        assert_eq!(result.histogram.len(), result.ops);
        assert!(
            result.histogram.min() >= 2_000,
            "latency includes the put itself"
        );
        assert_eq!(result.first_error.as_deref(), Some("injected"));
        assert_eq!(result.last_keys.len(), 4);
        assert!(result.elapsed >= workload.duration);
        assert!(result.elapsed < workload.duration + Duration::from_millis(200));
    }

    #[test]
    fn keys_name_prefix_client_and_sequence() {
        assert_eq!(
            key("run/m", 3, 42),
            Bytes::from_static(b"run/m/00003/0000000042")
        );
    }
}
