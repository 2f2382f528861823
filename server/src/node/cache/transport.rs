//! Carries the cache protocol between nodes: the `CacheProtocol.Deliver` service (receiving)
//! and [`Peers`], one outgoing queue per peer (sending). See `cache_protocol.proto` for why
//! delivery is batched, ordered per peer, lossy and never retried.

use std::collections::HashMap;
use std::time::Duration;

use sync_proto::internal::v1 as ipb;
use sync_proto::internal::v1::cache_protocol_client::CacheProtocolClient;
use sync_proto::internal::v1::cache_protocol_server::CacheProtocol;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::{CacheHandle, wire};
use crate::cache::NodeId;
use crate::node::tls::{NodeTls, peer_endpoint};

/// Messages queued for one peer beyond which new ones are dropped (lost, as the protocol
/// allows): a peer that cannot keep up must not make this node's memory grow without bound.
const QUEUE: usize = 4096;
/// Most messages in one Deliver call.
const MAX_BATCH: usize = 512;
/// A Deliver call that takes longer is abandoned (its batch is lost): a cut-off peer must not
/// hold its queue for long, since everything behind it is older by then.
const RPC_TIMEOUT: Duration = Duration::from_millis(1000);

/// The receiving side: hands every decodable message to the runtime.
pub struct CacheProtocolService {
    /// The node's cache runtime.
    pub cache: CacheHandle,
}

#[tonic::async_trait]
impl CacheProtocol for CacheProtocolService {
    async fn deliver(
        &self,
        request: Request<ipb::CacheBatch>,
    ) -> Result<Response<ipb::CacheDelivered>, Status> {
        let batch = request.into_inner();
        let from = batch.from;
        let msgs = batch
            .envelopes
            .into_iter()
            .filter_map(|env| match wire::decode(env) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(from, error = %e, "dropped a cache protocol message");
                    None
                }
            })
            .collect();
        self.cache
            .deliver(from, msgs)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ipb::CacheDelivered {}))
    }
}

/// The sending side: one queue and one sender task per peer address.
pub struct Peers {
    /// This node, named as the sender of every batch.
    me: NodeId,
    /// Queues by address.
    queues: HashMap<String, mpsc::Sender<ipb::CacheEnvelope>>,
    /// TLS towards peers, when the node's port speaks TLS.
    tls: Option<NodeTls>,
}

impl Peers {
    /// No peers yet; a queue is made on first use of an address.
    pub fn new(me: NodeId, tls: Option<NodeTls>) -> Self {
        Peers {
            me,
            queues: HashMap::new(),
            tls,
        }
    }

    /// Queues `env` for the node at `addr`; drops it if that queue is full.
    pub fn send(&mut self, addr: &str, env: ipb::CacheEnvelope) {
        let me = self.me;
        let tls = &self.tls;
        let queue = self.queues.entry(addr.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(sender(me, addr.to_string(), tls.clone(), rx));
            tx
        });
        if queue.try_send(env).is_err() {
            tracing::debug!(addr, "cache protocol queue full; message dropped");
        }
    }
}

/// Sends the queue for `addr` in batches, one call at a time, until the queue is dropped.
async fn sender(
    me: NodeId,
    addr: String,
    tls: Option<NodeTls>,
    mut rx: mpsc::Receiver<ipb::CacheEnvelope>,
) {
    let endpoint = match peer_endpoint(&addr, tls.as_ref()) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(addr, error = %e, "bad peer address; cache messages to it are dropped");
            while rx.recv().await.is_some() {}
            return;
        }
    };
    // Keep-alives notice a dead connection (a peer that restarted or a cut link) within about
    // two RPC timeouts, rather than whenever TCP gives up.
    let channel = endpoint
        .connect_timeout(RPC_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(RPC_TIMEOUT)
        .keep_alive_timeout(RPC_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_lazy();
    let mut client = CacheProtocolClient::new(channel);
    while let Some(first) = rx.recv().await {
        let mut envelopes = vec![first];
        while envelopes.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(env) => envelopes.push(env),
                Err(_) => break,
            }
        }
        let mut request = Request::new(ipb::CacheBatch {
            from: me,
            envelopes,
        });
        request.set_timeout(RPC_TIMEOUT);
        if let Err(e) = client.deliver(request).await {
            tracing::debug!(addr, error = %e, "cache messages lost");
        }
    }
}
