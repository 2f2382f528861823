//! The cache's memory: the backing copy of every cache key, replicated through Raft.
//!
//! The cache directory (`crate::cache::Directory`, on the leader) turns every write that
//! reaches memory into a [`ipb::CacheWrite`] proposal and reads with a linearizable read, so
//! this module only has to honour the memory contract of `crate::cache::memory`:
//! - **versions**: a write or deletion of a key applied at log index `i` gets version
//!   `max(i, floor + 1)`, where `floor` is the larger of the key's version and its reservation's
//!   limit. Without reservations that is the log index, which strictly increases; with them it
//!   still strictly increases per key and never falls inside a block a holder may number its
//!   local writes from. A deletion keeps a tombstone so that the key's version never goes back,
//!   and a key never written reads as version 0;
//! - **reservations** (write-back mode, contract rule 6): a [`ipb::CacheReadReserve`] or
//!   [`ipb::CacheWriteReserve`] sets the key's *latest reservation* to `base + 1 ..= limit`, with
//!   `base` = max(the key's version after the command, the previous limit) and `limit = base +
//!   block`. Only the latest one is kept: a [`ipb::CacheWriteBack`] is taken only inside it (and
//!   above the key's version), and every earlier one lies below it, so the limit alone keeps
//!   memory's own versions out of all of them. The reservation is replicated state (it is in the
//!   snapshot), so it survives restarts, snapshots and the loss of the node that holds it;
//! - **fencing**: every command names the directory's epoch, and is refused unless the entry's
//!   term is that epoch. A leader only proposes in its own term, so this refuses exactly the
//!   commands of a directory left over from an earlier term of the same node. A refused command
//!   changes nothing, reservations included;
//! - **TTL**: the expiry is stamped from the leader time carried by the entry, so every replica
//!   agrees; a read reports the time left by the reader's (the leader's) clock. A write-back's
//!   value has no TTL (local writes are Sets without one).
//!
//! Expired values and tombstones are kept (a key costs its tombstone until it is written again):
//! the cache's keys are few compared with its traffic, and purging them would need a replicated
//! time-driven command for no gain in correctness. A reservation is kept the same way.

use std::collections::BTreeMap;

use bytes::Bytes;
use sync_proto::internal::v1 as ipb;

use crate::cache::Stored;

/// One key's backing copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Record {
    /// The value; `None` for a deletion (or a key that only has a reservation).
    value: Option<Bytes>,
    /// The version of the write or deletion (0: never written).
    version: u64,
    /// Leader time (Unix ms) at which the value expires.
    expires_at: Option<u64>,
    /// The key's latest reservation, `base + 1 ..= limit`; `(0, 0)`: none. Memory gives the key
    /// only versions above `limit` (a holder may have numbered local writes inside it), and
    /// takes a write-back only inside it.
    reserved: Reservation,
}

/// A key's latest reservation: versions `base + 1 ..= limit`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Reservation {
    /// Versions above this are reserved.
    base: u64,
    /// The highest reserved version.
    limit: u64,
}

impl Record {
    /// The value if it has not expired at `now_ms`.
    fn live_value(&self, now_ms: u64) -> Option<&Bytes> {
        self.value
            .as_ref()
            .filter(|_| self.expires_at.is_none_or(|t| now_ms < t))
    }

    /// The lowest version memory may give this key's next write: above its version and above
    /// every version ever reserved for it (each reservation starts at or above the previous
    /// limit, so the latest limit bounds them all).
    fn floor(&self) -> u64 {
        self.version.max(self.reserved.limit)
    }
}

/// Why an epoch-fenced cache command was refused, if it was: the directory of `epoch` proposed
/// it, and it was committed in an entry of `term`. Every cache command is fenced this way.
fn fence(epoch: u64, term: u64) -> Option<String> {
    (epoch != term)
        .then(|| format!("cache command of directory epoch {epoch} in an entry of term {term}"))
}

/// The highest limit a reservation may reach. Versions are log indexes plus reserved blocks,
/// far below this; a block that would pass it (a misconfigured `block`) is refused, so that
/// `floor + 1` can never saturate and give a key the same version twice.
pub const MAX_RESERVED_VERSION: u64 = u64::MAX / 2;

/// Why a reservation of `block` versions above `base` is refused, if it is.
fn too_large(base: u64, block: u64) -> Option<String> {
    base.checked_add(block)
        .is_none_or(|limit| limit > MAX_RESERVED_VERSION)
        .then(|| format!("a reservation of {block} versions above {base} is too large"))
}

/// Every cache key's backing copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheMemory {
    records: BTreeMap<String, Record>,
}

impl CacheMemory {
    /// Reads `key` at leader time `now_ms`: the value (if it exists and has not expired), its
    /// version, and the time it has left.
    pub fn read(&self, key: &str, now_ms: u64) -> Stored {
        let Some(r) = self.records.get(key) else {
            return Stored {
                version: 0,
                value: None,
                ttl_left_ms: None,
            };
        };
        let value = r.live_value(now_ms).cloned();
        Stored {
            version: r.version,
            ttl_left_ms: value
                .as_ref()
                .and(r.expires_at)
                .map(|t| t.saturating_sub(now_ms)),
            value,
        }
    }

    /// The latest reservation of `key`, `(base, limit)`, if it has one.
    pub fn reservation(&self, key: &str) -> Option<(u64, u64)> {
        self.records
            .get(key)
            .map(|r| r.reserved)
            .filter(|r| *r != Reservation::default())
            .map(|r| (r.base, r.limit))
    }

    /// Applies a write of entry `index` in `term` at leader time `now_ms`.
    pub fn apply(
        &mut self,
        index: u64,
        term: u64,
        now_ms: u64,
        w: &ipb::CacheWrite,
    ) -> ipb::CacheWriteResult {
        let refused = |why: String| ipb::CacheWriteResult {
            refused: why,
            ..Default::default()
        };
        if let Some(why) = fence(w.epoch, term) {
            return refused(why);
        }
        let Some(mutation) = &w.mutation else {
            return refused("cache write without a mutation".into());
        };
        let current = self.records.get(&w.key);
        let existed = current.is_some_and(|r| r.live_value(now_ms).is_some());
        let current_version = current.map_or(0, |r| r.version);
        if let Some(expect) = w.expect_version
            && expect != current_version
        {
            return ipb::CacheWriteResult {
                current_version,
                ..Default::default()
            };
        }
        // Above the key's version and every reserved one; the log index otherwise, so that
        // without reservations versions are exactly the commit indexes they always were.
        // (The floor is a log index or at most MAX_RESERVED_VERSION, so + 1 never saturates.)
        let current = self.records.entry(w.key.clone()).or_default();
        let version = index.max(current.floor().saturating_add(1));
        let (value, expires_at) = match mutation {
            ipb::cache_write::Mutation::Set(set) => (
                Some(set.value.clone()),
                set.ttl_ms.map(|t| now_ms.saturating_add(t)),
            ),
            ipb::cache_write::Mutation::Delete(_) => (None, None),
        };
        *current = Record {
            value,
            version,
            expires_at,
            reserved: current.reserved,
        };
        ipb::CacheWriteResult {
            applied: true,
            version,
            current_version: version,
            existed,
            ..Default::default()
        }
    }

    /// Applies a reserving write (write-back mode): the write exactly as [`CacheMemory::apply`],
    /// then, if it applied, a reservation of `block` versions above it. A refused or mismatched
    /// write reserves nothing (the directory grants no line for it, so nobody could use the
    /// block, and a reservation would only give up the latest holder's one).
    pub fn write_reserve(
        &mut self,
        index: u64,
        term: u64,
        now_ms: u64,
        w: &ipb::CacheWriteReserve,
    ) -> ipb::CacheWriteResult {
        let Some(write) = &w.write else {
            return ipb::CacheWriteResult {
                refused: "reserving cache write without a write".into(),
                ..Default::default()
            };
        };
        // The write's version, if it applies, and so the reservation's base.
        let next = index.max(self.floor(&write.key).saturating_add(1));
        if let Some(refused) = too_large(next, w.block) {
            return ipb::CacheWriteResult {
                refused,
                ..Default::default()
            };
        }
        let mut result = self.apply(index, term, now_ms, write);
        if result.applied {
            result.reserved_base = Some(self.reserve(&write.key, w.block));
        }
        result
    }

    /// Applies a reserving read (write-back mode) of entry term `term` at leader time `now_ms`:
    /// the key as [`CacheMemory::read`] sees it, and a reservation of `block` versions.
    pub fn read_reserve(
        &mut self,
        term: u64,
        now_ms: u64,
        r: &ipb::CacheReadReserve,
    ) -> ipb::CacheReadReserveResult {
        if let Some(refused) = fence(r.epoch, term) {
            return ipb::CacheReadReserveResult {
                refused,
                ..Default::default()
            };
        }
        if let Some(refused) = too_large(self.floor(&r.key), r.block) {
            return ipb::CacheReadReserveResult {
                refused,
                ..Default::default()
            };
        }
        let stored = self.read(&r.key, now_ms);
        ipb::CacheReadReserveResult {
            refused: String::new(),
            value: stored.value,
            version: stored.version,
            ttl_left_ms: stored.ttl_left_ms,
            base: self.reserve(&r.key, r.block),
        }
    }

    /// Applies a write-back (write-back mode) of entry term `term`: the value with its own
    /// version, only if that version is inside the key's latest reservation and above the key's
    /// version. Otherwise nothing changes: memory holds that version or a newer one (a repeat),
    /// or a newer reservation was made since (the directory gave up on this holder's line), and
    /// taking it could then reuse a version another holder gives out.
    pub fn write_back(&mut self, term: u64, w: &ipb::CacheWriteBack) -> ipb::CacheWriteBackResult {
        if let Some(refused) = fence(w.epoch, term) {
            return ipb::CacheWriteBackResult {
                refused,
                applied: false,
            };
        }
        let Some(record) = self.records.get_mut(&w.key) else {
            return ipb::CacheWriteBackResult::default();
        };
        let Reservation { base, limit } = record.reserved;
        if !(base < w.version && w.version <= limit && record.version < w.version) {
            return ipb::CacheWriteBackResult::default();
        }
        record.value = Some(w.value.clone());
        record.version = w.version;
        record.expires_at = None;
        ipb::CacheWriteBackResult {
            refused: String::new(),
            applied: true,
        }
    }

    /// The larger of `key`'s version and its reservation's limit (0 for an unknown key).
    fn floor(&self, key: &str) -> u64 {
        self.records.get(key).map_or(0, Record::floor)
    }

    /// Makes `block` versions of `key` its latest reservation: `base` = max(its version, the
    /// previous limit), so the block overlaps neither a version memory gave nor an earlier
    /// block. Returns `base`.
    fn reserve(&mut self, key: &str, block: u64) -> u64 {
        let record = self.records.entry(key.to_string()).or_default();
        let base = record.floor();
        record.reserved = Reservation {
            base,
            // Checked by the caller against MAX_RESERVED_VERSION.
            limit: base.saturating_add(block),
        };
        base
    }

    /// The snapshot of every record.
    pub fn snapshot(&self) -> ipb::CacheMemorySnapshot {
        ipb::CacheMemorySnapshot {
            records: self
                .records
                .iter()
                .map(|(k, r)| ipb::CacheRecord {
                    key: k.clone(),
                    value: r.value.clone(),
                    version: r.version,
                    expires_unix_ms: r.expires_at.unwrap_or(0),
                    reserved_base: r.reserved.base,
                    reserved_limit: r.reserved.limit,
                })
                .collect(),
        }
    }

    /// Rebuilds the memory from [`CacheMemory::snapshot`]. A snapshot written before
    /// reservations existed has none (base and limit 0), which is what its state had.
    pub fn restore(snap: ipb::CacheMemorySnapshot) -> Self {
        CacheMemory {
            records: snap
                .records
                .into_iter()
                .map(|r| {
                    let record = Record {
                        value: r.value,
                        version: r.version,
                        expires_at: (r.expires_unix_ms != 0).then_some(r.expires_unix_ms),
                        reserved: Reservation {
                            base: r.reserved_base,
                            limit: r.reserved_limit,
                        },
                    };
                    (r.key, record)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(key: &str, value: &str, ttl_ms: Option<u64>, expect: Option<u64>) -> ipb::CacheWrite {
        ipb::CacheWrite {
            key: key.into(),
            epoch: 1,
            mutation: Some(ipb::cache_write::Mutation::Set(ipb::CacheSet {
                value: Bytes::from(value.to_string()),
                ttl_ms,
            })),
            expect_version: expect,
            tag: None,
        }
    }

    fn delete(key: &str) -> ipb::CacheWrite {
        ipb::CacheWrite {
            key: key.into(),
            epoch: 1,
            mutation: Some(ipb::cache_write::Mutation::Delete(ipb::CacheDelete {})),
            expect_version: None,
            tag: None,
        }
    }

    #[test]
    fn a_write_gets_its_log_index_as_version_and_a_missing_key_reads_as_version_zero() {
        let mut m = CacheMemory::default();
        assert_eq!(m.read("k", 0).version, 0);
        let r = m.apply(7, 1, 0, &set("k", "v", None, None));
        assert!(r.applied && r.version == 7 && !r.existed);
        let s = m.read("k", 0);
        assert_eq!((s.version, s.value), (7, Some(Bytes::from("v"))));
    }

    #[test]
    fn a_deletion_keeps_its_version_so_versions_never_go_back() {
        let mut m = CacheMemory::default();
        m.apply(3, 1, 0, &set("k", "v", None, None));
        let r = m.apply(5, 1, 0, &delete("k"));
        assert!(r.applied && r.existed && r.version == 5);
        assert_eq!(
            m.read("k", 0),
            Stored {
                version: 5,
                value: None,
                ttl_left_ms: None
            }
        );
        // Deleting again: applied, did not exist.
        let r = m.apply(6, 1, 0, &delete("k"));
        assert!(r.applied && !r.existed);
    }

    #[test]
    fn compare_and_set_applies_only_on_the_expected_version() {
        let mut m = CacheMemory::default();
        assert!(m.apply(2, 1, 0, &set("k", "a", None, Some(0))).applied);
        let miss = m.apply(3, 1, 0, &set("k", "b", None, Some(0)));
        assert!(!miss.applied);
        assert_eq!(miss.current_version, 2);
        assert!(m.apply(4, 1, 0, &set("k", "b", None, Some(2))).applied);
        assert_eq!(m.read("k", 0).value, Some(Bytes::from("b")));
    }

    #[test]
    fn a_write_of_another_epoch_than_its_entrys_term_is_refused() {
        let mut m = CacheMemory::default();
        let r = m.apply(2, 2, 0, &set("k", "a", None, None));
        assert!(!r.applied && !r.refused.is_empty());
        assert_eq!(m.read("k", 0).version, 0);
    }

    #[test]
    fn a_ttl_counts_from_the_leader_time_of_the_entry() {
        let mut m = CacheMemory::default();
        m.apply(2, 1, 1_000, &set("k", "a", Some(500), None));
        assert_eq!(m.read("k", 1_200).ttl_left_ms, Some(300));
        let gone = m.read("k", 1_500);
        assert_eq!((gone.value, gone.version), (None, 2));
    }

    #[test]
    fn snapshot_round_trip_keeps_values_tombstones_and_expiries() {
        let mut m = CacheMemory::default();
        m.apply(2, 1, 1_000, &set("a", "1", Some(500), None));
        m.apply(3, 1, 1_000, &set("b", "2", None, None));
        m.apply(4, 1, 1_000, &delete("b"));
        assert_eq!(CacheMemory::restore(m.snapshot()), m);
    }

    // ----- write-back mode: reservations (contract rule 6) --------------------------------------

    fn read_reserve(key: &str, epoch: u64, block: u64) -> ipb::CacheReadReserve {
        ipb::CacheReadReserve {
            key: key.into(),
            epoch,
            block,
        }
    }

    fn write_reserve(w: ipb::CacheWrite, block: u64) -> ipb::CacheWriteReserve {
        ipb::CacheWriteReserve {
            write: Some(w),
            block,
        }
    }

    fn write_back(key: &str, epoch: u64, version: u64, value: &str) -> ipb::CacheWriteBack {
        ipb::CacheWriteBack {
            key: key.into(),
            epoch,
            version,
            value: Bytes::from(value.to_string()),
        }
    }

    #[test]
    fn a_reserving_read_answers_the_read_and_reserves_above_the_version_and_the_last_limit() {
        let mut m = CacheMemory::default();
        // A key never written: base 0, its first block 1..=10.
        let r = m.read_reserve(1, 0, &read_reserve("k", 1, 10));
        assert!(r.refused.is_empty());
        assert_eq!((r.version, r.value, r.base), (0, None, 0));
        assert_eq!(m.reservation("k"), Some((0, 10)));
        // The next reservation starts at the previous limit, above the version 0.
        let r = m.read_reserve(1, 0, &read_reserve("k", 1, 10));
        assert_eq!(r.base, 10);
        assert_eq!(m.reservation("k"), Some((10, 20)));
        // A write lands above the block (index 4 is far below it) ...
        let w = m.apply(4, 1, 0, &set("k", "v", Some(100), None));
        assert_eq!(w.version, 21);
        // ... and the next reservation starts at that version, and reads the value.
        let r = m.read_reserve(1, 30, &read_reserve("k", 1, 5));
        assert_eq!(
            (r.version, r.value, r.ttl_left_ms, r.base),
            (21, Some(Bytes::from("v")), Some(70), 21)
        );
        assert_eq!(m.reservation("k"), Some((21, 26)));
        // A write at a log index above the limit keeps the index as its version.
        assert_eq!(m.apply(40, 1, 0, &delete("k")).version, 40);
        assert_eq!(m.read_reserve(1, 0, &read_reserve("k", 1, 5)).base, 40);
    }

    #[test]
    fn versions_after_a_reservation_skip_the_block_even_if_its_holder_never_writes_back() {
        let mut m = CacheMemory::default();
        m.apply(2, 1, 0, &set("k", "a", None, None));
        let base = m.read_reserve(1, 0, &read_reserve("k", 1, 100)).base;
        assert_eq!(base, 2);
        // The holder is gone (crashed, or the directory gave up on it): nothing comes back, and
        // the next writes, deletions included, still never get a reserved version.
        let d = m.apply(3, 1, 0, &delete("k"));
        assert_eq!(d.version, 103);
        let w = m.apply(4, 1, 0, &set("k", "b", None, None));
        assert_eq!(w.version, 104);
        // Another key is unaffected: its versions are still log indexes.
        assert_eq!(m.apply(5, 1, 0, &set("j", "x", None, None)).version, 5);
    }

    #[test]
    fn a_reserving_write_reserves_above_its_own_version() {
        let mut m = CacheMemory::default();
        m.read_reserve(1, 0, &read_reserve("k", 1, 10));
        let r = m.write_reserve(3, 1, 0, &write_reserve(set("k", "a", None, None), 10));
        assert!(r.applied && r.refused.is_empty());
        assert_eq!((r.version, r.reserved_base), (11, Some(11)));
        assert_eq!(m.reservation("k"), Some((11, 21)));
        // A later reserving write: above the previous limit again.
        let r = m.write_reserve(4, 1, 0, &write_reserve(set("k", "b", None, None), 10));
        assert_eq!((r.version, r.reserved_base), (22, Some(22)));
        assert_eq!(m.read("k", 0).version, 22);
    }

    #[test]
    fn a_mismatched_or_fenced_reserving_write_reserves_nothing() {
        let mut m = CacheMemory::default();
        m.apply(2, 1, 0, &set("k", "a", None, None));
        m.read_reserve(1, 0, &read_reserve("k", 1, 5));
        let before = m.clone();
        let miss = m.write_reserve(3, 1, 0, &write_reserve(set("k", "b", None, Some(9)), 5));
        assert!(!miss.applied && miss.refused.is_empty());
        assert_eq!((miss.current_version, miss.reserved_base), (2, None));
        let fenced = m.write_reserve(4, 2, 0, &write_reserve(set("k", "b", None, None), 5));
        assert!(!fenced.refused.is_empty() && fenced.reserved_base.is_none());
        let empty = m.write_reserve(5, 1, 0, &ipb::CacheWriteReserve::default());
        assert!(!empty.refused.is_empty());
        // Nothing changed: the holder of (2, 7] may still write back inside it.
        assert_eq!(m, before);
        assert!(m.write_back(1, &write_back("k", 1, 3, "local")).applied);
    }

    #[test]
    fn a_block_that_would_pass_the_version_ceiling_is_refused_and_reserves_nothing() {
        let mut m = CacheMemory::default();
        m.apply(2, 1, 0, &set("k", "a", None, None));
        let before = m.clone();
        // Base 2: a limit of MAX_RESERVED_VERSION + 1.
        let r = m.read_reserve(1, 0, &read_reserve("k", 1, MAX_RESERVED_VERSION - 1));
        assert!(!r.refused.is_empty());
        let w = m.write_reserve(3, 1, 0, &write_reserve(set("k", "b", None, None), u64::MAX));
        assert!(!w.refused.is_empty() && !w.applied);
        assert_eq!(m, before);
        // Right at the ceiling is allowed.
        let r = m.read_reserve(1, 0, &read_reserve("k", 1, MAX_RESERVED_VERSION - 2));
        assert_eq!((r.refused.as_str(), r.base), ("", 2));
        assert_eq!(
            m.apply(4, 1, 0, &delete("k")).version,
            MAX_RESERVED_VERSION + 1
        );
    }

    #[test]
    fn a_fenced_reserving_read_reserves_nothing() {
        let mut m = CacheMemory::default();
        let r = m.read_reserve(2, 0, &read_reserve("k", 1, 10));
        assert!(!r.refused.is_empty());
        assert_eq!(m, CacheMemory::default());
    }

    #[test]
    fn a_write_back_inside_the_latest_reservation_carries_its_own_version_and_no_ttl() {
        let mut m = CacheMemory::default();
        m.apply(2, 1, 0, &set("k", "a", Some(50), None));
        assert_eq!(m.read_reserve(1, 0, &read_reserve("k", 1, 10)).base, 2);
        let r = m.write_back(1, &write_back("k", 1, 5, "local"));
        assert!(r.applied && r.refused.is_empty());
        let s = m.read("k", 1_000_000);
        assert_eq!(
            (s.version, s.value, s.ttl_left_ms),
            (5, Some(Bytes::from("local")), None)
        );
        // The upper end of the block is inside it too.
        assert!(m.write_back(1, &write_back("k", 1, 12, "last")).applied);
        assert_eq!(m.read("k", 0).version, 12);
        // And the next write is still above the block.
        assert_eq!(m.apply(3, 1, 0, &set("k", "b", None, None)).version, 13);
    }

    #[test]
    fn a_repeated_or_older_write_back_changes_nothing() {
        let mut m = CacheMemory::default();
        m.read_reserve(1, 0, &read_reserve("k", 1, 10));
        assert!(m.write_back(1, &write_back("k", 1, 4, "v4")).applied);
        let after = m.clone();
        // The same version again (a repeat after a lost answer), and an older one.
        assert!(!m.write_back(1, &write_back("k", 1, 4, "again")).applied);
        assert!(!m.write_back(1, &write_back("k", 1, 3, "v3")).applied);
        assert_eq!(m, after);
    }

    #[test]
    fn a_write_back_outside_the_latest_reservation_changes_nothing() {
        let mut m = CacheMemory::default();
        // No reservation at all.
        assert!(!m.write_back(1, &write_back("k", 1, 1, "v")).applied);
        m.read_reserve(1, 0, &read_reserve("k", 1, 10));
        // The base itself and above the limit are outside (0, 10].
        assert!(!m.write_back(1, &write_back("k", 1, 0, "v")).applied);
        assert!(!m.write_back(1, &write_back("k", 1, 11, "v")).applied);
        // A newer reservation (the directory gave the key to another holder): the old block's
        // versions are refused even though they are above the key's version.
        m.read_reserve(1, 0, &read_reserve("k", 1, 10));
        assert_eq!(m.reservation("k"), Some((10, 20)));
        let before = m.clone();
        assert!(
            !m.write_back(1, &write_back("k", 1, 5, "old holder"))
                .applied
        );
        assert_eq!(m, before);
        assert!(
            m.write_back(1, &write_back("k", 1, 15, "new holder"))
                .applied
        );
    }

    #[test]
    fn a_write_back_of_another_epoch_is_refused_and_changes_nothing() {
        let mut m = CacheMemory::default();
        m.read_reserve(1, 0, &read_reserve("k", 1, 10));
        let before = m.clone();
        let r = m.write_back(2, &write_back("k", 1, 5, "v"));
        assert!(!r.applied && !r.refused.is_empty());
        assert_eq!(m, before);
    }

    #[test]
    fn reservations_survive_a_snapshot_round_trip_and_keep_versions_out_of_the_block() {
        let mut m = CacheMemory::default();
        m.apply(2, 1, 0, &set("k", "a", None, None));
        m.read_reserve(1, 0, &read_reserve("k", 1, 50));
        // A key with a reservation but no value yet.
        m.read_reserve(1, 0, &read_reserve("fresh", 1, 50));
        let mut restored = CacheMemory::restore(m.snapshot());
        assert_eq!(restored, m);
        assert_eq!(restored.reservation("k"), Some((2, 52)));
        assert_eq!(restored.apply(3, 1, 0, &delete("k")).version, 53);
        assert_eq!(
            restored
                .apply(4, 1, 0, &set("fresh", "x", None, None))
                .version,
            51
        );
    }

    #[test]
    fn a_snapshot_written_before_reservations_restores_with_none() {
        /// `CacheRecord` as it was before `reserved_base` and `reserved_limit`.
        #[derive(Clone, PartialEq, prost::Message)]
        struct OldRecord {
            #[prost(string, tag = "1")]
            key: String,
            #[prost(bytes = "bytes", optional, tag = "2")]
            value: Option<Bytes>,
            #[prost(uint64, tag = "3")]
            version: u64,
            #[prost(uint64, tag = "4")]
            expires_unix_ms: u64,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct OldSnapshot {
            #[prost(message, repeated, tag = "1")]
            records: Vec<OldRecord>,
        }
        use prost::Message as _;
        let old = OldSnapshot {
            records: vec![OldRecord {
                key: "k".into(),
                value: Some(Bytes::from("v")),
                version: 7,
                expires_unix_ms: 0,
            }],
        };
        let snap = ipb::CacheMemorySnapshot::decode(old.encode_to_vec().as_slice()).unwrap();
        let mut m = CacheMemory::restore(snap);
        assert_eq!(m.reservation("k"), None);
        assert_eq!(m.read("k", 0).version, 7);
        // No reservation: a write-back is refused and versions are log indexes again.
        assert!(!m.write_back(1, &write_back("k", 1, 8, "v")).applied);
        assert_eq!(m.apply(9, 1, 0, &set("k", "w", None, None)).version, 9);
    }

    // ----- a model of contract rules 2 and 6 --------------------------------------------------

    /// One step of a generated history. Keys are `k0`..`k2`; `stale` commands name an epoch
    /// other than their entry's term.
    #[derive(Clone, Debug)]
    enum Step {
        /// A Set (`delete` false) or Delete; `cas` expects the key's version (`Some(true)`) or
        /// a wrong one (`Some(false)`).
        Write {
            key: u8,
            delete: bool,
            cas: Option<bool>,
            stale: bool,
        },
        /// A reserving write (a Set).
        WriteReserve {
            key: u8,
            block: u64,
            cas: Option<bool>,
            stale: bool,
        },
        /// A reserving read.
        ReadReserve { key: u8, block: u64, stale: bool },
        /// A write-back of a version `pick` chooses near the key's reservations.
        WriteBack { key: u8, pick: u8, stale: bool },
        /// Snapshot and restore.
        Restore,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let stale = proptest::bool::weighted(0.1);
        let cas = proptest::option::weighted(0.3, any::<bool>());
        prop_oneof![
            3 => (0u8..3, any::<bool>(), cas.clone(), stale)
                .prop_map(|(key, delete, cas, stale)| Step::Write { key, delete, cas, stale }),
            2 => (0u8..3, 0u64..8, cas, stale)
                .prop_map(|(key, block, cas, stale)| Step::WriteReserve { key, block, cas, stale }),
            2 => (0u8..3, 0u64..8, stale)
                .prop_map(|(key, block, stale)| Step::ReadReserve { key, block, stale }),
            4 => (0u8..3, any::<u8>(), stale)
                .prop_map(|(key, pick, stale)| Step::WriteBack { key, pick, stale }),
            1 => Just(Step::Restore),
        ]
    }

    /// What the contract says of one key, kept independently of [`CacheMemory`].
    #[derive(Clone, Debug, Default)]
    struct KeyModel {
        /// The key's version (rule 2: 0 if never written).
        version: u64,
        /// Every version the key ever had.
        given: std::collections::BTreeSet<u64>,
        /// Every reservation ever made, `(base, limit)`, the latest last.
        reserved: Vec<(u64, u64)>,
    }

    impl KeyModel {
        /// The highest version any reservation of the key covers.
        fn max_limit(&self) -> u64 {
            self.reserved.iter().map(|r| r.1).max().unwrap_or(0)
        }

        /// A version memory itself gave (not a write-back): rule 2 and rule 6.
        fn check_given(&self, v: u64) -> Result<(), String> {
            if v <= self.version || self.given.contains(&v) {
                return Err(format!("version {v} not new (key at {})", self.version));
            }
            if let Some(r) = self.reserved.iter().find(|r| r.0 < v && v <= r.1) {
                return Err(format!("version {v} inside reservation {r:?}"));
            }
            Ok(())
        }

        /// A reservation's base: at least the key's version and every earlier limit.
        fn check_base(&self, base: u64) -> Result<(), String> {
            let floor = self.version.max(self.max_limit());
            if base != floor {
                return Err(format!("base {base}, expected {floor}"));
            }
            Ok(())
        }
    }

    /// Runs `steps` against a fresh [`CacheMemory`] and the model; an error names the first
    /// broken rule.
    fn check_history(steps: &[Step]) -> Result<(), String> {
        let term = 3;
        let mut m = CacheMemory::default();
        let mut model: BTreeMap<String, KeyModel> = BTreeMap::new();
        let mut index = 0;
        for (i, s) in steps.iter().enumerate() {
            // Entries of other commands sit between the cache's: the index jumps a little.
            index += 1 + (i as u64 % 3);
            let before = m.clone();
            let epoch = |stale: bool| if stale { term - 1 } else { term };
            let key_of = |k: u8| format!("k{k}");
            let wrong = |s: &str| Err(format!("step {i} {s:?}"));
            match s {
                Step::Restore => {
                    m = CacheMemory::restore(m.snapshot());
                    if m != before {
                        return wrong("snapshot round trip changed the memory");
                    }
                }
                Step::Write {
                    key, cas, stale, ..
                }
                | Step::WriteReserve {
                    key, cas, stale, ..
                } => {
                    let key = key_of(*key);
                    let km = model.entry(key.clone()).or_default();
                    let mut w = if matches!(s, Step::Write { delete: true, .. }) {
                        delete(&key)
                    } else {
                        set(&key, "v", None, None)
                    };
                    w.epoch = epoch(*stale);
                    w.expect_version =
                        cas.map(|right| if right { km.version } else { km.version + 1 });
                    let r = match s {
                        Step::WriteReserve { block, .. } => {
                            m.write_reserve(index, term, 0, &write_reserve(w, *block))
                        }
                        _ => m.apply(index, term, 0, &w),
                    };
                    if *stale || *cas == Some(false) {
                        if r.applied || r.reserved_base.is_some() || m != before {
                            return wrong("a refused or mismatched write changed memory");
                        }
                        if *stale == r.refused.is_empty() {
                            return wrong("refusal does not match the epoch");
                        }
                        continue;
                    }
                    if !r.applied {
                        return wrong("a write with the right epoch and version did not apply");
                    }
                    km.check_given(r.version)
                        .map_err(|e| format!("step {i}: {e}"))?;
                    km.version = r.version;
                    km.given.insert(r.version);
                    if let Step::WriteReserve { block, .. } = s {
                        let base = r.reserved_base.ok_or(format!("step {i}: no base"))?;
                        km.check_base(base).map_err(|e| format!("step {i}: {e}"))?;
                        km.reserved.push((base, base + block));
                    } else if r.reserved_base.is_some() {
                        return wrong("a plain write reserved");
                    }
                }
                Step::ReadReserve { key, block, stale } => {
                    let key = key_of(*key);
                    let km = model.entry(key.clone()).or_default();
                    let r = m.read_reserve(term, 0, &read_reserve(&key, epoch(*stale), *block));
                    if *stale {
                        if r.refused.is_empty() || m != before {
                            return wrong("a stale reserving read was not refused");
                        }
                        continue;
                    }
                    if r.version != km.version {
                        return wrong("the reserving read saw another version");
                    }
                    km.check_base(r.base)
                        .map_err(|e| format!("step {i}: {e}"))?;
                    km.reserved.push((r.base, r.base + block));
                }
                Step::WriteBack { key, pick, stale } => {
                    let key = key_of(*key);
                    let km = model.entry(key.clone()).or_default();
                    // Mostly inside some reservation (the latest or an older one), sometimes
                    // anywhere up to just above the highest limit.
                    let v = match (km.reserved.len(), *pick % 4) {
                        (0, _) | (_, 0) => u64::from(*pick) % (km.max_limit() + 2),
                        (n, _) => {
                            let (base, limit) = km.reserved[usize::from(*pick) % n];
                            base + 1 + u64::from(*pick) % (limit - base).max(1)
                        }
                    };
                    let r = m.write_back(term, &write_back(&key, epoch(*stale), v, "wb"));
                    let latest = km.reserved.last().copied();
                    let expected =
                        !*stale && latest.is_some_and(|(b, l)| b < v && v <= l) && v > km.version;
                    if r.applied != expected || r.refused.is_empty() == *stale {
                        return wrong(&format!("write-back of {v}: {r:?}, model says {expected}"));
                    }
                    if !expected {
                        if m != before {
                            return wrong("a write-back not taken changed memory");
                        }
                        continue;
                    }
                    if km.given.contains(&v) {
                        return wrong("a write-back reused a version");
                    }
                    km.version = v;
                    km.given.insert(v);
                }
            }
            for (key, km) in &model {
                if m.read(key, 0).version != km.version {
                    return Err(format!(
                        "step {i}: {key} reads another version than the model"
                    ));
                }
            }
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Rules 2 and 6 over random histories: memory's versions strictly increase per key and
        /// never fall inside any reservation; bases are max(version, previous limit); a
        /// write-back applies exactly when it is inside the latest reservation and above the
        /// key's version; nothing refused or not taken changes memory; snapshots round-trip.
        #[test]
        fn memory_follows_the_version_and_reservation_rules(
            steps in proptest::collection::vec(step(), 1..120),
        ) {
            if let Err(e) = check_history(&steps) {
                proptest::prop_assert!(false, "{}", e);
            }
        }
    }
}
