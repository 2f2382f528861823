//! What clients saw: completed writes and reads per key, in the run's order of events, for
//! the linearizability-style checks. Every call into a node or the directory is one event;
//! "before" means an earlier event, so two things in the same millisecond are still ordered.

use std::collections::BTreeMap;

use crate::cache::Version;

/// A position in the run's total order of events.
pub type Instant = u64;

/// Completions of one kind for one key, in event order, each with the highest version
/// completed so far (so "the newest version completed before t" is one binary search).
#[derive(Debug, Default)]
struct Completions {
    /// `(completed at, highest version completed up to then, when that one completed)`.
    entries: Vec<(Instant, Version, Instant)>,
}

impl Completions {
    fn push(&mut self, at: Instant, version: Version) {
        let best = match self.entries.last() {
            Some(&(_, v, when)) if v >= version => (v, when),
            _ => (version, at),
        };
        self.entries.push((at, best.0, best.1));
    }

    /// The newest version completed strictly before `at`, and when.
    fn newest_before(&self, at: Instant) -> Option<(Version, Instant)> {
        let n = self.entries.partition_point(|e| e.0 < at);
        n.checked_sub(1)
            .map(|i| (self.entries[i].1, self.entries[i].2))
    }
}

/// The client-visible history of a run.
#[derive(Debug, Default)]
pub struct History {
    /// Writes acknowledged as applied, by key.
    writes: BTreeMap<String, Completions>,
    /// Reads answered, by key.
    reads: BTreeMap<String, Completions>,
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

    /// The newest version of `key` acknowledged to a writer before `at`, and when.
    pub fn newest_write_before(&self, key: &str, at: Instant) -> Option<(Version, Instant)> {
        self.writes.get(key)?.newest_before(at)
    }

    /// The newest version of `key` returned to a reader before `at`, and when.
    pub fn newest_read_before(&self, key: &str, at: Instant) -> Option<(Version, Instant)> {
        self.reads.get(key)?.newest_before(at)
    }
}
