//! Segment files: naming, the segment header, and splitting a segment into frames.
//!
//! # Name
//!
//! `wal/<seq:016x>-<start:016x>.seg`: `seq` numbers segments 1, 2, 3… with no gaps (a missing
//! number is a lost file); `start` is the log's last index + 1 when the segment was created, i.e.
//! every entry the log held then is below `start`. Compaction relies on that (see `Wal`).
//!
//! # Header (40 bytes, little-endian)
//!
//! ```text
//! magic     8 bytes "SYNCWAL1"
//! version   u32     1
//! seq       u64     as in the name
//! start     u64     as in the name
//! prev_len  u64     the final length of segment seq-1 (0 for the first segment)
//! crc       u32     CRC-32 (IEEE) of the 36 bytes above
//! ```
//!
//! `prev_len` lets recovery notice that a closed segment lost its tail: without it, a segment cut
//! exactly at a frame boundary would look complete. The header is written in the same `write` as
//! the segment's first frame, so a new segment costs no extra `fdatasync`.
//!
//! # The torn-tail rule
//!
//! Each sync appends one frame with one write, so a crash can damage only the final frame of the
//! final segment. [`scan`] therefore accepts a bad frame only if it is in the last segment *and*
//! no valid frame starts anywhere after it; it reports it as [`Tail::Torn`] for the caller to cut
//! away. A bad frame anywhere else, or one followed by a valid frame, is [`StorageError::Corrupt`],
//! naming the file and the byte offset: recovery never skips data.
//!
//! # Preallocated space
//!
//! A segment file may be longer than its frames: the writer fills the space ahead of the next
//! frame with zeros (see "Preallocation" in the module doc of `wal`), so that an append overwrites
//! allocated, already written blocks and its `fdatasync` has no file size to commit. A frame never
//! starts with a zero byte (its magic does not), so where a frame should start, zeros up to the
//! end of the file are the end of the segment: [`Scanned::len`], the segment's logical length.
//! Anything else there that is not a valid frame (zeros followed by anything not zero included)
//! goes through the torn-tail rule above, so a frame torn inside preallocated space (its blocks
//! partly still zeros) is a torn tail, and a valid frame after a zeroed one is corruption.
//!
//! Two limits, both inherent to a log without a separate commit marker: damage to the final frame
//! itself (say a flipped bit after it was synced) looks exactly like a torn write, so that one
//! batch is dropped as if its sync never finished; and if user data inside a torn frame happens to
//! contain a complete, CRC-valid frame, recovery refuses to start rather than guess. The first
//! only ever loses the last batch; the second fails safe.

use std::path::{Path, PathBuf};

use crate::storage::error::StorageError;

use super::record::{FrameRead, find_valid_frame, read_frame};

const MAGIC: [u8; 8] = *b"SYNCWAL1";
const VERSION: u32 = 1;
pub(crate) const HEADER_LEN: usize = 40;

/// The identity of a segment file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SegmentFile {
    /// Position in the sequence of segments, from 1, without gaps.
    pub(crate) seq: u64,
    /// The log's last index + 1 when the segment was created.
    pub(crate) start_index: u64,
    /// The file.
    pub(crate) path: PathBuf,
}

/// The file name of segment `seq` starting at `start_index`.
pub(crate) fn file_name(seq: u64, start_index: u64) -> String {
    format!("{seq:016x}-{start_index:016x}.seg")
}

/// Parses a segment file name: `None` if it is not one (`.seg` suffix missing), an error if it
/// has the suffix but not the shape, so that a mangled segment is never silently ignored.
fn parse_name(dir: &Path, name: &str) -> Option<Result<SegmentFile, StorageError>> {
    let stem = name.strip_suffix(".seg")?;
    let parsed = stem.split_once('-').and_then(|(seq, start)| {
        if seq.len() != 16 || start.len() != 16 {
            return None;
        }
        Some((
            u64::from_str_radix(seq, 16).ok()?,
            u64::from_str_radix(start, 16).ok()?,
        ))
    });
    let path = dir.join(name);
    Some(match parsed {
        Some((seq, start_index)) => Ok(SegmentFile {
            seq,
            start_index,
            path,
        }),
        None => Err(StorageError::Corrupt {
            path,
            offset: 0,
            reason: "not a valid segment file name (<seq:016x>-<start:016x>.seg)".into(),
        }),
    })
}

/// Lists the segments of `dir` in sequence order, checking that no number is missing.
pub(crate) fn list(dir: &Path) -> Result<Vec<SegmentFile>, StorageError> {
    let mut segments = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(crate::storage::error::io_err("list", dir))?;
    for item in entries {
        let item = item.map_err(crate::storage::error::io_err("list", dir))?;
        let name = item.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(segment) = parse_name(dir, name) {
            segments.push(segment?);
        }
    }
    segments.sort_by_key(|s| s.seq);
    for pair in segments.windows(2) {
        if pair[1].seq != pair[0].seq + 1 {
            return Err(StorageError::Corrupt {
                path: pair[1].path.clone(),
                offset: 0,
                reason: format!(
                    "segment {} follows segment {}: the segments between are missing",
                    pair[1].seq, pair[0].seq
                ),
            });
        }
    }
    Ok(segments)
}

/// The decoded header of a segment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Header {
    pub(crate) seq: u64,
    pub(crate) start_index: u64,
    pub(crate) prev_len: u64,
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..20].copy_from_slice(&self.seq.to_le_bytes());
        out[20..28].copy_from_slice(&self.start_index.to_le_bytes());
        out[28..36].copy_from_slice(&self.prev_len.to_le_bytes());
        let crc = crc32fast::hash(&out[0..36]);
        out[36..40].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Header, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!(
                "incomplete segment header ({} of {HEADER_LEN} bytes)",
                bytes.len()
            ));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let stored = u32::from_le_bytes([bytes[36], bytes[37], bytes[38], bytes[39]]);
        if crc32fast::hash(&bytes[0..36]) != stored {
            return Err("segment header CRC mismatch".into());
        }
        if bytes[0..8] != MAGIC {
            return Err("bad segment magic".into());
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != VERSION {
            return Err(format!("unknown segment format version {version}"));
        }
        Ok(Header {
            seq: u64_at(12),
            start_index: u64_at(20),
            prev_len: u64_at(28),
        })
    }
}

/// A valid frame found by [`scan`].
#[derive(Debug)]
pub(crate) struct Frame<'a> {
    /// Byte offset of the frame (its header) in the file.
    pub(crate) offset: u64,
    /// Byte offset of the payload in the file.
    pub(crate) payload_offset: u64,
    /// The payload: the frame's records.
    pub(crate) payload: &'a [u8],
}

/// How a segment ends.
#[derive(Debug, PartialEq)]
pub(crate) enum Tail {
    /// Every byte belongs to a valid frame.
    Clean,
    /// From `offset` on, the file holds the remains of an interrupted write (only ever reported
    /// for the last segment). `offset` 0 means not even the header survived.
    Torn { offset: u64, reason: String },
}

/// A segment split into frames.
#[derive(Debug)]
pub(crate) struct Scanned<'a> {
    /// The header, unless the segment is torn at offset 0.
    pub(crate) header: Option<Header>,
    /// The valid frames, in file order.
    pub(crate) frames: Vec<Frame<'a>>,
    /// How the file ends.
    pub(crate) tail: Tail,
    /// The logical length: where the valid frames end (the torn tail's offset, if torn). Only
    /// zeros (preallocated space), or the torn tail, follow it.
    pub(crate) len: u64,
}

/// Whether `bytes` holds nothing but zeros: preallocated space no frame was written into.
pub(crate) fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Splits the bytes of `segment` into frames, applying the torn-tail rule (see the module doc).
/// `is_last` says whether this is the newest segment, the only one a crash can have torn.
pub(crate) fn scan<'a>(
    segment: &SegmentFile,
    bytes: &'a [u8],
    is_last: bool,
) -> Result<Scanned<'a>, StorageError> {
    let corrupt = |offset: usize, reason: String| StorageError::Corrupt {
        path: segment.path.clone(),
        offset: offset as u64,
        reason,
    };
    // A bad spot at `offset` is a torn tail only in the last segment with nothing valid after it.
    let bad_spot = |offset: usize, reason: String| -> Result<Tail, StorageError> {
        if let Some(valid) = find_valid_frame(bytes, offset + 1) {
            return Err(corrupt(
                offset,
                format!("{reason}, yet a valid frame follows at byte {valid}"),
            ));
        }
        if !is_last {
            return Err(corrupt(
                offset,
                format!("{reason}, in a segment that is not the last one"),
            ));
        }
        Ok(Tail::Torn {
            offset: offset as u64,
            reason,
        })
    };

    let header = match Header::decode(bytes) {
        Ok(header) => header,
        Err(reason) => {
            return Ok(Scanned {
                header: None,
                frames: Vec::new(),
                tail: bad_spot(0, reason)?,
                len: 0,
            });
        }
    };
    if (header.seq, header.start_index) != (segment.seq, segment.start_index) {
        return Err(corrupt(
            0,
            format!(
                "header says segment {} starting at index {}, unlike the file name",
                header.seq, header.start_index
            ),
        ));
    }

    let mut frames = Vec::new();
    let mut at = HEADER_LEN;
    let tail = loop {
        // The end of the file, or the start of the zeros ahead of the next frame. (`all_zero`
        // stops at the first byte that is not zero: a frame's magic, right where it starts.)
        if all_zero(&bytes[at..]) {
            break Tail::Clean;
        }
        match read_frame(bytes, at) {
            FrameRead::Valid { payload, next } => {
                frames.push(Frame {
                    offset: at as u64,
                    payload_offset: payload.start as u64,
                    payload: &bytes[payload],
                });
                at = next;
            }
            FrameRead::Invalid(reason) => break bad_spot(at, reason)?,
        }
    };
    let len = match &tail {
        Tail::Clean => at as u64,
        Tail::Torn { offset, .. } => *offset,
    };
    Ok(Scanned {
        header: Some(header),
        frames,
        tail,
        len,
    })
}
