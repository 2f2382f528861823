//! The etcd target: the same workload on etcd's `KV.Put` (`/etcdserverpb.KV/Put`), for
//! `bench raw --compare-etcd`.
//!
//! To compare like with like, the clients talk to etcd's leader, as they do to syncd's: each
//! given endpoint is asked for `Maintenance.Status`, which names the leader's member id and the
//! answering member's own id; the endpoint whose id is the leader's is used. (etcd followers
//! would forward puts to the leader, adding a hop syncd's measurement does not have.) A put is
//! one `PutRequest{key, value}`, no lease, no prev_kv: the simplest replicated write etcd has.
//! etcd acknowledges a put once a majority has it in its fsynced WAL and the leader applied it,
//! the same durability point as syncd's.
//!
//! The client is generated from the subset of etcd's protos vendored in `cli/proto/etcd`
//! (see its README), compiled by `build.rs`.

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use tonic::transport::Channel;

use self::proto::etcdserverpb::kv_client::KvClient;
use self::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use self::proto::etcdserverpb::{PutRequest, RangeRequest, StatusRequest};
use super::driver::{PutOutcome, Target, Worker};
use crate::args::Endpoint;
use crate::cluster::connect;
use crate::errors::describe_status;

/// Code generated from `cli/proto/etcd`. The two packages must be siblings: `etcdserverpb`
/// refers to `super::mvccpb`.
#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
}

/// Finds the etcd member that leads, among `endpoints`. If the leader is not among them (the
/// list names only some members), the first member that answered is used, and the returned
/// flag is false.
pub async fn find_leader(
    endpoints: &[Endpoint],
    rpc_timeout: Duration,
) -> anyhow::Result<(Endpoint, bool)> {
    let answers = join_all(endpoints.iter().map(|endpoint| async move {
        let status = async {
            let channel = connect(endpoint, rpc_timeout).await?;
            MaintenanceClient::new(channel)
                .status(StatusRequest {})
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| describe_status(&status))
        };
        (endpoint, status.await)
    }))
    .await;

    let leader_id = answers
        .iter()
        .filter_map(|(_, a)| a.as_ref().ok())
        .map(|s| s.leader)
        .find(|&id| id != 0);
    let member_id = |status: &proto::etcdserverpb::StatusResponse| {
        status.header.as_ref().map_or(0, |h| h.member_id)
    };
    if let Some(leader_id) = leader_id
        && let Some((endpoint, _)) = answers
            .iter()
            .find(|(_, a)| a.as_ref().is_ok_and(|s| member_id(s) == leader_id))
    {
        return Ok(((*endpoint).clone(), true));
    }
    if let Some((endpoint, _)) = answers.iter().find(|(_, a)| a.is_ok()) {
        return Ok(((*endpoint).clone(), false));
    }
    let reasons: Vec<String> = answers
        .iter()
        .map(|(e, a)| format!("{e} ({})", a.as_ref().err().map_or("", String::as_str)))
        .collect();
    anyhow::bail!(
        "no etcd member reachable at {}; is etcd running? (benches/raw_vs_etcd.sh starts a \
         3-member cluster)",
        reasons.join(", ")
    )
}

pub struct EtcdTarget {
    endpoint: Endpoint,
    channels: Vec<Channel>,
    rpc_timeout: Duration,
}

impl EtcdTarget {
    /// Opens `connections` connections to `endpoint` before the clock starts.
    pub async fn connect(
        endpoint: &Endpoint,
        connections: usize,
        rpc_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            let channel = connect(endpoint, rpc_timeout).await.map_err(|reason| {
                anyhow::anyhow!("cannot connect to etcd at {endpoint}: {reason}")
            })?;
            channels.push(channel);
        }
        Ok(EtcdTarget {
            endpoint: endpoint.clone(),
            channels,
            rpc_timeout,
        })
    }
}

impl Target for EtcdTarget {
    type Worker = EtcdWorker;

    fn worker(&self, index: usize) -> EtcdWorker {
        EtcdWorker {
            client: KvClient::new(self.channels[index % self.channels.len()].clone()),
            rpc_timeout: self.rpc_timeout,
        }
    }

    fn endpoint(&self) -> String {
        self.endpoint.to_string()
    }

    async fn read_back(&self, key: Bytes) -> Result<Option<Bytes>, String> {
        // serializable = false: a linearizable read, like syncd's default.
        let mut request = tonic::Request::new(RangeRequest {
            key,
            ..Default::default()
        });
        request.set_timeout(self.rpc_timeout);
        let answer = KvClient::new(self.channels[0].clone())
            .range(request)
            .await
            .map_err(|status| describe_status(&status))?
            .into_inner();
        Ok(answer.kvs.into_iter().next().map(|kv| kv.value))
    }
}

pub struct EtcdWorker {
    client: KvClient<Channel>,
    rpc_timeout: Duration,
}

impl Worker for EtcdWorker {
    async fn put(&mut self, key: Bytes, value: Bytes) -> PutOutcome {
        let mut request = tonic::Request::new(PutRequest {
            key,
            value,
            ..Default::default()
        });
        request.set_timeout(self.rpc_timeout);
        // No retries: etcd has no request de-duplication, and on a healthy cluster with unique
        // keys a put does not fail; a failure is counted as an error.
        let result = self
            .client
            .put(request)
            .await
            .map(drop)
            .map_err(|status| describe_status(&status));
        PutOutcome { result, retries: 0 }
    }
}
