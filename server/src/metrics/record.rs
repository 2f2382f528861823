//! Typed recording helpers: one function per thing the runtime observes.
//!
//! They exist so that label names and label values are fixed here rather than typed at each
//! call site; a misspelt label would silently create a second series. Each is a few atomic
//! operations on the installed recorder and a no-op without one. Functions taking a peer
//! format its node id into the `peer` label on every call (a short allocation), so call them
//! at Raft-message rates, not per byte.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use super::names;
use crate::raft::{NodeId, Role};

/// Every role, for setting the inactive ones to 0.
const ROLES: [Role; 4] = [
    Role::Follower,
    Role::PreCandidate,
    Role::Candidate,
    Role::Leader,
];

/// The `role` label value of a role.
pub fn role_label(role: Role) -> &'static str {
    match role {
        Role::Follower => "follower",
        Role::PreCandidate => "pre_candidate",
        Role::Candidate => "candidate",
        Role::Leader => "leader",
    }
}

/// Sets `syncd_raft_role`: 1 for `current`, 0 for every other role (all four series always
/// exist, so a role change never leaves a stale 1 behind).
pub fn role(current: Role) {
    for r in ROLES {
        gauge!(names::RAFT_ROLE, "role" => role_label(r)).set(if r == current { 1.0 } else { 0.0 });
    }
}

/// Sets `syncd_raft_term`.
pub fn term(term: u64) {
    gauge!(names::RAFT_TERM).set(term as f64);
}

/// Counts one leader change in `syncd_raft_leader_changes_total`.
pub fn leader_changed() {
    counter!(names::RAFT_LEADER_CHANGES).increment(1);
}

/// Sets `syncd_raft_commit_index`.
pub fn commit_index(index: u64) {
    gauge!(names::RAFT_COMMIT_INDEX).set(index as f64);
}

/// Sets `syncd_raft_applied_index`.
pub fn applied_index(index: u64) {
    gauge!(names::RAFT_APPLIED_INDEX).set(index as f64);
}

/// The outcome of a client proposal, the `result` label of `syncd_raft_proposals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proposal {
    /// Committed and applied; the client got its answer.
    Ok,
    /// Refused by the engine before entering the log (not leader, leadership transfer or
    /// membership change in progress).
    Rejected,
    /// Discarded without an engine verdict: the proposal queue was full, the node was shutting
    /// down, or the entry was lost to a leader change before it committed.
    Dropped,
}

impl Proposal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Proposal::Ok => "ok",
            Proposal::Rejected => "rejected",
            Proposal::Dropped => "dropped",
        }
    }
}

/// Counts `n` proposals with the given outcome.
pub fn proposals(result: Proposal, n: u64) {
    counter!(names::RAFT_PROPOSALS, "result" => result.as_str()).increment(n);
}

/// Sets the retained log size: `syncd_log_entries` and `syncd_log_bytes`.
pub fn log_size(entries: u64, bytes: u64) {
    gauge!(names::LOG_ENTRIES).set(entries as f64);
    gauge!(names::LOG_BYTES).set(bytes as f64);
}

/// Counts one snapshot and records how long it took.
pub fn snapshot_taken(elapsed: Duration) {
    counter!(names::SNAPSHOTS).increment(1);
    histogram!(names::SNAPSHOT_DURATION).record(elapsed);
}

/// Records one WAL fsync.
pub fn wal_fsync(elapsed: Duration) {
    histogram!(names::WAL_FSYNC_DURATION).record(elapsed);
}

/// Records the number of entries in one WAL append batch.
pub fn wal_batch(entries: usize) {
    histogram!(names::WAL_BATCH_ENTRIES).record(entries as f64);
}

/// Sets how many entries `peer` is behind the leader's last index.
pub fn peer_lag(peer: NodeId, entries: u64) {
    gauge!(names::PEER_REPLICATION_LAG, "peer" => peer.to_string()).set(entries as f64);
}

/// Records one Raft RPC round trip to `peer`.
pub fn peer_rtt(peer: NodeId, rtt: Duration) {
    histogram!(names::PEER_RTT, "peer" => peer.to_string()).record(rtt);
}

/// Sets whether the failure detector considers `peer` reachable.
pub fn peer_reachable(peer: NodeId, reachable: bool) {
    gauge!(names::PEER_REACHABLE, "peer" => peer.to_string()).set(if reachable {
        1.0
    } else {
        0.0
    });
}

/// Sets `syncd_build_info{version}` to 1. [`super::install_recorder`] calls it with this
/// crate's version.
pub fn build_info(version: &'static str) {
    gauge!(names::BUILD_INFO, "version" => version).set(1.0);
}

/// Sets `syncd_node_info{node_id}` to 1. Call once the node id is known.
pub fn node_info(node_id: NodeId) {
    gauge!(names::NODE_INFO, "node_id" => node_id.to_string()).set(1.0);
}

/// Sets the lock-table gauges.
pub fn lock_table(sessions: usize, locks: usize) {
    gauge!(names::LOCK_SESSIONS).set(sessions as f64);
    gauge!(names::LOCK_LOCKS).set(locks as f64);
}

/// Counts one applied lock event; `kind` is the event type's wire value.
pub fn lock_event(kind: i32) {
    use sync_proto::sync::v1::LockEventType as T;
    let label = match T::try_from(kind).unwrap_or(T::Unspecified) {
        T::Acquired => "acquired",
        T::Converted => "converted",
        T::Released => "released",
        T::Expired => "expired",
        T::Revoked => "revoked",
        T::Deadlock => "deadlock",
        T::Unspecified => return,
    };
    counter!(names::LOCK_EVENTS, "type" => label).increment(1);
}

/// Sets the number of queue topics.
pub fn queue_topics(topics: usize) {
    gauge!(names::QUEUE_TOPICS).set(topics as f64);
}

/// Counts `count` queue messages that went through `event`.
pub fn queue_messages(event: &'static str, count: u64) {
    counter!(names::QUEUE_MESSAGES, "event" => event).increment(count);
}

/// Records how long one Acquire waited in a queue.
pub fn lock_wait(elapsed: Duration) {
    histogram!(names::LOCK_WAIT_DURATION).record(elapsed);
}

/// A cache memory request ended (see [`names::CACHE_MEMORY_REQUESTS`]): `backend` is `raft` or
/// `redis`, `op` is `read` or `write`, `outcome` is `ok`, `refused` or `unknown`.
pub fn cache_memory(
    backend: &'static str,
    op: &'static str,
    outcome: &'static str,
    elapsed: Duration,
) {
    counter!(names::CACHE_MEMORY_REQUESTS, "backend" => backend, "op" => op, "outcome" => outcome)
        .increment(1);
    histogram!(names::CACHE_MEMORY_DURATION, "backend" => backend, "op" => op).record(elapsed);
}

/// Sets the number of dirty cache lines (see [`names::CACHE_DIRTY_LINES`]).
pub fn cache_dirty_lines(lines: usize) {
    gauge!(names::CACHE_DIRTY_LINES).set(lines as f64);
}

/// Counts `count` cache writes served locally (see [`names::CACHE_LOCAL_WRITES`]).
pub fn cache_local_writes(count: u64) {
    counter!(names::CACHE_LOCAL_WRITES).increment(count);
}

/// How a write-back of a dirty cache line ended (see [`names::CACHE_WRITE_BACKS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteBackOutcome {
    /// Memory holds it.
    Written,
    /// The directory had given up on the line; its writes are lost.
    NotHolder,
    /// Memory refused it; the node tries again.
    Failed,
    /// No answer within the operation timeout; the node tries again.
    Unanswered,
}

/// A write-back ended; `elapsed` (from sending it) is recorded as the flush latency when it
/// was written.
pub fn cache_write_back(outcome: WriteBackOutcome, elapsed: Duration) {
    let label = match outcome {
        WriteBackOutcome::Written => "written",
        WriteBackOutcome::NotHolder => "not_holder",
        WriteBackOutcome::Failed => "failed",
        WriteBackOutcome::Unanswered => "unanswered",
    };
    counter!(names::CACHE_WRITE_BACKS, "outcome" => label).increment(1);
    if outcome == WriteBackOutcome::Written {
        histogram!(names::CACHE_WRITE_BACK_DURATION).record(elapsed);
    }
}

/// Counts write-back losses (see [`names::CACHE_WRITE_BACK_LOSSES`]): `event` is
/// `dirty_dropped` or `given_up`.
pub fn cache_write_back_losses(event: &'static str, count: u64) {
    counter!(names::CACHE_WRITE_BACK_LOSSES, "event" => event).increment(count);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{install_recorder, testutil::sample};

    #[test]
    fn exactly_one_role_is_set() {
        let handle = install_recorder().expect("install");
        role(Role::Candidate);
        role(Role::Leader);
        let text = handle.render();
        for r in ROLES {
            let want = if r == Role::Leader { 1.0 } else { 0.0 };
            let got = sample(&text, names::RAFT_ROLE, &[("role", role_label(r))]);
            assert_eq!(got, Some(want), "role {r:?}");
        }
    }

    #[test]
    fn peer_reachability_is_per_peer() {
        let handle = install_recorder().expect("install");
        peer_reachable(901, true);
        peer_reachable(902, false);
        let text = handle.render();
        assert_eq!(
            sample(&text, names::PEER_REACHABLE, &[("peer", "901")]),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, names::PEER_REACHABLE, &[("peer", "902")]),
            Some(0.0)
        );
    }
}
