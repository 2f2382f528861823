//! What clients saw: completed writes and reads per key, in the run's order of events, for
//! the linearizability-style checks. Every call into a node or the directory is one event;
//! "before" means an earlier event, so two things in the same millisecond are still ordered.

use std::collections::{BTreeMap, BTreeSet};

use crate::cache::Version;

/// A position in the run's total order of events.
pub type Instant = u64;

/// Completions of one kind for one key, in event order.
#[derive(Debug, Default)]
struct Completions {
    /// `(completed at, version)`.
    entries: Vec<(Instant, Version)>,
}

impl Completions {
    fn push(&mut self, at: Instant, version: Version) {
        self.entries.push((at, version));
    }

    /// The newest version completed strictly before `at` that is not `lost`, and when.
    fn newest_before(&self, at: Instant, lost: &BTreeSet<Version>) -> Option<(Version, Instant)> {
        let n = self.entries.partition_point(|e| e.0 < at);
        self.entries[..n]
            .iter()
            .filter(|(_, v)| !lost.contains(v))
            .map(|&(when, v)| (v, when))
            .max()
    }
}

/// The client-visible history of a run.
#[derive(Debug, Default)]
pub struct History {
    /// Writes acknowledged as applied, by key.
    writes: BTreeMap<String, Completions>,
    /// Reads answered, by key.
    reads: BTreeMap<String, Completions>,
    /// Write-back mode: versions of writes acknowledged by a node and lost before they were
    /// written back (the node crashed, the directory gave up on its line, or the directory
    /// changed). The guarantees hold for every other write; these are left out of them.
    lost: BTreeMap<String, BTreeSet<Version>>,
}

impl History {
    /// A write of `key` was acknowledged with `version` at `at`.
    pub fn write_completed(&mut self, key: &str, at: Instant, version: Version) {
        self.writes
            .entry(key.to_string())
            .or_default()
            .push(at, version);
    }

    /// A read of `key` returned `version` at `at`.
    pub fn read_completed(&mut self, key: &str, at: Instant, version: Version) {
        self.reads
            .entry(key.to_string())
            .or_default()
            .push(at, version);
    }

    /// Version `version` of `key` was lost before it reached memory.
    pub fn lose(&mut self, key: &str, version: Version) {
        self.lost
            .entry(key.to_string())
            .or_default()
            .insert(version);
    }

    /// True if `version` of `key` was lost.
    pub fn is_lost(&self, key: &str, version: Version) -> bool {
        self.lost.get(key).is_some_and(|l| l.contains(&version))
    }

    /// The newest version of `key` acknowledged to a writer before `at`, and when (lost
    /// versions left out).
    pub fn newest_write_before(&self, key: &str, at: Instant) -> Option<(Version, Instant)> {
        let empty = BTreeSet::new();
        let lost = self.lost.get(key).unwrap_or(&empty);
        self.writes.get(key)?.newest_before(at, lost)
    }

    /// The newest version of `key` returned to a reader before `at`, and when (lost versions
    /// left out).
    pub fn newest_read_before(&self, key: &str, at: Instant) -> Option<(Version, Instant)> {
        let empty = BTreeSet::new();
        let lost = self.lost.get(key).unwrap_or(&empty);
        self.reads.get(key)?.newest_before(at, lost)
    }
}
