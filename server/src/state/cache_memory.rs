//! The cache's memory: the backing copy of every cache key, replicated through Raft.
//!
//! The cache directory (`crate::cache::Directory`, on the leader) turns every write that
//! reaches memory into a [`ipb::CacheWrite`] proposal and reads with a linearizable read, so
//! this module only has to honour the memory contract of `crate::cache::memory`:
//! - **versions**: a write or deletion gets the log index of its entry, which strictly
//!   increases; a deletion keeps a tombstone so that the key's version never goes back, and a
//!   key never written reads as version 0;
//! - **fencing**: a write names the directory's epoch, and is refused unless the entry's term is
//!   that epoch. A leader only proposes in its own term, so this refuses exactly the writes of a
//!   directory left over from an earlier term of the same node;
//! - **TTL**: the expiry is stamped from the leader time carried by the entry, so every replica
//!   agrees; a read reports the time left by the reader's (the leader's) clock.
//!
//! Expired values and tombstones are kept (a key costs its tombstone until it is written again):
//! the cache's keys are few compared with its traffic, and purging them would need a replicated
//! time-driven command for no gain in correctness.

use std::collections::BTreeMap;

use bytes::Bytes;
use sync_proto::internal::v1 as ipb;

use crate::cache::Stored;

/// One key's backing copy.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    /// The value; `None` for a deletion.
    value: Option<Bytes>,
    /// Log index of the write or deletion.
    version: u64,
    /// Leader time (Unix ms) at which the value expires.
    expires_at: Option<u64>,
}

impl Record {
    /// The value if it has not expired at `now_ms`.
    fn live_value(&self, now_ms: u64) -> Option<&Bytes> {
        self.value
            .as_ref()
            .filter(|_| self.expires_at.is_none_or(|t| now_ms < t))
    }
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
        if w.epoch != term {
            return refused(format!(
                "cache write of directory epoch {} in an entry of term {term}",
                w.epoch
            ));
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
        let record = match mutation {
            ipb::cache_write::Mutation::Set(set) => Record {
                value: Some(set.value.clone()),
                version: index,
                expires_at: set.ttl_ms.map(|t| now_ms.saturating_add(t)),
            },
            ipb::cache_write::Mutation::Delete(_) => Record {
                value: None,
                version: index,
                expires_at: None,
            },
        };
        self.records.insert(w.key.clone(), record);
        ipb::CacheWriteResult {
            applied: true,
            version: index,
            current_version: index,
            existed,
            refused: String::new(),
            duplicate: false,
        }
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
                })
                .collect(),
        }
    }

    /// Rebuilds the memory from [`CacheMemory::snapshot`].
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
}
