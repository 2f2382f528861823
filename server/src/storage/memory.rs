//! An in-memory [`LogStore`] with the semantics of the [`Wal`](super::Wal), crashes included.
//!
//! Unit tests and the deterministic simulator use it in place of the disk. It shares the log logic
//! with the `Wal` (`entry_log.rs`), so it accepts and refuses the same calls, and it remembers what
//! has been synced so that [`MemStore::crash`] can forget exactly what a real crash would: every
//! write buffered since the last [`sync`](LogStore::sync). Snapshot calls are durable when they
//! return, as on disk.

use sync_proto::raft::v1::{Entry, HardState, SnapshotMetadata};

use super::entry_log::EntryLog;
use super::error::StorageError;
use super::{LogStore, RecoveredState};

/// An in-memory store for one Raft group.
///
/// What a crash would keep is tracked without copying the log at each sync: the durable log is
/// `log[..=synced_prefix]` followed by `overwritten`, the durable entries that buffered appends
/// have since replaced. Appends that overwrite durable entries move them to `overwritten`; a sync
/// forgets them; a crash puts them back.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    /// The log as reads see it, buffered appends included.
    log: EntryLog,
    /// The last index up to which `log` holds the durable log unchanged.
    synced_prefix: u64,
    /// The durable entries after `synced_prefix` that buffered appends replaced, oldest first.
    overwritten: Vec<Entry>,
    /// The latest hard state, buffered or not.
    hard_state: HardState,
    /// The hard state as of the last sync.
    synced_hard_state: HardState,
    /// The durable snapshot.
    snapshot: Option<(SnapshotMetadata, Vec<u8>)>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        MemStore::default()
    }

    /// What a restart would recover now (the store is unchanged).
    pub fn durable_state(&self) -> RecoveredState {
        let mut durable = self.clone();
        durable.crash()
    }

    /// Simulates a crash and restart: forgets everything buffered since the last sync and returns
    /// what a [`Wal`](super::Wal) would recover.
    pub fn crash(&mut self) -> RecoveredState {
        let first = self.log.first_index();
        let keep = self.synced_prefix.saturating_sub(first - 1);
        let mut entries = self.log.entries(first, first + keep).unwrap_or_default();
        entries.append(&mut self.overwritten);
        let (index, term) = self
            .snapshot
            .as_ref()
            .map_or((0, 0), |(m, _)| (m.last_index, m.last_term));
        self.log = EntryLog::new(index, term, entries.clone());
        self.synced_prefix = self.log.last_index();
        self.hard_state = self.synced_hard_state;
        RecoveredState {
            hard_state: self.hard_state,
            snapshot: self.snapshot.as_ref().map(|(m, _)| m.clone()),
            entries,
        }
    }

    /// The snapshot steps shared by save and install (metadata already checked); durable at once.
    fn apply_snapshot(&mut self, meta: &SnapshotMetadata, data: &[u8]) {
        self.sync_now();
        self.log.apply_snapshot(meta.last_index, meta.last_term);
        self.synced_prefix = self.log.last_index();
        self.snapshot = Some((meta.clone(), data.to_vec()));
    }

    fn sync_now(&mut self) {
        self.synced_prefix = self.log.last_index();
        self.overwritten.clear();
        self.synced_hard_state = self.hard_state;
    }
}

impl LogStore for MemStore {
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.log.check_append(entries)?;
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let discarded = self.log.append(entries);
        if first.index <= self.synced_prefix {
            // Entries [first.index, synced_prefix] were durable: keep them for a crash, in front
            // of any durable entries replaced earlier (which all come after synced_prefix).
            let durable = (self.synced_prefix - first.index + 1) as usize;
            let mut saved: Vec<Entry> = discarded.into_iter().take(durable).collect();
            saved.append(&mut self.overwritten);
            self.overwritten = saved;
            self.synced_prefix = first.index - 1;
        }
        Ok(())
    }

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        self.hard_state = *hs;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        self.sync_now();
        Ok(())
    }

    fn save_snapshot(&mut self, meta: &SnapshotMetadata, data: &[u8]) -> Result<(), StorageError> {
        self.log
            .check_save_snapshot(meta.last_index, meta.last_term)?;
        self.apply_snapshot(meta, data);
        Ok(())
    }

    fn install_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        data: &[u8],
    ) -> Result<(), StorageError> {
        self.log.check_newer_snapshot(meta.last_index)?;
        self.apply_snapshot(meta, data);
        Ok(())
    }

    fn snapshot(&self) -> Result<Option<(SnapshotMetadata, Vec<u8>)>, StorageError> {
        Ok(self.snapshot.clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(from: u64, to: u64, term: u64) -> Vec<Entry> {
        (from..=to)
            .map(|index| Entry {
                index,
                term,
                ..Default::default()
            })
            .collect()
    }

    fn terms(state: &RecoveredState) -> Vec<(u64, u64)> {
        state.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn crash_forgets_everything_buffered_since_the_last_sync() -> Result<(), StorageError> {
        let mut store = MemStore::new();
        store.append(&run(1, 3, 1))?;
        store.set_hard_state(&HardState {
            term: 1,
            vote: 1,
            commit: 2,
        })?;
        store.sync()?;
        store.append(&run(4, 6, 1))?;
        store.set_hard_state(&HardState {
            term: 2,
            vote: 0,
            commit: 3,
        })?;
        let state = store.crash();
        assert_eq!(terms(&state), vec![(1, 1), (2, 1), (3, 1)]);
        assert_eq!(state.hard_state.term, 1);
        assert_eq!(store.last_index(), 3);
        Ok(())
    }

    #[test]
    fn crash_restores_durable_entries_that_an_unsynced_overwrite_replaced()
    -> Result<(), StorageError> {
        let mut store = MemStore::new();
        store.append(&run(1, 6, 1))?;
        store.sync()?;
        store.append(&run(5, 7, 2))?;
        store.append(&run(3, 3, 3))?;
        let state = store.crash();
        assert_eq!(
            terms(&state),
            run(1, 6, 1)
                .iter()
                .map(|e| (e.index, 1))
                .collect::<Vec<_>>()
        );
        // And a synced overwrite survives.
        store.append(&run(5, 7, 2))?;
        store.sync()?;
        let state = store.crash();
        assert_eq!(
            terms(&state),
            vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2), (7, 2)]
        );
        Ok(())
    }

    #[test]
    fn snapshot_calls_are_durable_when_they_return() -> Result<(), StorageError> {
        let mut store = MemStore::new();
        store.append(&run(1, 6, 1))?;
        let meta = SnapshotMetadata {
            last_index: 4,
            last_term: 1,
            config: None,
        };
        store.save_snapshot(&meta, b"state")?;
        let state = store.crash();
        assert_eq!(state.snapshot, Some(meta));
        assert_eq!(terms(&state), vec![(5, 1), (6, 1)]);
        Ok(())
    }
}
