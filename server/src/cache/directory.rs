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
//! - **Chubby's rule**: a write *completes* (its writer is answered, the key's next operation
//!   starts) only once every demanded holder has acknowledged or its lease, as counted when the
//!   demand was made, has run out. Every later grant to it carries the demand.
//! - **Overlap**: a write's memory request goes out together with its invalidations, not after
//!   them. While both are under way, a holder may still serve the old value although memory
//!   holds the new one. No reader can tell: the write has not completed, and every other way to
//!   the new value is closed until it does (the key's fills queue behind it here, the writer
//!   dropped its own line, and a new directory reads memory for nobody before every lease of
//!   the old epoch has run out). So every hit is of the newest write that completed, or of one
//!   still in progress that nobody has seen.
//! - **Serialization**: one operation per key at a time, in arrival order.
//! - **Epoch rule**: a new directory grants no line, sends no write to memory and answers no
//!   fill for `L + margin` after it starts.
//! - **Write-back mode** (`CacheConfig::write_back`): an exclusive grant comes with versions
//!   reserved in memory (the fill's read or the write reserves them), so its holder can write
//!   locally. An exclusive holder may therefore be newer than memory: every fill recalls every
//!   exclusive holder (the requester too, whose line may be dirty but not servable), grant or
//!   not, and no write overlaps its invalidations. A demand's acknowledgement that carries a
//!   dirty write is written back before the operation reads or writes memory (retried until
//!   memory takes it: it may be the only copy). A holder's own WriteBack is queued like any
//!   operation, and written only while the directory records it as the exclusive holder under
//!   that grant; otherwise the writes are lost, and the holder is told so.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::lease::LeaseTable;
use super::memory::{MemOpId, MemoryError, MemoryOp, MemoryReply, MemoryRequest};
use super::message::{
    Demand, DemandKind, Dirty, Envelope, LineGrant, Mutation, ReqId, Reservation, Stamp, ToHome,
    ToNode, Write, WriteBackResult, WriteResult,
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
    /// Write-back mode: the directory went on without `node`'s exclusive line of `key` (its
    /// lease ran out as the directory counts it): any write on it not written back is lost.
    /// For metrics and the simulator; nothing to carry out.
    GaveUp {
        /// The holder.
        node: NodeId,
        /// The key.
        key: String,
    },
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
    /// Write-back mode: dirty writes handed over with an acknowledgement and written back
    /// before the operation that demanded them.
    pub dirty_written_back: u64,
    /// Write-back mode: holders' own WriteBacks written to memory.
    pub write_backs: u64,
    /// Write-back mode: WriteBacks refused because the node was no longer the holder.
    pub write_backs_refused: u64,
}

/// What an operation does.
#[derive(Clone, Debug)]
enum OpKind {
    /// A read for a miss.
    Fill,
    /// A write, and the grant of the writer's own line it dropped.
    Write { write: Write, dropped_upto: GrantId },
    /// Write-back mode: a holder writes back its dirty line.
    WriteBack { dirty: Dirty },
}

/// Where an operation's memory request is.
#[derive(Clone, Debug)]
enum MemoryPhase {
    /// Not sent yet.
    NotSent,
    /// Sent, not answered.
    InFlight,
    /// Answered while demanded holders were still waited for (a write only).
    Answered(Result<MemoryReply, MemoryError>),
    /// Write-back mode: writing back a dirty write handed over with an acknowledgement,
    /// before the operation's own request.
    WritingBack,
}

/// Where an operation is.
#[derive(Clone, Debug)]
enum Phase {
    /// Queued behind the key's active operation.
    Queued,
    /// Waiting for demanded holders (node → the deadline: its lease's end when demanded), for
    /// the new-epoch wait to be over, and for memory. A fill reads memory once its recalls are
    /// done (the grant's state depends on them); a write sends its memory request at once
    /// (the overlap in the module docs) and completes when memory and every holder answered.
    Waiting {
        waits: BTreeMap<NodeId, u64>,
        not_before: u64,
        memory: MemoryPhase,
    },
    /// Nothing left to wait for but memory's answer.
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
    /// Write-back mode: a dirty write a demanded holder handed over, to write back first.
    handed: Option<Dirty>,
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
            ToHome::DirtyAck {
                key,
                op,
                kept,
                dirty,
            } if session.is_some() => {
                self.stash(&key, from, op, dirty);
                self.settle(now, from, &key, op, kept);
            }
            ToHome::WriteBack { req, key, dirty } => {
                self.enqueue(now, key, from, req, session, OpKind::WriteBack { dirty });
            }
            ToHome::InvalidateAck { .. }
            | ToHome::RecallAck { .. }
            | ToHome::Evicted { .. }
            | ToHome::DirtyAck { .. } => {}
        }
    }

    /// Handles memory's answer to request `id`.
    pub fn on_memory(&mut self, now: u64, id: MemOpId, result: Result<MemoryReply, MemoryError>) {
        let Some(key) = self.mem_ops.remove(&id) else {
            return;
        };
        let Some(op) = self.keys.get_mut(&key).and_then(|e| e.active.as_mut()) else {
            return;
        };
        if let Phase::Waiting { memory, .. } = &mut op.phase {
            if matches!(memory, MemoryPhase::WritingBack) {
                // The handed-over write: once memory has it, the operation's own request goes;
                // if memory refused, it is tried again (it may be the only copy).
                *memory = MemoryPhase::NotSent;
                // Written, or refused for good (memory holds it or a newer version, or it is
                // outside the key's latest reservation): either way it is not tried again.
                if let Ok(reply) = result {
                    op.handed = None;
                    if reply == (MemoryReply::WrittenBack { applied: true }) {
                        self.stats.dirty_written_back += 1;
                    }
                }
                self.advance(now, &key);
                return;
            }
            // A write whose invalidations are still out: it completes when they are done.
            *memory = MemoryPhase::Answered(result);
            self.advance(now, &key);
            return;
        }
        let Some(op) = self.keys.get_mut(&key).and_then(|e| e.active.take()) else {
            return;
        };
        self.complete(now, key, op, result);
    }

    /// Answers the key's active operation `op` (taken out of its entry) with memory's `result`,
    /// and starts the key's next operation. Every demand it made is settled by now.
    fn complete(
        &mut self,
        now: u64,
        key: String,
        op: Op,
        result: Result<MemoryReply, MemoryError>,
    ) {
        let result = result.map_err(|e| match e {
            MemoryError::Unavailable(_) => CacheError::Unavailable(e.to_string()),
            MemoryError::Expired(why) => CacheError::Expired(why),
        });
        let block = self.cfg.write_back.as_ref().map_or(0, |wb| wb.block);
        let granted = |d: &mut Self, state, base: Option<u64>| {
            let live = op.session.is_some() && d.leases.live_session(op.from, now) == op.session;
            let reserved =
                base.filter(|_| LineState::is_exclusive(state))
                    .map(|base| Reservation {
                        base,
                        limit: base.saturating_add(block),
                    });
            (op.may_grant && live).then(|| d.grant(&key, op.from, state, reserved))
        };
        let (result, base) = match result {
            Ok(MemoryReply::ReadReserved(stored, base)) => {
                (Ok(MemoryReply::Read(stored)), Some(base))
            }
            Ok(MemoryReply::WrittenReserved(w, base)) => (Ok(MemoryReply::Written(w)), Some(base)),
            other => (other, None),
        };
        let reply = match (&op.kind, result) {
            (OpKind::WriteBack { .. }, Ok(MemoryReply::WrittenBack { .. })) => {
                self.stats.write_backs += 1;
                ToNode::WriteBackDone {
                    req: op.req,
                    result: WriteBackResult::Written,
                }
            }
            (OpKind::WriteBack { .. }, result) => ToNode::WriteBackDone {
                req: op.req,
                result: WriteBackResult::Failed(result.err().unwrap_or_else(mismatched_reply)),
            },
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
                    granted(self, state, base)
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
                // Every other holder has been invalidated (or its lease ran out) by now.
                let line = match (&write.mutation, result) {
                    (Mutation::Set { .. }, WriteResult::Applied { .. }) => {
                        granted(self, LineState::Modified, base)
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
                self.gave_up(&key, node);
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
        for key in self.held_by.get(&node).cloned().unwrap_or_default() {
            self.gave_up(&key, node);
        }
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
            handed: None,
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
        if let OpKind::WriteBack { dirty } = &op.kind {
            // Only the exclusive holder of that very grant, in its live session, may write
            // back: anyone else's line was given up (and a later write may be in memory).
            let holder = e
                .holders
                .get(&op.from)
                .is_some_and(|h| h.state.is_exclusive() && h.grant == dirty.grant);
            let live = op.session.is_some() && self.leases.live_session(op.from, now) == op.session;
            if !(holder && live) {
                self.stats.write_backs_refused += 1;
                let reply = ToNode::WriteBackDone {
                    req: op.req,
                    result: WriteBackResult::NotHolder,
                };
                self.send(now, op.from, reply);
                return self.start_next(now, key);
            }
        }
        let write_back = self.cfg.write_back.is_some();
        op.upto = self.last_grant;
        let in_grace = now < self.grace_until;
        op.may_grant = op.session.is_some() && !in_grace;
        // Every fill waits out the new-epoch wait too: a write of the old directory may have
        // reached memory while its invalidations were still out (the overlap), and a reader
        // answered from memory here could then see a value that a node of the old epoch, still
        // under its lease, would not serve it right after.
        let (kind, targets, not_before) = match &op.kind {
            OpKind::Fill => {
                // An uncached read needs no recall: in write-through every line equals memory.
                // In write-back mode an exclusive line may be newer than memory, so every fill
                // recalls it, the requester's own too (dirty, but not servable right now).
                let targets = if op.may_grant || write_back {
                    let from = op.from;
                    e.holders
                        .iter()
                        .filter(|&(&n, h)| (n != from || write_back) && h.state.is_exclusive())
                        .map(|(&n, _)| n)
                        .collect()
                } else {
                    Vec::new()
                };
                (DemandKind::Recall, targets, self.grace_until)
            }
            // A recorded holder: granted after the new-epoch wait, and nothing to demand.
            OpKind::WriteBack { .. } => (DemandKind::Recall, Vec::new(), 0),
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
                    self.gave_up(key, node);
                    self.apply_outcome(key, node, op.upto, kind == DemandKind::Recall);
                }
            }
        }
        op.phase = Phase::Waiting {
            waits,
            not_before,
            memory: MemoryPhase::NotSent,
        };
        if let Some(e) = self.keys.get_mut(key) {
            e.active = Some(op);
        }
        self.waiting.insert(key.to_string());
        self.advance(now, key);
    }

    /// Sends the active operation's memory request once nothing holds it back (for a write,
    /// only the new-epoch wait does), and completes a write whose memory answered once its
    /// demands are settled.
    fn advance(&mut self, now: u64, key: &str) {
        let block = self.cfg.write_back.as_ref().map(|wb| wb.block);
        let others = self.keys.get(key).map_or(0, |e| {
            let from = e.active.as_ref().map(|op| op.from);
            e.holders.keys().filter(|&&n| Some(n) != from).count()
        });
        let Some(op) = self.keys.get_mut(key).and_then(|e| e.active.as_mut()) else {
            self.waiting.remove(key);
            return;
        };
        // In write-back mode an invalidated holder may hand over a dirty write, which must
        // reach memory before this write: no overlap.
        let overlaps = matches!(op.kind, OpKind::Write { .. }) && block.is_none();
        let Phase::Waiting {
            waits,
            not_before,
            memory,
        } = &mut op.phase
        else {
            self.waiting.remove(key);
            return;
        };
        let settled = waits.is_empty();
        match memory {
            MemoryPhase::NotSent if now >= *not_before && (settled || overlaps) => {}
            MemoryPhase::Answered(_) if settled => {
                let MemoryPhase::Answered(result) =
                    std::mem::replace(memory, MemoryPhase::InFlight)
                else {
                    return;
                };
                self.waiting.remove(key);
                if let Some(op) = self.keys.get_mut(key).and_then(|e| e.active.take()) {
                    self.complete(now, key.to_string(), op, result);
                }
                return;
            }
            MemoryPhase::InFlight if settled => {
                op.phase = Phase::Memory;
                self.waiting.remove(key);
                return;
            }
            _ => return,
        }
        if let Some(d) = op.handed.clone() {
            // A handed-over dirty write first (settled: every demand is answered). Tried again
            // a millisecond after a refusal.
            *memory = MemoryPhase::WritingBack;
            *not_before = now.saturating_add(1);
            let mem = MemoryOp::WriteBack {
                key: key.to_string(),
                version: d.version,
                value: d.value,
            };
            self.send_memory(key, mem);
            return;
        }
        *memory = MemoryPhase::InFlight;
        let key_s = key.to_string();
        let mem = match (&op.kind, block) {
            // The requester will be the only holder: its E line comes with reserved versions.
            (OpKind::Fill, Some(block)) if op.may_grant && others == 0 => {
                MemoryOp::ReadReserve { key: key_s, block }
            }
            (OpKind::Fill, _) => MemoryOp::Read { key: key_s },
            (OpKind::Write { write, .. }, Some(block))
                if op.may_grant && matches!(write.mutation, Mutation::Set { .. }) =>
            {
                MemoryOp::WriteReserve {
                    key: key_s,
                    write: write.clone(),
                    block,
                }
            }
            (OpKind::Write { write, .. }, _) => MemoryOp::Write {
                key: key_s,
                write: write.clone(),
            },
            (OpKind::WriteBack { dirty }, _) => MemoryOp::WriteBack {
                key: key_s,
                version: dirty.version,
                value: dirty.value.clone(),
            },
        };
        if settled {
            op.phase = Phase::Memory;
            self.waiting.remove(key);
        }
        self.send_memory(key, mem);
    }

    /// Sends a memory request for `key`'s active operation.
    fn send_memory(&mut self, key: &str, op: MemoryOp) {
        self.last_mem += 1;
        let id = self.last_mem;
        self.mem_ops.insert(id, key.to_string());
        self.out.push(HomeEffect::Memory(MemoryRequest {
            id,
            epoch: self.epoch,
            op,
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
            OpKind::Fill | OpKind::WriteBack { .. } => DemandKind::Recall,
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
    fn grant(
        &mut self,
        key: &str,
        node: NodeId,
        state: LineState,
        reserved: Option<Reservation>,
    ) -> LineGrant {
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
        LineGrant {
            grant,
            state,
            reserved,
        }
    }

    /// Write-back mode: reports that the directory goes on without `node`'s line of `key`, if
    /// it records that line as exclusive (only such a line can be dirty).
    fn gave_up(&mut self, key: &str, node: NodeId) {
        let exclusive = self
            .keys
            .get(key)
            .and_then(|e| e.holders.get(&node))
            .is_some_and(|h| h.state.is_exclusive());
        if exclusive && self.cfg.write_back.is_some() {
            self.out.push(HomeEffect::GaveUp {
                node,
                key: key.to_string(),
            });
        }
    }

    /// A dirty write handed over by `node` with its acknowledgement of `key`'s operation `op`:
    /// kept on the operation, if it still waits for that node, to be written back first. (A
    /// late one is not: the operation went on without it, as for a holder whose lease ran out.)
    fn stash(&mut self, key: &str, node: NodeId, op: u64, dirty: Dirty) {
        let Some(active) = self.keys.get(key).and_then(|e| e.active.as_ref()) else {
            return;
        };
        let waiting =
            matches!(&active.phase, Phase::Waiting { waits, .. } if waits.contains_key(&node));
        // Only the line recorded as exclusive: an older line of the node's was given up on
        // (and a newer reservation may have been made since).
        let Some(e) = self.keys.get(key) else { return };
        let recorded = e
            .holders
            .get(&node)
            .is_some_and(|h| h.state.is_exclusive() && h.grant == dirty.grant);
        let Some(active) = self.keys.get_mut(key).and_then(|e| e.active.as_mut()) else {
            return;
        };
        if active.id == op && waiting && recorded {
            active.handed = Some(dirty);
        }
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
