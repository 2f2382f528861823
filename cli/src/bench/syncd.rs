//! The syncd target: Kv.Put, or Lock.Acquire and Lock.Release, on the leader, with a
//! RequestHeader, following redirects.
//!
//! Each benchmark client is one syncd client in the sense of `common.proto`: it has its own
//! random `client_id` and numbers its mutating calls 1, 2, 3, ... With one call in flight per
//! client, every call below the current one has been answered, so `lowest_unacked` is the
//! current sequence and the server can drop each answer as soon as the next call arrives. A
//! call that is retried (redirect, UNAVAILABLE) repeats its header, so it is applied at most
//! once.
//!
//! A lock client also has its own session, opened (CreateSession) when the client is created,
//! before the clock starts, and revoked after the run. Its TTL outlives the run, so no
//! keep-alive competes with the measured calls. An Acquire waits server-side, up to the
//! request timeout (`--timeout`), for a lock another client holds.
//!
//! The queue and cache targets (`SyncdQueue`, `SyncdCache`) are at the end: they also talk to
//! nodes other than the leader (topic owners; every node's cache).
//!
//! All clients share a small pool of HTTP/2 connections to the leader (`--connections`,
//! default one: gRPC multiplexes concurrent calls on one connection). When a node answers with
//! an `x-sync-leader-addr` trailer naming another node, the pool is replaced by connections to
//! that node, once, for every client.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use sync_proto::sync::v1::cache_client::CacheClient;
use sync_proto::sync::v1::kv_client::KvClient;
use sync_proto::sync::v1::lock_client::LockClient;
use sync_proto::sync::v1::queue_client::QueueClient;
use sync_proto::sync::v1::{
    AckBatchRequest, AcquireRequest, CacheDeleteRequest, CacheGetRequest, CacheSetRequest,
    Consistency, ConsumeRequest, CreateSessionRequest, CreateTopicRequest, DeleteTopicRequest,
    KvGetRequest, KvPutRequest, LockMode, PublishBatchRequest, PublishEntry, PublishRequest,
    QueueStatsRequest, QueueStatsResponse, Receipt, ReleaseRequest, RequestHeader,
    RevokeSessionRequest, TopicSettings,
};
use tokio::time::sleep;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::cache::{CacheClient as CacheClientTrait, CacheTarget, delete_each};
use super::driver::Call;
use super::locks::{LockTarget, Locker};
use super::queue::{
    QueueClient as QueueClientTrait, QueueTarget, Received, VISIBILITY, delete_all, topic_name,
};
use super::raw::{KvTarget, Putter};
use super::{ClusterView, request};
use crate::args::parse_endpoint;
use crate::cluster::{connect, leader_hint};
use crate::errors::describe_status;

/// Attempts per call: the first plus redirects and retries.
const MAX_ATTEMPTS: u32 = 5;
/// First pause before retrying a call that met UNAVAILABLE without a leader hint (an election
/// is probably under way); doubled on each further retry.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

pub struct SyncdTarget {
    route: Arc<Route>,
    rpc_timeout: Duration,
}

impl SyncdTarget {
    /// Opens `connections` connections to `leader` (`host:port`) before the clock starts, so
    /// connection setup is never part of a measured call.
    pub async fn connect(
        leader: &str,
        connections: usize,
        rpc_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let endpoint = parse_endpoint(leader)
            .map_err(|e| anyhow::anyhow!("the cluster reported a bad leader address: {e}"))?;
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            let channel = connect(&endpoint, rpc_timeout).await.map_err(|reason| {
                anyhow::anyhow!("cannot connect to the leader at {leader}: {reason}")
            })?;
            channels.push(channel);
        }
        Ok(SyncdTarget {
            route: Arc::new(Route {
                current: RwLock::new(Arc::new(Pool {
                    address: leader.to_owned(),
                    channels,
                })),
                connections,
                rpc_timeout,
            }),
            rpc_timeout,
        })
    }

    /// A new client, with its own RequestHeader identity; `index` picks its connection.
    fn client(&self, index: usize) -> SyncdClient {
        SyncdClient {
            route: Arc::clone(&self.route),
            slot: index,
            identity: Identity::new(),
            rpc_timeout: self.rpc_timeout,
        }
    }

    fn endpoint(&self) -> String {
        self.route.get().address.clone()
    }
}

impl KvTarget for SyncdTarget {
    type Putter = SyncdClient;

    fn putter(&self, index: usize) -> SyncdClient {
        self.client(index)
    }

    fn endpoint(&self) -> String {
        SyncdTarget::endpoint(self)
    }

    async fn read_back(&self, key: Bytes) -> Result<Option<Bytes>, String> {
        let pool = self.route.get();
        let request = request(
            KvGetRequest {
                key,
                consistency: Consistency::Linearizable as i32,
            },
            self.rpc_timeout,
        );
        let answer = KvClient::new(pool.channels[0].clone())
            .get(request)
            .await
            .map_err(|status| describe_status(&status))?
            .into_inner();
        Ok(answer.found.then_some(answer.value))
    }
}

impl LockTarget for SyncdTarget {
    type Locker = SyncdLocker;

    async fn locker(
        &self,
        index: usize,
        name: String,
        ttl: Duration,
    ) -> Result<SyncdLocker, String> {
        let mut client = self.client(index);
        let create = CreateSessionRequest {
            header: Some(client.next_header()),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            client_name: format!("syncctl-bench-{index}"),
        };
        let session = client
            .call(create, |channel, r| async move {
                LockClient::new(channel).create_session(r).await
            })
            .await
            .result?;
        Ok(SyncdLocker {
            client,
            session_id: session.session_id,
            name,
            wait_ms: u64::try_from(self.rpc_timeout.as_millis()).unwrap_or(u64::MAX),
        })
    }

    fn endpoint(&self) -> String {
        SyncdTarget::endpoint(self)
    }
}

/// A benchmark client's RequestHeader identity: a random id and the sequence of its last
/// mutating call.
struct Identity {
    client_id: u64,
    sequence: u64,
}

impl Identity {
    /// 64 random bits, never 0 (0 means "not de-duplicated").
    fn new() -> Self {
        loop {
            let client_id: u64 = rand::random();
            if client_id != 0 {
                return Identity {
                    client_id,
                    sequence: 0,
                };
            }
        }
    }

    /// The header of a new mutating call (the previous one has been answered).
    fn next_header(&mut self) -> RequestHeader {
        self.next_headers(1).remove(0)
    }

    /// The headers of `n` mutating calls sent together (the previous ones all answered): each
    /// says the lowest unanswered sequence is the first of the group, so the server keeps every
    /// answer of the group until a later call says otherwise.
    fn next_headers(&mut self, n: usize) -> Vec<RequestHeader> {
        let lowest = self.sequence + 1;
        (0..n)
            .map(|_| {
                self.sequence += 1;
                RequestHeader {
                    client_id: self.client_id,
                    sequence: self.sequence,
                    lowest_unacked: lowest,
                }
            })
            .collect()
    }
}

/// The connections every client uses, replaced when a node names another leader.
struct Route {
    current: RwLock<Arc<Pool>>,
    connections: usize,
    rpc_timeout: Duration,
}

struct Pool {
    /// `host:port` of the node the pool connects to.
    address: String,
    channels: Vec<Channel>,
}

impl Route {
    fn get(&self) -> Arc<Pool> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Points every client at `leader`, unless another client already did (or the route has
    /// moved on from `seen` meanwhile). Connections are opened lazily, by the first put.
    fn redirect(&self, seen: &Pool, leader: &str) -> anyhow::Result<()> {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.address != seen.address || current.address == leader {
            return Ok(());
        }
        let endpoint = parse_endpoint(leader).map_err(anyhow::Error::msg)?;
        let channels = (0..self.connections)
            .map(|_| {
                Endpoint::from_shared(endpoint.uri())
                    .map(|e| {
                        e.connect_timeout(self.rpc_timeout)
                            .timeout(self.rpc_timeout)
                            .tcp_nodelay(true)
                            .connect_lazy()
                    })
                    .with_context(|| format!("bad leader address {leader}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        *current = Arc::new(Pool {
            address: leader.to_owned(),
            channels,
        });
        Ok(())
    }
}

/// One benchmark client of syncd: its RequestHeader identity and its slot in the pool.
pub struct SyncdClient {
    route: Arc<Route>,
    /// Which connection of the pool this client uses.
    slot: usize,
    identity: Identity,
    rpc_timeout: Duration,
}

impl SyncdClient {
    fn next_header(&mut self) -> RequestHeader {
        self.identity.next_header()
    }

    /// Sends `message` to the leader with `send`, following redirects and retrying while no
    /// leader is known, up to MAX_ATTEMPTS attempts in all. The message (and so its header) is
    /// the same on every attempt.
    async fn call<Req, Resp, F, Fut>(&self, message: Req, send: F) -> Call<Resp>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let mut retries = 0;
        loop {
            let pool = self.route.get();
            let channel = pool.channels[self.slot % pool.channels.len()].clone();
            let status = match send(channel, request(message.clone(), self.rpc_timeout)).await {
                Ok(answer) => {
                    return Call {
                        result: Ok(answer.into_inner()),
                        retries,
                    };
                }
                Err(status) => status,
            };
            let give_up = |status: &Status| Call {
                result: Err(describe_status(status)),
                retries,
            };
            if retries + 1 >= MAX_ATTEMPTS {
                return give_up(&status);
            }
            match (status.code(), leader_hint(&status)) {
                // "Ask that node": a node that could not (or does not) forward named the leader.
                (Code::Unavailable | Code::FailedPrecondition, Some(leader))
                    if leader != pool.address =>
                {
                    if self.route.redirect(&pool, &leader).is_err() {
                        return give_up(&status);
                    }
                }
                // No leader right now: an election is probably under way.
                (Code::Unavailable, _) => sleep(RETRY_PAUSE * 2u32.pow(retries)).await,
                _ => return give_up(&status),
            }
            retries += 1;
        }
    }
}

impl Putter for SyncdClient {
    async fn put(&mut self, key: Bytes, value: Bytes) -> Call<()> {
        let message = KvPutRequest {
            header: Some(self.next_header()),
            key,
            value,
        };
        self.call(message, |channel, r| async move {
            KvClient::new(channel).put(r).await
        })
        .await
        .and_then(|_| Ok(()))
    }
}

/// A syncd client with its own session, taking one lock exclusively.
pub struct SyncdLocker {
    client: SyncdClient,
    session_id: u64,
    /// The lock this client takes.
    name: String,
    /// How long an Acquire waits server-side for the grant: the request timeout.
    wait_ms: u64,
}

impl Locker for SyncdLocker {
    type Held = ();

    async fn acquire(&mut self) -> Call<()> {
        let message = AcquireRequest {
            header: Some(self.client.next_header()),
            name: self.name.clone(),
            session_id: self.session_id,
            client_id: String::new(),
            mode: LockMode::Exclusive as i32,
            wait_timeout_ms: self.wait_ms,
            lock_delay_ms: 0,
        };
        self.client
            .call(message, |channel, r| async move {
                LockClient::new(channel).acquire(r).await
            })
            .await
            .and_then(|answer| {
                if answer.granted {
                    Ok(())
                } else {
                    Err(format!("{} was not granted", self.name))
                }
            })
    }

    async fn release(&mut self, (): ()) -> Call<()> {
        let message = ReleaseRequest {
            header: Some(self.client.next_header()),
            name: self.name.clone(),
            session_id: self.session_id,
            client_id: String::new(),
        };
        self.client
            .call(message, |channel, r| async move {
                LockClient::new(channel).release(r).await
            })
            .await
            .and_then(|_| Ok(()))
    }

    async fn close(mut self) -> Result<(), String> {
        let message = RevokeSessionRequest {
            header: Some(self.client.next_header()),
            session_id: self.session_id,
        };
        self.client
            .call(message, |channel, r| async move {
                LockClient::new(channel).revoke_session(r).await
            })
            .await
            .result
            .map(drop)
    }
}

/// One connection to each voter, by address, opened before the clock starts.
async fn connect_all(
    voters: &[(u64, String)],
    rpc_timeout: Duration,
) -> anyhow::Result<HashMap<String, Channel>> {
    let mut channels = HashMap::new();
    for (id, address) in voters {
        let endpoint = parse_endpoint(address)
            .map_err(|e| anyhow::anyhow!("node {id} has a bad address: {e}"))?;
        let channel = connect(&endpoint, rpc_timeout).await.map_err(|reason| {
            anyhow::anyhow!("cannot connect to node {id} at {address}: {reason}")
        })?;
        channels.insert(address.clone(), channel);
    }
    Ok(channels)
}

/// The syncd queue: publishes and acks to the leader (through the leader pool, following
/// redirects), consumes straight to each topic's owner (the node that serves its consumers;
/// a Consume sent elsewhere would be forwarded there, one hop more).
pub struct SyncdQueue {
    leader: SyncdTarget,
    /// A connection to every voter, by address.
    nodes: HashMap<String, Channel>,
    /// Each topic's owner, by address, as Stats reported it when the topic was created.
    owners: Mutex<HashMap<String, String>>,
    rpc_timeout: Duration,
}

impl SyncdQueue {
    pub async fn connect(
        view: &ClusterView,
        connections: usize,
        rpc_timeout: Duration,
    ) -> anyhow::Result<Self> {
        Ok(SyncdQueue {
            leader: SyncdTarget::connect(&view.leader.address, connections, rpc_timeout).await?,
            nodes: connect_all(&view.voters, rpc_timeout).await?,
            owners: Mutex::new(HashMap::new()),
            rpc_timeout,
        })
    }

    async fn stats_status(&self, topic: &str) -> Result<QueueStatsResponse, Status> {
        let request = request(
            QueueStatsRequest {
                topic: topic.to_owned(),
            },
            self.rpc_timeout,
        );
        let pool = self.leader.route.get();
        QueueClient::new(pool.channels[0].clone())
            .stats(request)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn stats(&self, topic: &str) -> Result<QueueStatsResponse, String> {
        self.stats_status(topic)
            .await
            .map_err(|status| describe_status(&status))
    }

    /// The owner of a topic just created. Stats is answered by the owner, which may not have
    /// applied the CreateTopic yet when the leader acknowledged it: NOT_FOUND is retried for a
    /// while.
    async fn owner_of(&self, topic: &str) -> anyhow::Result<String> {
        let give_up = tokio::time::Instant::now() + self.rpc_timeout;
        loop {
            match self.stats_status(topic).await {
                Ok(stats) => return Ok(stats.owner_address),
                Err(status)
                    if status.code() == Code::NotFound && tokio::time::Instant::now() < give_up =>
                {
                    sleep(RETRY_PAUSE).await;
                }
                Err(status) => {
                    anyhow::bail!("Stats {topic}: {}", describe_status(&status))
                }
            }
        }
    }

    async fn delete_topic(&self, client: &mut SyncdClient, name: String) -> Result<(), String> {
        let message = DeleteTopicRequest {
            header: Some(client.next_header()),
            name,
        };
        client
            .call(message, |channel, r| async move {
                QueueClient::new(channel).delete_topic(r).await
            })
            .await
            .result
            .map(drop)
    }
}

/// At most this many candidate names per wanted topic while spreading owners.
const CANDIDATES_PER_TOPIC: usize = 8;

impl QueueTarget for SyncdQueue {
    type Client = SyncdQueueClient;

    /// Creates topics until `count` are kept, keeping a candidate only while its owner has
    /// fewer than its share (count / nodes, rounded up), so that the owners share the load
    /// evenly; a rejected candidate is deleted. If the hash keeps refusing (more than
    /// CANDIDATES_PER_TOPIC tries per topic), the last candidates are kept as they fall.
    async fn create_topics(&self, prefix: &str, count: usize) -> anyhow::Result<Vec<String>> {
        let share = count.div_ceil(self.nodes.len().max(1));
        let mut per_owner: HashMap<String, usize> = HashMap::new();
        let mut kept = Vec::with_capacity(count);
        let mut client = self.leader.client(0);
        let budget = count * CANDIDATES_PER_TOPIC;
        for k in 0.. {
            if kept.len() == count {
                break;
            }
            let name = topic_name(prefix, k);
            let create = CreateTopicRequest {
                header: Some(client.next_header()),
                name: name.clone(),
                settings: Some(TopicSettings {
                    visibility_timeout_ms: VISIBILITY_MS,
                    ..TopicSettings::default()
                }),
            };
            client
                .call(create, |channel, r| async move {
                    QueueClient::new(channel).create_topic(r).await
                })
                .await
                .result
                .map_err(|reason| anyhow::anyhow!("CreateTopic {name}: {reason}"))?;
            let owner = self.owner_of(&name).await?;
            let held = per_owner.entry(owner.clone()).or_default();
            let out_of_budget = k + (count - kept.len()) >= budget;
            if *held < share || out_of_budget {
                *held += 1;
                self.owners
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(name.clone(), owner);
                kept.push(name);
            } else {
                self.delete_topic(&mut client, name.clone())
                    .await
                    .map_err(|reason| anyhow::anyhow!("DeleteTopic {name}: {reason}"))?;
            }
        }
        Ok(kept)
    }

    async fn client(&self, index: usize, topic: &str) -> anyhow::Result<SyncdQueueClient> {
        let owner = self
            .owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
            .cloned()
            .with_context(|| format!("topic {topic} was not created by this run"))?;
        let consume_to = match self.nodes.get(&owner) {
            Some(channel) => channel.clone(),
            None => connect(
                &parse_endpoint(&owner).map_err(anyhow::Error::msg)?,
                self.rpc_timeout,
            )
            .await
            .map_err(|reason| anyhow::anyhow!("cannot connect to owner {owner}: {reason}"))?,
        };
        Ok(SyncdQueueClient {
            client: self.leader.client(index),
            topic: topic.to_owned(),
            owner: consume_to,
            visibility_ms: VISIBILITY_MS,
        })
    }

    fn endpoint(&self) -> String {
        self.leader.endpoint()
    }

    async fn stored(&self, topic: &str) -> Result<u64, String> {
        let s = self.stats(topic).await?;
        Ok(s.visible + s.in_flight + s.delayed)
    }

    async fn outstanding(&self, topic: &str) -> Result<u64, String> {
        self.stored(topic).await
    }

    async fn delete_topics(&self, topics: &[String]) -> Result<(), String> {
        delete_all(topics, |name| async move {
            let mut client = self.leader.client(0);
            self.delete_topic(&mut client, name).await
        })
        .await
    }
}

/// The visibility timeout of the bench's topics and deliveries (see queue.rs).
const VISIBILITY_MS: u64 = VISIBILITY.as_millis() as u64;

/// One benchmark client of the syncd queue.
pub struct SyncdQueueClient {
    client: SyncdClient,
    topic: String,
    /// The topic owner's connection, for Consume.
    owner: Channel,
    visibility_ms: u64,
}

impl QueueClientTrait for SyncdQueueClient {
    type Handle = Receipt;

    async fn publish(&mut self, payloads: Vec<Bytes>) -> Call<()> {
        let header = Some(self.client.next_header());
        let topic = self.topic.clone();
        if let [payload] = payloads.as_slice() {
            let message = PublishRequest {
                header,
                topic,
                payload: payload.clone(),
                ..PublishRequest::default()
            };
            return self
                .client
                .call(message, |channel, r| async move {
                    QueueClient::new(channel).publish(r).await
                })
                .await
                .and_then(|_| Ok(()));
        }
        let count = payloads.len();
        let message = PublishBatchRequest {
            header,
            topic,
            messages: payloads
                .into_iter()
                .map(|payload| PublishEntry {
                    payload,
                    ..PublishEntry::default()
                })
                .collect(),
        };
        self.client
            .call(message, |channel, r| async move {
                QueueClient::new(channel).publish_batch(r).await
            })
            .await
            .and_then(|answer| {
                if answer.results.len() == count {
                    Ok(())
                } else {
                    Err(format!(
                        "{} results for {count} messages",
                        answer.results.len()
                    ))
                }
            })
    }

    async fn consume(&mut self, max: u32, wait: Duration) -> Call<Vec<Received<Receipt>>> {
        let message = ConsumeRequest {
            header: Some(self.client.next_header()),
            topic: self.topic.clone(),
            max_messages: max,
            visibility_timeout_ms: self.visibility_ms,
            wait_time_ms: wait.as_millis() as u64,
        };
        // The long poll's wait plus the usual deadline.
        let answer = QueueClient::new(self.owner.clone())
            .consume(request(message, self.client.rpc_timeout + wait))
            .await;
        Call::once(
            answer
                .map_err(|status| describe_status(&status))
                .and_then(|answer| {
                    answer
                        .into_inner()
                        .deliveries
                        .into_iter()
                        .map(|d| {
                            let handle = d.receipt.ok_or_else(|| {
                                format!("delivery {} has no receipt", d.message_id)
                            })?;
                            Ok(Received {
                                payload: d.payload,
                                handle,
                            })
                        })
                        .collect()
                }),
        )
    }

    /// One AckBatch for the deliveries of a round: one replicated command, as one XACK of
    /// every id is on Redis. A receipt refused inside the batch is an error of the round.
    async fn ack(&mut self, handles: Vec<Receipt>) -> Call<()> {
        let header = self.client.identity.next_headers(1).pop();
        let count = handles.len();
        let message = AckBatchRequest {
            header,
            topic: self.topic.clone(),
            receipts: handles,
        };
        let acked = self
            .client
            .call(message, |channel, r| async move {
                QueueClient::new(channel).ack_batch(r).await
            })
            .await;
        let result = acked
            .result
            .and_then(|r| match r.results.iter().find(|x| x.code != 0) {
                None if r.acked as usize == count => Ok(()),
                None => Err(format!("AckBatch acknowledged {} of {count}", r.acked)),
                Some(refused) => Err(format!(
                    "AckBatch refused a receipt (code {}): {}",
                    refused.code, refused.message
                )),
            });
        Call {
            result,
            retries: acked.retries,
        }
    }
}

/// The syncd cache: every call to the node it names (cache calls are never forwarded), with
/// `--connections` connections per node.
pub struct SyncdCache {
    /// `channels[node][slot]`, nodes in id order.
    channels: Arc<Vec<Vec<Channel>>>,
    addresses: Vec<String>,
    rpc_timeout: Duration,
}

impl SyncdCache {
    pub async fn connect(
        view: &ClusterView,
        connections: usize,
        rpc_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut channels = Vec::with_capacity(view.voters.len());
        for _ in 0..connections.max(1) {
            let all = connect_all(&view.voters, rpc_timeout).await?;
            channels.push(all);
        }
        let addresses: Vec<String> = view.voters.iter().map(|(_, a)| a.clone()).collect();
        let per_node = addresses
            .iter()
            .map(|a| {
                channels
                    .iter()
                    .filter_map(|all| all.get(a).cloned())
                    .collect()
            })
            .collect();
        Ok(SyncdCache {
            channels: Arc::new(per_node),
            addresses,
            rpc_timeout,
        })
    }

    fn cache_client(&self, index: usize) -> SyncdCacheClient {
        SyncdCacheClient {
            channels: Arc::clone(&self.channels),
            slot: index,
            identity: Identity::new(),
            rpc_timeout: self.rpc_timeout,
        }
    }
}

impl CacheTarget for SyncdCache {
    type Client = SyncdCacheClient;

    fn nodes(&self) -> usize {
        self.addresses.len()
    }

    async fn client(&self, index: usize) -> anyhow::Result<SyncdCacheClient> {
        Ok(self.cache_client(index))
    }

    fn endpoint(&self) -> String {
        self.addresses.join(",")
    }

    async fn delete_keys(&self, keys: Vec<String>) -> Result<(), String> {
        delete_each(keys, |key| async move {
            let mut client = self.cache_client(0);
            let message = CacheDeleteRequest {
                header: Some(client.identity.next_header()),
                key,
            };
            CacheClient::new(client.channel(0))
                .delete(request(message, self.rpc_timeout))
                .await
                .map(drop)
                .map_err(|status| describe_status(&status))
        })
        .await
    }
}

/// One benchmark client of the syncd cache.
pub struct SyncdCacheClient {
    channels: Arc<Vec<Vec<Channel>>>,
    /// Which of each node's connections this client uses.
    slot: usize,
    identity: Identity,
    rpc_timeout: Duration,
}

impl SyncdCacheClient {
    fn channel(&self, node: usize) -> Channel {
        let on_node = &self.channels[node % self.channels.len()];
        on_node[self.slot % on_node.len()].clone()
    }
}

impl CacheClientTrait for SyncdCacheClient {
    async fn get(&mut self, node: usize, key: &str) -> Call<Option<bool>> {
        let message = CacheGetRequest {
            key: key.to_owned(),
        };
        let answer = CacheClient::new(self.channel(node))
            .get(request(message, self.rpc_timeout))
            .await;
        Call::once(
            answer
                .map_err(|status| describe_status(&status))
                .and_then(|answer| {
                    let answer = answer.into_inner();
                    if answer.found {
                        Ok(Some(answer.hit))
                    } else {
                        Err(format!("{key} is missing"))
                    }
                }),
        )
    }

    async fn set(&mut self, node: usize, key: &str, value: Bytes) -> Call<()> {
        let message = CacheSetRequest {
            header: Some(self.identity.next_header()),
            key: key.to_owned(),
            value,
            ttl_ms: 0,
        };
        let answer = CacheClient::new(self.channel(node))
            .set(request(message, self.rpc_timeout))
            .await;
        Call::once(answer.map(drop).map_err(|status| describe_status(&status)))
    }
}
