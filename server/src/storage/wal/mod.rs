//! The embedded write-ahead log: a [`LogStore`] on disk.
//!
//! # How a write becomes durable
//!
//! [`append`](LogStore::append) and [`set_hard_state`](LogStore::set_hard_state) only encode
//! records into an in-memory batch (and update the in-memory log that reads see).
//! [`sync`](LogStore::sync) seals the batch into one CRC-protected frame, writes it to the end of
//! the active segment with one `write`, and calls `fdatasync` once: that is the group commit, so
//! the cost of the disk flush is shared by every entry and hard state buffered since the last sync.
//! When the active segment has reached [`WalOptions::segment_size`], the frame goes to a new
//! segment file instead, preceded by its header in the same `write`, and the directory is fsynced
//! so the new name survives a crash.
//!
//! # Preallocation
//!
//! A frame appended past the end of the file makes its `fdatasync` commit the new file size as
//! well, through the file system's journal: on ext4 that is a journal commit per sync, and it is
//! what makes the tail latency of an append ten or twenty times its median. So the active segment
//! is kept [`WalOptions::preallocate`] bytes ahead of its last frame with zeros, written and synced
//! for real (`fallocate` alone leaves "unwritten" extents, whose conversion on first write is again
//! a journal commit): a frame normally lands in blocks that are already allocated and written, and
//! its `fdatasync` flushes only data. When a frame runs past the zeros, the zeros for the next
//! stretch are written right behind it, and the same `fdatasync` makes both durable: one size
//! change per `preallocate` bytes of log instead of one per sync. The file is therefore longer than
//! its frames; recovery takes zeros where the next frame should start as the end of the segment
//! (see `segment.rs`, "Preallocated space").
//!
//! Formats: `record.rs` (frames and records), `segment.rs` (segment names and header, the torn-tail
//! rule), `recovery.rs` (replay rules); snapshot files in `../snapshot.rs`.
//!
//! # Hard state
//!
//! The hard state lives in the WAL stream as a record; the latest one wins. A separate,
//! atomically replaced file would cost a rename and two more fsyncs on every vote or term change,
//! breaking the one-`fdatasync` group commit. So that compaction can delete old segments without
//! losing it, every new segment's first frame carries a copy of the current hard state (and of the
//! current snapshot's record, for the same reason).
//!
//! # Compaction
//!
//! After a snapshot at `S`, `Wal::purge_segments` deletes the segments before the newest one
//! whose `start` (the log's last index + 1 when it was created) is at most `S + 1`. When that
//! segment was created, the log ended at or below `S`, so every entry above `S` that the log has
//! held since, and every overwrite that shaped it, was written to it or to a later segment: replay
//! from there, ignoring what is at or below `S`, rebuilds the log exactly. The last segment is
//! never deleted. Segments are deleted oldest first, each followed by a directory fsync, so a crash
//! can only leave a shorter prefix deleted, never a hole in the sequence.
//!
//! # Snapshots
//!
//! A snapshot call first syncs the batch, then writes the snapshot file atomically, then writes a
//! snapshot record to the WAL (with the "reset" flag when an installed snapshot discarded the log)
//! and syncs again, and only then removes older snapshot files and purges segments. Recovery copes
//! with a crash at any point of that sequence (see `recovery.rs`, "Anchoring").

mod record;
mod recovery;
mod segment;

#[cfg(test)]
pub(crate) mod tests;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sync_proto::raft::v1::{Entry, HardState, SnapshotMetadata};

use super::entry_log::EntryLog;
use super::error::{StorageError, io_err};
use super::fsutil::{DirLock, create_dir_durable, fsync_dir};
use super::snapshot::SnapshotDir;
use super::{LogStore, RecoveredState};
use record::Batch;
use segment::{HEADER_LEN, Header, SegmentFile};

/// Tuning of a [`Wal`].
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Once the active segment reaches this many bytes, the next sync starts a new segment. Smaller
    /// segments let compaction free disk space sooner; each new segment costs one directory fsync.
    /// Default: 64 MiB.
    pub segment_size: u64,
    /// How many bytes of zeros the active segment is kept ahead of its last frame (see
    /// "Preallocation" in the module doc), never past `segment_size`. 0 turns preallocation off:
    /// every sync then grows the file. Default: 1 MiB, which costs about one extra flush of 1 MiB
    /// per MiB of log, in the sync that crosses into new space.
    pub preallocate: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size: 64 * 1024 * 1024,
            preallocate: 1024 * 1024,
        }
    }
}

/// The segment that frames are appended to.
#[derive(Debug)]
struct Active {
    /// Opened for writing; frames are written at `len`, not appended at the file's end.
    file: File,
    /// Its logical length: where the next frame goes, and the `prev_len` of the segment after it.
    len: u64,
    /// The file's size: `len` plus the zeros written ahead of it (preallocated space).
    allocated: u64,
}

impl Active {
    /// Writes `bytes` at the logical end and fdatasyncs. If they run past the preallocated space,
    /// the zeros for the next `ahead` bytes (capped at `limit`, the segment size) are written
    /// right behind them and made durable by the same fdatasync. Either write may be torn by a
    /// crash; recovery reads an unfinished frame followed by zeros, or a frame followed by some of
    /// the zeros, as what they are (see `segment.rs`).
    fn write_synced(
        &mut self,
        bytes: &[u8],
        path: &Path,
        ahead: u64,
        limit: u64,
    ) -> Result<(), StorageError> {
        let end = self.len + bytes.len() as u64;
        self.file
            .write_all_at(bytes, self.len)
            .map_err(io_err("write to", path))?;
        if end > self.allocated {
            let target = end.saturating_add(ahead).min(limit).max(end);
            if target > end {
                let zeros = vec![0u8; (target - end) as usize];
                self.file
                    .write_all_at(&zeros, end)
                    .map_err(io_err("preallocate", path))?;
            }
            self.allocated = target;
        }
        self.file.sync_data().map_err(io_err("fdatasync", path))?;
        self.len = end;
        Ok(())
    }
}

/// The write-ahead log and snapshot of one Raft group, in one directory (see the
/// [module overview](super) for the layout).
#[derive(Debug)]
pub struct Wal {
    /// `<dir>/wal`, where the segments are.
    wal_dir: PathBuf,
    /// Tuning.
    options: WalOptions,
    /// Held while this `Wal` lives, so that nobody else appends to the same segments.
    _lock: DirLock,
    /// `<dir>/snap`.
    snapshots: SnapshotDir,
    /// The newest durable snapshot's metadata (the whole message, with its membership).
    snapshot: Option<SnapshotMetadata>,
    /// The log after the snapshot, including buffered entries: what reads see.
    log: EntryLog,
    /// The latest hard state, including a buffered one.
    hard_state: HardState,
    /// The segment files, oldest first; the last is the active one.
    segments: Vec<SegmentFile>,
    /// The last segment, open for appending; `None` until the first segment is created.
    active: Option<Active>,
    /// Records buffered since the last sync.
    batch: Batch,
    /// The log's last index as the records written so far leave it (an upper bound right after
    /// recovery). It names the next segment, and must never be below the truth: see
    /// [`Wal::purge_segments`].
    disk_last_index: u64,
    /// Set by any I/O failure in a mutating call: the disk's state is then unknown (after a failed
    /// fdatasync the kernel may have dropped the dirty pages), so mutations are refused until the
    /// directory is reopened and recovered.
    poisoned: bool,
}

impl Wal {
    /// Opens (creating if needed) the group directory `dir` and recovers its state.
    ///
    /// Recovery replays every segment on top of the newest snapshot, cuts away a torn tail (the
    /// remains of a sync interrupted by a crash), refuses corruption with
    /// [`StorageError::Corrupt`] / [`StorageError::CorruptSnapshot`] naming the file and offset,
    /// finishes a snapshot call that a crash interrupted, and deletes segments that compaction no
    /// longer needs. The returned state is exactly what was durable.
    pub fn open(dir: &Path, options: WalOptions) -> Result<(Wal, RecoveredState), StorageError> {
        create_dir_durable(dir)?;
        let lock = DirLock::acquire(dir)?;
        let wal_dir = dir.join("wal");
        create_dir_durable(&wal_dir)?;
        let (snapshots, snapshot) = SnapshotDir::open(&dir.join("snap"))?;
        let recovery = recovery::recover(&wal_dir, snapshot.as_ref())?;
        let replayed = recovery.replayed;

        let active = match recovery.segments.last() {
            Some(last) => Some(Active {
                file: OpenOptions::new()
                    .write(true)
                    .open(&last.path)
                    .map_err(io_err("open for appending", &last.path))?,
                len: recovery.last_len,
                allocated: recovery.last_allocated,
            }),
            None => None,
        };
        let (snapshot_index, snapshot_term) = snapshot
            .as_ref()
            .map_or((0, 0), |s| (s.last_index, s.last_term));
        let state = replayed.state;
        let mut wal = Wal {
            wal_dir,
            options,
            _lock: lock,
            snapshots,
            snapshot,
            log: EntryLog::new(snapshot_index, snapshot_term, state.entries.clone()),
            hard_state: state.hard_state,
            segments: recovery.segments,
            active,
            batch: Batch::default(),
            disk_last_index: replayed.disk_last_index,
            poisoned: false,
        };
        if replayed.snapshot_record_missing {
            // A crash interrupted a snapshot call after its file became durable. Write the
            // record it did not get to write (a reset if the leftover log conflicts with the
            // snapshot), before any segment deletion could remove the evidence that decides it.
            wal.batch
                .push_snapshot(snapshot_index, snapshot_term, !replayed.anchored)?;
            wal.sync()?;
        }
        wal.guarded(Wal::purge_segments)?;
        Ok((wal, state))
    }

    /// Runs a mutating step, poisoning the store if it fails (see `poisoned`).
    fn guarded<T>(
        &mut self,
        step: impl FnOnce(&mut Wal) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        let result = step(self);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    /// Writes the batch as one frame (in a new segment if the active one is full) and fdatasyncs.
    fn write_batch(&mut self) -> Result<(), StorageError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let full = self
            .active
            .as_ref()
            .is_none_or(|a| a.len >= self.options.segment_size);
        if full {
            self.start_segment()?;
        } else if let Some(active) = self.active.as_mut() {
            let path = &self.segments[self.segments.len() - 1].path;
            let frame = self.batch.seal();
            active.write_synced(
                frame,
                path,
                self.options.preallocate,
                self.options.segment_size,
            )?;
        }
        self.batch.clear();
        self.disk_last_index = self.log.last_index();
        Ok(())
    }

    /// Creates the next segment with the batch as its first frame: header and frame in one write
    /// (then the first preallocated zeros), one fdatasync, one directory fsync.
    fn start_segment(&mut self) -> Result<(), StorageError> {
        // Every segment's first frame carries what compaction must never lose with the segments
        // it deletes: the current hard state, and the record of the current snapshot (which
        // recovery needs to keep the log after an installed snapshot; see recovery.rs).
        if self.hard_state != HardState::default() {
            self.batch.push_hard_state(&self.hard_state)?;
        }
        if let Some(snapshot) = &self.snapshot {
            self.batch
                .push_snapshot(snapshot.last_index, snapshot.last_term, false)?;
        }
        let header = Header {
            seq: self.segments.last().map_or(1, |s| s.seq + 1),
            start_index: self.disk_last_index + 1,
            prev_len: self.active.as_ref().map_or(0, |a| a.len),
        };
        let path = self
            .wal_dir
            .join(segment::file_name(header.seq, header.start_index));
        let frame = self.batch.seal();
        let mut buf = Vec::with_capacity(HEADER_LEN + frame.len());
        buf.extend_from_slice(&header.encode());
        buf.extend_from_slice(frame);
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(io_err("create segment", &path))?;
        let mut active = Active {
            file,
            len: 0,
            allocated: 0,
        };
        active.write_synced(
            &buf,
            &path,
            self.options.preallocate,
            self.options.segment_size,
        )?;
        fsync_dir(&self.wal_dir)?;
        self.segments.push(SegmentFile {
            seq: header.seq,
            start_index: header.start_index,
            path,
        });
        self.active = Some(active);
        Ok(())
    }

    /// Deletes the segments that the snapshot made unnecessary (see "Compaction" in the module
    /// doc): those before the newest segment whose start index is at most snapshot index + 1.
    fn purge_segments(&mut self) -> Result<(), StorageError> {
        let limit = self.log.snapshot_index() + 1;
        let keep_from = self
            .segments
            .iter()
            .rposition(|s| s.start_index <= limit)
            .unwrap_or(0);
        for old in self.segments.drain(..keep_from) {
            fs::remove_file(&old.path).map_err(io_err("remove segment", &old.path))?;
            fsync_dir(&self.wal_dir)?;
        }
        Ok(())
    }

    /// The steps shared by both snapshot calls once the snapshot's metadata is validated. The log
    /// keeps its entries after the snapshot if it holds the snapshot's last entry (always so for
    /// a local snapshot), and is reset otherwise.
    fn apply_snapshot(&mut self, meta: &SnapshotMetadata, data: &[u8]) -> Result<(), StorageError> {
        self.guarded(|wal| {
            // Buffered records belong before the snapshot record.
            wal.write_batch()?;
            wal.snapshots.save(meta, data)?;
            let kept = wal.log.apply_snapshot(meta.last_index, meta.last_term);
            wal.snapshot = Some(meta.clone());
            wal.batch
                .push_snapshot(meta.last_index, meta.last_term, !kept)?;
            wal.write_batch()?;
            // Only now, with the snapshot record durable, is the old state unnecessary.
            wal.snapshots.remove_older_files(meta.last_index)?;
            wal.purge_segments()
        })
    }

    /// The segment files, oldest first (for tests).
    #[cfg(test)]
    fn segment_files(&self) -> &[SegmentFile] {
        &self.segments
    }

    /// The active segment's logical length, where its frames end (for tests).
    #[cfg(test)]
    fn active_len(&self) -> u64 {
        self.active.as_ref().map_or(0, |a| a.len)
    }
}

impl LogStore for Wal {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        self.log.check_append(entries)?;
        let mark = self.batch.mark();
        for entry in entries {
            if let Err(err) = self.batch.push_entry(entry) {
                self.batch.rollback(mark);
                return Err(err);
            }
        }
        self.log.append(entries);
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        self.batch.push_hard_state(hs)?;
        self.hard_state = *hs;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        self.guarded(Wal::write_batch)
    }

    fn save_snapshot(&mut self, meta: &SnapshotMetadata, data: &[u8]) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        self.log
            .check_save_snapshot(meta.last_index, meta.last_term)?;
        self.apply_snapshot(meta, data)
    }

    fn install_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        data: &[u8],
    ) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        self.log.check_newer_snapshot(meta.last_index)?;
        self.apply_snapshot(meta, data)
    }

    fn snapshot(&self) -> Result<Option<(SnapshotMetadata, Vec<u8>)>, StorageError> {
        match &self.snapshot {
            Some(meta) => self.snapshots.load(meta).map(Some),
            None => Ok(None),
        }
    }

    fn hard_state(&self) -> HardState {
        self.hard_state
    }

    fn first_index(&self) -> u64 {
        self.log.first_index()
    }

    fn last_index(&self) -> u64 {
        self.log.last_index()
    }

    fn term(&self, index: u64) -> Result<u64, StorageError> {
        self.log.term(index)
    }

    fn entries(&self, lo: u64, hi: u64) -> Result<Vec<Entry>, StorageError> {
        self.log.entries(lo, hi)
    }
}
