//! The node's settings: command-line flags, each also read from `SYNCD_<FLAG>` and from an
//! optional `--config syncd.toml` (flags win over the environment, which wins over the file),
//! checked into [`Settings`] with one clear error per problem.
//!
//! A data directory remembers which node and which cluster it belongs to (`syncd.meta`), so a
//! restarted node takes its identity from it and a directory can never be used by another node
//! or another cluster by mistake.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sync_proto::raft::v1 as pb;

use super::tls::{NodeTls, TlsFlags};

/// Whether the node founds a cluster or joins one that runs already.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    /// A founding member: the initial cluster is the first configuration.
    New,
    /// Joins an existing cluster: it learns the configuration from the leader once an operator
    /// adds it with `Cluster.AddMember`.
    Existing,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The flags, as given (every one optional here so the config file can fill the gaps).
#[derive(clap::Parser, Debug, Default, Deserialize)]
#[command(
    name = "syncd",
    version,
    about = "A syncd node: Raft-replicated locks, queues and a coherent cache over gRPC.",
    after_help = "Example (a 3-node cluster on one machine, node 1):\n  syncd --id 1 --listen 127.0.0.1:7001 \\\n    --initial-cluster 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 \\\n    --data-dir ./data/1 --metrics-listen 127.0.0.1:9001\n\nEvery flag can also be set as SYNCD_<FLAG> (e.g. SYNCD_DATA_DIR) or in the --config file."
)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Flags {
    /// This node's id (a positive integer, unique in the cluster for all time).
    #[arg(long, env = "SYNCD_ID")]
    pub id: Option<u64>,
    /// Address to serve gRPC on (peers and clients), e.g. 127.0.0.1:7001.
    #[arg(long, env = "SYNCD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address that peers and clients should use to reach this node (default: --listen).
    #[arg(long, env = "SYNCD_ADVERTISE")]
    pub advertise: Option<String>,
    /// The founding members: id=host:port,... (must include this node when founding).
    #[arg(long, env = "SYNCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// `new` to found the cluster, `existing` to join a running one.
    #[arg(long, env = "SYNCD_INITIAL_CLUSTER_STATE", value_enum)]
    pub initial_cluster_state: Option<ClusterState>,
    /// Directory for the log, snapshots and the node's identity.
    #[arg(long, env = "SYNCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to serve Prometheus metrics and /healthz on (HTTP), e.g. 127.0.0.1:9001.
    #[arg(long, env = "SYNCD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Leader heartbeat interval (one Raft tick), e.g. 100ms.
    #[arg(long, env = "SYNCD_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub heartbeat_interval: Option<Duration>,
    /// Election timeout (a follower waits a random time between this and twice this), e.g. 1s.
    #[arg(long, env = "SYNCD_ELECTION_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub election_timeout: Option<Duration>,
    /// The failure detector suspects a peer it has not heard from for this long (default: the
    /// election timeout). Shown in Cluster.Status and the syncd_peer_reachable metric.
    #[arg(long, env = "SYNCD_PEER_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub peer_timeout: Option<Duration>,
    /// Take a snapshot and compact the log after this many applied entries, once at least as
    /// many bytes of entries as the last snapshot holds were applied too.
    #[arg(long, env = "SYNCD_SNAPSHOT_THRESHOLD")]
    pub snapshot_threshold: Option<u64>,
    /// Whether Publish, Consume and Subscribe create a missing topic with default settings
    /// (`true`, the default) or answer NOT_FOUND (`false`: topics only by CreateTopic). The
    /// leader's setting decides, since the leader proposes every publish and delivery: give
    /// every node the same value.
    #[arg(long, env = "SYNCD_QUEUE_AUTO_CREATE", value_name = "BOOL", action = clap::ArgAction::Set)]
    pub queue_auto_create: Option<bool>,
    /// Cache lease length L (default 5s): a node cut off from the cache directory stops serving
    /// hits this long after its last answered renewal, and a write waits at most about this
    /// long for a holder it cannot reach.
    #[arg(long, env = "SYNCD_CACHE_LEASE", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub cache_lease: Option<Duration>,
    /// Margin the cache directory adds to every lease for clock-rate drift (default: a
    /// twentieth of the lease, which tolerates clocks that differ in rate by up to 2.4%).
    #[arg(long, env = "SYNCD_CACHE_DRIFT_MARGIN", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub cache_drift_margin: Option<Duration>,
    /// Bytes of keys and values this node's cache holds before evicting (default 64 MiB).
    #[arg(long, env = "SYNCD_CACHE_CAPACITY_BYTES")]
    pub cache_capacity_bytes: Option<u64>,
    /// Largest cache value accepted, in bytes (default 1 MiB).
    #[arg(long, env = "SYNCD_CACHE_MAX_VALUE_BYTES")]
    pub cache_max_value_bytes: Option<u64>,
    /// The cache's memory: `raft` (default: the replicated state machine) or
    /// redis://HOST:PORT[/DB] (Redis is main memory, the nodes coherent caches in front of it).
    /// Every node of a cluster must name the same.
    #[arg(long, env = "SYNCD_CACHE_BACKEND")]
    pub cache_backend: Option<String>,
    /// How the cache writes: `write-through` (default: a Set returns once memory holds the
    /// value) or `write-back` (a Set without TTL or request header on a node holding the key
    /// Exclusive or Modified is answered by that node and written to memory within
    /// --cache-flush-interval; such writes are lost if the node crashes first). The leader's
    /// directory decides whether exclusive lines may be written locally, so every node of a
    /// cluster must name the same.
    #[arg(long, env = "SYNCD_CACHE_WRITE_MODE", value_name = "MODE")]
    pub cache_write_mode: Option<String>,
    /// Write-back mode: the longest a locally written value waits before the node writes it
    /// back to memory (default 200ms; at least 2ms). A key's line dirty this long takes no more
    /// local writes until it is written back, so a crash loses at most this much of a key's
    /// writes.
    #[arg(long, env = "SYNCD_CACHE_FLUSH_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub cache_flush_interval: Option<Duration>,
    /// Serve gRPC over TLS with this certificate (PEM; the chain, leaf first). Peers are then
    /// reached over TLS too. Needs --key-file and --trusted-ca-file.
    #[arg(long, env = "SYNCD_CERT_FILE", value_name = "PATH")]
    pub cert_file: Option<PathBuf>,
    /// The private key of --cert-file (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "SYNCD_KEY_FILE", value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) that peers' certificates, and with --client-cert-auth clients'
    /// certificates, must chain to.
    #[arg(long, env = "SYNCD_TRUSTED_CA_FILE", value_name = "PATH")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Refuse callers (clients and peers) without a certificate signed by --trusted-ca-file.
    #[arg(
        long,
        env = "SYNCD_CLIENT_CERT_AUTH",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub client_cert_auth: Option<bool>,
    /// Log format: text or json.
    #[arg(long, env = "SYNCD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log level or filter, e.g. info or syncd=debug.
    #[arg(long, env = "SYNCD_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// A TOML file with any of these settings (kebab-case keys).
    #[arg(long, env = "SYNCD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

/// Deserializes optional durations written as "100ms" in the config file.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Checked settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's id.
    pub id: u64,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Address advertised to peers and clients.
    pub advertise: String,
    /// The configuration at index 0 (founding members; empty when joining).
    pub initial: pb::ClusterConfig,
    /// Founding or joining.
    pub cluster_state: ClusterState,
    /// The cluster's identity (derived from the founding member ids).
    pub cluster_id: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Metrics listen address, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// One Raft tick.
    pub heartbeat_interval: Duration,
    /// Election timeout.
    pub election_timeout: Duration,
    /// The failure detector's threshold.
    pub peer_timeout: Duration,
    /// Entries between snapshots.
    pub snapshot_threshold: u64,
    /// Publish, Consume and Subscribe create a missing topic (`--queue-auto-create`).
    pub queue_auto_create: bool,
    /// The cache's settings.
    pub cache: crate::cache::CacheConfig,
    /// Where the cache's memory lives.
    pub cache_backend: CacheBackend,
    /// TLS on the gRPC port and towards peers (`None`: plaintext).
    pub tls: Option<NodeTls>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
}

impl Settings {
    /// Ticks in an election timeout.
    pub fn election_ticks(&self) -> u32 {
        let ticks = self.election_timeout.as_micros() / self.heartbeat_interval.as_micros().max(1);
        ticks.clamp(2, 10_000) as u32
    }
}

/// Where the cache's memory lives (`--cache-backend`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheBackend {
    /// The replicated state machine.
    Raft,
    /// Redis at this `redis://HOST:PORT[/DB]` URL.
    Redis(String),
}

impl CacheBackend {
    /// Parses `raft` or a Redis URL. Redis keys are prefixed with the cluster id so that
    /// clusters can share a Redis, so a node that does not know its cluster id (one that joined
    /// with `--initial-cluster-state existing`) cannot use Redis: it would read and write
    /// another cluster's keys, and no longer be coherent with its own.
    fn parse(value: Option<&str>, cluster_id: &str) -> Result<CacheBackend, ConfigError> {
        match value.map(str::trim) {
            None | Some("raft") => Ok(CacheBackend::Raft),
            Some(url) => {
                crate::node::cache::redis_memory::check_url(url)
                    .map_err(|e| ConfigError(e.to_string()))?;
                if cluster_id.is_empty() {
                    return err(
                        "--cache-backend redis needs the cluster id, which a node that joined \
                         with --initial-cluster-state existing does not know; use \
                         --cache-backend raft on it",
                    );
                }
                Ok(CacheBackend::Redis(url.to_string()))
            }
        }
    }
}

/// A configuration problem, said in one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_initial_cluster(s: &str) -> Result<pb::ClusterConfig, ConfigError> {
    let mut members = Vec::new();
    let mut ids = BTreeSet::new();
    let mut addrs = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((id, addr)) = part.split_once('=') else {
            return err(format!(
                "--initial-cluster entry {part:?} is not id=host:port"
            ));
        };
        let id: u64 = match id.trim().parse() {
            Ok(id) if id > 0 => id,
            _ => {
                return err(format!(
                    "--initial-cluster entry {part:?}: the id must be a positive integer"
                ));
            }
        };
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return err(format!(
                "--initial-cluster entry {part:?}: the address must be host:port"
            ));
        }
        if !ids.insert(id) {
            return err(format!("--initial-cluster names node {id} twice"));
        }
        if !addrs.insert(addr.to_string()) {
            return err(format!(
                "--initial-cluster gives address {addr} to two nodes"
            ));
        }
        members.push(pb::Member {
            id,
            address: addr.to_string(),
            learner: false,
        });
    }
    if members.is_empty() {
        return err("--initial-cluster is empty");
    }
    members.sort_by_key(|m| m.id);
    Ok(pb::ClusterConfig { members })
}

/// The cluster identity: a digest of the founding member ids (addresses may differ per node and
/// may change).
pub fn cluster_id(initial: &pb::ClusterConfig) -> String {
    let ids: Vec<String> = initial.members.iter().map(|m| m.id.to_string()).collect();
    let digest = crc32fast::hash(format!("syncd-cluster-v1:{}", ids.join(",")).as_bytes());
    format!("{digest:08x}")
}

/// What a data directory remembers about its owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDirMeta {
    /// The node that owns it.
    pub node_id: u64,
    /// The cluster it belongs to ("" for a node that joined an existing cluster).
    pub cluster_id: String,
    /// The founding members as this node first saw them: `id=address` pairs.
    pub initial_cluster: String,
}

const META_FILE: &str = "syncd.meta";

/// Reads a data directory's identity, if it has one.
pub fn read_meta(dir: &Path) -> Result<Option<DataDirMeta>, ConfigError> {
    let path = dir.join(META_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .map(Some)
            .map_err(|e| ConfigError(format!("{} is unreadable: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes a data directory's identity (atomically: temp file, fsync, rename).
pub fn write_meta(dir: &Path, meta: &DataDirMeta) -> Result<(), ConfigError> {
    let text = toml::to_string(meta).map_err(|e| ConfigError(e.to_string()))?;
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(META_FILE))?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| ConfigError(format!("cannot write identity to {}: {e}", dir.display())))
}

fn render_cluster(c: &pb::ClusterConfig) -> String {
    c.members
        .iter()
        .map(|m| format!("{}={}", m.id, m.address))
        .collect::<Vec<_>>()
        .join(",")
}

impl Flags {
    /// Fills every unset flag from the `--config` file, if one was given.
    pub fn merge_config_file(mut self) -> Result<Flags, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError(format!("cannot read --config {}: {e}", path.display())))?;
        let file: Flags = toml::from_str(&text)
            .map_err(|e| ConfigError(format!("--config {}: {e}", path.display())))?;
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* };
        }
        fill!(
            id,
            listen,
            advertise,
            initial_cluster,
            initial_cluster_state,
            data_dir,
            metrics_listen,
            heartbeat_interval,
            election_timeout,
            peer_timeout,
            snapshot_threshold,
            queue_auto_create,
            cache_lease,
            cache_drift_margin,
            cache_capacity_bytes,
            cache_max_value_bytes,
            cache_backend,
            cache_write_mode,
            cache_flush_interval,
            cert_file,
            key_file,
            trusted_ca_file,
            client_cert_auth,
            log_format,
            log_level
        );
        Ok(self)
    }

    /// The cache's settings from the `--cache-*` flags. Renewals go five times per lease, so
    /// one or two lost renewals do not end it.
    fn cache_config(&self) -> Result<crate::cache::CacheConfig, ConfigError> {
        let defaults = crate::cache::CacheConfig::default();
        let lease_ms = self
            .cache_lease
            .map_or(defaults.lease_ms, |d| d.as_millis() as u64);
        let cfg = crate::cache::CacheConfig {
            lease_ms,
            drift_margin_ms: self
                .cache_drift_margin
                .map_or(lease_ms / 20, |d| d.as_millis() as u64),
            renew_every_ms: (lease_ms / 5).max(1),
            capacity_bytes: self.cache_capacity_bytes.unwrap_or(defaults.capacity_bytes),
            max_value_bytes: self
                .cache_max_value_bytes
                .unwrap_or(defaults.max_value_bytes),
            write_back: self.cache_write_back()?,
            ..defaults
        };
        cfg.validate()
            .map_err(|e| ConfigError(format!("cache settings (--cache-*): {e}")))?;
        Ok(cfg)
    }

    /// Write-back mode's settings from `--cache-write-mode` and `--cache-flush-interval`
    /// (`None`: write-through). The flush interval is checked even in write-through mode, so a
    /// mistake in it shows at once rather than when the mode is switched.
    fn cache_write_back(&self) -> Result<Option<crate::cache::WriteBackConfig>, ConfigError> {
        use crate::cache::WriteBackConfig;
        let flush_ms = match self.cache_flush_interval {
            None => WriteBackConfig::DEFAULT_FLUSH_MS,
            Some(d) if d < Duration::from_millis(2) => {
                return err(format!(
                    "--cache-flush-interval must be at least 2ms, not {}",
                    humantime::format_duration(d)
                ));
            }
            Some(d) => d.as_millis() as u64,
        };
        match self.cache_write_mode.as_deref() {
            None | Some("write-through") => Ok(None),
            Some("write-back") => Ok(Some(WriteBackConfig {
                flush_ms,
                block: WriteBackConfig::DEFAULT_BLOCK,
            })),
            Some(other) => err(format!(
                "--cache-write-mode must be write-through or write-back, not {other:?}"
            )),
        }
    }

    /// Checks the flags against each other and against the data directory, creating the
    /// directory and recording its identity on first start.
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let Some(data_dir) = self.data_dir.clone() else {
            return err("--data-dir is required (where the log and snapshots live)");
        };
        std::fs::create_dir_all(&data_dir).map_err(|e| {
            ConfigError(format!(
                "cannot create data dir {}: {e}",
                data_dir.display()
            ))
        })?;
        let probe = data_dir.join(".syncd-write-probe");
        std::fs::write(&probe, b"")
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| {
                ConfigError(format!(
                    "data dir {} is not writable: {e}",
                    data_dir.display()
                ))
            })?;
        let meta = read_meta(&data_dir)?;
        let flag_cluster = self
            .initial_cluster
            .as_deref()
            .map(parse_initial_cluster)
            .transpose()?;
        let state = self.initial_cluster_state.unwrap_or(ClusterState::New);

        let id = match (self.id, &meta) {
            (Some(id), Some(m)) if id != m.node_id => {
                return err(format!(
                    "data dir {} belongs to node {}, not node {id}",
                    data_dir.display(),
                    m.node_id
                ));
            }
            (Some(0), _) => return err("--id must be a positive integer"),
            (Some(id), _) => id,
            (None, Some(m)) => m.node_id,
            (None, None) => return err("--id is required on first start"),
        };

        // The founding configuration: from the flag, checked against the data dir's record.
        let initial = match (&flag_cluster, &meta, state) {
            (_, _, ClusterState::Existing) => pb::ClusterConfig::default(),
            (Some(c), Some(m), _) if !m.cluster_id.is_empty() && cluster_id(c) != m.cluster_id => {
                return err(format!(
                    "data dir {} belongs to cluster {} ({}), but --initial-cluster describes \
                     cluster {} ({}); use another data dir or the original --initial-cluster",
                    data_dir.display(),
                    m.cluster_id,
                    m.initial_cluster,
                    cluster_id(c),
                    render_cluster(c)
                ));
            }
            (Some(c), _, _) => c.clone(),
            (None, Some(m), _) if !m.initial_cluster.is_empty() => {
                parse_initial_cluster(&m.initial_cluster)?
            }
            (None, _, _) => {
                return err("--initial-cluster is required on first start (id=host:port,...)");
            }
        };
        let joined_as_existing = meta.as_ref().is_some_and(|m| m.cluster_id.is_empty());
        let initial = if joined_as_existing {
            pb::ClusterConfig::default()
        } else {
            initial
        };
        if state == ClusterState::New
            && !joined_as_existing
            && initial.members.iter().all(|m| m.id != id)
        {
            return err(format!(
                "node {id} is not in --initial-cluster ({}); add it, or start with \
                 --initial-cluster-state existing to join a running cluster",
                render_cluster(&initial)
            ));
        }
        let listen = match (self.listen, initial.members.iter().find(|m| m.id == id)) {
            (Some(l), _) => l,
            (None, Some(m)) => m.address.parse().map_err(|_| {
                ConfigError(format!(
                    "--listen is required: the initial cluster address {} of node {id} is not \
                     an IP:port",
                    m.address
                ))
            })?,
            (None, None) => return err("--listen is required (e.g. 127.0.0.1:7001)"),
        };
        let advertise = self.advertise.clone().unwrap_or_else(|| {
            initial
                .members
                .iter()
                .find(|m| m.id == id)
                .map(|m| m.address.clone())
                .unwrap_or_else(|| listen.to_string())
        });
        let heartbeat_interval = self
            .heartbeat_interval
            .unwrap_or(Duration::from_millis(100));
        let election_timeout = self.election_timeout.unwrap_or(Duration::from_secs(1));
        if heartbeat_interval.is_zero() {
            return err("--heartbeat-interval must be greater than 0");
        }
        if election_timeout < heartbeat_interval * 2 {
            return err(format!(
                "--election-timeout ({}) must be at least twice --heartbeat-interval ({})",
                humantime::format_duration(election_timeout),
                humantime::format_duration(heartbeat_interval)
            ));
        }
        let peer_timeout = self.peer_timeout.unwrap_or(election_timeout);
        if peer_timeout < heartbeat_interval {
            return err("--peer-timeout must be at least --heartbeat-interval");
        }
        let snapshot_threshold = self.snapshot_threshold.unwrap_or(10_000);
        if snapshot_threshold == 0 {
            return err("--snapshot-threshold must be at least 1");
        }
        if let Some(m) = self.metrics_listen
            && m == listen
        {
            return err("--metrics-listen must differ from --listen");
        }
        let cache = self.cache_config()?;
        let tls = NodeTls::load(&TlsFlags {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            trusted_ca_file: self.trusted_ca_file.clone(),
            client_cert_auth: self.client_cert_auth.unwrap_or(false),
        })?;
        let cluster_id = if initial.members.is_empty() {
            String::new()
        } else {
            cluster_id(&initial)
        };
        let cache_backend = CacheBackend::parse(self.cache_backend.as_deref(), &cluster_id)?;
        if meta.is_none() {
            write_meta(
                &data_dir,
                &DataDirMeta {
                    node_id: id,
                    cluster_id: cluster_id.clone(),
                    initial_cluster: render_cluster(&initial),
                },
            )?;
        }
        Ok(Settings {
            id,
            listen,
            advertise,
            initial,
            cluster_state: state,
            cluster_id,
            data_dir,
            metrics_listen: self.metrics_listen,
            heartbeat_interval,
            election_timeout,
            peer_timeout,
            snapshot_threshold,
            queue_auto_create: self.queue_auto_create.unwrap_or(true),
            cache,
            cache_backend,
            tls,
            log_format: self.log_format.unwrap_or(LogFormat::Text),
            log_level: self.log_level.clone().unwrap_or_else(|| "info".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(dir: &Path, id: u64, cluster: &str) -> Flags {
        Flags {
            id: Some(id),
            initial_cluster: Some(cluster.into()),
            data_dir: Some(dir.to_path_buf()),
            ..Default::default()
        }
    }

    const CLUSTER: &str = "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003";

    #[test]
    fn a_founding_node_records_its_identity_and_a_restart_takes_it_from_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let s = flags(dir.path(), 2, CLUSTER).resolve().unwrap();
        assert_eq!(s.id, 2);
        assert_eq!(s.listen.to_string(), "127.0.0.1:7002");
        let restarted = Flags {
            data_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(restarted.id, 2);
        assert_eq!(restarted.cluster_id, s.cluster_id);
        assert_eq!(restarted.initial, s.initial);
    }

    #[test]
    fn bad_configurations_are_refused_with_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (flags(dir.path(), 4, CLUSTER), "not in --initial-cluster"),
            (
                flags(dir.path(), 1, "1=127.0.0.1:7001,2=127.0.0.1:7001"),
                "gives address 127.0.0.1:7001 to two nodes",
            ),
            (
                flags(dir.path(), 1, "1=127.0.0.1:7001,1=127.0.0.1:7002"),
                "names node 1 twice",
            ),
            (flags(dir.path(), 1, "1=nowhere"), "must be host:port"),
        ];
        for (f, expected) in cases {
            let e = f.resolve().unwrap_err().to_string();
            assert!(e.contains(expected), "{e:?} should mention {expected:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }

    #[test]
    fn cache_flags_set_the_lease_its_margin_and_renewals_and_a_lease_of_zero_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Flags {
            cache_lease: Some(Duration::from_secs(2)),
            cache_capacity_bytes: Some(1 << 20),
            ..flags(dir.path(), 1, CLUSTER)
        }
        .resolve()
        .unwrap();
        assert_eq!(
            (
                s.cache.lease_ms,
                s.cache.drift_margin_ms,
                s.cache.renew_every_ms
            ),
            (2_000, 100, 400)
        );
        assert_eq!(s.cache.capacity_bytes, 1 << 20);
        let e = Flags {
            cache_lease: Some(Duration::ZERO),
            ..flags(dir.path(), 1, CLUSTER)
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("--cache-"), "{e}");
    }

    #[test]
    fn the_cache_backend_is_raft_by_default_or_a_plain_redis_url() {
        let dir = tempfile::tempdir().unwrap();
        let backend = |value: Option<&str>| {
            Flags {
                cache_backend: value.map(String::from),
                ..flags(dir.path(), 1, CLUSTER)
            }
            .resolve()
            .map(|s| s.cache_backend)
        };
        assert_eq!(backend(None).unwrap(), CacheBackend::Raft);
        assert_eq!(backend(Some("raft")).unwrap(), CacheBackend::Raft);
        assert_eq!(
            backend(Some("redis://127.0.0.1:6390/1")).unwrap(),
            CacheBackend::Redis("redis://127.0.0.1:6390/1".into())
        );
        for bad in ["memcached://h:1", "redis://nowhere", "rediss://h:1"] {
            let e = backend(Some(bad)).unwrap_err().to_string();
            assert!(e.starts_with("--cache-backend"), "{bad}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn the_cache_writes_through_by_default_or_back_with_a_flush_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |mode: Option<&str>, flush: Option<Duration>| {
            Flags {
                cache_write_mode: mode.map(String::from),
                cache_flush_interval: flush,
                ..flags(dir.path(), 1, CLUSTER)
            }
            .resolve()
            .map(|s| s.cache.write_back)
        };
        assert_eq!(mode(None, None).unwrap(), None);
        assert_eq!(mode(Some("write-through"), None).unwrap(), None);
        assert_eq!(
            mode(Some("write-back"), None).unwrap(),
            Some(crate::cache::WriteBackConfig {
                flush_ms: 200,
                block: 1_024
            })
        );
        assert_eq!(
            mode(Some("write-back"), Some(Duration::from_millis(50)))
                .unwrap()
                .map(|w| w.flush_ms),
            Some(50)
        );
        let cases = [
            (Some("writeback"), None, "--cache-write-mode must be"),
            (Some("Write-Back"), None, "--cache-write-mode must be"),
            (Some(""), None, "--cache-write-mode must be"),
            (
                Some("write-back"),
                Some(Duration::from_millis(1)),
                "--cache-flush-interval must be at least 2ms",
            ),
            (
                None,
                Some(Duration::ZERO),
                "--cache-flush-interval must be at least 2ms",
            ),
        ];
        for (m, flush, expected) in cases {
            let e = mode(m, flush).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{m:?} {flush:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn a_data_dir_of_another_node_or_cluster_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        flags(dir.path(), 1, CLUSTER).resolve().unwrap();
        let other_node = flags(dir.path(), 2, CLUSTER).resolve().unwrap_err();
        assert!(other_node.to_string().contains("belongs to node 1"));
        let other_cluster = flags(dir.path(), 1, "1=127.0.0.1:7001,5=127.0.0.1:7005")
            .resolve()
            .unwrap_err();
        assert!(other_cluster.to_string().contains("belongs to cluster"));
    }

    #[test]
    fn addresses_may_differ_between_nodes_of_one_cluster() {
        let a = parse_initial_cluster(CLUSTER).unwrap();
        let b =
            parse_initial_cluster("1=127.0.0.1:7001,2=127.0.0.1:17002,3=127.0.0.1:17003").unwrap();
        assert_eq!(cluster_id(&a), cluster_id(&b));
    }

    #[test]
    fn the_config_file_fills_what_flags_leave_unset() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("syncd.toml");
        std::fs::write(
            &file,
            format!(
                "id = 3\ninitial-cluster = \"{CLUSTER}\"\nelection-timeout = \"500ms\"\n\
                 cache-backend = \"redis://127.0.0.1:6390\"\ncache-write-mode = \"write-back\"\n\
                 cache-flush-interval = \"75ms\"\ndata-dir = \"{}\"\n",
                dir.path().join("d").display()
            ),
        )
        .unwrap();
        let s = Flags {
            config: Some(file),
            heartbeat_interval: Some(Duration::from_millis(50)),
            ..Default::default()
        }
        .merge_config_file()
        .unwrap()
        .resolve()
        .unwrap();
        assert_eq!(s.id, 3);
        assert_eq!(s.election_timeout, Duration::from_millis(500));
        assert_eq!(s.heartbeat_interval, Duration::from_millis(50));
        assert_eq!(s.election_ticks(), 10);
        assert_eq!(
            s.cache_backend,
            CacheBackend::Redis("redis://127.0.0.1:6390".into())
        );
        assert!(
            s.queue_auto_create,
            "topics are auto-created unless switched off"
        );
        assert_eq!(s.cache.write_back.map(|w| w.flush_ms), Some(75));
    }

    #[test]
    fn tls_material_is_checked_at_start_and_every_mistake_is_one_line_naming_flag_and_file() {
        let material = sync_tests::TlsMaterial::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (node, client, ca) = (material.node(), material.client(), material.ca());
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "not PEM at all\n").unwrap();
        let tls = |cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>, auth: bool| Flags {
            cert_file: cert.map(Path::to_path_buf),
            key_file: key.map(Path::to_path_buf),
            trusted_ca_file: ca.map(Path::to_path_buf),
            client_cert_auth: Some(auth),
            ..flags(&dir.path().join("d"), 1, CLUSTER)
        };
        let ok = tls(Some(&node.cert), Some(&node.key), Some(&ca), true)
            .resolve()
            .unwrap();
        assert!(ok.tls.as_ref().is_some_and(|t| t.client_cert_auth()));
        assert!(
            tls(None, None, None, false)
                .resolve()
                .unwrap()
                .tls
                .is_none()
        );
        let missing = dir.path().join("missing.pem");
        let cases = [
            (
                tls(Some(&node.cert), None, Some(&ca), false),
                "needs --key-file",
            ),
            (
                tls(None, Some(&node.key), Some(&ca), false),
                "needs --cert-file",
            ),
            (
                tls(Some(&node.cert), Some(&node.key), None, false),
                "needs --trusted-ca-file",
            ),
            (
                tls(Some(&node.cert), Some(&node.key), None, true),
                "--client-cert-auth needs",
            ),
            (tls(None, None, None, true), "--client-cert-auth needs"),
            (tls(None, None, Some(&ca), false), "without --cert-file"),
            (
                tls(Some(&missing), Some(&node.key), Some(&ca), false),
                "cannot read --cert-file",
            ),
            (
                tls(Some(&not_pem), Some(&node.key), Some(&ca), false),
                "--cert-file",
            ),
            (
                tls(Some(&node.cert), Some(&not_pem), Some(&ca), false),
                "--key-file",
            ),
            (
                tls(Some(&node.cert), Some(&node.key), Some(&not_pem), false),
                "--trusted-ca-file",
            ),
            // The client's key does not belong to the node's certificate.
            (
                tls(Some(&node.cert), Some(&client.key), Some(&ca), false),
                "--key-file",
            ),
        ];
        for (i, (f, expected)) in cases.into_iter().enumerate() {
            let e = f.resolve().unwrap_err().to_string();
            assert!(
                e.contains(expected),
                "case {i}: {e:?} should mention {expected:?}"
            );
            assert!(!e.contains('\n'), "case {i}: one line: {e:?}");
        }
    }

    #[test]
    fn tls_flags_come_from_the_config_file_and_client_cert_auth_needs_no_value() {
        use clap::Parser;
        let parsed = Flags::try_parse_from(["syncd", "--client-cert-auth"]).unwrap();
        assert_eq!(parsed.client_cert_auth, Some(true));
        let parsed = Flags::try_parse_from(["syncd", "--client-cert-auth=false"]).unwrap();
        assert_eq!(parsed.client_cert_auth, Some(false));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("syncd.toml");
        std::fs::write(
            &file,
            "cert-file = \"/etc/syncd/node.pem\"\nclient-cert-auth = true\n",
        )
        .unwrap();
        let merged = Flags {
            config: Some(file),
            ..Default::default()
        }
        .merge_config_file()
        .unwrap();
        assert_eq!(merged.cert_file, Some(PathBuf::from("/etc/syncd/node.pem")));
        assert_eq!(merged.client_cert_auth, Some(true));
    }

    #[test]
    fn queue_auto_create_is_switched_off_by_flag_or_config_file() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d");
        let parsed = Flags::try_parse_from([
            "syncd",
            "--id",
            "1",
            "--initial-cluster",
            CLUSTER,
            "--data-dir",
            data.to_str().unwrap(),
            "--queue-auto-create",
            "false",
        ])
        .unwrap();
        assert!(!parsed.resolve().unwrap().queue_auto_create);
        let file = dir.path().join("syncd.toml");
        std::fs::write(&file, "queue-auto-create = false\n").unwrap();
        let s = Flags {
            config: Some(file),
            ..flags(&data, 1, CLUSTER)
        }
        .merge_config_file()
        .unwrap()
        .resolve()
        .unwrap();
        assert!(!s.queue_auto_create);
        let bad = Flags::try_parse_from(["syncd", "--queue-auto-create", "maybe"]);
        assert!(bad.is_err(), "only true or false is accepted");
    }
}
