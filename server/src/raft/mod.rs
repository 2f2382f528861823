//! # The Raft engine: a pure, deterministic state machine
//!
//! Nothing in this module touches a socket, a file, a clock or a thread. The node runtime
//! drives a [`RaftNode`] with four kinds of input, and collects its decisions as a [`Ready`]:
//!
//! | input | meaning |
//! |---|---|
//! | [`RaftNode::tick`] | one unit of logical time passed (elections and heartbeats count ticks) |
//! | [`RaftNode::step`] | a message from a peer arrived |
//! | [`RaftNode::propose`], [`RaftNode::propose_config_change`], [`RaftNode::read_index`], [`RaftNode::transfer_leader`] | a client asked for something |
//! | [`RaftNode::on_persisted`], [`RaftNode::compact`], [`RaftNode::report_unreachable`], [`RaftNode::report_snapshot_failed`] | the runtime reports what it did |
//!
//! The same engine runs in production and in the deterministic simulator (`raft::sim`), which
//! is how its safety is tested: thousands of seeded runs with message loss, reordering,
//! partitions, crashes and membership changes, checked after every step.
//!
//! ## Layout
//! - [`node`]: the state machine itself (roles, elections, replication, reads, transfers).
//! - [`log`]: the in-memory log after the snapshot, with its commit/persist/apply positions.
//! - [`progress`]: the leader's view of each follower (probe / replicate / snapshot, inflights).
//! - [`quorum`]: majority arithmetic.
//! - [`membership`]: configurations and single-server changes.
//! - [`read_only`]: the ReadIndex queue.
//! - [`message`]: the messages, which are the `sync.raft.v1` protobuf types themselves.
//! - [`sim`]: the deterministic cluster simulator and its invariant checks.
//!
//! ## What the runtime must do with a [`Ready`]
//! 1. Send `messages` (they may leave before anything is persisted: they are the leader's
//!    appends, and a leader counts its own entries toward a quorum only once durable).
//! 2. Install `snapshot` if any, append `entries`, store `hard_state`, and make all of it
//!    durable (one fsync); then call [`RaftNode::on_persisted`] with the last entry's index
//!    and term.
//! 3. Only then send `persisted_messages` (votes, and answers that promise durable state).
//! 4. Apply `committed_entries` in order.
//! 5. Serve each of `read_states` once the state machine has applied its index; fail the
//!    reads in `dropped_reads` (leadership was lost; the client should retry).
//!
//! Readies must be persisted in the order they were taken. And the runtime must report every
//! snapshot transfer that fails (`report_snapshot_failed`): a follower being sent a snapshot
//! gets nothing else until the transfer is answered or reported failed.

pub mod log;
pub mod membership;
pub mod message;
pub mod node;
pub mod progress;
pub mod quorum;
pub mod read_only;
pub mod rng;
pub mod sim;

pub use membership::{ClusterConfigExt, ConfigChange};
pub use message::Message;
pub use node::{PeerStatus, RaftNode};
pub use progress::ProgressState;
pub use read_only::ReadState;

use sync_proto::raft::v1 as pb;

/// A member's id within a group. 0 means "nobody".
pub type NodeId = u64;

/// How linearizable reads are confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOnlyOption {
    /// ReadIndex: each read (or batch of reads) waits for a majority to answer a heartbeat
    /// round started after it arrived. Safe under any clock behaviour.
    Safe,
    /// Leader lease: a read is served at once while a majority answered a heartbeat sent less
    /// than `election_tick - lease_margin` ticks ago. This rests on a clock assumption: the
    /// tick rates of any two members differ by less than `lease_margin / election_tick`
    /// (20% with the defaults), because followers refuse to vote for `election_tick` of *their*
    /// ticks after hearing from the leader. A member that restarts also refuses votes for its
    /// first `election_tick` ticks, so a restart does not cut a lease short. Requires
    /// `check_quorum`. When the assumption may not hold, use [`ReadOnlyOption::Safe`].
    LeaseBased,
}

/// Engine settings. Times are in ticks; the runtime chooses how long a tick is.
#[derive(Clone, Debug)]
pub struct Config {
    /// This member's id (not 0).
    pub id: NodeId,
    /// The Raft group this engine runs (0 for the cluster's main group).
    pub group_id: u64,
    /// A follower that hears nothing from a leader for a random time in
    /// `[election_tick, 2 * election_tick)` starts an election.
    pub election_tick: u32,
    /// A leader sends heartbeats every `heartbeat_tick` ticks.
    pub heartbeat_tick: u32,
    /// Run a pre-vote round before a real election, so that a member that was cut off and
    /// rejoins does not force the healthy leader to step down by bumping the term.
    pub pre_vote: bool,
    /// A leader that has not heard from a majority within an election timeout steps down.
    /// (Leader stickiness, ignoring vote requests while a leader is heard from, is always on;
    /// see `RaftNode::step`.)
    pub check_quorum: bool,
    /// At most this many AppendEntries may be unacknowledged per follower.
    pub max_inflight_msgs: usize,
    /// At most this many entries in one AppendEntries.
    pub max_entries_per_msg: usize,
    /// At most this many bytes of entry data in one AppendEntries (at least one entry is sent).
    pub max_bytes_per_msg: u64,
    /// At most this many bytes of committed entries in one [`Ready`].
    pub max_apply_bytes: u64,
    /// How linearizable reads are confirmed.
    pub read_only: ReadOnlyOption,
    /// Lease safety margin in ticks (used with [`ReadOnlyOption::LeaseBased`]).
    pub lease_margin: u32,
    /// Seed of the engine's random number generator (election timeouts). Distinct per member.
    pub seed: u64,
}

impl Config {
    /// Defaults for member `id` of group 0: election after 10–19 ticks, heartbeat every tick,
    /// pre-vote and check-quorum on, ReadIndex reads.
    pub fn new(id: NodeId) -> Self {
        Config {
            id,
            group_id: 0,
            election_tick: 10,
            heartbeat_tick: 1,
            pre_vote: true,
            check_quorum: true,
            max_inflight_msgs: 256,
            max_entries_per_msg: 4096,
            max_bytes_per_msg: 1 << 20,
            max_apply_bytes: 64 << 20,
            read_only: ReadOnlyOption::Safe,
            lease_margin: 2,
            seed: id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        }
    }

    /// Checks the settings for combinations that cannot work.
    pub fn validate(&self) -> Result<(), RaftError> {
        let bad = |s: &str| Err(RaftError::InvalidConfig(s.to_string()));
        if self.id == 0 {
            return bad("id must not be 0");
        }
        if self.heartbeat_tick == 0 {
            return bad("heartbeat_tick must be at least 1");
        }
        if self.election_tick <= self.heartbeat_tick {
            return bad("election_tick must be greater than heartbeat_tick");
        }
        if self.max_inflight_msgs == 0 || self.max_entries_per_msg == 0 {
            return bad("max_inflight_msgs and max_entries_per_msg must be at least 1");
        }
        if self.read_only == ReadOnlyOption::LeaseBased {
            if !self.check_quorum {
                return bad("lease-based reads require check_quorum");
            }
            if self.lease_margin == 0 || self.lease_margin >= self.election_tick {
                return bad("lease_margin must be between 1 and election_tick - 1");
            }
        }
        Ok(())
    }
}

/// The role a member plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking for pre-votes; has not changed its term.
    PreCandidate,
    /// Asking for votes in a new term.
    Candidate,
    /// Leads the term.
    Leader,
}

/// Why the engine refused an input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RaftError {
    /// Only the leader accepts proposals, reads and transfers.
    #[error("not the leader (leader: {})", leader.map(|l| l.to_string()).unwrap_or_else(|| "unknown".into()))]
    NotLeader {
        /// The leader this member knows of, if any.
        leader: Option<NodeId>,
    },
    /// Leadership is being handed over; proposals are refused until it completes or aborts.
    #[error("leadership transfer to node {target} in progress; retry shortly")]
    TransferInProgress {
        /// The member leadership is being transferred to.
        target: NodeId,
    },
    /// A membership change is in flight; only one at a time.
    #[error("membership change at index {index} is not committed yet; retry when it is")]
    ConfigChangePending {
        /// Index of the uncommitted change.
        index: u64,
    },
    /// A new leader must commit an entry of its own term before changing membership.
    #[error("leader has not committed an entry of its term yet; retry shortly")]
    LeaderNotReady,
    /// The membership change is not allowed.
    #[error("invalid membership change: {0}")]
    InvalidConfigChange(String),
    /// The leadership transfer target is not a voter.
    #[error("cannot transfer leadership to node {0}: not a voter of this group")]
    InvalidTransferTarget(NodeId),
    /// A message for another group reached this engine.
    #[error("message for group {got} delivered to group {expected}")]
    WrongGroup {
        /// This engine's group.
        expected: u64,
        /// The message's group.
        got: u64,
    },
    /// A message addressed to another member reached this engine.
    #[error("message for node {to} delivered to node {me}")]
    Misaddressed {
        /// This member.
        me: NodeId,
        /// The message's recipient.
        to: NodeId,
    },
    /// A message or a recovered record is internally inconsistent.
    #[error("malformed input: {0}")]
    Malformed(String),
    /// The settings are unusable.
    #[error("invalid raft configuration: {0}")]
    InvalidConfig(String),
    /// Compaction asked for an index the engine cannot compact to.
    #[error("cannot compact to index {index}: {reason}")]
    Compaction {
        /// The requested index.
        index: u64,
        /// Why not.
        reason: &'static str,
    },
}

/// Everything the engine decided since the previous [`Ready`]; see the module docs for the
/// order in which the runtime must act on it.
#[derive(Clone, Debug, Default)]
pub struct Ready {
    /// The hard state to persist, if it changed.
    pub hard_state: Option<pb::HardState>,
    /// A snapshot received from the leader that must be installed (its bytes came with the
    /// InstallSnapshot stream). The log now starts after it.
    pub snapshot: Option<pb::SnapshotMetadata>,
    /// Entries to append to the durable log; an entry whose index is already stored replaces
    /// that entry and everything after it.
    pub entries: Vec<pb::Entry>,
    /// Messages that may be sent at once.
    pub messages: Vec<Message>,
    /// Messages to send only after this Ready's entries, hard state and snapshot are durable.
    pub persisted_messages: Vec<Message>,
    /// Committed entries to apply, in order.
    pub committed_entries: Vec<pb::Entry>,
    /// Reads that may be served once the state machine has applied their index.
    pub read_states: Vec<ReadState>,
    /// Reads that will never be confirmed here (leadership lost): fail them.
    pub dropped_reads: Vec<u64>,
}

impl Ready {
    /// True if the Ready asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.snapshot.is_none()
            && self.entries.is_empty()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.committed_entries.is_empty()
            && self.read_states.is_empty()
            && self.dropped_reads.is_empty()
    }
}

#[cfg(test)]
mod tests;
