//! `syncctl dev up`: a local cluster of real `syncd` processes, supervised in the foreground.
//!
//! The life of a dev cluster:
//! 1. find the `syncd` binary (`--syncd`, next to syncctl, then PATH) and check that every port
//!    is free, so a second `dev up` fails with a clear message instead of N confusing logs;
//! 2. start the nodes, each in its own process group (so the terminal's Ctrl-C reaches only
//!    syncctl, which then stops them in order) with its output in `DATA_DIR/i/syncd.log`;
//! 3. poll Cluster.Status until a leader is elected (bounded by `--leader-timeout`), failing
//!    early if a node exits;
//! 4. wait for Ctrl-C or SIGTERM, reporting any node that dies meanwhile (the others keep
//!    running: killing a node by hand is how one watches a failover);
//! 5. send SIGTERM to every node, wait up to `--grace`, then SIGKILL the rest.
//!
//! If syncctl itself is killed with SIGKILL, Linux delivers SIGTERM to the nodes through the
//! parent-death signal, so no orphaned cluster keeps the ports.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::{Instant, sleep, sleep_until};

use crate::args::{DEFAULT_ENDPOINTS, DevUpArgs, Endpoint, GlobalOpts, Output, parse_endpoint};
use crate::cluster::{leader_in, status_all};
use crate::output::{duration, print_json_line, table};

/// How often the supervisor checks whether a node has exited.
const REAP_INTERVAL: Duration = Duration::from_millis(100);
/// How often `dev up` asks the nodes for a leader while they start.
const LEADER_POLL: Duration = Duration::from_millis(200);
/// Deadline of each Cluster.Status call while waiting for a leader: nodes are local.
const STATUS_DEADLINE: Duration = Duration::from_secs(1);

pub async fn up(global: &GlobalOpts, args: &DevUpArgs) -> anyhow::Result<()> {
    let syncd = locate_syncd(args.syncd.as_deref())?;
    let plan = plan(args)?;
    check_ports_free(&plan)?;
    // Installed before any child exists, so that no Ctrl-C can leave nodes behind unsupervised.
    let mut signals = Signals::new()?;
    let mut cluster = DevCluster::start(&syncd, plan, global.output)?;
    let outcome = cluster.supervise(args, &mut signals).await;
    cluster.stop(args.grace, &mut signals).await;
    outcome
}

/// Where node `id` listens and keeps its files.
#[derive(Clone, Debug)]
struct NodePlan {
    id: u16,
    /// gRPC endpoint, `127.0.0.1:port`.
    grpc: Endpoint,
    grpc_port: u16,
    /// Prometheus endpoint, `127.0.0.1:port`.
    metrics: String,
    metrics_port: u16,
    /// `DATA_DIR/id`, absolute so that messages can be acted on from any directory.
    data_dir: PathBuf,
    /// `DATA_DIR/id/syncd.log`: the node's stdout and stderr.
    log: PathBuf,
}

fn plan(args: &DevUpArgs) -> anyhow::Result<Vec<NodePlan>> {
    let root = std::path::absolute(&args.data_dir)
        .with_context(|| format!("data directory {}", args.data_dir.display()))?;
    (1..=args.nodes)
        .map(|id| {
            let (grpc_port, metrics_port) = args.ports(id);
            let data_dir = root.join(id.to_string());
            Ok(NodePlan {
                id,
                grpc: parse_endpoint(&format!("127.0.0.1:{grpc_port}"))
                    .map_err(anyhow::Error::msg)?,
                grpc_port,
                metrics: format!("127.0.0.1:{metrics_port}"),
                metrics_port,
                log: data_dir.join("syncd.log"),
                data_dir,
            })
        })
        .collect()
}

/// The `--initial-cluster` value: `1=127.0.0.1:7001,2=127.0.0.1:7002,...`.
fn initial_cluster(plan: &[NodePlan]) -> String {
    plan.iter()
        .map(|n| format!("{}={}", n.id, n.grpc))
        .collect::<Vec<_>>()
        .join(",")
}

/// The `syncd` command line of one node.
fn syncd_args(node: &NodePlan, initial_cluster: &str) -> Vec<String> {
    vec![
        "--id".into(),
        node.id.to_string(),
        "--listen".into(),
        node.grpc.to_string(),
        "--initial-cluster".into(),
        initial_cluster.into(),
        "--data-dir".into(),
        node.data_dir.display().to_string(),
        "--metrics-listen".into(),
        node.metrics.clone(),
    ]
}

/// Finds the syncd binary: the explicit path, else next to this syncctl (where
/// `cargo build` puts both), else on PATH.
fn locate_syncd(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if is_executable(path) {
            return Ok(path.to_owned());
        }
        bail!(
            "--syncd {}: no executable file there; build it with `cargo build -p syncd`",
            path.display()
        );
    }
    let exe = std::env::current_exe().context("cannot locate the running syncctl")?;
    let beside = exe.parent().map(|dir| dir.join("syncd"));
    if let Some(candidate) = beside.as_deref().filter(|p| is_executable(p)) {
        return Ok(candidate.to_owned());
    }
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("syncd"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(candidate) = on_path.into_iter().find(|p| is_executable(p)) {
        return Ok(candidate);
    }
    let next_to = exe.parent().unwrap_or(Path::new(".")).display().to_string();
    bail!(
        "cannot find the syncd binary in {next_to} or on PATH; build it with \
         `cargo build -p syncd` (or pass --syncd PATH)"
    )
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Fails with the first port that something else already listens on.
fn check_ports_free(plan: &[NodePlan]) -> anyhow::Result<()> {
    for node in plan {
        for (port, what) in [(node.grpc_port, "gRPC"), (node.metrics_port, "metrics")] {
            if let Err(err) = TcpListener::bind(("127.0.0.1", port)) {
                let why = if err.kind() == io::ErrorKind::AddrInUse {
                    "is already in use".to_owned()
                } else {
                    format!("cannot be opened ({err})")
                };
                bail!(
                    "port {port} (node {} {what}) {why} on 127.0.0.1; is another cluster \
                     running? stop it, or choose other ports with --base-port",
                    node.id
                );
            }
        }
    }
    Ok(())
}

/// SIGINT (Ctrl-C) and SIGTERM, both meaning "stop the cluster".
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    /// Resolves at the next SIGINT or SIGTERM.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// A running node.
struct Node {
    plan: NodePlan,
    child: Child,
    /// Kept from spawn time: `Child::id` forgets it once the process is reaped.
    pid: u32,
    /// Set once the process has exited and been reaped; never signalled after that, so a
    /// recycled pid is never hit.
    exit: Option<ExitStatus>,
}

struct DevCluster {
    nodes: Vec<Node>,
    output: Output,
}

impl DevCluster {
    /// Starts every node. If one fails to start, the ones already started are killed when
    /// their `Child` is dropped (`kill_on_drop`).
    fn start(syncd: &Path, plan: Vec<NodePlan>, output: Output) -> anyhow::Result<Self> {
        let initial = initial_cluster(&plan);
        let mut nodes = Vec::with_capacity(plan.len());
        for node in plan {
            fs::create_dir_all(&node.data_dir)
                .with_context(|| format!("cannot create {}", node.data_dir.display()))?;
            let log = open_log(&node.log)?;
            let mut command = Command::new(syncd);
            command
                .args(syncd_args(&node, &initial))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                // Its own process group: the terminal's Ctrl-C goes to syncctl alone, which
                // stops the nodes itself, in order, with a grace period.
                .process_group(0);
            #[cfg(target_os = "linux")]
            // SAFETY: the closure runs in the child between fork and exec, where only
            // async-signal-safe calls are allowed; prctl is a plain system call and the closure
            // neither allocates nor takes locks. The parent-death signal fires when the thread
            // that forked exits: that is the main thread, which `main` keeps inside the runtime's
            // `block_on` for the life of the cluster.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = command.spawn().with_context(|| {
                format!("cannot start {} for node {}", syncd.display(), node.id)
            })?;
            let pid = child.id().unwrap_or(0);
            nodes.push(Node {
                plan: node,
                child,
                pid,
                exit: None,
            });
        }
        let cluster = DevCluster { nodes, output };
        cluster.print_started(syncd)?;
        Ok(cluster)
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        self.nodes.iter().map(|n| n.plan.grpc.clone()).collect()
    }

    /// Waits for a leader, then for a signal. An error ends the run (the caller stops the
    /// nodes); returning `Ok` means the user asked to stop.
    async fn supervise(&mut self, args: &DevUpArgs, signals: &mut Signals) -> anyhow::Result<()> {
        // 1. A leader, within bounds.
        let endpoints = self.endpoints();
        let give_up = Instant::now() + args.leader_timeout;
        if self.output == Output::Table {
            eprintln!(
                "waiting for a leader (up to {})...",
                duration(args.leader_timeout)
            );
        }
        let leader = loop {
            if let Some(node) = self.reap().into_iter().next() {
                bail!(
                    "{} during startup; {}",
                    self.exit_description(node),
                    self.log_tail(node)
                );
            }
            let reports = status_all(&endpoints, STATUS_DEADLINE, None).await;
            if let Some(leader) = leader_in(&reports) {
                break leader;
            }
            if Instant::now() >= give_up {
                bail!(
                    "no leader elected within {}; see the nodes' logs in {}",
                    duration(args.leader_timeout),
                    self.log_pattern()
                );
            }
            tokio::select! {
                _ = sleep(LEADER_POLL) => {}
                _ = signals.recv() => return Ok(()),
            }
        };
        match self.output {
            Output::Table => {
                println!(
                    "leader: node {} at {} (term {})",
                    leader.id, leader.address, leader.term
                );
                let endpoints = self
                    .endpoints()
                    .iter()
                    .map(Endpoint::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                if endpoints != DEFAULT_ENDPOINTS {
                    eprintln!("to use this cluster: export SYNC_ENDPOINTS={endpoints}");
                }
                eprintln!("press Ctrl-C to stop the cluster");
            }
            Output::Json => print_json_line(&json!({
                "event": "leader",
                "id": leader.id,
                "address": leader.address,
                "term": leader.term,
            }))?,
        }

        // 2. Run until asked to stop; report nodes that die meanwhile.
        loop {
            tokio::select! {
                _ = signals.recv() => return Ok(()),
                _ = sleep(REAP_INTERVAL) => {}
            }
            for node in self.reap() {
                let text = format!("{}; {}", self.exit_description(node), self.log_tail(node));
                self.report_exit(node, "exited", &text)?;
            }
            if self.nodes.iter().all(|n| n.exit.is_some()) {
                bail!(
                    "every node has exited; see their logs in {}",
                    self.log_pattern()
                );
            }
        }
    }

    /// Stops every running node: SIGTERM, then SIGKILL for those still running after `grace`
    /// or at a second Ctrl-C.
    async fn stop(&mut self, grace: Duration, signals: &mut Signals) {
        self.reap();
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].exit.is_none())
            .collect();
        if running.is_empty() {
            return;
        }
        if self.output == Output::Table {
            eprintln!(
                "stopping {} node(s) (SIGTERM; SIGKILL after {}, or at a second Ctrl-C)...",
                running.len(),
                duration(grace)
            );
        }
        for &i in &running {
            let pid = self.nodes[i].pid as libc::pid_t;
            // SAFETY: kill(2) has no memory-safety preconditions. The pid is our own child, not
            // yet reaped (exit is None), so it cannot have been recycled for another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        loop {
            for i in self.reap() {
                let text = format!(
                    "node {} stopped ({})",
                    self.nodes[i].plan.id,
                    self.exit_text(i)
                );
                let _ = self.report_exit(i, "stopped", &text);
            }
            if self.nodes.iter().all(|n| n.exit.is_some()) {
                return;
            }
            tokio::select! {
                _ = sleep(REAP_INTERVAL) => {}
                _ = sleep_until(deadline) => break,
                _ = signals.recv() => break,
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].exit.is_some() {
                continue;
            }
            let node = &mut self.nodes[i];
            let _ = node.child.start_kill();
            node.exit = node.child.wait().await.ok();
            let text = format!(
                "node {} killed (SIGKILL): it did not stop in time",
                node.plan.id
            );
            let _ = self.report_exit(i, "killed", &text);
        }
    }

    /// Collects the exit status of nodes that have exited since the last call; returns their
    /// indexes.
    fn reap(&mut self) -> Vec<usize> {
        let mut exited = Vec::new();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if node.exit.is_none()
                && let Ok(Some(status)) = node.child.try_wait()
            {
                node.exit = Some(status);
                exited.push(i);
            }
        }
        exited
    }

    fn exit_text(&self, i: usize) -> String {
        match self.nodes[i].exit {
            Some(status) => status.to_string(),
            None => "still running".to_owned(),
        }
    }

    /// "node 2 (pid 4242) exited with exit status: 1".
    fn exit_description(&self, i: usize) -> String {
        let node = &self.nodes[i];
        format!(
            "node {} (pid {}) exited with {}",
            node.plan.id,
            node.pid,
            self.exit_text(i)
        )
    }

    /// "its log /x/2/syncd.log ends with: LAST LINE", or where the log is if it is empty.
    fn log_tail(&self, i: usize) -> String {
        let log = &self.nodes[i].plan.log;
        match last_line(log) {
            Some(line) => format!("its log {} ends with: {line}", log.display()),
            None => format!("its log {} is empty", log.display()),
        }
    }

    fn log_pattern(&self) -> String {
        let first = &self.nodes[0].plan.data_dir;
        let root = first.parent().unwrap_or(first);
        format!("{}/*/syncd.log", root.display())
    }

    fn report_exit(&self, i: usize, event: &str, text: &str) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        match self.output {
            Output::Table => eprintln!("{text}"),
            Output::Json => print_json_line(&json!({
                "event": event,
                "id": node.plan.id,
                "pid": node.pid,
                "status": self.exit_text(i),
                "message": text,
            }))?,
        }
        Ok(())
    }

    fn print_started(&self, syncd: &Path) -> anyhow::Result<()> {
        match self.output {
            Output::Table => {
                eprintln!(
                    "started {} syncd node(s) from {}",
                    self.nodes.len(),
                    syncd.display()
                );
                let mut t = table(&["node", "grpc", "metrics", "pid", "log"], &["node", "pid"]);
                for node in &self.nodes {
                    t.add_row(vec![
                        node.plan.id.to_string(),
                        node.plan.grpc.to_string(),
                        format!("http://{}/metrics", node.plan.metrics),
                        node.pid.to_string(),
                        node.plan.log.display().to_string(),
                    ]);
                }
                println!("{t}");
            }
            Output::Json => {
                let nodes: Vec<_> = self
                    .nodes
                    .iter()
                    .map(|n| {
                        json!({
                            "id": n.plan.id,
                            "endpoint": n.plan.grpc.to_string(),
                            "metrics": format!("http://{}/metrics", n.plan.metrics),
                            "pid": n.pid,
                            "data_dir": n.plan.data_dir,
                            "log": n.plan.log,
                        })
                    })
                    .collect();
                print_json_line(&json!({
                    "event": "started",
                    "syncd": syncd,
                    "nodes": nodes,
                }))?;
            }
        }
        Ok(())
    }
}

/// Opens a node's log for a new run; the previous run's log is kept as `syncd.log.1`.
fn open_log(path: &Path) -> anyhow::Result<File> {
    if path.exists() {
        let previous = path.with_extension("log.1");
        fs::rename(path, &previous).with_context(|| format!("cannot rotate {}", path.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// The last non-empty line of a file, at most 300 characters, read from its last 8 KiB.
fn last_line(path: &Path) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> DevUpArgs {
        let cli = crate::args::Cli::try_parse_from(
            ["syncctl", "dev", "up"].iter().chain(extra.iter()).copied(),
        )
        .unwrap();
        match cli.command {
            crate::args::Command::Dev(crate::args::DevCommand::Up(up)) => up,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn nodes_get_consecutive_ports_and_their_own_directories() {
        let plan = plan(&args(&["--nodes", "3", "--data-dir", "/tmp/dev"])).unwrap();
        assert_eq!(
            initial_cluster(&plan),
            "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003"
        );
        assert_eq!(
            syncd_args(&plan[1], &initial_cluster(&plan)),
            [
                "--id",
                "2",
                "--listen",
                "127.0.0.1:7002",
                "--initial-cluster",
                "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003",
                "--data-dir",
                "/tmp/dev/2",
                "--metrics-listen",
                "127.0.0.1:9002",
            ]
        );
        assert_eq!(plan[2].log, PathBuf::from("/tmp/dev/3/syncd.log"));
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let err = locate_syncd(Some(Path::new("/nonexistent/syncd"))).unwrap_err();
        assert!(err.to_string().contains("cargo build -p syncd"), "{err}");
    }

    #[test]
    fn a_busy_port_is_named() {
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let plan = plan(&args(&[
            "--nodes",
            "1",
            "--base-port",
            &(port - 1).to_string(),
        ]))
        .unwrap();
        let err = check_ports_free(&plan).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("port {port} (node 1 gRPC) is already in use")),
            "{err}"
        );
    }

    #[test]
    fn the_last_log_line_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("syncd.log");
        fs::write(&log, "starting\nerror: address in use\n\n").unwrap();
        assert_eq!(last_line(&log).as_deref(), Some("error: address in use"));
        fs::write(&log, "").unwrap();
        assert_eq!(last_line(&log), None);
    }

    #[test]
    fn logs_of_the_previous_run_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("syncd.log");
        fs::write(&log, "old run\n").unwrap();
        drop(open_log(&log).unwrap());
        assert_eq!(
            fs::read_to_string(dir.path().join("syncd.log.1")).unwrap(),
            "old run\n"
        );
        assert_eq!(fs::read_to_string(&log).unwrap(), "");
    }
}
