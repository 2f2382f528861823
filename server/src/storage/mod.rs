//! Durable storage for one Raft group: the log, the hard state and the snapshot.
//!
//! The Raft engine (`crate::raft`) never touches a disk. The node shell takes each batch of work
//! the engine hands out (entries to append, a hard state to save, a snapshot to install), buffers it
//! here with [`LogStore::append`] / [`LogStore::set_hard_state`], makes it durable with one
//! [`LogStore::sync`], and only then sends the messages that depend on it. Everything in this module
//! is synchronous `std` I/O so that the shell decides which thread blocks on `fdatasync`.
//!
//! # Layout
//!
//! - [`LogStore`]: the contract the node shell relies on, with two implementations:
//!   - [`Wal`] (`wal/`): the embedded write-ahead log on disk: segment files of CRC-framed
//!     batches (`wal/record.rs`), segment naming and scanning (`wal/segment.rs`), replay and the
//!     torn-tail rule (`wal/recovery.rs`);
//!   - [`MemStore`] (`memory.rs`): the same semantics in memory, including what a crash forgets,
//!     for unit tests and the deterministic simulator.
//! - `snapshot.rs`: snapshot files, written atomically (temp file, fsync, rename, fsync directory).
//! - `entry_log.rs`: the in-memory view of the log (entries after the snapshot) shared by both
//!   stores, so that both accept and refuse exactly the same calls.
//! - `fsutil.rs`: the few file-system primitives whose ordering durability depends on.
//!
//! # One group's directory
//!
//! ```text
//! <dir>/LOCK                                  flock'ed while a Wal is open: one writer only
//! <dir>/wal/<seq:016x>-<start:016x>.seg       write-ahead log segments, oldest first
//! <dir>/snap/<index:016x>-<term:016x>.snap    the newest snapshot (metadata + data + CRC)
//! ```
//!
//! A node hosting several Raft groups opens one such directory per group.
//!
//! # The durability contract
//!
//! - Nothing is durable before [`LogStore::sync`] returns `Ok`; the caller must not acknowledge an
//!   entry, a vote or a term to anyone before that.
//! - After a crash, [`Wal::open`] returns everything the last successful `sync` (or snapshot call)
//!   made durable, never less. It may also return the batch a `sync` was writing when the crash
//!   came, if all of its bytes reached the disk: harmless, since nothing in it was acknowledged.
//!   Writes that were only buffered (no `sync` started) are never returned.
//! - Any I/O error while writing poisons the store (every later mutation fails with
//!   [`StorageError::Poisoned`]): after a failed `fdatasync` the kernel may have dropped the dirty
//!   pages, so the only safe way forward is to reopen and recover from what the disk really holds.

mod entry_log;
mod error;
mod fsutil;
pub mod memory;
mod snapshot;
pub mod wal;

#[cfg(test)]
mod tests;

pub use error::StorageError;
pub use memory::MemStore;
pub use wal::{Wal, WalOptions};

use sync_proto::raft::v1::{Entry, HardState, SnapshotMetadata};

/// What a store holds after a restart: everything that was durable when the process stopped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveredState {
    /// The latest durable hard state (all zeros if none was ever saved).
    pub hard_state: HardState,
    /// The metadata of the newest durable snapshot, if any; its bytes come from
    /// [`LogStore::snapshot`].
    pub snapshot: Option<SnapshotMetadata>,
    /// The log after the snapshot: contiguous, the first index is `snapshot.last_index + 1` (or 1
    /// without a snapshot). Entries at or below the snapshot index are never returned.
    pub entries: Vec<Entry>,
}

/// Durable storage for the log, hard state and snapshot of one Raft group.
///
/// Index space: the store holds a snapshot covering `[1, first_index() - 1]` (none when
/// `first_index() == 1`) followed by the entries `[first_index(), last_index()]`, which are always
/// contiguous. Reads ([`entries`](Self::entries), [`term`](Self::term), the index getters) see
/// buffered writes at once; durability comes only from [`sync`](Self::sync) and the snapshot calls.
pub trait LogStore {
    /// Buffers `entries` (consecutive indexes) for the next [`sync`](Self::sync).
    ///
    /// If `entries[0].index <= last_index()`, the stored entries from that index on are discarded
    /// first: a follower overwriting a tail that conflicts with its leader. Errors, with nothing
    /// changed: [`StorageError::Gap`] if `entries[0].index > last_index() + 1`,
    /// [`StorageError::Compacted`] if it is at or below the snapshot, and
    /// [`StorageError::InvalidEntries`] if the indexes are not consecutive. An empty slice is a no-op.
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError>;

    /// Buffers a new hard state (term, vote, commit); it is durable at the next
    /// [`sync`](Self::sync), and the latest one wins.
    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError>;

    /// Group commit: makes everything buffered since the previous sync durable, with one write and
    /// one `fdatasync` (plus one directory fsync when it had to start a new segment file), and
    /// returns only once it is durable. A sync with nothing buffered does no I/O.
    fn sync(&mut self) -> Result<(), StorageError>;

    /// Saves a snapshot of the local state machine at `meta.last_index` and compacts the log.
    ///
    /// `meta.last_index` must be above the current snapshot and at most `last_index()`, and the
    /// entry there must have term `meta.last_term`. Buffered writes are synced first; the snapshot
    /// file is written atomically; entries up to `meta.last_index` are dropped, as are whole segment
    /// files no longer needed to rebuild the log; older snapshot files are removed once the new one
    /// is durable. Returns once all of that is durable.
    fn save_snapshot(&mut self, meta: &SnapshotMetadata, data: &[u8]) -> Result<(), StorageError>;

    /// Installs a snapshot received from the leader (`meta.last_index` above the current snapshot).
    ///
    /// Written like [`save_snapshot`](Self::save_snapshot); then, if the log holds an entry at
    /// `meta.last_index` with term `meta.last_term`, the entries after it are kept (they agree with
    /// the leader up to there), otherwise every entry is discarded and the log continues at
    /// `meta.last_index + 1`. Returns once all of that is durable.
    fn install_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        data: &[u8],
    ) -> Result<(), StorageError>;

    /// The latest durable snapshot (metadata and bytes), if any.
    fn snapshot(&self) -> Result<Option<(SnapshotMetadata, Vec<u8>)>, StorageError>;

    /// The latest hard state given to [`set_hard_state`](Self::set_hard_state) (or recovered).
    fn hard_state(&self) -> HardState;

    /// The index of the first entry held: the snapshot's `last_index + 1`, or 1.
    fn first_index(&self) -> u64;

    /// The index of the last entry held, or the snapshot's `last_index` when no entry follows it
    /// (0 for an empty store).
    fn last_index(&self) -> u64;

    /// The term of the entry at `index`; at the snapshot index, the snapshot's term (so index 0
    /// has term 0 in a store without a snapshot).
    /// [`StorageError::Compacted`] below that, [`StorageError::Unavailable`] past `last_index()`.
    fn term(&self, index: u64) -> Result<u64, StorageError>;

    /// The entries `[lo, hi)`, e.g. for a leader catching up a follower after a restart.
    /// [`StorageError::Compacted`] if `lo < first_index()`, [`StorageError::Unavailable`] if
    /// `hi > last_index() + 1` or `lo > hi`.
    fn entries(&self, lo: u64, hi: u64) -> Result<Vec<Entry>, StorageError>;
}
