//! `syncctl cache get|set|del|state|stats [--node ID]`.
//!
//! Cache calls are answered by the node that receives them (cache.proto), so `--node ID` is
//! part of the question: `cache get k1 --node 2` reports a HIT or MISS of node 2's line. The
//! SDK's [`sync_client::NodeCache`] pins every call of a command to that node (resolving the id
//! through `Cluster.Status`) and retries only there; without `--node` the calls go to the
//! leader, or any member.
//!
//! `cache set --if-version N` is a CompareAndSet: a version mismatch is not a failure of the
//! call but of the condition, and exits with 3 (as a lock that was not acquired), with one line
//! naming the key's current version.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sync_client::api::{CacheGetResponse, CacheHolder, CacheStateResponse, MesiState};
use sync_client::{CasOutcome, Client, NodeCache};

use crate::args::{CacheCommand, CacheKeyArgs, CacheSetArgs, GlobalOpts, Output};
use crate::cluster::sdk_client;
use crate::errors::{CasMismatch, one_line};
use crate::input::payload;
use crate::output::{bytes_cell, millis, print_json, table, text_or_hex};

pub async fn run(global: &GlobalOpts, command: &CacheCommand) -> anyhow::Result<()> {
    let client = sdk_client(global).await?;
    let output = global.output;
    match command {
        CacheCommand::Get(args) => get(&client, output, args).await,
        CacheCommand::Set(args) => set(&client, output, args).await,
        CacheCommand::Del(args) => del(&client, output, args).await,
        CacheCommand::State(args) => state(&client, output, args).await,
        CacheCommand::Stats(node) => {
            let stats = client.cache_on(node.node).await?.stats().await?;
            print_stats(output, &stats)
        }
    }
}

/// The MESI state as printed: "MODIFIED", "EXCLUSIVE", "SHARED", "INVALID".
fn mesi(state: i32) -> &'static str {
    match MesiState::try_from(state) {
        Ok(MesiState::Modified) => "MODIFIED",
        Ok(MesiState::Exclusive) => "EXCLUSIVE",
        Ok(MesiState::Shared) => "SHARED",
        Ok(MesiState::Invalid) => "INVALID",
        Err(_) => "UNKNOWN",
    }
}

/// Milliseconds from now (this machine's clock) until `unix_ms`; `None` for 0 (no expiry).
fn ms_until(unix_ms: u64) -> Option<u64> {
    if unix_ms == 0 {
        return None;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    Some(u64::try_from(u128::from(unix_ms).saturating_sub(now)).unwrap_or(u64::MAX))
}

/// What `cache get` prints. The value is text if it is UTF-8, otherwise hex in `value_hex`.
#[derive(Serialize)]
struct Read {
    key: String,
    /// The node asked, if --node named one.
    node: Option<u64>,
    found: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
    version: u64,
    hit: bool,
    /// The node's line after the read.
    state: &'static str,
    expires_unix_ms: u64,
    /// Milliseconds until the key expires, by this machine's clock; absent if it never does.
    ttl_left_ms: Option<u64>,
}

impl Read {
    fn of(r: CacheGetResponse, node: Option<u64>) -> Read {
        let (value, value_hex) = if r.found {
            text_or_hex(&r.value)
        } else {
            (None, None)
        };
        Read {
            node,
            found: r.found,
            value,
            value_hex,
            version: r.version,
            hit: r.hit,
            state: mesi(r.state),
            ttl_left_ms: ms_until(r.expires_unix_ms),
            expires_unix_ms: r.expires_unix_ms,
            key: r.key,
        }
    }
}

async fn get(client: &Client, output: Output, args: &CacheKeyArgs) -> anyhow::Result<()> {
    let node = args.node.node;
    let read = Read::of(client.cache_on(node).await?.get(&args.key).await?, node);
    match output {
        Output::Json => print_json(&read),
        Output::Table => {
            let mut t = table(
                &["key", "value", "version", "result", "state", "ttl left"],
                &["version"],
            );
            let value = if read.found {
                bytes_cell(read.value.as_deref(), read.value_hex.as_deref())
            } else {
                "(not found)".to_owned()
            };
            t.add_row(vec![
                read.key.clone(),
                value,
                read.version.to_string(),
                if read.hit { "HIT" } else { "MISS" }.to_owned(),
                read.state.to_owned(),
                read.ttl_left_ms.map_or("-".to_owned(), millis),
            ]);
            println!("{t}");
            Ok(())
        }
    }
}

async fn set(client: &Client, output: Output, args: &CacheSetArgs) -> anyhow::Result<()> {
    let value = payload(args.value.as_deref(), args.file.as_deref(), "the value")?;
    let cache = client.cache_on(args.node.node).await?;
    let version = match args.if_version {
        None => cache.set(&args.key, value, args.ttl).await?,
        Some(expected) => {
            match cache
                .compare_and_set(&args.key, expected, value, args.ttl)
                .await?
            {
                CasOutcome::Written(version) => version,
                CasOutcome::Mismatch(current) => {
                    return Err(CasMismatch {
                        key: args.key.clone(),
                        expected,
                        current,
                    }
                    .into());
                }
            }
        }
    };
    match output {
        Output::Json => print_json(&serde_json::json!({
            "key": args.key,
            "node": args.node.node,
            "version": version,
        })),
        Output::Table => {
            println!("{}: version {version}", args.key);
            Ok(())
        }
    }
}

async fn del(client: &Client, output: Output, args: &CacheKeyArgs) -> anyhow::Result<()> {
    let deleted = client
        .cache_on(args.node.node)
        .await?
        .delete(&args.key)
        .await?;
    match output {
        Output::Json => print_json(&serde_json::json!({
            "key": args.key,
            "deleted": deleted.deleted,
            "version": deleted.version,
        })),
        Output::Table => {
            if deleted.deleted {
                println!("{}: deleted (version {})", args.key, deleted.version);
            } else {
                println!("{}: not found, nothing deleted", args.key);
            }
            Ok(())
        }
    }
}

/// One holder in the directory's records.
#[derive(Serialize)]
struct Holder {
    node_id: u64,
    state: &'static str,
}

/// What `cache state` prints: the asked node's line, and the directory's view (asked of the
/// directory's node when the asked node is not the directory, which knows only its own line).
#[derive(Serialize)]
struct State {
    key: String,
    node_id: u64,
    state: &'static str,
    version: u64,
    lease_remaining_ms: u64,
    /// Write-back mode: the node holds writes of the key memory does not have yet.
    dirty: bool,
    directory_node_id: u64,
    directory_version: u64,
    holders: Vec<Holder>,
}

fn holders(list: &[CacheHolder]) -> Vec<Holder> {
    list.iter()
        .map(|h| Holder {
            node_id: h.node_id,
            state: mesi(h.state),
        })
        .collect()
}

async fn state(client: &Client, output: Output, args: &CacheKeyArgs) -> anyhow::Result<()> {
    let line: CacheStateResponse = client
        .cache_on(args.node.node)
        .await?
        .state(&args.key)
        .await?;
    let mut shown = State {
        key: line.key.clone(),
        node_id: line.node_id,
        state: mesi(line.state),
        version: line.version,
        lease_remaining_ms: line.lease_remaining_ms,
        dirty: line.dirty,
        directory_node_id: line.directory_node_id,
        directory_version: line.directory_version,
        holders: holders(&line.holders),
    };
    let directory = line.directory_node_id;
    if directory != 0 && directory != line.node_id {
        match directory_view(client, directory, &args.key).await {
            Ok(view) => {
                shown.directory_version = view.directory_version;
                shown.holders = holders(&view.holders);
            }
            // This node's line is still worth showing; say why the holders are missing.
            Err(err) => eprintln!(
                "warning: the directory on node {directory} did not answer, holders unknown: {}",
                one_line(&err)
            ),
        }
    }
    match output {
        Output::Json => print_json(&shown),
        Output::Table => {
            let mut t = table(
                &["node", "state", "version", "lease left", "dirty"],
                &["node", "version"],
            );
            t.add_row(vec![
                shown.node_id.to_string(),
                shown.state.to_owned(),
                shown.version.to_string(),
                // An INVALID line holds no lease.
                match shown.lease_remaining_ms {
                    0 => "-".to_owned(),
                    ms => millis(ms),
                },
                // "yes": written here and not yet in memory (write-back mode).
                if shown.dirty { "yes" } else { "no" }.to_owned(),
            ]);
            println!("{t}");
            println!();
            if shown.directory_node_id == 0 {
                println!("directory: none (no leader known)");
                return Ok(());
            }
            println!(
                "directory on node {}: version {}",
                shown.directory_node_id, shown.directory_version
            );
            let mut h = table(&["holder", "state"], &["holder"]);
            for holder in &shown.holders {
                h.add_row(vec![holder.node_id.to_string(), holder.state.to_owned()]);
            }
            if shown.holders.is_empty() {
                println!("no node holds a valid line");
            } else {
                println!("{h}");
            }
            Ok(())
        }
    }
}

async fn directory_view(
    client: &Client,
    directory: u64,
    key: &str,
) -> anyhow::Result<CacheStateResponse> {
    let cache: NodeCache = client.cache_on(Some(directory)).await?;
    Ok(cache.state(key).await?)
}

fn print_stats(output: Output, s: &sync_client::api::CacheStatsResponse) -> anyhow::Result<()> {
    let rows: [(&str, u64); 13] = [
        ("node_id", s.node_id),
        ("hits", s.hits),
        ("misses", s.misses),
        ("invalidations_sent", s.invalidations_sent),
        ("invalidations_received", s.invalidations_received),
        ("write_backs", s.write_backs),
        ("evictions", s.evictions),
        ("bytes", s.bytes),
        ("entries", s.entries),
        ("capacity_bytes", s.capacity_bytes),
        ("local_writes", s.local_writes),
        ("dirty_lines", s.dirty_lines),
        ("dirty_lines_lost", s.dirty_lines_lost),
    ];
    match output {
        Output::Json => {
            let object: serde_json::Map<String, serde_json::Value> = rows
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).into()))
                .collect();
            print_json(&object)
        }
        Output::Table => {
            let mut t = table(&["counter", "value"], &["value"]);
            for (name, value) in rows {
                t.add_row(vec![name.replace('_', " "), value.to_string()]);
            }
            println!("{t}");
            Ok(())
        }
    }
}
