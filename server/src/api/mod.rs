//! The public gRPC services: each file translates requests into node calls and node errors into
//! gRPC statuses, and forwards what must run on the leader.
//!
//! - [`cache`]: `sync.v1.Cache` (node-local reads and writes through the coherent cache).
//! - [`cluster`]: `sync.v1.Cluster` (status, membership, leadership, snapshots, watch).
//! - [`kv`]: `sync.v1.Kv` (replicated registers).
//!
//! Routing (common.proto): a call that must run on the leader is forwarded by the node that
//! received it, once, marked with `x-sync-forwarded` so a stale view can never make two nodes
//! forward to each other forever. When it cannot be forwarded the answer is UNAVAILABLE with
//! the `x-sync-leader-id` / `x-sync-leader-addr` trailers naming the leader if known.

pub mod cache;
pub mod cluster;
pub mod kv;
pub mod lock;
pub mod queue;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::node::tls::{NodeTls, peer_endpoint};
use crate::node::{NodeError, NodeHandle};
use crate::raft::RaftError;

/// Metadata key marking a forwarded request.
pub const FORWARDED: &str = "x-sync-forwarded";
/// Trailer naming the leader's id.
pub const LEADER_ID: &str = "x-sync-leader-id";
/// Trailer naming the leader's address.
pub const LEADER_ADDR: &str = "x-sync-leader-addr";

/// Deadline used when the client sets none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// The node error as a gRPC status, with leader trailers where they help.
pub fn status_of(e: NodeError) -> Status {
    let message = e.to_string();
    match e {
        NodeError::NotLeader { leader } => not_leader(leader, &message),
        NodeError::Lost | NodeError::ShuttingDown => Status::unavailable(message),
        NodeError::Expired => Status::aborted(message),
        NodeError::Timeout(_) => Status::deadline_exceeded(message),
        NodeError::Storage(_) => Status::internal(message),
        NodeError::Raft(r) => match r {
            RaftError::NotLeader { .. }
            | RaftError::TransferInProgress { .. }
            | RaftError::LeaderNotReady => Status::unavailable(message),
            RaftError::ConfigChangePending { .. }
            | RaftError::InvalidConfigChange(_)
            | RaftError::InvalidTransferTarget(_)
            | RaftError::Compaction { .. } => Status::failed_precondition(message),
            _ => Status::internal(message),
        },
    }
}

/// UNAVAILABLE, naming the leader in the trailers when known.
pub fn not_leader(leader: Option<(u64, String)>, message: &str) -> Status {
    let mut md = MetadataMap::new();
    if let Some((id, addr)) = &leader {
        if let Ok(v) = MetadataValue::try_from(id.to_string()) {
            md.insert(LEADER_ID, v);
        }
        if let Ok(v) = MetadataValue::try_from(addr.as_str()) {
            md.insert(LEADER_ADDR, v);
        }
    }
    let message = if leader.is_none() {
        format!("{message}; no leader is known right now (election in progress?), retry shortly")
    } else {
        message.to_string()
    };
    Status::with_metadata(Code::Unavailable, message, md)
}

/// How long a handler may work: the client's deadline (`grpc-timeout`, or the default) less a
/// margin, so the handler answers DEADLINE_EXCEEDED with a useful message before tonic's own
/// deadline handling cuts the call off with a bare CANCELLED.
pub fn deadline_of(md: &MetadataMap) -> Duration {
    let deadline = md
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(DEFAULT_DEADLINE);
    deadline.saturating_sub((deadline / 10).min(Duration::from_millis(50)))
}

/// Parses a `grpc-timeout` value such as `100m` or `5S`.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// True if the request was already forwarded once.
pub fn was_forwarded(md: &MetadataMap) -> bool {
    md.get(FORWARDED).is_some()
}

/// Builds a request for forwarding: marked, with the remaining deadline.
pub fn forward_request<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(deadline);
    r.metadata_mut()
        .insert(FORWARDED, MetadataValue::from_static("1"));
    r
}

/// Reused connections to the other nodes, for forwarding.
#[derive(Default)]
pub struct Forwarder {
    /// One lazily connected channel per leader address seen.
    channels: Mutex<HashMap<String, Channel>>,
    /// TLS towards peers, when the node's port speaks TLS.
    tls: Option<NodeTls>,
}

impl Forwarder {
    /// A forwarder that connects over TLS when `tls` is set.
    pub fn new(tls: Option<NodeTls>) -> Forwarder {
        Forwarder {
            channels: Mutex::default(),
            tls,
        }
    }

    /// A (lazily connected) channel to `address`.
    pub fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| Status::internal("forwarder lock poisoned"))?;
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let channel = peer_endpoint(address, self.tls.as_ref())
            .map_err(|e| Status::internal(format!("leader address {address:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Where a leader-only call should run: here, or forwarded to the leader.
/// The client's own deadline, if it set one (after [`deadline_of`]'s safety margin): a call
/// that may wait (an Acquire, a long poll) waits at most this long, or its own limit if the
/// client set no deadline.
pub fn client_deadline(md: &MetadataMap) -> Option<Duration> {
    md.get("grpc-timeout").map(|_| deadline_of(md))
}

/// Where a read with `consistency` goes: `None` for a stale read (this node's replica), else the
/// route of a linearizable read (here on the leader, or forwarded to it).
pub fn read_route(
    node: &NodeHandle,
    consistency: sync_proto::sync::v1::Consistency,
    md: &MetadataMap,
) -> Result<Option<Route>, Status> {
    if consistency == sync_proto::sync::v1::Consistency::Stale {
        Ok(None)
    } else {
        route(node, md).map(Some)
    }
}

/// Reads the replicated state: linearizably (this node must lead; forwarding first is the
/// caller's job) or from this node's replica, within `deadline`.
pub async fn read_state<T: Send + 'static>(
    node: &NodeHandle,
    linearizable: bool,
    deadline: Duration,
    f: impl FnOnce(&crate::state::ReplicatedState) -> T + Send + 'static,
) -> Result<T, Status> {
    match tokio::time::timeout(deadline, node.read(linearizable, f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(status_of(e)),
        Err(_) => Err(Status::deadline_exceeded(
            "the leader could not confirm its leadership in time (no quorum?)",
        )),
    }
}

pub enum Route {
    /// This node leads (or believes so): run it here.
    Local,
    /// Forward to this address.
    Forward(String),
}

/// Decides where a leader-only call runs, or answers UNAVAILABLE naming the leader.
pub fn route(node: &NodeHandle, md: &MetadataMap) -> Result<Route, Status> {
    if node.is_leader() {
        return Ok(Route::Local);
    }
    let leader = node.leader();
    match leader {
        Some((_, addr)) if !addr.is_empty() && !was_forwarded(md) => Ok(Route::Forward(addr)),
        other => Err(not_leader(other, "this node is not the leader")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn handlers_answer_before_the_clients_deadline() {
        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", MetadataValue::from_static("1000m"));
        assert_eq!(deadline_of(&md), Duration::from_millis(950));
        md.insert("grpc-timeout", MetadataValue::from_static("100m"));
        assert_eq!(deadline_of(&md), Duration::from_millis(90));
    }

    #[test]
    fn not_leader_names_the_leader_in_trailers() {
        let s = not_leader(Some((2, "127.0.0.1:7002".into())), "not the leader");
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(LEADER_ID).unwrap(), "2");
        assert_eq!(s.metadata().get(LEADER_ADDR).unwrap(), "127.0.0.1:7002");
    }
}
