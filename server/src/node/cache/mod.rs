//! # The cache runtime: the async shell around the cache protocol's pure core
//!
//! Every node runs one task ([`spawn`]) that owns the node's [`CacheNode`] and, while the node
//! leads, the [`Directory`] (one for all keys, its epoch the leader's term; see
//! `docs/cache.md`). The task
//! - ticks both every [`TICK`];
//! - sends the node's messages for the directory to the current leader (its own directory is
//!   called directly), and the directory's messages to each node ([`transport`]);
//! - calls `CacheNode::on_new_epoch` as soon as Raft reports a leader of a newer term;
//! - creates the directory with the term when its node becomes leader and drops it the moment
//!   the node is not leader of that term any more (and never starts a second one for a term);
//! - runs the directory's memory requests against its [`MemoryBackend`]: the replicated state
//!   ([`raft_memory`]: a write is a Raft proposal, a read a linearizable (ReadIndex) read), or
//!   Redis ([`redis_memory`]: one Lua script per request). Each request, like each leadership
//!   check, is a future this task polls itself ([`Pending`]), not a task of its own;
//! - answers client operations ([`CacheHandle`]) and publishes invalidations for Subscribe;
//! - in write-back mode (`--cache-write-mode write-back`, `CacheConfig::write_back`), carries the
//!   core's `WriteBack`s and `DirtyAck`s like any message, and keeps the write-back metrics:
//!   it times each `WriteBack` from leaving to its `WriteBackDone` (outcome and flush latency),
//!   counts the directory's `GaveUp`s, and turns the core's counters and dirty-line count into
//!   metrics every tick. The core decides everything; the runtime only measures;
//! - publishes the node's lines and lease in its read view ([`Hits`]) after every call into the
//!   core and before carrying out that call's effects, so that a hit is served on the caller's
//!   own task with no hop into this one (`cache::view` says why that is as safe as asking).
//!
//! ## The two runtime requirements of `docs/cache.md`
//! **The old directory stops before the new one starts.** `docs/cache.md` asks for the
//! directory to run only while its node leads with a valid leader lease. The engine runs
//! ReadIndex in its `Safe` mode (no leader lease), so the runtime takes the variant the document
//! names instead: leadership is confirmed by a ReadIndex round before lease grants go out. Lease
//! grants are held back in a batch; a linearizable read is started after the last of them was
//! made, and the batch is sent only if it succeeds in the same epoch. A successful ReadIndex
//! started at time `c` means a quorum acknowledged this term after `c`, so no newer leader was
//! elected before `c`, and the renewals in the batch were all sent before `c`. A node's lease
//! runs `L` from its renewal's sending, so it ends before `new leader's election + L`, which the
//! new directory waits out (`L + margin` from its creation) before its first write. Other
//! directory messages need no confirmation: a line is only served under a lease, and a deposed
//! directory can neither write memory (Raft fences it) nor read it (ReadIndex fails).
//!
//! **A memory error means "not applied, and never will be".** A write's proposal is waited for
//! until the driver reports its real outcome: applied (the entry committed in this term), or
//! refused before it was appended (not leader, engine refusal), which is answered as
//! UNAVAILABLE. Every other failure (leadership lost while the entry was in flight, a snapshot
//! that may or may not contain it, shutdown) is ambiguous: it is not answered at all, and the
//! directory is dropped, because each of them means its epoch is over. The writer then times
//! out (DEADLINE_EXCEEDED: may or may not have happened), which is what the contract allows.
//! The write also names its epoch, and the state machine refuses it unless the entry is of that
//! term, so a directory left over from an older term of a node that leads again cannot write.

pub mod raft_memory;
pub mod redis_memory;
pub mod transport;
pub mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::cache::directory::{Holder, HomeEffect};
use crate::cache::memory::{MemOpId, MemoryError, MemoryOp, MemoryReply, MemoryRequest};
use crate::cache::message::{Envelope, ReqId, ToHome, ToNode, Write, WriteBackResult, WriteResult};
use crate::cache::node::{
    Answer, InvalidationEvent, LineView, Lookup, NodeEffect, NodeStats, Read,
};
use crate::cache::view::ReadView;
use crate::cache::{CacheConfig, CacheError, CacheNode, Directory, Epoch, NodeId, OpId};
use crate::metrics::record::{self, WriteBackOutcome};
use crate::node::NodeHandle;
use crate::node::driver::NodeStatus;
use crate::raft::Role;
use redis_memory::RedisMemory;
use wire::Decoded;

/// How often the node and the directory are ticked: the most a lease lapse, a TTL or a demand's
/// deadline is acted on late.
pub const TICK: Duration = Duration::from_millis(5);

/// Messages for the directory held while no leader is known (older ones are dropped): a Get
/// issued just before a node learns the new leader would otherwise lose its fill and wait for the
/// core's operation timeout.
const MAX_UNSENT: usize = 4096;

/// How many invalidation events a slow Subscribe stream may fall behind before it is ended.
pub const EVENT_BUFFER: usize = 1024;

/// One key as this node and (on the leader) the directory see it, for the State call.
#[derive(Clone, Debug)]
pub struct KeyState {
    /// This node's line.
    pub line: LineView,
    /// The directory's records of the key, if this node runs the directory.
    pub holders: Option<Vec<(NodeId, Holder)>>,
}

/// Counters for the Stats call.
#[derive(Clone, Copy, Debug)]
pub struct CacheStats {
    /// The node's counters.
    pub node: NodeStats,
    /// Bytes held in lines.
    pub bytes: u64,
    /// Lines held.
    pub entries: usize,
    /// Lines holding writes memory does not have yet (write-back mode).
    pub dirty_lines: usize,
    /// Invalidations sent by every directory this node has run.
    pub invalidations_sent: u64,
}

/// Where the directory's memory requests go (`--cache-backend`).
#[derive(Clone, Debug)]
pub enum MemoryBackend {
    /// The replicated state machine ([`raft_memory`]).
    Raft,
    /// Redis ([`redis_memory`]).
    Redis(Arc<RedisMemory>),
}

impl MemoryBackend {
    /// The backend's name in metrics: `raft` or `redis`.
    pub fn name(&self) -> &'static str {
        match self {
            MemoryBackend::Raft => "raft",
            MemoryBackend::Redis(_) => "redis",
        }
    }
}

/// The node's published read view, shared by the runtime (the only writer) and every caller
/// of [`CacheHandle::hit`]: a hit takes a read lock and a lookup, on the caller's task.
#[derive(Debug)]
pub struct Hits {
    /// The lines and lease, as of the runtime's last publication.
    view: RwLock<ReadView>,
    /// The origin of the core's clock: the view checks leases and TTLs on that same clock.
    started: Instant,
    /// Hits served from the view (the core counts only those it serves itself).
    served: AtomicU64,
    /// Keys of lines first used since the runtime last reported uses to the core's LRU order.
    used: Mutex<Vec<String>>,
}

impl Hits {
    fn new() -> Self {
        Hits {
            view: RwLock::new(ReadView::default()),
            started: Instant::now(),
            served: AtomicU64::new(0),
            used: Mutex::new(Vec::new()),
        }
    }

    /// The core's clock: milliseconds since the runtime started (monotonic).
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A hit for `key`, if this node may serve one now.
    fn get(&self, key: &str) -> Option<Read> {
        let (read, first) = self
            .view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .hit(self.now(), key)?;
        self.served.fetch_add(1, Ordering::Relaxed);
        if first {
            self.used
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(key.to_string());
        }
        Some(read)
    }
}

/// What the API services hold to use the cache.
#[derive(Clone)]
pub struct CacheHandle {
    inputs: mpsc::UnboundedSender<Input>,
    /// The read view, for hits without a hop into the runtime.
    hits: Arc<Hits>,
    events: broadcast::Sender<InvalidationEvent>,
    /// The settings.
    pub cfg: CacheConfig,
    /// Where memory lives (the State call reads memory's version from it).
    pub backend: MemoryBackend,
}

fn stopped() -> CacheError {
    CacheError::Unavailable("the node's cache is shutting down".into())
}

impl CacheHandle {
    /// A hit for `key` from the read view, served right here; `None`: ask
    /// [`CacheHandle::through_runtime`] (a miss, or a key this node has no servable line for).
    pub fn hit(&self, key: &str) -> Option<Read> {
        self.hits.get(key)
    }

    /// Reads `key` through this node's cache: a hit from the read view, or else through the
    /// runtime (a fill).
    pub async fn get(&self, key: String) -> Result<Read, CacheError> {
        match self.hit(&key) {
            Some(read) => Ok(read),
            None => self.through_runtime(key).await,
        }
    }

    /// Reads `key` through the runtime, without looking in the read view first: for a caller
    /// that has just found no hit there. The core may still hit (a line installed since), or
    /// fills the line.
    pub async fn through_runtime(&self, key: String) -> Result<Read, CacheError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Get { key, reply })?;
        rx.await.map_err(|_| stopped())?
    }

    /// Writes `key` (Set, Delete or CompareAndSet) through the directory.
    pub async fn write(&self, key: String, write: Write) -> Result<WriteResult, CacheError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Write { key, write, reply })?;
        rx.await.map_err(|_| stopped())?
    }

    /// The key's state here (and in the directory, on the leader).
    pub async fn state(&self, key: String) -> Result<KeyState, CacheError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::State { key, reply })?;
        rx.await.map_err(|_| stopped())
    }

    /// This node's counters.
    pub async fn stats(&self) -> Result<CacheStats, CacheError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Stats { reply })?;
        rx.await.map_err(|_| stopped())
    }

    /// Invalidation events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<InvalidationEvent> {
        self.events.subscribe()
    }

    /// Hands messages received from node `from` to the runtime.
    pub fn deliver(&self, from: NodeId, msgs: Vec<Decoded>) -> Result<(), CacheError> {
        self.send(Input::Network { from, msgs })
    }

    fn send(&self, input: Input) -> Result<(), CacheError> {
        self.inputs.send(input).map_err(|_| stopped())
    }
}

/// A client waiting for its answer.
enum Reply {
    Read(oneshot::Sender<Result<Read, CacheError>>),
    Write(oneshot::Sender<Result<WriteResult, CacheError>>),
}

/// What the runtime task reacts to (besides ticks and status changes): a call from a client or
/// from another node, or the end of a piece of the task's own work ([`Pending`]).
enum Input {
    Get {
        key: String,
        reply: oneshot::Sender<Result<Read, CacheError>>,
    },
    Write {
        key: String,
        write: Write,
        reply: oneshot::Sender<Result<WriteResult, CacheError>>,
    },
    State {
        key: String,
        reply: oneshot::Sender<KeyState>,
    },
    Stats {
        reply: oneshot::Sender<CacheStats>,
    },
    /// Messages from another node.
    Network {
        from: NodeId,
        msgs: Vec<Decoded>,
    },
    /// Memory's answer to the directory of `epoch`; `None`: ambiguous (see the module docs).
    Memory {
        epoch: Epoch,
        id: MemOpId,
        outcome: Option<Result<MemoryReply, MemoryError>>,
    },
    /// The leadership check for a batch of lease grants ended.
    Confirmed {
        epoch: Epoch,
        grants: Vec<(NodeId, Envelope<ToNode>)>,
        ok: bool,
    },
}

/// Starts this node's cache runtime, its directory's memory being `backend`.
pub fn spawn(node: NodeHandle, cfg: CacheConfig, backend: MemoryBackend) -> CacheHandle {
    let (inputs, rx) = mpsc::unbounded_channel();
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let me = node.settings.id;
    // Differs on every start: replies meant for a previous run are never matched to this one.
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let status = node.watch_status();
    let hits = Arc::new(Hits::new());
    let runtime = Runtime {
        me,
        cache: CacheNode::new(me, cfg.clone(), incarnation),
        cfg: cfg.clone(),
        dir: None,
        last_epoch: 0,
        unsent: std::collections::VecDeque::new(),
        held_grants: Vec::new(),
        confirming: false,
        last_op: 0,
        ops: HashMap::new(),
        peers: transport::Peers::new(me, node.settings.tls.clone()),
        pending: FuturesUnordered::new(),
        events: events.clone(),
        hits: hits.clone(),
        current: status.borrow().clone(),
        past_invalidations_sent: 0,
        node,
        backend: backend.clone(),
        live_epoch: Arc::new(AtomicU64::new(0)),
        write_backs: HashMap::new(),
        reported: NodeStats::default(),
    };
    tokio::spawn(runtime.run(rx, status));
    CacheHandle {
        inputs,
        hits,
        events,
        cfg,
        backend,
    }
}

/// A memory request or leadership check under way, and the input it ends with.
///
/// These run inside the runtime task (polled in its loop) rather than as tasks of their own:
/// a spawned task cost a spawn, a wake-up of that task when its answer came, and a channel
/// hop back into this one, on the path of every write and every fill. Polled here, the answer
/// wakes this task directly. The work itself is the same future, so the memory contract is
/// unchanged: each request's future yields exactly one outcome (`None` when ambiguous), which
/// becomes exactly one [`Input::Memory`].
type Pending = Pin<Box<dyn Future<Output = Input> + Send>>;

/// The task's state.
struct Runtime {
    /// This node.
    me: NodeId,
    /// The settings.
    cfg: CacheConfig,
    /// For proposals, reads and the leader's address.
    node: NodeHandle,
    /// This node's lines and lease.
    cache: CacheNode,
    /// The directory, while this node leads.
    dir: Option<Directory>,
    /// The epoch of the last directory started here. A directory is never started twice for
    /// one epoch: a second one would hand out the first one's session numbers again, and a node
    /// holding lines of the first could keep serving them under the second's leases.
    last_epoch: Epoch,
    /// Messages for the directory waiting for a leader to be known, with when they were made.
    unsent: std::collections::VecDeque<(u64, Envelope<ToHome>)>,
    /// Lease grants waiting for a leadership check.
    held_grants: Vec<(NodeId, Envelope<ToNode>)>,
    /// A leadership check is running.
    confirming: bool,
    /// The last client operation id.
    last_op: OpId,
    /// Clients waiting for a fill or write.
    ops: HashMap<OpId, Reply>,
    /// Outgoing queues to other nodes.
    peers: transport::Peers,
    /// Memory requests and leadership checks under way, polled by this task itself.
    pending: FuturesUnordered<Pending>,
    /// Invalidations for Subscribe.
    events: broadcast::Sender<InvalidationEvent>,
    /// The read view this task publishes (and the origin of the core's clock).
    hits: Arc<Hits>,
    /// The node's latest status.
    current: NodeStatus,
    /// Invalidations sent by directories already dropped.
    past_invalidations_sent: u64,
    /// Where memory requests go.
    backend: MemoryBackend,
    /// The epoch of the directory running now (0: none). A Redis write whose outcome is being
    /// resolved stops trying once its directory is gone: no one would take the answer.
    live_epoch: Arc<AtomicU64>,
    /// Write-back mode: this node's WriteBacks awaiting their answer, with when they were
    /// sent, for the write-back metrics (outcome and flush latency). The core keeps its own
    /// record; this one only measures, and forgets a request after the operation timeout
    /// (counted `unanswered`) as the core does.
    write_backs: HashMap<ReqId, Instant>,
    /// The core's counters as last turned into metrics: metrics get the increments since.
    reported: NodeStats,
}

impl Runtime {
    async fn run(
        mut self,
        mut inputs: mpsc::UnboundedReceiver<Input>,
        mut status: watch::Receiver<NodeStatus>,
    ) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        self.on_status();
        loop {
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(input) => self.handle(input),
                    None => return,
                },
                Some(done) = self.pending.next(), if !self.pending.is_empty() => self.handle(done),
                _ = ticker.tick() => {
                    self.report_uses();
                    let now = self.now();
                    self.cache.tick(now);
                    if let Some(d) = &mut self.dir {
                        d.tick(now);
                    }
                    self.record_metrics();
                }
                changed = status.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.current = status.borrow_and_update().clone();
                    self.on_status();
                }
            }
            self.pump();
        }
    }

    /// The core's clock: milliseconds since this runtime started (monotonic).
    fn now(&self) -> u64 {
        self.hits.now()
    }

    /// Publishes what the last calls into the core changed in its lines and lease. Called
    /// before any effect of those calls is carried out (see `cache::view`).
    fn publish(&mut self) {
        let changes = self.cache.take_view_changes();
        if !changes.is_empty() {
            self.hits
                .view
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .apply(changes);
        }
    }

    /// Tells the core's LRU order which lines hits from the view used since the last report.
    fn report_uses(&mut self) {
        let used = std::mem::take(
            &mut *self
                .hits
                .used
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if used.is_empty() {
            return;
        }
        let view = self
            .hits
            .view
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        for key in used {
            view.clear_used(&key);
            self.cache.touch(&key);
        }
    }

    fn on_status(&mut self) {
        let now = self.now();
        let s = &self.current;
        if s.leader.is_some() {
            self.cache.on_new_epoch(now, s.term);
        }
        let leading = s.role == Role::Leader && s.leader == Some(self.me);
        let term = s.term;
        let current = self.dir.as_ref().map(Directory::epoch);
        if current.is_some() && (!leading || current != Some(term)) {
            self.drop_directory("no longer the leader of its term");
        }
        if leading && self.dir.is_none() && term > self.last_epoch {
            tracing::info!(term, "cache directory started");
            self.last_epoch = term;
            self.dir = Some(Directory::new(self.cfg.clone(), term, now));
            self.live_epoch.store(term, Ordering::Relaxed);
        }
        if self.current.leader.is_some() {
            self.flush_unsent();
        }
    }

    fn drop_directory(&mut self, why: &str) {
        self.live_epoch.store(0, Ordering::Relaxed);
        if let Some(d) = self.dir.take() {
            tracing::info!(epoch = d.epoch(), why, "cache directory stopped");
            self.past_invalidations_sent += d.stats().invalidations_sent;
        }
        self.held_grants.clear();
    }

    fn handle(&mut self, input: Input) {
        // Before anything that may store a line (and so evict one): the LRU order must know of
        // the hits served from the view since the last report.
        self.report_uses();
        let now = self.now();
        match input {
            Input::Get { key, reply } => {
                let op = self.next_op();
                match self.cache.get(now, op, &key) {
                    Ok(Lookup::Hit(read)) => {
                        let _ = reply.send(Ok(read));
                    }
                    Ok(Lookup::Pending) => {
                        self.ops.insert(op, Reply::Read(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Input::Write { key, write, reply } => {
                let op = self.next_op();
                match self.cache.write(now, op, &key, write) {
                    Ok(()) => {
                        self.ops.insert(op, Reply::Write(reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Input::State { key, reply } => {
                let holders = self.dir.as_ref().map(|d| d.holders(&key).collect());
                let _ = reply.send(KeyState {
                    line: self.cache.line_view(now, &key),
                    holders,
                });
            }
            Input::Stats { reply } => {
                let (node, bytes, entries) = self.cache.stats();
                let current = self
                    .dir
                    .as_ref()
                    .map_or(0, |d| d.stats().invalidations_sent);
                let node = NodeStats {
                    hits: node.hits + self.hits.served.load(Ordering::Relaxed),
                    ..node
                };
                let _ = reply.send(CacheStats {
                    node,
                    bytes,
                    entries,
                    dirty_lines: self.cache.dirty_lines(),
                    invalidations_sent: self.past_invalidations_sent + current,
                });
            }
            Input::Network { from, msgs } => {
                for m in msgs {
                    match m {
                        Decoded::ToHome(env) => {
                            if let Some(d) = &mut self.dir {
                                d.on_message(now, from, env);
                            }
                        }
                        Decoded::ToNode(env) => self.deliver_to_node(now, env),
                    }
                }
            }
            Input::Memory { epoch, id, outcome } => {
                if self.dir.as_ref().map(Directory::epoch) != Some(epoch) {
                    return;
                }
                match outcome {
                    Some(result) => {
                        if let Some(d) = &mut self.dir {
                            d.on_memory(now, id, result);
                        }
                    }
                    None => self.drop_directory("a memory write's outcome is unknown"),
                }
            }
            Input::Confirmed { epoch, grants, ok } => {
                self.confirming = false;
                if ok && self.dir.as_ref().map(Directory::epoch) == Some(epoch) {
                    for (to, msg) in grants {
                        self.send_to_node(now, to, msg);
                    }
                }
            }
        }
    }

    fn next_op(&mut self) -> OpId {
        self.last_op += 1;
        self.last_op
    }

    /// Carries out the core's effects until there are none left.
    fn pump(&mut self) {
        loop {
            // Before the effects: an acknowledgement among them must not leave while the view
            // still serves the line it gives up.
            self.publish();
            let now = self.now();
            let node_effects = self.cache.take_effects();
            let dir_effects = self
                .dir
                .as_mut()
                .map(Directory::take_effects)
                .unwrap_or_default();
            if node_effects.is_empty() && dir_effects.is_empty() {
                break;
            }
            for e in node_effects {
                match e {
                    NodeEffect::ToHome(env) => {
                        if let ToHome::WriteBack { req, .. } = &env.msg {
                            self.write_backs.insert(*req, Instant::now());
                        }
                        self.send_to_home(now, env)
                    }
                    NodeEffect::Done { op, result } => self.answer(op, result),
                    NodeEffect::Invalidated(ev) => {
                        let _ = self.events.send(ev);
                    }
                }
            }
            for e in dir_effects {
                match e {
                    HomeEffect::ToNode { to, msg } => {
                        if matches!(msg.msg, ToNode::LeaseGrant { .. }) {
                            self.held_grants.push((to, msg));
                        } else {
                            self.send_to_node(now, to, msg);
                        }
                    }
                    HomeEffect::Memory(req) => self.run_memory(req),
                    HomeEffect::GaveUp { node, key } => {
                        tracing::debug!(
                            node,
                            key,
                            "cache directory gave up on an exclusive line; its unwritten writes, if any, are lost"
                        );
                        record::cache_write_back_losses("given_up", 1);
                    }
                }
            }
        }
        self.confirm_grants();
    }

    /// Sends a message to the directory: the leader's own node calls it directly; while no
    /// leader is known the message waits (see [`MAX_UNSENT`]).
    fn send_to_home(&mut self, now: u64, env: Envelope<ToHome>) {
        if let Some(d) = &mut self.dir {
            d.on_message(now, self.me, env);
            return;
        }
        let leader = self.current.leader.filter(|&l| l != self.me);
        match leader.and_then(|l| self.current.address_of(l)) {
            Some(addr) => self.peers.send(addr, wire::encode_to_home(env)),
            None => {
                if self.unsent.len() == MAX_UNSENT {
                    self.unsent.pop_front();
                }
                self.unsent.push_back((now, env));
            }
        }
    }

    /// Sends what waited for a leader, except what is older than the core's operation timeout
    /// (its operation has failed by then).
    fn flush_unsent(&mut self) {
        let now = self.now();
        let timeout = self.cfg.op_timeout_ms;
        let waiting = std::mem::take(&mut self.unsent);
        for (at, env) in waiting {
            if now.saturating_sub(at) < timeout {
                self.send_to_home(now, env);
            }
        }
    }

    fn send_to_node(&mut self, now: u64, to: NodeId, msg: Envelope<ToNode>) {
        if to == self.me {
            self.deliver_to_node(now, msg);
        } else if let Some(addr) = self.current.address_of(to) {
            self.peers.send(addr, wire::encode_to_node(msg));
        }
    }

    /// Hands a directory message to this node's core, measuring a WriteBack's answer first.
    fn deliver_to_node(&mut self, now: u64, env: Envelope<ToNode>) {
        if let ToNode::WriteBackDone { req, result } = &env.msg
            && let Some(sent) = self.write_backs.remove(req)
        {
            let outcome = match result {
                WriteBackResult::Written => WriteBackOutcome::Written,
                WriteBackResult::NotHolder => WriteBackOutcome::NotHolder,
                WriteBackResult::Failed(_) => WriteBackOutcome::Failed,
            };
            record::cache_write_back(outcome, sent.elapsed());
        }
        self.cache.on_message(now, env);
    }

    /// Brings the write-back metrics up to date (every tick): the dirty lines gauge, the core's
    /// counters' increments, and the write-backs that went unanswered.
    fn record_metrics(&mut self) {
        if self.cfg.write_back.is_none() {
            return;
        }
        record::cache_dirty_lines(self.cache.dirty_lines());
        let (now, _, _) = self.cache.stats();
        let before = std::mem::replace(&mut self.reported, now);
        if now.local_writes > before.local_writes {
            record::cache_local_writes(now.local_writes - before.local_writes);
        }
        if now.dirty_lost > before.dirty_lost {
            record::cache_write_back_losses("dirty_dropped", now.dirty_lost - before.dirty_lost);
        }
        let timeout = Duration::from_millis(self.cfg.op_timeout_ms);
        self.write_backs.retain(|_, sent| {
            let waiting = sent.elapsed() < timeout;
            if !waiting {
                record::cache_write_back(WriteBackOutcome::Unanswered, sent.elapsed());
            }
            waiting
        });
    }

    fn answer(&mut self, op: OpId, result: Result<Answer, CacheError>) {
        let mismatch = || CacheError::Unavailable("internal error: mismatched cache answer".into());
        match self.ops.remove(&op) {
            Some(Reply::Read(tx)) => {
                let _ = tx.send(result.and_then(|a| match a {
                    Answer::Read(r) => Ok(r),
                    Answer::Write(_) => Err(mismatch()),
                }));
            }
            Some(Reply::Write(tx)) => {
                let _ = tx.send(result.and_then(|a| match a {
                    Answer::Write(w) => Ok(w),
                    Answer::Read(_) => Err(mismatch()),
                }));
            }
            None => {}
        }
    }

    /// Starts a leadership check for the held lease grants (see the module docs).
    fn confirm_grants(&mut self) {
        if self.confirming || self.held_grants.is_empty() {
            return;
        }
        let Some(epoch) = self.dir.as_ref().map(Directory::epoch) else {
            self.held_grants.clear();
            return;
        };
        self.confirming = true;
        let grants = std::mem::take(&mut self.held_grants);
        let node = self.node.clone();
        self.pending.push(Box::pin(async move {
            let ok = node.read(true, |_| ()).await.is_ok();
            Input::Confirmed { epoch, grants, ok }
        }));
    }

    /// Runs a memory request against the backend (as a [`Pending`] of this task) and hands the
    /// outcome to the directory of that epoch, if it still runs.
    fn run_memory(&mut self, req: MemoryRequest) {
        let backend = self.backend.clone();
        let node = self.node.clone();
        let live = self.live_epoch.clone();
        self.pending.push(Box::pin(async move {
            let started = Instant::now();
            let (epoch, id) = (req.epoch, req.id);
            let op = match req.op {
                MemoryOp::Read { .. } | MemoryOp::ReadReserve { .. } => "read",
                MemoryOp::Write { .. } | MemoryOp::WriteReserve { .. } => "write",
                MemoryOp::WriteBack { .. } => "write_back",
            };
            let outcome = match &backend {
                MemoryBackend::Raft => raft_memory::run(&node, req).await,
                MemoryBackend::Redis(redis) => {
                    redis
                        .run(&req, || live.load(Ordering::Relaxed) == epoch)
                        .await
                }
            };
            let label = match &outcome {
                Some(Ok(_)) => "ok",
                Some(Err(_)) => "refused",
                None => "unknown",
            };
            record::cache_memory(backend.name(), op, label, started.elapsed());
            Input::Memory { epoch, id, outcome }
        }));
    }
}
