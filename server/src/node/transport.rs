//! Raft messages between nodes, over the `sync.raft.v1.Raft` gRPC service.
//!
//! **Outgoing.** One task per peer owns one reused HTTP/2 connection (tonic `Channel`) and sends
//! that peer's requests in order, one RPC at a time, feeding each answer back to the driver.
//! Whatever queued up meanwhile is merged before the next RPC: consecutive AppendEntries become
//! one (their entries are contiguous), and only the newest heartbeat is kept. So a busy leader
//! sends fewer, larger messages, which is what group commit on the follower wants. After a
//! failure the task backs off (doubling up to a ceiling) and drops what was queued; Raft
//! retransmits. When a peer has been idle for a while the task probes it with a gRPC health
//! check, so every node, not only the leader, knows which peers are alive.
//!
//! **Incoming.** [`RaftService`] hands each request to the driver with a reply channel and
//! answers the RPC with the engine's response, sent only once what the response promises is
//! durable.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use sync_proto::raft::v1 as pb;
use sync_proto::raft::v1::raft_client::RaftClient;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::driver::Input;
use crate::raft::{Message, NodeId};

/// The latest durable snapshot, kept in memory to stream to followers.
pub type SnapshotCache = Arc<RwLock<Option<(pb::SnapshotMetadata, Bytes)>>>;

/// Largest gRPC message in either direction (a batch of entries).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Snapshot chunk size.
const CHUNK_BYTES: usize = 1 << 20;
/// Largest snapshot a node accepts.
const MAX_SNAPSHOT_BYTES: usize = 4 << 30;

/// Transport timing.
#[derive(Clone, Copy, Debug)]
pub struct TransportTiming {
    /// Deadline of one RPC.
    pub rpc_timeout: Duration,
    /// Probe a peer after this long without traffic.
    pub probe_interval: Duration,
    /// Longest pause after failures.
    pub max_backoff: Duration,
}

/// The sending side towards one peer.
pub struct PeerHandle {
    /// Where it is reached.
    pub address: String,
    /// Its queue.
    tx: mpsc::UnboundedSender<Message>,
    /// Its task (aborted on drop).
    task: tokio::task::JoinHandle<()>,
}

impl PeerHandle {
    /// Queues a request for the peer.
    pub fn send(&self, m: Message) {
        let _ = self.tx.send(m);
    }
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the sender task for peer `id` at `address`.
pub fn spawn_peer(
    id: NodeId,
    address: String,
    driver: mpsc::UnboundedSender<Input>,
    snapshots: SnapshotCache,
    timing: TransportTiming,
) -> PeerHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run_peer(id, address.clone(), rx, driver, snapshots, timing));
    PeerHandle { address, tx, task }
}

fn channel_to(address: &str, timing: TransportTiming) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(timing.rpc_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(timing.rpc_timeout)
        .keep_alive_while_idle(true)
        .connect_lazy())
}

async fn run_peer(
    id: NodeId,
    address: String,
    mut rx: mpsc::UnboundedReceiver<Message>,
    driver: mpsc::UnboundedSender<Input>,
    snapshots: SnapshotCache,
    timing: TransportTiming,
) {
    let channel = match channel_to(&address, timing) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(peer = id, %address, error = %e, "invalid peer address");
            return;
        }
    };
    let mut raft = RaftClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut health = HealthClient::new(channel);
    let mut backoff = Duration::ZERO;
    loop {
        let first = match tokio::time::timeout(timing.probe_interval, rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(_) => {
                let probe = health.check(with_deadline(
                    HealthCheckRequest {
                        service: String::new(),
                    },
                    timing.rpc_timeout,
                ));
                if probe.await.is_ok() {
                    let _ = driver.send(Input::PeerContact(id));
                }
                continue;
            }
        };
        let mut batch = vec![first];
        while let Ok(m) = rx.try_recv() {
            batch.push(m);
        }
        for m in coalesce(batch) {
            let kind = m.kind();
            let is_snapshot = matches!(m, Message::InstallSnapshot(_));
            let started = std::time::Instant::now();
            match send_one(&mut raft, m, &snapshots, timing.rpc_timeout).await {
                Ok(answer) => {
                    backoff = Duration::ZERO;
                    crate::metrics::record::peer_rtt(id, started.elapsed());
                    let _ = driver.send(Input::PeerAnswer(answer));
                }
                Err(status) => {
                    tracing::debug!(peer = id, %address, kind, error = %status.message(), "peer RPC failed");
                    let _ = driver.send(if is_snapshot {
                        Input::SnapshotFailed(id)
                    } else {
                        Input::Unreachable(id)
                    });
                    backoff = (backoff * 2).clamp(Duration::from_millis(20), timing.max_backoff);
                    // Drop what queued up meanwhile: the engine retransmits what matters.
                    tokio::time::sleep(backoff).await;
                    while rx.try_recv().is_ok() {}
                    break;
                }
            }
        }
    }
}

fn with_deadline<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Merges what queued up for one peer: contiguous AppendEntries of one term become one message,
/// and of several heartbeats only the newest is kept.
pub fn coalesce(batch: Vec<Message>) -> Vec<Message> {
    let newest_heartbeat = batch
        .iter()
        .rposition(|m| matches!(m, Message::AppendEntries(r) if r.heartbeat));
    let mut out: Vec<Message> = Vec::with_capacity(batch.len());
    for (i, m) in batch.into_iter().enumerate() {
        if let Message::AppendEntries(r) = &m
            && r.heartbeat
            && Some(i) != newest_heartbeat
        {
            continue;
        }
        let m = match (out.last_mut(), m) {
            (Some(Message::AppendEntries(prev)), Message::AppendEntries(next))
                if !prev.heartbeat
                    && !next.heartbeat
                    && prev.term == next.term
                    && prev.prev_log_index + prev.entries.len() as u64 == next.prev_log_index =>
            {
                // The batch is ours: move the entries rather than copy them.
                prev.entries.extend(next.entries);
                prev.leader_commit = prev.leader_commit.max(next.leader_commit);
                prev.read_round = prev.read_round.max(next.read_round);
                continue;
            }
            (_, m) => m,
        };
        out.push(m);
    }
    out
}

async fn send_one(
    raft: &mut RaftClient<Channel>,
    m: Message,
    snapshots: &SnapshotCache,
    timeout: Duration,
) -> Result<Message, Status> {
    Ok(match m {
        Message::AppendEntries(r) => Message::AppendEntriesResponse(
            raft.append_entries(with_deadline(r, timeout))
                .await?
                .into_inner(),
        ),
        Message::RequestVote(r) => Message::RequestVoteResponse(
            raft.request_vote(with_deadline(r, timeout))
                .await?
                .into_inner(),
        ),
        Message::TimeoutNow(r) => Message::TimeoutNowResponse(
            raft.timeout_now(with_deadline(r, timeout))
                .await?
                .into_inner(),
        ),
        Message::InstallSnapshot(mut r) => {
            let Some((meta, data)) = snapshots.read().ok().and_then(|s| s.clone()) else {
                return Err(Status::failed_precondition("no snapshot to send"));
            };
            // The newest durable snapshot is sent, which may be newer than the one the engine
            // named: the answer reports how far the follower got.
            r.metadata = Some(meta);
            let checksum = crc32fast::hash(&data);
            let mut chunks = Vec::new();
            let mut offset = 0usize;
            loop {
                let end = (offset + CHUNK_BYTES).min(data.len());
                chunks.push(pb::InstallSnapshotChunk {
                    request: (offset == 0).then(|| r.clone()),
                    offset: offset as u64,
                    data: data.slice(offset..end),
                    done: end == data.len(),
                    checksum: if end == data.len() { checksum } else { 0 },
                });
                if end == data.len() {
                    break;
                }
                offset = end;
            }
            // A large snapshot gets more time: a minute per GiB on top of the RPC timeout.
            let budget = timeout + Duration::from_secs(60 * (data.len() as u64 >> 30));
            Message::InstallSnapshotResponse(
                raft.install_snapshot(with_deadline(tokio_stream::iter(chunks), budget))
                    .await?
                    .into_inner(),
            )
        }
        other => {
            return Err(Status::internal(format!(
                "{} is not sent over a peer queue",
                other.kind()
            )));
        }
    })
}

/// The server side of the Raft service: requests go to the driver, answers come back.
pub struct RaftService {
    /// The driver's input queue.
    pub driver: mpsc::UnboundedSender<Input>,
    /// How long to wait for the driver's answer.
    pub timeout: Duration,
}

impl RaftService {
    async fn call(&self, msg: Message, snapshot: Option<Bytes>) -> Result<Message, Status> {
        let (reply, answer) = oneshot::channel();
        self.driver
            .send(Input::PeerRequest {
                msg,
                snapshot,
                reply,
            })
            .map_err(|_| Status::unavailable("node is shutting down"))?;
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(Ok(m))) => Ok(m),
            Ok(Ok(Err(e))) => Err(Status::invalid_argument(e)),
            Ok(Err(_)) => Err(Status::unavailable("node is shutting down")),
            Err(_) => Err(Status::deadline_exceeded("node did not answer in time")),
        }
    }
}

macro_rules! unexpected {
    ($m:expr) => {
        Status::internal(format!("engine answered with {}", $m.kind()))
    };
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        match self
            .call(Message::AppendEntries(request.into_inner()), None)
            .await?
        {
            Message::AppendEntriesResponse(r) => Ok(Response::new(r)),
            m => Err(unexpected!(m)),
        }
    }

    async fn request_vote(
        &self,
        request: Request<pb::RequestVoteRequest>,
    ) -> Result<Response<pb::RequestVoteResponse>, Status> {
        match self
            .call(Message::RequestVote(request.into_inner()), None)
            .await?
        {
            Message::RequestVoteResponse(r) => Ok(Response::new(r)),
            m => Err(unexpected!(m)),
        }
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::InstallSnapshotChunk>>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        let mut stream = request.into_inner();
        let mut header: Option<pb::InstallSnapshotRequest> = None;
        let mut data: Vec<u8> = Vec::new();
        let mut checksum = None;
        while let Some(chunk) = stream.message().await? {
            if chunk.offset != data.len() as u64 {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk at offset {} but {} bytes received",
                    chunk.offset,
                    data.len()
                )));
            }
            if header.is_none() {
                header = chunk.request;
                if header.is_none() {
                    return Err(Status::invalid_argument(
                        "first snapshot chunk lacks the request",
                    ));
                }
            }
            if data.len() + chunk.data.len() > MAX_SNAPSHOT_BYTES {
                return Err(Status::resource_exhausted("snapshot exceeds 4 GiB"));
            }
            data.extend_from_slice(&chunk.data);
            if chunk.done {
                checksum = Some(chunk.checksum);
                break;
            }
        }
        let (Some(header), Some(checksum)) = (header, checksum) else {
            return Err(Status::invalid_argument("snapshot stream ended early"));
        };
        if crc32fast::hash(&data) != checksum {
            return Err(Status::data_loss("snapshot checksum mismatch"));
        }
        match self
            .call(Message::InstallSnapshot(header), Some(Bytes::from(data)))
            .await?
        {
            Message::InstallSnapshotResponse(r) => Ok(Response::new(r)),
            m => Err(unexpected!(m)),
        }
    }

    async fn timeout_now(
        &self,
        request: Request<pb::TimeoutNowRequest>,
    ) -> Result<Response<pb::TimeoutNowResponse>, Status> {
        match self
            .call(Message::TimeoutNow(request.into_inner()), None)
            .await?
        {
            Message::TimeoutNowResponse(r) => Ok(Response::new(r)),
            m => Err(unexpected!(m)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(prev: u64, n: u64, heartbeat: bool) -> Message {
        Message::AppendEntries(pb::AppendEntriesRequest {
            term: 1,
            prev_log_index: prev,
            entries: (0..n)
                .map(|i| pb::Entry {
                    term: 1,
                    index: prev + 1 + i,
                    ..Default::default()
                })
                .collect(),
            heartbeat,
            ..Default::default()
        })
    }

    #[test]
    fn contiguous_appends_merge_and_only_the_newest_heartbeat_is_kept() {
        let out = coalesce(vec![
            append(0, 2, false),
            append(0, 0, true),
            append(2, 3, false),
            append(0, 0, true),
            append(9, 1, false),
        ]);
        let shape: Vec<(bool, u64, usize)> = out
            .iter()
            .map(|m| match m {
                Message::AppendEntries(r) => (r.heartbeat, r.prev_log_index, r.entries.len()),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(shape, vec![(false, 0, 5), (true, 0, 0), (false, 9, 1)]);
    }
}
