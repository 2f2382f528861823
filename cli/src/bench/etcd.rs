//! The etcd target: the same workloads on etcd, for `bench raw|locks --compare-etcd`.
//!
//! To compare like with like, the clients talk to etcd's leader, as they do to syncd's: each
//! given endpoint is asked for `Maintenance.Status`, which names the leader's member id and the
//! answering member's own id; the endpoint whose id is the leader's is used. (etcd followers
//! would forward writes to the leader, adding a hop syncd's measurement does not have.)
//!
//! - `bench raw`: a put is one `KV.Put` (`PutRequest{key, value}`, no lease, no prev_kv): the
//!   simplest replicated write etcd has. etcd acknowledges a put once a majority has it in its
//!   fsynced WAL and the leader applied it, the same durability point as syncd's.
//! - `bench locks`: etcd's own lock API, the one `etcdctl lock` and the Go `concurrency` package
//!   stand for. Each client gets a lease (`Lease.LeaseGrant`, etcd's session) before the clock
//!   starts, with a TTL that outlives the run; an acquire is `v3lockpb.Lock/Lock{name, lease}`,
//!   which waits server-side until the lock is the client's and returns the key that holds it;
//!   a release is `v3lockpb.Lock/Unlock{key}`. After the run each lease is revoked.
//!
//! The clients are generated from the subset of etcd's protos vendored in `cli/proto/etcd`
//! (see its README), compiled by `build.rs`.

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use tonic::transport::Channel;

use self::proto::etcdserverpb::kv_client::KvClient;
use self::proto::etcdserverpb::lease_client::LeaseClient;
use self::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use self::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest, StatusRequest,
};
use self::proto::v3lockpb::lock_client::LockClient;
use self::proto::v3lockpb::{LockRequest, UnlockRequest};
use super::driver::Call;
use super::locks::{LockTarget, Locker};
use super::raw::{KvTarget, Putter};
use super::request;
use crate::args::Endpoint;
use crate::cluster::connect;
use crate::errors::describe_status;

/// Code generated from `cli/proto/etcd`. The packages must be siblings: `etcdserverpb` refers
/// to `super::mvccpb`, `v3lockpb` to `super::etcdserverpb`.
#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
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
            answer(
                MaintenanceClient::new(channel)
                    .status(StatusRequest {})
                    .await,
            )
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
        "no etcd member reachable at {}; is etcd running? (benches/raw_vs_etcd.sh and \
         benches/locks_vs_etcd.sh start a 3-member cluster)",
        reasons.join(", ")
    )
}

/// An answer's message, or what went wrong in words.
fn answer<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Result<T, String> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|status| describe_status(&status))
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

impl EtcdTarget {
    /// The connection of client `index`.
    fn channel(&self, index: usize) -> Channel {
        self.channels[index % self.channels.len()].clone()
    }
}

impl KvTarget for EtcdTarget {
    type Putter = EtcdPutter;

    fn putter(&self, index: usize) -> EtcdPutter {
        EtcdPutter {
            client: KvClient::new(self.channel(index)),
            rpc_timeout: self.rpc_timeout,
        }
    }

    fn endpoint(&self) -> String {
        self.endpoint.to_string()
    }

    async fn read_back(&self, key: Bytes) -> Result<Option<Bytes>, String> {
        // serializable = false: a linearizable read, like syncd's default.
        let message = RangeRequest {
            key,
            ..Default::default()
        };
        let range = answer(
            KvClient::new(self.channel(0))
                .range(request(message, self.rpc_timeout))
                .await,
        )?;
        Ok(range.kvs.into_iter().next().map(|kv| kv.value))
    }
}

pub struct EtcdPutter {
    client: KvClient<Channel>,
    rpc_timeout: Duration,
}

impl Putter for EtcdPutter {
    async fn put(&mut self, key: Bytes, value: Bytes) -> Call<()> {
        let message = PutRequest {
            key,
            value,
            ..Default::default()
        };
        // No retries: etcd has no request de-duplication, and on a healthy cluster with unique
        // keys a put does not fail; a failure is counted as an error.
        Call::once(answer(self.client.put(request(message, self.rpc_timeout)).await).map(drop))
    }
}

impl LockTarget for EtcdTarget {
    type Locker = EtcdLocker;

    async fn locker(
        &self,
        index: usize,
        name: String,
        ttl: Duration,
    ) -> Result<EtcdLocker, String> {
        let channel = self.channel(index);
        let grant = LeaseGrantRequest {
            // etcd counts in whole seconds; round up so the lease outlives the run too.
            ttl: i64::try_from(ttl.as_secs() + 1).unwrap_or(i64::MAX),
            id: 0,
        };
        let lease = answer(
            LeaseClient::new(channel.clone())
                .lease_grant(request(grant, self.rpc_timeout))
                .await,
        )?;
        if !lease.error.is_empty() {
            return Err(format!("etcd refused a lease: {}", lease.error));
        }
        Ok(EtcdLocker {
            locks: LockClient::new(channel.clone()),
            leases: LeaseClient::new(channel),
            lease: lease.id,
            name: Bytes::from(name),
            rpc_timeout: self.rpc_timeout,
        })
    }

    fn endpoint(&self) -> String {
        self.endpoint.to_string()
    }
}

/// An etcd client with its own lease, taking one lock.
pub struct EtcdLocker {
    locks: LockClient<Channel>,
    leases: LeaseClient<Channel>,
    /// The lease every Lock of this client is attached to.
    lease: i64,
    /// The lock this client takes.
    name: Bytes,
    rpc_timeout: Duration,
}

impl Locker for EtcdLocker {
    /// The key that holds the lock, which Unlock deletes.
    type Held = Bytes;

    async fn acquire(&mut self) -> Call<Bytes> {
        let message = LockRequest {
            name: self.name.clone(),
            lease: self.lease,
        };
        // No retries, as for puts: a failure is counted as an error.
        let answer = answer(self.locks.lock(request(message, self.rpc_timeout)).await);
        Call::once(answer.map(|locked| locked.key))
    }

    async fn release(&mut self, key: Bytes) -> Call<()> {
        let message = UnlockRequest { key };
        Call::once(answer(self.locks.unlock(request(message, self.rpc_timeout)).await).map(drop))
    }

    async fn close(mut self) -> Result<(), String> {
        let message = LeaseRevokeRequest { id: self.lease };
        answer(
            self.leases
                .lease_revoke(request(message, self.rpc_timeout))
                .await,
        )
        .map(drop)
    }
}
