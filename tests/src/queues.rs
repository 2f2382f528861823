//! Queue clients for cluster tests: a client that sends every call with a `RequestHeader` and
//! retries it, unchanged, on one node after another (as a real client library must), and a
//! ledger of what was published, delivered, acknowledged and dead-lettered that the checks read.
//!
//! Headers: one client may have many requests in flight (a consumer acks a batch at once), so
//! `lowest_unacked` is the lowest sequence still outstanding, not simply the new one: claiming
//! more would let the server forget an answer a retry still needs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::queue_client::QueueClient;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::Cluster;

/// Slack over a call's gRPC deadline before the client gives up on it by itself.
const CALL_GRACE: Duration = Duration::from_secs(2);
/// Deadline of one ordinary (non-waiting) call.
pub const CALL: Duration = Duration::from_secs(3);
/// Pause between two tries.
const BACKOFF: Duration = Duration::from_millis(50);

/// Whether a failed call may succeed if sent again, unchanged: the node is down, not the leader
/// or the owner, the connection broke, or the call did not complete in time. Everything else
/// (a stale receipt, an unknown message, a bad argument) is the answer.
pub fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Channels to every node by id, replaced when the test restarts a node.
#[derive(Clone, Default)]
pub struct QueueNodes(Arc<RwLock<BTreeMap<u64, Channel>>>);

impl QueueNodes {
    /// Channels to every node of the cluster.
    pub fn of(c: &Cluster) -> QueueNodes {
        let nodes = QueueNodes::default();
        for id in c.ids() {
            nodes.reconnect(id, c.address(id));
        }
        nodes
    }

    /// A fresh (lazily connected) channel to node `id` at `addr`, e.g. after a restart.
    pub fn reconnect(&self, id: u64, addr: SocketAddr) {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address is a valid URI")
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, channel);
    }

    /// Node ids, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// A Queue client of node `id`.
    pub fn client(&self, id: u64) -> QueueClient<Channel> {
        let channel = self
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .unwrap_or_else(|| panic!("no node {id}"));
        QueueClient::new(channel)
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20)
    }
}

/// A request with a deadline.
pub fn timed<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// One client process: its identity, its request counter and the requests it has in flight.
pub struct QueueUser {
    /// Every node.
    nodes: QueueNodes,
    /// The de-duplication client id (random, nonzero).
    client_id: u64,
    /// The next sequence, and the sequences sent and not yet answered.
    sequences: Mutex<(u64, BTreeSet<u64>)>,
    /// The node tried first; a failure moves on to the next.
    next_node: AtomicU64,
}

/// A request's header, outstanding until dropped.
struct Outstanding<'a> {
    user: &'a QueueUser,
    header: api::RequestHeader,
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        let mut s = self
            .user
            .sequences
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        s.1.remove(&self.header.sequence);
    }
}

impl QueueUser {
    /// A new client whose calls go first to node `home`.
    pub fn new(nodes: &QueueNodes, home: u64) -> QueueUser {
        let ids = nodes.ids();
        let at = ids.iter().position(|&i| i == home).unwrap_or(0);
        QueueUser {
            nodes: nodes.clone(),
            client_id: rand::random::<u64>() | 1,
            sequences: Mutex::new((1, BTreeSet::new())),
            next_node: AtomicU64::new(at as u64),
        }
    }

    /// The header of a new request, outstanding until the guard drops.
    fn begin(&self) -> Outstanding<'_> {
        let mut s = self.sequences.lock().unwrap_or_else(|e| e.into_inner());
        let sequence = s.0;
        s.0 += 1;
        s.1.insert(sequence);
        let lowest_unacked = s.1.first().copied().unwrap_or(sequence);
        Outstanding {
            user: self,
            header: api::RequestHeader {
                client_id: self.client_id,
                sequence,
                lowest_unacked,
            },
        }
    }

    /// Sends a call to one node after another until one answers with something final or
    /// `within` passes.
    pub async fn retry<T, F, Fut>(
        &self,
        within: Duration,
        per_call: Duration,
        send: F,
    ) -> Result<T, Status>
    where
        F: Fn(QueueClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let end = Instant::now() + within;
        let mut last = Status::unavailable("no node tried");
        while Instant::now() < end {
            let ids = self.nodes.ids();
            let pick = self.next_node.load(Ordering::Relaxed) as usize % ids.len().max(1);
            let Some(&id) = ids.get(pick) else {
                return Err(Status::unavailable("no nodes"));
            };
            let answer =
                tokio::time::timeout(per_call + CALL_GRACE, send(self.nodes.client(id), per_call))
                    .await;
            match answer {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) if !retryable(&s) => return Err(s),
                Ok(Err(s)) => last = s,
                Err(_) => last = Status::deadline_exceeded("client-side timeout"),
            }
            self.next_node.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(BACKOFF).await;
        }
        Err(last)
    }

    /// [`QueueUser::retry`] of one prepared request, each try with the deadline `per_call`.
    async fn send<Req, T, F, Fut>(
        &self,
        request: Req,
        within: Duration,
        per_call: Duration,
        call: F,
    ) -> Result<T, Status>
    where
        Req: Clone,
        F: Fn(QueueClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.retry(within, per_call, |c, t| call(c, timed(request.clone(), t)))
            .await
    }

    /// CreateTopic.
    pub async fn create_topic(
        &self,
        name: &str,
        settings: api::TopicSettings,
        within: Duration,
    ) -> Result<api::CreateTopicResponse, Status> {
        let h = self.begin();
        let req = api::CreateTopicRequest {
            header: Some(h.header),
            name: name.into(),
            settings: Some(settings),
        };
        self.send(req, within, CALL, |mut c, r| async move {
            c.create_topic(r).await
        })
        .await
    }

    /// PublishBatch.
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<api::PublishEntry>,
        within: Duration,
    ) -> Result<Vec<api::PublishResponse>, Status> {
        let h = self.begin();
        let req = api::PublishBatchRequest {
            header: Some(h.header),
            topic: topic.into(),
            messages,
        };
        self.send(req, within, CALL, |mut c, r| async move {
            c.publish_batch(r).await
        })
        .await
        .map(|r| r.results)
    }

    /// Publish of a prepared request (its header is set here).
    pub async fn publish(
        &self,
        mut req: api::PublishRequest,
        within: Duration,
    ) -> Result<api::PublishResponse, Status> {
        let h = self.begin();
        req.header = Some(h.header);
        self.send(
            req,
            within,
            CALL,
            |mut c, r| async move { c.publish(r).await },
        )
        .await
    }

    /// Consume: up to `max` messages, waiting up to `wait` for the first.
    pub async fn consume(
        &self,
        topic: &str,
        max: u32,
        visibility: Duration,
        wait: Duration,
        within: Duration,
    ) -> Result<Vec<api::Delivery>, Status> {
        let h = self.begin();
        let req = api::ConsumeRequest {
            header: Some(h.header),
            topic: topic.into(),
            max_messages: max,
            visibility_timeout_ms: visibility.as_millis() as u64,
            wait_time_ms: wait.as_millis() as u64,
        };
        self.send(req, within, wait + CALL, |mut c, r| async move {
            c.consume(r).await
        })
        .await
        .map(|r| r.deliveries)
    }

    /// Ack.
    pub async fn ack(
        &self,
        topic: &str,
        receipt: Option<api::Receipt>,
        within: Duration,
    ) -> Result<(), Status> {
        let h = self.begin();
        let req = api::AckRequest {
            header: Some(h.header),
            topic: topic.into(),
            receipt,
        };
        self.send(req, within, CALL, |mut c, r| async move { c.ack(r).await })
            .await
            .map(|_| ())
    }

    /// Nack with a delay.
    pub async fn nack(
        &self,
        topic: &str,
        receipt: Option<api::Receipt>,
        delay: Duration,
        within: Duration,
    ) -> Result<(), Status> {
        let h = self.begin();
        let req = api::NackRequest {
            header: Some(h.header),
            topic: topic.into(),
            receipt,
            delay_ms: delay.as_millis() as u64,
        };
        self.send(req, within, CALL, |mut c, r| async move { c.nack(r).await })
            .await
            .map(|_| ())
    }

    /// ExtendVisibility; returns the new end of the timeout.
    pub async fn extend(
        &self,
        topic: &str,
        receipt: Option<api::Receipt>,
        timeout: Duration,
        within: Duration,
    ) -> Result<u64, Status> {
        let h = self.begin();
        let req = api::ExtendVisibilityRequest {
            header: Some(h.header),
            topic: topic.into(),
            receipt,
            visibility_timeout_ms: timeout.as_millis() as u64,
        };
        self.send(req, within, CALL, |mut c, r| async move {
            c.extend_visibility(r).await
        })
        .await
        .map(|r| r.visible_again_unix_ms)
    }

    /// Stats (no header: a read), from whichever node answers.
    pub async fn stats(
        &self,
        topic: &str,
        within: Duration,
    ) -> Result<api::QueueStatsResponse, Status> {
        let req = api::QueueStatsRequest {
            topic: topic.into(),
        };
        self.send(
            req,
            within,
            CALL,
            |mut c, r| async move { c.stats(r).await },
        )
        .await
    }
}

/// One delivery as a consumer saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The message id.
    pub id: String,
    /// Its payload, as text.
    pub payload: String,
    /// The delivery attempt.
    pub attempt: u32,
    /// The consumer.
    pub consumer: usize,
}

/// What a test's publishers and consumers saw, shared between their tasks.
#[derive(Clone, Default)]
pub struct QueueLedger(Arc<Mutex<LedgerInner>>);

/// The ledger's contents.
#[derive(Default)]
pub struct LedgerInner {
    /// Acknowledged publishes: message id → payload.
    pub published: BTreeMap<String, String>,
    /// Every delivery of the main topic.
    pub deliveries: Vec<Seen>,
    /// Messages whose Ack succeeded.
    pub acked: BTreeSet<String>,
    /// Acks refused because the delivery was stale or the message gone (someone else's now).
    pub ack_refused: u64,
    /// Messages found in the dead-letter topic, with their attributes.
    pub dead: BTreeMap<String, BTreeMap<String, String>>,
    /// Deliveries dropped by a consumer that "crashed" (never acked).
    pub dropped: u64,
}

impl QueueLedger {
    /// Runs `f` on the ledger.
    pub fn with<T>(&self, f: impl FnOnce(&mut LedgerInner) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Published messages neither acknowledged nor dead-lettered yet.
    pub fn outstanding(&self) -> usize {
        self.with(|l| {
            l.published
                .keys()
                .filter(|id| !l.acked.contains(*id) && !l.dead.contains_key(*id))
                .count()
        })
    }
}
