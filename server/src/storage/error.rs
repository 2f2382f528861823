//! The errors of the storage layer.
//!
//! They fall in three families, which the node shell handles differently:
//! - the disk failed ([`StorageError::Io`], [`StorageError::Poisoned`]) or holds data we refuse to
//!   trust ([`StorageError::Corrupt`], [`StorageError::CorruptSnapshot`]): the group must stop;
//!   a corrupt replica can be rebuilt from its peers, but must never serve what it has;
//! - the caller asked for something the store cannot give ([`StorageError::Compacted`],
//!   [`StorageError::Unavailable`]): normal, e.g. a leader falls back to sending a snapshot;
//! - the caller broke the contract ([`StorageError::Gap`], [`StorageError::InvalidEntries`],
//!   [`StorageError::SnapshotOutOfDate`], [`StorageError::SnapshotMismatch`]): a bug upstream; nothing
//!   was changed.

use std::io;
use std::path::{Path, PathBuf};

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call failed.
    #[error("failed to {op} {}: {source}", path.display())]
    Io {
        /// What we were doing, e.g. "fdatasync".
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A WAL segment holds data that is neither valid nor a torn final write.
    #[error("corrupt WAL segment {} at byte offset {offset}: {reason}", path.display())]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Where in that file the bad data starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// A snapshot file is unreadable or inconsistent with the rest of the directory.
    #[error("corrupt snapshot {}: {reason}", path.display())]
    CorruptSnapshot {
        /// The snapshot file (or the snapshot directory).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The requested index is covered by the snapshot: its entry is gone.
    #[error("index {index} is compacted: the log starts at {first_index}")]
    Compacted {
        /// The index asked for.
        index: u64,
        /// The first index the log still holds.
        first_index: u64,
    },

    /// The requested range goes past the end of the log (or is reversed).
    #[error("entries [{lo}, {hi}) are unavailable: the log holds [{first_index}, {last_index}]")]
    Unavailable {
        /// Start of the range asked for.
        lo: u64,
        /// End (exclusive) of the range asked for.
        hi: u64,
        /// The first index held.
        first_index: u64,
        /// The last index held.
        last_index: u64,
    },

    /// An append would leave a hole after the last entry.
    #[error("append at index {index} would leave a gap after the last index {last_index}")]
    Gap {
        /// The first index of the append.
        index: u64,
        /// The last index held.
        last_index: u64,
    },

    /// The entries given to append are not usable as they are.
    #[error("invalid entries: {0}")]
    InvalidEntries(String),

    /// A snapshot at or below the current one was offered.
    #[error("snapshot at index {index} is not newer than the current snapshot at {current}")]
    SnapshotOutOfDate {
        /// The offered snapshot's index.
        index: u64,
        /// The current snapshot's index.
        current: u64,
    },

    /// A local snapshot does not describe an entry of the log.
    #[error("snapshot at index {index} with term {term} does not match the log: {reason}")]
    SnapshotMismatch {
        /// The snapshot's index.
        index: u64,
        /// The snapshot's term.
        term: u64,
        /// How it differs.
        reason: String,
    },

    /// An earlier write or sync failed, so what is on disk is unknown; reopen to recover.
    #[error("storage is poisoned by an earlier I/O failure; reopen it to recover from disk")]
    Poisoned,

    /// Another open store (in this or another process) holds the directory.
    #[error("{} is locked by another open store", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
}

/// Builds a `map_err` closure that wraps an [`io::Error`] with what we were doing and where.
pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError::Io { op, path, source }
}
