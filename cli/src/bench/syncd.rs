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
//! All clients share a small pool of HTTP/2 connections to the leader (`--connections`,
//! default one: gRPC multiplexes concurrent calls on one connection). When a node answers with
//! an `x-sync-leader-addr` trailer naming another node, the pool is replaced by connections to
//! that node, once, for every client.

use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use sync_proto::sync::v1::kv_client::KvClient;
use sync_proto::sync::v1::lock_client::LockClient;
use sync_proto::sync::v1::{
    AcquireRequest, Consistency, CreateSessionRequest, KvGetRequest, KvPutRequest, LockMode,
    ReleaseRequest, RequestHeader, RevokeSessionRequest,
};
use tokio::time::sleep;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::driver::Call;
use super::locks::{LockTarget, Locker};
use super::raw::{KvTarget, Putter};
use super::request;
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
            client_id: new_client_id(),
            sequence: 0,
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

/// 64 random bits, never 0 (0 means "not de-duplicated").
fn new_client_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
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
    client_id: u64,
    /// The sequence number of the last mutating call sent.
    sequence: u64,
    rpc_timeout: Duration,
}

impl SyncdClient {
    /// The header of a new mutating call (the previous one has been answered).
    fn next_header(&mut self) -> RequestHeader {
        self.sequence += 1;
        RequestHeader {
            client_id: self.client_id,
            sequence: self.sequence,
            lowest_unacked: self.sequence,
        }
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
