//! Administering the cluster: membership changes, leadership transfer, snapshots, and any one
//! node's `Cluster.Status`.
//!
//! Membership changes and transfers run on the leader and carry a `RequestHeader`, so the
//! client's retries (after a lost answer or a leader change) apply each change once. A snapshot
//! and a status are about one node: they go to the node named by id, never elsewhere.

use std::time::Duration;

use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::cluster_client::ClusterClient;

use crate::client::{CallSpec, Client, Target};
use crate::error::{CallKind, Error, Result};

/// The configuration after a membership change.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Membership {
    /// Every member, in ascending id order.
    pub members: Vec<MemberInfo>,
    /// The log index of the committed configuration entry.
    pub config_index: u64,
}

/// One member of a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct MemberInfo {
    /// Its node id.
    pub id: u64,
    /// Its gRPC address, `host:port`.
    pub address: String,
    /// True for a learner (receives the log, does not vote).
    pub learner: bool,
}

impl Membership {
    fn new(members: Vec<api::Member>, config_index: u64) -> Membership {
        Membership {
            members: members
                .into_iter()
                .map(|m| MemberInfo {
                    id: m.id,
                    address: m.address,
                    learner: m.learner,
                })
                .collect(),
            config_index,
        }
    }
}

/// The leader after a transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LeaderInfo {
    /// Its node id.
    pub id: u64,
    /// Its gRPC address.
    pub address: String,
    /// The term it leads.
    pub term: u64,
}

/// A snapshot taken (or found) on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SnapshotInfo {
    /// The node that took it.
    pub node_id: u64,
    /// The last log index it covers.
    pub index: u64,
    /// The term of that entry.
    pub term: u64,
    /// Its size on disk, in bytes.
    pub size_bytes: u64,
    /// How long the call took, as the client measured it (the server does not report the
    /// snapshot's own duration).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub took: Duration,
}

/// A membership change or a transfer: on the leader, with a RequestHeader.
fn admin() -> CallSpec {
    CallSpec::write(CallKind::Other)
}

/// A call about one node, which may be repeated.
fn on(target: Target) -> CallSpec {
    CallSpec {
        kind: CallKind::Other,
        target,
        repeatable: true,
        wait: Duration::ZERO,
    }
}

impl Client {
    /// Where a call about "node `node`, or any member if `None`" goes: `Target::Node(id)` once
    /// the member is known (asking the cluster if the client has not seen it yet), `otherwise`
    /// for `None`. Fails with [`Error::NotFound`] if no member has that id.
    pub(crate) async fn target_node(&self, node: Option<u64>, otherwise: Target) -> Result<Target> {
        let Some(id) = node else {
            return Ok(otherwise);
        };
        let router = &self.inner.router;
        if router.address_of(id).is_none() {
            router.discover(self.inner.config.connect_timeout).await;
        }
        if router.address_of(id).is_some() {
            return Ok(Target::Node(id));
        }
        let known = router.member_ids();
        Err(Error::NotFound {
            message: if known.is_empty() {
                format!("node {id}: no member answered to say which nodes there are")
            } else {
                let ids: Vec<String> = known.iter().map(u64::to_string).collect();
                format!("no member has node id {id} (members: {})", ids.join(", "))
            },
        })
    }

    /// The address of the member with node id `id`, asking the cluster if need be.
    pub async fn member_address(&self, id: u64) -> Result<String> {
        self.target_node(Some(id), Target::Any).await?;
        self.inner
            .router
            .address_of(id)
            .ok_or_else(|| Error::NotFound {
                message: format!("no member has node id {id}"),
            })
    }

    /// `Cluster.Status` of node `node` (its own view of the cluster), or of the leader, or any
    /// member, if `None`.
    pub async fn node_status(&self, node: Option<u64>) -> Result<api::ClusterStatusResponse> {
        let target = self.target_node(node, Target::Any).await?;
        self.unary(
            on(target),
            api::ClusterStatusRequest {},
            |ch, r| async move { ClusterClient::new(ch).status(r).await },
        )
        .await
    }

    /// Adds node `id`, already running at `address` and started to join, as a learner (or as a
    /// voter at once if `learner` is false); returns once the new configuration is committed.
    /// Adding a member that is already there with the same address and kind changes nothing.
    pub async fn add_member(&self, id: u64, address: &str, learner: bool) -> Result<Membership> {
        let request = api::AddMemberRequest {
            header: self.ticket().header(),
            id,
            address: address.to_owned(),
            learner,
        };
        let r = self
            .unary(admin(), request, |ch, r| async move {
                ClusterClient::new(ch).add_member(r).await
            })
            .await?;
        Ok(Membership::new(r.members, r.config_index))
    }

    /// Removes member `id` (voter or learner); returns once the new configuration is committed.
    pub async fn remove_member(&self, id: u64) -> Result<Membership> {
        let request = api::RemoveMemberRequest {
            header: self.ticket().header(),
            id,
        };
        let r = self
            .unary(admin(), request, |ch, r| async move {
                ClusterClient::new(ch).remove_member(r).await
            })
            .await?;
        Ok(Membership::new(r.members, r.config_index))
    }

    /// Turns learner `id` into a voter; fails with [`Error::FailedPrecondition`] while it has
    /// not caught up with the leader's log.
    pub async fn promote_learner(&self, id: u64) -> Result<Membership> {
        let request = api::PromoteLearnerRequest {
            header: self.ticket().header(),
            id,
        };
        let r = self
            .unary(admin(), request, |ch, r| async move {
                ClusterClient::new(ch).promote_learner(r).await
            })
            .await?;
        Ok(Membership::new(r.members, r.config_index))
    }

    /// Hands leadership to voter `to`, or with `None` to the reachable voter that is most caught
    /// up (the leader picks); returns once the new leader leads. Asking for the current leader
    /// changes nothing.
    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<LeaderInfo> {
        let request = api::TransferLeaderRequest {
            header: self.ticket().header(),
            target_id: to.unwrap_or(0),
        };
        let r = self
            .unary(admin(), request, |ch, r| async move {
                ClusterClient::new(ch).transfer_leader(r).await
            })
            .await?;
        // The next leader-bound call must find the new leader, not wait for the old one to
        // refuse it.
        if !r.leader_address.is_empty() {
            self.inner.router.set_leader(&r.leader_address);
        }
        Ok(LeaderInfo {
            id: r.leader_id,
            address: r.leader_address,
            term: r.term,
        })
    }

    /// Takes a snapshot now on node `node`, at its applied index; if nothing was applied since
    /// its last snapshot, returns that one.
    pub async fn snapshot(&self, node: u64) -> Result<SnapshotInfo> {
        let target = self.target_node(Some(node), Target::Any).await?;
        let started = tokio::time::Instant::now();
        let r = self
            .unary(on(target), api::SnapshotRequest {}, |ch, r| async move {
                ClusterClient::new(ch).snapshot(r).await
            })
            .await?;
        Ok(SnapshotInfo {
            node_id: node,
            index: r.index,
            term: r.term,
            size_bytes: r.size_bytes,
            took: started.elapsed(),
        })
    }
}
