//! Assembles a serving node: the Raft transport and the public services on one gRPC port,
//! standard health checking and server reflection, and the metrics endpoint; then runs until a
//! shutdown signal (a leader hands leadership over first) or a storage failure.
//!
//! **Health** (`grpc.health.v1.Health`, and `GET /healthz` on the metrics port): SERVING while
//! the node knows a leader and its applied index trails its commit index by at most
//! [`HEALTH_MAX_APPLY_LAG`] entries; NOT_SERVING otherwise (during an election, when cut off
//! from the leader long enough to start an election, or while catching up after a restart).
//! The service name "" and every public service name report the same status.

use std::future::Future;
use std::sync::Arc;

use sync_proto::internal::v1::cache_protocol_server::CacheProtocolServer;
use sync_proto::raft::v1::raft_server::RaftServer;
use sync_proto::sync::v1::cache_server::CacheServer;
use sync_proto::sync::v1::cluster_server::ClusterServer;
use sync_proto::sync::v1::kv_server::KvServer;
use sync_proto::sync::v1::lock_server::LockServer;
use sync_proto::sync::v1::queue_server::QueueServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::api::Forwarder;
use crate::api::cache::CacheService;
use crate::api::cluster::ClusterService;
use crate::api::kv::KvService;
use crate::api::lock::LockService;
use crate::api::queue::{MAX_GRPC_MESSAGE, QueueService};
use crate::metrics::{self, GrpcMetricsLayer, HealthReport};
use crate::node::config::Settings;
use crate::node::driver::NodeStatus;
use crate::node::transport::{MAX_MESSAGE_BYTES, RaftService};
use crate::node::{self, NodeError, StartError};

/// Largest apply lag (entries) at which a node still reports SERVING.
pub const HEALTH_MAX_APPLY_LAG: u64 = 1000;

/// The path of `sync.v1.Cache/Get`, whose span is at debug level (see `serve`).
const CACHE_GET_PATH: &str = "/sync.v1.Cache/Get";

/// The public services whose health is reported.
const SERVICES: [&str; 5] = [
    "sync.v1.Cache",
    "sync.v1.Cluster",
    "sync.v1.Kv",
    "sync.v1.Lock",
    "sync.v1.Queue",
];

/// Why a node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The node could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The node stopped because of an error.
    #[error("node stopped: {0}")]
    Node(#[from] NodeError),
    /// The metrics recorder could not be installed.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(String),
    /// The cache's memory backend could not be set up.
    #[error("cache backend: {0}")]
    Cache(String),
}

/// The health rule (see the module docs), without the explanation.
pub fn is_serving(s: &NodeStatus) -> bool {
    s.leader.is_some() && s.commit.saturating_sub(s.applied) <= HEALTH_MAX_APPLY_LAG
}

/// The health rule (see the module docs), with a one-line explanation.
pub fn health_of(s: &NodeStatus) -> HealthReport {
    match s.leader {
        None => HealthReport::unhealthy(format!("no leader known in term {}", s.term)),
        Some(_) if s.commit.saturating_sub(s.applied) > HEALTH_MAX_APPLY_LAG => {
            HealthReport::unhealthy(format!(
                "catching up: applied {} of {} committed entries",
                s.applied, s.commit
            ))
        }
        Some(leader) => HealthReport::healthy(format!(
            "node {} {:?} in term {}, leader {leader}, applied {}",
            s.id, s.role, s.term, s.applied
        )),
    }
}

/// Runs a node until `shutdown` completes (then stops gracefully) or the node fails.
pub async fn serve(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    // Also describes every metric and records the build info.
    let prometheus = metrics::install_recorder().map_err(|e| ServeError::Metrics(e.to_string()))?;
    metrics::record::node_info(settings.id);

    let listen = settings.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?,
        ),
        None => None,
    };
    let rpc_timeout = settings.election_timeout * 2;
    let running = node::start(settings)?;
    let node = running.handle.clone();

    // Health follows the node's status.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let mut status_rx = node.watch_status();
    let health_task = tokio::spawn(async move {
        let mut last = None;
        loop {
            let serving = is_serving(&status_rx.borrow_and_update());
            if last != Some(serving) {
                let s = if serving {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status("", s).await;
                for name in SERVICES {
                    reporter.set_service_status(name, s).await;
                }
                last = Some(serving);
            }
            if status_rx.changed().await.is_err() {
                return;
            }
        }
    });

    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Grpc(format!("reflection: {e}")))?;
    // grpcurl 1.8 speaks only the v1alpha reflection protocol.
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Grpc(format!("reflection: {e}")))?;

    let forwarder = Arc::new(Forwarder::new(node.settings.tls.clone()));
    let backend = match &node.settings.cache_backend {
        node::config::CacheBackend::Raft => node::cache::MemoryBackend::Raft,
        node::config::CacheBackend::Redis(url) => node::cache::MemoryBackend::Redis(
            node::cache::redis_memory::RedisMemory::connect(
                url,
                &node.settings.cluster_id,
                node.settings.id,
            )
            .map_err(|e| ServeError::Cache(e.to_string()))?,
        ),
    };
    let cache = node::cache::spawn(node.clone(), node.settings.cache.clone(), backend);
    let raft_service = RaftServer::new(RaftService {
        driver: running.handle.inputs(),
        timeout: rpc_timeout,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &node.settings.tls {
        // The material was checked when the settings were resolved; this builds it again.
        builder = builder
            .tls_config(tls.server_config())
            .map_err(|e| ServeError::Grpc(format!("TLS: {e}")))?;
    }
    let grpc = builder
        .tcp_nodelay(true)
        // A span per request: every log line a call causes names the RPC it belongs to. Cache
        // Gets, which are mostly hits served in a few microseconds, get theirs at debug level:
        // at the default info level an enabled span (its fields formatted, entered on every
        // poll) is a measurable share of a hit, and a hit logs nothing anyway.
        .trace_fn(|req| {
            let path = req.uri().path();
            let forwarded = req.headers().contains_key(crate::api::FORWARDED);
            if path == CACHE_GET_PATH {
                tracing::debug_span!("rpc", path, forwarded)
            } else {
                tracing::info_span!("rpc", path, forwarded)
            }
        })
        .layer(GrpcMetricsLayer::new())
        .add_service(raft_service)
        .add_service(CacheProtocolServer::new(
            node::cache::transport::CacheProtocolService {
                cache: cache.clone(),
            },
        ))
        .add_service(CacheServer::new(CacheService {
            node: node.clone(),
            cache,
        }))
        .add_service(ClusterServer::new(ClusterService {
            node: node.clone(),
            forwarder: forwarder.clone(),
        }))
        .add_service(LockServer::new(LockService {
            node: node.clone(),
            forwarder: forwarder.clone(),
        }))
        .add_service(
            QueueServer::new(QueueService::new(node.clone(), forwarder.clone()))
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(KvServer::new(KvService {
            node: node.clone(),
            forwarder,
        }))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // Accepted sockets get TCP_NODELAY here: `Server::tcp_nodelay` applies only to sockets
        // tonic binds itself. Without it a small answer waits for the peer's delayed ACK (40 ms
        // on Linux) whenever an earlier segment is unacknowledged: measured as a 38 ms p90.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );
    let grpc_task = tokio::spawn(grpc);
    let metrics_task = metrics_listener.map(|l| {
        let status = node.watch_status();
        tokio::spawn(metrics::serve(
            l,
            prometheus,
            move || health_of(&status.borrow()),
            stopped(stop_rx.clone()),
        ))
    });
    tracing::info!(
        node_id = node.settings.id,
        %listen,
        tls = node.settings.tls.is_some(),
        client_cert_auth = node.settings.tls.as_ref().is_some_and(|t| t.client_cert_auth()),
        "serving"
    );

    let mut driver = running.driver;
    let outcome = tokio::select! {
        _ = shutdown => {
            tracing::info!("shutdown requested");
            node.shutdown();
            driver.await
        }
        r = &mut driver => r,
    };
    let _ = stop_tx.send(true);
    health_task.abort();
    let _ = grpc_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    let wal = running.wal_thread;
    let _ = tokio::task::spawn_blocking(move || wal.join()).await;
    match outcome {
        Ok(Ok(())) => {
            tracing::info!("stopped");
            Ok(())
        }
        Ok(Err(e)) => Err(ServeError::Node(e)),
        Err(join) => Err(ServeError::Grpc(format!("driver task failed: {join}"))),
    }
}

/// Reflection over every syncd service and grpc.health.v1 (the builder is not Clone: the v1 and
/// v1alpha services each need their own).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sync_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}
