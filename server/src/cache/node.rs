//! The node side of the protocol: [`CacheNode`].
//!
//! The shell calls [`CacheNode::get`] and [`CacheNode::write`] for clients,
//! [`CacheNode::on_message`] for every message from the directory, and [`CacheNode::tick`]
//! every few milliseconds; after each call it carries out [`CacheNode::take_effects`]: messages
//! to send to the directory (the current Raft leader), answers to clients, and invalidation
//! events for Subscribe streams. A Get that hits is answered at once by `get` itself. The shell
//! also publishes the node's lines and lease after every call ([`CacheNode::take_view_changes`],
//! [`super::view`]) and serves most hits from that published view, without calling in here.
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
//! - **Write-back mode** (`CacheConfig::write_back`): a Set without TTL or request header on a
//!   servable E or M line that has a reservation is applied to the line at once (E→M without a
//!   message), with the next reserved version; the line is dirty. A dirty line is written back
//!   (a `WriteBack` through the directory) half a flush interval after its first unflushed
//!   write, when it is chosen for eviction, or when a write must go through the directory; an
//!   acknowledgement of a demand on a dirty line carries its newest write (`DirtyAck`), kept
//!   until the directory has settled the demand. A line dirty for a whole flush interval takes
//!   no more local writes. Writes that cannot be local wait until the key's line is clean.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use super::lease::{GrantEffect, NodeLease};
use super::line::{Dropped, Line, Lines};
use super::message::{
    Demand, DemandKind, Dirty, Envelope, LineGrant, Mutation, ReqId, Stamp, ToHome, ToNode, Write,
    WriteBackResult, WriteResult,
};
use super::view::ViewChanges;
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

impl Read {
    /// A hit served from `line` at `now` (the node's clock).
    pub fn hit(line: &Line, now: u64) -> Self {
        Read {
            stored: Stored {
                version: line.version,
                value: Some(line.value.clone()),
                ttl_left_ms: line.expires_at.map(|t| t.saturating_sub(now)),
            },
            hit: true,
            state: line.state,
        }
    }
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
    /// Write-back mode: writes served on a local E or M line.
    pub local_writes: u64,
    /// Write-back mode: WriteBacks sent (periodic flushes, evictions, writes waiting).
    pub write_backs: u64,
    /// Write-back mode: WriteBacks sent because a dirty line was chosen for eviction.
    pub eviction_write_backs: u64,
    /// Write-back mode: WriteBacks refused by memory (retried).
    pub write_backs_failed: u64,
    /// Write-back mode: dirty lines handed over with a demand's acknowledgement.
    pub dirty_handed_over: u64,
    /// Write-back mode: dirty lines dropped unwritten (new session or epoch, or the directory
    /// had given up on them).
    pub dirty_lost: u64,
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
    /// Write-back mode: the node holds a line of the key with writes memory does not have yet
    /// (servable or not: a dirty line outside its lease is still written back if the
    /// directory takes it, or lost). Always false in write-through mode.
    pub dirty: bool,
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

/// A write waiting for its key's dirty line to be written back (write-back mode).
#[derive(Clone, Debug)]
struct Parked {
    /// The client operation.
    op: OpId,
    /// The write.
    write: Write,
    /// When it was asked for (it fails as Unavailable after the timeout: it was never sent).
    at: u64,
}

/// A WriteBack waiting for its answer.
#[derive(Clone, Debug)]
struct Flush {
    /// The key.
    key: String,
    /// The line's grant and the version written back.
    grant: GrantId,
    /// The version written back.
    version: Version,
    /// When sent: a write after this is not covered by it.
    sent_at: u64,
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
    /// The lease (stamp and end) as last handed out by [`CacheNode::take_view_changes`].
    published_lease: (Stamp, u64),
    /// Write-back mode: writes waiting for their key's line to be clean, in arrival order.
    parked: BTreeMap<String, VecDeque<Parked>>,
    /// Write-back mode: WriteBacks in flight.
    flushes: BTreeMap<ReqId, Flush>,
    /// Write-back mode: dirty writes handed over with a demand's acknowledgement, by key and
    /// demand, sent again with every repeat of the demand until a grant no longer carries it.
    handed_over: BTreeMap<(String, u64), Dirty>,
    /// Write-back mode: dirty lines chosen for eviction, evicted once written back.
    evict_when_clean: BTreeSet<String>,
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
            published_lease: (Stamp::default(), 0),
            parked: BTreeMap::new(),
            flushes: BTreeMap::new(),
            handed_over: BTreeMap::new(),
            evict_when_clean: BTreeSet::new(),
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
            let read = Read::hit(line, now);
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
    ///
    /// In write-back mode a write may instead be served on the node's own E or M line at once
    /// ([`CacheNode::write_locally`]), or wait until the key's dirty line is written back.
    pub fn write(&mut self, now: u64, op: OpId, key: &str, write: Write) -> Result<(), CacheError> {
        let value = match &write.mutation {
            Mutation::Set { value, .. } => Some(value),
            Mutation::Delete => None,
        };
        self.cfg.validate_entry(key, value)?;
        if self.cfg.write_back.is_some() {
            if let Some(result) = self.write_locally(now, key, &write) {
                self.stats.local_writes += 1;
                self.done(op, Ok(Answer::Write(result)));
                return Ok(());
            }
            let dirty = self.lines.peek(key).is_some_and(Line::is_dirty);
            if dirty || self.parked.contains_key(key) {
                // Dropping a dirty line would lose its writes: write it back first.
                let at = now;
                self.parked
                    .entry(key.to_string())
                    .or_default()
                    .push_back(Parked { op, write, at });
                self.flush(now, key);
                return Ok(());
            }
        }
        self.write_through(now, op, key, write);
        Ok(())
    }

    /// Write-back mode: serves `write` on this node's line if it may, and returns its result.
    /// Only a Set without TTL (or its CompareAndSet) that carries no request header: a retry's
    /// first attempt may have been applied anywhere, which only memory can tell, so a tagged
    /// write goes through the directory. The line must be servable, exclusive, have a reserved
    /// version left, no write waiting before this one, and not have been dirty for a whole
    /// flush interval (that bounds what a crash can lose).
    fn write_locally(&mut self, now: u64, key: &str, write: &Write) -> Option<WriteResult> {
        let flush_ms = self.cfg.write_back.as_ref()?.flush_ms;
        let Mutation::Set {
            value,
            ttl_ms: None,
        } = &write.mutation
        else {
            return None;
        };
        if write.tag.is_some() || self.parked.contains_key(key) {
            return None;
        }
        let line = self.lines.servable(now, key, &self.lease)?;
        let r = line.reserved.filter(|_| line.state.is_exclusive())?;
        if line
            .dirty_since
            .is_some_and(|t| now >= t.saturating_add(flush_ms))
        {
            return None;
        }
        if let Some(expected) = write.expect
            && expected != line.version
        {
            // The line is the only copy and memory is not newer: its version is the key's.
            return Some(WriteResult::Mismatch {
                current: line.version,
            });
        }
        let version = line.version.max(r.base) + 1;
        if version > r.limit {
            return None;
        }
        let mut updated = Line::new(
            LineState::Modified,
            value.clone(),
            version,
            line.stamp,
            line.grant,
            None,
        );
        updated.reserved = Some(r);
        updated.dirty_since = Some(line.dirty_since.unwrap_or(now));
        for d in self.lines.insert(key, updated) {
            self.stats.evictions += 1;
            self.notify_dropped(d, InvalidationReason::Evicted);
        }
        self.evict_dirty_if_full(now);
        Some(WriteResult::Applied {
            version,
            existed: true,
        })
    }

    /// Dirty lines keep the store over its capacity (after a local write or an installed
    /// reply): write them back, to evict them once clean.
    fn evict_dirty_if_full(&mut self, now: u64) {
        if !self.lines.over_capacity() {
            return;
        }
        // In key order, as the scan this replaced, so simulator seeds replay unchanged.
        let dirty: BTreeSet<String> = self.lines.dirty_keys().cloned().collect();
        for key in dirty {
            if self.evict_when_clean.insert(key.clone()) {
                self.stats.eviction_write_backs += 1;
            }
            self.flush(now, &key);
        }
    }

    /// Sends a WriteBack of `key`'s dirty line, unless one is in flight.
    fn flush(&mut self, now: u64, key: &str) {
        if self.flushes.values().any(|f| f.key == key) {
            return;
        }
        let Some(line) = self.lines.peek(key).filter(|l| l.is_dirty()) else {
            return;
        };
        let dirty = line.newest_write();
        let req = self.next_req();
        self.flushes.insert(
            req,
            Flush {
                key: key.to_string(),
                grant: dirty.grant,
                version: dirty.version,
                sent_at: now,
            },
        );
        self.stats.write_backs += 1;
        self.send(ToHome::WriteBack {
            req,
            key: key.to_string(),
            dirty,
        });
    }

    /// The directory answered a WriteBack.
    fn on_write_back_done(&mut self, now: u64, req: ReqId, result: WriteBackResult) {
        let Some(f) = self.flushes.remove(&req) else {
            return;
        };
        match result {
            WriteBackResult::Written => {
                let clean = self
                    .lines
                    .mark_written_back(&f.key, f.grant, f.version, f.sent_at);
                if clean
                    && self.evict_when_clean.remove(&f.key)
                    && let Some(d) = self.lines.remove(&f.key)
                {
                    self.stats.evictions += 1;
                    self.notify_dropped(d, InvalidationReason::Evicted);
                }
            }
            WriteBackResult::NotHolder => {
                // The directory gave up on this line (its lease ran out as the directory counts
                // it): these writes can never reach memory, and a later write may already have.
                if self
                    .lines
                    .peek(&f.key)
                    .is_some_and(|l| l.grant == f.grant && l.is_dirty())
                    && let Some(d) = self.lines.remove(&f.key)
                {
                    self.stats.dirty_lost += 1;
                    self.report(d, InvalidationReason::LeaseExpired);
                }
            }
            WriteBackResult::Failed(_) => self.stats.write_backs_failed += 1,
        }
        self.release_parked(now, &f.key);
    }

    /// Sends the writes waiting for `key`'s line once it is clean (or gone).
    fn release_parked(&mut self, now: u64, key: &str) {
        if self.lines.peek(key).is_some_and(Line::is_dirty) {
            return;
        }
        self.evict_when_clean.remove(key);
        for p in self.parked.remove(key).unwrap_or_default() {
            self.write_through(now, p.op, key, p.write);
        }
    }

    /// Sends a write to the directory (the write-through path).
    fn write_through(&mut self, now: u64, op: OpId, key: &str, write: Write) {
        let installs = match &write.mutation {
            Mutation::Set { value, ttl_ms } => Some((value.clone(), *ttl_ms)),
            Mutation::Delete => None,
        };
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
            } => self.on_grant(now, env.stamp, sent_at, lease_ms, demands),
            ToNode::FillReply { req, result, line } => {
                let Some(p) = self.pending.remove(&req) else {
                    return;
                };
                let install = result.as_ref().ok().and_then(|s| {
                    let value = s.value.clone()?;
                    Some((value, s.version, s.ttl_left_ms))
                });
                let state = self.settle(&p, line, current, install);
                self.evict_dirty_if_full(now);
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
                self.evict_dirty_if_full(now);
                self.done(p.op, result.map(Answer::Write));
            }
            ToNode::Demand(d) => {
                // A demand of another session concerns lines this node no longer has (it
                // dropped them on changing session), and nobody waits for its answer.
                if current {
                    self.apply_demand(now, d);
                }
            }
            ToNode::WriteBackDone { req, result } => self.on_write_back_done(now, req, result),
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
        if let Some(wb) = self.cfg.write_back.clone() {
            self.tick_write_back(now, wb.flush_ms);
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

    /// Write-back mode: retries WriteBacks that got no answer, fails writes that waited too
    /// long for a clean line (never sent: Unavailable), and writes back every dirty line half a
    /// flush interval after its first unflushed write, or sooner if a write waits for it.
    fn tick_write_back(&mut self, now: u64, flush_ms: u64) {
        let timeout = self.cfg.op_timeout_ms;
        self.flushes
            .retain(|_, f| now.saturating_sub(f.sent_at) < timeout);
        let mut late = Vec::new();
        for waiting in self.parked.values_mut() {
            while waiting
                .front()
                .is_some_and(|p| now.saturating_sub(p.at) >= timeout)
            {
                late.extend(waiting.pop_front());
            }
        }
        self.parked.retain(|_, w| !w.is_empty());
        for p in late {
            let why = format!(
                "the key's dirty line was not written back within {timeout} ms; the write was not sent"
            );
            self.done(p.op, Err(CacheError::Unavailable(why)));
        }
        // From the store's dirty index, not a scan of every line: the lines dirty for half a
        // flush interval, and the (few) keys a write or an eviction waits on. A BTreeSet keeps
        // the flushes in key order, as the scan this replaced sent them, so simulator seeds
        // replay unchanged.
        let mut due: BTreeSet<String> = match now.checked_sub(flush_ms / 2) {
            Some(upto) => self.lines.dirty_since_upto(upto).cloned().collect(),
            None => BTreeSet::new(),
        };
        let waited_on = self.parked.keys().chain(self.evict_when_clean.iter());
        due.extend(
            waited_on
                .filter(|k| self.lines.peek(k).is_some_and(Line::is_dirty))
                .cloned()
                .collect::<Vec<_>>(),
        );
        for key in due {
            self.flush(now, &key);
        }
    }

    /// The line for `key` if it would be served as a hit at `now` (changes nothing).
    pub fn servable(&self, now: u64, key: &str) -> Option<&Line> {
        self.lines.servable(now, key, &self.lease)
    }

    /// What changed in the lines and the lease since the last call, for the node's published
    /// [`ReadView`](super::view::ReadView). The caller applies it after every call into the
    /// node and before carrying out that call's effects (see [`super::view`]).
    pub fn take_view_changes(&mut self) -> ViewChanges {
        let lease = (self.lease.stamp(), self.lease.until());
        let lease = (lease != self.published_lease).then(|| {
            self.published_lease = lease;
            lease
        });
        ViewChanges {
            lines: self.lines.take_changed(),
            lease,
        }
    }

    /// Moves `key`'s line to the most recently used end of the LRU order: a hit was served
    /// from the read view, which does not touch the core.
    pub fn touch(&mut self, key: &str) {
        self.lines.touch(key);
    }

    /// This node's view of `key`, for the State call.
    pub fn line_view(&self, now: u64, key: &str) -> LineView {
        let line = self.servable(now, key);
        LineView {
            state: line.map_or(LineState::Invalid, |l| l.state),
            version: line.map_or(0, |l| l.version),
            lease_remaining_ms: self.lease.remaining(now),
            dirty: self.lines.peek(key).is_some_and(Line::is_dirty),
        }
    }

    /// The lease's stamp (epoch and session).
    pub fn stamp(&self) -> Stamp {
        self.lease.stamp()
    }

    /// Number of dirty lines held now (write-back mode; always 0 in write-through mode).
    pub fn dirty_lines(&self) -> usize {
        self.lines.dirty_len()
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

    /// A request id never used before, in this run or an earlier one.
    fn next_req(&mut self) -> ReqId {
        self.last_seq += 1;
        ReqId {
            incarnation: self.incarnation,
            seq: self.last_seq,
        }
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
        let req = self.next_req();
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
        let mut line = Line::new(
            g.state,
            value,
            version,
            self.lease.stamp(),
            g.grant,
            expires_at,
        );
        line.reserved = g.reserved.filter(|_| g.state.is_exclusive());
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

    fn on_grant(
        &mut self,
        now: u64,
        stamp: Stamp,
        sent_at: u64,
        lease_ms: u64,
        demands: Vec<Demand>,
    ) {
        match self.lease.on_grant(stamp, sent_at, lease_ms) {
            GrantEffect::Ignored => return,
            // The directory forgot every line of the previous session: serve none of them.
            GrantEffect::NewSession => self.drop_all(InvalidationReason::LeaseExpired),
            GrantEffect::Extended => {
                // A demand the grant no longer carries is settled: its handed-over write is
                // the directory's now (or was given up with the holder's lease).
                self.handed_over
                    .retain(|(k, op), _| demands.iter().any(|d| &d.key == k && d.op == *op));
            }
        }
        // Applied within the same step as the extension: no hit is served in between, so the
        // lease is never longer than the directory allows for a node that ignored a demand.
        for d in demands {
            self.apply_demand(now, d);
        }
    }

    fn apply_demand(&mut self, now: u64, d: Demand) {
        self.poison(&d.key, d.upto);
        let covered = self.lines.peek(&d.key).is_some_and(|l| l.grant <= d.upto);
        // A dirty line's newest write goes with the acknowledgement, and is kept for repeats.
        if let Some(l) = self.lines.peek(&d.key).filter(|l| covered && l.is_dirty()) {
            let dirty = l.newest_write();
            self.stats.dirty_handed_over += 1;
            self.handed_over.insert((d.key.clone(), d.op), dirty);
            self.evict_when_clean.remove(&d.key);
        }
        let handed = self.handed_over.get(&(d.key.clone(), d.op)).cloned();
        let kept = match d.kind {
            DemandKind::Invalidate => {
                self.stats.invalidations_received += 1;
                if covered && let Some(dropped) = self.lines.remove(&d.key) {
                    self.report(dropped, InvalidationReason::Written);
                }
                false
            }
            DemandKind::Recall => {
                self.stats.recalls_received += 1;
                let dirty = self.lines.peek(&d.key).is_some_and(Line::is_dirty);
                if covered && dirty {
                    // A dirty line is not kept as Shared: the directory may give up on this
                    // acknowledgement (it counts the lease as of the demand), and then memory
                    // would not hold the value the Shared copy serves.
                    if let Some(dropped) = self.lines.remove(&d.key) {
                        self.report(dropped, InvalidationReason::Written);
                    }
                    false
                } else if covered {
                    self.lines.downgrade(&d.key)
                } else {
                    self.lines.peek(&d.key).is_some()
                }
            }
        };
        let (key, op) = (d.key.clone(), d.op);
        match (handed, d.kind) {
            (Some(dirty), _) => self.send(ToHome::DirtyAck {
                key,
                op,
                kept,
                dirty,
            }),
            (None, DemandKind::Invalidate) => self.send(ToHome::InvalidateAck { key, op }),
            (None, DemandKind::Recall) => self.send(ToHome::RecallAck { key, op, kept }),
        }
        // The line is clean or gone: writes waiting for it go to the directory.
        self.release_parked(now, &d.key);
    }

    /// Drops every line (new session or epoch). No notice: the directory has forgotten them,
    /// and with them any write not written back (write-back mode: lost). Writes waiting for a
    /// clean line fail as never sent.
    fn drop_all(&mut self, reason: InvalidationReason) {
        for d in self.lines.take_all() {
            if d.line.is_dirty() {
                self.stats.dirty_lost += 1;
            }
            self.report(d, reason);
        }
        self.handed_over.clear();
        self.flushes.clear();
        self.evict_when_clean.clear();
        for p in std::mem::take(&mut self.parked).into_values().flatten() {
            let why = "the cache lease was lost while the write waited; it was not sent";
            self.done(p.op, Err(CacheError::Unavailable(why.into())));
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
