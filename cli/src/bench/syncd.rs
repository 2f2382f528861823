//! The syncd target: Kv.Put on the leader, with a RequestHeader, following redirects.
//!
//! Each benchmark client is one syncd client in the sense of `common.proto`: it has its own
//! random `client_id` and numbers its puts 1, 2, 3, ... With one put in flight per client,
//! every put below the current one has been answered, so `lowest_unacked` is the current
//! sequence and the server can drop each answer as soon as the next put arrives. A put that is
//! retried (redirect, UNAVAILABLE) repeats its header, so it is applied at most once.
//!
//! All clients share a small pool of HTTP/2 connections to the leader (`--connections`,
//! default one: gRPC multiplexes concurrent calls on one connection). When a node answers with
//! an `x-sync-leader-addr` trailer naming another node, the pool is replaced by connections to
//! that node, once, for every client.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use sync_proto::sync::v1::kv_client::KvClient;
use sync_proto::sync::v1::{Consistency, KvGetRequest, KvPutRequest, RequestHeader};
use tokio::time::sleep;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::driver::{PutOutcome, Target, Worker};
use crate::args::parse_endpoint;
use crate::cluster::{connect, leader_hint};
use crate::errors::describe_status;

/// Attempts per put: the first plus redirects and retries.
const MAX_ATTEMPTS: u32 = 5;
/// First pause before retrying a put that met UNAVAILABLE without a leader hint (an election
/// is probably under way); doubled on each further retry.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

pub struct SyncdTarget {
    route: Arc<Route>,
    rpc_timeout: Duration,
}

impl SyncdTarget {
    /// Opens `connections` connections to `leader` (`host:port`) before the clock starts, so
    /// connection setup is never part of a measured put.
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
}

impl Target for SyncdTarget {
    type Worker = SyncdWorker;

    fn worker(&self, index: usize) -> SyncdWorker {
        SyncdWorker {
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

    async fn read_back(&self, key: Bytes) -> Result<Option<Bytes>, String> {
        let pool = self.route.get();
        let mut request = tonic::Request::new(KvGetRequest {
            key,
            consistency: Consistency::Linearizable as i32,
        });
        request.set_timeout(self.rpc_timeout);
        let answer = KvClient::new(pool.channels[0].clone())
            .get(request)
            .await
            .map_err(|status| describe_status(&status))?
            .into_inner();
        Ok(answer.found.then_some(answer.value))
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

pub struct SyncdWorker {
    route: Arc<Route>,
    /// Which connection of the pool this client uses.
    slot: usize,
    client_id: u64,
    /// The sequence number of the last put sent.
    sequence: u64,
    rpc_timeout: Duration,
}

impl Worker for SyncdWorker {
    async fn put(&mut self, key: Bytes, value: Bytes) -> PutOutcome {
        self.sequence += 1;
        let header = RequestHeader {
            client_id: self.client_id,
            sequence: self.sequence,
            lowest_unacked: self.sequence,
        };
        let mut retries = 0;
        loop {
            let pool = self.route.get();
            let channel = pool.channels[self.slot % pool.channels.len()].clone();
            let mut request = tonic::Request::new(KvPutRequest {
                header: Some(header),
                key: key.clone(),
                value: value.clone(),
            });
            request.set_timeout(self.rpc_timeout);
            let status = match KvClient::new(channel).put(request).await {
                Ok(_) => {
                    return PutOutcome {
                        result: Ok(()),
                        retries,
                    };
                }
                Err(status) => status,
            };
            let give_up = |status: &tonic::Status| PutOutcome {
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
