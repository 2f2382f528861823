//! The messages between nodes and the directory. The shell carries them over gRPC (a
//! directory co-located with a node is called directly); the core never sees a socket.
//!
//! Every message travels in an [`Envelope`] stamped with an epoch and a session. Nodes stamp
//! their requests with the lease they hold; the directory stamps its messages with its epoch and
//! the session it has for the recipient. A node acts on a directory message that installs or
//! removes lines only if the stamp is its current lease, and resets itself on a newer epoch. The
//! network may lose, delay, reorder and duplicate any message: each rule below says how the
//! receiver stays safe when it does.

use bytes::Bytes;

use super::{CacheError, Epoch, GrantId, LineState, Session, Stored, Version};

/// Which directory epoch and lease session a message belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// The directory's epoch (the leader's term).
    pub epoch: Epoch,
    /// The node's lease session within that epoch; 0 for none.
    pub session: Session,
}

impl Stamp {
    /// The stamp of `session` in `epoch`.
    pub fn new(epoch: Epoch, session: Session) -> Self {
        Stamp { epoch, session }
    }
}

/// A message with its stamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope<M> {
    /// Epoch and session.
    pub stamp: Stamp,
    /// The message.
    pub msg: M,
}

/// A node's request id: unique across the node's restarts (the incarnation changes on every
/// start), so that a reply to a request of a previous run is never taken for a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReqId {
    /// Chosen by the shell at start, different on every start (e.g. boot time in µs).
    pub incarnation: u64,
    /// Counts requests within the incarnation.
    pub seq: u64,
}

/// What a write does to its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Store `value`, expiring `ttl_ms` after the write (`None`: never).
    Set {
        /// The value.
        value: Bytes,
        /// Time to live in milliseconds.
        ttl_ms: Option<u64>,
    },
    /// Remove the key.
    Delete,
}

/// The client's tag on a write (its request header): memory applies a tagged write at most
/// once, and answers a retry with what the first application answered
/// ([`crate::cache::memory::MemoryReply::Duplicate`]). The protocol only carries it: every
/// decision about it is memory's, made atomically with the write itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WriteTag {
    /// The client (never 0).
    pub client_id: u64,
    /// The request's number; a retry reuses it.
    pub sequence: u64,
    /// Every request of the client below this one was answered: memory may forget them.
    pub lowest_unacked: u64,
}

/// A write: the mutation and, for CompareAndSet, the version the key must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// What to do.
    pub mutation: Mutation,
    /// `Some(v)`: only if the key's version is `v` (0: only if it does not exist).
    pub expect: Option<Version>,
    /// The client's tag, if it sent one: a retry with the same tag is applied once.
    pub tag: Option<WriteTag>,
}

impl Write {
    /// A plain Set of `value`: no TTL, no expected version, no tag (what a header-less client
    /// Set is, and the only write a node in write-back mode may take locally).
    pub fn set(value: impl Into<Bytes>) -> Write {
        Write {
            mutation: Mutation::Set {
                value: value.into(),
                ttl_ms: None,
            },
            expect: None,
            tag: None,
        }
    }

    /// A Set of `value` that expires `ttl_ms` after memory applies it.
    pub fn set_with_ttl(value: impl Into<Bytes>, ttl_ms: u64) -> Write {
        Write {
            mutation: Mutation::Set {
                value: value.into(),
                ttl_ms: Some(ttl_ms),
            },
            expect: None,
            tag: None,
        }
    }
}

/// The outcome of a write that memory answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteResult {
    /// Applied with this version. `existed`: the key existed before (for Delete).
    Applied {
        /// The version given to the write.
        version: Version,
        /// Whether the key existed before the write.
        existed: bool,
    },
    /// CompareAndSet only: the key's version was not the expected one; nothing changed.
    Mismatch {
        /// The key's version now.
        current: Version,
    },
}

/// A line handed to a node by a fill or a write: the directory recorded the node as holding the
/// key in `state` under grant `grant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineGrant {
    /// The grant's number (increasing within the epoch).
    pub grant: GrantId,
    /// Shared, Exclusive or Modified.
    pub state: LineState,
    /// Write-back mode, exclusive lines only: the versions the holder may give local writes.
    pub reserved: Option<Reservation>,
}

/// Versions memory set aside for one key and one exclusive grant: the holder numbers its
/// local writes `base + 1 ..= limit`, above the line's own version, and memory never gives
/// any of them to the key afterwards (its next version for the key is above `limit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Local writes are numbered above this (at least the key's version at reservation).
    pub base: Version,
    /// The highest version the holder may use.
    pub limit: Version,
}

/// A dirty line's newest write, handed to the directory to be written back to memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dirty {
    /// The grant of the line (the directory checks it is its record's).
    pub grant: GrantId,
    /// The version the node gave the write (inside the line's reservation).
    pub version: Version,
    /// The value.
    pub value: Bytes,
}

/// What a demand asks a holder to do to its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DemandKind {
    /// Downgrade an E or M line to S (another node is reading the key).
    Recall,
    /// Drop the line (someone is writing the key). Stronger than a recall.
    Invalidate,
}

/// A demand that a holder give up (or downgrade) its line of `key`, sent by the directory for
/// operation `op`. It covers lines and in-flight replies with a grant up to `upto`: anything
/// granted later was granted after the operation that needs the demand, so it is unaffected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demand {
    /// The key.
    pub key: String,
    /// The directory operation that needs it (echoed in the acknowledgement).
    pub op: u64,
    /// Highest grant covered.
    pub upto: GrantId,
    /// Invalidate or recall.
    pub kind: DemandKind,
}

/// Node → directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToHome {
    /// Renew (or obtain) my lease. `sent_at` is the node's clock when it sent this; the grant
    /// echoes it, and the node's lease runs `L` from it (it cannot know when the directory
    /// actually granted). A stamp with another session than the directory's starts a new one.
    LeaseRenew {
        /// The node's clock at sending.
        sent_at: u64,
    },
    /// Read `key` for a miss. Served in order with the key's other operations.
    FillRequest {
        /// Request id, echoed.
        req: ReqId,
        /// The key.
        key: String,
    },
    /// Write `key` (Set, Delete, CompareAndSet).
    WriteRequest {
        /// Request id, echoed.
        req: ReqId,
        /// The key.
        key: String,
        /// What to write.
        write: Write,
        /// The grant of the line the node dropped when the write began (0: it had none). The
        /// directory needs no invalidation of the writer's own line recorded under a grant up
        /// to this; a delayed duplicate carries an old value here, so a line granted since is
        /// invalidated like any other.
        dropped_upto: GrantId,
    },
    /// The node has no line of `key` granted up to the demand's `upto`, and no reply in flight
    /// that could install one.
    InvalidateAck {
        /// The key.
        key: String,
        /// The demand's operation.
        op: u64,
    },
    /// The node's line of `key` is now at most Shared (`kept`), or it has none.
    RecallAck {
        /// The key.
        key: String,
        /// The demand's operation.
        op: u64,
        /// True if the node kept a Shared line.
        kept: bool,
    },
    /// Write-back mode: an InvalidateAck (`kept` false) or RecallAck (`kept` true) from a
    /// holder whose line was dirty, with the line's newest write. The directory writes it back
    /// before the operation that demanded it reads or writes memory. The node keeps `dirty`
    /// and sends it again with every acknowledgement of the same demand until a lease grant no
    /// longer carries the demand.
    DirtyAck {
        /// The key.
        key: String,
        /// The demand's operation.
        op: u64,
        /// True if the node kept a Shared line (a recall).
        kept: bool,
        /// The unwritten write.
        dirty: Dirty,
    },
    /// Write-back mode: write back my dirty line of `key` (a periodic flush, an eviction, or a
    /// write that cannot be served locally waits for it). Refused unless the directory records
    /// the node as the key's exclusive holder under `dirty.grant`.
    WriteBack {
        /// Request id, echoed.
        req: ReqId,
        /// The key.
        key: String,
        /// The newest write.
        dirty: Dirty,
    },
    /// The node dropped its line of `key` granted as `grant` (eviction, TTL, or a reply it did
    /// not install): the directory may stop counting it as a holder. A notice for an older
    /// grant than the directory's record is ignored.
    Evicted {
        /// The key.
        key: String,
        /// The grant of the dropped line.
        grant: GrantId,
    },
}

/// Directory → node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToNode {
    /// Your lease (the envelope's session) runs `lease_ms` from `sent_at`, on your clock. Apply
    /// `demands` first: they are the invalidations and recalls you have not acknowledged, and
    /// the lease may only be extended once they are applied (Chubby's rule).
    LeaseGrant {
        /// Echo of the renewal's `sent_at`.
        sent_at: u64,
        /// Lease length `L`.
        lease_ms: u64,
        /// Demands still owed.
        demands: Vec<Demand>,
    },
    /// The answer to a FillRequest: the value (or the error), and the line to install, if the
    /// directory recorded one (it does not while it is new, or for a node without a session).
    FillReply {
        /// The request.
        req: ReqId,
        /// What memory holds, or why the read failed.
        result: Result<Stored, CacheError>,
        /// The line recorded for the node, if any.
        line: Option<LineGrant>,
    },
    /// The answer to a WriteRequest. `line` is the Modified line recorded for the writer.
    WriteDone {
        /// The request.
        req: ReqId,
        /// The outcome, or why it failed (memory untouched).
        result: Result<WriteResult, CacheError>,
        /// The writer's new line, if recorded.
        line: Option<LineGrant>,
    },
    /// Give up or downgrade a line; answer with InvalidateAck or RecallAck (DirtyAck if the
    /// line was dirty).
    Demand(Demand),
    /// The answer to a WriteBack.
    WriteBackDone {
        /// The request.
        req: ReqId,
        /// The outcome.
        result: WriteBackResult,
    },
}

/// What became of a node's WriteBack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteBackResult {
    /// Memory holds that version (or a newer one).
    Written,
    /// The directory does not record the node as the exclusive holder under that grant: it
    /// has given up on the line (the node's lease ran out as it counts it), so the write can
    /// never be written back. The node drops the line.
    NotHolder,
    /// Memory refused; the line stays dirty and the node tries again.
    Failed(CacheError),
}
