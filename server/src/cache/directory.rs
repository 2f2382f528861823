//! The home side of the protocol: [`Directory`].
//!
//! The directory runs on the Raft leader, one for all keys, and its epoch is the leader's term.
//! Nothing in it assumes that, though: it is keyed by key, with one epoch and one lease table,
//! so homes placed per key by consistent hashing would be several directories, each with its
//! own epoch (see `docs/cache.md`).
//!
//! The shell calls [`Directory::on_message`] for every message from a node,
//! [`Directory::on_memory`] with every answer from memory, and [`Directory::tick`] every few
//! milliseconds; after each call it carries out [`Directory::take_effects`]: messages to nodes
//! and requests to memory. A node co-located with the directory talks to it the same way,
//! without the network.
//!
//! What the directory guarantees, and how:
//! - **Records cover lines**: whenever a node may serve a line of the current epoch, the
//!   directory records that node as a holder, at least as exclusive as the line. Holders are
//!   added only when a line is granted, and removed only on an acknowledgement, an eviction
//!   notice naming the recorded grant, a deadline (with the demand kept on the node's lease),
//!   the node's own write request naming the grant as dropped (in its live session), or the
//!   end of the node's lease.
//! - **Records are single-writer / multiple-reader**: a fill recalls every Exclusive or Modified
//!   holder before it grants, and grants Exclusive only when no other holder remains; a write
//!   invalidates every holder before it grants Modified.
//! - **Chubby's rule**: a demanded holder is waited for until it acknowledges or its lease, as
//!   counted when the demand was made, has run out. Every later grant to it carries the demand.
//! - **Serialization**: one operation per key at a time, in arrival order.
//! - **Epoch rule**: a new directory grants no line and sends no write to memory for
//!   `L + margin` after it starts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::lease::LeaseTable;
use super::memory::{MemOpId, MemoryError, MemoryOp, MemoryReply, MemoryRequest};
use super::message::{
    Demand, DemandKind, Envelope, LineGrant, Mutation, ReqId, Stamp, ToHome, ToNode, Write,
    WriteResult,
};
use super::{CacheConfig, CacheError, Epoch, GrantId, LineState, NodeId, Session};

/// What the shell must do after a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HomeEffect {
    /// Send `msg` to node `to`.
    ToNode {
        /// The recipient.
        to: NodeId,
        /// The message.
        msg: Envelope<ToNode>,
    },
    /// Run a memory operation and answer it with [`Directory::on_memory`].
    Memory(MemoryRequest),
}

/// One holder of a key, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// At least as exclusive as the line the node may serve.
    pub state: LineState,
    /// The grant of the latest line handed to the node for the key.
    pub grant: GrantId,
}

/// Counters for the Stats call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectoryStats {
    /// Invalidations sent (not counting repeats on grants).
    pub invalidations_sent: u64,
    /// Recalls sent.
    pub recalls_sent: u64,
    /// Demands settled by the holder's lease running out rather than by an acknowledgement.
    pub lease_waits: u64,
    /// Lines granted.
    pub grants: u64,
    /// Leases granted or renewed.
    pub lease_grants: u64,
    /// Nodes forgotten because their lease ran out.
    pub sessions_ended: u64,
}

/// What an operation does.
#[derive(Clone, Debug)]
enum OpKind {
    /// A read for a miss.
    Fill,
    /// A write, and the grant of the writer's own line it dropped.
    Write { write: Write, dropped_upto: GrantId },
}

/// Where an operation is.
#[derive(Clone, Debug)]
enum Phase {
    /// Queued behind the key's active operation.
    Queued,
    /// Waiting for demanded holders (node → the deadline: its lease's end when demanded) and,
    /// for a write, for the new-epoch wait to be over.
    Waiting {
        waits: BTreeMap<NodeId, u64>,
        not_before: u64,
    },
    /// The memory request is out.
    Memory,
}

/// A fill or write of one key.
#[derive(Clone, Debug)]
struct Op {
    /// Names the operation in demands and acknowledgements.
    id: u64,
    /// The requesting node.
    from: NodeId,
    /// Its request id, echoed.
    req: ReqId,
    /// The requester's session, if the request carried its live session in this epoch: only
    /// then may a line be granted, and only if that session is still live at the end.
    session: Option<Session>,
    /// Fill or write.
    kind: OpKind,
    /// Decided at start: a line may be granted (for a fill, the recalls were made for it).
    may_grant: bool,
    /// Highest grant its demands cover (every grant made before it started).
    upto: GrantId,
    /// Where it is.
    phase: Phase,
}

/// The directory's state for one key.
#[derive(Clone, Debug, Default)]
struct KeyEntry {
    /// Nodes recorded as holding a line.
    holders: BTreeMap<NodeId, Holder>,
    /// The operation in progress.
    active: Option<Op>,
    /// Operations waiting their turn.
    queue: VecDeque<Op>,
}

/// The home: holders per key, leases per node, and the per-key serialization of operations.
#[derive(Clone, Debug)]
pub struct Directory {
    /// Settings.
    cfg: CacheConfig,
    /// This directory's epoch (the Raft leader's term).
    epoch: Epoch,
    /// Until this time (directory clock) no line is granted and no write sent to memory: every
    /// lease granted in an earlier epoch has run out by then.
    grace_until: u64,
    /// Leases and owed demands per node.
    leases: LeaseTable,
    /// Per key: holders and operations. An entry with neither is removed.
    keys: BTreeMap<String, KeyEntry>,
    /// Keys each node is recorded as holding, to forget a node without scanning every key.
    held_by: BTreeMap<NodeId, BTreeSet<String>>,
    /// Keys whose active operation is in [`Phase::Waiting`] (deadlines checked on tick).
    waiting: BTreeSet<String>,
    /// Memory requests in flight, with their key.
    mem_ops: BTreeMap<MemOpId, String>,
    /// Last grant number given out.
    last_grant: GrantId,
    /// Last operation id given out.
    last_op: u64,
    /// Last memory request id given out.
    last_mem: MemOpId,
    /// Effects not yet taken.
    out: Vec<HomeEffect>,
    /// Counters.
    stats: DirectoryStats,
}

impl Directory {
    /// A directory for `epoch` (the leader's term), started at `now` on its clock. It holds no
    /// records; every node must renew its lease with it.
    pub fn new(cfg: CacheConfig, epoch: Epoch, now: u64) -> Self {
        Directory {
            grace_until: now.saturating_add(cfg.directory_lease_ms()),
            leases: LeaseTable::new(cfg.directory_lease_ms()),
            cfg,
            epoch,
            keys: BTreeMap::new(),
            held_by: BTreeMap::new(),
            waiting: BTreeSet::new(),
            mem_ops: BTreeMap::new(),
            last_grant: 0,
            last_op: 0,
            last_mem: 0,
            out: Vec::new(),
            stats: DirectoryStats::default(),
        }
    }

    /// This directory's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The effects produced since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<HomeEffect> {
        std::mem::take(&mut self.out)
    }

    /// Counters.
    pub fn stats(&self) -> DirectoryStats {
        self.stats
    }

    /// The recorded holders of `key`, in node order (the State call).
    pub fn holders(&self, key: &str) -> impl Iterator<Item = (NodeId, Holder)> + Clone + '_ {
        self.keys
            .get(key)
            .into_iter()
            .flat_map(|e| e.holders.iter().map(|(&n, &h)| (n, h)))
    }

    /// `node`'s session if its lease is live at `now`.
    pub fn session_of(&self, node: NodeId, now: u64) -> Option<Session> {
        self.leases.live_session(node, now)
    }

    /// Handles a message from node `from`.
    pub fn on_message(&mut self, now: u64, from: NodeId, env: Envelope<ToHome>) {
        // A node that knows a newer epoch is talking to its new directory; this one is stale.
        if env.stamp.epoch > self.epoch {
            return;
        }
        let session = self
            .leases
            .live_session(from, now)
            .filter(|&s| env.stamp == Stamp::new(self.epoch, s));
        match env.msg {
            ToHome::LeaseRenew { sent_at } => self.renew(now, from, sent_at),
            ToHome::FillRequest { req, key } => {
                self.enqueue(now, key, from, req, session, OpKind::Fill);
            }
            ToHome::WriteRequest {
                req,
                key,
                write,
                dropped_upto,
            } => {
                let kind = OpKind::Write {
                    write,
                    dropped_upto,
                };
                self.enqueue(now, key, from, req, session, kind);
            }
            // Answers from another session concern lines forgotten with it.
            ToHome::InvalidateAck { key, op } if session.is_some() => {
                self.settle(now, from, &key, op, false);
            }
            ToHome::RecallAck { key, op, kept } if session.is_some() => {
                self.settle(now, from, &key, op, kept);
            }
            ToHome::Evicted { key, grant } if session.is_some() => {
                self.on_evicted(now, from, &key, grant);
            }
            ToHome::InvalidateAck { .. } | ToHome::RecallAck { .. } | ToHome::Evicted { .. } => {}
        }
    }

    /// Handles memory's answer to request `id`.
    pub fn on_memory(&mut self, now: u64, id: MemOpId, result: Result<MemoryReply, MemoryError>) {
        let Some(key) = self.mem_ops.remove(&id) else {
            return;
        };
        let Some(op) = self.keys.get_mut(&key).and_then(|e| e.active.take()) else {
            return;
        };
        let result = result.map_err(|e| match e {
            MemoryError::Unavailable(_) => CacheError::Unavailable(e.to_string()),
            MemoryError::Expired(why) => CacheError::Expired(why),
        });
        let granted = |d: &mut Self, state| {
            let live = op.session.is_some() && d.leases.live_session(op.from, now) == op.session;
            (op.may_grant && live).then(|| d.grant(&key, op.from, state))
        };
        let reply = match (&op.kind, result) {
            (OpKind::Fill, Ok(MemoryReply::Read(stored))) => {
                // Every exclusive holder was recalled before the read: any other holder is
                // Shared, so the requester shares, or has the key to itself.
                let others = self
                    .keys
                    .get(&key)
                    .map_or(0, |e| e.holders.keys().filter(|&&n| n != op.from).count());
                let state = if others == 0 {
                    LineState::Exclusive
                } else {
                    LineState::Shared
                };
                let line = if stored.value.is_some() {
                    granted(self, state)
                } else {
                    None
                };
                ToNode::FillReply {
                    req: op.req,
                    result: Ok(stored),
                    line,
                }
            }
            (OpKind::Write { write, .. }, Ok(MemoryReply::Written(result))) => {
                // Every other holder was invalidated before memory was written.
                let line = match (&write.mutation, result) {
                    (Mutation::Set { .. }, WriteResult::Applied { .. }) => {
                        granted(self, LineState::Modified)
                    }
                    _ => None,
                };
                ToNode::WriteDone {
                    req: op.req,
                    result: Ok(result),
                    line,
                }
            }
            // A retry of a write memory had applied: every other holder was invalidated, as
            // for any write, but the writer gets no line. The write's value may have been
            // overwritten since its first application, and its result names that first
            // version, so a line of it could be stale.
            (OpKind::Write { .. }, Ok(MemoryReply::Duplicate(result))) => ToNode::WriteDone {
                req: op.req,
                result: Ok(result),
                line: None,
            },
            (OpKind::Fill, result) => ToNode::FillReply {
                req: op.req,
                result: result.and_then(|_| Err(mismatched_reply())),
                line: None,
            },
            (OpKind::Write { .. }, result) => ToNode::WriteDone {
                req: op.req,
                result: result.and_then(|_| Err(mismatched_reply())),
                line: None,
            },
        };
        self.send(now, op.from, reply);
        self.start_next(now, &key);
    }

    /// Advances time: forgets nodes whose lease ran out, settles demands whose deadline passed,
    /// and starts what was waiting for either or for the new-epoch wait.
    pub fn tick(&mut self, now: u64) {
        for node in self.leases.expired(now) {
            self.forget(now, node);
        }
        let keys: Vec<String> = self.waiting.iter().cloned().collect();
        for key in keys {
            let due: Vec<NodeId> = match self.active_phase(&key) {
                Some(Phase::Waiting { waits, .. }) => waits
                    .iter()
                    .filter(|&(_, &deadline)| now >= deadline)
                    .map(|(&n, _)| n)
                    .collect(),
                _ => Vec::new(),
            };
            for node in due {
                // The holder's lease, as counted when the demand was made, is over: it serves
                // nothing now, and any lease it gets later comes with the demand.
                self.stats.lease_waits += 1;
                if let Some((upto, kind)) = self.stop_waiting(&key, node, None) {
                    self.apply_outcome(&key, node, upto, kind == DemandKind::Recall);
                }
            }
            self.advance(now, &key);
        }
    }

    // ----- leases ----------------------------------------------------------------------------

    fn renew(&mut self, now: u64, node: NodeId, sent_at: u64) {
        let r = self.leases.renew(node, now);
        if r.forgot_expired {
            self.forget_records(now, node);
        }
        self.stats.lease_grants += 1;
        let demands = self.leases.demands(node);
        self.send(
            now,
            node,
            ToNode::LeaseGrant {
                sent_at,
                lease_ms: self.cfg.lease_ms,
                demands,
            },
        );
    }

    /// `node`'s lease has run out: it serves nothing, so its records and demands go, and
    /// operations stop waiting for it. Its next grant starts a new session, in which it drops
    /// every line before serving.
    fn forget(&mut self, now: u64, node: NodeId) {
        self.stats.sessions_ended += 1;
        self.leases.forget(node);
        self.forget_records(now, node);
    }

    fn forget_records(&mut self, now: u64, node: NodeId) {
        for key in self.held_by.remove(&node).unwrap_or_default() {
            if let Some(e) = self.keys.get_mut(&key) {
                e.holders.remove(&node);
            }
            self.remove_if_idle(&key);
        }
        let keys: Vec<String> = self.waiting.iter().cloned().collect();
        for key in keys {
            if let Some(Phase::Waiting { waits, .. }) = self.active_phase_mut(&key) {
                waits.remove(&node);
            }
            self.advance(now, &key);
        }
    }

    // ----- operations ------------------------------------------------------------------------

    fn enqueue(
        &mut self,
        now: u64,
        key: String,
        from: NodeId,
        req: ReqId,
        session: Option<Session>,
        kind: OpKind,
    ) {
        self.last_op += 1;
        let op = Op {
            id: self.last_op,
            from,
            req,
            session,
            kind,
            may_grant: false,
            upto: 0,
            phase: Phase::Queued,
        };
        self.keys
            .entry(key.clone())
            .or_default()
            .queue
            .push_back(op);
        self.start_next(now, &key);
    }

    /// Starts the key's next queued operation if none is active; removes an idle, empty entry.
    fn start_next(&mut self, now: u64, key: &str) {
        let Some(e) = self.keys.get_mut(key) else {
            return;
        };
        if e.active.is_some() {
            return;
        }
        let Some(mut op) = e.queue.pop_front() else {
            self.remove_if_idle(key);
            return;
        };
        op.upto = self.last_grant;
        let in_grace = now < self.grace_until;
        op.may_grant = op.session.is_some() && !in_grace;
        let (kind, targets, not_before) = match &op.kind {
            OpKind::Fill => {
                // An uncached read needs no recall: in write-through every line equals memory.
                let targets = if op.may_grant {
                    let from = op.from;
                    e.holders
                        .iter()
                        .filter(|&(&n, h)| n != from && h.state.is_exclusive())
                        .map(|(&n, _)| n)
                        .collect()
                } else {
                    Vec::new()
                };
                (DemandKind::Recall, targets, 0)
            }
            OpKind::Write { dropped_upto, .. } => {
                // The writer dropped its line when it began; a line granted to it since (seen
                // only with a delayed request) is invalidated like anyone's. Grant numbers mean
                // something only within this directory: a request stamped with another epoch
                // (or no live session) gets its writer's record invalidated too.
                let own_dropped = op.session.is_some()
                    && e.holders
                        .get(&op.from)
                        .is_some_and(|h| h.grant <= *dropped_upto);
                if own_dropped {
                    e.holders.remove(&op.from);
                    if let Some(keys) = self.held_by.get_mut(&op.from) {
                        keys.remove(key);
                    }
                }
                let targets = e.holders.keys().copied().collect();
                (DemandKind::Invalidate, targets, self.grace_until)
            }
        };
        let mut waits = BTreeMap::new();
        for node in targets {
            let demand = Demand {
                key: key.to_string(),
                op: op.id,
                upto: op.upto,
                kind,
            };
            match (
                self.leases.expires_at(node),
                self.leases.add_demand(node, demand),
            ) {
                (Some(deadline), Some(merged)) if now < deadline => {
                    waits.insert(node, deadline);
                    match kind {
                        DemandKind::Invalidate => self.stats.invalidations_sent += 1,
                        DemandKind::Recall => self.stats.recalls_sent += 1,
                    }
                    self.send(now, node, ToNode::Demand(merged));
                }
                // No live lease: the holder serves nothing; it is forgotten on the next tick.
                _ => {
                    self.apply_outcome(key, node, op.upto, kind == DemandKind::Recall);
                }
            }
        }
        op.phase = Phase::Waiting { waits, not_before };
        if let Some(e) = self.keys.get_mut(key) {
            e.active = Some(op);
        }
        self.waiting.insert(key.to_string());
        self.advance(now, key);
    }

    /// Sends the active operation's memory request once nothing holds it back.
    fn advance(&mut self, now: u64, key: &str) {
        let Some(op) = self.keys.get(key).and_then(|e| e.active.as_ref()) else {
            self.waiting.remove(key);
            return;
        };
        let Phase::Waiting { waits, not_before } = &op.phase else {
            self.waiting.remove(key);
            return;
        };
        if !waits.is_empty() || now < *not_before {
            return;
        }
        let mem = match &op.kind {
            OpKind::Fill => MemoryOp::Read {
                key: key.to_string(),
            },
            OpKind::Write { write, .. } => MemoryOp::Write {
                key: key.to_string(),
                write: write.clone(),
            },
        };
        self.last_mem += 1;
        let id = self.last_mem;
        self.mem_ops.insert(id, key.to_string());
        self.waiting.remove(key);
        if let Some(op) = self.keys.get_mut(key).and_then(|e| e.active.as_mut()) {
            op.phase = Phase::Memory;
        }
        self.out.push(HomeEffect::Memory(MemoryRequest {
            id,
            epoch: self.epoch,
            op: mem,
        }));
    }

    /// An acknowledgement from `node` for operation `op` on `key`: `kept` if it kept a Shared
    /// line (a recall), otherwise it holds nothing the demand covered.
    fn settle(&mut self, now: u64, node: NodeId, key: &str, op: u64, kept: bool) {
        let demand = self.leases.settle_demand(node, key, op);
        if let Some((upto, _)) = self.stop_waiting(key, node, Some(op)) {
            self.apply_outcome(key, node, upto, kept);
            self.advance(now, key);
        } else if let Some(d) = demand {
            // A late answer to a finished operation: its deadline already updated the record,
            // unless a newer grant replaced it, which the bound protects.
            self.apply_outcome(key, node, d.upto, kept);
        }
    }

    /// Stops waiting for `node` in `key`'s active operation (only if it is operation `op`, when
    /// given). Returns the operation's grant bound and demand kind if it was waiting.
    fn stop_waiting(
        &mut self,
        key: &str,
        node: NodeId,
        op: Option<u64>,
    ) -> Option<(GrantId, DemandKind)> {
        let active = self.keys.get_mut(key)?.active.as_mut()?;
        if op.is_some_and(|id| id != active.id) {
            return None;
        }
        let Phase::Waiting { waits, .. } = &mut active.phase else {
            return None;
        };
        waits.remove(&node)?;
        let kind = match active.kind {
            OpKind::Fill => DemandKind::Recall,
            OpKind::Write { .. } => DemandKind::Invalidate,
        };
        Some((active.upto, kind))
    }

    /// Updates `node`'s record of `key` after a demand covering grants up to `upto` took
    /// effect: downgraded to Shared if `kept`, otherwise gone. A record of a later grant is
    /// left alone: that line came after the demand.
    fn apply_outcome(&mut self, key: &str, node: NodeId, upto: GrantId, kept: bool) {
        let Some(e) = self.keys.get_mut(key) else {
            return;
        };
        let Some(h) = e.holders.get_mut(&node) else {
            return;
        };
        if h.grant > upto {
            return;
        }
        if kept {
            h.state = h.state.min(LineState::Shared);
        } else {
            e.holders.remove(&node);
            if let Some(keys) = self.held_by.get_mut(&node) {
                keys.remove(key);
            }
            self.remove_if_idle(key);
        }
    }

    /// Removes `key`'s entry if it records nothing and has nothing to do.
    fn remove_if_idle(&mut self, key: &str) {
        if self
            .keys
            .get(key)
            .is_some_and(|e| e.holders.is_empty() && e.active.is_none() && e.queue.is_empty())
        {
            self.keys.remove(key);
        }
    }

    /// `node` dropped its line of `key` granted as `grant`. Only a notice for the recorded
    /// grant removes the record: any other reply the node had in flight for the key was granted
    /// earlier, and the node refuses those once it has seen a later grant.
    fn on_evicted(&mut self, now: u64, node: NodeId, key: &str, grant: GrantId) {
        let recorded = self
            .keys
            .get(key)
            .and_then(|e| e.holders.get(&node))
            .is_some_and(|h| h.grant == grant);
        if !recorded {
            return;
        }
        self.apply_outcome(key, node, grant, false);
        if self.stop_waiting(key, node, None).is_some() {
            self.advance(now, key);
        }
    }

    /// Records `node` as holding `key` in `state` under a new grant.
    fn grant(&mut self, key: &str, node: NodeId, state: LineState) -> LineGrant {
        self.last_grant += 1;
        self.stats.grants += 1;
        let grant = self.last_grant;
        self.keys
            .entry(key.to_string())
            .or_default()
            .holders
            .insert(node, Holder { state, grant });
        self.held_by
            .entry(node)
            .or_default()
            .insert(key.to_string());
        LineGrant { grant, state }
    }

    fn send(&mut self, now: u64, to: NodeId, msg: ToNode) {
        let session = self.leases.live_session(to, now).unwrap_or(0);
        self.out.push(HomeEffect::ToNode {
            to,
            msg: Envelope {
                stamp: Stamp::new(self.epoch, session),
                msg,
            },
        });
    }

    fn active_phase(&self, key: &str) -> Option<&Phase> {
        self.keys
            .get(key)
            .and_then(|e| e.active.as_ref())
            .map(|op| &op.phase)
    }

    fn active_phase_mut(&mut self, key: &str) -> Option<&mut Phase> {
        self.keys
            .get_mut(key)
            .and_then(|e| e.active.as_mut())
            .map(|op| &mut op.phase)
    }
}

/// Memory answered a read with a write's result or the reverse: a bug in the shell, reported to
/// the client rather than trusted.
fn mismatched_reply() -> CacheError {
    CacheError::Unavailable("memory answered with the wrong kind of result".into())
}
