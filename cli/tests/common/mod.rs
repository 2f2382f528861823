//! What the cluster tests of syncctl share: running `syncctl` against a harness cluster, parsing
//! its JSON, checking its one-line failures.
#![allow(dead_code)] // Each test binary uses its own subset.

use std::process::{Output, Stdio};

use anyhow::{Context, ensure};
use serde_json::Value;
use sync_tests::Cluster;
use tokio::process::Command;

/// The cluster's endpoints, comma-separated.
pub fn endpoints(c: &Cluster) -> String {
    let all: Vec<String> = c
        .ids()
        .iter()
        .map(|&id| c.address(id).to_string())
        .collect();
    all.join(",")
}

/// `syncctl --endpoints <the cluster> ARGS`, without the caller's SYNC_ENDPOINTS.
pub fn syncctl(c: &Cluster, args: &[&str]) -> Command {
    syncctl_at(&endpoints(c), args)
}

/// `syncctl --endpoints ENDPOINTS ARGS`, for a task that runs while the test changes the
/// cluster (and so cannot borrow it).
pub fn syncctl_at(endpoints: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_syncctl"));
    command
        .args(["--endpoints", endpoints])
        .args(args)
        .env_remove("SYNC_ENDPOINTS")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

pub async fn run(c: &Cluster, args: &[&str]) -> anyhow::Result<Output> {
    syncctl(c, args)
        .output()
        .await
        .with_context(|| format!("cannot run syncctl {args:?}"))
}

/// Runs a command that must succeed with `--output json`, and parses its stdout.
pub async fn json(c: &Cluster, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = run(c, &all).await?;
    ensure!(
        out.status.success(),
        "syncctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Runs a command that must fail with `code`, and returns its one line of stderr.
pub async fn fails(c: &Cluster, args: &[&str], code: i32) -> anyhow::Result<String> {
    let out = run(c, args).await?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.code() == Some(code),
        "syncctl {args:?}: exit {:?}, expected {code}; stderr: {err}",
        out.status.code()
    );
    ensure!(
        err.lines().count() == 1 && err.starts_with("error: "),
        "not one line: {err:?}"
    );
    ensure!(out.stdout.is_empty(), "stdout on failure: {:?}", out.stdout);
    Ok(err)
}

pub fn u64_at(v: &Value, pointer: &str) -> anyhow::Result<u64> {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .with_context(|| format!("no number at {pointer} in {v}"))
}
