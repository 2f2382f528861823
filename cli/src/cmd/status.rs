//! `syncctl status`: every endpoint's Cluster.Status, side by side.
//!
//! Each node answers from its own state, so the rows can disagree (a partitioned node still
//! believes in an old leader); seeing them together is the point. The command succeeds when at
//! least one member answers; unreachable members are shown as such, with the reason on stderr.

use serde::Serialize;
use sync_proto::sync::v1::{ClusterStatusResponse, MemberStatus};

use crate::args::{GlobalOpts, Output};
use crate::cluster::{MemberReport, role_name, status_all, unreachable_error};
use crate::output::{print_json, table};

pub async fn run(global: &GlobalOpts) -> anyhow::Result<()> {
    let tls = global.tls()?;
    let reports = status_all(&global.endpoints, global.timeout, tls.as_ref()).await;
    if reports.iter().all(|r| r.status.is_err()) {
        return Err(unreachable_error(&reports));
    }
    match global.output {
        Output::Json => print_json(&StatusJson::from(&reports[..]))?,
        Output::Table => {
            println!("{}", status_table(&reports));
            for report in &reports {
                if let Err(reason) = &report.status {
                    eprintln!("warning: {}: {reason}", report.endpoint);
                }
            }
        }
    }
    Ok(())
}

fn status_table(reports: &[MemberReport]) -> comfy_table::Table {
    let numbers = ["id", "term", "leader", "commit", "applied"];
    let mut t = table(
        &[
            "id", "address", "role", "term", "leader", "commit", "applied",
        ],
        &numbers,
    );
    for report in reports {
        let row: Vec<String> = match &report.status {
            Ok(s) => vec![
                s.node_id.to_string(),
                s.address.clone(),
                role_name(s.role).to_owned(),
                s.term.to_string(),
                if s.leader_id == 0 {
                    "-".to_owned()
                } else {
                    s.leader_id.to_string()
                },
                s.commit_index.to_string(),
                s.applied_index.to_string(),
            ],
            Err(_) => {
                let mut row = vec!["-".to_owned(); 7];
                row[1] = report.endpoint.to_string();
                row[2] = "unreachable".to_owned();
                row
            }
        };
        t.add_row(row);
    }
    t
}

/// `status --output json`: `{"nodes": [...]}`, one entry per endpoint, in the order given.
#[derive(Serialize)]
struct StatusJson {
    nodes: Vec<NodeJson>,
}

#[derive(Serialize)]
struct NodeJson {
    /// The endpoint asked, as given on the command line.
    endpoint: String,
    reachable: bool,
    /// Why the endpoint did not answer; absent when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The answer; absent when the endpoint did not answer.
    #[serde(flatten)]
    status: Option<NodeStatusJson>,
}

#[derive(Serialize)]
struct NodeStatusJson {
    id: u64,
    address: String,
    role: &'static str,
    term: u64,
    /// 0 when the node knows no leader in its term.
    leader_id: u64,
    leader_address: String,
    commit_index: u64,
    applied_index: u64,
    last_log_index: u64,
    snapshot_index: u64,
    members: Vec<MemberJson>,
}

#[derive(Serialize)]
struct MemberJson {
    id: u64,
    address: String,
    learner: bool,
    reachable: bool,
    last_contact_ms: u64,
    /// Known only when the answering node is the leader; 0 otherwise.
    match_index: u64,
    /// Known only when the answering node is the leader; 0 otherwise.
    replication_lag: u64,
}

impl From<&[MemberReport]> for StatusJson {
    fn from(reports: &[MemberReport]) -> Self {
        let nodes = reports
            .iter()
            .map(|r| NodeJson {
                endpoint: r.endpoint.to_string(),
                reachable: r.status.is_ok(),
                error: r.status.as_ref().err().cloned(),
                status: r.status.as_ref().ok().map(NodeStatusJson::from),
            })
            .collect();
        StatusJson { nodes }
    }
}

impl From<&ClusterStatusResponse> for NodeStatusJson {
    fn from(s: &ClusterStatusResponse) -> Self {
        NodeStatusJson {
            id: s.node_id,
            address: s.address.clone(),
            role: role_name(s.role),
            term: s.term,
            leader_id: s.leader_id,
            leader_address: s.leader_address.clone(),
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            last_log_index: s.last_log_index,
            snapshot_index: s.snapshot_index,
            members: s.members.iter().map(MemberJson::from).collect(),
        }
    }
}

impl From<&MemberStatus> for MemberJson {
    fn from(m: &MemberStatus) -> Self {
        MemberJson {
            id: m.id,
            address: m.address.clone(),
            learner: m.learner,
            reachable: m.reachable,
            last_contact_ms: m.last_contact_ms,
            match_index: m.match_index,
            replication_lag: m.replication_lag,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse_endpoint;
    use sync_proto::sync::v1::Role;

    fn reports() -> Vec<MemberReport> {
        vec![
            MemberReport {
                endpoint: parse_endpoint("127.0.0.1:7001").unwrap(),
                status: Ok(ClusterStatusResponse {
                    node_id: 1,
                    address: "127.0.0.1:7001".into(),
                    role: Role::Leader as i32,
                    term: 2,
                    leader_id: 1,
                    leader_address: "127.0.0.1:7001".into(),
                    commit_index: 10,
                    applied_index: 9,
                    ..Default::default()
                }),
            },
            MemberReport {
                endpoint: parse_endpoint("127.0.0.1:7002").unwrap(),
                status: Err("connection refused".into()),
            },
        ]
    }

    #[test]
    fn the_table_shows_unreachable_members() {
        let text = status_table(&reports()).to_string();
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            [
                "ID", "ADDRESS", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED"
            ]
        );
        assert_eq!(
            lines[1],
            ["1", "127.0.0.1:7001", "leader", "2", "1", "10", "9"]
        );
        assert_eq!(
            lines[2],
            ["-", "127.0.0.1:7002", "unreachable", "-", "-", "-", "-"]
        );
    }

    #[test]
    fn json_has_one_entry_per_endpoint() {
        let json = serde_json::to_value(StatusJson::from(&reports()[..])).unwrap();
        let nodes = json["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0]["role"], "leader");
        assert_eq!(nodes[0]["applied_index"], 9);
        assert_eq!(nodes[0]["reachable"], true);
        assert!(nodes[0].get("error").is_none());
        assert_eq!(nodes[1]["reachable"], false);
        assert_eq!(nodes[1]["error"], "connection refused");
        assert!(nodes[1].get("role").is_none());
    }
}
