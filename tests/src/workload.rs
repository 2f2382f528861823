//! Client workloads and the checks that every acknowledged write survived, exactly once.
//!
//! # Writers
//!
//! A writer is one client in the sense of `common.proto`: a random `client_id` and a sequence
//! number per request. It issues one Put at a time and retries a failed Put *unchanged* (same
//! header, key and value) on the next node, or on the node a `x-sync-leader-id` trailer names,
//! until it is acknowledged. Its [`History`] records every operation: the acknowledged ones with
//! the index and `replaced` flag of the answer, and the ones whose outcome is unknown (the
//! writer was stopped while retrying them).
//!
//! Every write has a unique value. Most writes go to a key of their own (`<name>/<client>/<seq>`
//! ← `<client>:<seq>`); with [`WriterConfig::counter_every`], every k-th write instead sets the
//! writer's counter key to its sequence number, so the counter only ever increases.
//!
//! # What a [`Ledger`] checks
//!
//! - Durability: every acknowledged write is readable with its value.
//! - No phantom writes: a write with an unknown outcome is either absent or has its value.
//! - Exactly once. A retry that the server applies a second time instead of answering from its
//!   client table shows up in one of two ways. If the client got the second application's
//!   answer, that answer says `replaced = true` for a key that nothing else writes. If the
//!   second application happened after the acknowledgement (a late duplicate), the key's
//!   `modified_index` is past the acknowledged index, and for the counter the value goes back
//!   to an older one.
//! - Real-time order: one client's acknowledged writes have increasing indexes, since each was
//!   sent after the previous one was acknowledged.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::Bytes;
use futures::StreamExt;
use sync_proto::sync::v1::{
    Consistency, KvGetResponse, KvPutRequest, KvPutResponse, RequestHeader,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::harness::Clients;
use crate::harness::{Cluster, NodeClient};

/// One node's view of a ledger's keys: key → `(value, modified_index)`, or `None` if absent.
pub type View = BTreeMap<Bytes, Option<(Bytes, u64)>>;

/// Pause between two attempts of one request.
const RETRY_BACKOFF: Duration = Duration::from_millis(50);
/// How many reads verification keeps in flight.
const READ_CONCURRENCY: usize = 16;
/// How long verification retries one read that fails (e.g. during an election).
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// After this many writes, a writer that moved away from its home node tries it again.
const HOME_AGAIN_EVERY: u64 = 20;

/// Whether an error may go away on a retry (the request may or may not have been applied).
/// INVALID_ARGUMENT, ABORTED (our sequence fell below the server's window: a client bug),
/// UNIMPLEMENTED and the like will not.
pub fn is_retryable(status: &Status) -> bool {
    !matches!(
        status.code(),
        Code::InvalidArgument
            | Code::Aborted
            | Code::AlreadyExists
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::OutOfRange
    )
}

/// The `x-sync-leader-id` trailer of an error, if any.
pub fn leader_hint(status: &Status) -> Option<u64> {
    status
        .metadata()
        .get("x-sync-leader-id")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `CODE: message` of a status, for error messages.
pub fn show(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// A client identity and its request counter (`RequestHeader`).
#[derive(Debug)]
pub struct Session {
    /// 64 random bits, never 0.
    client_id: u64,
    /// The sequence number of the next new request.
    next: u64,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    /// A new client with a random id.
    pub fn new() -> Session {
        Session {
            client_id: rand::random::<u64>().max(1),
            next: 1,
        }
    }

    /// Its client id.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// The header of the next new request. This client sends one request at a time, so every
    /// earlier request was answered (or given up) and `lowest_unacked` is the new sequence.
    pub fn next_header(&mut self) -> RequestHeader {
        let sequence = self.next;
        self.next += 1;
        RequestHeader {
            client_id: self.client_id,
            sequence,
            lowest_unacked: sequence,
        }
    }
}

/// The outcome of [`put_until`].
#[derive(Debug)]
pub struct Attempted {
    /// The answer, or the last error.
    pub result: Result<KvPutResponse, Status>,
    /// The node that gave it.
    pub node: u64,
    /// How many times the request was sent.
    pub attempts: u32,
}

/// Sends `request` until it is acknowledged, a non-retryable error comes, `deadline` passes or
/// `give_up()` says so, each attempt with `attempt_timeout`. The first attempt goes to
/// `route[first]`; each retry goes to the node named by the error's `x-sync-leader-id` trailer,
/// or else to the next node of `route`.
pub async fn put_until(
    clients: &Clients,
    route: &[u64],
    first: usize,
    request: &KvPutRequest,
    attempt_timeout: Duration,
    deadline: Instant,
    give_up: &(dyn Fn() -> bool + Sync),
) -> Attempted {
    assert!(
        !route.is_empty(),
        "a write needs at least one node to go to"
    );
    let mut at = first % route.len();
    let mut attempts = 0;
    loop {
        let node = route[at];
        attempts += 1;
        let result = match clients.get(node) {
            Some(client) => {
                client
                    .with_timeout(attempt_timeout)
                    .put_request(request.clone())
                    .await
            }
            None => Err(Status::not_found(format!("no node {node} in the cluster"))),
        };
        let error = match result {
            Ok(answer) => {
                return Attempted {
                    result: Ok(answer),
                    node,
                    attempts,
                };
            }
            Err(e) => e,
        };
        if !is_retryable(&error) || Instant::now() >= deadline || give_up() {
            return Attempted {
                result: Err(error),
                node,
                attempts,
            };
        }
        at = match leader_hint(&error).and_then(|h| route.iter().position(|&n| n == h)) {
            Some(hinted) if hinted != at => hinted,
            _ => (at + 1) % route.len(),
        };
        tokio::time::sleep(RETRY_BACKOFF).await;
    }
}

/// What a writer does.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Key prefix; unique per writer within a test.
    pub name: String,
    /// The nodes it sends to: `route[0]` is its home, the others take retries.
    pub route: Vec<u64>,
    /// Every k-th write sets the counter key instead of a key of its own.
    pub counter_every: Option<u64>,
    /// The gRPC deadline of each attempt.
    pub attempt_timeout: Duration,
    /// A write not acknowledged within this long (while the writer is not being stopped) fails
    /// the writer: the cluster made no progress.
    pub op_deadline: Duration,
    /// Pause between writes.
    pub pause: Duration,
    /// At most this many writes.
    pub max_ops: u64,
}

impl WriterConfig {
    /// A writer named `name` sending to `route`, with defaults for the rest.
    pub fn new(name: impl Into<String>, route: Vec<u64>) -> WriterConfig {
        WriterConfig {
            name: name.into(),
            route,
            counter_every: None,
            attempt_timeout: Duration::from_secs(1),
            op_deadline: Duration::from_secs(20),
            pause: Duration::ZERO,
            max_ops: 100_000,
        }
    }
}

/// The outcome of one write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not acknowledged: it may or may not have been applied.
    Unknown,
    /// Acknowledged.
    Acked {
        /// `KvPutResponse.index`.
        index: u64,
        /// `KvPutResponse.replaced`.
        replaced: bool,
        /// The node that acknowledged it.
        node: u64,
    },
}

/// One write.
#[derive(Clone, Debug)]
pub struct Op {
    /// Its RequestHeader sequence.
    pub sequence: u64,
    /// The key.
    pub key: Bytes,
    /// The value (unique).
    pub value: Bytes,
    /// Whether it set the writer's counter key.
    pub counter: bool,
    /// How many times it was sent.
    pub attempts: u32,
    /// What came of it.
    pub outcome: Outcome,
}

/// Everything one writer did, in order.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// The writer's name.
    pub name: String,
    /// Its client id.
    pub client_id: u64,
    /// Its writes, in the order sent.
    pub ops: Vec<Op>,
    /// Why it stopped early, if it did: a non-retryable error, or no progress.
    pub fatal: Option<String>,
}

impl History {
    /// The counter key of this writer.
    pub fn counter_key(&self) -> Bytes {
        Bytes::from(format!("{}/{:016x}/counter", self.name, self.client_id))
    }
}

/// Runs one writer until `max_ops`, `stop`, or a fatal error, recording into `history` as it
/// goes (so a writer cut short loses nothing it learned).
async fn run_writer(
    clients: Clients,
    config: WriterConfig,
    history: Arc<Mutex<History>>,
    stop: Arc<StopSignal>,
) {
    let mut session = Session::new();
    {
        let mut h = lock(&history);
        h.name = config.name.clone();
        h.client_id = session.client_id();
    }
    let cid = session.client_id();
    let mut at = 0usize;
    for n in 0..config.max_ops {
        if stop.requested() {
            return;
        }
        if n % HOME_AGAIN_EVERY == 0 {
            at = 0;
        }
        let header = session.next_header();
        let sequence = header.sequence;
        let counter = config
            .counter_every
            .is_some_and(|k| sequence.checked_rem(k) == Some(0));
        let (key, value) = if counter {
            (
                format!("{}/{cid:016x}/counter", config.name),
                sequence.to_string(),
            )
        } else {
            (
                format!("{}/{cid:016x}/{sequence}", config.name),
                format!("{cid:016x}:{sequence}"),
            )
        };
        let request = KvPutRequest {
            header: Some(header),
            key: Bytes::from(key),
            value: Bytes::from(value),
        };
        let slot = {
            let mut h = lock(&history);
            h.ops.push(Op {
                sequence,
                key: request.key.clone(),
                value: request.value.clone(),
                counter,
                attempts: 0,
                outcome: Outcome::Unknown,
            });
            h.ops.len() - 1
        };
        let deadline = Instant::now() + config.op_deadline;
        let give_up = || stop.expired();
        let attempted = put_until(
            &clients,
            &config.route,
            at,
            &request,
            config.attempt_timeout,
            deadline,
            &give_up,
        )
        .await;
        {
            let mut h = lock(&history);
            h.ops[slot].attempts = attempted.attempts;
            match attempted.result {
                Ok(answer) => {
                    h.ops[slot].outcome = Outcome::Acked {
                        index: answer.index,
                        replaced: answer.replaced,
                        node: attempted.node,
                    };
                    at = config
                        .route
                        .iter()
                        .position(|&id| id == attempted.node)
                        .unwrap_or(0);
                }
                Err(e) if !is_retryable(&e) => {
                    h.fatal = Some(format!(
                        "write seq {sequence} got a non-retryable error from node {}: {}",
                        attempted.node,
                        show(&e)
                    ));
                    return;
                }
                Err(_) if stop.requested() => return,
                Err(e) => {
                    h.fatal = Some(format!(
                        "write seq {sequence} was not acknowledged within {:?} after {} attempts \
                     (last: node {}: {})",
                        config.op_deadline,
                        attempted.attempts,
                        attempted.node,
                        show(&e)
                    ));
                    return;
                }
            }
        }
        if !config.pause.is_zero() {
            tokio::time::sleep(config.pause).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tells writers to stop: no new writes once requested; a write in flight keeps retrying until
/// the grace period ends.
#[derive(Default)]
struct StopSignal {
    /// Milliseconds since `origin` at which in-flight writes give up; 0 while not requested.
    give_up_at_ms: AtomicU64,
    /// The zero of `give_up_at_ms`.
    origin: std::sync::OnceLock<Instant>,
}

impl StopSignal {
    fn origin(&self) -> Instant {
        *self.origin.get_or_init(Instant::now)
    }

    fn request(&self, grace: Duration) {
        let at = self.origin().elapsed() + grace;
        self.give_up_at_ms
            .store((at.as_millis() as u64).max(1), Ordering::SeqCst);
    }

    fn requested(&self) -> bool {
        self.give_up_at_ms.load(Ordering::SeqCst) != 0
    }

    fn expired(&self) -> bool {
        let at = self.give_up_at_ms.load(Ordering::SeqCst);
        at != 0 && self.origin().elapsed() >= Duration::from_millis(at)
    }
}

/// A writer running in the background until stopped.
pub struct BackgroundWriter {
    /// What it did so far.
    history: Arc<Mutex<History>>,
    /// Its stop signal.
    stop: Arc<StopSignal>,
    /// The task.
    task: JoinHandle<()>,
}

impl BackgroundWriter {
    /// Starts a writer on the test's runtime.
    pub fn spawn(clients: &Clients, config: WriterConfig) -> BackgroundWriter {
        let history = Arc::new(Mutex::new(History::default()));
        let stop = Arc::new(StopSignal::default());
        stop.origin();
        let task = tokio::spawn(run_writer(
            clients.clone(),
            config,
            history.clone(),
            stop.clone(),
        ));
        BackgroundWriter {
            history,
            stop,
            task,
        }
    }

    /// How many writes were acknowledged so far.
    pub fn acked(&self) -> usize {
        lock(&self.history)
            .ops
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::Acked { .. }))
            .count()
    }

    /// Waits until at least `n` writes were acknowledged.
    pub async fn wait_for_acks(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        crate::wait::eventually(&format!("{n} acknowledged writes"), timeout, async || {
            if let Some(fatal) = &lock(&self.history).fatal {
                bail!("the writer failed: {fatal}");
            }
            let acked = self.acked();
            anyhow::ensure!(acked >= n, "{acked} so far");
            Ok(())
        })
        .await
    }

    /// Stops it: no new writes; the one in flight may retry for `grace`. Returns its history.
    pub async fn stop(self, grace: Duration) -> History {
        self.stop.request(grace);
        let mut task = self.task;
        if tokio::time::timeout(grace + Duration::from_secs(3), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        lock(&self.history).clone()
    }
}

/// Everything some writers did; the checks run over all of it.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// One history per writer.
    pub histories: Vec<History>,
}

impl From<History> for Ledger {
    fn from(h: History) -> Ledger {
        Ledger { histories: vec![h] }
    }
}

impl Ledger {
    /// Adds another ledger's histories.
    pub fn extend(&mut self, other: impl Into<Ledger>) {
        self.histories.extend(other.into().histories);
    }

    fn ops(&self) -> impl Iterator<Item = (&History, &Op)> {
        self.histories
            .iter()
            .flat_map(|h| h.ops.iter().map(move |o| (h, o)))
    }

    /// How many writes were acknowledged.
    pub fn acked(&self) -> usize {
        self.ops()
            .filter(|(_, o)| matches!(o.outcome, Outcome::Acked { .. }))
            .count()
    }

    /// How many writes have an unknown outcome.
    pub fn unknown(&self) -> usize {
        self.ops()
            .filter(|(_, o)| o.outcome == Outcome::Unknown)
            .count()
    }

    /// How many writes needed more than one attempt.
    pub fn retried(&self) -> usize {
        self.ops().filter(|(_, o)| o.attempts > 1).count()
    }

    /// `N acked, N unknown, N retried, by W writers`.
    pub fn summary(&self) -> String {
        format!(
            "{} acked, {} unknown, {} retried, by {} writers",
            self.acked(),
            self.unknown(),
            self.retried(),
            self.histories.len()
        )
    }

    /// Fails unless no writer failed.
    pub fn expect_no_fatal(&self) -> anyhow::Result<()> {
        for h in &self.histories {
            if let Some(f) = &h.fatal {
                bail!("writer {} ({:016x}) failed: {f}", h.name, h.client_id);
            }
        }
        Ok(())
    }

    /// Fails unless every write was acknowledged (for a healthy cluster).
    pub fn expect_all_acked(&self) -> anyhow::Result<()> {
        self.expect_no_fatal()?;
        anyhow::ensure!(
            self.unknown() == 0,
            "not every write was acknowledged: {}",
            self.summary()
        );
        Ok(())
    }

    /// The checks that need no reads: per writer, acknowledged indexes increase; a write to a
    /// key of its own was not answered `replaced`; a counter write after an acknowledged one was
    /// answered `replaced`.
    pub fn check_acks(&self) -> anyhow::Result<()> {
        self.expect_no_fatal()?;
        let mut problems = Problems::default();
        for h in &self.histories {
            let mut last: Option<(u64, u64)> = None;
            let mut counter_acked = false;
            for op in &h.ops {
                let Outcome::Acked {
                    index, replaced, ..
                } = op.outcome
                else {
                    continue;
                };
                if let Some((seq, prev)) = last
                    && index <= prev
                {
                    problems.add(format!(
                        "{}: seq {} acked at index {index}, not after seq {seq} at {prev}",
                        h.name, op.sequence
                    ));
                }
                last = Some((op.sequence, index));
                if !op.counter && replaced {
                    problems.add(format!(
                        "{}: seq {} wrote a fresh key {:?} but was answered replaced=true: it \
                         was applied twice",
                        h.name, op.sequence, op.key
                    ));
                }
                if op.counter && counter_acked && !replaced {
                    problems.add(format!(
                        "{}: counter seq {} answered replaced=false after an acknowledged \
                         counter write",
                        h.name, op.sequence
                    ));
                }
                counter_acked |= op.counter;
            }
        }
        problems.result("the acknowledgements are inconsistent")
    }

    /// Every key the ledger wrote.
    fn keys(&self) -> Vec<Bytes> {
        let mut keys: Vec<Bytes> = self.ops().map(|(_, o)| o.key.clone()).collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Reads every key the ledger wrote from one node: key → `(value, modified_index)` or
    /// `None` when absent. Failed reads are retried for a few seconds.
    pub async fn read_all(
        &self,
        client: &NodeClient,
        consistency: Consistency,
    ) -> anyhow::Result<View> {
        let reads = futures::stream::iter(self.keys())
            .map(|key| async move {
                let answer = get_until(client, key.clone(), consistency, READ_DEADLINE).await;
                (key, answer)
            })
            .buffer_unordered(READ_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut out = BTreeMap::new();
        for (key, answer) in reads {
            let answer = answer.map_err(|e| {
                anyhow!(
                    "{consistency:?} read of {key:?} on node {} failed: {}",
                    client.id(),
                    show(&e)
                )
            })?;
            out.insert(
                key,
                answer
                    .found
                    .then_some((answer.value, answer.modified_index)),
            );
        }
        Ok(out)
    }

    /// Reads every key from `client` with `consistency` and checks what it sees against the
    /// ledger (see the module documentation).
    pub async fn verify(
        &self,
        client: &NodeClient,
        consistency: Consistency,
    ) -> anyhow::Result<()> {
        self.check_acks()?;
        let seen = self.read_all(client, consistency).await?;
        self.check_reads(&seen)
            .map_err(|e| e.context(format!("{consistency:?} reads on node {}", client.id())))
    }

    /// Checks one node's view of every key against the ledger.
    pub fn check_reads(&self, seen: &View) -> anyhow::Result<()> {
        let mut problems = Problems::default();
        for h in &self.histories {
            let mut counter_ops = Vec::new();
            for op in &h.ops {
                if op.counter {
                    counter_ops.push(op);
                    continue;
                }
                let got = seen.get(&op.key).cloned().flatten();
                match (&op.outcome, got) {
                    (Outcome::Acked { index, .. }, Some((value, modified))) => {
                        if value != op.value {
                            problems.add(format!(
                                "{:?}: acknowledged {:?} but reads {value:?}",
                                op.key, op.value
                            ));
                        } else if modified > *index {
                            problems.add(format!(
                                "{:?}: acknowledged at index {index} but last modified at \
                                 {modified}: the write was applied again later",
                                op.key
                            ));
                        }
                    }
                    (Outcome::Acked { index, node, .. }, None) => problems.add(format!(
                        "{:?}: acknowledged by node {node} at index {index} but absent: a \
                         lost write",
                        op.key
                    )),
                    (Outcome::Unknown, Some((value, _))) if value != op.value => {
                        problems.add(format!(
                            "{:?}: reads {value:?}, which nobody wrote (tried {:?})",
                            op.key, op.value
                        ));
                    }
                    (Outcome::Unknown, _) => {}
                }
            }
            if let Err(e) = check_counter(h, &counter_ops, seen.get(&h.counter_key())) {
                problems.add(format!("{e}"));
            }
        }
        problems.result("reads disagree with the acknowledged writes")
    }
}

/// The counter key of a writer holds the value of its last acknowledged counter write (at that
/// write's index or earlier), or of a later write with an unknown outcome; never an older value.
fn check_counter(
    h: &History,
    ops: &[&Op],
    seen: Option<&Option<(Bytes, u64)>>,
) -> anyhow::Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    let last_acked = ops
        .iter()
        .rposition(|o| matches!(o.outcome, Outcome::Acked { .. }));
    let allowed: Vec<&Op> = match last_acked {
        Some(i) => ops[i..].to_vec(),
        None => ops.to_vec(),
    };
    let key = h.counter_key();
    match (seen.cloned().flatten(), last_acked) {
        (None, None) => Ok(()),
        (None, Some(i)) => bail!(
            "{key:?}: counter write seq {} was acknowledged but the key is absent",
            ops[i].sequence
        ),
        (Some((value, modified)), _) => {
            let Some(op) = allowed.iter().find(|o| o.value == value) else {
                let acked = last_acked.map(|i| &ops[i].value);
                bail!(
                    "{key:?}: reads {value:?}, but the last acknowledged counter value is \
                     {acked:?}: an older write was applied again (or a write was lost)"
                );
            };
            if let Outcome::Acked { index, .. } = op.outcome
                && modified > index
            {
                bail!(
                    "{key:?}: value {value:?} acknowledged at index {index} but last modified \
                     at {modified}: the write was applied again later"
                );
            }
            Ok(())
        }
    }
}

/// Collects problems and reports the first few with a total.
#[derive(Default)]
struct Problems {
    list: Vec<String>,
}

impl Problems {
    fn add(&mut self, p: String) {
        self.list.push(p);
    }

    fn result(self, headline: &str) -> anyhow::Result<()> {
        if self.list.is_empty() {
            return Ok(());
        }
        let mut message = format!("{headline}: {} problem(s)", self.list.len());
        for p in self.list.iter().take(20) {
            let _ = write!(message, "\n  - {p}");
        }
        bail!(message)
    }
}

/// A Get retried on retryable errors until `timeout`.
pub async fn get_until(
    client: &NodeClient,
    key: Bytes,
    consistency: Consistency,
    timeout: Duration,
) -> Result<KvGetResponse, Status> {
    let deadline = Instant::now() + timeout;
    loop {
        match client.get(key.clone(), consistency).await {
            Ok(answer) => return Ok(answer),
            Err(e) if !is_retryable(&e) || Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(RETRY_BACKOFF).await,
        }
    }
}

/// Writes `n` keys named `<name>/...` through `route` with `concurrency` writers (each its own
/// client, one write at a time, retrying failed writes unchanged). Returns what was
/// acknowledged; on a healthy cluster, [`Ledger::expect_all_acked`] should hold.
pub async fn write_keys(
    clients: &Clients,
    route: &[u64],
    name: &str,
    n: u64,
    concurrency: u64,
) -> Ledger {
    let concurrency = concurrency.clamp(1, n.max(1));
    let lanes = (0..concurrency).map(|lane| {
        let share = n / concurrency + u64::from(lane < n % concurrency);
        // Spread the lanes' home nodes over the route.
        let mut lane_route = route.to_vec();
        lane_route.rotate_left(lane as usize % route.len().max(1));
        let config = WriterConfig {
            max_ops: share,
            ..WriterConfig::new(format!("{name}/{lane}"), lane_route)
        };
        let history = Arc::new(Mutex::new(History::default()));
        let stop = Arc::new(StopSignal::default());
        stop.origin();
        async move {
            run_writer(clients.clone(), config, history.clone(), stop).await;
            lock(&history).clone()
        }
    });
    Ledger {
        histories: futures::future::join_all(lanes).await,
    }
}

/// The end-of-test check: waits until the running nodes converge; then every running node's
/// STALE view of the ledger's keys passes the ledger's checks and is the same on every node,
/// and a LINEARIZABLE read through the leader passes them too.
pub async fn verify_converged(
    cluster: &Cluster,
    ledger: &Ledger,
    timeout: Duration,
) -> anyhow::Result<()> {
    ledger.check_acks()?;
    cluster.wait_for_convergence(timeout).await?;
    let leader = cluster.wait_for_leader(timeout).await?;
    ledger
        .verify(&cluster.client(leader.id), Consistency::Linearizable)
        .await?;
    let mut first: Option<(u64, View)> = None;
    for id in cluster.running() {
        let seen = ledger
            .read_all(&cluster.client(id), Consistency::Stale)
            .await?;
        ledger
            .check_reads(&seen)
            .map_err(|e| e.context(format!("STALE reads on node {id}")))?;
        match &first {
            None => first = Some((id, seen)),
            Some((other, theirs)) => {
                if let Some((key, mine)) = seen.iter().find(|(k, v)| theirs.get(*k) != Some(*v)) {
                    bail!(
                        "nodes {other} and {id} disagree on {key:?}: {:?} vs {mine:?}",
                        theirs.get(key)
                    );
                }
            }
        }
    }
    cluster.note(format!(
        "verified {} on {:?}",
        ledger.summary(),
        cluster.running()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(sequence: u64, key: &str, value: &str, counter: bool, outcome: Outcome) -> Op {
        Op {
            sequence,
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
            counter,
            attempts: 1,
            outcome,
        }
    }

    fn acked(index: u64, replaced: bool) -> Outcome {
        Outcome::Acked {
            index,
            replaced,
            node: 1,
        }
    }

    fn history(ops: Vec<Op>) -> History {
        History {
            name: "w".into(),
            client_id: 1,
            ops,
            fatal: None,
        }
    }

    fn seen(entries: &[(&str, &str, u64)]) -> View {
        entries
            .iter()
            .map(|(k, v, i)| {
                (
                    Bytes::from(k.to_string()),
                    Some((Bytes::from(v.to_string()), *i)),
                )
            })
            .collect()
    }

    const COUNTER: &str = "w/0000000000000001/counter";

    #[test]
    fn sessions_number_requests_from_one() {
        let mut s = Session::new();
        assert_ne!(s.client_id(), 0);
        let a = s.next_header();
        let b = s.next_header();
        assert_eq!((a.sequence, a.lowest_unacked), (1, 1));
        assert_eq!((b.sequence, b.lowest_unacked), (2, 2));
    }

    #[test]
    fn a_clean_history_passes() {
        let l = Ledger::from(history(vec![
            op(1, "a", "1", false, acked(5, false)),
            op(2, COUNTER, "2", true, acked(6, false)),
            op(3, COUNTER, "3", true, acked(7, true)),
            op(4, "b", "4", false, Outcome::Unknown),
        ]));
        l.check_acks().unwrap();
        l.check_reads(&seen(&[("a", "1", 5), (COUNTER, "3", 7)]))
            .unwrap();
        // The unknown write may also have been applied, and the counter may hold a later
        // unknown value.
        l.check_reads(&seen(&[("a", "1", 5), ("b", "4", 8), (COUNTER, "3", 7)]))
            .unwrap();
    }

    #[test]
    fn a_lost_or_changed_write_is_caught() {
        let l = Ledger::from(history(vec![op(1, "a", "1", false, acked(5, false))]));
        assert!(l.check_reads(&seen(&[])).is_err());
        assert!(l.check_reads(&seen(&[("a", "x", 5)])).is_err());
    }

    #[test]
    fn a_double_apply_is_caught_three_ways() {
        // The answer of the second application reached the client.
        let replaced = Ledger::from(history(vec![op(1, "a", "1", false, acked(9, true))]));
        assert!(replaced.check_acks().is_err());
        // A late duplicate re-wrote the key after the acknowledgement.
        let late = Ledger::from(history(vec![op(1, "a", "1", false, acked(5, false))]));
        assert!(late.check_reads(&seen(&[("a", "1", 12)])).is_err());
        // A late duplicate of an older counter write set the counter back.
        let counter = Ledger::from(history(vec![
            op(1, COUNTER, "1", true, acked(5, false)),
            op(2, COUNTER, "2", true, acked(6, true)),
        ]));
        assert!(counter.check_reads(&seen(&[(COUNTER, "1", 9)])).is_err());
        assert!(counter.check_reads(&seen(&[(COUNTER, "2", 9)])).is_err());
        counter.check_reads(&seen(&[(COUNTER, "2", 6)])).unwrap();
    }

    #[test]
    fn acknowledgements_out_of_order_are_caught() {
        let l = Ledger::from(history(vec![
            op(1, "a", "1", false, acked(7, false)),
            op(2, "b", "2", false, acked(6, false)),
        ]));
        assert!(l.check_acks().is_err());
    }

    #[test]
    fn a_phantom_value_is_caught() {
        let l = Ledger::from(history(vec![op(1, "a", "1", false, Outcome::Unknown)]));
        l.check_reads(&seen(&[])).unwrap();
        assert!(l.check_reads(&seen(&[("a", "zzz", 3)])).is_err());
    }

    #[test]
    fn errors_that_a_retry_cannot_fix_are_not_retried() {
        assert!(is_retryable(&Status::unavailable("election")));
        assert!(is_retryable(&Status::deadline_exceeded("slow")));
        assert!(!is_retryable(&Status::invalid_argument("empty key")));
        assert!(!is_retryable(&Status::unimplemented("no Kv yet")));
        let mut hinted = Status::unavailable("not leader");
        hinted
            .metadata_mut()
            .insert("x-sync-leader-id", "3".parse().unwrap());
        assert_eq!(leader_hint(&hinted), Some(3));
    }
}
