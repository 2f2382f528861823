//! `syncctl lock acquire|release|list|get|run|watch`.
//!
//! `acquire` and `release` work with sessions by id, so that a lock can be taken in one syncctl
//! call and released in another; `run` does the whole cycle for one command: open a session
//! that it keeps alive, acquire, run the command with the fencing token in its environment,
//! release.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use sync_client::{Client, Error, LockEvent, LockMode, LockState, Session};
use tokio::process::{Child, Command};

use crate::args::{GlobalOpts, LockAcquireArgs, LockCommand, LockReleaseArgs, LockRunArgs, Output};
use crate::cluster::sdk_client;
use crate::output::{duration, millis, print_json, print_json_line, table, unix_ms};

/// TTL of the session `lock acquire` opens when given neither --session nor --ttl.
const DEFAULT_ACQUIRE_TTL: Duration = Duration::from_secs(30);
/// How long `lock run` lets the command stop after SIGTERM (session lost) before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub async fn run(global: &GlobalOpts, command: &LockCommand) -> anyhow::Result<ExitCode> {
    let client = sdk_client(global).await?;
    let output = global.output;
    match command {
        LockCommand::Acquire(args) => acquire(&client, output, args).await?,
        LockCommand::Release(args) => release(&client, output, args).await?,
        LockCommand::List(args) => list(&client, output, &args.prefix).await?,
        LockCommand::Get(args) => get(&client, output, &args.name).await?,
        LockCommand::Watch(args) => watch(&client, output, &args.prefix).await?,
        LockCommand::Run(args) => return run_command(&client, args).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// What `lock acquire` prints.
#[derive(Serialize)]
struct Held {
    name: String,
    mode: LockMode,
    token: u64,
    session_id: u64,
    /// The session's TTL.
    ttl_ms: u64,
}

async fn acquire(client: &Client, output: Output, args: &LockAcquireArgs) -> anyhow::Result<()> {
    let (session, opened) = match args.session {
        Some(id) => (client.attach_session(id).await?, false),
        None => {
            let session = client
                .session_builder()
                .ttl(args.ttl.unwrap_or(DEFAULT_ACQUIRE_TTL))
                .client_name(&args.client_name)
                .keep_alive(false)
                .create()
                .await?;
            (session, true)
        }
    };
    let acquired = session
        .lock(&args.name)
        .mode(args.mode.into())
        .timeout(args.wait)
        .lock_delay(args.lock_delay)
        .acquire()
        .await;
    let guard = match acquired {
        Ok(guard) => guard,
        Err(e) => {
            if opened {
                // The session exists only for this lock; do not leave it behind.
                let _ = session.revoke().await;
            }
            return Err(not_acquired(client, &args.name, args.wait, e).await);
        }
    };
    let held = Held {
        name: args.name.clone(),
        mode: guard.mode(),
        token: guard.token(),
        session_id: session.id(),
        ttl_ms: session.ttl().as_millis() as u64,
    };
    guard.detach();
    let id = session.detach();
    match output {
        Output::Json => print_json(&held)?,
        Output::Table => {
            let mut t = table(
                &["name", "mode", "token", "session", "ttl"],
                &["token", "session"],
            );
            t.add_row(vec![
                held.name.clone(),
                held.mode.to_string(),
                held.token.to_string(),
                id.to_string(),
                millis(held.ttl_ms),
            ]);
            println!("{t}");
            if opened {
                eprintln!(
                    "session {id} holds the lock until its TTL passes; keep it with `syncctl \
                     session keepalive {id}`, release with `syncctl lock release {} --session \
                     {id}`",
                    held.name
                );
            }
        }
    }
    Ok(())
}

/// The error for an Acquire that failed: a wait that timed out is restated with the holders
/// that kept the lock (exit code 3, like a refused try-lock).
async fn not_acquired(client: &Client, name: &str, wait: Duration, err: Error) -> anyhow::Error {
    if !matches!(err, Error::Timeout { .. }) {
        return err.into();
    }
    let holders = match client.get_lock(name).await {
        Ok(lock) => lock.holders,
        Err(_) => return anyhow::Error::new(err).context(format!("lock `{name}` not acquired")),
    };
    let refused = Error::NotAcquired {
        name: name.to_owned(),
        holders,
    };
    anyhow::Error::new(refused).context(format!("not acquired within {}", duration(wait)))
}

async fn release(client: &Client, output: Output, args: &LockReleaseArgs) -> anyhow::Result<()> {
    let session = client.attach_session(args.session).await?;
    session.release(&args.name).await?;
    match output {
        Output::Json => print_json(&serde_json::json!({
            "name": args.name,
            "session_id": args.session,
            "released": true,
        })),
        Output::Table => {
            println!("released {} (session {})", args.name, args.session);
            Ok(())
        }
    }
}

async fn list(client: &Client, output: Output, prefix: &str) -> anyhow::Result<()> {
    let locks = client.list_locks(prefix).await?;
    match output {
        Output::Json => {
            // A struct, not `json!`, keeps each lock's fields in their documented order.
            #[derive(Serialize)]
            struct Locks<'a> {
                locks: &'a [LockState],
            }
            print_json(&Locks { locks: &locks })
        }
        Output::Table => {
            let mut t = table(
                &["name", "mode", "holders", "tokens", "waiters"],
                &["waiters"],
            );
            for lock in &locks {
                t.add_row(vec![
                    lock.name.clone(),
                    lock.mode.map_or("-".to_owned(), |m| m.to_string()),
                    joined(lock.holders.iter().map(|h| h.session_id)),
                    joined(lock.holders.iter().map(|h| h.token)),
                    lock.waiters.len().to_string(),
                ]);
            }
            println!("{t}");
            Ok(())
        }
    }
}

fn joined(items: impl Iterator<Item = u64>) -> String {
    let text: Vec<String> = items.map(|i| i.to_string()).collect();
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.join(",")
    }
}

async fn get(client: &Client, output: Output, name: &str) -> anyhow::Result<()> {
    let lock = client.get_lock(name).await?;
    match output {
        Output::Json => print_json(&lock),
        Output::Table => {
            println!("{}", lock_table(&lock));
            Ok(())
        }
    }
}

/// One row per holder, then one per waiter in the order they will be served.
fn lock_table(lock: &LockState) -> comfy_table::Table {
    let mut t = table(
        &["role", "session", "client", "mode", "token", "since"],
        &["session", "token"],
    );
    for h in &lock.holders {
        t.add_row(vec![
            "holder".to_owned(),
            h.session_id.to_string(),
            h.client_name.clone(),
            h.mode.to_string(),
            h.token.to_string(),
            unix_ms(h.acquired_unix_ms),
        ]);
    }
    for w in &lock.waiters {
        let role = if w.upgrade { "upgrading" } else { "waiter" };
        t.add_row(vec![
            role.to_owned(),
            w.session_id.to_string(),
            w.client_name.clone(),
            w.mode.to_string(),
            "-".to_owned(),
            unix_ms(w.since_unix_ms),
        ]);
    }
    t
}

async fn watch(client: &Client, output: Output, prefix: &str) -> anyhow::Result<()> {
    let mut events = Box::pin(client.watch_locks(prefix).await?);
    if output == Output::Table {
        println!("{}", event_line(None));
    }
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let event = match event {
            Some(event) => event.context("the lock watch ended")?,
            None => anyhow::bail!("the node serving the watch ended it; watch again"),
        };
        match output {
            Output::Json => print_json_line(&event)?,
            Output::Table => println!("{}", event_line(Some(&event))),
        }
    }
}

/// A line of the `lock watch` table (the header for `None`). Columns have fixed widths, as
/// the rows are printed one at a time.
fn event_line(event: Option<&LockEvent>) -> String {
    let cells: [String; 7] = match event {
        None => [
            "TIME", "EVENT", "LOCK", "SESSION", "CLIENT", "MODE", "TOKEN",
        ]
        .map(str::to_owned),
        Some(e) => [
            unix_ms(e.time_unix_ms),
            e.kind.to_string(),
            e.name.clone(),
            e.session_id.to_string(),
            e.client_name.clone(),
            e.mode.map_or("-".to_owned(), |m| m.to_string()),
            e.token.to_string(),
        ],
    };
    let [time, kind, name, session, client, mode, token] = cells;
    format!("{time:<24} {kind:<9} {name:<20} {session:>7} {client:<16} {mode:<9} {token:>7}")
        .trim_end()
        .to_owned()
}

async fn run_command(client: &Client, args: &LockRunArgs) -> anyhow::Result<ExitCode> {
    let session = client
        .session_builder()
        .ttl(args.ttl)
        .client_name(&args.client_name)
        .create()
        .await?;
    let guard = match session
        .lock(&args.name)
        .mode(args.mode.into())
        .timeout(args.wait)
        .acquire()
        .await
    {
        Ok(guard) => guard,
        Err(e) => {
            let _ = session.revoke().await;
            return Err(not_acquired(client, &args.name, args.wait, e).await);
        }
    };
    let program = &args.command[0];
    let spawned = Command::new(program)
        .args(&args.command[1..])
        .env("SYNC_LOCK_NAME", &args.name)
        .env("SYNC_LOCK_TOKEN", guard.token().to_string())
        .env("SYNC_LOCK_SESSION", session.id().to_string())
        .env("SYNC_LOCK_MODE", guard.mode().to_string())
        .spawn();
    let outcome = match spawned {
        Ok(child) => supervise(child, &session).await,
        Err(e) => Err(anyhow::anyhow!("cannot run `{program}`: {e}")),
    };
    let released = guard.release().await;
    let _ = session.revoke().await;
    let status = outcome?;
    if let Err(e) = released {
        eprintln!("warning: releasing {}: {e}", args.name);
    }
    Ok(exit_code(status))
}

/// Waits for the command; stops it if the session is lost first.
async fn supervise(mut child: Child, session: &Session) -> anyhow::Result<ExitStatus> {
    loop {
        tokio::select! {
            status = child.wait() => return Ok(status?),
            _ = session.lost() => break,
            // The terminal sends Ctrl-C to the whole process group: the command gets it too and
            // decides; syncctl stays to release the lock after it.
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    anyhow::bail!(
        "lost the lock: session {} expired or was revoked while the command ran; the command \
         was stopped",
        session.id()
    )
}

/// The command's exit code, or 128 + the signal that ended it (as shells report it).
fn exit_code(status: ExitStatus) -> ExitCode {
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_client::{Holder, LockEventKind, Waiter};

    #[test]
    fn the_lock_table_lists_holders_then_waiters() {
        let lock = LockState {
            name: "db".into(),
            mode: Some(LockMode::Shared),
            holders: vec![Holder {
                session_id: 7,
                client_name: "alice".into(),
                mode: LockMode::Shared,
                token: 12,
                acquired_unix_ms: 1_700_000_000_000,
                lock_delay_ms: 0,
            }],
            waiters: vec![Waiter {
                session_id: 9,
                client_name: "bob".into(),
                mode: LockMode::Exclusive,
                since_unix_ms: 1_700_000_000_500,
                upgrade: false,
            }],
            lock_delay_until_unix_ms: 0,
        };
        let text = lock_table(&lock).to_string();
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            ["ROLE", "SESSION", "CLIENT", "MODE", "TOKEN", "SINCE"]
        );
        assert_eq!(
            rows[1],
            [
                "holder",
                "7",
                "alice",
                "shared",
                "12",
                "2023-11-14T22:13:20.000Z"
            ]
        );
        assert_eq!(rows[2][..5], ["waiter", "9", "bob", "exclusive", "-"]);
    }

    #[test]
    fn watch_lines_line_up_under_the_header() {
        let event = LockEvent {
            kind: LockEventKind::Acquired,
            name: "db".into(),
            session_id: 7,
            client_name: "alice".into(),
            mode: Some(LockMode::Exclusive),
            token: 12,
            index: 40,
            time_unix_ms: 1_700_000_000_000,
            cycle: Vec::new(),
        };
        let header = event_line(None);
        let line = event_line(Some(&event));
        assert_eq!(header.find("EVENT"), line.find("acquired"));
        assert_eq!(header.find("CLIENT"), line.find("alice"));
        assert!(line.ends_with(" 12"), "{line}");
    }

    #[test]
    fn a_command_killed_by_a_signal_exits_like_in_a_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), ExitCode::from(3));
        assert_eq!(
            exit_code(ExitStatus::from_raw(libc::SIGTERM)),
            ExitCode::from(143)
        );
    }
}
