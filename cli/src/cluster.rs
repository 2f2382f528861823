//! Talking to a syncd cluster: connecting to members, asking each for its Cluster.Status, and
//! finding the leader. Shared by `status`, `dev up` and `bench raw`.

use std::time::Duration;

use anyhow::bail;
use futures::future::join_all;
use sync_client::TlsOptions;
use sync_proto::sync::v1::cluster_client::ClusterClient;
use sync_proto::sync::v1::{ClusterStatusRequest, ClusterStatusResponse, Role};
use tokio::time::{Instant, sleep, timeout};
use tonic::transport::Channel;

use crate::args::{Endpoint, GlobalOpts};
use crate::errors::{START_HINT, describe_cause, describe_status, describe_tls_cause, timed_out};

pub use sync_client::routing::{Leader, leader_hint};

/// How often leader discovery asks again while an election is under way.
const LEADER_POLL: Duration = Duration::from_millis(200);

/// An SDK client for the lock and session commands: `--timeout` bounds connecting, each
/// attempt, and each call with its retries.
pub async fn sdk_client(global: &GlobalOpts) -> Result<sync_client::Client, sync_client::Error> {
    let builder = sync_client::Client::builder(global.endpoints.iter().map(Endpoint::to_string));
    let builder = match global.tls()? {
        Some(tls) => builder.tls(tls),
        None => builder,
    };
    builder
        .connect_timeout(global.timeout)
        .request_timeout(global.timeout)
        .deadline(global.timeout)
        .client_name("syncctl")
        .connect()
        .await
}

/// Opens a plaintext connection to `endpoint` (the bench's), failing after `deadline`. Every call
/// on the connection is also bounded by `deadline`.
pub async fn connect(endpoint: &Endpoint, deadline: Duration) -> Result<Channel, String> {
    connect_with(endpoint, deadline, None).await
}

/// [`connect`], over TLS when `tls` is given.
pub async fn connect_with(
    endpoint: &Endpoint,
    deadline: Duration,
    tls: Option<&TlsOptions>,
) -> Result<Channel, String> {
    let builder = match tls {
        Some(tls) => tls
            .endpoint(&endpoint.to_string())
            .map_err(|e| e.to_string())?,
        None => Channel::from_shared(endpoint.uri())
            .map_err(|e| format!("bad endpoint {endpoint}: {e}"))?,
    };
    let builder = builder
        .connect_timeout(deadline)
        .timeout(deadline)
        .tcp_nodelay(true);
    match timeout(deadline, builder.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(err)) => Err(match tls {
            Some(tls) => describe_tls_cause(&err, tls.presents_certificate()),
            None => describe_cause(&err),
        }),
        Err(_) => Err(timed_out(deadline)),
    }
}

/// Asks one member for its view of the cluster. The whole exchange, connecting included, must
/// finish within `deadline`.
pub async fn status_of(
    endpoint: &Endpoint,
    deadline: Duration,
    tls: Option<&TlsOptions>,
) -> Result<ClusterStatusResponse, String> {
    let exchange = async {
        let channel = connect_with(endpoint, deadline, tls).await?;
        ClusterClient::new(channel)
            .status(ClusterStatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| match (tls, std::error::Error::source(&status)) {
                (Some(tls), Some(cause)) => describe_tls_cause(cause, tls.presents_certificate()),
                _ => describe_status(&status),
            })
    };
    timeout(deadline, exchange)
        .await
        .unwrap_or_else(|_| Err(timed_out(deadline)))
}

/// One member's answer to Cluster.Status, or why it gave none.
pub struct MemberReport {
    pub endpoint: Endpoint,
    pub status: Result<ClusterStatusResponse, String>,
}

/// Asks every endpoint at once (over TLS when `tls` is given); the reports come back in the
/// order of `endpoints`.
pub async fn status_all(
    endpoints: &[Endpoint],
    deadline: Duration,
    tls: Option<&TlsOptions>,
) -> Vec<MemberReport> {
    join_all(endpoints.iter().map(|endpoint| async move {
        MemberReport {
            endpoint: endpoint.clone(),
            status: status_of(endpoint, deadline, tls).await,
        }
    }))
    .await
}

/// The error for "nobody answered", naming every endpoint and the reason, e.g.
/// "no member reachable at 127.0.0.1:7001, 127.0.0.1:7002: connection refused; is the cluster
/// running? try `syncctl dev up`". Identical reasons are stated once.
pub fn unreachable_error(reports: &[MemberReport]) -> anyhow::Error {
    let failures: Vec<(&Endpoint, &str)> = reports
        .iter()
        .filter_map(|r| r.status.as_ref().err().map(|e| (&r.endpoint, e.as_str())))
        .collect();
    let all_alike = failures.windows(2).all(|pair| pair[0].1 == pair[1].1);
    let detail = match failures.first() {
        None => "no endpoints given".to_owned(),
        Some((_, reason)) if all_alike => {
            let names: Vec<String> = failures.iter().map(|(e, _)| e.to_string()).collect();
            format!("{}: {reason}", names.join(", "))
        }
        Some(_) => failures
            .iter()
            .map(|(e, reason)| format!("{e} ({reason})"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    anyhow::anyhow!("no member reachable at {detail}; {START_HINT}")
}

/// The leader named in a round of reports, if any member knows one (see
/// [`sync_client::routing::leader_in`]).
pub fn leader_in(reports: &[MemberReport]) -> Option<Leader> {
    let answers: Vec<ClusterStatusResponse> = reports
        .iter()
        .filter_map(|r| r.status.as_ref().ok().cloned())
        .collect();
    sync_client::routing::leader_in(&answers)
}

/// Asks the endpoints (in plaintext: the bench does not speak TLS) until one names a leader, for at most `patience`. Fails at once if no
/// member answers at all: waiting does not start a cluster.
pub async fn find_leader(
    endpoints: &[Endpoint],
    rpc_deadline: Duration,
    patience: Duration,
) -> anyhow::Result<Leader> {
    let give_up = Instant::now() + patience;
    loop {
        let reports = status_all(endpoints, rpc_deadline, None).await;
        if let Some(leader) = leader_in(&reports) {
            return Ok(leader);
        }
        let answered = reports.iter().filter(|r| r.status.is_ok()).count();
        if answered == 0 {
            return Err(unreachable_error(&reports));
        }
        if Instant::now() >= give_up {
            bail!(
                "no leader: {answered} of {} members answered but none knows a leader after {} \
                 (election under way, or no quorum?); check `syncctl status`",
                reports.len(),
                humantime::format_duration(patience)
            );
        }
        sleep(LEADER_POLL).await;
    }
}

/// The role as shown to people: "leader", "pre-candidate", ...
pub fn role_name(role: i32) -> &'static str {
    match Role::try_from(role) {
        Ok(Role::Follower) => "follower",
        Ok(Role::Candidate) => "candidate",
        Ok(Role::Leader) => "leader",
        Ok(Role::Learner) => "learner",
        Ok(Role::PreCandidate) => "pre-candidate",
        Err(_) => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse_endpoint;

    fn report(endpoint: &str, status: Result<ClusterStatusResponse, &str>) -> MemberReport {
        MemberReport {
            endpoint: parse_endpoint(endpoint).unwrap(),
            status: status.map_err(str::to_owned),
        }
    }

    fn node(id: u64, role: Role, term: u64, leader: u64) -> ClusterStatusResponse {
        ClusterStatusResponse {
            node_id: id,
            address: format!("127.0.0.1:700{id}"),
            role: role as i32,
            term,
            leader_id: leader,
            leader_address: if leader == 0 {
                String::new()
            } else {
                format!("127.0.0.1:700{leader}")
            },
            ..Default::default()
        }
    }

    #[test]
    fn identical_failures_are_stated_once() {
        let reports = [
            report("127.0.0.1:7001", Err("connection refused")),
            report("127.0.0.1:7002", Err("connection refused")),
        ];
        assert_eq!(
            unreachable_error(&reports).to_string(),
            "no member reachable at 127.0.0.1:7001, 127.0.0.1:7002: connection refused; \
             is the cluster running? try `syncctl dev up`"
        );
    }

    #[test]
    fn different_failures_are_stated_per_endpoint() {
        let reports = [
            report("127.0.0.1:7001", Err("connection refused")),
            report("127.0.0.1:7002", Err("timed out after 5s")),
        ];
        let text = unreachable_error(&reports).to_string();
        assert!(
            text.starts_with(
                "no member reachable at 127.0.0.1:7001 (connection refused), \
                 127.0.0.1:7002 (timed out after 5s);"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_leader_is_found_among_the_members_that_answered() {
        let reports = [
            report("127.0.0.1:7001", Ok(node(1, Role::Follower, 3, 2))),
            report("127.0.0.1:7003", Ok(node(3, Role::Leader, 4, 3))),
            report("127.0.0.1:7002", Err("connection refused")),
        ];
        let leader = leader_in(&reports).unwrap();
        assert_eq!(
            (leader.id, leader.address.as_str(), leader.term),
            (3, "127.0.0.1:7003", 4)
        );
    }
}
