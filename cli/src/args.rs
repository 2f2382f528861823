//! The command line: every command, flag and default, and the checks that span several flags.
//!
//! Parsing errors (an unknown flag, a malformed endpoint, `--nodes 0`) are usage errors: clap
//! prints them with the usage line and exits with code 2.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

/// The endpoints of the cluster that `syncctl dev up` starts with its default base port.
pub const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";

/// The metrics port of node `i` is `base + METRICS_PORT_OFFSET + i`, its gRPC port `base + i`.
pub const METRICS_PORT_OFFSET: u16 = 2000;

const ROOT_EXAMPLES: &str = "\
Examples:
  syncctl dev up                      # a 3-node cluster on 127.0.0.1:7001-7003
  syncctl status                      # each member's role, term, leader and indexes
  syncctl lock run nightly-report -- ./report.sh
  syncctl lock list
  syncctl cache set k1 v1 --node 1 && syncctl cache get k1 --node 2
  syncctl member add 4 10.0.0.8:7001 && syncctl member promote 4
  syncctl bench raw --clients 64 --duration 10s
  SYNC_ENDPOINTS=10.0.0.5:7001 syncctl status --output json
  source <(syncctl completions bash)

Exit codes:
  0  ok
  1  error (the cluster could not be reached, the server refused the call, ...)
  2  usage (an unknown command or flag, a malformed value)
  3  a lock was not acquired or its wait timed out (`lock acquire`, `lock run`), or
     `cache set --if-version` found another version
`lock run` exits with its command's own code once the lock is held.";

/// Command-line client for a syncd cluster.
#[derive(Parser, Debug)]
#[command(name = "syncctl", version, about, after_help = ROOT_EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command accepts.
#[derive(Args, Debug, Clone)]
pub struct GlobalOpts {
    /// Cluster members to contact, comma-separated host:port.
    #[arg(
        long,
        env = "SYNC_ENDPOINTS",
        default_value = DEFAULT_ENDPOINTS,
        value_delimiter = ',',
        value_parser = parse_endpoint,
        global = true,
        help_heading = "Global options"
    )]
    pub endpoints: Vec<Endpoint>,

    /// How to print results.
    #[arg(
        long,
        value_enum,
        default_value_t = Output::Table,
        global = true,
        help_heading = "Global options"
    )]
    pub output: Output,

    /// Deadline of each request to the cluster, connecting included (e.g. 500ms, 5s).
    #[arg(
        long,
        default_value = "5s",
        value_parser = parse_positive_duration,
        global = true,
        help_heading = "Global options"
    )]
    pub timeout: Duration,

    /// CA certificate (PEM) to verify the cluster's TLS certificates with; turns TLS on.
    #[arg(
        long = "cacert",
        id = "tls_cacert",
        env = "SYNC_CACERT",
        value_name = "PATH",
        global = true,
        help_heading = "Global options"
    )]
    pub cacert: Option<PathBuf>,

    /// Client certificate (PEM) for a cluster started with --client-cert-auth; needs --cert-key.
    #[arg(
        long = "cert",
        id = "tls_cert",
        env = "SYNC_CERT",
        value_name = "PATH",
        global = true,
        help_heading = "Global options"
    )]
    pub cert: Option<PathBuf>,

    /// Private key (PEM) of --cert.
    #[arg(
        long = "cert-key",
        id = "tls_key",
        env = "SYNC_CERT_KEY",
        value_name = "PATH",
        global = true,
        help_heading = "Global options"
    )]
    pub key: Option<PathBuf>,
}

impl GlobalOpts {
    /// The SDK's TLS settings from --cacert, --cert and --cert-key (`None`: plaintext). The files
    /// are read here; their PEM is checked when a client connects.
    pub fn tls(&self) -> Result<Option<sync_client::TlsOptions>, sync_client::Error> {
        let Some(ca) = &self.cacert else {
            return Ok(None);
        };
        let tls = sync_client::TlsOptions::from_ca_file(ca)?;
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => tls.identity_files(cert, key).map(Some),
            _ => Ok(Some(tls)),
        }
    }
}

/// The output format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts (`dev up` prints one JSON object per line, one per event).
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show each member's view of the cluster: role, term, leader, commit and applied index.
    #[command(after_help = "\
Examples:
  syncctl status
  syncctl status --output json
  syncctl --endpoints 10.0.0.5:7001,10.0.0.6:7001 status")]
    Status,

    /// Run a local cluster of real syncd processes for development.
    #[command(
        subcommand,
        after_help = "\
Examples:
  syncctl dev up
  syncctl dev up --nodes 5 --base-port 8000 --data-dir /tmp/syncd-dev"
    )]
    Dev(DevCommand),

    /// Measure the cluster's throughput and latency: replicated writes, locks, queues, cache.
    #[command(
        subcommand,
        after_help = "\
Examples:
  syncctl bench raw --clients 64 --duration 10s
  syncctl bench raw --clients 1 --duration 10s --compare-etcd http://127.0.0.1:2379
  syncctl bench locks --clients 16 --duration 10s --contended --compare-etcd http://127.0.0.1:2379
  syncctl bench queue --mode end-to-end --clients 16 --duration 10s --compare-redis redis://127.0.0.1:6379
  syncctl bench cache --mode write --sharers 2 --clients 16 --duration 10s --compare-redis redis://127.0.0.1:6379"
    )]
    Bench(BenchCommand),

    /// Sessions: the leases that hold locks.
    #[command(
        subcommand,
        after_help = "\
Examples:
  syncctl session grant --ttl 30s
  syncctl session keepalive 42
  syncctl session list
  syncctl session revoke 42"
    )]
    Session(SessionCommand),

    /// Locks: acquire, release, inspect, watch, or run a command while holding one.
    #[command(
        subcommand,
        after_help = "\
Examples:
  syncctl lock run nightly-report -- ./report.sh
  syncctl lock acquire db-migration --ttl 30s --wait 5s
  syncctl lock release db-migration --session 42
  syncctl lock list jobs/
  syncctl lock get db-migration --output json
  syncctl lock watch"
    )]
    Lock(LockCommand),

    /// Queues: create topics, publish, consume, acknowledge, inspect, purge, redrive, tail.
    #[command(
        subcommand,
        after_help = "\
Examples:
  syncctl queue publish jobs 'resize 42'
  syncctl queue consume jobs --max 10 --ack
  syncctl queue stats jobs
  syncctl queue tail jobs"
    )]
    Queue(QueueCommand),

    /// Cluster membership: add a node (as a learner), promote a learner, remove a member.
    #[command(
        subcommand,
        after_help = "\
Examples:
  syncctl member add 4 10.0.0.8:7001
  syncctl member promote 4
  syncctl member remove 2"
    )]
    Member(MemberCommand),

    /// Leadership: hand it to another voter.
    #[command(
        subcommand,
        after_help = "\
Examples:
  syncctl leader transfer --to 2
  syncctl leader transfer"
    )]
    Leader(LeaderCommand),

    /// Take a snapshot of a node's state machine now, and print its index, term and size.
    ///
    /// The node may then compact its log up to the snapshot. If nothing was applied since its
    /// last snapshot, that one is printed. Without --node, the leader takes it.
    #[command(after_help = "\
Examples:
  syncctl snapshot
  syncctl snapshot --node 2 --output json")]
    Snapshot(SnapshotArgs),

    /// The coherent cache, node by node: get, set, delete, MESI state, counters.
    ///
    /// Each node caches what it reads and writes, so which node serves a call is part of its
    /// answer: --node ID sends the call to that node (a HIT or MISS on that node's line).
    /// Without --node the call goes to the leader (or any member).
    #[command(
        subcommand,
        after_help = "\
Examples:
  syncctl cache set k1 v1 --node 1
  syncctl cache get k1 --node 2          # MISS: node 2 fetches it
  syncctl cache get k1 --node 1          # HIT: node 1 has it
  syncctl cache state k1 --node 2        # node 2's line and the directory's holders
  syncctl cache stats --node 2"
    )]
    Cache(CacheCommand),

    /// Print a shell completion script (bash, zsh or fish) on stdout.
    #[command(after_help = "\
Examples:
  source <(syncctl completions bash)
  syncctl completions zsh > ~/.zfunc/_syncctl
  syncctl completions fish > ~/.config/fish/completions/syncctl.fish")]
    Completions(CompletionsArgs),
}

#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Create a topic with its settings (unset ones take the server's defaults).
    #[command(after_help = "\
Examples:
  syncctl queue create jobs
  syncctl queue create jobs --visibility 1m --max-deliveries 5 --dead-letter jobs-dlq")]
    Create(QueueCreateArgs),

    /// Publish one message (the argument, --file, or stdin) and print its id.
    #[command(after_help = "\
Examples:
  syncctl queue publish jobs '{\"image\": 42}'
  syncctl queue publish jobs --file job.json --key user-7 --attr priority=high
  echo hello | syncctl queue publish jobs --dedup-id upload-42 --delay 5s")]
    Publish(QueuePublishArgs),

    /// Receive up to --max messages, print them with their receipts (message id and attempt),
    /// and with --ack acknowledge them. Without --ack they are invisible for the visibility
    /// timeout, then delivered again unless acked with `queue ack`.
    #[command(after_help = "\
Examples:
  syncctl queue consume jobs
  syncctl queue consume jobs --max 10 --visibility 1m --wait 10s --output json
  syncctl queue consume jobs --ack")]
    Consume(QueueConsumeArgs),

    /// Acknowledge a delivery: the message is deleted.
    #[command(after_help = "\
Examples:
  syncctl queue ack jobs 00000000000000000042
  syncctl queue ack jobs 00000000000000000042 --attempt 2")]
    Ack(QueueReceiptArgs),

    /// Give a delivery back: the message is visible again (after --delay).
    #[command(after_help = "\
Examples:
  syncctl queue nack jobs 00000000000000000042
  syncctl queue nack jobs 00000000000000000042 --attempt 1 --delay 30s")]
    Nack(QueueNackArgs),

    /// Keep a delivery invisible for --visibility from now (a heartbeat for a long job).
    #[command(after_help = "\
Examples:
  syncctl queue extend jobs 00000000000000000042 --visibility 5m")]
    Extend(QueueExtendArgs),

    /// Make the messages whose visibility timeout lapsed visible again now.
    #[command(after_help = "\
Examples:
  syncctl queue requeue jobs")]
    Requeue(QueueTopicArg),

    /// A topic's counts: visible, in flight, delayed, dead-lettered, oldest age, rates, owner.
    #[command(after_help = "\
Examples:
  syncctl queue stats jobs
  syncctl queue stats jobs --output json")]
    Stats(QueueTopicArg),

    /// Delete every message of a topic.
    #[command(after_help = "\
Examples:
  syncctl queue purge jobs")]
    Purge(QueueTopicArg),

    /// Move dead letters back to the topics they came from, or to --to.
    #[command(after_help = "\
Examples:
  syncctl queue redrive jobs-dlq
  syncctl queue redrive jobs-dlq --to jobs-retry --max 100")]
    Redrive(QueueRedriveArgs),

    /// Print each message as it arrives and acknowledge it (or not, with --no-ack), until
    /// Ctrl-C.
    #[command(after_help = "\
Examples:
  syncctl queue tail jobs
  syncctl queue tail jobs --no-ack --output json")]
    Tail(QueueTailArgs),

    /// List the topics and their settings.
    #[command(after_help = "\
Examples:
  syncctl queue list
  syncctl queue list jobs- --output json")]
    List(QueuePrefixArg),
}

#[derive(Args, Debug, Clone)]
pub struct QueueTopicArg {
    /// The topic's name.
    pub topic: String,
}

#[derive(Args, Debug, Clone)]
pub struct QueuePrefixArg {
    /// Only topics whose names start with this (default: all).
    #[arg(default_value = "")]
    pub prefix: String,
}

#[derive(Args, Debug, Clone)]
pub struct QueueCreateArgs {
    /// The topic's name.
    pub topic: String,

    /// How long a delivered message stays invisible before it is delivered again.
    #[arg(long, value_parser = parse_positive_duration)]
    pub visibility: Option<Duration>,

    /// Deliveries before a message moves to the dead-letter topic (or is dropped without one).
    #[arg(long, value_name = "N")]
    pub max_deliveries: Option<u32>,

    /// Where messages go after --max-deliveries.
    #[arg(long, value_name = "TOPIC")]
    pub dead_letter: Option<String>,

    /// Most messages the topic keeps.
    #[arg(long, value_name = "N")]
    pub max_messages: Option<u64>,

    /// Most payload bytes the topic keeps.
    #[arg(long, value_name = "BYTES")]
    pub max_bytes: Option<u64>,

    /// Oldest age of a message the topic keeps.
    #[arg(long, value_parser = parse_positive_duration)]
    pub max_age: Option<Duration>,

    /// Largest payload accepted.
    #[arg(long, value_name = "BYTES")]
    pub max_message_bytes: Option<u64>,

    /// How long a dedup id is remembered.
    #[arg(long, value_parser = parse_positive_duration)]
    pub dedup_window: Option<Duration>,
}

#[derive(Args, Debug, Clone)]
pub struct QueuePublishArgs {
    /// The topic's name.
    pub topic: String,

    /// The payload (default: --file, or stdin).
    #[arg(conflicts_with = "file")]
    pub message: Option<String>,

    /// Read the payload from this file.
    #[arg(long, value_name = "F")]
    pub file: Option<PathBuf>,

    /// Ordering key: messages with one key are delivered one at a time, in order.
    #[arg(long, value_name = "K")]
    pub key: Option<String>,

    /// A repeat of this id within the dedup window publishes nothing.
    #[arg(long, value_name = "ID")]
    pub dedup_id: Option<String>,

    /// Not deliverable before this delay.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub delay: Option<Duration>,

    /// An attribute, key=value (repeatable).
    #[arg(long = "attr", value_name = "K=V", value_parser = parse_attribute)]
    pub attributes: Vec<(String, String)>,
}

#[derive(Args, Debug, Clone)]
pub struct QueueConsumeArgs {
    /// The topic's name.
    pub topic: String,

    /// Most messages to receive (1 to 100).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max: u32,

    /// Visibility timeout of these deliveries (default: the topic's).
    #[arg(long, value_parser = parse_positive_duration)]
    pub visibility: Option<Duration>,

    /// How long to wait for a first message (0: return at once).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub wait: Duration,

    /// Acknowledge the deliveries once printed.
    #[arg(long)]
    pub ack: bool,
}

#[derive(Args, Debug, Clone)]
pub struct QueueReceiptArgs {
    /// The topic's name.
    pub topic: String,

    /// The message id from the delivery.
    pub message_id: String,

    /// The delivery attempt from the receipt (0: the latest delivery).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub attempt: u32,
}

#[derive(Args, Debug, Clone)]
pub struct QueueNackArgs {
    #[command(flatten)]
    pub receipt: QueueReceiptArgs,

    /// Visible again after this delay.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub delay: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct QueueExtendArgs {
    #[command(flatten)]
    pub receipt: QueueReceiptArgs,

    /// Invisible for this long from now.
    #[arg(long, required = true, value_parser = parse_positive_duration)]
    pub visibility: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct QueueRedriveArgs {
    /// The dead-letter topic.
    pub dead_letters: String,

    /// Where to move them (default: back to the topic each came from).
    #[arg(long, value_name = "TOPIC")]
    pub to: Option<String>,

    /// Most messages to move (0: all).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max: u64,
}

#[derive(Args, Debug, Clone)]
pub struct QueueTailArgs {
    /// The topic's name.
    pub topic: String,

    /// Leave the messages unacknowledged (they are delivered again after their visibility
    /// timeout).
    #[arg(long)]
    pub no_ack: bool,

    /// Visibility timeout of these deliveries (default: the topic's).
    #[arg(long, value_parser = parse_positive_duration)]
    pub visibility: Option<Duration>,
}

/// Parses `key=value`.
fn parse_attribute(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{text}` is not key=value")),
    }
}

#[derive(Subcommand, Debug)]
pub enum SessionCommand {
    /// Open a session and print its id. Nothing keeps it alive: it expires after its TTL
    /// unless renewed with `session keepalive`.
    #[command(after_help = "\
Examples:
  syncctl session grant --ttl 30s
  syncctl session grant --ttl 1m --client-name deploy-bot --output json")]
    Grant(SessionGrantArgs),

    /// Renew a session every TTL/3 until Ctrl-C (or once with --once).
    #[command(after_help = "\
Examples:
  syncctl session keepalive 42
  syncctl session keepalive 42 --once --output json")]
    Keepalive(SessionKeepaliveArgs),

    /// End a session now: its locks are released and its waits fail.
    #[command(after_help = "\
Examples:
  syncctl session revoke 42")]
    Revoke(SessionIdArg),

    /// List the open sessions (explicit and implicit).
    #[command(after_help = "\
Examples:
  syncctl session list
  syncctl session list --output json")]
    List,
}

#[derive(Args, Debug, Clone)]
pub struct SessionGrantArgs {
    /// How long the session lives without a keep-alive (1s to 10m).
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    pub ttl: Duration,

    /// The name others see in lock holders and waiters.
    #[arg(long, default_value = "syncctl")]
    pub client_name: String,
}

#[derive(Args, Debug, Clone)]
pub struct SessionKeepaliveArgs {
    /// The session id.
    pub id: u64,

    /// Renew once and exit.
    #[arg(long)]
    pub once: bool,
}

#[derive(Args, Debug, Clone)]
pub struct SessionIdArg {
    /// The session id.
    pub id: u64,
}

#[derive(Subcommand, Debug)]
pub enum LockCommand {
    /// Acquire a lock and leave it held; print its fencing token and session.
    ///
    /// With --ttl, a new session is opened for the lock; nothing keeps it alive after syncctl
    /// exits, so the lock is held until that TTL passes unless the session is renewed (`session
    /// keepalive`). With --session, an existing session takes the lock. Exits with 3 if the lock
    /// is not acquired within --wait (default: try once).
    #[command(after_help = "\
Examples:
  syncctl lock acquire db-migration --ttl 30s
  syncctl lock acquire db-migration --ttl 30s --wait 5s --output json
  syncctl lock acquire catalog --mode shared --session 42")]
    Acquire(LockAcquireArgs),

    /// Release a lock held by a session.
    #[command(after_help = "\
Examples:
  syncctl lock release db-migration --session 42")]
    Release(LockReleaseArgs),

    /// List the locks that are held or awaited.
    #[command(after_help = "\
Examples:
  syncctl lock list
  syncctl lock list jobs/ --output json")]
    List(LockPrefixArg),

    /// Show one lock: its holders and its waiters in order.
    #[command(after_help = "\
Examples:
  syncctl lock get db-migration
  syncctl lock get db-migration --output json")]
    Get(LockNameArg),

    /// Run a command while holding a lock, then release it.
    ///
    /// Opens a session (kept alive while the command runs), acquires the lock (waiting up to
    /// --wait), runs the command with SYNC_LOCK_NAME, SYNC_LOCK_TOKEN (the fencing token) and
    /// SYNC_LOCK_SESSION in its environment, releases the lock, and exits with the command's
    /// exit code. If the session is lost while the command runs, the command is stopped
    /// (SIGTERM) and syncctl exits with 1. Exits with 3 if the lock is not acquired.
    #[command(after_help = "\
Examples:
  syncctl lock run nightly-report -- ./report.sh --date today
  syncctl lock run catalog --mode shared --wait 1m -- sh -c 'echo token $SYNC_LOCK_TOKEN'")]
    Run(LockRunArgs),

    /// Print lock events (acquired, converted, released, expired, revoked, deadlock) as they
    /// happen, until Ctrl-C.
    #[command(after_help = "\
Examples:
  syncctl lock watch
  syncctl lock watch jobs/ --output json")]
    Watch(LockPrefixArg),
}

/// A lock mode on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    /// Any number of shared holders at once (readers).
    Shared,
    /// One holder, nobody else (writer).
    Exclusive,
}

impl From<ModeArg> for sync_client::LockMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Shared => sync_client::LockMode::Shared,
            ModeArg::Exclusive => sync_client::LockMode::Exclusive,
        }
    }
}

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("owner").args(["session", "ttl"])))]
pub struct LockAcquireArgs {
    /// The lock's name (1 to 512 bytes).
    pub name: String,

    /// How to hold the lock.
    #[arg(long, value_enum, default_value_t = ModeArg::Exclusive)]
    pub mode: ModeArg,

    /// Acquire for this existing session.
    #[arg(long, value_name = "ID")]
    pub session: Option<u64>,

    /// Open a new session with this TTL for the lock (the default, with 30s).
    #[arg(long, value_parser = parse_positive_duration)]
    pub ttl: Option<Duration>,

    /// How long to wait for the lock (0: try once).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub wait: Duration,

    /// Lock-delay: if the session is lost while holding the lock, nobody gets it for this long.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub lock_delay: Duration,

    /// The name others see in lock holders (for a new session).
    #[arg(long, default_value = "syncctl")]
    pub client_name: String,
}

#[derive(Args, Debug, Clone)]
pub struct LockReleaseArgs {
    /// The lock's name.
    pub name: String,

    /// The session holding it.
    #[arg(long, value_name = "ID")]
    pub session: u64,
}

#[derive(Args, Debug, Clone)]
pub struct LockNameArg {
    /// The lock's name.
    pub name: String,
}

#[derive(Args, Debug, Clone)]
pub struct LockPrefixArg {
    /// Only locks whose names start with this (default: all).
    #[arg(default_value = "")]
    pub prefix: String,
}

#[derive(Args, Debug, Clone)]
pub struct LockRunArgs {
    /// The lock's name.
    pub name: String,

    /// How to hold the lock.
    #[arg(long, value_enum, default_value_t = ModeArg::Exclusive)]
    pub mode: ModeArg,

    /// How long to wait for the lock (0: try once).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub wait: Duration,

    /// TTL of the session that holds the lock while the command runs (renewed every TTL/3).
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub ttl: Duration,

    /// The name others see in lock holders.
    #[arg(long, default_value = "syncctl")]
    pub client_name: String,

    /// The command and its arguments, after `--`.
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum DevCommand {
    /// Start N syncd nodes on 127.0.0.1 and keep them running until Ctrl-C.
    ///
    /// Node i listens for gRPC on 127.0.0.1:(base-port + i) and serves metrics on
    /// 127.0.0.1:(base-port + 2000 + i); its data and its log (syncd.log) are in DATA_DIR/i.
    /// The syncd binary is looked up next to syncctl, then on PATH.
    #[command(after_help = "\
Examples:
  syncctl dev up                                  # nodes on 7001-7003, metrics on 9001-9003
  syncctl dev up --nodes 5 --base-port 8000       # nodes on 8001-8005, metrics on 10001-10005
  syncctl dev up --data-dir /tmp/syncd-dev --syncd target/release/syncd")]
    Up(DevUpArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DevUpArgs {
    /// How many nodes to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub nodes: u16,

    /// Node i listens on base-port + i (gRPC) and base-port + 2000 + i (metrics).
    #[arg(long, default_value_t = 7000, value_parser = clap::value_parser!(u16).range(1..))]
    pub base_port: u16,

    /// Where the nodes keep their data and logs: DATA_DIR/i for node i. Kept across runs.
    #[arg(long, default_value = ".syncd-dev")]
    pub data_dir: PathBuf,

    /// The syncd binary to run (default: next to syncctl, then on PATH).
    #[arg(long, env = "SYNCD_BIN")]
    pub syncd: Option<PathBuf>,

    /// How long to wait for the nodes to elect a leader before giving up.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    pub leader_timeout: Duration,

    /// How long the nodes get to stop after SIGTERM before they are killed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
}

impl DevUpArgs {
    /// The gRPC and metrics ports of node `id` (1-based).
    pub fn ports(&self, id: u16) -> (u16, u16) {
        (
            self.base_port + id,
            self.base_port + METRICS_PORT_OFFSET + id,
        )
    }
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Closed-loop Kv.Put load on the leader: N clients, each waiting for its answer before
    /// sending the next put, every put a new key.
    ///
    /// Each client keeps one request in flight; the latency of a put is the time from sending it
    /// to receiving its answer, i.e. until it is committed through Raft and fsynced on a
    /// majority. With --compare-etcd the same workload then runs against etcd's KV.Put.
    #[command(after_help = "\
Examples:
  syncctl bench raw --clients 64 --duration 10s
  syncctl bench raw --clients 1 --duration 10s --output json
  syncctl bench raw --clients 64 --duration 10s --compare-etcd http://127.0.0.1:2379")]
    Raw(BenchRawArgs),

    /// Closed-loop lock load on the leader: N clients, each with its own session, looping
    /// Acquire (exclusive) then Release.
    ///
    /// Uncontended (the default), each client has a lock of its own and an operation is one
    /// Acquire plus one Release, timed together. With --contended every client loops on ONE
    /// lock: an operation is a hand-off (the client waits in the lock's FIFO queue, is granted
    /// the lock, releases it), throughput is hand-offs per second and the latency is the wait
    /// for the grant. Sessions are created before the clock starts, with a TTL that outlives the
    /// run. With --compare-etcd the same workload then runs against etcd's lock API
    /// (v3lockpb.Lock/Lock with one lease per client, then Lock/Unlock), and the ratios are
    /// printed.
    #[command(after_help = "\
Examples:
  syncctl bench locks --clients 16 --duration 10s
  syncctl bench locks --clients 16 --duration 10s --contended
  syncctl bench locks --clients 1 --duration 10s --output json
  syncctl bench locks --clients 64 --duration 10s --compare-etcd http://127.0.0.1:2379")]
    Locks(BenchLocksArgs),

    /// Closed-loop queue load: publish, batched publish, or publish -> consume -> ack.
    ///
    /// --mode publish: each client publishes one message per call (to the leader).
    /// --mode publish-batch: each client publishes --batch messages per PublishBatch.
    /// --mode end-to-end (default): each client publishes a batch, consumes that many messages
    /// from its topic's owner (long poll) and acknowledges each; the latency of a message is from
    /// the start of its publish to its arrival at a consumer. Throughput is in messages per
    /// second. Topics are spread over the nodes so their owners share the load. After the run
    /// the bench checks that nothing is lost (publish modes: every acknowledged publish is in
    /// the topic; end-to-end: every topic is empty) and deletes its topics. With --compare-redis
    /// the same workload then runs against Redis Streams (XADD, XREADGROUP, XACK).
    #[command(after_help = "\
Examples:
  syncctl bench queue --clients 16 --duration 10s
  syncctl bench queue --mode publish-batch --batch 32 --clients 64 --duration 10s
  syncctl bench queue --clients 1 --duration 10s --compare-redis redis://127.0.0.1:6379 --output json")]
    Queue(BenchQueueArgs),

    /// Closed-loop cache load: hits, misses, or writes that invalidate 0, 1 or 2 sharers.
    ///
    /// --mode hit (default): keys are written and read beforehand on the node each client
    /// talks to (clients spread over all nodes); every timed Get is answered from the node's
    /// own line. --mode miss: before each timed Get, the key is written through another node
    /// (untimed), which invalidates this node's line. --mode write --sharers S: before each
    /// timed Set, S other nodes read the key (untimed), so the Set must invalidate S copies; a
    /// plain replicated write (Kv.Put, as bench raw) runs in the same invocation for reference.
    /// The response's hit flag is checked and the hit ratio reported. With --compare-redis the
    /// same value size runs against Redis GET (hit, miss) or SET (write).
    #[command(after_help = "\
Examples:
  syncctl bench cache --clients 16 --duration 10s
  syncctl bench cache --mode miss --clients 16 --duration 10s
  syncctl bench cache --mode write --sharers 2 --clients 16 --duration 10s
  syncctl bench cache --clients 64 --duration 10s --compare-redis redis://127.0.0.1:6379")]
    Cache(BenchCacheArgs),
}

/// The flags every closed-loop benchmark shares.
#[derive(Args, Debug, Clone)]
pub struct BenchLoadArgs {
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub clients: u32,

    /// How long to measure (after the warm-up).
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub duration: Duration,

    /// Untimed load before measuring, so connections and the servers' caches are warm.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// HTTP/2 connections the clients share (client i uses connection i mod N).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub connections: u32,

    /// Also run the workload against this etcd cluster (comma-separated URLs) and compare.
    #[arg(long, value_name = "ENDPOINTS", value_delimiter = ',', value_parser = parse_endpoint)]
    pub compare_etcd: Option<Vec<Endpoint>>,

    /// Also run the workload against this Redis server (redis://HOST:PORT) and compare
    /// (bench queue: Redis Streams; bench cache: GET/SET).
    #[arg(long, value_name = "URL", value_parser = parse_redis_url, conflicts_with = "compare_etcd")]
    pub compare_redis: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchRawArgs {
    #[command(flatten)]
    pub load: BenchLoadArgs,

    /// Bytes per value (syncd accepts at most 1 MiB).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=1_048_576))]
    pub value_size: u32,
}

#[derive(Args, Debug, Clone)]
pub struct BenchLocksArgs {
    #[command(flatten)]
    pub load: BenchLoadArgs,

    /// All clients take turns on one lock (hand-offs) instead of each using its own.
    #[arg(long)]
    pub contended: bool,
}

/// What one `bench queue` operation is.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueMode {
    /// One message per Publish.
    Publish,
    /// --batch messages per PublishBatch.
    PublishBatch,
    /// Publish a batch, consume it, acknowledge it.
    EndToEnd,
}

#[derive(Args, Debug, Clone)]
pub struct BenchQueueArgs {
    #[command(flatten)]
    pub load: BenchLoadArgs,

    /// What an operation is.
    #[arg(long, value_enum, default_value = "end-to-end")]
    pub mode: QueueMode,

    /// Messages per batch (publish-batch, end-to-end; a consume takes at most 100).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub batch: u32,

    /// Bytes per message payload.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub payload_bytes: u32,

    /// Topics (streams) the clients share, client i using topic i mod K; 0 means one per
    /// client.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub topics: u32,
}

/// What one `bench cache` operation is.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// A Get answered from the node's own valid line.
    Hit,
    /// A Get of a key another node has just written.
    Miss,
    /// A Set of a key --sharers other nodes hold.
    Write,
}

#[derive(Args, Debug, Clone)]
pub struct BenchCacheArgs {
    #[command(flatten)]
    pub load: BenchLoadArgs,

    /// What an operation is.
    #[arg(long, value_enum, default_value = "hit")]
    pub mode: CacheMode,

    /// With --mode write: how many other nodes hold the key before each write.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=16))]
    pub sharers: u32,

    /// Bytes per value.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=1_048_576))]
    pub value_size: u32,

    /// Keys each client cycles through.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub keys_per_client: u32,
}

impl Cli {
    /// Checks that span several flags; clap checks each flag alone.
    pub fn validate(&self) -> Result<(), clap::Error> {
        let usage = |message: String| {
            Err(Cli::command().error(clap::error::ErrorKind::ArgumentConflict, message))
        };
        let g = &self.global;
        match (&g.cert, &g.key) {
            (Some(_), None) => return usage("--cert needs --cert-key (its private key)".into()),
            (None, Some(_)) => return usage("--cert-key needs --cert (its certificate)".into()),
            (Some(_), Some(_)) if g.cacert.is_none() => {
                return usage(
                    "--cert and --cert-key need --cacert (the CA that signed the cluster's \
                     certificates)"
                        .into(),
                );
            }
            _ => {}
        }
        if let Some(e) = g.endpoints.iter().find(|e| e.https)
            && g.cacert.is_none()
        {
            return usage(format!(
                "--endpoints {e}: https:// needs --cacert (the CA that signed the cluster's \
                 certificates)"
            ));
        }
        if let Command::Dev(DevCommand::Up(up)) = &self.command {
            let highest =
                u32::from(up.base_port) + u32::from(METRICS_PORT_OFFSET) + u32::from(up.nodes);
            if highest > u32::from(u16::MAX) {
                return Err(Cli::command().error(
                    clap::error::ErrorKind::ValueValidation,
                    format!(
                        "--base-port {} with --nodes {} needs port {highest} for metrics; \
                         use a base port of at most {}",
                        up.base_port,
                        up.nodes,
                        u16::MAX - METRICS_PORT_OFFSET - up.nodes
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A server address: `host:port`, optionally written as `http://host:port` or
/// `https://host:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `host:port`, without scheme: how the endpoint is shown.
    authority: String,
    /// Written as `https://`: only valid with --cacert (TLS itself is turned on by --cacert).
    pub https: bool,
}

impl Endpoint {
    /// The URI tonic connects to without TLS settings.
    pub fn uri(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.authority)
    }
}

/// Parses `host:port`, `http://host:port` or `https://host:port` (a trailing `/` is allowed).
pub fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    let trimmed = text.trim();
    let https = trimmed.starts_with("https://");
    let authority = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .unwrap_or(trimmed);
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let bad = || format!("`{trimmed}` is not host:port (e.g. 127.0.0.1:7001)");
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains('/') || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(Endpoint {
        authority: authority.to_owned(),
        https,
    })
}

/// Checks `redis://HOST:PORT` (a trailing `/` or `/DB` is allowed) and keeps it as written.
fn parse_redis_url(text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    let bad = || format!("`{trimmed}` is not redis://HOST:PORT (e.g. redis://127.0.0.1:6379)");
    let rest = trimmed.strip_prefix("redis://").ok_or_else(bad)?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains('@') || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(trimmed.to_owned())
}

/// Parses a duration such as `500ms` or `10s` that must be longer than zero.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(duration)
}

#[derive(Subcommand, Debug)]
pub enum MemberCommand {
    /// Add a node as a learner: it receives the log but does not vote until promoted.
    ///
    /// The node must already run at ADDRESS, started to join (`syncd --initial-cluster-state
    /// existing`). Returns once the new configuration is committed; adding a member that is
    /// already there with the same address changes nothing.
    #[command(after_help = "\
Examples:
  syncctl member add 4 10.0.0.8:7001
  syncctl member add 4 10.0.0.8:7001 --output json")]
    Add(MemberAddArgs),

    /// Turn a learner into a voter, once it has caught up with the leader's log.
    #[command(after_help = "\
Examples:
  syncctl member promote 4")]
    Promote(MemberIdArg),

    /// Remove a member (voter or learner). A removed leader hands over leadership first.
    #[command(after_help = "\
Examples:
  syncctl member remove 2
  syncctl member remove 4 --output json")]
    Remove(MemberIdArg),
}

#[derive(Args, Debug, Clone)]
pub struct MemberAddArgs {
    /// The new member's node id (never 0, never the id of a current or former member).
    #[arg(value_parser = clap::value_parser!(u64).range(1..))]
    pub id: u64,

    /// The gRPC address at which the members and clients reach it.
    #[arg(value_parser = parse_endpoint)]
    pub address: Endpoint,
}

#[derive(Args, Debug, Clone)]
pub struct MemberIdArg {
    /// The member's node id.
    #[arg(value_parser = clap::value_parser!(u64).range(1..))]
    pub id: u64,
}

#[derive(Subcommand, Debug)]
pub enum LeaderCommand {
    /// Hand leadership to voter --to, or to the most caught-up reachable voter; returns once the
    /// new leader leads.
    #[command(after_help = "\
Examples:
  syncctl leader transfer --to 2
  syncctl leader transfer --output json")]
    Transfer(LeaderTransferArgs),
}

#[derive(Args, Debug, Clone)]
pub struct LeaderTransferArgs {
    /// The voter that should lead (default: the leader picks the most caught-up one).
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub to: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub node: NodeArg,
}

/// The node a node-local call goes to.
#[derive(Args, Debug, Clone)]
pub struct NodeArg {
    /// Send the call to the member with this node id (default: the leader, or any member).
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub node: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Read a key through a node's cache: value, version, HIT or MISS, MESI state, TTL left.
    #[command(after_help = "\
Examples:
  syncctl cache get k1
  syncctl cache get k1 --node 2 --output json")]
    Get(CacheKeyArgs),

    /// Write a key through a node (every other copy is invalidated first), or with
    /// --if-version only if the key is still at that version (exit code 3 if not).
    #[command(after_help = "\
Examples:
  syncctl cache set k1 v1
  syncctl cache set k1 v1 --node 1 --ttl 30s
  syncctl cache set k1 v2 --if-version 7          # exit 3 if k1 is not at version 7
  syncctl cache set k1 --if-version 0 < value.bin  # only if k1 does not exist")]
    Set(CacheSetArgs),

    /// Delete a key: every node's copy is invalidated.
    #[command(after_help = "\
Examples:
  syncctl cache del k1
  syncctl cache del k1 --output json")]
    Del(CacheKeyArgs),

    /// Show a key's coherence state: the node's line (MESI state, version, lease left, and
    /// whether it is dirty: written there and not yet in memory, write-back mode only) and the
    /// directory's holders.
    #[command(after_help = "\
Examples:
  syncctl cache state k1 --node 2
  syncctl cache state k1 --output json")]
    State(CacheKeyArgs),

    /// Show a node's cache counters: hits, misses, invalidations, write-backs, evictions, bytes.
    #[command(after_help = "\
Examples:
  syncctl cache stats --node 1
  syncctl cache stats --output json")]
    Stats(NodeArg),
}

#[derive(Args, Debug, Clone)]
pub struct CacheKeyArgs {
    /// The key (UTF-8, 1 to 1024 bytes).
    pub key: String,

    #[command(flatten)]
    pub node: NodeArg,
}

#[derive(Args, Debug, Clone)]
pub struct CacheSetArgs {
    /// The key (UTF-8, 1 to 1024 bytes).
    pub key: String,

    /// The value (default: --file, or stdin).
    #[arg(conflicts_with = "file")]
    pub value: Option<String>,

    /// Read the value from this file.
    #[arg(long, value_name = "F")]
    pub file: Option<PathBuf>,

    /// The key expires this long after the write (default: never).
    #[arg(long, value_parser = parse_positive_duration)]
    pub ttl: Option<Duration>,

    /// Write only if the key is at this version (0: only if it does not exist); exit code 3
    /// otherwise.
    #[arg(long, value_name = "N")]
    pub if_version: Option<u64>,

    #[command(flatten)]
    pub node: NodeArg,
}

#[derive(Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: ShellArg,
}

/// The shells `completions` writes scripts for.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

impl From<ShellArg> for clap_complete::Shell {
    fn from(s: ShellArg) -> Self {
        match s {
            ShellArg::Bash => clap_complete::Shell::Bash,
            ShellArg::Zsh => clap_complete::Shell::Zsh,
            ShellArg::Fish => clap_complete::Shell::Fish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("syncctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_name_the_dev_cluster() {
        // SYNC_ENDPOINTS would override the default; the test must not depend on the caller's
        // environment, so it passes the flag's default explicitly only when the variable is set.
        let cli = parse(&["status"]).unwrap();
        if std::env::var_os("SYNC_ENDPOINTS").is_none() {
            let endpoints: Vec<_> = cli.global.endpoints.iter().map(|e| e.to_string()).collect();
            assert_eq!(
                endpoints,
                ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
            );
        }
        assert_eq!(cli.global.output, Output::Table);
        assert_eq!(cli.global.timeout, Duration::from_secs(5));
        assert!(matches!(cli.command, Command::Status));
    }

    #[test]
    fn global_flags_are_accepted_after_the_subcommand() {
        let cli = parse(&[
            "status",
            "--endpoints",
            "http://10.0.0.1:7001,10.0.0.2:7001/",
            "--output",
            "json",
            "--timeout",
            "250ms",
        ])
        .unwrap();
        let endpoints: Vec<_> = cli.global.endpoints.iter().map(|e| e.uri()).collect();
        assert_eq!(endpoints, ["http://10.0.0.1:7001", "http://10.0.0.2:7001"]);
        assert_eq!(cli.global.output, Output::Json);
        assert_eq!(cli.global.timeout, Duration::from_millis(250));
    }

    #[test]
    fn malformed_endpoints_are_usage_errors() {
        for bad in [
            "localhost",
            ":7001",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:99999",
        ] {
            let err = parse(&["status", "--endpoints", bad]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn tls_flags_are_checked_against_each_other() {
        let check = |args: &[&str]| parse(args).unwrap().validate();
        let err = check(&["status", "--endpoints", "https://h:1"]).unwrap_err();
        assert!(err.to_string().contains("needs --cacert"), "{err}");
        assert_eq!(err.exit_code(), 2);
        let cli = parse(&[
            "status",
            "--endpoints",
            "https://h:1/",
            "--cacert",
            "ca.pem",
        ])
        .unwrap();
        cli.validate().unwrap();
        assert_eq!(cli.global.endpoints[0].to_string(), "h:1");
        let err = check(&["status", "--cacert", "ca.pem", "--cert", "c.pem"]).unwrap_err();
        assert!(err.to_string().contains("--cert needs --cert-key"), "{err}");
        let err = check(&["status", "--cert", "c.pem", "--cert-key", "k.pem"]).unwrap_err();
        assert!(err.to_string().contains("need --cacert"), "{err}");
    }

    #[test]
    fn dev_up_defaults_and_port_plan() {
        let cli = parse(&["dev", "up"]).unwrap();
        let Command::Dev(DevCommand::Up(up)) = &cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(up.nodes, 3);
        assert_eq!(up.data_dir, PathBuf::from(".syncd-dev"));
        assert_eq!(up.ports(1), (7001, 9001));
        assert_eq!(up.ports(3), (7003, 9003));
        cli.validate().unwrap();
    }

    #[test]
    fn dev_up_rejects_ports_past_65535() {
        let cli = parse(&["dev", "up", "--base-port", "63600", "--nodes", "3"]).unwrap();
        let err = cli.validate().unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("65603"), "{err}");
        assert!(parse(&["dev", "up", "--nodes", "0"]).is_err());
    }

    #[test]
    fn bench_raw_flags() {
        let cli = parse(&[
            "bench",
            "raw",
            "--clients",
            "64",
            "--duration",
            "10s",
            "--value-size",
            "1024",
            "--compare-etcd",
            "http://127.0.0.1:23791,http://127.0.0.1:23792",
        ])
        .unwrap();
        let Command::Bench(BenchCommand::Raw(raw)) = &cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(raw.load.clients, 64);
        assert_eq!(raw.load.duration, Duration::from_secs(10));
        assert_eq!(raw.value_size, 1024);
        assert_eq!(raw.load.connections, 1);
        assert_eq!(raw.load.warmup, Duration::from_secs(1));
        let etcd: Vec<_> = raw
            .load
            .compare_etcd
            .iter()
            .flatten()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(etcd, ["127.0.0.1:23791", "127.0.0.1:23792"]);
    }

    #[test]
    fn bench_locks_flags() {
        let cli = parse(&["bench", "locks", "--clients", "16", "--contended"]).unwrap();
        let Command::Bench(BenchCommand::Locks(locks)) = &cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert!(locks.contended);
        assert_eq!(locks.load.clients, 16);
        assert_eq!(locks.load.duration, Duration::from_secs(10));
        assert!(locks.load.compare_etcd.is_none());
        let cli = parse(&["bench", "locks"]).unwrap();
        let Command::Bench(BenchCommand::Locks(locks)) = &cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert!(!locks.contended);
    }

    #[test]
    fn bench_queue_and_cache_flags() {
        let cli = parse(&[
            "bench",
            "queue",
            "--mode",
            "publish-batch",
            "--batch",
            "8",
            "--compare-redis",
            "redis://127.0.0.1:6390",
        ])
        .unwrap();
        let Command::Bench(BenchCommand::Queue(q)) = &cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(
            (q.mode, q.batch, q.payload_bytes, q.topics),
            (QueueMode::PublishBatch, 8, 256, 0)
        );
        assert_eq!(
            q.load.compare_redis.as_deref(),
            Some("redis://127.0.0.1:6390")
        );
        let cli = parse(&["bench", "cache", "--mode", "write", "--sharers", "2"]).unwrap();
        let Command::Bench(BenchCommand::Cache(c)) = &cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(
            (c.mode, c.sharers, c.value_size),
            (CacheMode::Write, 2, 256)
        );
        assert!(c.load.compare_redis.is_none());
    }

    #[test]
    fn bench_rejects_nonsense() {
        for args in [
            &["bench", "raw", "--clients", "0"][..],
            &["bench", "raw", "--duration", "0s"],
            &["bench", "raw", "--duration", "ten"],
            &["bench", "raw", "--value-size", "2000000"],
            &["bench", "locks", "--clients", "0"],
            &["bench", "locks", "--value-size", "10"],
            &["bench", "locks", "--compare-etcd", "not an endpoint"],
            &["bench", "queue", "--compare-redis", "127.0.0.1:6379"],
            &["bench", "queue", "--mode", "sideways"],
            &["bench", "queue", "--batch", "0"],
            &["bench", "queue", "--batch", "101"],
            &["bench", "cache", "--mode", "write", "--sharers", "17"],
            &["bench", "cache", "--compare-redis", "redis://:6379"],
            &[
                "bench",
                "cache",
                "--compare-redis",
                "redis://127.0.0.1:6379",
                "--compare-etcd",
                "127.0.0.1:2379",
            ],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn lock_acquire_takes_a_session_or_a_ttl_not_both() {
        let cli = parse(&["lock", "acquire", "db", "--session", "42", "--wait", "5s"]).unwrap();
        let Command::Lock(LockCommand::Acquire(a)) = &cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(
            (a.session, a.ttl, a.mode),
            (Some(42), None, ModeArg::Exclusive)
        );
        assert_eq!(a.wait, Duration::from_secs(5));
        let err = parse(&["lock", "acquire", "db", "--session", "42", "--ttl", "30s"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(parse(&["lock", "acquire", "db", "--mode", "both"]).is_err());
    }

    #[test]
    fn lock_run_takes_the_command_after_a_double_dash() {
        let cli = parse(&[
            "lock", "run", "job", "--mode", "shared", "--", "sh", "-c", "exit 3",
        ])
        .unwrap();
        let Command::Lock(LockCommand::Run(r)) = &cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(r.command, ["sh", "-c", "exit 3"]);
        assert_eq!(r.mode, ModeArg::Shared);
        assert_eq!(parse(&["lock", "run", "job"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn cache_set_takes_a_value_a_ttl_a_version_and_a_node() {
        let cli = parse(&[
            "cache",
            "set",
            "k1",
            "v1",
            "--ttl",
            "30s",
            "--if-version",
            "7",
            "--node",
            "2",
        ])
        .unwrap();
        let Command::Cache(CacheCommand::Set(set)) = &cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(set.value.as_deref(), Some("v1"));
        assert_eq!(set.ttl, Some(Duration::from_secs(30)));
        assert_eq!((set.if_version, set.node.node), (Some(7), Some(2)));
        // A value and --file at once is a usage error.
        let err = parse(&["cache", "set", "k1", "v1", "--file", "f"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn member_and_leader_commands_take_node_ids() {
        let cli = parse(&["member", "add", "4", "http://10.0.0.8:7001"]).unwrap();
        let Command::Member(MemberCommand::Add(add)) = &cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(
            (add.id, add.address.to_string()),
            (4, "10.0.0.8:7001".into())
        );
        let cli = parse(&["leader", "transfer"]).unwrap();
        let Command::Leader(LeaderCommand::Transfer(t)) = &cli.command else {
            panic!("parsed {:?}", cli.command);
        };
        assert_eq!(t.to, None);
        for args in [
            &["member", "promote", "0"][..],
            &["member", "remove"],
            &["leader", "transfer", "--to", "0"],
            &["snapshot", "--node", "-2"],
        ] {
            assert_eq!(parse(args).unwrap_err().exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn every_command_shows_an_example_in_its_help() {
        fn walk(cmd: &mut clap::Command, path: &str) {
            let help = cmd.render_long_help().to_string();
            assert!(help.contains("Examples:"), "`{path} --help` has no example");
            for sub in cmd.get_subcommands_mut() {
                if sub.get_name() != "help" {
                    let name = sub.get_name().to_owned();
                    walk(sub, &format!("{path} {name}"));
                }
            }
        }
        walk(&mut Cli::command(), "syncctl");
    }
}
