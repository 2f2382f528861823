//! File-system primitives whose ordering the durability of the store depends on.
//!
//! A file's contents are durable after `fdatasync`, but its *name* lives in the directory: creating,
//! renaming or removing a file is durable only after an fsync of the directory. Every helper here
//! exists so that no call site forgets one of the two.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::error::{StorageError, io_err};

/// Makes the entries of `dir` (creations, renames, removals) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StorageError> {
    let handle = File::open(dir).map_err(io_err("open directory", dir))?;
    handle.sync_all().map_err(io_err("fsync directory", dir))
}

/// Creates `dir` (and missing parents) if needed; when it had to be created, fsyncs its parent so
/// that the new directory survives a crash.
pub(crate) fn create_dir_durable(dir: &Path) -> Result<(), StorageError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// Writes `parts` to `path` atomically: a temp file beside it is written and fsynced, renamed over
/// `path`, and the directory is fsynced. After a crash, `path` holds either its old contents or all
/// of the new ones; a leftover temp file (name ending in `.tmp`) is garbage for the caller to remove.
pub(crate) fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<(), StorageError> {
    let dir = path
        .parent()
        .ok_or_else(|| StorageError::Io {
            op: "find the directory of",
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?
        .to_path_buf();
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    for part in parts {
        file.write_all(part).map_err(io_err("write", &tmp))?;
    }
    // sync_all, not sync_data: the file is new, its size and allocation must be durable too.
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
    fsync_dir(&dir)
}

/// An exclusive `flock` on `<dir>/LOCK`, held for as long as this value lives.
///
/// Two stores appending to the same segment would interleave frames and destroy the log; the lock
/// turns that mistake (a second process, or a second `Wal::open` in the same process) into
/// [`StorageError::Locked`]. `flock` locks belong to the open file description, so they conflict
/// within one process too, and the kernel releases them if the process dies.
#[derive(Debug)]
pub(crate) struct DirLock {
    /// Keeps the locked file description open; closing it releases the lock.
    _file: File,
}

impl DirLock {
    /// Takes the lock without waiting.
    pub(crate) fn acquire(dir: &Path) -> Result<DirLock, StorageError> {
        let path = dir.join("LOCK");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open lock file", &path))?;
        // SAFETY: flock only reads the descriptor number, which `file` keeps open for the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                return Err(StorageError::Locked { path });
            }
            return Err(StorageError::Io {
                op: "flock",
                path,
                source: err,
            });
        }
        Ok(DirLock { _file: file })
    }
}
