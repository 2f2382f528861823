//! Memory: the backing store behind the caches, as the directory sees it.
//!
//! By default memory is the replicated state machine: a write is a Raft proposal (one "memory
//! write" step, which may take a while and may fail), a read is a linearizable (ReadIndex)
//! read. With `--cache-backend redis://…` it is Redis. The directory emits a
//! [`MemoryRequest`] and the shell answers it with [`crate::cache::Directory::on_memory`].
//!
//! ## The contract the shell must honour
//! 1. **Linearizable**: each request takes effect at one instant between its emission and its
//!    answer, and reads see every write that took effect before them.
//! 2. **Versions** strictly increase per key and are never reused, deletions included (the
//!    Raft commit index works; Redis keeps a per-key counter beside the value). A missing key
//!    reads with the version of its deletion, or 0 if it never existed (a store that purges
//!    deletions may report any version at least as large as every purged one).
//! 3. **Exactly one answer** per request, and an `Err` means the request did not take effect
//!    and never will. An ambiguous outcome must be resolved before answering (Raft: wait until
//!    the entry's index commits, with this entry or another; losing leadership alone does not
//!    resolve it, since the next leader may still commit the entry, so the shell then stops the
//!    directory instead of answering; Redis: read the version back). This is what
//!    makes a failed write leave no trace: the directory lets the key's next operation start as
//!    soon as it has the answer, so a write that landed later would be invisible to it.
//! 4. **Fenced by epoch**: a request carries the directory's epoch, and once a newer epoch has
//!    taken over memory, requests of older epochs fail. Raft gives most of this (a deposed
//!    leader cannot commit; a new leader commits or truncates every older entry before its
//!    first entry of its own term), but not all: a directory left over from an older term on a
//!    node that leads again would commit in the new term, so the replicated write names its
//!    epoch and is refused in an entry of another term. Redis needs the epoch checked in the
//!    same script as the write.
//! 5. **TTL**: memory stamps the expiry (the leader's clock) and reports the time left on read.
//! 6. **Reservations** (write-back mode only): [`MemoryOp::ReadReserve`] and
//!    [`MemoryOp::WriteReserve`] set aside `block` versions of the key, `base + 1 ..= base +
//!    block` with `base` at least the key's version and at least every earlier reservation's
//!    limit, and from then on give the key only versions above that limit. A
//!    [`MemoryOp::WriteBack`] writes a value with its own version, only if that version is
//!    inside the key's latest reservation and above the key's version; otherwise it changes
//!    nothing and answers `WrittenBack { applied: false }`. A WriteReserve whose write does not
//!    apply (a mismatch) may reserve or not, and answers `WrittenReserved` or `Written`
//!    accordingly (the directory grants no line for it either way; the Raft memory does not
//!    reserve); a retried one answers `Duplicate`.

use bytes::Bytes;

use super::{Epoch, Stored, Version, message::Write, message::WriteResult};

/// A memory request's id, chosen by the directory.
pub type MemOpId = u64;

/// What the directory asks of memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryOp {
    /// Read a key (linearizably).
    Read {
        /// The key.
        key: String,
    },
    /// Write a key.
    Write {
        /// The key.
        key: String,
        /// What to write; for CompareAndSet, the version to expect.
        write: Write,
    },
    /// Write-back mode: a read for a fill that grants an exclusive line, which also reserves
    /// `block` versions of the key (contract rule 6).
    ReadReserve {
        /// The key.
        key: String,
        /// How many versions to reserve.
        block: u64,
    },
    /// Write-back mode: a write that grants its writer a Modified line, which also reserves
    /// `block` versions after the write's own.
    WriteReserve {
        /// The key.
        key: String,
        /// What to write.
        write: Write,
        /// How many versions to reserve.
        block: u64,
    },
    /// Write-back mode: a value a holder wrote locally, with the version it gave it.
    WriteBack {
        /// The key.
        key: String,
        /// The holder's version, inside the key's latest reservation.
        version: Version,
        /// The value (it carries no TTL: local writes are Sets without one).
        value: Bytes,
    },
}

/// A request to memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryRequest {
    /// Echoed in the answer.
    pub id: MemOpId,
    /// The directory's epoch: memory refuses requests of an epoch older than its newest.
    pub epoch: Epoch,
    /// The operation.
    pub op: MemoryOp,
}

/// Memory's answer to a request that took effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryReply {
    /// The answer to a read.
    Read(Stored),
    /// The answer to a write.
    Written(WriteResult),
    /// A write whose tag memory had already applied: nothing changed now, and the result is
    /// the first application's. The directory must not hand the writer a line for it: the
    /// write's value may have been overwritten since, so memory's current version is not the
    /// write's.
    Duplicate(WriteResult),
    /// The answer to a ReadReserve: the read, and the reservation's base.
    ReadReserved(Stored, Version),
    /// The answer to a WriteReserve: the write's result, and the reservation's base.
    WrittenReserved(WriteResult, Version),
    /// The answer to a WriteBack: `applied` false if memory will never take that version: it
    /// holds it or a newer one (a duplicate), or the version is outside the key's latest
    /// reservation (a newer exclusive grant was made, so this line was given up on).
    WrittenBack {
        /// True if this request wrote the value.
        applied: bool,
    },
}

/// Why a memory request failed. Whatever the reason, it did not take effect and never will.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// The store could not be reached or refused (Raft: no quorum, not the leader, a newer
    /// epoch; Redis: connection refused).
    #[error("memory unavailable: {0}")]
    Unavailable(String),
    /// A tagged write whose tag is older than what memory remembers: memory cannot tell
    /// whether it was applied, so it refuses it (never applying a write twice).
    #[error("{0}")]
    Expired(String),
}
