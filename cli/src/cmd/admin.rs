//! `syncctl member add|remove|promote`, `syncctl leader transfer`, `syncctl snapshot`.
//!
//! Membership changes and transfers go through the SDK to the leader with a request header, so
//! a call retried across a leader change applies once; each returns when the change is
//! committed (or the new leader leads). A snapshot is node-local: it is taken by the node named
//! with --node, or by the leader.

use serde::Serialize;
use sync_client::{Client, Membership};

use crate::args::{GlobalOpts, LeaderCommand, MemberCommand, Output, SnapshotArgs};
use crate::cluster::sdk_client;
use crate::output::{micros, print_json, table};

pub async fn member(global: &GlobalOpts, command: &MemberCommand) -> anyhow::Result<()> {
    let client = sdk_client(global).await?;
    let (what, membership) = match command {
        MemberCommand::Add(args) => {
            let address = args.address.to_string();
            let m = client.add_member(args.id, &address, true).await?;
            (format!("added node {} as a learner", args.id), m)
        }
        MemberCommand::Promote(args) => (
            format!("promoted node {} to voter", args.id),
            client.promote_learner(args.id).await?,
        ),
        MemberCommand::Remove(args) => (
            format!("removed node {}", args.id),
            client.remove_member(args.id).await?,
        ),
    };
    print_membership(global.output, &what, &membership)
}

fn print_membership(output: Output, what: &str, m: &Membership) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(m),
        Output::Table => {
            println!(
                "{what}; configuration committed at index {}",
                m.config_index
            );
            let mut t = table(&["id", "address", "kind"], &["id"]);
            for member in &m.members {
                let kind = if member.learner { "learner" } else { "voter" };
                t.add_row(vec![
                    member.id.to_string(),
                    member.address.clone(),
                    kind.into(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
    }
}

pub async fn leader(global: &GlobalOpts, command: &LeaderCommand) -> anyhow::Result<()> {
    let client = sdk_client(global).await?;
    let LeaderCommand::Transfer(args) = command;
    let leader = client.transfer_leader(args.to).await?;
    match global.output {
        Output::Json => print_json(&leader),
        Output::Table => {
            println!(
                "leader: node {} ({}) in term {}",
                leader.id, leader.address, leader.term
            );
            Ok(())
        }
    }
}

/// What `snapshot` prints.
#[derive(Serialize)]
struct Taken {
    node_id: u64,
    index: u64,
    term: u64,
    size_bytes: u64,
    /// The call's duration in microseconds, as syncctl measured it (the server does not report
    /// its own).
    took_us: u64,
}

pub async fn snapshot(global: &GlobalOpts, args: &SnapshotArgs) -> anyhow::Result<()> {
    let client = sdk_client(global).await?;
    let node = match args.node.node {
        Some(id) => id,
        None => leader_or_any(&client).await?,
    };
    let s = client.snapshot(node).await?;
    let taken = Taken {
        node_id: s.node_id,
        index: s.index,
        term: s.term,
        size_bytes: s.size_bytes,
        took_us: u64::try_from(s.took.as_micros()).unwrap_or(u64::MAX),
    };
    match global.output {
        Output::Json => print_json(&taken),
        Output::Table => {
            let mut t = table(
                &["node", "index", "term", "size (bytes)", "took"],
                &["node", "index", "term", "size (bytes)"],
            );
            t.add_row(vec![
                taken.node_id.to_string(),
                taken.index.to_string(),
                taken.term.to_string(),
                taken.size_bytes.to_string(),
                micros(taken.took_us),
            ]);
            println!("{t}");
            Ok(())
        }
    }
}

/// The leader's id as a member reports it, or that member's own id while no leader is known.
async fn leader_or_any(client: &Client) -> anyhow::Result<u64> {
    let status = client.node_status(None).await?;
    Ok(if status.leader_id != 0 {
        status.leader_id
    } else {
        status.node_id
    })
}
