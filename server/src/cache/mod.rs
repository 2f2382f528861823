//! # The cache coherence protocol: a pure core
//!
//! Every node keeps a local cache of lines, each in a MESI state, and a *directory* (the home)
//! keeps the lines coherent: a hit is served from the local line with no network hop, and is
//! never older than a completed write. Like the Raft engine, nothing here touches a socket, a
//! clock or a thread: time is a `now: u64` argument in milliseconds of the caller's local clock,
//! and every decision is returned as an effect (a message to carry, a memory operation to run,
//! a client operation to answer). The same code runs in the node runtime and in the
//! deterministic simulator ([`sim`]), which model-checks it under message loss, reordering,
//! partitions, paused processes, clock drift, memory failures and directory changes.
//!
//! `docs/cache.md` describes the protocol, with its state diagram, message flows and clock
//! assumption; the comments here say which rule each piece of code upholds.
//!
//! ## Layout
//! - [`line`]: a node's lines: MESI state, value, version, TTL; capacity in bytes with LRU
//!   eviction; the hit rule.
//! - [`lease`]: leases, from both ends: the node's own lease ([`lease::NodeLease`]) and the
//!   directory's table of every node's lease with the demands it still owes
//!   ([`lease::LeaseTable`]).
//! - [`message`]: what nodes and the directory say to each other.
//! - [`memory`]: the requests the directory makes of the backing store (the replicated state
//!   machine or Redis), and the contract that store must honour.
//! - [`node`]: [`CacheNode`], the node side: Get, Set, Delete, CompareAndSet, ticks, messages.
//! - [`view`]: [`view::ReadView`], the lines and lease a node publishes so that hits are served
//!   without a call into its task, and the two rules that keep them as safe as the core's.
//! - [`directory`]: [`Directory`], the home side: holders per key, per-key serialization of
//!   fills and writes, leases, epochs.
//! - [`sim`]: the deterministic simulator and its invariants, one function each.
//!
//! ## The rules, in one place
//! 1. **Hit rule** (node): a line is served only while the node's lease is valid and the line
//!    belongs to that lease (same epoch and session). The published read view applies the same
//!    rule, and is updated before the node acknowledges anything.
//! 2. **Chubby's rule** (directory): a write completes only after every other copy has
//!    acknowledged its invalidation or the holder's lease, as the directory counts it, has
//!    run out. Lease grants sent after the invalidation began carry it ("demands"), so a lease
//!    can only be extended past that point by a node that has dropped the line. The memory
//!    write overlaps the invalidations: until the write completes, nobody can read the new
//!    value (rules 3 and 5), so an old line served meanwhile is not stale (see [`directory`]).
//! 3. **Serialization** (directory): one fill or write per key at a time; the others queue.
//! 4. **Race rule** (node): a fill or write reply installs a line only if no invalidation or
//!    recall covering its grant arrived while it was in flight, it belongs to the node's
//!    current lease, and no newer line for the key was installed meanwhile.
//! 5. **Epoch rule**: a new directory (a new Raft leader, epoch = its term) starts with no
//!    holders, caches nothing, writes nothing and reads nothing for anyone until every lease
//!    of the previous epoch has run out; nodes drop every line of an older epoch when they learn of a newer one.

pub mod directory;
pub mod lease;
pub mod line;
pub mod memory;
pub mod message;
pub mod node;
pub mod sim;
pub mod view;

#[cfg(test)]
mod tests;

use bytes::Bytes;

pub use directory::Directory;
pub use node::CacheNode;

pub use crate::raft::NodeId;

/// A directory's epoch: the Raft term of the leader that runs it. Lines and leases of an older
/// epoch are never served once a node has heard of a newer one.
pub type Epoch = u64;

/// A lease session, assigned by the directory per node within an epoch (0: none). A node that
/// gets a grant for a new session drops every line it holds: the directory has forgotten them.
pub type Session = u64;

/// A directory-assigned number for every line it hands out (fill or write), increasing within
/// an epoch. Invalidations and recalls name the highest grant they cover, so a node can tell a
/// line or reply that predates them from one that came after.
pub type GrantId = u64;

/// The version of a key's value, assigned by memory: strictly increasing per key, never reused,
/// also given to deletions (a missing key reads with the version of its deletion, or 0 if it
/// was never written).
pub type Version = u64;

/// A client operation's id, chosen by the caller of [`CacheNode`] to match answers to requests.
pub type OpId = u64;

/// The MESI state of a line, as served by a node or recorded by the directory.
///
/// Ordered by exclusiveness: the directory's record of a holder is always at least as
/// exclusive as the line the holder may serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LineState {
    /// No usable copy.
    Invalid,
    /// One of possibly several copies, equal to memory.
    Shared,
    /// The only copy, equal to memory, obtained by a read.
    Exclusive,
    /// The only copy, written by this node. In write-through mode memory already holds it, so
    /// it differs from Exclusive only in how it was obtained, which `State` reports. In
    /// write-back mode it may be dirty: newer than memory until it is written back.
    Modified,
}

impl LineState {
    /// E or M: no other valid copy may exist beside this one.
    pub fn is_exclusive(self) -> bool {
        matches!(self, LineState::Exclusive | LineState::Modified)
    }
}

/// A key's value as memory holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The version (of the deletion, if `value` is `None`).
    pub version: Version,
    /// The value; `None` if the key does not exist (never written, deleted or expired).
    pub value: Option<Bytes>,
    /// Milliseconds until the value expires; `None` if it does not.
    pub ttl_left_ms: Option<u64>,
}

/// Why an operation failed. Maps onto gRPC codes in the service layer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// A bad key or a value over the maximum size (INVALID_ARGUMENT).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The value cannot fit in this node's cache (RESOURCE_EXHAUSTED).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The operation did not happen and will not (UNAVAILABLE): memory refused it, or the
    /// directory could not be reached for a read.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// No answer in time (DEADLINE_EXCEEDED): a write may or may not have happened.
    #[error("deadline exceeded: {0}")]
    Timeout(String),
    /// A retried write whose request header is older than memory's de-duplication record
    /// (ABORTED): it was not applied now, and whether its first attempt was is unknown.
    #[error("aborted: {0}")]
    Expired(String),
}

/// Settings shared by nodes and the directory. Times are in milliseconds.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Lease length `L`, as the node measures it from when it *sent* the renewal.
    pub lease_ms: u64,
    /// Added by the directory to every lease (and to the new-epoch wait) to cover clock drift:
    /// safe while `drift_margin_ms >= lease_ms * 2ρ / (1 - ρ)`, ρ being the largest relative
    /// rate error of any clock (see `docs/cache.md`).
    pub drift_margin_ms: u64,
    /// A node asks for a renewal this often; must be well under `lease_ms` so that one or two
    /// lost renewals do not end the lease.
    pub renew_every_ms: u64,
    /// A node fails a fill or write that has had no answer for this long.
    pub op_timeout_ms: u64,
    /// A node's cache holds at most this many bytes of keys and values.
    pub capacity_bytes: u64,
    /// Largest value accepted, in bytes.
    pub max_value_bytes: u64,
    /// Write-back mode (`None`: write-through, memory updated before a write returns). Only the
    /// directory's setting decides whether exclusive lines come with reserved versions, so
    /// every node of a cluster must agree.
    pub write_back: Option<WriteBackConfig>,
}

/// Write-back mode: a node holding a key in E or M writes it locally (E→M without a message)
/// and writes it back later. Writes acknowledged locally and not yet written back are lost if
/// the node crashes, is cut off from the directory for a lease, or the directory changes
/// (see `docs/cache.md`, "Write-back").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteBackConfig {
    /// The longest a dirty line's first unflushed write waits before the node writes it back;
    /// once a line has been dirty this long it takes no more local writes until it is clean,
    /// so the writes a node can lose per key all fall within one such interval.
    pub flush_ms: u64,
    /// How many versions memory reserves for a key when the directory grants an exclusive
    /// line: the holder numbers its local writes inside that block, and memory never gives
    /// those versions to the key afterwards, even if the holder's writes are lost.
    pub block: u64,
}

impl WriteBackConfig {
    /// The runtime's default flush interval (`--cache-flush-interval`): a dirty line is written
    /// back 100 ms after its first unflushed write, so a crash loses at most about 200 ms of a
    /// key's writes, while a key written thousands of times a second still costs memory about
    /// ten writes a second instead of thousands.
    pub const DEFAULT_FLUSH_MS: u64 = 200;

    /// The runtime's reservation block (not a flag): 1,024 versions per exclusive grant. A
    /// holder that uses them up writes through the directory once and gets a new block, so at
    /// this size that costs one round trip per 1,024 local writes. Versions are 64-bit, so the
    /// unused rest of a block (skipped when the line is recalled) costs nothing that runs out.
    pub const DEFAULT_BLOCK: u64 = 1_024;
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            lease_ms: 5_000,
            drift_margin_ms: 250,
            renew_every_ms: 1_000,
            op_timeout_ms: 10_000,
            capacity_bytes: 64 << 20,
            max_value_bytes: 1 << 20,
            write_back: None,
        }
    }
}

impl CacheConfig {
    /// Checks for settings that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_ms == 0 {
            return Err("lease_ms must be at least 1".into());
        }
        if self.renew_every_ms == 0 || self.renew_every_ms >= self.lease_ms {
            return Err("renew_every_ms must be between 1 and lease_ms - 1".into());
        }
        if self.op_timeout_ms == 0 {
            return Err("op_timeout_ms must be at least 1".into());
        }
        if self.max_value_bytes == 0 || self.capacity_bytes == 0 {
            return Err("capacity_bytes and max_value_bytes must be at least 1".into());
        }
        if let Some(wb) = &self.write_back
            && (wb.flush_ms < 2 || wb.block == 0)
        {
            return Err("write-back needs flush_ms >= 2 and block >= 1".into());
        }
        Ok(())
    }

    /// How long the directory counts a lease it grants at its `now`: `L` plus the drift
    /// margin. Also how long a new directory waits before its first write.
    pub fn directory_lease_ms(&self) -> u64 {
        self.lease_ms.saturating_add(self.drift_margin_ms)
    }

    /// Checks a key and an optional value against the documented bounds.
    pub fn validate_entry(&self, key: &str, value: Option<&Bytes>) -> Result<(), CacheError> {
        crate::state::kv::validate_key(key.as_bytes()).map_err(CacheError::InvalidArgument)?;
        let Some(value) = value else { return Ok(()) };
        if value.len() as u64 > self.max_value_bytes {
            return Err(CacheError::InvalidArgument(format!(
                "value is {} bytes; the limit is {}",
                value.len(),
                self.max_value_bytes
            )));
        }
        let size = line::entry_size(key, value);
        if size > self.capacity_bytes {
            return Err(CacheError::ResourceExhausted(format!(
                "key and value take {size} bytes; this node's cache holds {}",
                self.capacity_bytes
            )));
        }
        Ok(())
    }
}
