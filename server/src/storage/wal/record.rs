//! Framing of the write-ahead log: records, and the CRC-protected frames that carry them.
//!
//! # Frame (one per `sync`)
//!
//! ```text
//! magic    4 bytes  F7 5A 1C D3
//! len      u32 LE   payload length, > 0
//! crc      u32 LE   CRC-32 (IEEE) of the 4 `len` bytes followed by the payload
//! payload  len bytes: one or more records
//! ```
//!
//! Every group commit writes exactly one frame with one `write`, so a crash in the middle of a sync
//! can only damage the final frame of the final segment; any other bad frame is corruption. The CRC
//! covers `len` too, so a damaged length cannot pass for a shorter valid frame. The magic lets
//! recovery look for valid frames *after* a damaged one (a damaged length hides where the next
//! frame starts), which is how a torn tail is told apart from corruption in the middle.
//!
//! # Record (inside a payload)
//!
//! ```text
//! kind  u8      1 = Entry, 2 = HardState, 3 = Snapshot (log kept), 4 = Snapshot (log reset)
//! len   u32 LE
//! body  len bytes: the protobuf message (sync.raft.v1.Entry, HardState or SnapshotMetadata)
//! ```
//!
//! Bodies are the same protobuf messages as on the wire, so there is one encoding to keep
//! compatible. The snapshot records carry only `last_index` and `last_term`; the membership lives
//! in the snapshot file.

use std::ops::Range;

use prost::Message;
use sync_proto::raft::v1::{Entry, HardState, SnapshotMetadata};

use crate::storage::error::StorageError;

/// Marks the start of every frame. Not ASCII and not a likely protobuf prefix, so that scanning for
/// it inside user payloads rarely stops, and a stop still needs a matching CRC to count.
pub(crate) const FRAME_MAGIC: [u8; 4] = [0xF7, 0x5A, 0x1C, 0xD3];
/// magic + len + crc.
pub(crate) const FRAME_HEADER_LEN: usize = 12;
/// kind + len.
const RECORD_HEADER_LEN: usize = 5;

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_SNAPSHOT_KEPT: u8 = 3;
const KIND_SNAPSHOT_RESET: u8 = 4;

/// One decoded record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    /// A log entry; if its index is at or below the last index, it replaces the suffix from there.
    Entry(Entry),
    /// A hard state; the latest one wins.
    HardState(HardState),
    /// A snapshot at `index`/`term` became durable. With `reset`, the log was discarded and
    /// continues at `index + 1` (an installed snapshot that did not match the log); without it, the
    /// log holds the entry `index`/`term` and the entries after it are kept.
    Snapshot { index: u64, term: u64, reset: bool },
}

/// The frame being built for the next sync: a frame header placeholder followed by records.
#[derive(Debug)]
pub(crate) struct Batch {
    /// `FRAME_HEADER_LEN` bytes reserved for the header, then the encoded records; the header is
    /// filled in by [`Batch::seal`], so sealing never copies the payload.
    buf: Vec<u8>,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            buf: vec![0; FRAME_HEADER_LEN],
        }
    }
}

impl Batch {
    /// Whether no record was pushed since the last [`clear`](Self::clear).
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.len() == FRAME_HEADER_LEN
    }

    pub(crate) fn push_entry(&mut self, entry: &Entry) -> Result<(), StorageError> {
        self.push(KIND_ENTRY, entry)
    }

    pub(crate) fn push_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        self.push(KIND_HARD_STATE, hs)
    }

    pub(crate) fn push_snapshot(
        &mut self,
        index: u64,
        term: u64,
        reset: bool,
    ) -> Result<(), StorageError> {
        let kind = if reset {
            KIND_SNAPSHOT_RESET
        } else {
            KIND_SNAPSHOT_KEPT
        };
        let meta = SnapshotMetadata {
            last_index: index,
            last_term: term,
            config: None,
        };
        self.push(kind, &meta)
    }

    fn push(&mut self, kind: u8, message: &impl Message) -> Result<(), StorageError> {
        let len = message.encoded_len();
        let len32 = u32::try_from(len).map_err(|_| {
            StorageError::InvalidEntries(format!("a record of {len} bytes exceeds 4 GiB"))
        })?;
        if self.buf.len() - FRAME_HEADER_LEN + RECORD_HEADER_LEN + len > u32::MAX as usize {
            return Err(StorageError::InvalidEntries(
                "the buffered batch exceeds 4 GiB; sync more often".into(),
            ));
        }
        self.buf.reserve(RECORD_HEADER_LEN + len);
        self.buf.push(kind);
        self.buf.extend_from_slice(&len32.to_le_bytes());
        // Encoding into a Vec cannot fail: it grows as needed.
        message
            .encode(&mut self.buf)
            .map_err(|e| StorageError::InvalidEntries(format!("cannot encode record: {e}")))?;
        Ok(())
    }

    /// Fills in the frame header and returns the whole frame, ready to write.
    pub(crate) fn seal(&mut self) -> &[u8] {
        let payload_len = (self.buf.len() - FRAME_HEADER_LEN) as u32;
        let len = payload_len.to_le_bytes();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&len);
        hasher.update(&self.buf[FRAME_HEADER_LEN..]);
        let crc = hasher.finalize().to_le_bytes();
        self.buf[0..4].copy_from_slice(&FRAME_MAGIC);
        self.buf[4..8].copy_from_slice(&len);
        self.buf[8..12].copy_from_slice(&crc);
        &self.buf
    }

    /// A position to [`rollback`](Self::rollback) to, so that a multi-record call that fails
    /// half-way leaves the batch as it was.
    pub(crate) fn mark(&self) -> usize {
        self.buf.len()
    }

    /// Drops the records pushed since `mark`.
    pub(crate) fn rollback(&mut self, mark: usize) {
        self.buf.truncate(mark.max(FRAME_HEADER_LEN));
    }

    /// Empties the batch for the next sync, keeping its allocation.
    pub(crate) fn clear(&mut self) {
        self.buf.truncate(FRAME_HEADER_LEN);
    }
}

/// The outcome of reading a frame at some offset.
#[derive(Debug, PartialEq)]
pub(crate) enum FrameRead {
    /// A valid frame: its payload's byte range, and where the next frame starts.
    Valid { payload: Range<usize>, next: usize },
    /// No valid frame starts here, for this reason.
    Invalid(String),
}

/// Reads the frame that should start at `at` in `buf`.
pub(crate) fn read_frame(buf: &[u8], at: usize) -> FrameRead {
    let rest = &buf[at.min(buf.len())..];
    if rest.len() < FRAME_HEADER_LEN {
        return FrameRead::Invalid(format!(
            "incomplete frame header ({} of {FRAME_HEADER_LEN} bytes)",
            rest.len()
        ));
    }
    if rest[0..4] != FRAME_MAGIC {
        return FrameRead::Invalid("bad frame magic".into());
    }
    let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
    if len == 0 {
        return FrameRead::Invalid("zero frame length".into());
    }
    let stored = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
    let available = rest.len() - FRAME_HEADER_LEN;
    if len > available {
        return FrameRead::Invalid(format!(
            "frame of {len} bytes is cut short after {available} bytes"
        ));
    }
    let payload = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&rest[4..8]);
    hasher.update(payload);
    let computed = hasher.finalize();
    if computed != stored {
        return FrameRead::Invalid(format!(
            "frame CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let start = at + FRAME_HEADER_LEN;
    FrameRead::Valid {
        payload: start..start + len,
        next: start + len,
    }
}

/// The offset of the first valid frame starting at or after `from`, if any.
///
/// Used only after a bad frame: finding one proves the bad frame was not the last thing written
/// (each sync writes one frame), so the damage is corruption, not a torn write. Linear in the
/// bytes scanned; a CRC is computed only where the 4-byte magic matches.
pub(crate) fn find_valid_frame(buf: &[u8], from: usize) -> Option<usize> {
    let last_start = buf.len().checked_sub(FRAME_HEADER_LEN)?;
    (from..=last_start).find(|&at| {
        buf[at..at + 4] == FRAME_MAGIC && matches!(read_frame(buf, at), FrameRead::Valid { .. })
    })
}

/// Decodes the records of a valid frame's payload. On failure, returns the offset of the bad record
/// within the payload and the reason.
pub(crate) fn decode_records(payload: &[u8]) -> Result<Vec<(usize, Record)>, (usize, String)> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let rest = &payload[at..];
        if rest.len() < RECORD_HEADER_LEN {
            return Err((at, "record header cut short inside a valid frame".into()));
        }
        let kind = rest[0];
        let len = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let Some(body) = rest.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + len) else {
            return Err((at, format!("record of {len} bytes overruns its frame")));
        };
        let undecodable =
            |what: &str, e: prost::DecodeError| (at, format!("undecodable {what}: {e}"));
        let record = match kind {
            KIND_ENTRY => Record::Entry(Entry::decode(body).map_err(|e| undecodable("entry", e))?),
            KIND_HARD_STATE => Record::HardState(
                HardState::decode(body).map_err(|e| undecodable("hard state", e))?,
            ),
            KIND_SNAPSHOT_KEPT | KIND_SNAPSHOT_RESET => {
                let meta = SnapshotMetadata::decode(body)
                    .map_err(|e| undecodable("snapshot record", e))?;
                Record::Snapshot {
                    index: meta.last_index,
                    term: meta.last_term,
                    reset: kind == KIND_SNAPSHOT_RESET,
                }
            }
            other => return Err((at, format!("unknown record kind {other}"))),
        };
        records.push((at, record));
        at += RECORD_HEADER_LEN + len;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(index: u64, term: u64, data: &'static [u8]) -> Entry {
        Entry {
            index,
            term,
            data: Bytes::from_static(data),
            ..Default::default()
        }
    }

    #[test]
    fn batch_round_trips_every_record_kind() -> Result<(), StorageError> {
        let mut batch = Batch::default();
        assert!(batch.is_empty());
        batch.push_entry(&entry(1, 1, b"a"))?;
        batch.push_hard_state(&HardState {
            term: 1,
            vote: 2,
            commit: 1,
        })?;
        batch.push_snapshot(1, 1, false)?;
        batch.push_snapshot(7, 3, true)?;
        let frame = batch.seal().to_vec();
        let FrameRead::Valid { payload, next } = read_frame(&frame, 0) else {
            panic!("sealed batch does not read back");
        };
        assert_eq!(next, frame.len());
        let records: Vec<Record> = decode_records(&frame[payload])
            .map_err(|(_, reason)| StorageError::InvalidEntries(reason))?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        assert_eq!(
            records,
            vec![
                Record::Entry(entry(1, 1, b"a")),
                Record::HardState(HardState {
                    term: 1,
                    vote: 2,
                    commit: 1
                }),
                Record::Snapshot {
                    index: 1,
                    term: 1,
                    reset: false
                },
                Record::Snapshot {
                    index: 7,
                    term: 3,
                    reset: true
                },
            ]
        );
        batch.clear();
        assert!(batch.is_empty());
        Ok(())
    }

    #[test]
    fn any_damage_to_a_frame_is_detected() -> Result<(), StorageError> {
        let mut batch = Batch::default();
        batch.push_entry(&entry(1, 1, b"payload"))?;
        let frame = batch.seal().to_vec();
        for offset in 0..frame.len() {
            let mut bad = frame.clone();
            bad[offset] ^= 0x01;
            assert!(
                matches!(read_frame(&bad, 0), FrameRead::Invalid(_)),
                "flip at {offset} went unnoticed"
            );
        }
        for len in 0..frame.len() {
            assert!(matches!(
                read_frame(&frame[..len], 0),
                FrameRead::Invalid(_)
            ));
        }
        Ok(())
    }

    #[test]
    fn scanning_finds_the_next_valid_frame_after_damage() -> Result<(), StorageError> {
        let mut batch = Batch::default();
        batch.push_entry(&entry(1, 1, b"first"))?;
        let mut log = batch.seal().to_vec();
        batch.clear();
        batch.push_entry(&entry(2, 1, b"second"))?;
        let second_at = log.len();
        log.extend_from_slice(batch.seal());
        log[5] ^= 0xff; // damage the first frame's length
        assert!(matches!(read_frame(&log, 0), FrameRead::Invalid(_)));
        assert_eq!(find_valid_frame(&log, 1), Some(second_at));
        assert_eq!(find_valid_frame(&log, second_at + 1), None);
        Ok(())
    }

    #[test]
    fn undecodable_record_inside_a_valid_frame_is_reported_with_its_offset() {
        // kind 1 (entry), len 2, body: field 2 (index) as varint with a truncated continuation.
        let payload = [KIND_ENTRY, 2, 0, 0, 0, 0x10, 0x80];
        let err = decode_records(&payload).err();
        assert!(matches!(err, Some((0, ref reason)) if reason.contains("undecodable entry")));
        let unknown = [9u8, 0, 0, 0, 0];
        assert!(matches!(decode_records(&unknown), Err((0, _))));
    }
}
