//! The Raft memory (`--cache-backend raft`) through a real single-node `syncd` node, started
//! in-process on a temporary data directory: write-back mode's three requests are replicated
//! commands, and a key's reservation survives a restart from the log, a restart from a
//! snapshot, and the loss of the directory that made it (memory contract rules 2, 4 and 6).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use sync_proto::raft::v1 as pb;
use syncd::cache::Stored;
use syncd::cache::memory::{MemoryError, MemoryOp, MemoryReply, MemoryRequest};
use syncd::cache::message::{Write, WriteResult};
use syncd::node::RunningNode;
use syncd::node::cache::raft_memory;
use syncd::node::config::{CacheBackend, ClusterState, LogFormat, Settings};

/// Starts node 1 alone on `dir` (recovering whatever the directory holds).
fn start(dir: &Path) -> RunningNode {
    let address = "127.0.0.1:1".to_string();
    let settings = Settings {
        id: 1,
        listen: "127.0.0.1:0".parse().expect("address"),
        advertise: address.clone(),
        initial: pb::ClusterConfig {
            members: vec![pb::Member {
                id: 1,
                address,
                learner: false,
            }],
        },
        cluster_state: ClusterState::New,
        cluster_id: "raft-memory-test".into(),
        data_dir: dir.to_path_buf(),
        metrics_listen: None,
        heartbeat_interval: Duration::from_millis(10),
        election_timeout: Duration::from_millis(50),
        peer_timeout: Duration::from_millis(50),
        snapshot_threshold: 10_000,
        queue_auto_create: false,
        cache: Default::default(),
        cache_backend: CacheBackend::Raft,
        tls: None,
        log_format: LogFormat::Text,
        log_level: "warn".into(),
    };
    syncd::node::start(settings).expect("node starts")
}

/// Waits until the node leads and has applied every entry it recovered; returns its term (the
/// epoch a directory on it would have).
async fn lead(node: &RunningNode) -> u64 {
    for _ in 0..500 {
        let s = node.handle.status();
        if node.handle.is_leader() && s.applied >= s.commit && s.commit == s.last_index {
            return s.term;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the node did not become leader: {:?}", node.handle.status());
}

/// Stops the node and waits for its driver and WAL thread.
async fn stop(node: RunningNode) {
    node.handle.shutdown();
    let _ = node.driver.await;
    tokio::task::spawn_blocking(move || node.wal_thread.join())
        .await
        .expect("join")
        .expect("WAL thread");
}

/// Runs `op` with the directory epoch `epoch`; every request here has a definite outcome.
async fn run(node: &RunningNode, epoch: u64, op: MemoryOp) -> Result<MemoryReply, MemoryError> {
    let req = MemoryRequest { id: 1, epoch, op };
    raft_memory::run(&node.handle, req)
        .await
        .expect("a single node decides every proposal")
}

fn set(value: &str) -> Write {
    Write::set(value.to_string())
}

fn write(key: &str, value: &str) -> MemoryOp {
    MemoryOp::Write {
        key: key.into(),
        write: set(value),
    }
}

fn write_back(key: &str, version: u64, value: &str) -> MemoryOp {
    MemoryOp::WriteBack {
        key: key.into(),
        version,
        value: Bytes::from(value.to_string()),
    }
}

fn read(key: &str) -> MemoryOp {
    MemoryOp::Read { key: key.into() }
}

fn applied_version(reply: Result<MemoryReply, MemoryError>) -> u64 {
    match reply {
        Ok(MemoryReply::Written(WriteResult::Applied { version, .. })) => version,
        other => panic!("not an applied write: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_are_replicated_and_survive_restarts_and_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start(dir.path());
    let epoch = lead(&node).await;

    // A reserving write: its version is a commit index, and the block starts there.
    let reserved = run(
        &node,
        epoch,
        MemoryOp::WriteReserve {
            key: "k".into(),
            write: set("a"),
            block: 1000,
        },
    )
    .await;
    let Ok(MemoryReply::WrittenReserved(WriteResult::Applied { version: v1, .. }, base)) = reserved
    else {
        panic!("not a reserving write's answer: {reserved:?}");
    };
    assert_eq!(base, v1);
    let limit = base + 1000;

    // A reserving read of a key never written: version 0, base 0.
    let fill = run(
        &node,
        epoch,
        MemoryOp::ReadReserve {
            key: "j".into(),
            block: 5000,
        },
    )
    .await;
    let empty = Stored {
        version: 0,
        value: None,
        ttl_left_ms: None,
    };
    assert_eq!(fill, Ok(MemoryReply::ReadReserved(empty, 0)));

    // A write-back inside the block carries its own version; a repeat is not taken.
    let wb = run(&node, epoch, write_back("k", base + 5, "local")).await;
    assert_eq!(wb, Ok(MemoryReply::WrittenBack { applied: true }));
    let repeat = run(&node, epoch, write_back("k", base + 5, "local")).await;
    assert_eq!(repeat, Ok(MemoryReply::WrittenBack { applied: false }));
    let Ok(MemoryReply::Read(now)) = run(&node, epoch, read("k")).await else {
        panic!("read failed");
    };
    assert_eq!(
        (now.version, now.value),
        (base + 5, Some(Bytes::from("local")))
    );

    // Restart from a snapshot (the state machine is restored from it, not replayed).
    node.handle.snapshot().await.expect("snapshot");
    stop(node).await;
    let node = start(dir.path());
    let epoch2 = lead(&node).await;
    assert!(epoch2 > epoch);

    // The old directory's epoch is fenced: nothing changes.
    let stale = run(&node, epoch, write_back("k", base + 6, "stale")).await;
    assert!(
        matches!(stale, Err(MemoryError::Unavailable(_))),
        "{stale:?}"
    );
    // The reservation survived: still the latest, and memory's own versions skip it.
    let late = run(&node, epoch2, write_back("k", base + 6, "late")).await;
    assert_eq!(late, Ok(MemoryReply::WrittenBack { applied: true }));
    let after = applied_version(run(&node, epoch2, write("k", "b")).await);
    assert_eq!(after, limit + 1);
    let j = applied_version(run(&node, epoch2, write("j", "x")).await);
    assert_eq!(
        j, 5001,
        "a write of j reused a version its holder may have given"
    );

    // Restart again, from the log this time: the same state is rebuilt by replaying it.
    stop(node).await;
    let node = start(dir.path());
    let epoch3 = lead(&node).await;
    let Ok(MemoryReply::Read(k)) = run(&node, epoch3, read("k")).await else {
        panic!("read failed");
    };
    assert_eq!((k.version, k.value), (limit + 1, Some(Bytes::from("b"))));
    let gone = run(&node, epoch3, write_back("k", base + 7, "too late")).await;
    assert_eq!(gone, Ok(MemoryReply::WrittenBack { applied: false }));
    stop(node).await;
}
