//! Snapshot files: the state machine's bytes and their metadata in one CRC-protected file.
//!
//! # File format
//!
//! `snap/<last_index:016x>-<last_term:016x>.snap`, all integers little-endian:
//!
//! ```text
//! magic     8 bytes  "SYNCSNAP"
//! version   u32      1
//! meta_len  u32      length of the encoded SnapshotMetadata
//! data_len  u64      length of the state machine's bytes
//! meta      meta_len bytes: sync.raft.v1.SnapshotMetadata (protobuf), the same message as on the wire
//! data      data_len bytes
//! crc       u32      CRC-32 (IEEE) of everything above
//! ```
//!
//! # Rules
//!
//! - A snapshot is written to `<name>.tmp`, fsynced, renamed to `<name>`, and the directory is
//!   fsynced (`fsutil::write_atomic`). So a file with a final name is always
//!   complete; a crash leaves at most a `.tmp` file, which opening removes.
//! - Only the newest snapshot is needed: older files are removed once a newer one is durable (and
//!   again at open, in case a crash came in between).
//! - A newest snapshot that fails its checks is an error, never skipped: the WAL segments it made
//!   unnecessary may already be deleted, so falling back to an older snapshot could silently lose
//!   committed entries. Since complete files are the only ones with a final name, such a file means
//!   the disk corrupted it; the replica must be rebuilt from its peers.

use std::fs;
use std::path::{Path, PathBuf};

use prost::Message;
use sync_proto::raft::v1::SnapshotMetadata;

use super::error::{StorageError, io_err};
use super::fsutil::{create_dir_durable, fsync_dir, write_atomic};

const MAGIC: [u8; 8] = *b"SYNCSNAP";
const VERSION: u32 = 1;
/// magic + version + meta_len + data_len.
const HEADER_LEN: usize = 8 + 4 + 4 + 8;
const CRC_LEN: usize = 4;

/// The snapshot directory of one group.
#[derive(Debug)]
pub(crate) struct SnapshotDir {
    /// `<group dir>/snap`.
    dir: PathBuf,
}

/// The file name of the snapshot at `index`/`term`; hex so that names sort by index.
fn file_name(index: u64, term: u64) -> String {
    format!("{index:016x}-{term:016x}.snap")
}

/// Parses `<index>-<term>.snap`; `None` for any other name.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".snap")?;
    let (index, term) = stem.split_once('-')?;
    if index.len() != 16 || term.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(index, 16).ok()?,
        u64::from_str_radix(term, 16).ok()?,
    ))
}

/// Encodes the header of a snapshot file; the caller appends meta, data and the CRC.
fn encode_header(meta_len: usize, data_len: usize) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(meta_len as u32).to_le_bytes());
    header.extend_from_slice(&(data_len as u64).to_le_bytes());
    header
}

/// Checks and splits the bytes of a snapshot file.
fn decode(bytes: &[u8]) -> Result<(SnapshotMetadata, &[u8]), String> {
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(format!(
            "file is {} bytes, shorter than any snapshot",
            bytes.len()
        ));
    }
    let (body, crc) = bytes.split_at(bytes.len() - CRC_LEN);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(format!(
            "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    if body[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let version = u32::from_le_bytes([body[8], body[9], body[10], body[11]]);
    if version != VERSION {
        return Err(format!("unknown format version {version}"));
    }
    let meta_len = u32::from_le_bytes([body[12], body[13], body[14], body[15]]) as usize;
    let mut data_len = [0u8; 8];
    data_len.copy_from_slice(&body[16..24]);
    let data_len = u64::from_le_bytes(data_len);
    if (HEADER_LEN as u64)
        .checked_add(meta_len as u64)
        .and_then(|n| n.checked_add(data_len))
        != Some(body.len() as u64)
    {
        return Err(format!(
            "lengths (metadata {meta_len}, data {data_len}) do not add up to the file size"
        ));
    }
    let meta = SnapshotMetadata::decode(&body[HEADER_LEN..HEADER_LEN + meta_len])
        .map_err(|e| format!("undecodable metadata: {e}"))?;
    Ok((meta, &body[HEADER_LEN + meta_len..]))
}

impl SnapshotDir {
    /// Opens (creating if needed) the snapshot directory `dir`, removes leftovers of interrupted
    /// writes and superseded snapshots, and returns the metadata of the newest snapshot after
    /// checking its file in full.
    pub(crate) fn open(
        dir: &Path,
    ) -> Result<(SnapshotDir, Option<SnapshotMetadata>), StorageError> {
        create_dir_durable(dir)?;
        let snapdir = SnapshotDir {
            dir: dir.to_path_buf(),
        };
        let mut found = Vec::new();
        let mut removed = false;
        for item in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let item = item.map_err(io_err("list", dir))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                // An interrupted write_atomic: never renamed, so never part of the state.
                let path = item.path();
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                removed = true;
            } else if let Some((index, term)) = parse_name(name) {
                found.push((index, term));
            }
        }
        found.sort_unstable();
        let newest = match found.last() {
            Some(&(index, term)) => {
                let (meta, _) = snapdir.load_file(index, term)?;
                Some(meta)
            }
            None => None,
        };
        if let Some(meta) = &newest {
            removed |= snapdir.remove_older_files(meta.last_index)?;
        }
        if removed {
            fsync_dir(dir)?;
        }
        Ok((snapdir, newest))
    }

    /// Writes the snapshot file for `meta` atomically.
    pub(crate) fn save(&self, meta: &SnapshotMetadata, data: &[u8]) -> Result<(), StorageError> {
        let path = self.dir.join(file_name(meta.last_index, meta.last_term));
        let meta_bytes = meta.encode_to_vec();
        let header = encode_header(meta_bytes.len(), data.len());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header);
        hasher.update(&meta_bytes);
        hasher.update(data);
        let crc = hasher.finalize().to_le_bytes();
        write_atomic(&path, &[&header, &meta_bytes, data, &crc])
    }

    /// Reads and checks the snapshot described by `meta`.
    pub(crate) fn load(
        &self,
        meta: &SnapshotMetadata,
    ) -> Result<(SnapshotMetadata, Vec<u8>), StorageError> {
        self.load_file(meta.last_index, meta.last_term)
    }

    fn load_file(
        &self,
        index: u64,
        term: u64,
    ) -> Result<(SnapshotMetadata, Vec<u8>), StorageError> {
        let path = self.dir.join(file_name(index, term));
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        let corrupt = |reason: String| StorageError::CorruptSnapshot {
            path: path.clone(),
            reason,
        };
        let (meta, data) = decode(&bytes).map_err(corrupt)?;
        if (meta.last_index, meta.last_term) != (index, term) {
            return Err(corrupt(format!(
                "metadata says index {} term {}, the file name index {index} term {term}",
                meta.last_index, meta.last_term
            )));
        }
        Ok((meta, data.to_vec()))
    }

    /// Removes every snapshot file older than `index` (no directory fsync: a removal that a crash
    /// undoes only brings back a file that the next open removes again). Returns whether any was.
    pub(crate) fn remove_older_files(&self, index: u64) -> Result<bool, StorageError> {
        let mut removed = false;
        for item in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let item = item.map_err(io_err("list", &self.dir))?;
            let name = item.file_name();
            let Some((older, _)) = name.to_str().and_then(parse_name) else {
                continue;
            };
            if older < index {
                let path = item.path();
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                removed = true;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_proto::raft::v1::{ClusterConfig, Member};

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

    #[test]
    fn snapshot_round_trips_and_only_the_newest_survives_open() -> Result<(), StorageError> {
        let tmp = tempfile::tempdir().map_err(io_err("create", Path::new("tempdir")))?;
        let dir = tmp.path().join("snap");
        let (snaps, newest) = SnapshotDir::open(&dir)?;
        assert_eq!(newest, None);
        snaps.save(&meta(5, 2), b"five")?;
        snaps.save(&meta(9, 3), b"nine")?;
        fs::write(dir.join("leftover.snap.tmp"), b"half").map_err(io_err("write", &dir))?;
        drop(snaps);

        let (snaps, newest) = SnapshotDir::open(&dir)?;
        assert_eq!(newest, Some(meta(9, 3)));
        assert_eq!(snaps.load(&meta(9, 3))?, (meta(9, 3), b"nine".to_vec()));
        let names: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err("list", &dir))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        assert_eq!(names, vec![file_name(9, 3)]);
        Ok(())
    }

    #[test]
    fn corrupt_newest_snapshot_is_refused_naming_the_file() -> Result<(), StorageError> {
        let tmp = tempfile::tempdir().map_err(io_err("create", Path::new("tempdir")))?;
        let dir = tmp.path().join("snap");
        let (snaps, _) = SnapshotDir::open(&dir)?;
        snaps.save(&meta(9, 3), b"state machine bytes")?;
        let path = dir.join(file_name(9, 3));
        let clean = fs::read(&path).map_err(io_err("read", &path))?;
        for offset in 0..clean.len() {
            let mut bad = clean.clone();
            bad[offset] ^= 0x40;
            fs::write(&path, &bad).map_err(io_err("write", &path))?;
            match SnapshotDir::open(&dir) {
                Err(err @ StorageError::CorruptSnapshot { .. }) => {
                    assert!(err.to_string().contains(&file_name(9, 3)), "{err}");
                }
                other => panic!("flipped byte {offset}: expected CorruptSnapshot, got {other:?}"),
            }
        }
        for len in [0, 10, clean.len() - 1] {
            fs::write(&path, &clean[..len]).map_err(io_err("write", &path))?;
            assert!(matches!(
                SnapshotDir::open(&dir),
                Err(StorageError::CorruptSnapshot { .. })
            ));
        }
        Ok(())
    }

    #[test]
    fn snapshot_whose_name_disagrees_with_its_metadata_is_refused() -> Result<(), StorageError> {
        let tmp = tempfile::tempdir().map_err(io_err("create", Path::new("tempdir")))?;
        let dir = tmp.path().join("snap");
        let (snaps, _) = SnapshotDir::open(&dir)?;
        snaps.save(&meta(9, 3), b"x")?;
        fs::rename(dir.join(file_name(9, 3)), dir.join(file_name(10, 3)))
            .map_err(io_err("rename", &dir))?;
        assert!(matches!(
            SnapshotDir::open(&dir),
            Err(StorageError::CorruptSnapshot { .. })
        ));
        Ok(())
    }
}
