//! `sync.v1.Kv`: replicated registers.

use std::sync::Arc;

use sync_proto::internal::v1 as ipb;
use sync_proto::raft::v1 as rpb;
use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::kv_client::KvClient;
use tonic::{Request, Response, Status};

use super::{Forwarder, Route, deadline_of, forward_request, read_state, route, status_of};
use crate::node::{NodeError, NodeHandle};
use crate::state::Applied;
use crate::state::kv::{validate_key, validate_value};

/// The Kv service of one node.
pub struct KvService {
    /// The node.
    pub node: NodeHandle,
    /// Connections for forwarding.
    pub forwarder: Arc<Forwarder>,
}

/// The de-duplication id of a request header (None without a client id).
pub fn request_id(header: Option<api::RequestHeader>) -> Option<rpb::RequestId> {
    header.filter(|h| h.client_id != 0).map(|h| rpb::RequestId {
        client_id: h.client_id,
        sequence: h.sequence,
        lowest_unacked: h.lowest_unacked,
    })
}

/// Runs a command on this node (the leader) within `deadline`.
pub async fn propose_within(
    node: &NodeHandle,
    op: ipb::command::Op,
    request: Option<rpb::RequestId>,
    deadline: std::time::Duration,
) -> Result<(u64, ipb::CommandResult), Status> {
    match tokio::time::timeout(deadline, node.propose(op, request)).await {
        Ok(Ok((index, Applied::Result(r)))) => Ok((index, r)),
        Ok(Ok((_, Applied::Internal))) => Err(Status::internal("command produced no result")),
        Ok(Ok((_, Applied::Expired))) => Err(status_of(NodeError::Expired)),
        Ok(Err(e)) => Err(status_of(e)),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "not committed within {} ms; it may still commit: retry with the same request header \
             and it is applied once",
            deadline.as_millis()
        ))),
    }
}

fn rejected(r: &ipb::CommandResult) -> Option<Status> {
    match &r.result {
        Some(ipb::command_result::Result::Rejected(why)) => Some(Status::invalid_argument(why)),
        None => Some(Status::internal("empty command result")),
        _ => None,
    }
}

#[tonic::async_trait]
impl api::kv_server::Kv for KvService {
    async fn put(
        &self,
        request: Request<api::KvPutRequest>,
    ) -> Result<Response<api::KvPutResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = route(&self.node, request.metadata())?;
        let req = request.into_inner();
        validate_key(&req.key).map_err(Status::invalid_argument)?;
        validate_value(&req.value).map_err(Status::invalid_argument)?;
        if let Route::Forward(addr) = target {
            let mut client = KvClient::new(self.forwarder.channel(&addr)?);
            return client.put(forward_request(req, deadline)).await;
        }
        let op = ipb::command::Op::KvPut(ipb::KvPut {
            key: req.key,
            value: req.value,
        });
        let (index, r) = propose_within(&self.node, op, request_id(req.header), deadline).await?;
        if let Some(s) = rejected(&r) {
            return Err(s);
        }
        let replaced =
            matches!(r.result, Some(ipb::command_result::Result::KvPut(p)) if p.replaced);
        Ok(Response::new(api::KvPutResponse { index, replaced }))
    }

    async fn get(
        &self,
        request: Request<api::KvGetRequest>,
    ) -> Result<Response<api::KvGetResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let linearizable = request.get_ref().consistency() != api::Consistency::Stale;
        let target = if linearizable {
            Some(route(&self.node, request.metadata())?)
        } else {
            None
        };
        let req = request.into_inner();
        validate_key(&req.key).map_err(Status::invalid_argument)?;
        if let Some(Route::Forward(addr)) = target {
            let mut client = KvClient::new(self.forwarder.channel(&addr)?);
            return client.get(forward_request(req, deadline)).await;
        }
        let key = req.key;
        let (reg, read_index) = read_state(&self.node, linearizable, deadline, move |state| {
            let reg = state.kv().get(&key).cloned();
            (reg, state.applied_index())
        })
        .await?;
        Ok(Response::new(api::KvGetResponse {
            found: reg.is_some(),
            modified_index: reg.as_ref().map_or(0, |r| r.modified_index),
            value: reg.map(|r| r.value).unwrap_or_default(),
            read_index,
        }))
    }

    async fn delete(
        &self,
        request: Request<api::KvDeleteRequest>,
    ) -> Result<Response<api::KvDeleteResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = route(&self.node, request.metadata())?;
        let req = request.into_inner();
        validate_key(&req.key).map_err(Status::invalid_argument)?;
        if let Route::Forward(addr) = target {
            let mut client = KvClient::new(self.forwarder.channel(&addr)?);
            return client.delete(forward_request(req, deadline)).await;
        }
        let op = ipb::command::Op::KvDelete(ipb::KvDelete { key: req.key });
        let (index, r) = propose_within(&self.node, op, request_id(req.header), deadline).await?;
        if let Some(s) = rejected(&r) {
            return Err(s);
        }
        let existed =
            matches!(r.result, Some(ipb::command_result::Result::KvDelete(d)) if d.existed);
        Ok(Response::new(api::KvDeleteResponse { index, existed }))
    }
}
