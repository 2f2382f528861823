//! The engine's in-memory view of the replicated log.
//!
//! The log after the last snapshot lives here; the shell keeps a durable copy and feeds it back
//! at restart. Four positions describe it, always in this order:
//!
//! ```text
//!   snapshot_index <= applied <= committed,   applied <= persisted <= last_index
//!                                             unstable_from <= last_index + 1
//! ```
//!
//! - `persisted`: the shell confirmed entries up to here are durable ([`RaftLog::persisted_to`]).
//! - `unstable_from`: entries from here on were not yet handed to the shell to persist.
//! - `applied`: committed entries up to here were handed to the shell to apply. Only durable
//!   entries are handed out, so a restarted node never finds its state machine ahead of its log.

use sync_proto::raft::v1 as pb;

/// Entries after the snapshot, plus the positions described in the module docs.
#[derive(Clone, Debug)]
pub struct RaftLog {
    /// Index of the last entry covered by the snapshot (0 if none).
    snapshot_index: u64,
    /// Term of that entry.
    snapshot_term: u64,
    /// Entries `snapshot_index + 1 ..= last_index`, contiguous.
    entries: Vec<pb::Entry>,
    /// Highest index known committed.
    committed: u64,
    /// Highest index handed out for applying.
    applied: u64,
    /// Highest index known durable.
    persisted: u64,
    /// First index not yet handed out for persisting.
    unstable_from: u64,
    /// Bytes of entry data held (for the log-size metric).
    data_bytes: u64,
}

fn data_bytes(entries: &[pb::Entry]) -> u64 {
    entries.iter().map(|e| e.data.len() as u64).sum()
}

impl RaftLog {
    /// A log restored from durable state: a snapshot point and the entries after it, all of
    /// them persisted; `committed` as recorded in the hard state.
    pub fn restore(
        snapshot_index: u64,
        snapshot_term: u64,
        entries: Vec<pb::Entry>,
        committed: u64,
    ) -> Self {
        let last = snapshot_index + entries.len() as u64;
        RaftLog {
            data_bytes: data_bytes(&entries),
            snapshot_index,
            snapshot_term,
            entries,
            committed: committed.clamp(snapshot_index, last),
            applied: snapshot_index,
            persisted: last,
            unstable_from: last + 1,
        }
    }

    /// Index of the first entry still held (may be `last_index + 1` when empty).
    pub fn first_index(&self) -> u64 {
        self.snapshot_index + 1
    }

    /// Index of the last entry (or of the snapshot when no entry follows it).
    pub fn last_index(&self) -> u64 {
        self.snapshot_index + self.entries.len() as u64
    }

    /// Term of the last entry.
    pub fn last_term(&self) -> u64 {
        self.entries
            .last()
            .map(|e| e.term)
            .unwrap_or(self.snapshot_term)
    }

    /// The snapshot point `(index, term)`.
    pub fn snapshot_point(&self) -> (u64, u64) {
        (self.snapshot_index, self.snapshot_term)
    }

    /// Bytes of entry data held after the snapshot.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Highest committed index.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Highest index handed out for applying.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Highest durable index.
    pub fn persisted(&self) -> u64 {
        self.persisted
    }

    /// Term of the entry at `index`; `None` if compacted away or beyond the end.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        self.entry(index).map(|e| e.term)
    }

    /// The entry at `index`, if held.
    pub fn entry(&self, index: u64) -> Option<&pb::Entry> {
        if index <= self.snapshot_index {
            return None;
        }
        self.entries.get((index - self.snapshot_index - 1) as usize)
    }

    /// True if the log holds an entry at `index` with `term` (index 0 matches term 0).
    pub fn matches(&self, index: u64, term: u64) -> bool {
        self.term(index) == Some(term)
    }

    /// True if a candidate whose log ends at `(last_index, last_term)` is at least as
    /// up-to-date as this log (Raft §5.4.1).
    pub fn is_up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// Entries from `lo` on, at most `max_entries` of them and at most `max_bytes` of data
    /// (but at least one, so progress is always possible). `None` if `lo` was compacted.
    pub fn entries_from(
        &self,
        lo: u64,
        max_entries: usize,
        max_bytes: u64,
    ) -> Option<Vec<pb::Entry>> {
        if lo <= self.snapshot_index {
            return None;
        }
        let start = (lo - self.snapshot_index - 1) as usize;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for e in self.entries.iter().skip(start).take(max_entries.max(1)) {
            bytes += e.data.len() as u64;
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(e.clone());
        }
        Some(out)
    }

    /// The last index at or below `index` whose term is at most `term`, with that term: the
    /// fast-backtracking probe point (as in etcd's `findConflictByTerm`). If the walk reaches
    /// compacted entries, returns `(index reached, 0)`.
    pub fn find_conflict_by_term(&self, index: u64, term: u64) -> (u64, u64) {
        let mut i = index.min(self.last_index());
        loop {
            match self.term(i) {
                Some(t) if t <= term => return (i, t),
                Some(_) if i > 0 => i -= 1,
                _ => return (i, 0),
            }
        }
    }

    /// Appends entries that follow on directly from the last entry (a leader's own proposals).
    pub fn append(&mut self, entries: Vec<pb::Entry>) {
        debug_assert!(
            entries
                .first()
                .is_none_or(|e| e.index == self.last_index() + 1)
        );
        self.data_bytes += data_bytes(&entries);
        self.entries.extend(entries);
    }

    /// The index of the first of `entries` that this log lacks or holds with another term, if
    /// any. Entries the log already holds identically are skipped: a duplicated or reordered
    /// AppendEntries must never truncate anything.
    pub fn find_conflict(&self, entries: &[pb::Entry]) -> Option<u64> {
        entries
            .iter()
            .find(|e| !self.matches(e.index, e.term))
            .map(|e| e.index)
    }

    /// Replaces everything from `entries[0].index` on with `entries`. The caller guarantees
    /// `entries[0].index` is above the commit index and at most `last_index + 1`.
    pub fn truncate_and_append(&mut self, entries: Vec<pb::Entry>) {
        let Some(first) = entries.first().map(|e| e.index) else {
            return;
        };
        assert!(
            first > self.committed,
            "raft invariant violated: truncating committed entry {first} (commit {})",
            self.committed
        );
        assert!(first > self.snapshot_index && first <= self.last_index() + 1);
        let keep = (first - self.snapshot_index - 1) as usize;
        self.data_bytes -= data_bytes(&self.entries[keep..]);
        self.entries.truncate(keep);
        self.data_bytes += data_bytes(&entries);
        self.entries.extend(entries);
        self.unstable_from = self.unstable_from.min(first);
        self.persisted = self.persisted.min(first - 1);
    }

    /// Advances the commit index (never backwards, never past the last entry).
    pub fn commit_to(&mut self, index: u64) -> bool {
        let index = index.min(self.last_index());
        if index > self.committed {
            self.committed = index;
            true
        } else {
            false
        }
    }

    /// Takes the entries not yet handed out for persisting.
    pub fn take_unstable(&mut self) -> Vec<pb::Entry> {
        let last = self.last_index();
        if self.unstable_from > last {
            return Vec::new();
        }
        let start = (self.unstable_from - self.snapshot_index - 1) as usize;
        self.unstable_from = last + 1;
        self.entries[start..].to_vec()
    }

    /// True if some entries were not yet handed out for persisting.
    pub fn has_unstable(&self) -> bool {
        self.unstable_from <= self.last_index()
    }

    /// Records that entries up to `index` with `term` there are durable. Ignored if the entry at
    /// `index` has since been replaced (the acknowledgement is about entries no longer in the
    /// log) or was never handed out.
    pub fn persisted_to(&mut self, index: u64, term: u64) -> bool {
        if index > self.persisted && index < self.unstable_from && self.matches(index, term) {
            self.persisted = index;
            true
        } else {
            false
        }
    }

    /// Committed, durable entries not yet handed out for applying, up to `max_bytes` of data
    /// (at least one entry when any is ready).
    pub fn take_committed(&mut self, max_bytes: u64) -> Vec<pb::Entry> {
        let hi = self.committed.min(self.persisted);
        if hi <= self.applied {
            return Vec::new();
        }
        let out = self
            .entries_from(self.applied + 1, (hi - self.applied) as usize, max_bytes)
            .unwrap_or_default();
        if let Some(last) = out.last() {
            self.applied = last.index;
        }
        out
    }

    /// True if committed, durable entries wait to be handed out.
    pub fn has_committed(&self) -> bool {
        self.committed.min(self.persisted) > self.applied
    }

    /// Drops entries up to `index` (a snapshot now covers them). The caller guarantees
    /// `snapshot_index < index <= min(applied, persisted)`.
    pub fn compact_to(&mut self, index: u64) {
        let term = self.term(index).expect("compaction point is held");
        let drop = (index - self.snapshot_index) as usize;
        self.data_bytes -= data_bytes(&self.entries[..drop]);
        self.entries.drain(..drop);
        self.snapshot_index = index;
        self.snapshot_term = term;
    }

    /// Replaces the whole log by a snapshot point (a snapshot from the leader was accepted). The
    /// snapshot is durable before the shell sends anything that depends on it.
    pub fn restore_snapshot(&mut self, index: u64, term: u64) {
        self.entries.clear();
        self.data_bytes = 0;
        self.snapshot_index = index;
        self.snapshot_term = term;
        self.committed = index;
        self.applied = index;
        self.persisted = index;
        self.unstable_from = index + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(from: u64, terms: &[u64]) -> Vec<pb::Entry> {
        terms
            .iter()
            .enumerate()
            .map(|(i, &term)| pb::Entry {
                term,
                index: from + i as u64,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn find_conflict_skips_entries_already_held() {
        let log = RaftLog::restore(0, 0, entries(1, &[1, 1, 2, 3]), 0);
        assert_eq!(log.find_conflict(&entries(2, &[1, 2])), None);
        assert_eq!(log.find_conflict(&entries(3, &[2, 4])), Some(4));
        assert_eq!(log.find_conflict(&entries(4, &[3, 3])), Some(5));
    }

    #[test]
    fn find_conflict_by_term_walks_back_to_a_term_no_higher() {
        let log = RaftLog::restore(0, 0, entries(1, &[1, 1, 4, 4, 5, 5]), 0);
        assert_eq!(log.find_conflict_by_term(6, 3), (2, 1));
        assert_eq!(log.find_conflict_by_term(6, 4), (4, 4));
        assert_eq!(log.find_conflict_by_term(10, 5), (6, 5));
        assert_eq!(log.find_conflict_by_term(6, 0), (0, 0));
    }

    #[test]
    #[should_panic(expected = "truncating committed entry")]
    fn truncating_a_committed_entry_is_refused() {
        let mut log = RaftLog::restore(0, 0, entries(1, &[1, 1, 1]), 2);
        log.truncate_and_append(entries(2, &[2]));
    }

    #[test]
    fn a_replaced_entry_is_not_marked_persisted_by_a_late_acknowledgement() {
        let mut log = RaftLog::restore(0, 0, entries(1, &[1]), 1);
        log.append(entries(2, &[1, 1, 1]));
        assert_eq!(log.take_unstable().len(), 3);
        log.truncate_and_append(entries(3, &[2]));
        assert!(!log.persisted_to(4, 1), "entry 4 of term 1 is gone");
        assert_eq!(log.take_unstable().len(), 1);
        assert!(log.persisted_to(3, 2));
        assert_eq!(log.persisted(), 3);
    }

    #[test]
    fn only_durable_committed_entries_are_handed_out_for_applying() {
        let mut log = RaftLog::restore(0, 0, Vec::new(), 0);
        log.append(entries(1, &[1, 1, 1]));
        let _ = log.take_unstable();
        log.commit_to(3);
        assert!(log.take_committed(u64::MAX).is_empty());
        log.persisted_to(2, 1);
        assert_eq!(log.take_committed(u64::MAX).len(), 2);
        assert_eq!(log.applied(), 2);
    }

    #[test]
    fn data_bytes_track_appends_truncations_and_compaction() {
        let mut log = RaftLog::restore(0, 0, entries(1, &[1, 1]), 0);
        log.append(vec![pb::Entry {
            term: 1,
            index: 3,
            data: bytes::Bytes::from_static(b"abcd"),
            ..Default::default()
        }]);
        assert_eq!(log.data_bytes(), 4);
        log.truncate_and_append(entries(3, &[2]));
        assert_eq!(log.data_bytes(), 0);
        log.commit_to(3);
        let _ = log.take_unstable();
        log.persisted_to(3, 2);
        let _ = log.take_committed(u64::MAX);
        log.compact_to(3);
        assert_eq!(log.data_bytes(), 0);
    }

    #[test]
    fn compaction_keeps_the_term_of_the_snapshot_point() {
        let mut log = RaftLog::restore(0, 0, entries(1, &[1, 2, 3]), 3);
        let _ = log.take_committed(u64::MAX);
        log.compact_to(2);
        assert_eq!(log.term(2), Some(2));
        assert_eq!(log.term(1), None);
        assert_eq!(log.first_index(), 3);
        assert_eq!(log.entries_from(2, 10, u64::MAX), None);
        assert_eq!(log.entries_from(3, 10, u64::MAX).unwrap().len(), 1);
    }
}
