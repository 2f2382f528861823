//! The persistence worker: one OS thread that owns the write-ahead log.
//!
//! The driver hands it one [`PersistJob`] per Ready and goes on working; the worker takes every
//! job waiting at that moment and makes them all durable with a single fsync (group commit),
//! then reports each job done, in order. A job's `after` deliveries (votes, acknowledgements,
//! already bound to their reply channels by the driver) are run here, right after the fsync: a
//! message is sent only once what it promises is on disk, and without a hop back through the
//! driver.
//!
//! A failed write or fsync is fatal: after a failed fsync nobody knows what is on disk, so the
//! node stops rather than acknowledge anything more (what etcd and PostgreSQL do).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sync_proto::raft::v1 as pb;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::record;
use crate::storage::{LogStore, StorageError, Wal};

/// Sends one message that promises durable state; run by the worker once that state is durable.
pub type Delivery = Box<dyn FnOnce() + Send>;

/// Work for the worker.
pub enum PersistJob {
    /// One Ready's durable part.
    Write {
        /// A snapshot received from the leader, with its bytes, to install first.
        snapshot: Option<(pb::SnapshotMetadata, Bytes)>,
        /// Entries to append.
        entries: Vec<pb::Entry>,
        /// Hard state to store.
        hard_state: Option<pb::HardState>,
        /// Messages to send once durable, in this order.
        after: Vec<Delivery>,
    },
    /// A snapshot of the local state machine to save (then the log before it is compacted).
    SaveSnapshot {
        /// Its metadata.
        meta: pb::SnapshotMetadata,
        /// Its bytes.
        data: Bytes,
    },
}

/// What the worker reports back.
pub enum PersistDone {
    /// A Write job is durable.
    Written {
        /// Last entry of the job, if it had entries: `(index, term)`.
        last: Option<(u64, u64)>,
    },
    /// A snapshot was saved durably.
    SnapshotSaved {
        /// Its metadata.
        meta: pb::SnapshotMetadata,
        /// Its bytes (kept in memory to stream to followers).
        data: Bytes,
        /// How long it took.
        took: Duration,
    },
    /// Storage failed; the node must stop.
    Failed(StorageError),
}

/// Starts the worker thread. It ends when the job sender is dropped, after finishing every
/// job already queued.
pub fn spawn(
    mut wal: Wal,
    done: UnboundedSender<PersistDone>,
) -> (mpsc::Sender<PersistJob>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<PersistJob>();
    let handle = std::thread::Builder::new()
        .name("syncd-wal".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while let Ok(next) = rx.try_recv() {
                    batch.push(next);
                }
                if let Err(e) = run_batch(&mut wal, batch, &done) {
                    let _ = done.send(PersistDone::Failed(e));
                    return;
                }
            }
        })
        .expect("spawning the WAL thread");
    (tx, handle)
}

/// Writes a batch of jobs with as few fsyncs as possible: one for all the Writes before a
/// snapshot save (the save syncs on its own), one for those after.
fn run_batch(
    wal: &mut Wal,
    batch: Vec<PersistJob>,
    done: &UnboundedSender<PersistDone>,
) -> Result<(), StorageError> {
    let mut pending: Vec<(PersistDone, Vec<Delivery>)> = Vec::new();
    let mut entries_in_batch = 0u64;
    let flush =
        |wal: &mut Wal, pending: &mut Vec<(PersistDone, Vec<Delivery>)>, entries: &mut u64| {
            if pending.is_empty() {
                return Ok(());
            }
            let started = Instant::now();
            wal.sync()?;
            record::wal_fsync(started.elapsed());
            record::wal_batch(*entries as usize);
            *entries = 0;
            // Answers first: they are what a waiting leader's commit needs; the driver's own
            // bookkeeping can follow.
            for (_, after) in pending.iter_mut() {
                for send in after.drain(..) {
                    send();
                }
            }
            for (d, _) in pending.drain(..) {
                let _ = done.send(d);
            }
            Ok::<(), StorageError>(())
        };
    for job in batch {
        match job {
            PersistJob::Write {
                snapshot,
                entries,
                hard_state,
                after,
            } => {
                if let Some((meta, data)) = &snapshot {
                    // Installing syncs by itself; everything before it must be durable first.
                    flush(wal, &mut pending, &mut entries_in_batch)?;
                    wal.install_snapshot(meta, data)?;
                }
                if !entries.is_empty() {
                    wal.append(&entries)?;
                }
                if let Some(hs) = &hard_state {
                    wal.set_hard_state(hs)?;
                }
                entries_in_batch += entries.len() as u64;
                pending.push((
                    PersistDone::Written {
                        last: entries.last().map(|e| (e.index, e.term)),
                    },
                    after,
                ));
            }
            PersistJob::SaveSnapshot { meta, data } => {
                flush(wal, &mut pending, &mut entries_in_batch)?;
                let started = Instant::now();
                wal.save_snapshot(&meta, &data)?;
                let _ = done.send(PersistDone::SnapshotSaved {
                    meta,
                    data,
                    took: started.elapsed(),
                });
            }
        }
    }
    flush(wal, &mut pending, &mut entries_in_batch)
}
