//! Where calls go: the members the client knows, the leader it believes in, and one lazily
//! connected channel per member.
//!
//! The view starts from the endpoints the caller gave and grows with what the cluster reports:
//! `Router::discover` asks every known member for `Cluster.Status` at once and takes the
//! members' addresses and the leader from the answers (a node that says it is the leader is
//! believed over hearsay; among hearsay, the highest term wins). The client also learns the
//! leader from the `x-sync-leader-addr` trailer of a not-leader answer (`Router::set_leader`),
//! and forgets it when it stops answering (`Router::forget_leader`), which makes the next call
//! discover again.
//!
//! Two pieces are public, for tools that talk to the cluster with the generated clients
//! ([`crate::api`]): [`leader_in`], which leader a set of `Cluster.Status` answers names, and
//! [`leader_hint`], the leader a not-leader answer names in its trailers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures::future::join_all;
use sync_proto::sync::v1::cluster_client::ClusterClient;
use sync_proto::sync::v1::{ClusterStatusRequest, ClusterStatusResponse, Role};
use tonic::Status;
use tonic::transport::Channel;

use crate::error::{Error, Result, describe_tls_cause, transport_reason};
use crate::tls::{ClientTls, endpoint};

/// The client's view of the cluster, and its connections.
#[derive(Debug)]
pub(crate) struct Router {
    /// Deadline for opening a connection to a member.
    connect_timeout: Duration,
    /// TLS for every connection, when the cluster serves it.
    tls: Option<ClientTls>,
    view: Mutex<View>,
    /// One channel per member address. A channel reconnects by itself after a failure, so it is
    /// kept for the life of the client.
    channels: Mutex<HashMap<String, Channel>>,
}

#[derive(Debug)]
struct View {
    /// Every member address known: the given endpoints first, then what members reported.
    members: Vec<String>,
    /// The leader's address, if known.
    leader: Option<String>,
    /// The term in which `leader` was learned (0 when learned from a trailer).
    term: u64,
    /// Where the next round-robin pick starts.
    next: usize,
    /// Each member's address by node id, from the latest discovery any member answered, for
    /// calls aimed at one node (`Target::Node`). A node's own report of its address is believed
    /// over another member's configuration, which may name a proxy in between.
    ids: BTreeMap<u64, String>,
}

/// What one round of discovery found.
#[derive(Debug, Default)]
pub(crate) struct Discovery {
    /// How many members answered.
    pub(crate) answered: usize,
    /// The members that did not answer, with the reason in words.
    pub(crate) failures: Vec<(String, String)>,
}

impl Router {
    /// A view of `endpoints` (`host:port`, `http://host:port`, or `https://host:port` with
    /// `tls`), connected to over TLS when `tls` is set.
    pub(crate) fn new(
        endpoints: &[String],
        connect_timeout: Duration,
        tls: Option<ClientTls>,
    ) -> Result<Router> {
        let mut members = Vec::new();
        for e in endpoints {
            let address = normalize(e, tls.is_some())?;
            if !members.contains(&address) {
                members.push(address);
            }
        }
        if members.is_empty() {
            return Err(Error::InvalidEndpoint {
                endpoint: String::new(),
                reason: "no endpoints given; pass at least one host:port".to_owned(),
            });
        }
        Ok(Router {
            connect_timeout,
            tls,
            view: Mutex::new(View {
                members,
                leader: None,
                term: 0,
                next: 0,
                ids: BTreeMap::new(),
            }),
            channels: Mutex::new(HashMap::new()),
        })
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The channel to `address`, connected on first use.
    pub(crate) fn channel(&self, address: &str) -> Result<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let channel = self
            .endpoint(address)?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    /// The endpoint (`https` when TLS is on) for a member at `address`.
    pub(crate) fn endpoint(&self, address: &str) -> Result<tonic::transport::Endpoint> {
        endpoint(address, self.tls.as_ref())
    }

    /// The leader's address, if known.
    pub(crate) fn leader(&self) -> Option<String> {
        self.view().leader.clone()
    }

    /// Every known member address.
    pub(crate) fn members(&self) -> Vec<String> {
        self.view().members.clone()
    }

    /// The address of the member with node id `id`, as last discovered.
    pub(crate) fn address_of(&self, id: u64) -> Option<String> {
        self.view().ids.get(&id).cloned()
    }

    /// The node ids of the members, as last discovered, in ascending order.
    pub(crate) fn member_ids(&self) -> Vec<u64> {
        self.view().ids.keys().copied().collect()
    }

    /// The next member in round-robin order, skipping `avoid` when there is another.
    pub(crate) fn next_member(&self, avoid: Option<&str>) -> String {
        let mut view = self.view();
        let n = view.members.len();
        for _ in 0..n {
            let pick = view.members[view.next % n].clone();
            view.next = (view.next + 1) % n;
            if Some(pick.as_str()) != avoid || n == 1 {
                return pick;
            }
        }
        view.members[0].clone()
    }

    /// Believes a node that named `address` as the leader (a trailer).
    pub(crate) fn set_leader(&self, address: &str) {
        let mut view = self.view();
        if !view.members.iter().any(|m| m == address) {
            view.members.push(address.to_owned());
        }
        view.leader = Some(address.to_owned());
    }

    /// Stops believing that `address` leads (it failed or said it does not).
    pub(crate) fn forget_leader(&self, address: &str) {
        let mut view = self.view();
        if view.leader.as_deref() == Some(address) {
            view.leader = None;
        }
    }

    /// Asks every known member for its status at once, each within `timeout`, and updates the
    /// members and the leader from the answers.
    pub(crate) async fn discover(&self, timeout: Duration) -> Discovery {
        let members = self.members();
        let answers = join_all(members.iter().map(|address| async move {
            let status = self.status_of(address, timeout).await;
            (address.clone(), status)
        }))
        .await;
        let mut found = Discovery::default();
        let mut statuses = Vec::new();
        for (address, answer) in answers {
            match answer {
                Ok(status) => {
                    found.answered += 1;
                    statuses.push(status);
                }
                Err(reason) => found.failures.push((address, reason)),
            }
        }
        let mut view = self.view();
        for s in &statuses {
            for m in &s.members {
                if !m.address.is_empty() && !view.members.contains(&m.address) {
                    view.members.push(m.address.clone());
                }
            }
        }
        if !statuses.is_empty() {
            view.ids = addresses_by_id(&statuses);
        }
        if let Some(leader) = leader_in(&statuses)
            && (leader.term >= view.term || view.leader.is_none())
        {
            view.leader = Some(leader.address);
            view.term = leader.term;
        }
        found
    }

    /// The cause of a status that never reached a server, in words; over TLS without a client
    /// certificate, a closed connection is named for its likely cause.
    fn transport_reason(&self, status: &tonic::Status) -> Option<String> {
        match &self.tls {
            Some(tls) => std::error::Error::source(status)
                .map(|cause| describe_tls_cause(cause, tls.presents_certificate)),
            None => transport_reason(status),
        }
    }

    async fn status_of(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<ClusterStatusResponse, String> {
        let channel = self.channel(address).map_err(|e| e.to_string())?;
        let mut request = tonic::Request::new(ClusterStatusRequest {});
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, ClusterClient::new(channel).status(request)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(self.transport_reason(&status).unwrap_or_else(|| {
                Error::from_status(&status, crate::error::CallKind::Other).to_string()
            })),
            Err(_) => Err(format!("timed out after {timeout:?}")),
        }
    }
}

/// The trailer in which a node that cannot serve a call names the leader's gRPC address
/// (common.proto).
pub const LEADER_ADDR: &str = "x-sync-leader-addr";
/// The trailer in which a node that cannot serve a call names the leader's id (common.proto).
pub const LEADER_ID: &str = "x-sync-leader-id";

/// A leader, as named by `Cluster.Status` answers.
///
/// ```
/// use sync_client::routing::Leader;
/// let l = Leader { id: 2, address: "10.0.0.2:7001".into(), term: 3 };
/// assert_eq!(l.address, "10.0.0.2:7001");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// Its node id.
    pub id: u64,
    /// Its gRPC address, `host:port`, as the members know it.
    pub address: String,
    /// The term it leads.
    pub term: u64,
}

/// The leader named in a round of `Cluster.Status` answers from different members, if any: a
/// node that says it is the leader is believed first (the one of the highest term); otherwise
/// the leader named in the highest term.
///
/// ```
/// use sync_client::api::{ClusterStatusResponse, Role};
/// use sync_client::routing::leader_in;
///
/// let follower = ClusterStatusResponse {
///     node_id: 1, role: Role::Follower as i32, term: 3,
///     leader_id: 2, leader_address: "10.0.0.2:7001".into(),
///     ..Default::default()
/// };
/// let leader = leader_in(&[follower]).unwrap();
/// assert_eq!((leader.id, leader.address.as_str(), leader.term), (2, "10.0.0.2:7001", 3));
/// ```
pub fn leader_in(statuses: &[ClusterStatusResponse]) -> Option<Leader> {
    if let Some(own) = statuses
        .iter()
        .filter(|s| s.role == Role::Leader as i32 && !s.address.is_empty())
        .max_by_key(|s| s.term)
    {
        return Some(Leader {
            id: own.node_id,
            address: own.address.clone(),
            term: own.term,
        });
    }
    statuses
        .iter()
        .filter(|s| s.leader_id != 0 && !s.leader_address.is_empty())
        .max_by_key(|s| s.term)
        .map(|s| Leader {
            id: s.leader_id,
            address: s.leader_address.clone(),
            term: s.term,
        })
}

/// Each member's address by node id in a round of `Cluster.Status` answers: what a node says
/// of itself first, then what the others' configurations say of members that did not answer.
fn addresses_by_id(statuses: &[ClusterStatusResponse]) -> BTreeMap<u64, String> {
    let mut ids: BTreeMap<u64, String> = statuses
        .iter()
        .filter(|s| s.node_id != 0 && !s.address.is_empty())
        .map(|s| (s.node_id, s.address.clone()))
        .collect();
    for m in statuses.iter().flat_map(|s| &s.members) {
        if m.id != 0 && !m.address.is_empty() {
            ids.entry(m.id).or_insert_with(|| m.address.clone());
        }
    }
    ids
}

/// The leader address a node named in the `x-sync-leader-addr` trailer of an answer, if any.
///
/// ```
/// let mut status = tonic::Status::unavailable("not the leader");
/// assert_eq!(sync_client::routing::leader_hint(&status), None);
/// status.metadata_mut().insert("x-sync-leader-addr", "10.0.0.2:7001".parse().unwrap());
/// assert_eq!(sync_client::routing::leader_hint(&status).as_deref(), Some("10.0.0.2:7001"));
/// ```
pub fn leader_hint(status: &Status) -> Option<String> {
    status
        .metadata()
        .get(LEADER_ADDR)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
}

/// `host:port` from `host:port`, `http://host:port[/]` or (with TLS) `https://host:port[/]`.
/// Whether TLS is used is the builder's choice ([`crate::ClientBuilder::tls`]); an `https://`
/// endpoint without it is refused rather than silently spoken to in plaintext.
pub(crate) fn normalize(endpoint: &str, tls: bool) -> Result<String> {
    let trimmed = endpoint.trim();
    let bad = |reason: &str| Error::InvalidEndpoint {
        endpoint: trimmed.to_owned(),
        reason: reason.to_owned(),
    };
    let authority = match trimmed.strip_prefix("https://") {
        Some(_) if !tls => {
            return Err(Error::Tls {
                reason: format!(
                    "`{trimmed}` is https:// but no TLS settings were given; add \
                     ClientBuilder::tls(TlsOptions::from_ca_file(..)?)"
                ),
            });
        }
        Some(rest) => rest,
        None => trimmed.strip_prefix("http://").unwrap_or(trimmed),
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("not host:port (e.g. 127.0.0.1:7001)"))?;
    if host.is_empty() || host.contains('/') || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad("not host:port (e.g. 127.0.0.1:7001)"));
    }
    Ok(authority.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, role: Role, term: u64, leader: u64) -> ClusterStatusResponse {
        ClusterStatusResponse {
            node_id: id,
            address: format!("n{id}:1"),
            role: role as i32,
            term,
            leader_id: leader,
            leader_address: if leader == 0 {
                String::new()
            } else {
                format!("n{leader}:1")
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_leader_speaking_for_itself_wins_over_hearsay() {
        let statuses = [node(1, Role::Follower, 5, 2), node(3, Role::Leader, 4, 3)];
        let leader = leader_in(&statuses).unwrap();
        assert_eq!(
            (leader.id, leader.address.as_str(), leader.term),
            (3, "n3:1", 4)
        );
    }

    #[test]
    fn hearsay_of_the_newest_term_wins() {
        let statuses = [node(1, Role::Follower, 3, 2), node(3, Role::Follower, 5, 1)];
        let leader = leader_in(&statuses).unwrap();
        assert_eq!((leader.id, leader.term), (1, 5));
        assert_eq!(leader_in(&[node(1, Role::Candidate, 6, 0)]), None);
    }

    #[test]
    fn a_node_is_believed_about_its_own_address_over_others() {
        let mut one = node(1, Role::Leader, 2, 1);
        one.members = vec![
            sync_proto::sync::v1::MemberStatus {
                id: 2,
                address: "proxy-1-2:1".into(),
                ..Default::default()
            },
            sync_proto::sync::v1::MemberStatus {
                id: 3,
                address: "proxy-1-3:1".into(),
                ..Default::default()
            },
        ];
        let two = node(2, Role::Follower, 2, 1);
        let ids = addresses_by_id(&[one, two]);
        let ids: Vec<(u64, &str)> = ids.iter().map(|(i, a)| (*i, a.as_str())).collect();
        assert_eq!(ids, [(1, "n1:1"), (2, "n2:1"), (3, "proxy-1-3:1")]);
    }

    #[test]
    fn endpoints_are_normalized_and_checked() {
        assert_eq!(
            normalize("http://10.0.0.1:7001/", false).unwrap(),
            "10.0.0.1:7001"
        );
        assert_eq!(normalize(" h:1 ", false).unwrap(), "h:1");
        for bad in ["localhost", ":7001", "h:", "h:0", "h:99999", "https://h:1"] {
            assert!(normalize(bad, false).is_err(), "{bad}");
        }
        assert_eq!(normalize("https://h:1/", true).unwrap(), "h:1");
        let e = normalize("https://h:1", false).unwrap_err();
        assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    }

    #[test]
    fn round_robin_skips_the_member_that_just_failed() {
        let r = Router::new(&["a:1".into(), "b:1".into()], Duration::from_secs(1), None).unwrap();
        assert_eq!(r.next_member(Some("a:1")), "b:1");
        assert_eq!(r.next_member(Some("b:1")), "a:1");
        r.set_leader("c:1");
        assert_eq!(r.members(), ["a:1", "b:1", "c:1"]);
        r.forget_leader("b:1");
        assert_eq!(r.leader().as_deref(), Some("c:1"));
        r.forget_leader("c:1");
        assert_eq!(r.leader(), None);
    }
}
