//! `sync.v1.Cluster`: status, membership, leadership, snapshots and events.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::cluster_client::ClusterClient;
use tonic::{Request, Response, Status};

use super::{Forwarder, Route, deadline_of, forward_request, route, status_of};
use crate::node::NodeHandle;
use crate::node::driver::{ClusterEvent, NodeStatus};
use crate::raft::{ConfigChange, Role};

/// How far (in entries) a learner may trail the leader and still be promoted.
pub const PROMOTION_LAG: u64 = 1000;

/// The Cluster service of one node.
pub struct ClusterService {
    /// The node.
    pub node: NodeHandle,
    /// Connections for forwarding.
    pub forwarder: Arc<Forwarder>,
}

fn role_of(s: &NodeStatus) -> api::Role {
    match s.role {
        Role::Leader => api::Role::Leader,
        Role::Candidate => api::Role::Candidate,
        Role::PreCandidate => api::Role::PreCandidate,
        Role::Follower if s.learner => api::Role::Learner,
        Role::Follower => api::Role::Follower,
    }
}

fn members_of(s: &NodeStatus) -> Vec<api::Member> {
    s.members
        .iter()
        .map(|m| api::Member {
            id: m.member.id,
            address: m.member.address.clone(),
            learner: m.member.learner,
        })
        .collect()
}

/// The Status answer for a node's status.
pub fn status_response(s: &NodeStatus) -> api::ClusterStatusResponse {
    let now = Instant::now();
    api::ClusterStatusResponse {
        node_id: s.id,
        address: s.address.clone(),
        role: role_of(s) as i32,
        term: s.term,
        leader_id: s.leader.unwrap_or(0),
        leader_address: s
            .leader
            .and_then(|l| s.address_of(l))
            .unwrap_or_default()
            .to_string(),
        commit_index: s.commit,
        applied_index: s.applied,
        last_log_index: s.last_index,
        snapshot_index: s.snapshot_index,
        members: s
            .members
            .iter()
            .map(|m| {
                let is_self = m.member.id == s.id;
                let matched = if is_self && s.role == Role::Leader {
                    s.last_index
                } else {
                    m.progress.as_ref().map_or(0, |p| p.matched)
                };
                api::MemberStatus {
                    id: m.member.id,
                    address: m.member.address.clone(),
                    learner: m.member.learner,
                    match_index: matched,
                    last_contact_ms: if is_self {
                        0
                    } else {
                        m.last_contact
                            .map_or(u64::MAX, |t| now.duration_since(t).as_millis() as u64)
                    },
                    reachable: m.reachable,
                    replication_lag: if s.role == Role::Leader {
                        s.last_index.saturating_sub(matched)
                    } else {
                        0
                    },
                }
            })
            .collect(),
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn event_of(e: ClusterEvent, node: &NodeHandle) -> api::ClusterEvent {
    let status = node.status();
    let mut out = api::ClusterEvent {
        observed_unix_ms: now_unix_ms(),
        term: status.term,
        index: status.last_index,
        ..Default::default()
    };
    match e {
        ClusterEvent::LeaderChanged { leader, term } => {
            out.r#type = api::ClusterEventType::LeaderChanged as i32;
            out.term = term;
            out.leader_id = leader.unwrap_or(0);
            out.leader_address = leader
                .and_then(|l| status.address_of(l))
                .unwrap_or_default()
                .to_string();
        }
        ClusterEvent::MembershipChanged { config, index } => {
            out.r#type = api::ClusterEventType::MembershipChanged as i32;
            out.index = index;
            out.members = config
                .members
                .into_iter()
                .map(|m| api::Member {
                    id: m.id,
                    address: m.address,
                    learner: m.learner,
                })
                .collect();
        }
        ClusterEvent::ReachabilityChanged { id, reachable } => {
            out.r#type = api::ClusterEventType::ReachabilityChanged as i32;
            out.member_id = id;
            out.reachable = reachable;
        }
    }
    out
}

/// The member `id` of this node's status, or NOT_FOUND.
fn member_of(status: &NodeStatus, id: u64) -> Result<&crate::node::driver::MemberView, Status> {
    status
        .members
        .iter()
        .find(|m| m.member.id == id)
        .ok_or_else(|| Status::not_found(format!("node {id} is not a member")))
}

impl ClusterService {
    async fn change(
        &self,
        change: ConfigChange,
        deadline: Duration,
    ) -> Result<(Vec<api::Member>, u64), Status> {
        let index = match tokio::time::timeout(deadline, self.node.change_membership(change)).await
        {
            Ok(r) => r.map_err(status_of)?,
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "the membership change did not commit in time; it may still commit",
                ));
            }
        };
        Ok((members_of(&self.node.status()), index))
    }

    fn client(&self, addr: &str) -> Result<ClusterClient<tonic::transport::Channel>, Status> {
        Ok(ClusterClient::new(self.forwarder.channel(addr)?))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<api::ClusterEvent, Status>> + Send>>;

#[tonic::async_trait]
impl api::cluster_server::Cluster for ClusterService {
    async fn status(
        &self,
        _request: Request<api::ClusterStatusRequest>,
    ) -> Result<Response<api::ClusterStatusResponse>, Status> {
        Ok(Response::new(status_response(&self.node.status())))
    }

    async fn add_member(
        &self,
        request: Request<api::AddMemberRequest>,
    ) -> Result<Response<api::AddMemberResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = route(&self.node, request.metadata())?;
        let req = request.into_inner();
        if req.id == 0 {
            return Err(Status::invalid_argument(
                "member id must be a positive integer",
            ));
        }
        if req
            .address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(Status::invalid_argument(format!(
                "member address {:?} is not host:port",
                req.address
            )));
        }
        if let Route::Forward(addr) = target {
            return self
                .client(&addr)?
                .add_member(forward_request(req, deadline))
                .await;
        }
        let status = self.node.status();
        if let Some(m) = status.members.iter().find(|m| m.member.id == req.id) {
            if m.member.address == req.address && m.member.learner == req.learner {
                return Ok(Response::new(api::AddMemberResponse {
                    members: members_of(&status),
                    config_index: 0,
                }));
            }
            return Err(Status::already_exists(format!(
                "node {} is already a member at {} ({})",
                req.id,
                m.member.address,
                if m.member.learner { "learner" } else { "voter" }
            )));
        }
        if let Some(m) = status
            .members
            .iter()
            .find(|m| m.member.address == req.address)
        {
            return Err(Status::already_exists(format!(
                "address {} belongs to node {}",
                req.address, m.member.id
            )));
        }
        let change = if req.learner {
            ConfigChange::AddLearner {
                id: req.id,
                address: req.address,
            }
        } else {
            ConfigChange::AddVoter {
                id: req.id,
                address: req.address,
            }
        };
        let (members, config_index) = self.change(change, deadline).await?;
        Ok(Response::new(api::AddMemberResponse {
            members,
            config_index,
        }))
    }

    async fn remove_member(
        &self,
        request: Request<api::RemoveMemberRequest>,
    ) -> Result<Response<api::RemoveMemberResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = route(&self.node, request.metadata())?;
        let req = request.into_inner();
        if let Route::Forward(addr) = target {
            return self
                .client(&addr)?
                .remove_member(forward_request(req, deadline))
                .await;
        }
        member_of(&self.node.status(), req.id)?;
        let (members, config_index) = self
            .change(ConfigChange::Remove { id: req.id }, deadline)
            .await?;
        Ok(Response::new(api::RemoveMemberResponse {
            members,
            config_index,
        }))
    }

    async fn promote_learner(
        &self,
        request: Request<api::PromoteLearnerRequest>,
    ) -> Result<Response<api::PromoteLearnerResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = route(&self.node, request.metadata())?;
        let req = request.into_inner();
        if let Route::Forward(addr) = target {
            return self
                .client(&addr)?
                .promote_learner(forward_request(req, deadline))
                .await;
        }
        let status = self.node.status();
        let m = member_of(&status, req.id)?;
        if !m.member.learner {
            return Err(Status::failed_precondition(format!(
                "node {} is already a voter",
                req.id
            )));
        }
        let matched = m.progress.as_ref().map_or(0, |p| p.matched);
        if matched + PROMOTION_LAG < status.last_index {
            return Err(Status::failed_precondition(format!(
                "learner {} has not caught up (it holds index {matched}, the leader {}); retry \
                 when it trails by less than {PROMOTION_LAG} entries",
                req.id, status.last_index
            )));
        }
        let (members, config_index) = self
            .change(ConfigChange::PromoteLearner { id: req.id }, deadline)
            .await?;
        Ok(Response::new(api::PromoteLearnerResponse {
            members,
            config_index,
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<api::TransferLeaderRequest>,
    ) -> Result<Response<api::TransferLeaderResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = route(&self.node, request.metadata())?;
        let req = request.into_inner();
        if let Route::Forward(addr) = target {
            return self
                .client(&addr)?
                .transfer_leader(forward_request(req, deadline))
                .await;
        }
        let status = self.node.status();
        if req.target_id != 0 && member_of(&status, req.target_id)?.member.learner {
            return Err(Status::failed_precondition(format!(
                "node {} is a learner; promote it first",
                req.target_id
            )));
        }
        let timeout = deadline.min(self.node.settings.election_timeout * 3);
        let leader = self
            .node
            .transfer_leader(req.target_id, timeout)
            .await
            .map_err(status_of)?;
        let status = self.node.status();
        Ok(Response::new(api::TransferLeaderResponse {
            leader_id: leader,
            leader_address: status.address_of(leader).unwrap_or_default().to_string(),
            term: status.term,
        }))
    }

    async fn snapshot(
        &self,
        _request: Request<api::SnapshotRequest>,
    ) -> Result<Response<api::SnapshotResponse>, Status> {
        let (meta, size) = self.node.snapshot().await.map_err(status_of)?;
        Ok(Response::new(api::SnapshotResponse {
            index: meta.last_index,
            term: meta.last_term,
            size_bytes: size,
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        _request: Request<api::ClusterWatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let node = self.node.clone();
        let events = node.events();
        let status = node.status();
        let initial = vec![
            event_of(
                ClusterEvent::LeaderChanged {
                    leader: status.leader,
                    term: status.term,
                },
                &node,
            ),
            event_of(
                ClusterEvent::MembershipChanged {
                    config: sync_proto::raft::v1::ClusterConfig {
                        members: status.members.iter().map(|m| m.member.clone()).collect(),
                    },
                    index: status.last_index,
                },
                &node,
            ),
        ];
        let head = futures::stream::iter(initial.into_iter().map(Ok));
        let tail = futures::stream::unfold(Some((events, node)), |state| async move {
            let (mut events, node) = state?;
            match events.recv().await {
                Ok(e) => Some((Ok(event_of(e, &node)), Some((events, node)))),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Some((
                    Err(Status::data_loss(format!(
                        "watcher fell {n} events behind; reopen the watch"
                    ))),
                    None,
                )),
                Err(_) => None,
            }
        });
        let stream: EventStream = Box::pin(futures::StreamExt::chain(head, tail));
        Ok(Response::new(stream))
    }
}
