//! `syncctl session grant|keepalive|revoke|list`: sessions (leases) by id, for scripts that
//! hold locks across several syncctl calls (`lock acquire --session ID`).

use serde::Serialize;
use sync_client::{Client, SessionInfo};
use tokio::time::sleep;

use crate::args::{GlobalOpts, Output, SessionCommand, SessionGrantArgs, SessionKeepaliveArgs};
use crate::cluster::sdk_client;
use crate::output::{millis, print_json, print_json_line, table, unix_ms};

pub async fn run(global: &GlobalOpts, command: &SessionCommand) -> anyhow::Result<()> {
    let client = sdk_client(global).await?;
    match command {
        SessionCommand::Grant(args) => grant(&client, global.output, args).await,
        SessionCommand::Keepalive(args) => keepalive(&client, global.output, args).await,
        SessionCommand::Revoke(args) => revoke(&client, global.output, args.id).await,
        SessionCommand::List => list(&client, global.output).await,
    }
}

/// One session and its TTL: what grant and keepalive print.
#[derive(Serialize)]
struct SessionTtl {
    session_id: u64,
    ttl_ms: u64,
}

fn print_session_ttl(output: Output, s: &SessionTtl, json_lines: bool) -> anyhow::Result<()> {
    match output {
        Output::Json if json_lines => print_json_line(s),
        Output::Json => print_json(s),
        Output::Table => {
            let mut t = table(&["session", "ttl"], &["session"]);
            t.add_row(vec![s.session_id.to_string(), millis(s.ttl_ms)]);
            println!("{t}");
            Ok(())
        }
    }
}

async fn grant(client: &Client, output: Output, args: &SessionGrantArgs) -> anyhow::Result<()> {
    let session = client
        .session_builder()
        .ttl(args.ttl)
        .client_name(&args.client_name)
        .keep_alive(false)
        .create()
        .await?;
    let granted = SessionTtl {
        session_id: session.id(),
        ttl_ms: session.ttl().as_millis() as u64,
    };
    let id = session.detach();
    print_session_ttl(output, &granted, false)?;
    if output == Output::Table {
        eprintln!(
            "keep it alive with `syncctl session keepalive {id}`, or it expires after its TTL"
        );
    }
    Ok(())
}

async fn keepalive(
    client: &Client,
    output: Output,
    args: &SessionKeepaliveArgs,
) -> anyhow::Result<()> {
    loop {
        let ttl = client.keep_alive_once(args.id).await?;
        let renewed = SessionTtl {
            session_id: args.id,
            ttl_ms: ttl.as_millis() as u64,
        };
        print_session_ttl(output, &renewed, !args.once)?;
        if args.once {
            return Ok(());
        }
        tokio::select! {
            _ = sleep(ttl / 3) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn revoke(client: &Client, output: Output, id: u64) -> anyhow::Result<()> {
    let released = client.revoke_session(id).await?;
    match output {
        Output::Json => print_json(&serde_json::json!({
            "session_id": id,
            "released_locks": released,
        })),
        Output::Table => {
            match released.len() {
                0 => println!("session {id} revoked; it held no lock"),
                _ => println!("session {id} revoked; released {}", released.join(", ")),
            }
            Ok(())
        }
    }
}

async fn list(client: &Client, output: Output) -> anyhow::Result<()> {
    let sessions = client.list_sessions().await?;
    match output {
        Output::Json => {
            // A struct, not `json!`, keeps each session's fields in their documented order.
            #[derive(Serialize)]
            struct Sessions<'a> {
                sessions: &'a [SessionInfo],
            }
            print_json(&Sessions {
                sessions: &sessions,
            })
        }
        Output::Table => {
            println!("{}", sessions_table(&sessions));
            Ok(())
        }
    }
}

fn sessions_table(sessions: &[SessionInfo]) -> comfy_table::Table {
    let mut t = table(
        &["session", "client", "ttl", "remaining", "locks", "created"],
        &["session", "locks"],
    );
    for s in sessions {
        let client = if s.implicit {
            format!("{} (implicit)", s.client_name)
        } else {
            s.client_name.clone()
        };
        t.add_row(vec![
            s.session_id.to_string(),
            client,
            millis(s.ttl_ms),
            millis(s.remaining_ms),
            s.held_locks.to_string(),
            unix_ms(s.created_unix_ms),
        ]);
    }
    t
}
