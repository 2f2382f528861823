//! A cluster of real `syncd` processes on loopback, for tests.
//!
//! [`Cluster::start`] starts `n` founding nodes with ids `1..=n`, each on free loopback ports,
//! with a data directory and a log file under one temporary directory. Between every two
//! founding nodes stands a proxy of [`Network`] (see `proxy.rs`), so a test can cut links while
//! its own clients still reach every node directly. The harness kills, pauses, resumes,
//! terminates and restarts nodes, adds joining nodes, and waits (always with a deadline) for
//! leaders, catch-up and convergence.
//!
//! Diagnosing a failure: a failed [`scenario`] (an error, a panic or its time limit) prints a
//! report: the timeline of what the harness did, each node's state, ports, data dir and log
//! path, its last `Cluster.Status` when it still answers, and the tail of its log; the temporary
//! directory is then kept. Environment knobs: `SYNCD_TEST_LOG_LEVEL` (the nodes' `--log-level`,
//! default `info`), `SYNCD_TEST_LOG_LINES` (log lines per node in a report, default 40),
//! `SYNCD_TEST_KEEP=1` (keep the directory of passing tests too), `SYNCD_BIN` (see
//! `binary.rs`).
//!
//! No process outlives its cluster: dropping the [`Cluster`] (also while unwinding from a panic)
//! kills and reaps every node, and on Linux each node also gets SIGKILL if the thread that
//! started it dies (`PR_SET_PDEATHSIG`), which covers a test process killed outright.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use sync_proto::sync::v1::cluster_client::ClusterClient;
use sync_proto::sync::v1::kv_client::KvClient;
use sync_proto::sync::v1::{
    AddMemberRequest, AddMemberResponse, ClusterStatusRequest, ClusterStatusResponse, Consistency,
    KvGetRequest, KvGetResponse, KvPutRequest, KvPutResponse, PromoteLearnerRequest,
    PromoteLearnerResponse, RemoveMemberRequest, RemoveMemberResponse, RequestHeader, Role,
    SnapshotRequest, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use crate::binary;
use crate::proxy::Network;
use crate::tls::TlsMaterial;
use crate::wait::{POLL, eventually};

/// How long a node may take from spawn to answering `Cluster.Status`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at starting a node whose port another process took meanwhile.
const PORT_ATTEMPTS: u32 = 5;
/// Deadline of one `Cluster.Status` call made while polling.
const STATUS_POLL_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a SIGKILLed process may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// Client-side slack over a call's gRPC deadline before the client gives up by itself (the
/// server should answer DEADLINE_EXCEEDED first).
const CLIENT_GRACE: Duration = Duration::from_millis(500);

/// Settings of a test cluster. The defaults are the short timings the runtime must pass.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--heartbeat-interval`.
    pub heartbeat_interval: Duration,
    /// `--election-timeout`.
    pub election_timeout: Duration,
    /// `--snapshot-threshold`, when the test needs compaction.
    pub snapshot_threshold: Option<u64>,
    /// `--log-level` of every node.
    pub log_level: String,
    /// Default deadline of each client call made through [`NodeClient`].
    pub rpc_timeout: Duration,
    /// More flags for every node.
    pub extra_args: Vec<String>,
    /// Serve TLS with this material (and, when `.1`, `--client-cert-auth`); the harness's own
    /// clients then connect with the CA and the client certificate.
    pub tls: Option<(Arc<TlsMaterial>, bool)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            heartbeat_interval: Duration::from_millis(50),
            election_timeout: Duration::from_millis(300),
            snapshot_threshold: None,
            log_level: std::env::var("SYNCD_TEST_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            rpc_timeout: Duration::from_secs(2),
            extra_args: Vec::new(),
            tls: None,
        }
    }
}

impl Options {
    /// `n` election timeouts.
    pub fn election_timeouts(&self, n: u32) -> Duration {
        self.election_timeout * n
    }

    /// These options with TLS from `material`, and `--client-cert-auth` if `client_cert_auth`.
    pub fn with_tls(mut self, material: Arc<TlsMaterial>, client_cert_auth: bool) -> Self {
        self.tls = Some((material, client_cert_auth));
        self
    }

    /// A client of node `id` at `addr` with these options' deadline and TLS.
    fn client(&self, id: u64, addr: SocketAddr) -> NodeClient {
        let tls = self.tls.as_ref().map(|(material, _)| {
            material
                .client_config()
                .expect("the harness's own TLS material is readable")
        });
        NodeClient::with_tls(id, addr, self.rpc_timeout, tls)
    }

    /// These options with `--snapshot-threshold threshold`.
    pub fn with_snapshot_threshold(mut self, threshold: u64) -> Self {
        self.snapshot_threshold = Some(threshold);
        self
    }
}

/// A leader, as agreed by a majority of its configuration's voters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leader {
    /// Its node id.
    pub id: u64,
    /// The term it leads.
    pub term: u64,
}

/// Where a node's process stands, as far as the harness knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Running (or starting).
    Running,
    /// Stopped with SIGSTOP.
    Paused,
    /// Sent SIGTERM, not yet reaped.
    Terminating,
    /// Exited or killed; not running.
    Down,
}

// ---------------------------------------------------------------------------------------------
// Clients

/// gRPC clients for one node, at its real address, with a deadline on every call.
#[derive(Clone)]
pub struct NodeClient {
    /// The node's id (for messages).
    id: u64,
    /// A lazily connected channel; it reconnects by itself after the node restarts.
    channel: Channel,
    /// The gRPC deadline of each call.
    timeout: Duration,
}

impl NodeClient {
    /// Clients for node `id` at `addr`.
    pub fn new(id: u64, addr: SocketAddr, timeout: Duration) -> NodeClient {
        NodeClient::with_tls(id, addr, timeout, None)
    }

    /// Clients for node `id` at `addr`, over TLS with `tls` if given.
    pub fn with_tls(
        id: u64,
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<ClientTlsConfig>,
    ) -> NodeClient {
        let endpoint = match tls {
            None => Endpoint::from_shared(format!("http://{addr}")),
            Some(tls) => {
                Endpoint::from_shared(format!("https://{addr}")).and_then(|e| e.tls_config(tls))
            }
        };
        let channel = endpoint
            .expect("a socket address is a valid URI, and the TLS material was checked")
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        NodeClient {
            id,
            channel,
            timeout,
        }
    }

    /// The node's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The same clients with another deadline per call.
    pub fn with_timeout(&self, timeout: Duration) -> NodeClient {
        NodeClient {
            timeout,
            ..self.clone()
        }
    }

    /// The raw Cluster client (calls made with it carry no deadline unless the caller sets one).
    pub fn cluster(&self) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel.clone())
    }

    /// The raw Kv client.
    pub fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone())
    }

    /// The raw Cache client.
    pub fn cache(&self) -> sync_proto::sync::v1::cache_client::CacheClient<Channel> {
        sync_proto::sync::v1::cache_client::CacheClient::new(self.channel.clone())
    }

    /// The raw Lock client.
    pub fn lock(&self) -> sync_proto::sync::v1::lock_client::LockClient<Channel> {
        sync_proto::sync::v1::lock_client::LockClient::new(self.channel.clone())
    }

    /// Sends one call with the deadline set as `grpc-timeout`, and gives up by itself shortly
    /// after, so a node that never answers (e.g. paused) cannot hang a test.
    async fn call<Req, Resp, Fut>(
        &self,
        message: Req,
        send: impl FnOnce(Request<Req>) -> Fut,
    ) -> Result<Resp, Status>
    where
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        match tokio::time::timeout(self.timeout + CLIENT_GRACE, send(request)).await {
            Ok(answer) => answer.map(Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "node {} gave no answer within {:?} (client-side timeout)",
                self.id,
                self.timeout + CLIENT_GRACE
            ))),
        }
    }

    /// `Cluster.Status`.
    pub async fn status(&self) -> Result<ClusterStatusResponse, Status> {
        let mut c = self.cluster();
        self.call(
            ClusterStatusRequest {},
            |r| async move { c.status(r).await },
        )
        .await
    }

    /// `Kv.Put`.
    pub async fn put(
        &self,
        header: Option<RequestHeader>,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<KvPutResponse, Status> {
        self.put_request(KvPutRequest {
            header,
            key: key.into(),
            value: value.into(),
        })
        .await
    }

    /// `Kv.Put` of a prepared request (a retry sends the same one).
    pub async fn put_request(&self, request: KvPutRequest) -> Result<KvPutResponse, Status> {
        let mut c = self.kv();
        self.call(request, |r| async move { c.put(r).await }).await
    }

    /// `Kv.Get`.
    pub async fn get(
        &self,
        key: impl Into<Bytes>,
        consistency: Consistency,
    ) -> Result<KvGetResponse, Status> {
        let mut c = self.kv();
        let request = KvGetRequest {
            key: key.into(),
            consistency: consistency as i32,
        };
        self.call(request, |r| async move { c.get(r).await }).await
    }

    /// `Cluster.AddMember`.
    pub async fn add_member(&self, r: AddMemberRequest) -> Result<AddMemberResponse, Status> {
        let mut c = self.cluster();
        self.call(r, |r| async move { c.add_member(r).await }).await
    }

    /// `Cluster.RemoveMember`.
    pub async fn remove_member(
        &self,
        r: RemoveMemberRequest,
    ) -> Result<RemoveMemberResponse, Status> {
        let mut c = self.cluster();
        self.call(r, |r| async move { c.remove_member(r).await })
            .await
    }

    /// `Cluster.PromoteLearner`.
    pub async fn promote_learner(
        &self,
        r: PromoteLearnerRequest,
    ) -> Result<PromoteLearnerResponse, Status> {
        let mut c = self.cluster();
        self.call(r, |r| async move { c.promote_learner(r).await })
            .await
    }

    /// `Cluster.TransferLeader`.
    pub async fn transfer_leader(
        &self,
        r: TransferLeaderRequest,
    ) -> Result<TransferLeaderResponse, Status> {
        let mut c = self.cluster();
        self.call(r, |r| async move { c.transfer_leader(r).await })
            .await
    }

    /// `Cluster.Snapshot`.
    pub async fn snapshot(&self) -> Result<SnapshotResponse, Status> {
        let mut c = self.cluster();
        self.call(SnapshotRequest {}, |r| async move { c.snapshot(r).await })
            .await
    }
}

/// The clients of every node, shared with background tasks (writers) so that they follow a
/// node that restarted on another port.
#[derive(Clone, Default)]
pub struct Clients {
    /// Node id → its clients.
    by_id: Arc<RwLock<BTreeMap<u64, NodeClient>>>,
}

impl Clients {
    /// The clients of node `id`, if the cluster has such a node.
    pub fn get(&self, id: u64) -> Option<NodeClient> {
        self.read().get(&id).cloned()
    }

    /// Every node id, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.read().keys().copied().collect()
    }

    fn set(&self, client: NodeClient) {
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client.id, client);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, NodeClient>> {
        self.by_id.read().unwrap_or_else(|e| e.into_inner())
    }
}

// ---------------------------------------------------------------------------------------------
// Status helpers

/// The role name without its prefix: `LEADER`, `FOLLOWER`, ...
pub fn role_name(status: &ClusterStatusResponse) -> &'static str {
    let name = status.role().as_str_name();
    name.strip_prefix("ROLE_").unwrap_or(name)
}

/// One line: `n2 FOLLOWER t3 leader=1 commit=40 applied=40 last=40 snap=0 members=[1,2,3,4L]`.
pub fn summarize(s: &ClusterStatusResponse) -> String {
    let members: Vec<String> = s
        .members
        .iter()
        .map(|m| format!("{}{}", m.id, if m.learner { "L" } else { "" }))
        .collect();
    format!(
        "n{} {} t{} leader={} commit={} applied={} last={} snap={} members=[{}]",
        s.node_id,
        role_name(s),
        s.term,
        s.leader_id,
        s.commit_index,
        s.applied_index,
        s.last_log_index,
        s.snapshot_index,
        members.join(",")
    )
}

/// The configuration a status reports, as `(id, learner)` pairs in id order.
pub fn configuration(s: &ClusterStatusResponse) -> Vec<(u64, bool)> {
    let mut c: Vec<(u64, bool)> = s.members.iter().map(|m| (m.id, m.learner)).collect();
    c.sort_unstable();
    c
}

/// The voters a status reports.
pub fn voters(s: &ClusterStatusResponse) -> Vec<u64> {
    s.members
        .iter()
        .filter(|m| !m.learner)
        .map(|m| m.id)
        .collect()
}

/// The leader that a majority of its own configuration's voters acknowledge, among `statuses`:
/// a node that reports itself leader in term `t`, such that a majority of the voters of its
/// configuration report term `t` and that leader. With several (a deposed leader that has not
/// noticed yet cannot gather a majority, so this is rare), the highest term wins.
pub fn agreed_leader(statuses: &BTreeMap<u64, ClusterStatusResponse>) -> Option<Leader> {
    statuses
        .values()
        .filter(|s| s.role() == Role::Leader)
        .filter(|s| {
            let voters = voters(s);
            let agree = statuses
                .values()
                .filter(|o| voters.contains(&o.node_id) && o.term == s.term)
                .filter(|o| o.node_id == s.node_id || o.leader_id == s.node_id)
                .count();
            agree > voters.len() / 2
        })
        .map(|s| Leader {
            id: s.node_id,
            term: s.term,
        })
        .max_by_key(|l| l.term)
}

fn describe_statuses(statuses: &BTreeMap<u64, Result<ClusterStatusResponse, Status>>) -> String {
    if statuses.is_empty() {
        return "no node is running".into();
    }
    statuses
        .iter()
        .map(|(id, s)| match s {
            Ok(s) => summarize(s),
            Err(e) => format!("n{id} no status ({:?}: {})", e.code(), e.message()),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------------------------
// The cluster

/// One `syncd` process slot: its fixed settings and its current process.
struct Node {
    /// Node id.
    id: u64,
    /// Real gRPC listen address (clients connect here; proxies forward here).
    listen: SocketAddr,
    /// Metrics HTTP address.
    metrics: SocketAddr,
    /// `--data-dir`.
    data_dir: PathBuf,
    /// Where stdout and stderr of every run of this node are appended.
    log_path: PathBuf,
    /// Started with `--initial-cluster-state existing` (not in the proxy mesh; its address is
    /// in the replicated configuration, so it keeps its ports across restarts).
    joined: bool,
    /// `--initial-cluster` of a joining node (founders compute theirs from the mesh).
    join_cluster: String,
    /// The running (or paused, or terminating) process.
    child: Option<Child>,
    /// What the harness last did to it.
    state: NodeState,
    /// Exit status of the last run that ended.
    last_exit: Option<ExitStatus>,
    /// How many times it was spawned.
    starts: u32,
}

impl Node {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// What became of one attempt at starting a node.
enum Started {
    /// It answers `Cluster.Status` as itself.
    Up,
    /// It exited because a port was taken; try other ports.
    PortTaken,
}

/// A test cluster of `syncd` processes. See the module documentation.
pub struct Cluster {
    /// The settings every node gets.
    options: Options,
    /// The `syncd` binary.
    binary: PathBuf,
    /// Holds data dirs and logs; removed on drop unless kept for a failure.
    root: tempfile::TempDir,
    /// Every node ever started, by id.
    nodes: BTreeMap<u64, Node>,
    /// The proxies between founding members.
    network: Network,
    /// Clients of every node.
    clients: Clients,
    /// When the cluster started: the zero of the timeline.
    epoch: Instant,
    /// When the last founding node was spawned (elections are timed from here).
    spawned: Instant,
    /// What the harness did, with times, for failure reports.
    timeline: Mutex<Vec<String>>,
    /// A failure report was printed already (so drop does not print another).
    reported: bool,
}

impl Cluster {
    /// Starts `size` founding nodes (ids `1..=size`) and waits until each answers
    /// `Cluster.Status`. It does not wait for a leader.
    pub async fn start(size: usize, options: Options) -> anyhow::Result<Cluster> {
        anyhow::ensure!(size > 0, "a cluster needs at least one node");
        let binary = binary::syncd().map_err(|e| anyhow!(e))?;
        let root = tempfile::Builder::new()
            .prefix("syncd-test-")
            .tempdir()
            .context("cannot create the cluster's temporary directory")?;
        let mut nodes = BTreeMap::new();
        // The nodes' ports stay bound until every proxy has its own port: a proxy binding port 0
        // could otherwise be given a node's port, and the node would then refuse an
        // --initial-cluster that names one address twice (CI saw exactly that).
        let mut held = Vec::with_capacity(size);
        for id in 1..=size as u64 {
            let pair = reserve_pair()?;
            let (listen, metrics) = (pair.0.local_addr()?, pair.1.local_addr()?);
            held.push(pair);
            nodes.insert(
                id,
                Node {
                    id,
                    listen,
                    metrics,
                    data_dir: root.path().join(format!("node-{id}")),
                    log_path: root.path().join(format!("node-{id}.log")),
                    joined: false,
                    join_cluster: String::new(),
                    child: None,
                    state: NodeState::Down,
                    last_exit: None,
                    starts: 0,
                },
            );
        }
        let targets = nodes.iter().map(|(&id, n)| (id, n.listen)).collect();
        let network = Network::start(&targets)
            .await
            .context("cannot start the proxies")?;
        drop(held);
        let clients = Clients::default();
        for node in nodes.values() {
            clients.set(options.client(node.id, node.listen));
        }
        let now = Instant::now();
        let mut cluster = Cluster {
            options,
            binary,
            root,
            nodes,
            network,
            clients,
            epoch: now,
            spawned: now,
            timeline: Mutex::new(Vec::new()),
            reported: false,
        };
        cluster.note(format!(
            "cluster of {size} in {} with {}",
            cluster.root.path().display(),
            cluster.binary.display()
        ));
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        let started = async {
            for &id in &ids {
                cluster.spawn(id)?;
            }
            cluster.spawned = Instant::now();
            for &id in &ids {
                cluster.await_started(id).await?;
            }
            anyhow::Ok(())
        }
        .await;
        match started {
            Ok(()) => Ok(cluster),
            Err(e) => {
                eprintln!("{}", cluster.report("the cluster did not start", None));
                cluster.reported = true;
                cluster.root.disable_cleanup(true);
                Err(e)
            }
        }
    }

    // --- accessors -------------------------------------------------------------------------

    /// The settings of this cluster.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The proxies between founding members.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The clients of every node, for background tasks.
    pub fn clients(&self) -> Clients {
        self.clients.clone()
    }

    /// The clients of node `id`.
    pub fn client(&self, id: u64) -> NodeClient {
        self.clients
            .get(id)
            .unwrap_or_else(|| panic!("the cluster has no node {id}"))
    }

    /// Every node id the harness started, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// The nodes whose process runs (not paused, not terminating, not down).
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.state == NodeState::Running)
            .map(|n| n.id)
            .collect()
    }

    /// What the harness last did to node `id`.
    pub fn state(&self, id: u64) -> NodeState {
        self.node(id).state
    }

    /// Node `id`'s real gRPC address (what clients use and what it advertises).
    pub fn address(&self, id: u64) -> SocketAddr {
        self.node(id).listen
    }

    /// Node `id`'s metrics address.
    pub fn metrics_address(&self, id: u64) -> SocketAddr {
        self.node(id).metrics
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u64) -> &Path {
        &self.node(id).data_dir
    }

    /// Node `id`'s log file.
    pub fn log_path(&self, id: u64) -> &Path {
        &self.node(id).log_path
    }

    /// When the founding nodes were spawned.
    pub fn spawned_at(&self) -> Instant {
        self.spawned
    }

    /// Adds a line to the timeline that failure reports show.
    pub fn note(&self, what: impl AsRef<str>) {
        let line = format!(
            "+{:>8.3}s {}",
            self.epoch.elapsed().as_secs_f64(),
            what.as_ref()
        );
        self.timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    fn node(&self, id: u64) -> &Node {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("the cluster has no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("the cluster has no node {id}"))
    }

    // --- processes -------------------------------------------------------------------------

    /// The flags of node `id`'s next run.
    fn args(&self, id: u64) -> Vec<String> {
        let node = self.node(id);
        let o = &self.options;
        let initial_cluster = if node.joined {
            node.join_cluster.clone()
        } else {
            self.network
                .ids()
                .into_iter()
                .map(|peer| {
                    let addr = if peer == id {
                        node.listen
                    } else {
                        self.network.address(id, peer)
                    };
                    format!("{peer}={addr}")
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut args = vec![
            format!("--id={id}"),
            format!("--listen={}", node.listen),
            format!("--initial-cluster={initial_cluster}"),
            format!(
                "--initial-cluster-state={}",
                if node.joined { "existing" } else { "new" }
            ),
            format!("--data-dir={}", node.data_dir.display()),
            format!("--metrics-listen={}", node.metrics),
            format!(
                "--heartbeat-interval={}ms",
                o.heartbeat_interval.as_millis()
            ),
            format!("--election-timeout={}ms", o.election_timeout.as_millis()),
            format!("--log-level={}", o.log_level),
            "--log-format=text".to_string(),
        ];
        if let Some(t) = o.snapshot_threshold {
            args.push(format!("--snapshot-threshold={t}"));
        }
        if let Some((material, client_cert_auth)) = &o.tls {
            args.extend(material.node_args(*client_cert_auth));
        }
        args.extend(o.extra_args.iter().cloned());
        args
    }

    /// Spawns node `id` (which must not run), its output appended to its log file.
    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let args = self.args(id);
        let binary = self.binary.clone();
        let root = self.root.path().to_path_buf();
        let since = self.epoch.elapsed();
        let node = self.node_mut(id);
        anyhow::ensure!(node.child.is_none(), "node {id} is already running");
        node.starts += 1;
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .with_context(|| format!("cannot open {}", node.log_path.display()))?;
        writeln!(
            log,
            "===== syncd node {id}, run {} (test time +{:.3}s): {} {}",
            node.starts,
            since.as_secs_f64(),
            binary.display(),
            args.join(" ")
        )?;
        let mut command = Command::new(&binary);
        command
            .args(&args)
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("RUST_BACKTRACE", "1");
        // Every flag can also come from SYNCD_<FLAG>: leave none of the test runner's own
        // settings to the nodes, so they run exactly with the flags above.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SYNCD_") {
                command.env_remove(name);
            }
        }
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        let pid = child.id();
        node.child = Some(child);
        node.state = NodeState::Running;
        let starts = node.starts;
        self.note(format!("spawned node {id} (pid {pid}, run {starts})"));
        Ok(())
    }

    /// Waits until the freshly spawned node `id` answers `Cluster.Status` as itself, moving it
    /// to other ports (and its proxies with it) when another process took one of its ports.
    async fn await_started(&mut self, id: u64) -> anyhow::Result<()> {
        for attempt in 1..=PORT_ATTEMPTS {
            match self.started(id).await? {
                Started::Up => return Ok(()),
                Started::PortTaken if self.node(id).joined => {
                    bail!(
                        "node {id} cannot bind {} or {} any more (another process took it), and \
                         a joined node's address is in the replicated configuration",
                        self.node(id).listen,
                        self.node(id).metrics
                    )
                }
                Started::PortTaken => {
                    let (listen, metrics) = free_pair()?;
                    self.note(format!(
                        "node {id}: a port was taken (attempt {attempt}); moving to {listen}, \
                         metrics {metrics}"
                    ));
                    let node = self.node_mut(id);
                    node.listen = listen;
                    node.metrics = metrics;
                    self.network.retarget(id, listen);
                    self.clients.set(self.options.client(id, listen));
                    self.spawn(id)?;
                }
            }
        }
        bail!("node {id} found no free port in {PORT_ATTEMPTS} attempts")
    }

    /// One attempt of [`Cluster::await_started`].
    async fn started(&mut self, id: u64) -> anyhow::Result<Started> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let probe = self.client(id).with_timeout(Duration::from_millis(300));
        let mut last: String;
        loop {
            if let Some(status) = self.reap(id)? {
                let tail = tail_of(&self.node(id).log_path, 200);
                let run = tail.rsplit("===== syncd node").next().unwrap_or_default();
                let lower = run.to_lowercase();
                if lower.contains("address already in use")
                    || lower.contains("address in use")
                    || lower.contains("os error 98")
                {
                    return Ok(Started::PortTaken);
                }
                bail!(
                    "node {id} exited while starting ({status}); its log {} ends with:\n{}",
                    self.node(id).log_path.display(),
                    indent(&tail_of(&self.node(id).log_path, log_lines()))
                );
            }
            match probe.status().await {
                Ok(s) if s.node_id == id && self.owns_port(id) => return Ok(Started::Up),
                Ok(s) => {
                    last = format!(
                        "{} answers as node {} (another process on our port?)",
                        self.node(id).listen,
                        s.node_id
                    )
                }
                Err(e) => last = format!("{:?}: {}", e.code(), e.message()),
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {id} did not answer Cluster.Status at {} within {STARTUP_TIMEOUT:?} \
                     (last: {last})",
                    self.node(id).listen
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether node `id`'s own process listens on its gRPC port (so a `Status` answer there is
    /// its own, not that of some other test's node that took the port). True when it cannot
    /// be told (no `/proc`).
    fn owns_port(&self, id: u64) -> bool {
        let node = self.node(id);
        match node.pid() {
            Some(pid) => listens_on(pid, node.listen.port()).unwrap_or(true),
            None => false,
        }
    }

    /// If node `id`'s process has ended, reaps it and returns its exit status.
    fn reap(&mut self, id: u64) -> anyhow::Result<Option<ExitStatus>> {
        let node = self.node_mut(id);
        let Some(child) = node.child.as_mut() else {
            return Ok(None);
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                node.child = None;
                node.state = NodeState::Down;
                node.last_exit = Some(status);
                self.note(format!("node {id} exited: {status}"));
                Ok(Some(status))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(anyhow!("cannot wait for node {id}: {e}")),
        }
    }

    /// Sends `signal` to node `id`'s process.
    fn signal(&self, id: u64, signal: libc::c_int, name: &str) -> anyhow::Result<()> {
        let pid = self
            .node(id)
            .pid()
            .ok_or_else(|| anyhow!("cannot send {name} to node {id}: it is not running"))?;
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet (so it cannot have been
        // reused by another process).
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        if rc != 0 {
            bail!(
                "kill({pid}, {name}) for node {id} failed: {}",
                std::io::Error::last_os_error()
            );
        }
        self.note(format!("{name} → node {id} (pid {pid})"));
        Ok(())
    }

    /// SIGKILLs node `id` and reaps it.
    pub async fn kill9(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, libc::SIGKILL, "SIGKILL")?;
        self.wait_exit(id, REAP_TIMEOUT).await.map(|_| ())
    }

    /// SIGSTOPs node `id`: it keeps its sockets but does nothing.
    pub fn sigstop(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, libc::SIGSTOP, "SIGSTOP")?;
        self.node_mut(id).state = NodeState::Paused;
        Ok(())
    }

    /// SIGCONTs node `id`.
    pub fn sigcont(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, libc::SIGCONT, "SIGCONT")?;
        self.node_mut(id).state = NodeState::Running;
        Ok(())
    }

    /// Sends SIGTERM to node `id` without waiting (see [`Cluster::wait_exit`]). The node stops
    /// counting as running, so polls no longer ask it.
    pub fn send_sigterm(&mut self, id: u64) -> anyhow::Result<()> {
        self.signal(id, libc::SIGTERM, "SIGTERM")?;
        self.node_mut(id).state = NodeState::Terminating;
        Ok(())
    }

    /// Waits until node `id`'s process exits and returns its status; after `timeout`, kills it
    /// and fails.
    pub async fn wait_exit(&mut self, id: u64, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.reap(id)? {
                return Ok(status);
            }
            if self.node(id).child.is_none() {
                bail!("node {id} is not running");
            }
            if Instant::now() >= deadline {
                let _ = self.signal(id, libc::SIGKILL, "SIGKILL (exit timeout)");
                let _ = tokio::time::timeout(REAP_TIMEOUT, async {
                    while matches!(self.reap(id), Ok(None)) {
                        tokio::time::sleep(POLL).await;
                    }
                })
                .await;
                bail!("node {id} did not exit within {timeout:?}; killed it");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERMs node `id` and returns its exit status (it must exit within 10 s).
    pub async fn sigterm(&mut self, id: u64) -> anyhow::Result<ExitStatus> {
        self.send_sigterm(id)?;
        self.wait_exit(id, Duration::from_secs(10)).await
    }

    /// Starts node `id` again with the same data dir and flags (and ports, unless another
    /// process took them meanwhile), and waits until it answers `Cluster.Status`.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.reap(id)?;
        anyhow::ensure!(
            self.node(id).child.is_none(),
            "node {id} is still running ({:?}); kill it first",
            self.state(id)
        );
        // A fresh channel: the old one may hold a connection to the dead process.
        let listen = self.node(id).listen;
        self.clients.set(self.options.client(id, listen));
        self.spawn(id)?;
        self.await_started(id).await
    }

    /// Starts node `id` to join the running cluster (`--initial-cluster-state existing`) and
    /// waits until it answers `Cluster.Status`. Returns the address to give `AddMember`. A
    /// joining node is outside the proxy mesh: the configuration holds one address per member,
    /// so every member reaches it at its real address and its links cannot be cut.
    pub async fn add_node(&mut self, id: u64) -> anyhow::Result<String> {
        anyhow::ensure!(
            !self.nodes.contains_key(&id),
            "node {id} exists already; ids are never reused"
        );
        let (listen, metrics) = free_pair()?;
        let mut members: Vec<String> = self
            .nodes
            .values()
            .map(|n| format!("{}={}", n.id, n.listen))
            .collect();
        members.push(format!("{id}={listen}"));
        self.nodes.insert(
            id,
            Node {
                id,
                listen,
                metrics,
                data_dir: self.root.path().join(format!("node-{id}")),
                log_path: self.root.path().join(format!("node-{id}.log")),
                joined: true,
                join_cluster: members.join(","),
                child: None,
                state: NodeState::Down,
                last_exit: None,
                starts: 0,
            },
        );
        self.clients.set(self.options.client(id, listen));
        self.spawn(id)?;
        // Nothing refers to a joining node's address before AddMember, so a port collision on
        // its first start can still move it.
        match self.started(id).await? {
            Started::Up => Ok(self.node(id).listen.to_string()),
            Started::PortTaken => {
                let (listen, metrics) = free_pair()?;
                let node = self.node_mut(id);
                node.listen = listen;
                node.metrics = metrics;
                node.join_cluster = node
                    .join_cluster
                    .rsplit_once(',')
                    .map(|(rest, _)| format!("{rest},{id}={listen}"))
                    .unwrap_or_else(|| format!("{id}={listen}"));
                self.clients.set(self.options.client(id, listen));
                self.spawn(id)?;
                self.await_started(id).await?;
                Ok(listen.to_string())
            }
        }
    }

    // --- observing -------------------------------------------------------------------------

    /// Node `id`'s `Cluster.Status`.
    pub async fn status(&self, id: u64) -> anyhow::Result<ClusterStatusResponse> {
        self.client(id).status().await.map_err(|e| {
            anyhow!(
                "Cluster.Status on node {id}: {:?}: {}",
                e.code(),
                e.message()
            )
        })
    }

    /// `Cluster.Status` of every running node, asked concurrently with a short deadline.
    pub async fn statuses(&self) -> BTreeMap<u64, Result<ClusterStatusResponse, Status>> {
        let asks = self.running().into_iter().map(|id| {
            let client = self.client(id).with_timeout(STATUS_POLL_TIMEOUT);
            async move { (id, client.status().await) }
        });
        futures::future::join_all(asks).await.into_iter().collect()
    }

    /// The statuses of the running nodes that answered, and a description of all of them.
    async fn answered(&self) -> (BTreeMap<u64, ClusterStatusResponse>, String) {
        let all = self.statuses().await;
        let description = describe_statuses(&all);
        let ok = all
            .into_iter()
            .filter_map(|(id, s)| s.ok().map(|s| (id, s)))
            .collect();
        (ok, description)
    }

    /// Waits until a majority of some leader's voters (among the running nodes) agree on it,
    /// and returns it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<Leader> {
        self.wait_for_leader_where(timeout, "a leader", |_| true)
            .await
    }

    /// Like [`Cluster::wait_for_leader`], for a leader that also satisfies `accept` (e.g. a new
    /// one: `|l| l.id != old.id && l.term > old.term`).
    pub async fn wait_for_leader_where(
        &self,
        timeout: Duration,
        what: &str,
        accept: impl Fn(&Leader) -> bool,
    ) -> anyhow::Result<Leader> {
        let leader = eventually(what, timeout, async || {
            let (statuses, description) = self.answered().await;
            match agreed_leader(&statuses) {
                Some(l) if accept(&l) => Ok(l),
                Some(l) => bail!(
                    "leader {} (term {}) does not qualify: {description}",
                    l.id,
                    l.term
                ),
                None => bail!("no agreed leader: {description}"),
            }
        })
        .await?;
        self.note(format!(
            "leader: node {} in term {}",
            leader.id, leader.term
        ));
        Ok(leader)
    }

    /// Waits until every running node answers and all report the same leader and term, with the
    /// leader itself reporting the LEADER role, and returns that leader.
    pub async fn wait_for_agreement(&self, timeout: Duration) -> anyhow::Result<Leader> {
        let leader = eventually("every node to agree on one leader", timeout, async || {
            let all = self.statuses().await;
            let description = describe_statuses(&all);
            let mut seen = None;
            for (id, s) in &all {
                let s = s
                    .as_ref()
                    .map_err(|_| anyhow!("node {id} does not answer: {description}"))?;
                let view = (s.leader_id, s.term);
                if s.leader_id == 0 || seen.is_some_and(|v| v != view) {
                    bail!("no agreement: {description}");
                }
                seen = Some(view);
            }
            let (id, term) = seen.ok_or_else(|| anyhow!("no node is running"))?;
            match all.get(&id) {
                Some(Ok(s)) if s.role() == Role::Leader && s.term == term => {
                    Ok(Leader { id, term })
                }
                _ => bail!("node {id} is named leader but does not say so: {description}"),
            }
        })
        .await?;
        self.note(format!(
            "all agree: leader node {} in term {}",
            leader.id, leader.term
        ));
        Ok(leader)
    }

    /// The agreed leader and its own status.
    pub async fn leader_status(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<(Leader, ClusterStatusResponse)> {
        eventually("a leader's status", timeout, async || {
            let (statuses, description) = self.answered().await;
            let leader = agreed_leader(&statuses)
                .ok_or_else(|| anyhow!("no agreed leader: {description}"))?;
            Ok((leader, statuses[&leader.id].clone()))
        })
        .await
    }

    /// Waits until node `id` has applied everything the leader had committed when this was
    /// called (so every write acknowledged before the call), and returns its status.
    pub async fn wait_caught_up(
        &self,
        id: u64,
        timeout: Duration,
    ) -> anyhow::Result<ClusterStatusResponse> {
        let deadline = Instant::now() + timeout;
        let (leader, status) = self.leader_status(timeout).await?;
        let target = status.commit_index;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let what = format!(
            "node {id} to apply up to {target} (leader {}'s commit index)",
            leader.id
        );
        let caught_up = eventually(&what, remaining, async || {
            let s = self.status(id).await?;
            anyhow::ensure!(s.applied_index >= target, "{}", summarize(&s));
            Ok(s)
        })
        .await?;
        self.note(format!("node {id} caught up to {target}"));
        Ok(caught_up)
    }

    /// Waits until every node of `nodes` reports `expected` (`(id, learner)` in id order, as
    /// [`configuration`] gives it) as its configuration.
    pub async fn wait_for_configuration(
        &self,
        nodes: &[u64],
        expected: &[(u64, bool)],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let what = format!("nodes {nodes:?} to report configuration {expected:?}");
        eventually(&what, timeout, async || {
            for &id in nodes {
                let s = self.status(id).await?;
                anyhow::ensure!(configuration(&s) == expected, "{}", summarize(&s));
            }
            Ok(())
        })
        .await?;
        self.note(format!("nodes {nodes:?} report configuration {expected:?}"));
        Ok(())
    }

    /// Waits until every running node has applied exactly what the agreed leader has committed
    /// (and commits as much), and returns that index. Meant for a quiet cluster.
    pub async fn wait_for_convergence(&self, timeout: Duration) -> anyhow::Result<u64> {
        let index = eventually("every running node to converge", timeout, async || {
            let (statuses, description) = self.answered().await;
            anyhow::ensure!(
                statuses.len() == self.running().len(),
                "not every node answers: {description}"
            );
            let leader = agreed_leader(&statuses)
                .ok_or_else(|| anyhow!("no agreed leader: {description}"))?;
            let commit = statuses[&leader.id].commit_index;
            let converged = statuses
                .values()
                .all(|s| s.commit_index == commit && s.applied_index == commit);
            anyhow::ensure!(converged, "not converged on {commit}: {description}");
            Ok(commit)
        })
        .await?;
        self.note(format!("all running nodes converged at index {index}"));
        Ok(index)
    }

    /// `GET /metrics` of node `id` (Prometheus text).
    pub async fn metrics(&self, id: u64) -> anyhow::Result<String> {
        http_get(self.metrics_address(id), "/metrics").await
    }

    /// The value of metric `name` on node `id`, summed over its series; fails if it is absent.
    pub async fn metric(&self, id: u64, name: &str) -> anyhow::Result<f64> {
        let text = self.metrics(id).await?;
        metric_value(&text, name)
            .ok_or_else(|| anyhow!("node {id}'s /metrics has no series named {name}"))
    }

    // --- failure reports -------------------------------------------------------------------

    /// A report of everything a reader needs to diagnose a failure.
    fn report(
        &self,
        reason: &str,
        statuses: Option<&BTreeMap<u64, Result<ClusterStatusResponse, Status>>>,
    ) -> String {
        let mut r = String::new();
        let _ = writeln!(r, "\n======== syncd cluster report: {reason}");
        let _ = writeln!(
            r,
            "directory: {} (kept)\nbinary: {}\noptions: {:?}\nnetwork: {}",
            self.root.path().display(),
            self.binary.display(),
            self.options,
            self.network.describe()
        );
        r.push_str(&self.timeline_text());
        let lines = log_lines();
        for node in self.nodes.values() {
            let process = match (node.state, node.pid()) {
                (NodeState::Down, _) => match node.last_exit {
                    Some(status) => format!("down (last exit: {status})"),
                    None => "down".to_string(),
                },
                (state, Some(pid)) => format!("{state:?} (pid {pid})"),
                (state, None) => format!("{state:?}"),
            };
            let _ = writeln!(
                r,
                "---- node {}: {process}, {} run(s)\n  grpc {}  metrics {}{}\n  data {}\n  log  {}",
                node.id,
                node.starts,
                node.listen,
                node.metrics,
                if node.joined { "  (joined)" } else { "" },
                node.data_dir.display(),
                node.log_path.display()
            );
            match statuses.and_then(|s| s.get(&node.id)) {
                Some(Ok(s)) => {
                    let _ = writeln!(r, "  status: {}", summarize(s));
                }
                Some(Err(e)) => {
                    let _ = writeln!(r, "  status: none ({:?}: {})", e.code(), e.message());
                }
                None => {}
            }
            let _ = writeln!(r, "  last {lines} log lines:");
            let _ = writeln!(r, "{}", indent(&tail_of(&node.log_path, lines)));
        }
        let _ = writeln!(r, "======== end of report");
        r
    }

    /// The timeline, one indented line per event.
    pub fn timeline_text(&self) -> String {
        let mut text = String::from("timeline:\n");
        for line in self
            .timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(text, "  {line}");
        }
        text
    }

    /// Prints the full report (with the statuses of the running nodes), keeps the directory and
    /// panics with `reason`.
    pub async fn fail(&mut self, reason: &str) -> ! {
        let statuses = self.statuses().await;
        eprintln!("{}", self.report(reason, Some(&statuses)));
        self.reported = true;
        self.root.disable_cleanup(true);
        panic!("{reason}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.reported {
            eprintln!("{}", self.report("the test panicked", None));
            self.root.disable_cleanup(true);
        }
        if std::env::var_os("SYNCD_TEST_KEEP").is_some() {
            self.root.disable_cleanup(true);
        }
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                // SIGKILL also ends a stopped process.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Runs one cluster test: starts `size` nodes, runs `body` within `limit`, and on failure (an
/// error, a panic, or the time limit) prints the cluster report and fails the test. The nodes
/// are killed in every case.
pub async fn scenario(
    size: usize,
    options: Options,
    limit: Duration,
    body: impl AsyncFnOnce(&mut Cluster) -> anyhow::Result<()>,
) {
    let mut cluster = match Cluster::start(size, options).await {
        Ok(cluster) => cluster,
        Err(e) => panic!("could not start the cluster: {e:#}"),
    };
    // `{:#}` prints the error with its causes on one line, and no backtrace (anyhow would add
    // one under RUST_BACKTRACE, burying the report).
    match tokio::time::timeout(limit, body(&mut cluster)).await {
        // The timeline of a passing test too: libtest shows it with `--nocapture`.
        Ok(Ok(())) => eprintln!("{}", cluster.timeline_text()),
        Ok(Err(e)) => cluster.fail(&format!("{e:#}")).await,
        Err(_) => {
            cluster
                .fail(&format!("the test exceeded its time limit of {limit:?}"))
                .await
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small OS helpers

/// A loopback address whose port was free a moment ago. Another process may take it before the
/// node binds it; the harness notices and moves the node (see `await_started`).
pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?)
}

/// Two distinct loopback addresses (a node's gRPC and metrics ports). Both listeners are held
/// while the second is chosen, so the OS cannot hand out one port twice: two separate
/// [`free_port`] calls could, and the node then refuses to start ("--metrics-listen must
/// differ from --listen"), which no move to another port repairs.
fn free_pair() -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let (first, second) = reserve_pair()?;
    Ok((first.local_addr()?, second.local_addr()?))
}

/// Two bound loopback listeners: while they are held, no other bind of port 0 (a proxy's, say)
/// can be given their ports.
fn reserve_pair() -> anyhow::Result<(std::net::TcpListener, std::net::TcpListener)> {
    let first = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot bind a loopback port")?;
    let second = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot bind a loopback port")?;
    Ok((first, second))
}

/// Makes the child get SIGKILL when the thread that spawned it dies, so that even a test process
/// killed outright leaves no node behind. (The harness spawns from the test's own threads, which
/// live as long as the cluster.)
#[cfg(target_os = "linux")]
pub(crate) fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn die_with_parent(_command: &mut Command) {}

/// Whether process `pid` has a socket listening on TCP `port` (from `/proc`); `None` when that
/// cannot be read.
fn listens_on(pid: u32, port: u16) -> Option<bool> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && *state == "0A" {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    if inodes.is_empty() {
        return Some(false);
    }
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
            .unwrap_or(false)
    }))
}

/// Lines of each node's log in a report.
fn log_lines() -> usize {
    std::env::var("SYNCD_TEST_LOG_LINES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(40)
}

/// The last `lines` lines of a file (reading at most its last 256 KiB).
pub fn tail_of(path: &Path, lines: usize) -> String {
    const WINDOW: u64 = 256 * 1024;
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A minimal HTTP/1.1 GET (the metrics endpoint), returning the body of a 200 answer.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| anyhow!("GET http://{addr}{path}: no answer within 5s"))??;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET http://{addr}{path}: malformed answer"))?;
    let status_line = head.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status_line.split_whitespace().nth(1) == Some("200"),
        "GET http://{addr}{path}: {status_line}"
    );
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    Ok(if chunked {
        dechunk(body)
    } else {
        body.to_string()
    })
}

/// The sum of the series of metric `name` in a Prometheus text exposition (`name value` or
/// `name{labels} value` lines), or `None` if it has none.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = match rest.strip_prefix('{') {
            Some(labelled) => match labelled.split_once('}') {
                Some((_, value)) => value,
                None => continue,
            },
            None if rest.starts_with(' ') => rest,
            None => continue, // another metric whose name starts with `name`
        };
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// Decodes a chunked HTTP body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
        else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_proto::sync::v1::MemberStatus;

    fn status(
        id: u64,
        role: Role,
        term: u64,
        leader: u64,
        members: &[u64],
    ) -> ClusterStatusResponse {
        ClusterStatusResponse {
            node_id: id,
            role: role as i32,
            term,
            leader_id: leader,
            members: members
                .iter()
                .map(|&m| MemberStatus {
                    id: m,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn by_id(list: Vec<ClusterStatusResponse>) -> BTreeMap<u64, ClusterStatusResponse> {
        list.into_iter().map(|s| (s.node_id, s)).collect()
    }

    #[test]
    fn a_leader_needs_a_majority_of_its_voters() {
        let m = [1, 2, 3];
        let agreed = by_id(vec![
            status(1, Role::Leader, 2, 1, &m),
            status(2, Role::Follower, 2, 1, &m),
            status(3, Role::Follower, 2, 0, &m),
        ]);
        assert_eq!(agreed_leader(&agreed), Some(Leader { id: 1, term: 2 }));
        let alone = by_id(vec![
            status(1, Role::Leader, 2, 1, &m),
            status(2, Role::Follower, 3, 0, &m),
            status(3, Role::Candidate, 3, 0, &m),
        ]);
        assert_eq!(agreed_leader(&alone), None);
    }

    #[test]
    fn a_deposed_leader_that_has_not_noticed_loses_to_the_new_one() {
        let m = [1, 2, 3];
        let both = by_id(vec![
            status(1, Role::Leader, 2, 1, &m),
            status(2, Role::Leader, 3, 2, &m),
            status(3, Role::Follower, 3, 2, &m),
        ]);
        assert_eq!(agreed_leader(&both), Some(Leader { id: 2, term: 3 }));
    }

    #[test]
    fn tails_and_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        assert_eq!(tail_of(&path, 2), "b\nc");
        assert!(tail_of(&dir.path().join("none"), 2).contains("cannot read"));
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }

    #[test]
    fn metric_values_are_summed_over_series_of_exactly_that_name() {
        let text = "# HELP syncd_log_entries x\n# TYPE syncd_log_entries gauge\n\
                    syncd_log_entries 12\nsyncd_log_entries_other 5\n\
                    syncd_peer_reachable{peer=\"2\"} 1\nsyncd_peer_reachable{peer=\"3\"} 0\n";
        assert_eq!(metric_value(text, "syncd_log_entries"), Some(12.0));
        assert_eq!(metric_value(text, "syncd_peer_reachable"), Some(1.0));
        assert_eq!(metric_value(text, "syncd_log"), None);
    }

    #[test]
    fn this_process_listens_where_it_bound() {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listens_on(std::process::id(), port), Some(true));
        drop(listener);
        assert_eq!(listens_on(std::process::id(), port), Some(false));
    }
}
