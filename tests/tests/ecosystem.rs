//! The gRPC and Prometheus ecosystem works against every node of a running cluster: real
//! `grpcurl` lists every service through server reflection (v1alpha, which grpcurl 1.8 speaks),
//! describes them with their proto comments, runs a health check and a forwarded write; real
//! `promtool check metrics` accepts every node's `/metrics`, which carries the Raft, WAL, peer
//! and per-RPC series. `.ci/run` installs both tools.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use sync_tests::{Options, scenario, write_keys};

/// Runs a tool to completion, failing with an actionable message if it is missing.
async fn run(
    tool: &'static str,
    args: Vec<String>,
    stdin: Option<String>,
) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(tool);
        cmd.args(&args);
        let output = if let Some(input) = stdin {
            use std::io::Write;
            let mut child = cmd
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("{tool} is not installed (see .ci/run)"))?;
            child
                .stdin
                .take()
                .context("stdin")?
                .write_all(input.as_bytes())?;
            child.wait_with_output()?
        } else {
            cmd.output()
                .with_context(|| format!("{tool} is not installed (see .ci/run)"))?
        };
        let out = String::from_utf8_lossy(&output.stdout).to_string();
        if !output.status.success() {
            bail!(
                "{tool} {args:?} failed ({}): {}{}",
                output.status,
                out,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(out + &String::from_utf8_lossy(&output.stderr))
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_and_promtool_work_against_every_node() {
    scenario(3, Options::default(), Duration::from_secs(90), async |c| {
        let leader = c.wait_for_agreement(Duration::from_secs(5)).await?;
        write_keys(&c.clients(), &c.ids(), "eco", 10, 1)
            .await
            .expect_all_acked()?;
        for id in c.ids() {
            let addr = c.address(id).to_string();
            let list = run(
                "grpcurl",
                vec!["-plaintext".into(), addr.clone(), "list".into()],
                None,
            )
            .await?;
            for service in [
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
                "sync.raft.v1.Raft",
                "sync.v1.Cluster",
                "sync.v1.Kv",
            ] {
                ensure!(
                    list.lines().any(|l| l.trim() == service),
                    "node {id}: grpcurl list lacks {service}:\n{list}"
                );
            }
            let described = run(
                "grpcurl",
                vec![
                    "-plaintext".into(),
                    addr.clone(),
                    "describe".into(),
                    "sync.v1.Kv.Put".into(),
                ],
                None,
            )
            .await?;
            ensure!(
                described.contains("committed and applied"),
                "node {id}: describe does not show the proto comments:\n{described}"
            );
            let health = run(
                "grpcurl",
                vec![
                    "-plaintext".into(),
                    addr.clone(),
                    "grpc.health.v1.Health/Check".into(),
                ],
                None,
            )
            .await?;
            ensure!(health.contains("SERVING"), "node {id}: health is {health}");

            let metrics = c.metrics(id).await?;
            for series in [
                "syncd_raft_term",
                "syncd_raft_commit_index",
                "syncd_raft_applied_index",
                "syncd_raft_role{role=\"leader\"}",
                "syncd_wal_fsync_duration_seconds_bucket",
                "syncd_peer_reachable",
                "syncd_grpc_server_requests_total{service=",
            ] {
                ensure!(
                    metrics.contains(series),
                    "node {id}: /metrics lacks {series}"
                );
            }
            // Followers serve the Raft RPCs; the leader only sends them.
            let raft_rpcs = "syncd_grpc_server_requests_total{service=\"sync.raft.v1.Raft\"";
            ensure!(
                id == leader.id || metrics.contains(raft_rpcs),
                "follower {id}: /metrics lacks {raft_rpcs}"
            );
            let checked = run(
                "promtool",
                vec!["check".into(), "metrics".into()],
                Some(metrics),
            )
            .await?;
            ensure!(
                checked.trim().is_empty(),
                "node {id}: promtool reported: {checked}"
            );
        }
        // A write through a follower, with grpcurl (bytes are base64 in JSON).
        let follower = c
            .ids()
            .into_iter()
            .find(|&i| i != leader.id)
            .context("a follower")?;
        let put = run(
            "grpcurl",
            vec![
                "-plaintext".into(),
                "-d".into(),
                r#"{"key":"Z3JwY3VybA==","value":"b2s="}"#.into(),
                c.address(follower).to_string(),
                "sync.v1.Kv/Put".into(),
            ],
            None,
        )
        .await?;
        ensure!(put.contains("\"index\""), "forwarded put answered {put}");
        Ok(())
    })
    .await;
}
