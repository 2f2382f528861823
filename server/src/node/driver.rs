//! The driver: the one task that owns the Raft engine and the replicated state.
//!
//! Each turn of its loop takes one input (a tick, a peer message, a client request, a
//! persistence completion), then every other input already waiting (so bursts are batched:
//! many proposals become one `propose_batch`, one AppendEntries per follower, one fsync), and
//! then acts on the engine's Ready in the order the engine requires (see `raft`'s module docs):
//! send, hand the durable part to the WAL thread, apply, serve reads. Messages that promise
//! durable state (votes, acknowledgements) are bound to their reply channel or peer queue at
//! once and sent by the WAL thread itself, right after the fsync that makes them true: a
//! follower's acknowledgement does not wait for the driver's next turn.
//!
//! Requests from peers are answered through reply channels kept per (peer, request kind): the
//! engine answers every request exactly once and in order, so the oldest waiting channel of
//! that kind is the one a response belongs to.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message as _;
use sync_proto::internal::v1 as ipb;
use sync_proto::raft::v1 as pb;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::NodeError;
use super::config::Settings;
use super::persist::{Delivery, PersistDone, PersistJob};
use super::transport::{PeerHandle, SnapshotCache, TransportTiming, spawn_peer};
use crate::metrics::record::{self, Proposal};
use crate::raft::{
    ClusterConfigExt, ConfigChange, Message, NodeId, PeerStatus, RaftError, RaftNode, Role,
};
use crate::state::Notice;
use crate::state::{Applied, ReplicatedState, encode_command};

/// A read evaluated against the state once it is safe, or told why it cannot be.
pub type ReadQuery = Box<dyn FnOnce(Result<&ReplicatedState, NodeError>) + Send>;

/// Everything the driver reacts to.
pub enum Input {
    /// A Raft request from a peer; the engine's answer goes back through `reply`.
    PeerRequest {
        /// The request.
        msg: Message,
        /// For InstallSnapshot: the snapshot's bytes.
        snapshot: Option<Bytes>,
        /// Where the answer goes (or why the request was refused).
        reply: PeerReply,
    },
    /// A peer answered one of our requests.
    PeerAnswer(Message),
    /// A peer answered a liveness probe.
    PeerContact(NodeId),
    /// A request to a peer failed.
    Unreachable(NodeId),
    /// Streaming a snapshot to a peer failed.
    SnapshotFailed(NodeId),
    /// A client command to replicate.
    Propose {
        /// The command.
        op: ipb::command::Op,
        /// Its de-duplication id.
        request: Option<pb::RequestId>,
        /// The outcome once applied, with the entry's index.
        reply: oneshot::Sender<Result<(u64, Applied), NodeError>>,
    },
    /// A read of the state; linearizable (ReadIndex on the leader) or from the applied state.
    Read {
        /// Confirm with a quorum first.
        linearizable: bool,
        /// What to read.
        query: ReadQuery,
    },
    /// A membership change.
    ChangeMembership {
        /// The change.
        change: ConfigChange,
        /// The index of the committed change.
        reply: oneshot::Sender<Result<u64, NodeError>>,
    },
    /// Hand leadership to `target` (0: the most caught-up voter).
    TransferLeader {
        /// The successor.
        target: NodeId,
        /// Done once the target leads.
        reply: oneshot::Sender<Result<NodeId, NodeError>>,
        /// Give up after this.
        deadline: Instant,
    },
    /// A snapshot of the state machine, encoded off the driver task (see `maybe_snapshot`), to
    /// be saved.
    SnapshotEncoded {
        /// The Raft metadata taken together with the copy of the state that was encoded.
        meta: pb::SnapshotMetadata,
        /// The encoded state.
        data: Bytes,
    },
    /// Take a snapshot now.
    Snapshot {
        /// Its metadata and size once durable.
        reply: oneshot::Sender<Result<(pb::SnapshotMetadata, u64), NodeError>>,
    },
    /// Stop: hand leadership over if leading, flush, and end.
    Shutdown,
}

/// What a waiting proposal wants back.
enum WaiterReply {
    Command(oneshot::Sender<Result<(u64, Applied), NodeError>>),
    Config(oneshot::Sender<Result<u64, NodeError>>),
}

struct Waiter {
    term: u64,
    reply: WaiterReply,
}

impl Waiter {
    fn fail(self, e: NodeError) {
        match self.reply {
            WaiterReply::Command(r) => {
                let _ = r.send(Err(e));
            }
            WaiterReply::Config(r) => {
                let _ = r.send(Err(e));
            }
        }
    }

    fn is_closed(&self) -> bool {
        match &self.reply {
            WaiterReply::Command(r) => r.is_closed(),
            WaiterReply::Config(r) => r.is_closed(),
        }
    }
}

/// A member as this node sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberView {
    /// The member.
    pub member: pb::Member,
    /// Leader only: replication progress.
    pub progress: Option<PeerStatus>,
    /// When this node last heard from it.
    pub last_contact: Option<Instant>,
    /// The failure detector's verdict.
    pub reachable: bool,
}

/// A snapshot of the node's state for status calls, health and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeStatus {
    /// This node.
    pub id: NodeId,
    /// Address it advertises.
    pub address: String,
    /// Role.
    pub role: Role,
    /// This node is a learner (or not a member).
    pub learner: bool,
    /// Term.
    pub term: u64,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Last log index.
    pub last_index: u64,
    /// Last index covered by the durable snapshot.
    pub snapshot_index: u64,
    /// Members.
    pub members: Vec<MemberView>,
}

impl NodeStatus {
    /// The address of member `id`.
    pub fn address_of(&self, id: NodeId) -> Option<&str> {
        self.members
            .iter()
            .find(|m| m.member.id == id)
            .map(|m| m.member.address.as_str())
    }
}

/// A cluster event for watchers.
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterEvent {
    /// The known leader changed.
    LeaderChanged {
        /// The new leader (None while unknown).
        leader: Option<NodeId>,
        /// In this term.
        term: u64,
    },
    /// The configuration in force changed.
    MembershipChanged {
        /// The new configuration.
        config: pb::ClusterConfig,
        /// At this log index (the last index when observed).
        index: u64,
    },
    /// The failure detector changed its verdict on a member.
    ReachabilityChanged {
        /// The member.
        id: NodeId,
        /// Reachable now.
        reachable: bool,
    },
}

/// Where the engine's answer to a peer's request goes: a unary RPC's reply channel, or the
/// response stream of a pipelined AppendStream. Called exactly once, with the answer or with why
/// the request was refused. A closure, so that the WAL thread can call it the moment the answer's
/// promise is durable, without a hop back through the driver.
pub type PeerReply = Box<dyn FnOnce(Result<Message, String>) + Send>;
/// A client command waiting to be proposed.
type PendingProposal = (
    ipb::command::Op,
    Option<pb::RequestId>,
    oneshot::Sender<Result<(u64, Applied), NodeError>>,
);
/// A leadership transfer in progress: target, who waits, and until when.
type Transfer = (NodeId, oneshot::Sender<Result<NodeId, NodeError>>, Instant);

/// Kinds of requests, to pair responses with reply channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum RequestKind {
    Append,
    Vote,
    Snapshot,
    TimeoutNow,
}

fn request_kind(m: &Message) -> Option<RequestKind> {
    match m {
        Message::AppendEntries(_) | Message::AppendEntriesResponse(_) => Some(RequestKind::Append),
        Message::RequestVote(_) | Message::RequestVoteResponse(_) => Some(RequestKind::Vote),
        Message::InstallSnapshot(_) | Message::InstallSnapshotResponse(_) => {
            Some(RequestKind::Snapshot)
        }
        Message::TimeoutNow(_) | Message::TimeoutNowResponse(_) => Some(RequestKind::TimeoutNow),
    }
}

/// The leader's time in Unix milliseconds, stamped into every command it proposes.
///
/// It is read from the wall clock once, then advanced by the monotonic clock: a wall-clock step
/// (NTP, an operator) while this process runs cannot make replicated time jump forward and
/// expire sessions early. Different leaders' clocks may disagree; the state machine copes with
/// that through leader epochs (see `state`'s module docs).
pub fn now_unix_ms() -> u64 {
    static ANCHOR: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let (at, unix_ms) = ANCHOR.get_or_init(|| {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        (Instant::now(), unix)
    });
    unix_ms + at.elapsed().as_millis() as u64
}

/// The driver's state (see the module docs).
pub struct Driver {
    settings: Arc<Settings>,
    raft: RaftNode,
    state: ReplicatedState,
    inputs: mpsc::UnboundedReceiver<Input>,
    self_tx: mpsc::UnboundedSender<Input>,
    persist: Option<std::sync::mpsc::Sender<PersistJob>>,
    persist_done: mpsc::UnboundedReceiver<PersistDone>,
    /// Persistence jobs handed out and not yet reported done.
    persist_inflight: usize,
    peers: BTreeMap<NodeId, PeerHandle>,
    snapshots: SnapshotCache,
    timing: TransportTiming,
    replies: HashMap<(NodeId, RequestKind), VecDeque<PeerReply>>,
    pending_proposals: Vec<PendingProposal>,
    proposals: BTreeMap<u64, Waiter>,
    reads: HashMap<u64, ReadQuery>,
    ready_reads: Vec<(u64, ReadQuery)>,
    next_read: u64,
    transfer: Option<Transfer>,
    incoming_snapshot: Option<((u64, u64), Bytes)>,
    snapshot_index: u64,
    /// Bytes of entry data applied since the last snapshot was taken (or installed).
    applied_bytes_since_snapshot: u64,
    /// The size of the latest snapshot: the next one is due only once at least as many bytes
    /// of entries were applied since (see `maybe_snapshot`).
    last_snapshot_len: u64,
    snapshot_in_flight: bool,
    snapshot_waiters: Vec<oneshot::Sender<Result<(pb::SnapshotMetadata, u64), NodeError>>>,
    contact: BTreeMap<NodeId, Instant>,
    reachable: BTreeMap<NodeId, bool>,
    status_tx: watch::Sender<NodeStatus>,
    events: broadcast::Sender<ClusterEvent>,
    /// The state machine's notices, as they are applied.
    notices: broadcast::Sender<Notice>,
    last_leader: Option<NodeId>,
    last_config: pb::ClusterConfig,
    shutting_down: Option<Instant>,
    ticks: u64,
    /// When status and gauges were last published (they are rebuilt at most every
    /// [`PUBLISH_EVERY`], or at once when term, role, leader or membership change).
    last_publish: Instant,
    /// (term, role, leader) at the last publish.
    published_key: (u64, Role, Option<NodeId>),
}

/// Longest time between two status publications while nothing significant changes.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);

/// What the driver needs at start.
pub struct DriverParts {
    /// Settings.
    pub settings: Arc<Settings>,
    /// The engine, restored from disk.
    pub raft: RaftNode,
    /// The state machine, restored from the snapshot.
    pub state: ReplicatedState,
    /// Its input queue.
    pub inputs: mpsc::UnboundedReceiver<Input>,
    /// A sender to the same queue (for peer tasks).
    pub self_tx: mpsc::UnboundedSender<Input>,
    /// The WAL thread's job queue.
    pub persist: std::sync::mpsc::Sender<PersistJob>,
    /// Its completions.
    pub persist_done: mpsc::UnboundedReceiver<PersistDone>,
    /// The latest snapshot.
    pub snapshots: SnapshotCache,
    /// Its index.
    pub snapshot_index: u64,
    /// Where status goes.
    pub status_tx: watch::Sender<NodeStatus>,
    /// Where events go.
    pub events: broadcast::Sender<ClusterEvent>,
    /// Where the state machine's notices (lock events, ended waits) go.
    pub notices: broadcast::Sender<Notice>,
}

impl Driver {
    /// A driver over restored parts.
    pub fn new(p: DriverParts) -> Driver {
        let timing = TransportTiming {
            rpc_timeout: p.settings.election_timeout.max(Duration::from_millis(500)),
            probe_interval: p.settings.heartbeat_interval * 5,
            max_backoff: p.settings.election_timeout.min(Duration::from_secs(1)),
        };
        let last_snapshot_len = p
            .snapshots
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|(_, d)| d.len() as u64))
            .unwrap_or(0);
        let mut d = Driver {
            settings: p.settings,
            raft: p.raft,
            state: p.state,
            inputs: p.inputs,
            self_tx: p.self_tx,
            persist: Some(p.persist),
            persist_done: p.persist_done,
            persist_inflight: 0,
            peers: BTreeMap::new(),
            snapshots: p.snapshots,
            timing,
            replies: HashMap::new(),
            pending_proposals: Vec::new(),
            proposals: BTreeMap::new(),
            reads: HashMap::new(),
            ready_reads: Vec::new(),
            next_read: 1,
            transfer: None,
            incoming_snapshot: None,
            snapshot_index: p.snapshot_index,
            applied_bytes_since_snapshot: 0,
            last_snapshot_len,
            snapshot_in_flight: false,
            snapshot_waiters: Vec::new(),
            contact: BTreeMap::new(),
            reachable: BTreeMap::new(),
            status_tx: p.status_tx,
            events: p.events,
            notices: p.notices,
            last_leader: None,
            last_config: pb::ClusterConfig::default(),
            shutting_down: None,
            ticks: 0,
            last_publish: Instant::now(),
            published_key: (0, Role::Follower, None),
        };
        d.sync_peers();
        d
    }

    /// Runs until shut down (Ok) or until storage fails (Err: the node must exit).
    pub async fn run(mut self) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(self.settings.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                biased;
                done = self.persist_done.recv() => {
                    let Some(done) = done else { break Err(NodeError::Storage("WAL thread stopped".into())) };
                    if let Err(e) = self.on_persist_done(done) { break Err(e) }
                    // Take every other completion already waiting: one Ready for all of them.
                    let mut failed = None;
                    while let Ok(more) = self.persist_done.try_recv() {
                        if let Err(e) = self.on_persist_done(more) {
                            failed = Some(e);
                            break;
                        }
                    }
                    if let Some(e) = failed { break Err(e) }
                }
                _ = ticker.tick() => self.on_tick(),
                input = self.inputs.recv() => match input {
                    Some(i) => self.handle(i),
                    None => break Ok(()),
                },
            }
            for _ in 0..4096 {
                match self.inputs.try_recv() {
                    Ok(i) => self.handle(i),
                    Err(_) => break,
                }
            }
            self.flush_proposals();
            if let Err(e) = self.process_ready() {
                break Err(e);
            }
            self.publish();
            self.check_transfer();
            if let Some(deadline) = self.shutting_down
                && (self.raft.role() != Role::Leader || Instant::now() >= deadline)
                && self.persist_inflight == 0
            {
                break Ok(());
            }
        };
        self.stop(&result);
        result
    }

    /// Fails everything still waiting and stops the WAL thread after it finished its queue.
    fn stop(&mut self, result: &Result<(), NodeError>) {
        let why = match result {
            Ok(()) => NodeError::ShuttingDown,
            Err(e) => e.clone(),
        };
        for (_, _, reply) in self.pending_proposals.drain(..) {
            let _ = reply.send(Err(why.clone()));
        }
        for (_, w) in std::mem::take(&mut self.proposals) {
            w.fail(why.clone());
        }
        for (_, q) in self.reads.drain() {
            q(Err(why.clone()));
        }
        for (_, q) in self.ready_reads.drain(..) {
            q(Err(why.clone()));
        }
        self.persist = None;
        self.peers.clear();
    }

    fn contact(&mut self, id: NodeId) {
        self.contact.insert(id, Instant::now());
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::PeerRequest {
                msg,
                snapshot,
                reply,
            } => {
                let from = msg.from();
                self.contact(from);
                if let (Some(data), Message::InstallSnapshot(r)) = (snapshot, &msg)
                    && let Some(meta) = &r.metadata
                {
                    self.incoming_snapshot = Some(((meta.last_index, meta.last_term), data));
                }
                let kind = request_kind(&msg).expect("every message has a kind");
                match self.raft.step(msg) {
                    Ok(()) => self
                        .replies
                        .entry((from, kind))
                        .or_default()
                        .push_back(reply),
                    Err(e) => reply(Err(e.to_string())),
                }
            }
            Input::PeerAnswer(msg) => {
                self.contact(msg.from());
                if let Err(e) = self.raft.step(msg) {
                    tracing::warn!(error = %e, "peer answer refused");
                }
            }
            Input::PeerContact(id) => self.contact(id),
            Input::Unreachable(id) => self.raft.report_unreachable(id),
            Input::SnapshotFailed(id) => self.raft.report_snapshot_failed(id),
            Input::Propose { op, request, reply } => {
                self.pending_proposals.push((op, request, reply));
            }
            Input::Read {
                linearizable,
                query,
            } => self.start_read(linearizable, query),
            Input::ChangeMembership { change, reply } => {
                match self.raft.propose_config_change(change) {
                    Ok(index) => {
                        self.proposals.insert(
                            index,
                            Waiter {
                                term: self.raft.term(),
                                reply: WaiterReply::Config(reply),
                            },
                        );
                    }
                    Err(e) => {
                        let _ = reply.send(Err(self.raft_error(e)));
                    }
                }
            }
            Input::TransferLeader {
                target,
                reply,
                deadline,
            } => self.start_transfer(target, reply, deadline),
            Input::SnapshotEncoded { meta, data } => self.save_snapshot(meta, data),
            Input::Snapshot { reply } => {
                self.snapshot_waiters.push(reply);
                self.maybe_snapshot(true);
            }
            Input::Shutdown => self.start_shutdown(),
        }
    }

    fn raft_error(&self, e: RaftError) -> NodeError {
        match e {
            RaftError::NotLeader { leader } => self.not_leader(leader),
            other => NodeError::Raft(other),
        }
    }

    fn not_leader(&self, leader: Option<NodeId>) -> NodeError {
        let leader = leader.filter(|&l| l != self.settings.id);
        NodeError::NotLeader {
            leader: leader.map(|id| {
                let address = self
                    .raft
                    .config()
                    .member(id)
                    .map(|m| m.address.clone())
                    .unwrap_or_default();
                (id, address)
            }),
        }
    }

    fn start_read(&mut self, linearizable: bool, query: ReadQuery) {
        if !linearizable {
            query(Ok(&self.state));
            return;
        }
        let ctx = self.next_read;
        self.next_read += 1;
        match self.raft.read_index(ctx) {
            Ok(()) => {
                self.reads.insert(ctx, query);
            }
            Err(e) => query(Err(self.raft_error(e))),
        }
    }

    /// The voter (other than this node) with the highest match index.
    fn most_caught_up_voter(&self) -> Option<NodeId> {
        let config = self.raft.config();
        self.raft
            .peers()
            .into_iter()
            .filter(|p| config.is_voter(p.id))
            .max_by_key(|p| (p.matched, std::cmp::Reverse(p.id)))
            .map(|p| p.id)
    }

    fn start_transfer(
        &mut self,
        target: NodeId,
        reply: oneshot::Sender<Result<NodeId, NodeError>>,
        deadline: Instant,
    ) {
        if self.raft.role() != Role::Leader {
            let _ = reply.send(Err(self.not_leader(self.raft.leader())));
            return;
        }
        let target = if target == 0 {
            match self.most_caught_up_voter() {
                Some(t) => t,
                None => {
                    let _ = reply.send(Err(NodeError::Raft(RaftError::InvalidTransferTarget(0))));
                    return;
                }
            }
        } else {
            target
        };
        if target == self.settings.id {
            let _ = reply.send(Ok(target));
            return;
        }
        match self.raft.transfer_leader(target) {
            Ok(()) => {
                if let Some((_, old, _)) = self.transfer.take() {
                    let _ = old.send(Err(NodeError::Lost));
                }
                self.transfer = Some((target, reply, deadline));
            }
            Err(e) => {
                let _ = reply.send(Err(self.raft_error(e)));
            }
        }
    }

    fn start_shutdown(&mut self) {
        let deadline = Instant::now() + self.settings.election_timeout * 2;
        self.shutting_down = Some(deadline);
        if self.raft.role() == Role::Leader
            && let Some(target) = self.most_caught_up_voter()
        {
            tracing::info!(
                term = self.raft.term(),
                target,
                "shutting down: handing leadership over"
            );
            let (reply, _) = oneshot::channel();
            self.start_transfer(target, reply, deadline);
        }
    }

    fn flush_proposals(&mut self) {
        if self.pending_proposals.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending_proposals);
        if self.raft.role() != Role::Leader || self.shutting_down.is_some() {
            let e = if self.shutting_down.is_some() {
                NodeError::ShuttingDown
            } else {
                self.not_leader(self.raft.leader())
            };
            for (_, _, reply) in batch {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
        let now = now_unix_ms();
        let mut replies = Vec::with_capacity(batch.len());
        let commands: Vec<(Bytes, Option<pb::RequestId>)> = batch
            .into_iter()
            .map(|(op, request, reply)| {
                replies.push(reply);
                (encode_command(op, now), request)
            })
            .collect();
        match self.raft.propose_batch(commands) {
            Ok((first, _)) => {
                let term = self.raft.term();
                record::proposals(Proposal::Ok, replies.len() as u64);
                for (i, reply) in replies.into_iter().enumerate() {
                    self.proposals.insert(
                        first + i as u64,
                        Waiter {
                            term,
                            reply: WaiterReply::Command(reply),
                        },
                    );
                }
            }
            Err(e) => {
                record::proposals(Proposal::Rejected, replies.len() as u64);
                let e = self.raft_error(e);
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Acts on every Ready (see the module docs).
    fn process_ready(&mut self) -> Result<(), NodeError> {
        while self.raft.has_ready() {
            let rd = self.raft.ready();
            for m in rd.messages {
                self.dispatch(m);
            }
            let snapshot = match rd.snapshot {
                Some(meta) => Some(self.install_snapshot(meta)?),
                None => None,
            };
            // Pair each answer with its reply channel now, in order, so that the WAL thread can
            // send it right after the fsync that makes its promise true.
            let after: Vec<Delivery> = rd
                .persisted_messages
                .into_iter()
                .filter_map(|m| self.delivery(m))
                .collect();
            if let Some(persist) = &self.persist {
                persist
                    .send(PersistJob::Write {
                        snapshot,
                        entries: rd.entries,
                        hard_state: rd.hard_state,
                        after,
                    })
                    .map_err(|_| NodeError::Storage("WAL thread stopped".into()))?;
                self.persist_inflight += 1;
            }
            for e in &rd.committed_entries {
                self.applied_bytes_since_snapshot += e.data.len() as u64;
                let applied = self.state.apply(e);
                for n in self.state.take_notices() {
                    match &n {
                        Notice::Lock(crate::state::locks::Notice::Event(e)) => {
                            record::lock_event(e.r#type)
                        }
                        Notice::QueueApplied { event, count } => {
                            record::queue_messages(event, *count)
                        }
                        _ => {}
                    }
                    let _ = self.notices.send(n);
                }
                self.resolve(e.index, e.term, applied);
            }
            for rs in rd.read_states {
                if let Some(q) = self.reads.remove(&rs.context) {
                    self.ready_reads.push((rs.index, q));
                }
            }
            for ctx in rd.dropped_reads {
                if let Some(q) = self.reads.remove(&ctx) {
                    q(Err(NodeError::Lost));
                }
            }
            self.serve_reads();
        }
        self.maybe_snapshot(false);
        if *self.raft.config() != self.last_config {
            self.sync_peers();
        }
        Ok(())
    }

    fn install_snapshot(
        &mut self,
        meta: pb::SnapshotMetadata,
    ) -> Result<(pb::SnapshotMetadata, Bytes), NodeError> {
        let key = (meta.last_index, meta.last_term);
        let Some((_, data)) = self.incoming_snapshot.take().filter(|(k, _)| *k == key) else {
            return Err(NodeError::Storage(format!(
                "engine asked to install snapshot {key:?}, which was not received"
            )));
        };
        self.state = ReplicatedState::restore(&data)
            .map_err(|e| NodeError::Storage(format!("received snapshot {key:?}: {e}")))?;
        tracing::info!(
            term = self.raft.term(),
            index = meta.last_index,
            bytes = data.len(),
            "installed snapshot from the leader"
        );
        // Proposals at or below the snapshot may or may not be in it: their clients retry
        // with the same request id and the de-duplication table answers.
        while let Some((&i, _)) = self.proposals.first_key_value() {
            if i > meta.last_index {
                break;
            }
            if let Some(w) = self.proposals.remove(&i) {
                w.fail(NodeError::Lost);
            }
        }
        if let Ok(mut cache) = self.snapshots.write() {
            *cache = Some((meta.clone(), data.clone()));
        }
        self.snapshot_index = meta.last_index;
        self.applied_bytes_since_snapshot = 0;
        self.last_snapshot_len = data.len() as u64;
        Ok((meta, data))
    }

    fn resolve(&mut self, index: u64, term: u64, applied: Applied) {
        while let Some((&i, _)) = self.proposals.first_key_value() {
            if i >= index {
                break;
            }
            if let Some(w) = self.proposals.remove(&i) {
                w.fail(NodeError::Lost);
            }
        }
        let Some(w) = self.proposals.remove(&index) else {
            return;
        };
        if w.term != term {
            w.fail(NodeError::Lost);
            return;
        }
        match w.reply {
            WaiterReply::Command(r) => {
                let _ = r.send(match applied {
                    Applied::Expired => Err(NodeError::Expired),
                    other => Ok((index, other)),
                });
            }
            WaiterReply::Config(r) => {
                // The caller answers with the membership from Status: publish it first.
                self.publish_now();
                let _ = r.send(Ok(index));
            }
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.state.applied_index();
        let mut i = 0;
        while i < self.ready_reads.len() {
            if self.ready_reads[i].0 <= applied {
                let (_, q) = self.ready_reads.swap_remove(i);
                q(Ok(&self.state));
            } else {
                i += 1;
            }
        }
    }

    /// Sends a message: a response through its reply channel, a request to its peer's queue.
    fn dispatch(&mut self, m: Message) {
        if let Some(send) = self.delivery(m) {
            send();
        }
    }

    /// What sending `m` takes, bound now and run later (by the WAL thread for messages that wait
    /// for an fsync). A response takes the oldest reply channel of its (peer, kind): the engine
    /// answers each peer's requests of one kind exactly once and in order, and answers are
    /// bound in the order the engine emits them. None if nobody waits (the peer left, or its
    /// connection closed).
    fn delivery(&mut self, m: Message) -> Option<Delivery> {
        if m.is_request() {
            let peer = self.peers.get(&m.to())?.sender();
            return Some(Box::new(move || {
                let _ = peer.send(m);
            }));
        }
        let kind = request_kind(&m).expect("every message has a kind");
        let reply = self
            .replies
            .get_mut(&(m.to(), kind))
            .and_then(VecDeque::pop_front)?;
        Some(Box::new(move || reply(Ok(m))))
    }

    fn on_persist_done(&mut self, done: PersistDone) -> Result<(), NodeError> {
        match done {
            PersistDone::Written { last } => {
                self.persist_inflight = self.persist_inflight.saturating_sub(1);
                if let Some((index, term)) = last {
                    self.raft.on_persisted(index, term);
                }
            }
            PersistDone::SnapshotSaved { meta, data, took } => {
                self.snapshot_in_flight = false;
                let size = data.len() as u64;
                record::snapshot_taken(took);
                if meta.last_index > self.snapshot_index {
                    self.snapshot_index = meta.last_index;
                    self.last_snapshot_len = size;
                    if let Ok(mut cache) = self.snapshots.write() {
                        *cache = Some((meta.clone(), data));
                    }
                    if let Err(e) = self.raft.compact(meta.last_index) {
                        tracing::debug!(error = %e, "compaction after snapshot skipped");
                    }
                }
                tracing::info!(
                    term = self.raft.term(),
                    index = meta.last_index,
                    bytes = size,
                    ms = took.as_millis() as u64,
                    "snapshot saved"
                );
                // Whoever asked reads Status next: it must already show this snapshot.
                self.publish_now();
                for w in self.snapshot_waiters.drain(..) {
                    let _ = w.send(Ok((meta.clone(), size)));
                }
            }
            PersistDone::Failed(e) => {
                tracing::error!(error = %e, "storage failed; stopping");
                return Err(NodeError::Storage(e.to_string()));
            }
        }
        Ok(())
    }

    /// Snapshots the state when enough was applied since the last one (or when asked).
    ///
    /// Enough is both `--snapshot-threshold` entries and as many bytes of entry data as the
    /// last snapshot holds. The second rule keeps a snapshot's cost (copying, encoding and
    /// writing the whole state) at most the cost of the log it replaces, however large the state
    /// grows: with a fixed entry count alone, a store of many keys was re-encoded every 10,000
    /// writes (25 MB each at 80,000 keys of the write bench, every 0.8 s). It also keeps the log
    /// that a restart replays no larger than about one snapshot.
    fn maybe_snapshot(&mut self, force: bool) {
        if self.snapshot_in_flight {
            return;
        }
        let applied = self.state.applied_index();
        if applied == 0 {
            for w in self.snapshot_waiters.drain(..) {
                let _ = w.send(Err(NodeError::Raft(RaftError::Compaction {
                    index: 0,
                    reason: "nothing applied yet",
                })));
            }
            return;
        }
        let due = applied.saturating_sub(self.snapshot_index) >= self.settings.snapshot_threshold
            && self.applied_bytes_since_snapshot >= self.last_snapshot_len;
        if !(due || force) {
            return;
        }
        if applied <= self.snapshot_index {
            let cached = self.snapshots.read().ok().and_then(|c| c.clone());
            for w in self.snapshot_waiters.drain(..) {
                let _ = w.send(match &cached {
                    Some((m, d)) => Ok((m.clone(), d.len() as u64)),
                    None => Err(NodeError::Storage("no snapshot in memory".into())),
                });
            }
            return;
        }
        if self.persist.is_none() {
            return;
        }
        let Some(meta) = self.raft.snapshot_metadata(applied) else {
            return;
        };
        // The metadata (index, term, membership) and the copy of the state are taken together,
        // here, so they match; encoding the copy, the expensive part for a large state, runs on a
        // blocking thread while the driver goes on. The bytes come back as an input, so that the
        // save is queued to the WAL thread by the driver, in order with its other jobs.
        let message = self.state.snapshot_message();
        let back = self.self_tx.clone();
        self.snapshot_in_flight = true;
        self.applied_bytes_since_snapshot = 0;
        tokio::task::spawn_blocking(move || {
            let data = Bytes::from(message.encode_to_vec());
            let _ = back.send(Input::SnapshotEncoded { meta, data });
        });
    }

    /// Queues an encoded snapshot for the WAL thread, unless a snapshot installed from the leader
    /// while it was being encoded already covers it (saving it then would move the snapshot
    /// backwards).
    fn save_snapshot(&mut self, meta: pb::SnapshotMetadata, data: Bytes) {
        if meta.last_index <= self.snapshot_index {
            self.snapshot_in_flight = false;
            // Anyone waiting for a snapshot gets the newer one.
            self.maybe_snapshot(!self.snapshot_waiters.is_empty());
            return;
        }
        let queued = self
            .persist
            .as_ref()
            .is_some_and(|p| p.send(PersistJob::SaveSnapshot { meta, data }).is_ok());
        if !queued {
            self.snapshot_in_flight = false;
        }
    }

    /// Keeps one sender task per other member of the configuration in force.
    fn sync_peers(&mut self) {
        let config = self.raft.config().clone();
        self.peers
            .retain(|id, p| config.member(*id).is_some_and(|m| m.address == p.address));
        for m in &config.members {
            if m.id == self.settings.id || self.peers.contains_key(&m.id) || m.address.is_empty() {
                continue;
            }
            let handle = spawn_peer(
                m.id,
                m.address.clone(),
                self.self_tx.clone(),
                self.snapshots.clone(),
                self.timing,
                self.settings.tls.clone(),
            );
            self.peers.insert(m.id, handle);
        }
        if config != self.last_config {
            if !self.last_config.members.is_empty() || !config.members.is_empty() {
                tracing::info!(
                    term = self.raft.term(),
                    members = ?config.members.iter().map(|m| (m.id, m.learner)).collect::<Vec<_>>(),
                    "membership in force"
                );
            }
            // Publish the new membership at once.
            self.published_key.0 = u64::MAX;
            let _ = self.events.send(ClusterEvent::MembershipChanged {
                config: config.clone(),
                index: self.raft.last_index(),
            });
            self.last_config = config;
        }
    }

    fn on_tick(&mut self) {
        self.raft.tick();
        self.ticks += 1;
        if self.ticks.is_multiple_of(16) {
            self.proposals.retain(|_, w| !w.is_closed());
        }
        let timeout = self.settings.peer_timeout;
        let now = Instant::now();
        for m in self.raft.config().members.clone() {
            if m.id == self.settings.id {
                continue;
            }
            let alive = self
                .contact
                .get(&m.id)
                .is_some_and(|t| now.duration_since(*t) < timeout);
            if self.reachable.insert(m.id, alive) != Some(alive) {
                record::peer_reachable(m.id, alive);
                let _ = self.events.send(ClusterEvent::ReachabilityChanged {
                    id: m.id,
                    reachable: alive,
                });
            }
        }
    }

    fn check_transfer(&mut self) {
        let Some((target, _, deadline)) = &self.transfer else {
            return;
        };
        let (target, deadline) = (*target, *deadline);
        if self.raft.leader() == Some(target) {
            // The caller answers with the new leader's term from Status: publish it first.
            self.publish_now();
            if let Some((_, reply, _)) = self.transfer.take() {
                let _ = reply.send(Ok(target));
            }
        } else if (Instant::now() >= deadline
            || (self.raft.role() == Role::Leader && self.raft.transfer_target().is_none()))
            && let Some((_, reply, _)) = self.transfer.take()
        {
            let _ = reply.send(Err(NodeError::Timeout(format!(
                "node {target} did not take over leadership in time"
            ))));
        }
    }

    /// Publishes status now, whatever the throttle says.
    fn publish_now(&mut self) {
        self.published_key.0 = u64::MAX;
        self.publish();
    }

    /// Publishes status, events and gauges: at once when term, role, leader or membership
    /// changed, otherwise at most every [`PUBLISH_EVERY`] (rebuilding them costs more than a
    /// replicated write, and the driver turns thousands of times a second under load).
    fn publish(&mut self) {
        let leader = self.raft.leader();
        let key = (self.raft.term(), self.raft.role(), leader);
        if key == self.published_key && self.last_publish.elapsed() < PUBLISH_EVERY {
            return;
        }
        self.published_key = key;
        self.last_publish = Instant::now();
        super::logging::set_term(key.0);
        if leader != self.last_leader {
            record::leader_changed();
            tracing::info!(term = self.raft.term(), leader = ?leader, role = ?self.raft.role(), "leader changed");
            let _ = self.events.send(ClusterEvent::LeaderChanged {
                leader,
                term: self.raft.term(),
            });
            self.last_leader = leader;
        }
        let config = self.raft.config();
        let progress: BTreeMap<NodeId, PeerStatus> =
            self.raft.peers().into_iter().map(|p| (p.id, p)).collect();
        let members: Vec<MemberView> = config
            .members
            .iter()
            .map(|m| MemberView {
                member: m.clone(),
                progress: progress.get(&m.id).cloned(),
                last_contact: self.contact.get(&m.id).copied(),
                reachable: m.id == self.settings.id
                    || self.reachable.get(&m.id).copied().unwrap_or(false),
            })
            .collect();
        let status = NodeStatus {
            id: self.settings.id,
            address: self.settings.advertise.clone(),
            role: self.raft.role(),
            learner: !config.is_voter(self.settings.id),
            term: self.raft.term(),
            leader,
            commit: self.raft.commit_index(),
            applied: self.state.applied_index(),
            last_index: self.raft.last_index(),
            snapshot_index: self.snapshot_index,
            members,
        };
        record::term(status.term);
        record::commit_index(status.commit);
        record::applied_index(status.applied);
        record::lock_table(
            self.state.locks().session_count(),
            self.state.locks().lock_count(),
        );
        record::queue_topics(self.state.queues().topic_count());
        record::role(status.role);
        record::log_size(
            (status.last_index + 1).saturating_sub(self.raft.first_index()),
            self.raft.log_bytes(),
        );
        for (id, p) in &progress {
            record::peer_lag(*id, status.last_index.saturating_sub(p.matched));
        }
        self.status_tx.send_if_modified(|s| {
            if *s != status {
                *s = status;
                true
            } else {
                false
            }
        });
    }
}
