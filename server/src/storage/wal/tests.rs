//! Tests of the on-disk WAL: durability, compaction, snapshots, and recovery from torn writes and
//! corruption. Each builds a real directory (under /dev/shm when it exists: these tests check what
//! is written and how it is read back, not the disk's flush, and tmpfs keeps them fast).

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sync_proto::raft::v1::{ClusterConfig, Entry, HardState, Member, SnapshotMetadata};

use super::record::{Batch, FRAME_HEADER_LEN, FrameRead, read_frame};
use super::segment::{self, HEADER_LEN, Header};
use super::{Wal, WalOptions};
use crate::storage::snapshot::SnapshotDir;
use crate::storage::{LogStore, MemStore, RecoveredState, StorageError};

type TestResult = Result<(), Box<dyn Error>>;

/// A fresh directory for one test, removed when dropped.
pub(crate) fn scratch() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("syncd-storage-");
        b
    };
    if shm.is_dir() {
        builder.tempdir_in(shm)
    } else {
        builder.tempdir()
    }
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: Bytes::from(format!("command {index} of term {term}")),
        ..Default::default()
    }
}

fn run(from: u64, to: u64, term: u64) -> Vec<Entry> {
    (from..=to).map(|i| entry(i, term)).collect()
}

fn hs(term: u64, vote: u64, commit: u64) -> HardState {
    HardState { term, vote, commit }
}

fn meta(index: u64, term: u64) -> SnapshotMetadata {
    SnapshotMetadata {
        last_index: index,
        last_term: term,
        config: Some(ClusterConfig {
            members: vec![Member {
                id: 1,
                address: "n1:7000".into(),
                learner: false,
            }],
        }),
    }
}

fn small_segments() -> WalOptions {
    WalOptions {
        segment_size: 300,
        preallocate: 100,
    }
}

/// For [`history`]: three segments quickly, then room for a handful of frames in the last one.
/// No preallocation: each segment file ends exactly where its frames do.
fn history_segments() -> WalOptions {
    WalOptions {
        segment_size: 600,
        preallocate: 0,
    }
}

/// Like [`history_segments`], with zeros written ahead of the frames (up to the segment size),
/// so that the last segment ends in preallocated space.
fn preallocated_history_segments() -> WalOptions {
    WalOptions {
        segment_size: 600,
        preallocate: 1024,
    }
}

fn reopen(dir: &Path, options: WalOptions) -> Result<(Wal, RecoveredState), StorageError> {
    Wal::open(dir, options)
}

/// Drives a `Wal` and a `MemStore` with the same calls, so the model says what must be durable.
struct Twin {
    wal: Wal,
    model: MemStore,
}

impl Twin {
    fn open(dir: &Path, options: WalOptions) -> Result<Twin, StorageError> {
        let (wal, _) = Wal::open(dir, options)?;
        Ok(Twin {
            wal,
            model: MemStore::new(),
        })
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.model.append(entries)?;
        self.wal.append(entries)
    }

    fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        self.model.set_hard_state(hs)?;
        self.wal.set_hard_state(hs)
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        self.model.sync()?;
        self.wal.sync()
    }

    fn save_snapshot(&mut self, meta: &SnapshotMetadata, data: &[u8]) -> Result<(), StorageError> {
        self.model.save_snapshot(meta, data)?;
        self.wal.save_snapshot(meta, data)
    }
}

fn files_in(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// Copies a group directory (wal/ and snap/), so that each damage test starts from the same bytes.
fn copy_group(from: &Path, to: &Path) -> std::io::Result<()> {
    for sub in ["wal", "snap"] {
        fs::create_dir_all(to.join(sub))?;
        for name in files_in(&from.join(sub))? {
            fs::copy(from.join(sub).join(&name), to.join(sub).join(&name))?;
        }
    }
    Ok(())
}

/// Byte ranges `[start, end)` of the valid frames of a segment file (up to its preallocated
/// zeros, if any).
fn frame_ranges(path: &Path) -> Result<Vec<(usize, usize)>, Box<dyn Error>> {
    let bytes = fs::read(path)?;
    let mut ranges = Vec::new();
    let mut at = HEADER_LEN;
    while !segment::all_zero(&bytes[at..]) {
        match read_frame(&bytes, at) {
            FrameRead::Valid { next, .. } => {
                ranges.push((at, next));
                at = next;
            }
            FrameRead::Invalid(reason) => return Err(reason.into()),
        }
    }
    Ok(ranges)
}

#[test]
fn round_trip_recovers_synced_entries_hard_state_and_snapshot() -> TestResult {
    // On the system temp dir rather than tmpfs, so that at least one test runs every fsync path
    // (file, directory, rename) against a real file system.
    let tmp = tempfile::tempdir()?;
    let (mut wal, state) = Wal::open(tmp.path(), WalOptions::default())?;
    assert_eq!(state, RecoveredState::default());
    wal.append(&run(1, 10, 1))?;
    wal.set_hard_state(&hs(1, 2, 7))?;
    wal.sync()?;
    wal.save_snapshot(&meta(4, 1), b"state at 4")?;
    wal.append(&run(11, 12, 2))?;
    wal.set_hard_state(&hs(2, 0, 11))?;
    wal.sync()?;
    drop(wal);

    let (wal, state) = reopen(tmp.path(), WalOptions::default())?;
    assert_eq!(state.hard_state, hs(2, 0, 11));
    assert_eq!(state.snapshot, Some(meta(4, 1)));
    let mut expected = run(5, 10, 1);
    expected.extend(run(11, 12, 2));
    assert_eq!(state.entries, expected);
    assert_eq!((wal.first_index(), wal.last_index()), (5, 12));
    assert_eq!(wal.entries(5, 13)?, expected);
    assert_eq!(wal.term(4)?, 1);
    assert_eq!(wal.snapshot()?, Some((meta(4, 1), b"state at 4".to_vec())));
    Ok(())
}

#[test]
fn writes_not_synced_are_not_recovered() -> TestResult {
    let tmp = scratch()?;
    let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default())?;
    wal.append(&run(1, 3, 1))?;
    wal.set_hard_state(&hs(1, 1, 0))?;
    wal.sync()?;
    wal.append(&run(4, 5, 1))?;
    wal.set_hard_state(&hs(2, 0, 0))?;
    drop(wal); // a crash: the batch was never written

    let (_, state) = reopen(tmp.path(), WalOptions::default())?;
    assert_eq!(state.entries, run(1, 3, 1));
    assert_eq!(state.hard_state, hs(1, 1, 0));
    Ok(())
}

#[test]
fn overwrite_of_a_suffix_is_recovered() -> TestResult {
    let tmp = scratch()?;
    let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default())?;
    wal.append(&run(1, 10, 1))?;
    wal.sync()?;
    wal.append(&run(5, 7, 2))?; // a new leader's entries replace 5..=10
    assert_eq!(wal.last_index(), 7);
    wal.sync()?;
    wal.append(&run(7, 8, 3))?; // and again, in the same segment
    wal.sync()?;
    drop(wal);

    let (_, state) = reopen(tmp.path(), WalOptions::default())?;
    let mut expected = run(1, 4, 1);
    expected.extend(run(5, 6, 2));
    expected.extend(run(7, 8, 3));
    assert_eq!(state.entries, expected);
    Ok(())
}

#[test]
fn group_commit_writes_one_frame_per_sync() -> TestResult {
    let tmp = scratch()?;
    let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default())?;
    for i in 1..=100 {
        wal.append(&[entry(i, 1)])?;
    }
    wal.set_hard_state(&hs(1, 1, 50))?;
    wal.sync()?;
    let path = wal.segment_files()[0].path.clone();
    assert_eq!(
        frame_ranges(&path)?.len(),
        1,
        "100 appends, one sync: one frame"
    );

    let len = fs::metadata(&path)?.len();
    wal.sync()?; // nothing buffered: no I/O
    assert_eq!(fs::metadata(&path)?.len(), len);

    for i in 101..=164 {
        wal.append(&[entry(i, 1)])?;
    }
    wal.sync()?;
    assert_eq!(frame_ranges(&path)?.len(), 2);
    drop(wal);

    let (_, state) = reopen(tmp.path(), WalOptions::default())?;
    assert_eq!(state.entries, run(1, 164, 1));
    assert_eq!(state.hard_state, hs(1, 1, 50));
    Ok(())
}

#[test]
fn append_refuses_gaps_and_compacted_indexes_without_changing_anything() -> TestResult {
    let tmp = scratch()?;
    let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default())?;
    wal.append(&run(1, 5, 1))?;
    assert!(matches!(
        wal.append(&run(7, 8, 1)),
        Err(StorageError::Gap { .. })
    ));
    assert!(matches!(
        wal.append(&[entry(6, 1), entry(8, 1)]),
        Err(StorageError::InvalidEntries(_))
    ));
    wal.sync()?;
    wal.save_snapshot(&meta(3, 1), b"")?;
    assert!(matches!(
        wal.append(&run(3, 6, 2)),
        Err(StorageError::Compacted { .. })
    ));
    assert!(matches!(
        wal.save_snapshot(&meta(3, 1), b""),
        Err(StorageError::SnapshotOutOfDate { .. })
    ));
    assert!(matches!(
        wal.save_snapshot(&meta(5, 2), b""),
        Err(StorageError::SnapshotMismatch { .. })
    ));
    assert!(matches!(
        wal.save_snapshot(&meta(6, 1), b""),
        Err(StorageError::SnapshotMismatch { .. })
    ));
    drop(wal);
    let (_, state) = reopen(tmp.path(), WalOptions::default())?;
    assert_eq!(state.entries, run(4, 5, 1));
    Ok(())
}

#[test]
fn segments_roll_over_at_the_configured_size() -> TestResult {
    let tmp = scratch()?;
    let mut twin = Twin::open(tmp.path(), small_segments())?;
    twin.set_hard_state(&hs(1, 1, 0))?;
    for i in 1..=40 {
        twin.append(&[entry(i, 1)])?;
        twin.sync()?;
    }
    let segments = twin.wal.segment_files().to_vec();
    assert!(segments.len() > 3, "{} segments", segments.len());
    for (i, seg) in segments.iter().enumerate() {
        assert_eq!(seg.seq, i as u64 + 1);
        let len = fs::metadata(&seg.path)?.len();
        if i + 1 < segments.len() {
            // Closed once it reached the limit, with at most one frame past it.
            assert!(len >= 300, "closed segment of {len} bytes");
            let ranges = frame_ranges(&seg.path)?;
            let last_frame_start = ranges.last().map_or(0, |r| r.0);
            assert!((last_frame_start as u64) < 300);
        }
        // The name's start index is the log's last index + 1 when the segment was created.
        let first = frame_ranges(&seg.path)?;
        assert!(!first.is_empty());
    }
    assert_eq!(segments[0].start_index, 1);
    let expected = twin.model.durable_state();
    drop(twin);
    let (_, state) = reopen(tmp.path(), small_segments())?;
    assert_eq!(state, expected);
    Ok(())
}

#[test]
fn compaction_deletes_only_segments_the_snapshot_covers() -> TestResult {
    let tmp = scratch()?;
    let mut twin = Twin::open(tmp.path(), small_segments())?;
    // The hard state is set once, at the start: after the first segments are deleted, it must
    // survive through the copy each new segment carries.
    twin.set_hard_state(&hs(3, 2, 0))?;
    for i in 1..=40 {
        twin.append(&[entry(i, 3)])?;
        twin.sync()?;
    }
    let before = twin.wal.segment_files().to_vec();
    let snapshot_index = 25;
    twin.save_snapshot(&meta(snapshot_index, 3), b"state at 25")?;
    let after = twin.wal.segment_files().to_vec();
    assert!(after.len() < before.len(), "nothing was deleted");
    // The oldest segment kept is the newest one that starts at or below snapshot + 1 ...
    assert!(after[0].start_index <= snapshot_index + 1);
    // ... and everything deleted started before it.
    let deleted: Vec<_> = before.iter().filter(|s| !after.contains(s)).collect();
    assert!(deleted.iter().all(|s| s.seq < after[0].seq));
    assert_eq!(
        files_in(&tmp.path().join("wal"))?,
        after
            .iter()
            .map(|s| segment::file_name(s.seq, s.start_index))
            .collect::<Vec<_>>()
    );

    let expected = twin.model.durable_state();
    drop(twin);
    let (_, state) = reopen(tmp.path(), small_segments())?;
    assert_eq!(state, expected);
    assert_eq!(state.hard_state, hs(3, 2, 0));
    assert_eq!(state.entries.first().map(|e| e.index), Some(26));
    Ok(())
}

#[test]
fn compaction_after_an_overwrite_keeps_the_segments_that_shaped_the_log() -> TestResult {
    // The log grows to 40, a new leader rewrites it from 20, then a snapshot lands between the
    // overwrite point and the old end. Replay from the kept segments must see the overwrite.
    let tmp = scratch()?;
    let mut twin = Twin::open(tmp.path(), small_segments())?;
    for i in 1..=40 {
        twin.append(&[entry(i, 1)])?;
        twin.sync()?;
    }
    twin.append(&run(20, 22, 2))?;
    twin.sync()?;
    for i in 23..=30 {
        twin.append(&[entry(i, 2)])?;
        twin.sync()?;
    }
    twin.save_snapshot(&meta(24, 2), b"")?;
    let expected = twin.model.durable_state();
    assert_eq!(expected.entries, run(25, 30, 2));
    drop(twin);
    let (_, state) = reopen(tmp.path(), small_segments())?;
    assert_eq!(state, expected);
    Ok(())
}

#[test]
fn install_snapshot_with_matching_entry_keeps_the_suffix() -> TestResult {
    let tmp = scratch()?;
    let (mut wal, _) = Wal::open(tmp.path(), small_segments())?;
    wal.append(&run(1, 10, 2))?;
    wal.sync()?;
    wal.install_snapshot(&meta(6, 2), b"leader state at 6")?;
    assert_eq!((wal.first_index(), wal.last_index()), (7, 10));
    wal.append(&run(11, 11, 2))?;
    wal.sync()?;
    drop(wal);
    let (wal, state) = reopen(tmp.path(), small_segments())?;
    assert_eq!(state.snapshot, Some(meta(6, 2)));
    assert_eq!(state.entries, run(7, 11, 2));
    assert_eq!(
        wal.snapshot()?,
        Some((meta(6, 2), b"leader state at 6".to_vec()))
    );
    Ok(())
}

#[test]
fn install_snapshot_with_conflicting_log_discards_everything() -> TestResult {
    for (name, snapshot) in [
        ("term differs", meta(6, 3)),
        ("beyond the log", meta(15, 3)),
    ] {
        let tmp = scratch()?;
        let (mut wal, _) = Wal::open(tmp.path(), small_segments())?;
        wal.append(&run(1, 10, 2))?;
        wal.sync()?;
        wal.install_snapshot(&snapshot, b"leader state")?;
        let next = snapshot.last_index + 1;
        assert_eq!(
            (wal.first_index(), wal.last_index()),
            (next, next - 1),
            "{name}"
        );
        wal.append(&[entry(next, 3)])?;
        wal.sync()?;
        drop(wal);
        let (_, state) = reopen(tmp.path(), small_segments())?;
        assert_eq!(state.snapshot, Some(snapshot), "{name}");
        assert_eq!(state.entries, vec![entry(next, 3)], "{name}");
    }
    Ok(())
}

#[test]
fn crash_between_installed_snapshot_file_and_its_record_discards_the_conflicting_log() -> TestResult
{
    let tmp = scratch()?;
    let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default())?;
    wal.append(&run(1, 10, 1))?;
    wal.set_hard_state(&hs(3, 0, 4))?;
    wal.sync()?;
    drop(wal);
    // The snapshot file became durable; the process died before the WAL's reset record did.
    let (snaps, _) = SnapshotDir::open(&tmp.path().join("snap"))?;
    snaps.save(&meta(6, 3), b"leader state")?;
    drop(snaps);

    let (mut wal, state) = reopen(tmp.path(), WalOptions::default())?;
    assert_eq!(state.snapshot, Some(meta(6, 3)));
    assert_eq!(
        state.entries,
        vec![],
        "entries 7..=10 of term 1 conflict with the snapshot"
    );
    assert_eq!(state.hard_state, hs(3, 0, 4));
    wal.append(&[entry(7, 3)])?;
    wal.sync()?;
    drop(wal);
    // The reset record written at the previous open keeps the new entry anchored.
    let (_, state) = reopen(tmp.path(), WalOptions::default())?;
    assert_eq!(state.entries, vec![entry(7, 3)]);
    Ok(())
}

#[test]
fn crash_between_local_snapshot_file_and_its_record_keeps_the_log() -> TestResult {
    let tmp = scratch()?;
    let (mut wal, _) = Wal::open(tmp.path(), small_segments())?;
    for i in 1..=30 {
        wal.append(&[entry(i, 1)])?;
        wal.sync()?;
    }
    drop(wal);
    let (snaps, _) = SnapshotDir::open(&tmp.path().join("snap"))?;
    snaps.save(&meta(20, 1), b"state at 20")?;
    drop(snaps);

    let (wal, state) = reopen(tmp.path(), small_segments())?;
    assert_eq!(state.entries, run(21, 30, 1));
    // Open wrote the missing record, then compacted.
    assert!(wal.segment_files()[0].start_index <= 21);
    drop(wal);
    let (_, state) = reopen(tmp.path(), small_segments())?;
    assert_eq!(state.entries, run(21, 30, 1));
    Ok(())
}

/// Builds a WAL whose last segment holds several frames, recording the durable state after each
/// sync and where that sync's frame ended.
struct History {
    dir: tempfile::TempDir,
    /// The last segment's file name.
    last_segment: String,
    /// (end offset of a frame in the last segment, durable state once that frame is written).
    boundaries: Vec<(u64, RecoveredState)>,
    /// The durable state before the last segment's first frame.
    before_last_segment: RecoveredState,
}

fn history(syncs_in_last_segment: usize) -> Result<History, Box<dyn Error>> {
    history_with(syncs_in_last_segment, history_segments())
}

fn history_with(
    syncs_in_last_segment: usize,
    options: WalOptions,
) -> Result<History, Box<dyn Error>> {
    let dir = scratch()?;
    let mut twin = Twin::open(dir.path(), options)?;
    twin.set_hard_state(&hs(1, 1, 0))?;
    let mut index = 0;
    let mut term = 1;
    // Fill segments until a third one has just been started; `before` is the durable state
    // before its first frame.
    let before = loop {
        let segments = twin.wal.segment_files().len();
        let state = twin.model.durable_state();
        index += 1;
        twin.append(&[entry(index, term)])?;
        twin.sync()?;
        if segments >= 2 && twin.wal.segment_files().len() > segments {
            break state;
        }
    };
    let last = twin.wal.segment_files().last().ok_or("no segment")?.clone();
    let mut boundaries = vec![(twin.wal.active_len(), twin.model.durable_state())];
    for k in 1..syncs_in_last_segment {
        match k % 3 {
            0 => {
                term += 1;
                twin.set_hard_state(&hs(term, 2, index - 1))?;
            }
            1 => {
                index += 1;
                twin.append(&run(index, index + 1, term))?;
                index += 1;
            }
            _ => {
                // Overwrite the last two entries.
                term += 1;
                twin.append(&run(index - 1, index, term))?;
            }
        }
        twin.sync()?;
        boundaries.push((twin.wal.active_len(), twin.model.durable_state()));
    }
    assert_eq!(
        twin.wal.segment_files().last(),
        Some(&last),
        "the history rolled over again"
    );
    drop(twin);
    let last_segment = last
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("segment name")?
        .to_string();
    Ok(History {
        dir,
        last_segment,
        boundaries,
        before_last_segment: before,
    })
}

/// How a crash can leave the last segment's bytes from some offset on.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// The file ends there (a write that never extended the file, or its size lost).
    Truncated,
    /// Zeros from there to the end of the file: a write into preallocated space that did not
    /// land, or a preallocation whose zeros did land while the frame before them did not.
    Zeroed,
}

#[test]
fn every_truncation_of_the_last_segment_recovers_the_durable_prefix() -> TestResult {
    for options in [history_segments(), preallocated_history_segments()] {
        let history = history_with(6, options.clone())?;
        let full = history.boundaries.last().map_or(0, |b| b.0);
        for cut in 0..full {
            for how in [Cut::Truncated, Cut::Zeroed] {
                let what = format!("{how:?} at byte {cut}, {options:?}");
                check_cut(&history, &options, cut, how).map_err(|e| format!("{what}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// Damages a copy of `history` at `cut` as `how` says, and checks that it recovers the durable
/// prefix, and that a new write then lands after it and is recovered too.
fn check_cut(history: &History, options: &WalOptions, cut: u64, how: Cut) -> TestResult {
    let copy = scratch()?;
    copy_group(history.dir.path(), copy.path())?;
    let path = copy.path().join("wal").join(&history.last_segment);
    match how {
        Cut::Truncated => fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .set_len(cut)?,
        Cut::Zeroed => {
            let mut bytes = fs::read(&path)?;
            bytes[cut as usize..].iter_mut().for_each(|b| *b = 0);
            fs::write(&path, &bytes)?;
        }
    }

    // The durable prefix: everything up to the last frame wholly before the cut.
    let expected = history
        .boundaries
        .iter()
        .rev()
        .find(|(end, _)| *end <= cut)
        .map_or(&history.before_last_segment, |(_, state)| state);
    let (mut wal, state) = Wal::open(copy.path(), options.clone())?;
    assert_eq!(&state, expected);

    // The tail was cut away on disk: a new write lands after valid data and is recovered.
    let next = wal.last_index() + 1;
    wal.append(&[entry(next, 99)])?;
    wal.sync()?;
    drop(wal);
    let (_, again) = Wal::open(copy.path(), options.clone())?;
    assert_eq!(again.entries.last(), Some(&entry(next, 99)));
    assert_eq!(again.entries.len(), expected.entries.len() + 1);
    Ok(())
}

#[test]
fn zeros_after_the_last_frame_are_preallocated_space_not_a_tail() -> TestResult {
    let options = preallocated_history_segments();
    let history = history_with(4, options.clone())?;
    let (last_end, last_state) = history.boundaries.last().ok_or("no boundary")?.clone();
    let path = history.dir.path().join("wal").join(&history.last_segment);
    let allocated = fs::metadata(&path)?.len();
    assert!(
        allocated > last_end,
        "no zeros after the last frame ({allocated} bytes, frames end at {last_end})"
    );
    assert!(segment::all_zero(&fs::read(&path)?[last_end as usize..]));

    // A crash while preallocating leaves any length of zeros after the last frame, or a hole
    // (which reads as zeros) if the size landed before the data.
    let hole = allocated + 4096;
    let lengths = (last_end..=allocated).step_by(7).chain([allocated, hole]);
    for len in lengths {
        let copy = scratch()?;
        copy_group(history.dir.path(), copy.path())?;
        let path = copy.path().join("wal").join(&history.last_segment);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .set_len(len)?;
        let (mut wal, state) =
            Wal::open(copy.path(), options.clone()).map_err(|e| format!("length {len}: {e}"))?;
        assert_eq!(state, last_state, "length {len}");
        // Nothing was cut: the zeros stay, and the next frame goes into them.
        assert_eq!(fs::metadata(&path)?.len(), len, "length {len}");
        let next = wal.last_index() + 1;
        wal.append(&[entry(next, 99)])?;
        wal.sync()?;
        let new_frame = frame_ranges(&path)?.last().map(|r| r.0 as u64);
        assert_eq!(new_frame, Some(last_end), "length {len}");
        drop(wal);
        let (_, again) = Wal::open(copy.path(), options.clone())?;
        assert_eq!(again.entries.last(), Some(&entry(next, 99)), "length {len}");
        assert_eq!(again.entries.len(), last_state.entries.len() + 1);
    }
    Ok(())
}

#[test]
fn preallocated_space_does_not_hide_damage() -> TestResult {
    let options = preallocated_history_segments();
    let history = history_with(4, options.clone())?;
    let (last_end, last_state) = history.boundaries.last().ok_or("no boundary")?.clone();
    let (prev_end, prev_state) = history.boundaries[history.boundaries.len() - 2].clone();
    let damaged = |damage: &dyn Fn(&mut Vec<u8>)| -> Result<_, Box<dyn Error>> {
        let copy = scratch()?;
        copy_group(history.dir.path(), copy.path())?;
        let path = copy.path().join("wal").join(&history.last_segment);
        let mut bytes = fs::read(&path)?;
        damage(&mut bytes);
        fs::write(&path, &bytes)?;
        let opened = Wal::open(copy.path(), options.clone()).map(|(_, state)| state);
        Ok((copy, path, opened))
    };
    let last = last_end as usize;

    // Garbage in the zeros after the final frame: the remains of a torn write, cut away.
    let (_copy, path, opened) = damaged(&|b| b[last + 5..last + 30].fill(0xab))?;
    assert_eq!(opened?, last_state);
    assert_eq!(fs::metadata(&path)?.len(), last_end);

    // The final frame zeroed (its write never landed), with the zeros after it.
    let (_copy, _, opened) = damaged(&|b| b[prev_end as usize..last].fill(0))?;
    assert_eq!(opened?, prev_state);

    // A frame zeroed, yet a valid frame after it: not a torn tail but lost data.
    let (_copy, _, opened) = damaged(&|b| {
        let final_frame = b[prev_end as usize..last].to_vec();
        b[prev_end as usize..last].fill(0);
        b[last + 64..last + 64 + final_frame.len()].copy_from_slice(&final_frame);
    })?;
    match opened {
        Err(StorageError::Corrupt { reason, .. }) => {
            assert!(reason.contains("valid frame follows"), "{reason}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    Ok(())
}

#[test]
fn closed_segments_keep_their_zeros_and_their_recorded_length() -> TestResult {
    let tmp = scratch()?;
    let options = WalOptions {
        segment_size: 300,
        preallocate: 1000,
    };
    let mut twin = Twin::open(tmp.path(), options.clone())?;
    for i in 1..=40 {
        twin.append(&[entry(i, 1)])?;
        twin.sync()?;
    }
    let segments = twin.wal.segment_files().to_vec();
    assert!(segments.len() > 2);
    for seg in &segments[..segments.len() - 1] {
        // Zeros up to the segment size after frames that end before it.
        let ranges = frame_ranges(&seg.path)?;
        let end = ranges.last().map_or(0, |r| r.1) as u64;
        let len = fs::metadata(&seg.path)?.len();
        assert_eq!(len, end.max(300), "{}", seg.path.display());
    }
    let expected = twin.model.durable_state();
    drop(twin);
    let (_, state) = reopen(tmp.path(), options.clone())?;
    assert_eq!(state, expected);

    // A closed segment that lost its last frame to zeros is caught by the next one's header.
    let ranges = frame_ranges(&segments[0].path)?;
    let mut bytes = fs::read(&segments[0].path)?;
    let (start, _) = ranges[ranges.len() - 1];
    bytes[start..].fill(0);
    fs::write(&segments[0].path, &bytes)?;
    match reopen(tmp.path(), options) {
        Err(StorageError::Corrupt { path, reason, .. }) => {
            assert_eq!(path, segments[0].path);
            assert!(reason.contains("records"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    Ok(())
}

/// How a test damages the bytes of a segment.
type Damage = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn damage_confined_to_the_final_frame_is_a_torn_tail() -> TestResult {
    let history = history(4)?;
    let (last_end, last_state) = history.boundaries.last().ok_or("no boundary")?.clone();
    let (prev_end, prev_state) = history.boundaries[history.boundaries.len() - 2].clone();
    let final_frame = prev_end as usize;
    // (what, the damage, whether the final frame survives it, the file's length after recovery)
    let cases: Vec<(&str, Damage, bool, u64)> = vec![
        // The size was extended but the data never written: zeros, which are then preallocated
        // space like any other and stay.
        (
            "final frame zeroed",
            Box::new(move |b| b[final_frame..].iter_mut().for_each(|x| *x = 0)),
            false,
            last_end,
        ),
        (
            "second half of final frame zeroed",
            Box::new(move |b| {
                let mid = (final_frame + b.len()) / 2;
                b[mid..].iter_mut().for_each(|x| *x = 0)
            }),
            false,
            prev_end,
        ),
        (
            "one flipped byte in final frame",
            Box::new(move |b| b[final_frame + 13] ^= 0x10),
            false,
            prev_end,
        ),
        (
            "garbage after the final frame",
            Box::new(|b| b.extend((0..100u8).map(|i| i.wrapping_mul(37)))),
            true,
            last_end,
        ),
    ];
    for (name, damage, final_survives, len_after) in cases {
        let copy = scratch()?;
        copy_group(history.dir.path(), copy.path())?;
        let path = copy.path().join("wal").join(&history.last_segment);
        let mut bytes = fs::read(&path)?;
        assert_eq!(bytes.len() as u64, last_end);
        damage(&mut bytes);
        fs::write(&path, &bytes)?;
        let (_, state) =
            Wal::open(copy.path(), history_segments()).map_err(|e| format!("{name}: {e}"))?;
        let expected = if final_survives {
            &last_state
        } else {
            &prev_state
        };
        assert_eq!(&state, expected, "{name}");
        assert_eq!(fs::metadata(&path)?.len(), len_after, "{name}");
    }
    Ok(())
}

#[test]
fn flipped_byte_in_any_non_final_frame_is_refused_naming_the_file() -> TestResult {
    // With preallocation, closed segments end in zeros: a flipped byte there is refused too.
    for options in [history_segments(), preallocated_history_segments()] {
        flipped_bytes_are_refused(options)?;
    }
    Ok(())
}

fn flipped_bytes_are_refused(options: WalOptions) -> TestResult {
    let history = history_with(4, options.clone())?;
    let copy = scratch()?;
    copy_group(history.dir.path(), copy.path())?;
    let wal_dir = copy.path().join("wal");
    let names = files_in(&wal_dir)?;
    let final_frame_start = history.boundaries[history.boundaries.len() - 2].0 as usize;
    let mut checked = 0;
    for name in &names {
        let path = wal_dir.join(name);
        let clean = fs::read(&path)?;
        let end = if *name == history.last_segment {
            final_frame_start
        } else {
            clean.len()
        };
        for offset in 0..end {
            let mut bad = clean.clone();
            bad[offset] ^= 0x04;
            fs::write(&path, &bad)?;
            match Wal::open(copy.path(), options.clone()) {
                Err(err @ StorageError::Corrupt { .. }) => {
                    let message = err.to_string();
                    assert!(
                        message.contains(name.as_str()),
                        "flip {name}@{offset}: {message}"
                    );
                }
                other => panic!("flip {name}@{offset}: expected Corrupt, got {other:?}"),
            }
            checked += 1;
        }
        fs::write(&path, &clean)?;
    }
    assert!(checked > 600, "only {checked} offsets checked");
    // Undamaged, it opens.
    Wal::open(copy.path(), options.clone())?;
    Ok(())
}

/// Recomputes the CRC of the frame at `at` after its payload was edited.
fn reseal(bytes: &mut [u8], at: usize) {
    let len =
        u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]) as usize;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[at + 4..at + 8]);
    hasher.update(&bytes[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + len]);
    let crc = hasher.finalize().to_le_bytes();
    bytes[at + 8..at + 12].copy_from_slice(&crc);
}

/// Writes a one-segment WAL whose frames hold the given batches.
fn write_segment(dir: &Path, batches: &[Vec<Entry>]) -> Result<PathBuf, Box<dyn Error>> {
    let wal_dir = dir.join("wal");
    fs::create_dir_all(&wal_dir)?;
    let mut bytes = Header {
        seq: 1,
        start_index: 1,
        prev_len: 0,
    }
    .encode()
    .to_vec();
    for batch_entries in batches {
        let mut batch = Batch::default();
        for e in batch_entries {
            batch.push_entry(e)?;
        }
        bytes.extend_from_slice(batch.seal());
    }
    let path = wal_dir.join(segment::file_name(1, 1));
    fs::write(&path, &bytes)?;
    Ok(path)
}

#[test]
fn gap_in_indexes_is_refused_naming_the_file_and_offset() -> TestResult {
    let tmp = scratch()?;
    let path = write_segment(tmp.path(), &[run(1, 3, 1), run(5, 6, 1)])?;
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(StorageError::Corrupt {
            path: p,
            offset,
            reason,
        }) => {
            assert_eq!(p, path);
            assert!(reason.contains("gap"), "{reason}");
            let second_frame = frame_ranges(&path)?[1].0 as u64;
            assert_eq!(offset, second_frame + FRAME_HEADER_LEN as u64);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    Ok(())
}

#[test]
fn undecodable_entry_inside_a_valid_crc_is_refused() -> TestResult {
    let tmp = scratch()?;
    let path = write_segment(tmp.path(), &[run(1, 3, 1), run(4, 4, 1)])?;
    let mut bytes = fs::read(&path)?;
    let first = frame_ranges(&path)?[0].0;
    // First record's body starts after the frame header and the 5-byte record header; make its
    // first field a varint that never ends, and fix the CRC so only protobuf can object.
    let body = first + FRAME_HEADER_LEN + 5;
    bytes[body] = 0x10;
    bytes[body + 1..body + 11]
        .iter_mut()
        .for_each(|b| *b = 0xff);
    reseal(&mut bytes, first);
    fs::write(&path, &bytes)?;
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(err @ StorageError::Corrupt { .. }) => {
            let message = err.to_string();
            assert!(message.contains("undecodable entry"), "{message}");
            assert!(message.contains(&segment::file_name(1, 1)), "{message}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    Ok(())
}

#[test]
fn missing_or_shortened_closed_segment_is_refused() -> TestResult {
    let build = || -> Result<(tempfile::TempDir, Vec<PathBuf>), Box<dyn Error>> {
        let tmp = scratch()?;
        let (mut wal, _) = Wal::open(tmp.path(), small_segments())?;
        for i in 1..=30 {
            wal.append(&[entry(i, 1)])?;
            wal.sync()?;
        }
        let paths = wal.segment_files().iter().map(|s| s.path.clone()).collect();
        Ok((tmp, paths))
    };

    let (tmp, paths) = build()?;
    assert!(paths.len() >= 3);
    fs::remove_file(&paths[1])?;
    let err = Wal::open(tmp.path(), small_segments()).err();
    assert!(
        matches!(&err, Some(StorageError::Corrupt { reason, .. }) if reason.contains("missing")),
        "{err:?}"
    );

    // A closed segment that lost its last frame still ends on a frame boundary; the next
    // segment's header gives it away.
    let (tmp, paths) = build()?;
    let ranges = frame_ranges(&paths[0])?;
    let file = fs::OpenOptions::new().write(true).open(&paths[0])?;
    file.set_len(ranges[ranges.len() - 1].0 as u64)?;
    drop(file);
    match Wal::open(tmp.path(), small_segments()) {
        Err(StorageError::Corrupt { path, .. }) => assert_eq!(path, paths[0]),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    Ok(())
}

#[test]
fn corrupt_snapshot_is_refused_at_open() -> TestResult {
    let tmp = scratch()?;
    let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default())?;
    wal.append(&run(1, 5, 1))?;
    wal.save_snapshot(&meta(3, 1), b"state at 3")?;
    drop(wal);
    let snap_dir = tmp.path().join("snap");
    let name = files_in(&snap_dir)?.pop().ok_or("no snapshot")?;
    let path = snap_dir.join(&name);
    let mut bytes = fs::read(&path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&path, &bytes)?;
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(err @ StorageError::CorruptSnapshot { .. }) => {
            assert!(err.to_string().contains(&name), "{err}")
        }
        other => panic!("expected CorruptSnapshot, got {other:?}"),
    }
    Ok(())
}

#[test]
fn second_open_of_the_same_directory_is_refused() -> TestResult {
    let tmp = scratch()?;
    let (_wal, _) = Wal::open(tmp.path(), WalOptions::default())?;
    assert!(matches!(
        Wal::open(tmp.path(), WalOptions::default()),
        Err(StorageError::Locked { .. })
    ));
    Ok(())
}
