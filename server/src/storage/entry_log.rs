//! The in-memory view of a group's log: a snapshot boundary followed by contiguous entries.
//!
//! Both [`Wal`](super::Wal) and [`MemStore`](super::MemStore) keep their entries here, so the two
//! accept and refuse exactly the same calls and answer reads identically; they differ only in how
//! they make the changes durable. The `check_*` methods validate without changing anything, so a
//! store can refuse a bad call before it has written a byte.

use std::collections::VecDeque;

use sync_proto::raft::v1::Entry;

use super::error::StorageError;

/// Entries `[snapshot_index + 1, last_index]`, held in memory.
///
/// Invariant: `entries[i].index == snapshot_index + 1 + i`. The whole log since the last snapshot
/// stays in memory (entry payloads are `Bytes`, so reads share rather than copy them); snapshots
/// are what bound its size.
#[derive(Debug, Clone, Default)]
pub(crate) struct EntryLog {
    /// The index of the last entry covered by the snapshot (0 without one).
    snapshot_index: u64,
    /// The term of that entry (0 without a snapshot).
    snapshot_term: u64,
    /// The entries after the snapshot, in index order.
    entries: VecDeque<Entry>,
}

impl EntryLog {
    /// A log whose snapshot ends at `snapshot_index`/`snapshot_term`, followed by `entries`, which
    /// the caller guarantees start at `snapshot_index + 1` and are contiguous.
    pub(crate) fn new(snapshot_index: u64, snapshot_term: u64, entries: Vec<Entry>) -> Self {
        debug_assert!(
            entries
                .iter()
                .enumerate()
                .all(|(i, e)| e.index == snapshot_index + 1 + i as u64)
        );
        EntryLog {
            snapshot_index,
            snapshot_term,
            entries: entries.into(),
        }
    }

    pub(crate) fn first_index(&self) -> u64 {
        self.snapshot_index + 1
    }

    pub(crate) fn last_index(&self) -> u64 {
        self.snapshot_index + self.entries.len() as u64
    }

    pub(crate) fn snapshot_index(&self) -> u64 {
        self.snapshot_index
    }

    pub(crate) fn term(&self, index: u64) -> Result<u64, StorageError> {
        if index < self.snapshot_index {
            return Err(StorageError::Compacted {
                index,
                first_index: self.first_index(),
            });
        }
        if index == self.snapshot_index {
            return Ok(self.snapshot_term);
        }
        match self.entries.get((index - self.first_index()) as usize) {
            Some(entry) => Ok(entry.term),
            None => Err(StorageError::Unavailable {
                lo: index,
                hi: index + 1,
                first_index: self.first_index(),
                last_index: self.last_index(),
            }),
        }
    }

    pub(crate) fn entries(&self, lo: u64, hi: u64) -> Result<Vec<Entry>, StorageError> {
        if lo < self.first_index() {
            return Err(StorageError::Compacted {
                index: lo,
                first_index: self.first_index(),
            });
        }
        if hi > self.last_index() + 1 || lo > hi {
            return Err(StorageError::Unavailable {
                lo,
                hi,
                first_index: self.first_index(),
                last_index: self.last_index(),
            });
        }
        let start = (lo - self.first_index()) as usize;
        let end = (hi - self.first_index()) as usize;
        Ok(self.entries.range(start..end).cloned().collect())
    }

    /// Checks that `entries` can be appended: consecutive indexes, starting after the snapshot and
    /// at most one past the last entry.
    pub(crate) fn check_append(&self, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if let Some(pair) = entries.windows(2).find(|w| w[1].index != w[0].index + 1) {
            return Err(StorageError::InvalidEntries(format!(
                "index {} follows index {}; appended entries must be consecutive",
                pair[1].index, pair[0].index
            )));
        }
        if first.index <= self.snapshot_index {
            // Entries at or below the snapshot are committed and already applied; rewriting them
            // would be meaningless, and accepting them silently could hide a bug in the caller.
            return Err(StorageError::Compacted {
                index: first.index,
                first_index: self.first_index(),
            });
        }
        if first.index > self.last_index() + 1 {
            return Err(StorageError::Gap {
                index: first.index,
                last_index: self.last_index(),
            });
        }
        Ok(())
    }

    /// Appends checked `entries`, first discarding the entries from `entries[0].index` on.
    /// Returns the discarded entries, oldest first.
    pub(crate) fn append(&mut self, entries: &[Entry]) -> Vec<Entry> {
        let Some(first) = entries.first() else {
            return Vec::new();
        };
        let keep = (first.index - self.first_index()) as usize;
        let discarded = self.entries.split_off(keep).into();
        self.entries.extend(entries.iter().cloned());
        discarded
    }

    /// Checks that a snapshot taken locally at `index`/`term` describes an entry of this log.
    pub(crate) fn check_save_snapshot(&self, index: u64, term: u64) -> Result<(), StorageError> {
        self.check_newer_snapshot(index)?;
        match self.term(index) {
            Ok(t) if t == term => Ok(()),
            Ok(t) => Err(StorageError::SnapshotMismatch {
                index,
                term,
                reason: format!("the entry at that index has term {t}"),
            }),
            Err(_) => Err(StorageError::SnapshotMismatch {
                index,
                term,
                reason: format!("the log ends at {}", self.last_index()),
            }),
        }
    }

    /// Checks that a snapshot at `index` is newer than the current one.
    pub(crate) fn check_newer_snapshot(&self, index: u64) -> Result<(), StorageError> {
        if index <= self.snapshot_index {
            return Err(StorageError::SnapshotOutOfDate {
                index,
                current: self.snapshot_index,
            });
        }
        Ok(())
    }

    /// Whether the log holds an entry at `index` with `term` (true at the snapshot boundary when
    /// the snapshot's term matches).
    pub(crate) fn matches(&self, index: u64, term: u64) -> bool {
        self.term(index).is_ok_and(|t| t == term)
    }

    /// Moves the snapshot boundary to `index`/`term` (checked by the caller), dropping the entries
    /// up to it. If the log holds the entry `index`/`term`, the entries after it are kept and `true`
    /// is returned; otherwise every entry is discarded and `false` is returned.
    pub(crate) fn apply_snapshot(&mut self, index: u64, term: u64) -> bool {
        let keep = self.matches(index, term);
        if keep {
            let drop = (index - self.snapshot_index) as usize;
            self.entries.drain(..drop);
        } else {
            self.entries.clear();
        }
        self.snapshot_index = index;
        self.snapshot_term = term;
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    fn run(from: u64, to: u64, term: u64) -> Vec<Entry> {
        (from..=to).map(|i| entry(i, term)).collect()
    }

    #[test]
    fn append_overwrites_the_suffix_from_the_first_new_index() {
        let mut log = EntryLog::default();
        log.append(&run(1, 5, 1));
        let discarded = log.append(&run(3, 4, 2));
        assert_eq!(discarded, run(3, 5, 1));
        assert_eq!(log.last_index(), 4);
        assert_eq!(log.term(2).ok(), Some(1));
        assert_eq!(log.term(3).ok(), Some(2));
    }

    #[test]
    fn append_refuses_gaps_compacted_indexes_and_non_consecutive_entries() {
        let mut log = EntryLog::default();
        log.append(&run(1, 5, 1));
        assert!(matches!(
            log.check_append(&run(7, 7, 1)),
            Err(StorageError::Gap {
                index: 7,
                last_index: 5
            })
        ));
        assert!(matches!(
            log.check_append(&[entry(3, 1), entry(5, 1)]),
            Err(StorageError::InvalidEntries(_))
        ));
        log.apply_snapshot(3, 1);
        assert!(matches!(
            log.check_append(&run(3, 4, 1)),
            Err(StorageError::Compacted {
                index: 3,
                first_index: 4
            })
        ));
        assert!(log.check_append(&run(4, 9, 2)).is_ok());
    }

    #[test]
    fn snapshot_keeps_the_suffix_only_when_the_boundary_entry_matches() {
        let mut log = EntryLog::default();
        log.append(&run(1, 5, 1));
        assert!(log.apply_snapshot(2, 1));
        assert_eq!((log.first_index(), log.last_index()), (3, 5));
        assert!(!log.apply_snapshot(4, 9));
        assert_eq!((log.first_index(), log.last_index()), (5, 4));
        assert_eq!(log.term(4).ok(), Some(9));
    }

    #[test]
    fn reads_outside_the_log_are_compacted_or_unavailable() {
        let mut log = EntryLog::default();
        log.append(&run(1, 5, 1));
        log.apply_snapshot(2, 1);
        assert!(matches!(
            log.entries(2, 4),
            Err(StorageError::Compacted { .. })
        ));
        assert!(matches!(
            log.entries(3, 7),
            Err(StorageError::Unavailable { .. })
        ));
        assert!(matches!(log.term(6), Err(StorageError::Unavailable { .. })));
        assert_eq!(log.entries(3, 6).map(|e| e.len()).ok(), Some(3));
        assert_eq!(log.entries(6, 6).map(|e| e.len()).ok(), Some(0));
    }
}
