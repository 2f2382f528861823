//! The messages the engine exchanges with its peers.
//!
//! Each variant wraps the protobuf message of the same name from `sync.raft.v1`, so what the
//! engine emits is exactly what goes on the wire: the shell only chooses the RPC.
//!
//! Every request the engine accepts (`step` returns `Ok`) is answered with exactly one response
//! of the matching kind, and answers of one kind leave in the order their requests arrived (a
//! request from a stale term is answered with the receiver's term, so the sender learns it is
//! stale). Answers of *different* kinds may leave in another order: pre-vote answers go out at
//! once, the others only after persisting. The node runtime therefore pairs answers with
//! requests per (peer, kind), and answers a request that `step` refused with an RPC error.

use sync_proto::raft::v1 as pb;

use super::NodeId;

/// One Raft message, addressed from one group member to another.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Leader → follower: entries and commit index, or a heartbeat.
    AppendEntries(pb::AppendEntriesRequest),
    /// Follower → leader: outcome of an AppendEntries.
    AppendEntriesResponse(pb::AppendEntriesResponse),
    /// Candidate → voter: a vote or pre-vote request.
    RequestVote(pb::RequestVoteRequest),
    /// Voter → candidate: the vote.
    RequestVoteResponse(pb::RequestVoteResponse),
    /// Leader → follower: install the snapshot described here (its bytes travel beside it).
    InstallSnapshot(pb::InstallSnapshotRequest),
    /// Follower → leader: outcome of an InstallSnapshot.
    InstallSnapshotResponse(pb::InstallSnapshotResponse),
    /// Leader → successor: campaign now (leadership transfer).
    TimeoutNow(pb::TimeoutNowRequest),
    /// Successor → leader: TimeoutNow received.
    TimeoutNowResponse(pb::TimeoutNowResponse),
}

macro_rules! header_field {
    ($self:ident, $field:ident) => {
        match $self {
            Message::AppendEntries(m) => m.$field,
            Message::AppendEntriesResponse(m) => m.$field,
            Message::RequestVote(m) => m.$field,
            Message::RequestVoteResponse(m) => m.$field,
            Message::InstallSnapshot(m) => m.$field,
            Message::InstallSnapshotResponse(m) => m.$field,
            Message::TimeoutNow(m) => m.$field,
            Message::TimeoutNowResponse(m) => m.$field,
        }
    };
}

impl Message {
    /// The Raft group the message belongs to.
    pub fn group_id(&self) -> u64 {
        header_field!(self, group_id)
    }

    /// The sender's term (for a pre-vote request, the term it would campaign in).
    pub fn term(&self) -> u64 {
        header_field!(self, term)
    }

    /// The sender.
    pub fn from(&self) -> NodeId {
        header_field!(self, from)
    }

    /// The receiver.
    pub fn to(&self) -> NodeId {
        header_field!(self, to)
    }

    /// True for the four request kinds, each of which is answered by exactly one response.
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Message::AppendEntries(_)
                | Message::RequestVote(_)
                | Message::InstallSnapshot(_)
                | Message::TimeoutNow(_)
        )
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::AppendEntries(m) if m.heartbeat => "Heartbeat",
            Message::AppendEntries(_) => "AppendEntries",
            Message::AppendEntriesResponse(m) if m.heartbeat => "HeartbeatResponse",
            Message::AppendEntriesResponse(_) => "AppendEntriesResponse",
            Message::RequestVote(m) if m.pre_vote => "PreVote",
            Message::RequestVote(_) => "RequestVote",
            Message::RequestVoteResponse(m) if m.pre_vote => "PreVoteResponse",
            Message::RequestVoteResponse(_) => "RequestVoteResponse",
            Message::InstallSnapshot(_) => "InstallSnapshot",
            Message::InstallSnapshotResponse(_) => "InstallSnapshotResponse",
            Message::TimeoutNow(_) => "TimeoutNow",
            Message::TimeoutNowResponse(_) => "TimeoutNowResponse",
        }
    }
}
