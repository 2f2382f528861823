//! The node side of the protocol: [`CacheNode`].
//!
//! The shell calls [`CacheNode::get`] and [`CacheNode::write`] for clients,
//! [`CacheNode::on_message`] for every message from the directory, and [`CacheNode::tick`]
//! every few milliseconds; after each call it carries out [`CacheNode::take_effects`]: messages
//! to send to the directory (the current Raft leader), answers to clients, and invalidation
//! events for Subscribe streams. A Get that hits is answered at once by `get` itself.
//!
//! What the node guarantees, and how:
//! - **Hit rule**: a line is served only under the node's current, valid lease ([`Lines::get`]).
//! - **Race rule**: a reply installs a line only if it belongs to the current lease, no demand
//!   covering its grant arrived while it was in flight (the request is "poisoned" up to that
//!   grant), and no newer reply for the key arrived first. A poisoned reply still answers the
//!   client that asked: its value was read from memory while that client waited, which is a
//!   linearizable answer, but it is not cached, because a write may complete right after.
//! - **Writes**: a node drops its own line of the key when it starts a write and tells the
//!   directory which grant it dropped; the directory invalidates any newer line it recorded for
//!   the writer (a fill still in flight) like anyone's. So a write that fails leaves no line
//!   with either value.
//! - **Acknowledgements** promise the node holds nothing the demand covers, in-flight replies
//!   included; that is what lets the directory complete a write on them.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::lease::{GrantEffect, NodeLease};
use super::line::{Dropped, Line, Lines};
use super::message::{
    Demand, DemandKind, Envelope, LineGrant, Mutation, ReqId, Stamp, ToHome, ToNode, Write,
    WriteResult,
};
use super::{CacheConfig, CacheError, Epoch, GrantId, LineState, NodeId, OpId, Stored, Version};

/// The answer to a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    /// The value, its version and TTL.
    pub stored: Stored,
    /// True if served from a valid local line.
    pub hit: bool,
    /// This node's line for the key after the read.
    pub state: LineState,
}

/// What a finished client operation returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A Get.
    Read(Read),
    /// A Set, Delete or CompareAndSet.
    Write(WriteResult),
}

/// The immediate outcome of [`CacheNode::get`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Served from a valid line.
    Hit(Read),
    /// A miss: a fill was sent; the answer comes later as [`NodeEffect::Done`].
    Pending,
}

/// Why a line stopped being served, for near caches (Subscribe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidationReason {
    /// Someone wrote or deleted the key (the node cannot tell which from the directory's
    /// demand; a Delete on this node reports `Deleted`).
    Written,
    /// This node deleted the key.
    Deleted,
    /// The TTL ran out.
    Expired,
    /// Evicted to make room.
    Evicted,
    /// The lease ran out, or a new session or epoch began.
    LeaseExpired,
}

/// A line that stopped being served. `version` is the line's: a near cache drops the key unless
/// it holds a greater version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidationEvent {
    /// The key.
    pub key: String,
    /// The version of the line that stopped being served.
    pub version: Version,
    /// Why.
    pub reason: InvalidationReason,
}

/// What the shell must do after a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEffect {
    /// Send to the directory (the current Raft leader).
    ToHome(Envelope<ToHome>),
    /// Answer client operation `op`.
    Done {
        /// The operation.
        op: OpId,
        /// Its outcome.
        result: Result<Answer, CacheError>,
    },
    /// Publish to Subscribe streams.
    Invalidated(InvalidationEvent),
}

/// Counters for the Stats call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Reads served from a valid line.
    pub hits: u64,
    /// Reads that needed a fill.
    pub misses: u64,
    /// Fill or write replies not cached (raced a demand, another lease, or no room).
    pub replies_not_cached: u64,
    /// Invalidations received (directly or with a grant).
    pub invalidations_received: u64,
    /// Recalls received.
    pub recalls_received: u64,
    /// Lines evicted for room.
    pub evictions: u64,
    /// Lines whose TTL ran out.
    pub expirations: u64,
    /// Times the lease ran out before it was renewed.
    pub lease_lapses: u64,
}

/// This node's line for a key, for the State call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineView {
    /// The state as served now (Invalid if not servable).
    pub state: LineState,
    /// The version if servable, else 0.
    pub version: Version,
    /// Milliseconds of lease left.
    pub lease_remaining_ms: u64,
}

/// A fill or write waiting for the directory's answer.
#[derive(Clone, Debug)]
struct Pending {
    /// The client operation it answers.
    op: OpId,
    /// The key.
    key: String,
    /// This node's clock when sent: TTLs and timeouts count from here.
    sent_at: u64,
    /// A reply with a grant up to this must not install a line (see the race rule).
    poisoned_upto: GrantId,
    /// For a Set: the value and TTL to install as Modified on success.
    installs: Option<(Bytes, Option<u64>)>,
    /// Fill or write (decides the timeout's error).
    is_write: bool,
}

/// The node side of the coherence protocol.
#[derive(Clone, Debug)]
pub struct CacheNode {
    /// This node.
    id: NodeId,
    /// Settings.
    cfg: CacheConfig,
    /// Distinguishes this run's request ids from those of earlier runs.
    incarnation: u64,
    /// The last request sequence number used.
    last_seq: u64,
    /// The lease.
    lease: NodeLease,
    /// The lines.
    lines: Lines,
    /// Requests waiting for an answer.
    pending: BTreeMap<ReqId, Pending>,
    /// Effects not yet taken by the shell.
    out: Vec<NodeEffect>,
    /// Counters.
    stats: NodeStats,
}

impl CacheNode {
    /// A node with no lines and no lease. `incarnation` must differ on every start of the same
    /// node (e.g. its boot time in microseconds), so that replies meant for an earlier run are
    /// never matched to this one's requests.
    pub fn new(id: NodeId, cfg: CacheConfig, incarnation: u64) -> Self {
        CacheNode {
            id,
            lines: Lines::new(cfg.capacity_bytes),
            cfg,
            incarnation,
            last_seq: 0,
            lease: NodeLease::default(),
            pending: BTreeMap::new(),
            out: Vec::new(),
            stats: NodeStats::default(),
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The effects produced since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<NodeEffect> {
        std::mem::take(&mut self.out)
    }

    /// Reads `key`: a hit if a valid line is held, otherwise a fill is sent and the answer
    /// comes as [`NodeEffect::Done`] for `op`.
    pub fn get(&mut self, now: u64, op: OpId, key: &str) -> Result<Lookup, CacheError> {
        self.cfg.validate_entry(key, None)?;
        if let Some(line) = self.lines.get(now, key, &self.lease) {
            let read = Read {
                stored: Stored {
                    version: line.version,
                    value: Some(line.value.clone()),
                    ttl_left_ms: line.expires_at.map(|t| t.saturating_sub(now)),
                },
                hit: true,
                state: line.state,
            };
            self.stats.hits += 1;
            return Ok(Lookup::Hit(read));
        }
        self.stats.misses += 1;
        let req = self.track(now, op, key, None, false);
        self.send(ToHome::FillRequest {
            req,
            key: key.to_string(),
        });
        Ok(Lookup::Pending)
    }

    /// Writes `key` (Set, Delete or CompareAndSet) through the directory; the answer comes as
    /// [`NodeEffect::Done`] for `op`. The node's own line is dropped at once: until the write
    /// completes, reads here miss and queue behind it at the directory. (The request names the
    /// dropped line's grant, and the directory spares only that line its invalidation: if the
    /// node kept it, a write whose answer was lost would leave it serving the old value.)
    pub fn write(&mut self, now: u64, op: OpId, key: &str, write: Write) -> Result<(), CacheError> {
        let installs = match &write.mutation {
            Mutation::Set { value, ttl_ms } => Some((value.clone(), *ttl_ms)),
            Mutation::Delete => None,
        };
        self.cfg
            .validate_entry(key, installs.as_ref().map(|(v, _)| v))?;
        let reason = match write.mutation {
            Mutation::Set { .. } => InvalidationReason::Written,
            Mutation::Delete => InvalidationReason::Deleted,
        };
        let dropped_upto = self
            .lines
            .remove(key)
            .map(|d| {
                let grant = d.line.grant;
                self.report(d, reason);
                grant
            })
            .unwrap_or(0);
        let req = self.track(now, op, key, installs, true);
        self.send(ToHome::WriteRequest {
            req,
            key: key.to_string(),
            write,
            dropped_upto,
        });
        Ok(())
    }

    /// A directory of `epoch` exists (a new Raft leader of that term): every line of an older
    /// epoch is dropped, and a lease is asked of the new directory. Called for every message,
    /// and by the shell as soon as Raft reports a new leader, so that lines of a deposed
    /// directory go before its leases would run out anyway.
    pub fn on_new_epoch(&mut self, now: u64, epoch: Epoch) {
        if self.lease.observe_epoch(epoch, now) {
            self.drop_all(InvalidationReason::LeaseExpired);
            self.renew(now);
        }
    }

    /// Handles a message from the directory.
    pub fn on_message(&mut self, now: u64, env: Envelope<ToNode>) {
        self.on_new_epoch(now, env.stamp.epoch);
        let current = env.stamp == self.lease.stamp();
        match env.msg {
            ToNode::LeaseGrant {
                sent_at,
                lease_ms,
                demands,
            } => self.on_grant(env.stamp, sent_at, lease_ms, demands),
            ToNode::FillReply { req, result, line } => {
                let Some(p) = self.pending.remove(&req) else {
                    return;
                };
                let install = result.as_ref().ok().and_then(|s| {
                    let value = s.value.clone()?;
                    Some((value, s.version, s.ttl_left_ms))
                });
                let state = self.settle(&p, line, current, install);
                let answer = result.map(|stored| {
                    Answer::Read(Read {
                        stored,
                        hit: false,
                        state,
                    })
                });
                self.done(p.op, answer);
            }
            ToNode::WriteDone { req, result, line } => {
                let Some(p) = self.pending.remove(&req) else {
                    return;
                };
                let install = match (&result, &p.installs) {
                    (Ok(WriteResult::Applied { version, .. }), Some((value, ttl))) => {
                        Some((value.clone(), *version, *ttl))
                    }
                    _ => None,
                };
                self.settle(&p, line, current, install);
                self.done(p.op, result.map(Answer::Write));
            }
            ToNode::Demand(d) => {
                // A demand of another session concerns lines this node no longer has (it
                // dropped them on changing session), and nobody waits for its answer.
                if current {
                    self.apply_demand(d);
                }
            }
        }
    }

    /// Advances time: renews the lease when due, reports a lapsed lease, expires TTLs, and fails
    /// requests that have waited longer than the timeout.
    pub fn tick(&mut self, now: u64) {
        if self.lease.take_lapse(now) {
            self.stats.lease_lapses += 1;
            let events: Vec<InvalidationEvent> = self
                .lines
                .iter()
                .map(|(k, l)| InvalidationEvent {
                    key: k.clone(),
                    version: l.version,
                    reason: InvalidationReason::LeaseExpired,
                })
                .collect();
            self.out
                .extend(events.into_iter().map(NodeEffect::Invalidated));
        }
        if self.lease.renewal_due(now, self.cfg.renew_every_ms) {
            self.renew(now);
        }
        for d in self.lines.take_expired(now) {
            self.stats.expirations += 1;
            self.notify_dropped(d, InvalidationReason::Expired);
        }
        let timeout = self.cfg.op_timeout_ms;
        let late: Vec<ReqId> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.sent_at) >= timeout)
            .map(|(&r, _)| r)
            .collect();
        for req in late {
            if let Some(p) = self.pending.remove(&req) {
                let err = if p.is_write {
                    CacheError::Timeout(format!(
                        "no answer from the cache directory within {timeout} ms; the write may or may not have happened"
                    ))
                } else {
                    CacheError::Unavailable(format!(
                        "no answer from the cache directory within {timeout} ms"
                    ))
                };
                self.done(p.op, Err(err));
            }
        }
    }

    /// The line for `key` if it would be served as a hit at `now` (changes nothing).
    pub fn servable(&self, now: u64, key: &str) -> Option<&Line> {
        self.lines.servable(now, key, &self.lease)
    }

    /// This node's view of `key`, for the State call.
    pub fn line_view(&self, now: u64, key: &str) -> LineView {
        let line = self.servable(now, key);
        LineView {
            state: line.map_or(LineState::Invalid, |l| l.state),
            version: line.map_or(0, |l| l.version),
            lease_remaining_ms: self.lease.remaining(now),
        }
    }

    /// The lease's stamp (epoch and session).
    pub fn stamp(&self) -> Stamp {
        self.lease.stamp()
    }

    /// Counters, plus the bytes and number of lines held now.
    pub fn stats(&self) -> (NodeStats, u64, usize) {
        (self.stats, self.lines.bytes(), self.lines.len())
    }

    // ----- internals -------------------------------------------------------------------------

    fn send(&mut self, msg: ToHome) {
        self.out.push(NodeEffect::ToHome(Envelope {
            stamp: self.lease.stamp(),
            msg,
        }));
    }

    fn done(&mut self, op: OpId, result: Result<Answer, CacheError>) {
        self.out.push(NodeEffect::Done { op, result });
    }

    fn renew(&mut self, now: u64) {
        self.send(ToHome::LeaseRenew { sent_at: now });
    }

    /// Registers a request and returns its id.
    fn track(
        &mut self,
        now: u64,
        op: OpId,
        key: &str,
        installs: Option<(Bytes, Option<u64>)>,
        is_write: bool,
    ) -> ReqId {
        self.last_seq += 1;
        let req = ReqId {
            incarnation: self.incarnation,
            seq: self.last_seq,
        };
        self.pending.insert(
            req,
            Pending {
                op,
                key: key.to_string(),
                sent_at: now,
                poisoned_upto: 0,
                installs,
                is_write,
            },
        );
        req
    }

    /// No reply for `key` with a grant up to `upto` may install a line any more.
    fn poison(&mut self, key: &str, upto: GrantId) {
        for p in self.pending.values_mut().filter(|p| p.key == key) {
            p.poisoned_upto = p.poisoned_upto.max(upto);
        }
    }

    /// Installs the line a reply grants, if the race rule allows, and tells the directory if it
    /// does not (so it can drop its record). Returns the line's state after the reply.
    fn settle(
        &mut self,
        p: &Pending,
        grant: Option<LineGrant>,
        current: bool,
        install: Option<(Bytes, Version, Option<u64>)>,
    ) -> LineState {
        // A line granted under another lease belongs to a session the directory has forgotten
        // (it starts a new session only after the old one's lease ran out).
        let Some(g) = grant.filter(|_| current) else {
            return self.state_of(&p.key);
        };
        // Replies of this key granted earlier are older than this one: they may not install.
        self.poison(&p.key, g.grant);
        if self.lines.peek(&p.key).is_some_and(|l| l.grant >= g.grant) {
            // A newer reply arrived first; the directory's record names it or a later grant.
            self.stats.replies_not_cached += 1;
            return self.state_of(&p.key);
        }
        let Some((value, version, ttl)) = install.filter(|_| g.grant > p.poisoned_upto) else {
            self.stats.replies_not_cached += 1;
            self.decline(&p.key, g.grant);
            return LineState::Invalid;
        };
        let expires_at = ttl.map(|t| p.sent_at.saturating_add(t));
        let line = Line::new(
            g.state,
            value,
            version,
            self.lease.stamp(),
            g.grant,
            expires_at,
        );
        let mut state = g.state;
        for d in self.lines.insert(&p.key, line) {
            if d.key == p.key {
                // Too large for this node's capacity: not cached after all.
                self.stats.replies_not_cached += 1;
                self.decline(&p.key, g.grant);
                state = LineState::Invalid;
            } else {
                self.stats.evictions += 1;
                self.notify_dropped(d, InvalidationReason::Evicted);
            }
        }
        state
    }

    /// The state of this node's line for `key`, served or not.
    fn state_of(&self, key: &str) -> LineState {
        self.lines.peek(key).map_or(LineState::Invalid, |l| l.state)
    }

    /// The node will not hold the line granted as `grant`: it drops any older line of the key
    /// too (the directory's record now names `grant`, so an older line would be unrecorded once
    /// the directory acts on the notice), and tells the directory.
    fn decline(&mut self, key: &str, grant: GrantId) {
        if let Some(old) = self.lines.remove(key) {
            self.report(old, InvalidationReason::Evicted);
        }
        self.send(ToHome::Evicted {
            key: key.to_string(),
            grant,
        });
    }

    fn on_grant(&mut self, stamp: Stamp, sent_at: u64, lease_ms: u64, demands: Vec<Demand>) {
        match self.lease.on_grant(stamp, sent_at, lease_ms) {
            GrantEffect::Ignored => return,
            // The directory forgot every line of the previous session: serve none of them.
            GrantEffect::NewSession => self.drop_all(InvalidationReason::LeaseExpired),
            GrantEffect::Extended => {}
        }
        // Applied within the same step as the extension: no hit is served in between, so the
        // lease is never longer than the directory allows for a node that ignored a demand.
        for d in demands {
            self.apply_demand(d);
        }
    }

    fn apply_demand(&mut self, d: Demand) {
        self.poison(&d.key, d.upto);
        let covered = self.lines.peek(&d.key).is_some_and(|l| l.grant <= d.upto);
        match d.kind {
            DemandKind::Invalidate => {
                self.stats.invalidations_received += 1;
                if covered && let Some(dropped) = self.lines.remove(&d.key) {
                    self.report(dropped, InvalidationReason::Written);
                }
                self.send(ToHome::InvalidateAck {
                    key: d.key,
                    op: d.op,
                });
            }
            DemandKind::Recall => {
                self.stats.recalls_received += 1;
                let kept = if covered {
                    self.lines.downgrade(&d.key)
                } else {
                    self.lines.peek(&d.key).is_some()
                };
                self.send(ToHome::RecallAck {
                    key: d.key,
                    op: d.op,
                    kept,
                });
            }
        }
    }

    /// Drops every line (new session or epoch). No notice: the directory has forgotten them.
    fn drop_all(&mut self, reason: InvalidationReason) {
        for d in self.lines.take_all() {
            self.report(d, reason);
        }
    }

    /// A line left on the node's own initiative: tell the directory, and subscribers.
    fn notify_dropped(&mut self, d: Dropped, reason: InvalidationReason) {
        self.send(ToHome::Evicted {
            key: d.key.clone(),
            grant: d.line.grant,
        });
        self.report(d, reason);
    }

    fn report(&mut self, d: Dropped, reason: InvalidationReason) {
        self.out.push(NodeEffect::Invalidated(InvalidationEvent {
            key: d.key,
            version: d.line.version,
            reason,
        }));
    }
}
