//! Raft messages between nodes, over the `sync.raft.v1.Raft` gRPC service.
//!
//! **Outgoing.** One task per peer owns one reused HTTP/2 connection (tonic `Channel`).
//! AppendEntries (heartbeats included) travel on one long-lived `AppendStream` per peer: the task
//! writes each request as soon as the engine emits it, without waiting for earlier answers, and
//! feeds the answers (which come back in request order) to the driver. The engine's inflight
//! window (`max_inflight_msgs`) bounds how many are unanswered, so this is etcd's pipelined
//! replication; one unary RPC at a time would cap a follower at one batch per round trip plus
//! fsync. Whatever queued up while the task was busy is merged first: consecutive AppendEntries
//! become one (their entries are contiguous), and only the newest heartbeat is kept. Votes,
//! TimeoutNow and snapshots are rare and go as unary RPCs, each in its own task.
//!
//! A stream fails when it errors, ends, or leaves a request unanswered for the RPC timeout (a
//! peer or link that stopped carrying anything). The task then reports the peer unreachable (the
//! engine falls back to probing, so what was in flight is retransmitted by Raft, never by the
//! transport), backs off (doubling up to a ceiling), dropping what queues meanwhile, and opens a
//! new stream on the next AppendEntries. When nothing has been sent to a peer for a while the
//! task probes it with a gRPC health check, so every node, not only the leader, knows which
//! peers are alive.
//!
//! **Incoming.** [`RaftService`] hands each request to the driver with a reply closure and
//! answers with the engine's response, sent only once what the response promises is durable.
//! For an `AppendStream` the closure writes straight into the stream's response channel, and the
//! WAL thread runs it right after its fsync; the engine answers each peer's requests in order,
//! so the stream's answers stay in request order.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use sync_proto::raft::v1 as pb;
use sync_proto::raft::v1::raft_client::RaftClient;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::driver::{Input, PeerReply};
use super::tls::{NodeTls, peer_endpoint};
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
    /// Deadline of one RPC, and longest wait for an answer on an append stream.
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

    /// The peer's queue, for a sender that outlives this borrow (the WAL thread sends vote
    /// requests once the candidate's term and vote are durable).
    pub fn sender(&self) -> mpsc::UnboundedSender<Message> {
        self.tx.clone()
    }
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the sender task for peer `id` at `address` (over TLS when `tls` is set).
pub fn spawn_peer(
    id: NodeId,
    address: String,
    driver: mpsc::UnboundedSender<Input>,
    snapshots: SnapshotCache,
    timing: TransportTiming,
    tls: Option<NodeTls>,
) -> PeerHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let channel = channel_to(&address, timing, tls.as_ref());
    let task = tokio::spawn(run_peer(
        id,
        address.clone(),
        channel,
        rx,
        driver,
        snapshots,
        timing,
    ));
    PeerHandle { address, tx, task }
}

fn channel_to(
    address: &str,
    timing: TransportTiming,
    tls: Option<&NodeTls>,
) -> Result<Channel, tonic::transport::Error> {
    Ok(peer_endpoint(address, tls)?
        .connect_timeout(timing.rpc_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(timing.rpc_timeout)
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// One open `AppendStream` to a peer.
struct AppendPipe {
    /// Requests to write, in order.
    requests: mpsc::UnboundedSender<pb::AppendEntriesRequest>,
    /// The peer's answers, one per request, in request order.
    answers: Streaming<pb::AppendEntriesResponse>,
    /// When each unanswered request was written, oldest first: for the round-trip metric, and
    /// so that a stream that stopped answering is noticed.
    sent: VecDeque<Instant>,
}

impl AppendPipe {
    /// Opens a stream whose first request is `first`. Waits at most `timeout` for the peer to
    /// accept it (a link that carries nothing must not hold the task forever).
    async fn open(
        raft: &mut RaftClient<Channel>,
        first: pb::AppendEntriesRequest,
        timeout: Duration,
    ) -> Result<AppendPipe, Status> {
        let (requests, queue) = mpsc::unbounded_channel();
        let _ = requests.send(first);
        let opened = tokio::time::timeout(
            timeout,
            raft.append_stream(UnboundedReceiverStream::new(queue)),
        )
        .await
        .map_err(|_| Status::deadline_exceeded("the peer did not accept the append stream"))??;
        Ok(AppendPipe {
            requests,
            answers: opened.into_inner(),
            sent: VecDeque::from([Instant::now()]),
        })
    }

    /// Writes one more request; false if the stream is gone.
    fn send(&mut self, r: pb::AppendEntriesRequest) -> bool {
        self.sent.push_back(Instant::now());
        self.requests.send(r).is_ok()
    }

    /// When the oldest unanswered request has waited too long.
    fn deadline(&self, timeout: Duration) -> Option<Instant> {
        self.sent.front().map(|&t| t + timeout)
    }
}

/// The next answer on `pipe`, or never if there is no stream.
async fn next_answer(
    pipe: Option<&mut AppendPipe>,
) -> Result<Option<pb::AppendEntriesResponse>, Status> {
    match pipe {
        Some(p) => p.answers.message().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever if there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The state of one peer's sender task (see the module docs).
struct PeerTask {
    id: NodeId,
    address: String,
    driver: mpsc::UnboundedSender<Input>,
    snapshots: SnapshotCache,
    timing: TransportTiming,
    raft: RaftClient<Channel>,
    /// The open append stream, if any.
    pipe: Option<AppendPipe>,
    /// Current pause after failures (zero after a success).
    backoff: Duration,
    /// Until when AppendEntries are dropped after a failure.
    retry_at: Option<Instant>,
}

impl PeerTask {
    /// The stream failed: tell the engine (it falls back to probing and retransmits) and pause.
    fn fail(&mut self, why: &Status) {
        tracing::debug!(peer = self.id, address = %self.address, error = %why.message(), "append stream failed");
        self.pipe = None;
        let _ = self.driver.send(Input::Unreachable(self.id));
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(20), self.timing.max_backoff);
        self.retry_at = Some(Instant::now() + self.backoff);
    }

    async fn send(&mut self, m: Message) {
        let Message::AppendEntries(r) = m else {
            // Rare and independent of the append order: one task each, so a long snapshot
            // transfer does not hold up heartbeats.
            tokio::spawn(send_unary(
                self.id,
                self.raft.clone(),
                m,
                self.snapshots.clone(),
                self.timing.rpc_timeout,
                self.driver.clone(),
            ));
            return;
        };
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return; // backing off: Raft retransmits what matters
        }
        self.retry_at = None;
        if let Some(pipe) = &mut self.pipe {
            if pipe.send(r) {
                return;
            }
            self.fail(&Status::unavailable("append stream closed"));
            return;
        }
        match AppendPipe::open(&mut self.raft, r, self.timing.rpc_timeout).await {
            Ok(pipe) => self.pipe = Some(pipe),
            Err(status) => self.fail(&status),
        }
    }

    fn on_answer(&mut self, r: pb::AppendEntriesResponse) {
        if let Some(sent) = self.pipe.as_mut().and_then(|p| p.sent.pop_front()) {
            crate::metrics::record::peer_rtt(self.id, sent.elapsed());
        }
        self.backoff = Duration::ZERO;
        let _ = self
            .driver
            .send(Input::PeerAnswer(Message::AppendEntriesResponse(r)));
    }
}

async fn run_peer(
    id: NodeId,
    address: String,
    channel: Result<Channel, tonic::transport::Error>,
    mut rx: mpsc::UnboundedReceiver<Message>,
    driver: mpsc::UnboundedSender<Input>,
    snapshots: SnapshotCache,
    timing: TransportTiming,
) {
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(peer = id, %address, error = %e, "invalid peer address");
            return;
        }
    };
    let raft = RaftClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let health = HealthClient::new(channel);
    let mut task = PeerTask {
        id,
        address,
        driver,
        snapshots,
        timing,
        raft,
        pipe: None,
        backoff: Duration::ZERO,
        retry_at: None,
    };
    let mut last_sent = Instant::now();
    loop {
        let stalled = task
            .pipe
            .as_ref()
            .and_then(|p| p.deadline(timing.rpc_timeout));
        tokio::select! {
            biased;
            answer = next_answer(task.pipe.as_mut()) => match answer {
                Ok(Some(r)) => task.on_answer(r),
                Ok(None) => task.fail(&Status::unavailable("the peer closed the append stream")),
                Err(status) => task.fail(&status),
            },
            first = rx.recv() => {
                let Some(first) = first else { return };
                let mut batch = vec![first];
                while let Ok(m) = rx.try_recv() {
                    batch.push(m);
                }
                for m in coalesce(batch) {
                    task.send(m).await;
                }
                last_sent = Instant::now();
            }
            _ = sleep_until(stalled) => {
                task.fail(&Status::deadline_exceeded("the peer stopped answering"));
            }
            _ = tokio::time::sleep_until(last_sent + timing.probe_interval) => {
                last_sent = Instant::now();
                let mut health = health.clone();
                let driver = task.driver.clone();
                tokio::spawn(async move {
                    let probe = health.check(with_deadline(
                        HealthCheckRequest {
                            service: String::new(),
                        },
                        timing.rpc_timeout,
                    ));
                    if probe.await.is_ok() {
                        let _ = driver.send(Input::PeerContact(id));
                    }
                });
            }
        }
    }
}

/// Sends one unary request (a vote, TimeoutNow or snapshot) and hands the answer, or the
/// failure, to the driver.
async fn send_unary(
    id: NodeId,
    mut raft: RaftClient<Channel>,
    m: Message,
    snapshots: SnapshotCache,
    timeout: Duration,
    driver: mpsc::UnboundedSender<Input>,
) {
    let kind = m.kind();
    let is_snapshot = matches!(m, Message::InstallSnapshot(_));
    let started = Instant::now();
    match send_one(&mut raft, m, &snapshots, timeout).await {
        Ok(answer) => {
            crate::metrics::record::peer_rtt(id, started.elapsed());
            let _ = driver.send(Input::PeerAnswer(answer));
        }
        Err(status) => {
            tracing::debug!(peer = id, kind, error = %status.message(), "peer RPC failed");
            let _ = driver.send(if is_snapshot {
                Input::SnapshotFailed(id)
            } else {
                Input::Unreachable(id)
            });
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
                "{} is not sent as a unary RPC",
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
        let reply: PeerReply = Box::new(move |a| {
            let _ = reply.send(a);
        });
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

    type AppendStreamStream = UnboundedReceiverStream<Result<pb::AppendEntriesResponse, Status>>;

    async fn append_stream(
        &self,
        request: Request<Streaming<pb::AppendEntriesRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let mut requests = request.into_inner();
        let (answers, out) = mpsc::unbounded_channel();
        let driver = self.driver.clone();
        tokio::spawn(async move {
            // Ends when the leader closes the stream or the connection fails. The answers still
            // owed hold `answers` open until the engine has given them.
            while let Ok(Some(r)) = requests.message().await {
                let answers_to = answers.clone();
                let reply: PeerReply = Box::new(move |a| {
                    let _ = answers_to.send(match a {
                        Ok(Message::AppendEntriesResponse(r)) => Ok(r),
                        Ok(m) => Err(unexpected!(m)),
                        Err(e) => Err(Status::invalid_argument(e)),
                    });
                });
                let request = Input::PeerRequest {
                    msg: Message::AppendEntries(r),
                    snapshot: None,
                    reply,
                };
                if driver.send(request).is_err() {
                    let _ = answers.send(Err(Status::unavailable("node is shutting down")));
                    return;
                }
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(out)))
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
    use sync_proto::raft::v1::raft_server::RaftServer;
    use tokio_stream::wrappers::TcpListenerStream;

    fn timing() -> TransportTiming {
        TransportTiming {
            rpc_timeout: Duration::from_secs(2),
            probe_interval: Duration::from_secs(60),
            max_backoff: Duration::from_millis(100),
        }
    }

    /// Serves the Raft service on a local port; its driver side is returned.
    async fn follower() -> (String, mpsc::UnboundedReceiver<Input>) {
        let (driver, inputs) = mpsc::unbounded_channel();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let service = RaftServer::new(RaftService {
            driver,
            timeout: Duration::from_secs(2),
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (address, inputs)
    }

    fn append_to(prev: u64) -> Message {
        match append(prev, 1, false) {
            Message::AppendEntries(mut r) => {
                r.from = 1;
                r.to = 2;
                Message::AppendEntries(r)
            }
            _ => unreachable!(),
        }
    }

    #[tokio::test]
    async fn appends_are_pipelined_on_one_stream_and_answered_in_order() {
        let (address, mut follower_inputs) = follower().await;
        let (leader_tx, mut leader_inputs) = mpsc::unbounded_channel();
        let peer = spawn_peer(
            2,
            address,
            leader_tx,
            SnapshotCache::default(),
            timing(),
            None,
        );
        // Each request reaches the follower while the earlier ones are still unanswered.
        // (Sent one by one: requests queued together would be merged into one.)
        let mut replies = Vec::new();
        for prev in 0..3 {
            peer.send(append_to(prev));
            let input = tokio::time::timeout(Duration::from_secs(5), follower_inputs.recv())
                .await
                .expect("the leader sent without waiting for answers")
                .expect("follower inputs open");
            let Input::PeerRequest { msg, reply, .. } = input else {
                panic!("expected a peer request");
            };
            let Message::AppendEntries(r) = msg else {
                panic!("expected AppendEntries");
            };
            replies.push((r.prev_log_index, reply));
        }
        assert_eq!(
            replies.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            vec![0, 1, 2],
            "requests arrive in the order sent"
        );
        for (prev, reply) in replies {
            reply(Ok(Message::AppendEntriesResponse(
                pb::AppendEntriesResponse {
                    term: 1,
                    from: 2,
                    to: 1,
                    index: prev + 1,
                    ..Default::default()
                },
            )));
        }
        let mut answered = Vec::new();
        while answered.len() < 3 {
            match tokio::time::timeout(Duration::from_secs(5), leader_inputs.recv())
                .await
                .expect("answers come back")
                .expect("leader inputs open")
            {
                Input::PeerAnswer(Message::AppendEntriesResponse(r)) => answered.push(r.index),
                Input::PeerContact(_) => {}
                _ => panic!("unexpected input at the leader"),
            }
        }
        assert_eq!(answered, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn a_stream_left_unanswered_is_reported_and_reopened() {
        let (address, mut follower_inputs) = follower().await;
        let (leader_tx, mut leader_inputs) = mpsc::unbounded_channel();
        let mut t = timing();
        t.rpc_timeout = Duration::from_millis(300);
        let peer = spawn_peer(2, address, leader_tx, SnapshotCache::default(), t, None);
        peer.send(append_to(0));
        // The follower takes the request and never answers (a stuck node).
        let stuck = follower_inputs.recv().await.expect("request arrives");
        match tokio::time::timeout(Duration::from_secs(5), leader_inputs.recv()).await {
            Ok(Some(Input::Unreachable(2))) => {}
            _ => panic!("an unanswered stream must be reported"),
        }
        drop(stuck);
        // After the backoff the next AppendEntries opens a new stream.
        tokio::time::sleep(t.max_backoff).await;
        peer.send(append_to(5));
        loop {
            let input = tokio::time::timeout(Duration::from_secs(5), follower_inputs.recv())
                .await
                .expect("a new stream carries the next request")
                .expect("follower inputs open");
            if let Input::PeerRequest {
                msg: Message::AppendEntries(r),
                ..
            } = input
            {
                assert_eq!(r.prev_log_index, 5);
                break;
            }
        }
    }

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
