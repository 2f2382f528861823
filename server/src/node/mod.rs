//! # The node runtime: the async shell around the pure Raft engine
//!
//! - [`cache`]: the cache runtime (node side and, on the leader, the directory) and its transport.
//! - [`config`]: flags, environment, config file, data-dir identity.
//! - [`driver`]: the one task that owns the engine and the replicated state.
//! - [`persist`]: the WAL thread (group commit).
//! - [`tls`]: TLS on the gRPC port and on every connection to a peer.
//! - [`transport`]: Raft RPCs to and from peers.
//! - [`NodeHandle`]: what the public API services use to propose, read and administer.
//!
//! Start-up: open the WAL (recovering the hard state, the latest snapshot and the log after
//! it), restore the state machine from the snapshot, restore the engine, and start the driver;
//! the engine then hands the committed entries after the snapshot to the driver, which applies
//! them again, so the state is rebuilt before it serves.

pub mod cache;
pub mod clock;
pub mod config;
pub mod driver;
pub mod logging;
pub mod persist;
pub mod tls;
pub mod transport;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sync_proto::internal::v1 as ipb;
use sync_proto::raft::v1 as pb;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::raft::{ConfigChange, NodeId, RaftError, RaftNode, Role};
use crate::state::Notice;
use crate::state::{Applied, ReplicatedState};
use crate::storage::{LogStore, Wal, WalOptions};
use config::Settings;
use driver::{ClusterEvent, Driver, DriverParts, Input, NodeStatus};

/// Why a node-level request failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum NodeError {
    /// Only the leader does this; it is named when known.
    #[error("this node is not the leader{}", match leader { Some((id, addr)) => format!(" (the leader is node {id} at {addr})"), None => String::new() })]
    NotLeader {
        /// The leader's id and address, if known.
        leader: Option<(NodeId, String)>,
    },
    /// Leadership changed before the request committed; it may or may not have been applied.
    #[error("leadership changed before the request committed; retry with the same request id")]
    Lost,
    /// The request id is older than what the de-duplication table remembers.
    #[error(
        "request is older than the de-duplication window and was not applied; use a new sequence number"
    )]
    Expired,
    /// The engine refused.
    #[error(transparent)]
    Raft(#[from] RaftError),
    /// The node is stopping.
    #[error("the node is shutting down; retry on another node")]
    ShuttingDown,
    /// Storage failed: the node stops.
    #[error("storage failure: {0}")]
    Storage(String),
    /// It did not happen in time.
    #[error("{0}")]
    Timeout(String),
}

/// What the API services hold: a way to reach the driver and to see the node's state.
#[derive(Clone)]
pub struct NodeHandle {
    inputs: mpsc::UnboundedSender<Input>,
    status: watch::Receiver<NodeStatus>,
    events: broadcast::Sender<ClusterEvent>,
    notices: broadcast::Sender<Notice>,
    /// The node's settings.
    pub settings: Arc<Settings>,
}

impl NodeHandle {
    fn send(&self, input: Input) -> Result<(), NodeError> {
        self.inputs.send(input).map_err(|_| NodeError::ShuttingDown)
    }

    /// Replicates a command and returns its log index and result once applied here.
    pub async fn propose(
        &self,
        op: ipb::command::Op,
        request: Option<pb::RequestId>,
    ) -> Result<(u64, Applied), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Propose { op, request, reply })?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Reads the state: linearizably (confirmed by the leader's quorum, only on the leader) or
    /// from what this node has applied.
    pub async fn read<T: Send + 'static>(
        &self,
        linearizable: bool,
        f: impl FnOnce(&ReplicatedState) -> T + Send + 'static,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Input::Read {
            linearizable,
            query: Box::new(move |state| {
                let _ = tx.send(state.map(f));
            }),
        })?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Changes membership by one step; returns the committed index.
    pub async fn change_membership(&self, change: ConfigChange) -> Result<u64, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::ChangeMembership { change, reply })?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// The state machine's notices (lock events, ended waits) from now on, as this node applies
    /// them. Subscribe before proposing a command whose consequences you wait for.
    pub fn notices(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Hands leadership to `target` (0: the most caught-up voter); returns the new leader.
    pub async fn transfer_leader(
        &self,
        target: NodeId,
        timeout: Duration,
    ) -> Result<NodeId, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::TransferLeader {
            target,
            reply,
            deadline: Instant::now() + timeout,
        })?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Takes a snapshot now; returns its metadata and size.
    pub async fn snapshot(&self) -> Result<(pb::SnapshotMetadata, u64), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Snapshot { reply })?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// The node's current state.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// A receiver of cluster events from now on.
    pub fn events(&self) -> broadcast::Receiver<ClusterEvent> {
        self.events.subscribe()
    }

    /// The leader's id and address as this node knows them (None if unknown or self).
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let s = self.status.borrow();
        let id = s.leader.filter(|&l| l != s.id)?;
        Some((id, s.address_of(id).unwrap_or_default().to_string()))
    }

    /// True if this node leads.
    pub fn is_leader(&self) -> bool {
        self.status.borrow().role == Role::Leader
    }

    /// The driver's input queue (for the Raft transport's server side).
    pub fn inputs(&self) -> mpsc::UnboundedSender<Input> {
        self.inputs.clone()
    }

    /// Asks the node to stop: a leader first hands leadership over.
    pub fn shutdown(&self) {
        let _ = self.inputs.send(Input::Shutdown);
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The log could not be opened or recovered.
    #[error("cannot open the log in {dir}: {source}")]
    Storage {
        /// Where.
        dir: String,
        /// Why.
        source: crate::storage::StorageError,
    },
    /// The recovered state is inconsistent.
    #[error("recovered state of {dir} is inconsistent: {reason}")]
    Recovery {
        /// Where.
        dir: String,
        /// Why.
        reason: String,
    },
}

/// A started node: its handle, and the driver task and WAL thread to wait for.
pub struct RunningNode {
    /// For the API services.
    pub handle: NodeHandle,
    /// Ends when the node stopped; Err when storage failed.
    pub driver: tokio::task::JoinHandle<Result<(), NodeError>>,
    /// The WAL thread; joined after the driver ends.
    pub wal_thread: std::thread::JoinHandle<()>,
}

/// How many state-machine notices a slow subscriber may fall behind before it loses some (and
/// must re-read the state).
const NOTICE_BUFFER: usize = 4096;

/// Opens the data directory and starts the node's driver.
pub fn start(settings: Settings) -> Result<RunningNode, StartError> {
    let settings = Arc::new(settings);
    let dir = settings.data_dir.join("raft");
    let display = dir.display().to_string();
    let (wal, recovered) =
        Wal::open(&dir, WalOptions::default()).map_err(|source| StartError::Storage {
            dir: display.clone(),
            source,
        })?;
    let snapshot = wal.snapshot().map_err(|source| StartError::Storage {
        dir: display.clone(),
        source,
    })?;
    let (state, snapshot_index, cache) = match snapshot {
        Some((meta, data)) => {
            let state = ReplicatedState::restore(&data).map_err(|e| StartError::Recovery {
                dir: display.clone(),
                reason: format!("snapshot {}: {e}", meta.last_index),
            })?;
            let index = meta.last_index;
            (state, index, Some((meta, bytes::Bytes::from(data))))
        }
        None => (ReplicatedState::default(), 0, None),
    };
    let mut engine_config = crate::raft::Config::new(settings.id);
    engine_config.election_tick = settings.election_ticks();
    engine_config.heartbeat_tick = 1;
    engine_config.seed = rand::random();
    let raft = RaftNode::restore(
        engine_config,
        settings.initial.clone(),
        recovered.hard_state,
        recovered.snapshot,
        recovered.entries,
    )
    .map_err(|e| StartError::Recovery {
        dir: display.clone(),
        reason: e.to_string(),
    })?;
    tracing::info!(
        node_id = settings.id,
        term = raft.term(),
        commit = raft.commit_index(),
        last_index = raft.last_index(),
        snapshot_index,
        "recovered"
    );
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let (persist, wal_thread) = persist::spawn(wal, done_tx);
    let (inputs_tx, inputs_rx) = mpsc::unbounded_channel();
    let initial_status = NodeStatus {
        id: settings.id,
        address: settings.advertise.clone(),
        role: raft.role(),
        learner: true,
        term: raft.term(),
        leader: None,
        commit: raft.commit_index(),
        applied: state.applied_index(),
        last_index: raft.last_index(),
        snapshot_index,
        members: Vec::new(),
    };
    let (status_tx, status_rx) = watch::channel(initial_status);
    let (events, _) = broadcast::channel(1024);
    let (notices, _) = broadcast::channel(NOTICE_BUFFER);
    let driver = Driver::new(DriverParts {
        settings: settings.clone(),
        raft,
        state,
        inputs: inputs_rx,
        self_tx: inputs_tx.clone(),
        persist,
        persist_done: done_rx,
        snapshots: Arc::new(RwLock::new(cache)),
        snapshot_index,
        status_tx,
        events: events.clone(),
        notices: notices.clone(),
    });
    let driver = tokio::spawn(driver.run());
    let handle = NodeHandle {
        inputs: inputs_tx,
        status: status_rx,
        events,
        notices,
        settings,
    };
    tokio::spawn(clock::run(handle.clone()));
    Ok(RunningNode {
        handle,
        driver,
        wal_thread,
    })
}
