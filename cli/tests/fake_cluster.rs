//! `syncctl` against in-process fake syncd nodes, for the behaviour a healthy real cluster
//! rarely shows: a node that names another leader in its trailers (the bench must follow it,
//! re-sending the same RequestHeader), and a partly unreachable cluster (status still answers).
//!
//! The fakes implement the public gRPC contract (`sync.v1.Cluster`, `sync.v1.Kv`) only as far
//! as the commands use it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sync_proto::sync::v1::cluster_server::{Cluster, ClusterServer};
use sync_proto::sync::v1::kv_server::{Kv, KvServer};
use sync_proto::sync::v1::*;
use tokio::net::TcpListener;
use tokio::process::Command;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// What a fake node does with a put.
#[derive(Clone)]
enum Behaviour {
    /// Believes itself leader in Cluster.Status, but answers every put UNAVAILABLE naming the
    /// real leader in `x-sync-leader-addr` (as a deposed leader that cannot forward would).
    Deposed { leader: SocketAddr },
    /// Accepts puts and serves gets.
    Leader,
}

/// One put as the fake leader received it.
#[derive(Clone, Debug)]
struct Received {
    header: RequestHeader,
}

#[derive(Clone)]
struct FakeNode {
    id: u64,
    address: SocketAddr,
    behaviour: Behaviour,
    puts: Arc<Mutex<Vec<Received>>>,
    rejected: Arc<Mutex<u64>>,
    store: Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>,
}

#[tonic::async_trait]
impl Cluster for FakeNode {
    async fn status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let address = self.address.to_string();
        Ok(Response::new(ClusterStatusResponse {
            node_id: self.id,
            address: address.clone(),
            role: Role::Leader as i32,
            term: 1,
            leader_id: self.id,
            leader_address: address.clone(),
            commit_index: 7,
            applied_index: 7,
            last_log_index: 7,
            snapshot_index: 0,
            members: vec![MemberStatus {
                id: self.id,
                address,
                reachable: true,
                ..Default::default()
            }],
        }))
    }

    async fn add_member(
        &self,
        _: Request<AddMemberRequest>,
    ) -> Result<Response<AddMemberResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn remove_member(
        &self,
        _: Request<RemoveMemberRequest>,
    ) -> Result<Response<RemoveMemberResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn promote_learner(
        &self,
        _: Request<PromoteLearnerRequest>,
    ) -> Result<Response<PromoteLearnerResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn transfer_leader(
        &self,
        _: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn snapshot(
        &self,
        _: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type WatchStream = futures::stream::Empty<Result<ClusterEvent, Status>>;

    async fn watch(
        &self,
        _: Request<ClusterWatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

#[tonic::async_trait]
impl Kv for FakeNode {
    async fn put(&self, request: Request<KvPutRequest>) -> Result<Response<KvPutResponse>, Status> {
        let put = request.into_inner();
        match &self.behaviour {
            Behaviour::Deposed { leader } => {
                *self.rejected.lock().unwrap() += 1;
                let mut status = Status::unavailable("not the leader and cannot forward");
                status
                    .metadata_mut()
                    .insert("x-sync-leader-addr", leader.to_string().parse().unwrap());
                status
                    .metadata_mut()
                    .insert("x-sync-leader-id", "2".parse().unwrap());
                Err(status)
            }
            Behaviour::Leader => {
                let header = put
                    .header
                    .ok_or_else(|| Status::invalid_argument("no header"))?;
                self.puts.lock().unwrap().push(Received { header });
                let mut store = self.store.lock().unwrap();
                let replaced = store.insert(put.key.to_vec(), put.value.to_vec()).is_some();
                Ok(Response::new(KvPutResponse {
                    index: store.len() as u64,
                    replaced,
                }))
            }
        }
    }

    async fn get(&self, request: Request<KvGetRequest>) -> Result<Response<KvGetResponse>, Status> {
        let key = request.into_inner().key;
        let store = self.store.lock().unwrap();
        let value = store.get(key.as_ref());
        Ok(Response::new(KvGetResponse {
            found: value.is_some(),
            value: value.cloned().unwrap_or_default().into(),
            modified_index: 0,
            read_index: store.len() as u64,
        }))
    }

    async fn delete(
        &self,
        _: Request<KvDeleteRequest>,
    ) -> Result<Response<KvDeleteResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Binds a port for a fake node and returns it with its address.
async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    (listener, address)
}

fn serve(listener: TcpListener, node: FakeNode) {
    tokio::spawn(
        Server::builder()
            .add_service(ClusterServer::new(node.clone()))
            .add_service(KvServer::new(node))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
}

fn fake(id: u64, address: SocketAddr, behaviour: Behaviour) -> FakeNode {
    FakeNode {
        id,
        address,
        behaviour,
        puts: Arc::default(),
        rejected: Arc::default(),
        store: Arc::default(),
    }
}

async fn syncctl(args: &[&str]) -> std::process::Output {
    let run = Command::new(env!("CARGO_BIN_EXE_syncctl"))
        .args(args)
        .env_remove("SYNC_ENDPOINTS")
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("syncctl did not finish within 60s")
        .expect("cannot run syncctl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_follows_the_leader_named_in_trailers_and_repeats_the_header() {
    let (leader_listener, leader_addr) = bind().await;
    let (deposed_listener, deposed_addr) = bind().await;
    let leader = fake(2, leader_addr, Behaviour::Leader);
    let deposed = fake(
        1,
        deposed_addr,
        Behaviour::Deposed {
            leader: leader_addr,
        },
    );
    serve(leader_listener, leader.clone());
    serve(deposed_listener, deposed.clone());

    // Only the deposed node is named: the bench starts there and must move.
    let output = syncctl(&[
        "--endpoints",
        &deposed_addr.to_string(),
        "--output",
        "json",
        "bench",
        "raw",
        "--clients",
        "4",
        "--duration",
        "1s",
        "--warmup",
        "0s",
        "--value-size",
        "64",
    ])
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    let syncd = &report["results"][0];
    assert_eq!(syncd["target"], "syncd");
    assert_eq!(syncd["endpoint"], leader_addr.to_string(), "{report}");
    assert_eq!(syncd["errors"], 0, "{report}");
    assert!(syncd["retries"].as_u64().unwrap() >= 1, "{report}");
    assert!(syncd["ops"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(syncd["read_back"]["checked"], 4, "{report}");
    assert_eq!(syncd["read_back"]["matched"], 4, "{report}");
    assert_eq!(report["workload"]["value_size"], 64);
    assert!(report["comparison"].is_null());
    assert!(*deposed.rejected.lock().unwrap() >= 1);

    // Every client numbered its puts 1, 2, 3, ... with lowest_unacked = sequence; a put first
    // sent to the deposed node arrived at the leader once, with the same header.
    let puts = leader.puts.lock().unwrap().clone();
    assert_eq!(puts.len() as u64, syncd["ops"].as_u64().unwrap());
    let mut by_client: HashMap<u64, Vec<u64>> = HashMap::new();
    for put in &puts {
        assert_ne!(put.header.client_id, 0);
        assert_eq!(put.header.lowest_unacked, put.header.sequence, "{put:?}");
        by_client
            .entry(put.header.client_id)
            .or_default()
            .push(put.header.sequence);
    }
    assert_eq!(by_client.len(), 4, "one client id per client");
    for (client, mut sequences) in by_client {
        sequences.sort_unstable();
        let expected: Vec<u64> = (1..=sequences.len() as u64).collect();
        assert_eq!(sequences, expected, "client {client:x}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_answering_and_unreachable_members() {
    let (listener, address) = bind().await;
    serve(listener, fake(1, address, Behaviour::Leader));
    let endpoints = format!("{address},127.0.0.1:1");

    let output = syncctl(&["--endpoints", &endpoints, "status"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "ID", "ADDRESS", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED"
        ]
    );
    assert_eq!(
        rows[1],
        ["1", &address.to_string(), "leader", "1", "1", "7", "7"]
    );
    assert_eq!(
        rows[2],
        ["-", "127.0.0.1:1", "unreachable", "-", "-", "-", "-"]
    );
    assert_eq!(stderr.trim(), "warning: 127.0.0.1:1: connection refused");

    let output = syncctl(&["--endpoints", &endpoints, "--output", "json", "status"]).await;
    assert!(output.status.success());
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["nodes"][0]["role"], "leader");
    assert_eq!(json["nodes"][0]["members"][0]["id"], 1);
    assert_eq!(json["nodes"][1]["reachable"], false);
    assert_eq!(json["nodes"][1]["error"], "connection refused");
}
