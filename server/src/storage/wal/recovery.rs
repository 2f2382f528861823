//! Rebuilding a group's state from its snapshot and WAL segments after a restart.
//!
//! # Replay rules
//!
//! Records are replayed in order (segments by sequence number, frames by offset, records within a
//! frame) on top of the newest snapshot, whose index we call `S`:
//!
//! - an entry whose index is at or below the log's current last index replaces the suffix from
//!   there (a follower overwrote a conflicting tail); an entry more than one past the last index is
//!   a gap: corruption;
//! - the latest hard state wins;
//! - a snapshot record with `reset` empties the log, which continues after its index; one without
//!   `reset` changes nothing (the entries after it were kept);
//! - entries at or below `S` are covered by the snapshot and are not returned, but they still take
//!   part in the overwrite rule, since an overwrite at or below `S` discards everything above it.
//!
//! Replay keeps only the part of the log above `S`. That is all compaction leaves: the oldest
//! segment kept was created when the log ended at or below `S` (see `Wal::purge_segments`), so
//! every entry above `S`, and every overwrite that shaped that part of the log, is in the segments
//! that remain.
//!
//! # Anchoring the log to the snapshot
//!
//! The entries above `S` are returned only if the log is known to continue the snapshot: the WAL
//! holds a snapshot record for `S`, or the replayed log holds the entry `S` with the snapshot's term.
//! Otherwise the process stopped after an installed snapshot's file became durable but before its
//! "log reset" record did, and the entries left over conflict with the snapshot: they are dropped,
//! and `Wal::open` writes the missing record before anything else.

use std::fs;

use sync_proto::raft::v1::{Entry, HardState, SnapshotMetadata};

use crate::storage::RecoveredState;
use crate::storage::error::{StorageError, io_err};

use super::record::{Record, decode_records};
use super::segment::{self, HEADER_LEN, SegmentFile, Tail};

/// The replayed log above the snapshot: a pure state machine over records, so that its rules can be
/// tested without files.
#[derive(Debug)]
pub(crate) struct Replay {
    /// The newest snapshot's index (`S`), 0 without one.
    snapshot_index: u64,
    /// The newest snapshot's term, 0 without one.
    snapshot_term: u64,
    /// The entries `[S + 1, last]`, contiguous (empty while the log ends at or below `S`).
    entries: Vec<Entry>,
    /// The log's last index as the records replayed so far leave it; `None` until the first entry
    /// or reset record, since the entries before the oldest remaining segment are unknown.
    last: Option<u64>,
    /// The term of the log's entry at `S`, when the replay has seen it (or a snapshot record for `S`).
    term_at_snapshot: Option<u64>,
    /// Whether a snapshot record for `S` was replayed.
    snapshot_recorded: bool,
    /// The latest hard state.
    hard_state: Option<HardState>,
}

/// What replay concluded.
#[derive(Debug)]
pub(crate) struct Replayed {
    /// The recovered state (entries dropped if the log was not anchored to the snapshot).
    pub(crate) state: RecoveredState,
    /// An upper bound of the log's last index as the records on disk leave it (used to name the
    /// next segment; see `Wal::purge_segments` for why an upper bound is what it needs).
    pub(crate) disk_last_index: u64,
    /// Whether the WAL lacks the snapshot record for the newest snapshot; if so it must be written
    /// (reset if `!anchored`) before any segment may be deleted.
    pub(crate) snapshot_record_missing: bool,
    /// Whether the entries above the snapshot continue it (see the module doc).
    pub(crate) anchored: bool,
}

impl Replay {
    pub(crate) fn new(snapshot: Option<&SnapshotMetadata>) -> Self {
        let (snapshot_index, snapshot_term) =
            snapshot.map_or((0, 0), |s| (s.last_index, s.last_term));
        Replay {
            snapshot_index,
            snapshot_term,
            entries: Vec::new(),
            last: None,
            term_at_snapshot: None,
            snapshot_recorded: false,
            hard_state: None,
        }
    }

    /// Applies one record; an error is the reason the record cannot be part of a valid log.
    pub(crate) fn apply(&mut self, record: Record) -> Result<(), String> {
        let s = self.snapshot_index;
        match record {
            Record::Entry(entry) => {
                let index = entry.index;
                if index == 0 {
                    return Err("entry with index 0".into());
                }
                match self.last {
                    Some(last) if index > last + 1 => {
                        return Err(format!(
                            "entry {index} leaves a gap after the last index {last}"
                        ));
                    }
                    None if index > s + 1 => {
                        return Err(format!(
                            "the first entry replayed, {index}, leaves a gap after the snapshot at {s}"
                        ));
                    }
                    _ => {}
                }
                if index <= s && self.snapshot_recorded {
                    return Err(format!(
                        "entry {index} was written after the snapshot at {s}, which covers it"
                    ));
                }
                if index <= s {
                    // Overwrites everything from `index` on: nothing above S survives.
                    self.entries.clear();
                    self.term_at_snapshot = (index == s).then_some(entry.term);
                } else {
                    self.entries.truncate((index - s - 1) as usize);
                    self.entries.push(entry);
                }
                self.last = Some(index);
            }
            Record::HardState(hs) => self.hard_state = Some(hs),
            Record::Snapshot { index, term, reset } => {
                if index > s {
                    return Err(format!(
                        "the WAL records a snapshot at index {index}, but the newest snapshot file \
                         is at {s}: a snapshot file is missing"
                    ));
                }
                if index == s {
                    if term != self.snapshot_term {
                        return Err(format!(
                            "the WAL records the snapshot at index {index} with term {term}, the \
                             snapshot file has term {}",
                            self.snapshot_term
                        ));
                    }
                    self.snapshot_recorded = true;
                }
                if reset {
                    self.entries.clear();
                    self.last = Some(index);
                    self.term_at_snapshot = (index == s).then_some(term);
                } else {
                    if let Some(last) = self.last.filter(|&last| last < index) {
                        return Err(format!(
                            "snapshot record at index {index} is past the last index {last}"
                        ));
                    }
                    if index == s {
                        match self.term_at_snapshot {
                            Some(t) if t != term => {
                                return Err(format!(
                                    "snapshot record says the entry at {index} has term {term}, \
                                     the log has term {t}"
                                ));
                            }
                            _ => self.term_at_snapshot = Some(term),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Finishes the replay (see "Anchoring" in the module doc).
    pub(crate) fn finish(self, snapshot: Option<&SnapshotMetadata>) -> Replayed {
        let anchored = snapshot.is_none() || self.term_at_snapshot == Some(self.snapshot_term);
        let disk_last_index = self.last.unwrap_or(0).max(self.snapshot_index);
        let entries = if anchored { self.entries } else { Vec::new() };
        Replayed {
            state: RecoveredState {
                hard_state: self.hard_state.unwrap_or_default(),
                snapshot: snapshot.cloned(),
                entries,
            },
            disk_last_index,
            snapshot_record_missing: snapshot.is_some() && !self.snapshot_recorded,
            anchored,
        }
    }
}

/// The outcome of recovering the WAL directory.
#[derive(Debug)]
pub(crate) struct Recovery {
    /// What replay concluded.
    pub(crate) replayed: Replayed,
    /// The segments left, oldest first; the last one is where appends go.
    pub(crate) segments: Vec<SegmentFile>,
    /// The logical length of the last segment (where its frames end, after cutting a torn
    /// tail): where the next frame goes.
    pub(crate) last_len: u64,
    /// The last segment's file size: `last_len` plus the zeros preallocated after it.
    pub(crate) last_allocated: u64,
}

/// Replays every segment of `wal_dir` on top of `snapshot`, then repairs a torn tail: the last
/// segment is cut back to its last valid frame, or removed if no frame of it survived. Zeros after
/// a segment's last frame are preallocated space, not a tail to repair (see `segment.rs`). The
/// disk is changed only after every check has passed.
pub(crate) fn recover(
    wal_dir: &std::path::Path,
    snapshot: Option<&SnapshotMetadata>,
) -> Result<Recovery, StorageError> {
    let mut segments = segment::list(wal_dir)?;
    let mut replay = Replay::new(snapshot);
    let mut prev_len: Option<u64> = None;
    // (logical length, file size) of each segment, for the last one and the one before it.
    let mut lens: Vec<(u64, u64)> = Vec::with_capacity(segments.len());
    let mut torn = None;
    let count = segments.len();
    for (i, seg) in segments.iter().enumerate() {
        let is_last = i + 1 == count;
        let bytes = fs::read(&seg.path).map_err(io_err("read", &seg.path))?;
        let scanned = segment::scan(seg, &bytes, is_last)?;
        let recorded_prev_len = scanned.header.as_ref().map(|h| h.prev_len);
        if let Some((recorded, prev_len)) = recorded_prev_len
            .zip(prev_len)
            .filter(|(recorded, actual)| recorded != actual)
        {
            let prev = &segments[i - 1];
            return Err(StorageError::Corrupt {
                path: prev.path.clone(),
                offset: prev_len.min(recorded),
                reason: format!(
                    "the segment is {prev_len} bytes long, but the next segment's header records \
                     {recorded} bytes: its tail was lost or something was appended after it was \
                     closed"
                ),
            });
        }
        for frame in &scanned.frames {
            let records =
                decode_records(frame.payload).map_err(|(at, reason)| StorageError::Corrupt {
                    path: seg.path.clone(),
                    offset: frame.payload_offset + at as u64,
                    reason: format!("in the frame at byte {}: {reason}", frame.offset),
                })?;
            for (at, record) in records {
                replay
                    .apply(record)
                    .map_err(|reason| StorageError::Corrupt {
                        path: seg.path.clone(),
                        offset: frame.payload_offset + at as u64,
                        reason,
                    })?;
            }
        }
        prev_len = Some(scanned.len);
        lens.push((scanned.len, bytes.len() as u64));
        if let Tail::Torn { offset, .. } = scanned.tail {
            torn = Some((offset, scanned.frames.is_empty()));
        } else if is_last && scanned.frames.is_empty() {
            // A header with no frame: the rest of its first write never made it.
            torn = Some((HEADER_LEN as u64, true));
        }
    }

    if let (Some((offset, no_frames)), Some(last)) = (torn, segments.last()) {
        if no_frames {
            // Nothing in it was ever acknowledged. Removing it keeps every segment starting with
            // a frame (which carries the hard state the segment was created with).
            fs::remove_file(&last.path).map_err(io_err("remove torn segment", &last.path))?;
            crate::storage::fsutil::fsync_dir(wal_dir)?;
            segments.pop();
            lens.pop();
        } else {
            let file = fs::OpenOptions::new()
                .write(true)
                .open(&last.path)
                .map_err(io_err("open torn segment", &last.path))?;
            file.set_len(offset)
                .map_err(io_err("truncate torn tail of", &last.path))?;
            file.sync_all()
                .map_err(io_err("fsync truncated", &last.path))?;
            if let Some(last) = lens.last_mut() {
                *last = (offset, offset);
            }
        }
    }

    let (last_len, last_allocated) = lens.last().copied().unwrap_or((0, 0));
    Ok(Recovery {
        replayed: replay.finish(snapshot),
        segments,
        last_len,
        last_allocated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Record {
        Record::Entry(Entry {
            index,
            term,
            ..Default::default()
        })
    }

    fn snap(index: u64, term: u64) -> SnapshotMetadata {
        SnapshotMetadata {
            last_index: index,
            last_term: term,
            config: None,
        }
    }

    fn indexes_and_terms(replayed: &Replayed) -> Vec<(u64, u64)> {
        replayed
            .state
            .entries
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    fn replay(
        snapshot: Option<&SnapshotMetadata>,
        records: Vec<Record>,
    ) -> Result<Replayed, String> {
        let mut replay = Replay::new(snapshot);
        for record in records {
            replay.apply(record)?;
        }
        Ok(replay.finish(snapshot))
    }

    #[test]
    fn entry_at_or_below_the_last_index_replaces_the_suffix() -> Result<(), String> {
        let r = replay(
            None,
            vec![
                entry(1, 1),
                entry(2, 1),
                entry(3, 1),
                entry(2, 2),
                entry(3, 2),
            ],
        )?;
        assert_eq!(indexes_and_terms(&r), vec![(1, 1), (2, 2), (3, 2)]);
        Ok(())
    }

    #[test]
    fn gap_in_indexes_is_refused() {
        assert!(replay(None, vec![entry(1, 1), entry(3, 1)]).is_err());
        assert!(replay(None, vec![entry(2, 1)]).is_err());
        assert!(replay(Some(&snap(5, 1)), vec![entry(7, 1)]).is_err());
    }

    #[test]
    fn overwrite_below_the_snapshot_discards_everything_above_it() -> Result<(), String> {
        // Entries 1..=8, then 4..=5 rewritten in term 2; snapshot at 5 (term 2).
        let mut records: Vec<Record> = (1..=8).map(|i| entry(i, 1)).collect();
        records.extend([entry(4, 2), entry(5, 2)]);
        records.push(Record::Snapshot {
            index: 5,
            term: 2,
            reset: false,
        });
        let r = replay(Some(&snap(5, 2)), records)?;
        assert!(r.anchored);
        assert_eq!(indexes_and_terms(&r), vec![]);
        assert_eq!(r.disk_last_index, 5);
        Ok(())
    }

    #[test]
    fn replay_from_a_compacted_start_needs_no_earlier_entries() -> Result<(), String> {
        // The oldest remaining segment starts at index 4 (earlier ones deleted); snapshot at 5.
        let records = vec![
            entry(4, 1),
            entry(5, 1),
            Record::Snapshot {
                index: 5,
                term: 1,
                reset: false,
            },
            entry(6, 1),
            entry(7, 1),
        ];
        let r = replay(Some(&snap(5, 1)), records)?;
        assert_eq!(indexes_and_terms(&r), vec![(6, 1), (7, 1)]);
        assert!(!r.snapshot_record_missing);
        Ok(())
    }

    #[test]
    fn installed_snapshot_without_its_reset_record_drops_the_conflicting_log() -> Result<(), String>
    {
        // Log 1..=6 in term 1; a leader's snapshot at 5 in term 3 became durable, its reset
        // record did not.
        let records = (1..=6).map(|i| entry(i, 1)).collect();
        let r = replay(Some(&snap(5, 3)), records)?;
        assert!(!r.anchored);
        assert!(r.snapshot_record_missing);
        assert_eq!(indexes_and_terms(&r), vec![]);
        Ok(())
    }

    #[test]
    fn local_snapshot_without_its_record_keeps_the_matching_log() -> Result<(), String> {
        let records = (1..=6).map(|i| entry(i, 1)).collect();
        let r = replay(Some(&snap(5, 1)), records)?;
        assert!(r.anchored);
        assert!(r.snapshot_record_missing);
        assert_eq!(indexes_and_terms(&r), vec![(6, 1)]);
        Ok(())
    }

    #[test]
    fn reset_record_empties_the_log_and_appends_continue_after_it() -> Result<(), String> {
        let mut records: Vec<Record> = (1..=6).map(|i| entry(i, 1)).collect();
        records.push(Record::Snapshot {
            index: 9,
            term: 4,
            reset: true,
        });
        records.push(entry(10, 4));
        let r = replay(Some(&snap(9, 4)), records)?;
        assert_eq!(indexes_and_terms(&r), vec![(10, 4)]);
        Ok(())
    }

    #[test]
    fn snapshot_record_without_its_snapshot_file_is_refused() {
        let records = vec![
            entry(1, 1),
            Record::Snapshot {
                index: 1,
                term: 1,
                reset: false,
            },
        ];
        assert!(replay(None, records).is_err());
    }
}
