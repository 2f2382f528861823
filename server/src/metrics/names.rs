//! Every metric syncd exports, by name.
//!
//! Code records through these constants (or the helpers in [`super::record`]) so that a name
//! is spelled once; [`ALL`] lists them for [`super::describe_all`] and for the test that runs
//! `promtool check metrics` on the scrape output.
//!
//! Naming follows the Prometheus conventions that `promtool` checks: a `syncd_` prefix, base
//! units in the name (`_seconds`, `_bytes`, `_entries`), `_total` on counters and only on
//! counters, `_info` gauges set to 1 whose labels carry the information.

// ---- Raft -------------------------------------------------------------------------------------

/// Gauge, label `role` = `follower` | `pre_candidate` | `candidate` | `leader`: 1 for the role
/// this member plays now and 0 for the others. One series per role (rather than one gauge
/// holding a role number) so that `sum(syncd_raft_role{role="leader"})` counts the leaders of a
/// cluster and `syncd_raft_role{role="leader"} == 1` selects the leader, without magic numbers.
pub const RAFT_ROLE: &str = "syncd_raft_role";
/// Gauge: the current term.
pub const RAFT_TERM: &str = "syncd_raft_term";
/// Counter: times this member saw the leader change (including to "no leader known").
pub const RAFT_LEADER_CHANGES: &str = "syncd_raft_leader_changes_total";
/// Gauge: the highest log index known to be committed.
pub const RAFT_COMMIT_INDEX: &str = "syncd_raft_commit_index";
/// Gauge: the highest log index applied to the state machine.
pub const RAFT_APPLIED_INDEX: &str = "syncd_raft_applied_index";
/// Counter, label `result` = `ok` | `rejected` | `dropped` (see [`super::record::Proposal`]).
pub const RAFT_PROPOSALS: &str = "syncd_raft_proposals_total";

// ---- Log and storage --------------------------------------------------------------------------

/// Gauge: entries retained in the log (after the last snapshot).
pub const LOG_ENTRIES: &str = "syncd_log_entries";
/// Gauge: bytes the retained log occupies on disk.
pub const LOG_BYTES: &str = "syncd_log_bytes";
/// Counter: snapshots this member took of its state machine.
pub const SNAPSHOTS: &str = "syncd_snapshots_total";
/// Histogram: time to take and persist one snapshot.
pub const SNAPSHOT_DURATION: &str = "syncd_snapshot_duration_seconds";
/// Histogram: time of one WAL fsync (fdatasync), the floor of commit latency.
pub const WAL_FSYNC_DURATION: &str = "syncd_wal_fsync_duration_seconds";
/// Histogram: entries written per WAL append batch (group commit size).
pub const WAL_BATCH_ENTRIES: &str = "syncd_wal_batch_entries";

// ---- Peers ------------------------------------------------------------------------------------

/// Gauge, label `peer` (node id): how many entries the peer's log is behind the leader's
/// last index, as the leader's progress tracker sees it. Only the leader sets it.
pub const PEER_REPLICATION_LAG: &str = "syncd_peer_replication_lag_entries";
/// Histogram, label `peer` (node id): round-trip time of Raft RPCs to the peer.
pub const PEER_RTT: &str = "syncd_peer_rtt_seconds";
/// Gauge, label `peer` (node id): 1 if the failure detector considers the peer reachable, else 0.
pub const PEER_REACHABLE: &str = "syncd_peer_reachable";

// ---- gRPC server ------------------------------------------------------------------------------

/// Counter, labels `service`, `method`, `code` (canonical gRPC code name, e.g. `OK`,
/// `UNAVAILABLE`): finished RPCs. Errors are the series with `code!="OK"`.
pub const GRPC_SERVER_REQUESTS: &str = "syncd_grpc_server_requests_total";
/// Histogram, labels `service`, `method`: time from receiving an RPC to its final status (for
/// a streaming RPC, the life of the stream).
pub const GRPC_SERVER_REQUEST_DURATION: &str = "syncd_grpc_server_request_duration_seconds";

// ---- Identity ---------------------------------------------------------------------------------

/// Gauge set to 1, label `version`: the syncd version this process runs.
pub const BUILD_INFO: &str = "syncd_build_info";
/// Gauge set to 1, label `node_id`: the Raft node id of this process.
pub const NODE_INFO: &str = "syncd_node_info";

// ---- Locks ------------------------------------------------------------------------------------

/// Gauge: open lock sessions (explicit and implicit) in this member's replica.
pub const LOCK_SESSIONS: &str = "syncd_lock_sessions";
/// Gauge: locks held, awaited or under lock-delay in this member's replica.
pub const LOCK_LOCKS: &str = "syncd_lock_locks";
/// Counter, label `type` = `acquired` | `converted` | `released` | `expired` | `revoked` |
/// `deadlock`: lock events this member applied. Every replica applies the same events, so a
/// dashboard should read one member (or divide by the member count).
pub const LOCK_EVENTS: &str = "syncd_lock_events_total";
/// Histogram: how long Acquire calls served by this member waited in a lock's queue before
/// their wait ended (granted or not).
pub const LOCK_WAIT_DURATION: &str = "syncd_lock_wait_duration_seconds";

// ---- Queues -----------------------------------------------------------------------------------

/// Gauge: topics in this member's replica (dead-letter topics included).
pub const QUEUE_TOPICS: &str = "syncd_queue_topics";
/// Counter, label `event` = `published` | `delivered` | `acked` | `nacked`: messages this member
/// applied commands for (every replica applies the same; read one member).
pub const QUEUE_MESSAGES: &str = "syncd_queue_messages_total";

// ---- Cache ------------------------------------------------------------------------------------

/// Counter, labels `backend` = `raft` | `redis`, `op` = `read` | `write`, `outcome` = `ok` |
/// `refused` (memory answered with an error: not applied, never will be) | `unknown` (the
/// outcome could not be learnt and the request went unanswered; Raft only, see
/// `node::cache`): requests the cache directory made of memory on this member.
pub const CACHE_MEMORY_REQUESTS: &str = "syncd_cache_memory_requests_total";
/// Histogram, labels `backend`, `op`: time from a memory request's start to its answer
/// (including the resolution of an ambiguous Redis write).
pub const CACHE_MEMORY_DURATION: &str = "syncd_cache_memory_duration_seconds";
/// Gauge (write-back mode): lines of this member's cache holding writes memory does not have
/// yet. Always 0 in write-through mode.
pub const CACHE_DIRTY_LINES: &str = "syncd_cache_dirty_lines";
/// Counter (write-back mode): writes this member answered on its own Exclusive or Modified
/// line, without memory.
pub const CACHE_LOCAL_WRITES: &str = "syncd_cache_local_writes_total";
/// Counter (write-back mode), label `outcome` = `written` (memory holds it) | `not_holder` (the
/// directory had given up on the line: its writes are lost) | `failed` (memory refused; tried
/// again) | `unanswered` (no answer within the operation timeout; tried again): write-backs
/// this member sent for its dirty lines (flushes, evictions, writes waiting for a clean line).
pub const CACHE_WRITE_BACKS: &str = "syncd_cache_write_backs_total";
/// Histogram (write-back mode): time from sending a write-back to the answer that memory holds
/// it (the flush latency; `written` outcomes only).
pub const CACHE_WRITE_BACK_DURATION: &str = "syncd_cache_write_back_duration_seconds";
/// Counter (write-back mode), label `event` = `dirty_dropped` (this member dropped a dirty line
/// unwritten: its lease, session or directory was lost, or the directory answered
/// `not_holder`; each may hold several writes) | `given_up` (this member's directory went on
/// without a node's exclusive line whose lease ran out: writes on it not written back, if
/// any, are lost): the write-back losses of `docs/cache.md`, "The loss window".
pub const CACHE_WRITE_BACK_LOSSES: &str = "syncd_cache_write_back_losses_total";

/// Every name above, in the order they appear.
pub const ALL: &[&str] = &[
    RAFT_ROLE,
    RAFT_TERM,
    RAFT_LEADER_CHANGES,
    RAFT_COMMIT_INDEX,
    RAFT_APPLIED_INDEX,
    RAFT_PROPOSALS,
    LOG_ENTRIES,
    LOG_BYTES,
    SNAPSHOTS,
    SNAPSHOT_DURATION,
    WAL_FSYNC_DURATION,
    WAL_BATCH_ENTRIES,
    PEER_REPLICATION_LAG,
    PEER_RTT,
    PEER_REACHABLE,
    GRPC_SERVER_REQUESTS,
    GRPC_SERVER_REQUEST_DURATION,
    BUILD_INFO,
    NODE_INFO,
    LOCK_SESSIONS,
    LOCK_LOCKS,
    LOCK_EVENTS,
    LOCK_WAIT_DURATION,
    QUEUE_TOPICS,
    QUEUE_MESSAGES,
    CACHE_MEMORY_REQUESTS,
    CACHE_MEMORY_DURATION,
    CACHE_DIRTY_LINES,
    CACHE_LOCAL_WRITES,
    CACHE_WRITE_BACKS,
    CACHE_WRITE_BACK_DURATION,
    CACHE_WRITE_BACK_LOSSES,
];
