//! The near cache's pure core: entries with versions, an LRU bound, fills in flight, and the
//! rules that keep a hit from being older than what the invalidation stream has said.
//!
//! No I/O, no clock, no tokio: time is a `now_ms` argument on the caller's wall clock, and the
//! shell (`near/mod.rs`) owns the stream and the calls. Every rule is checked by the unit tests
//! at the bottom, one per rule.
//!
//! # The rules
//!
//! 1. **Fill only under a live subscription.** A fill is begun only while a stream is live
//!    ([`Core::begin_fill`] returns `None` otherwise), and it names the subscription it was
//!    begun under. A fill completing under another subscription (or none) is discarded: the
//!    events that would have invalidated it went to a stream that is gone.
//! 2. **An invalidation that races a fill wins.** Events for a key with fills in flight are
//!    remembered until the last of them completes; a fill whose version is not greater than such
//!    an event's version is discarded. (The event and the Get answer travel on different HTTP/2
//!    streams, so the event may overtake the answer it invalidates.)
//! 3. **Versions never go back.** An entry is replaced only by a greater version, and a fill
//!    older than one that completed while it was in flight is discarded, so hits are monotonic.
//! 4. **Only lines the node holds.** A fill is installed only if the serving node kept a valid
//!    line for the key ([`Fill::line_valid`]); otherwise the node would send no event when the
//!    key changes.
//! 5. **Own writes.** A write made through the near cache invalidates its key before it is sent
//!    and again when it is answered, and poisons fills in flight, so the process reads its own
//!    writes.
//! 6. **Lose the stream, lose everything.** [`Core::drop_all`] empties the cache and forgets
//!    fills in flight; nothing is served until [`Core::subscribed`] names a new subscription.
//! 7. **Bounded.** At most `max_entries` entries and `max_bytes` bytes of keys and values; the
//!    least recently used entries are evicted first. A value larger than `max_bytes` is not kept.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

/// Counters of what the near cache did, since it was created.
///
/// ```
/// let stats = sync_client::NearCacheStats::default();
/// assert_eq!(stats.hits + stats.misses, 0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NearCacheStats {
    /// Reads answered from the near cache, with no call to the cluster.
    pub hits: u64,
    /// Reads that went to the cluster (not cached, or no live invalidation stream).
    pub misses: u64,
    /// Entries removed because the invalidation stream said so.
    pub invalidations: u64,
    /// Times the whole near cache was emptied because its invalidation stream ended or broke.
    pub drops: u64,
    /// Entries evicted to stay within the size bounds.
    pub evictions: u64,
    /// Fills not kept: they raced an invalidation or a write, came from an ended stream, or the
    /// serving node did not keep the line.
    pub discarded_fills: u64,
    /// Entries held now.
    pub entries: u64,
    /// Bytes of keys and values held now.
    pub bytes: u64,
}

/// One cached value.
#[derive(Clone, Debug)]
struct Entry {
    value: Bytes,
    version: u64,
    /// When it expires, on the caller's wall clock in ms (the key's TTL); `None`: never.
    expires_at_ms: Option<u64>,
    /// Its position in the LRU order (a key of `Core::lru`).
    used: u64,
}

/// Fills of one key in flight, and what happened to the key meanwhile.
#[derive(Clone, Debug, Default)]
struct Pending {
    /// How many fills are in flight.
    in_flight: u32,
    /// The greatest version an event (or an own write, as `u64::MAX`) invalidated meanwhile:
    /// a fill of this version or older is discarded (rule 2).
    invalidated_upto: Option<u64>,
    /// The greatest version a fill of this key completed with meanwhile: an older fill is
    /// discarded (rule 3).
    completed: u64,
}

/// A fill begun: hand it back to [`Core::complete_fill`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FillTicket {
    key: String,
    subscription: u64,
}

/// What a fill read from the serving node.
#[derive(Clone, Debug)]
pub(crate) struct Fill {
    /// The value; `None` if the key has no value (never cached).
    pub(crate) value: Option<Bytes>,
    /// Its version.
    pub(crate) version: u64,
    /// True if the serving node kept a valid line (SHARED, EXCLUSIVE or MODIFIED) after the read,
    /// so that it will report the line's end on the stream.
    pub(crate) line_valid: bool,
    /// When the key expires, on the caller's wall clock in ms; `None`: never.
    pub(crate) expires_at_ms: Option<u64>,
}

/// Bounds of a near cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub(crate) max_entries: usize,
    pub(crate) max_bytes: usize,
}

/// The near cache's state.
#[derive(Debug)]
pub(crate) struct Core {
    bounds: Bounds,
    /// The live subscription, if any; numbers are never reused.
    live: Option<u64>,
    entries: HashMap<String, Entry>,
    /// LRU order: use stamp → key; the first is the least recently used.
    lru: BTreeMap<u64, String>,
    /// The next use stamp.
    clock: u64,
    pending: HashMap<String, Pending>,
    bytes: usize,
    stats: NearCacheStats,
}

fn size(key: &str, value: &Bytes) -> usize {
    key.len() + value.len()
}

impl Core {
    pub(crate) fn new(bounds: Bounds) -> Core {
        Core {
            bounds,
            live: None,
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            pending: HashMap::new(),
            bytes: 0,
            stats: NearCacheStats::default(),
        }
    }

    /// A stream numbered `subscription` is established: the server holds its subscriber, so
    /// every event from now on will be delivered on it (or the stream ends).
    pub(crate) fn subscribed(&mut self, subscription: u64) {
        self.drop_entries();
        self.live = Some(subscription);
    }

    /// The stream ended or broke (or cannot be trusted): empty everything (rule 6).
    pub(crate) fn drop_all(&mut self) {
        if self.live.take().is_some() || !self.entries.is_empty() {
            self.stats.drops += 1;
        }
        self.drop_entries();
    }

    fn drop_entries(&mut self) {
        self.entries.clear();
        self.lru.clear();
        self.pending.clear();
        self.bytes = 0;
    }

    /// A read: the value if it is cached, unexpired, under a live stream. Counts a hit or a miss.
    pub(crate) fn get(&mut self, key: &str, now_ms: u64) -> Option<(Bytes, u64)> {
        if self.live.is_none() {
            self.stats.misses += 1;
            return None;
        }
        let expired = match self.entries.get(key) {
            None => {
                self.stats.misses += 1;
                return None;
            }
            Some(e) => e.expires_at_ms.is_some_and(|at| at <= now_ms),
        };
        if expired {
            self.remove(key);
            self.stats.misses += 1;
            return None;
        }
        self.clock += 1;
        let stamp = self.clock;
        let entry = self.entries.get_mut(key)?;
        self.lru.remove(&entry.used);
        entry.used = stamp;
        self.lru.insert(stamp, key.to_owned());
        self.stats.hits += 1;
        Some((entry.value.clone(), entry.version))
    }

    /// A miss is about to read `key` from the subscribed node; `None` if no stream is live (the
    /// read's answer must then not be kept).
    pub(crate) fn begin_fill(&mut self, key: &str) -> Option<FillTicket> {
        let subscription = self.live?;
        self.pending.entry(key.to_owned()).or_default().in_flight += 1;
        Some(FillTicket {
            key: key.to_owned(),
            subscription,
        })
    }

    /// The fill of `ticket` was answered with `fill` (or failed: `None`). Installs it if every
    /// rule allows; returns true if it did.
    pub(crate) fn complete_fill(&mut self, ticket: FillTicket, fill: Option<Fill>) -> bool {
        if self.live != Some(ticket.subscription) {
            // Rule 1: `drop_all` already forgot this fill's pending record.
            self.stats.discarded_fills += 1;
            return false;
        }
        let key = ticket.key;
        let Some(pending) = self.pending.get_mut(&key) else {
            return false;
        };
        pending.in_flight -= 1;
        let raced = fill.as_ref().is_some_and(|f| {
            pending.invalidated_upto.is_some_and(|v| f.version <= v)
                || f.version < pending.completed
        });
        if let Some(f) = &fill {
            pending.completed = pending.completed.max(f.version);
        }
        if pending.in_flight == 0 {
            self.pending.remove(&key);
        }
        let Some(fill) = fill else {
            return false;
        };
        let Some(value) = fill.value.filter(|_| fill.line_valid && !raced) else {
            // Rules 2, 3 and 4 (an absent value is not a line either).
            self.stats.discarded_fills += 1;
            return false;
        };
        if self
            .entries
            .get(&key)
            .is_some_and(|e| e.version >= fill.version)
        {
            return false;
        }
        if size(&key, &value) > self.bounds.max_bytes {
            self.stats.discarded_fills += 1;
            return false;
        }
        self.remove(&key);
        self.clock += 1;
        self.bytes += size(&key, &value);
        self.lru.insert(self.clock, key.clone());
        self.entries.insert(
            key,
            Entry {
                value,
                version: fill.version,
                expires_at_ms: fill.expires_at_ms,
                used: self.clock,
            },
        );
        self.evict();
        true
    }

    /// The stream reported that `key`'s line of `version` stopped being valid: drop the entry
    /// unless it holds a greater version, and poison older fills in flight (rule 2).
    pub(crate) fn invalidate(&mut self, key: &str, version: u64) {
        if self.live.is_none() {
            return;
        }
        if let Some(p) = self.pending.get_mut(key) {
            p.invalidated_upto = Some(p.invalidated_upto.map_or(version, |v| v.max(version)));
        }
        if self.entries.get(key).is_some_and(|e| e.version <= version) {
            self.remove(key);
            self.stats.invalidations += 1;
        }
    }

    /// This process is writing `key` (called before the write is sent and again when it is
    /// answered): drop the entry and poison every fill in flight (rule 5).
    pub(crate) fn own_write(&mut self, key: &str) {
        if let Some(p) = self.pending.get_mut(key) {
            p.invalidated_upto = Some(u64::MAX);
        }
        self.remove(key);
    }

    /// The counters, with the current size.
    pub(crate) fn stats(&self) -> NearCacheStats {
        NearCacheStats {
            entries: self.entries.len() as u64,
            bytes: self.bytes as u64,
            ..self.stats
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(e) = self.entries.remove(key) {
            self.lru.remove(&e.used);
            self.bytes -= size(key, &e.value);
        }
    }

    /// Evicts least recently used entries until both bounds hold (rule 7).
    fn evict(&mut self) {
        while self.entries.len() > self.bounds.max_entries || self.bytes > self.bounds.max_bytes {
            let Some((_, key)) = self.lru.pop_first() else {
                return;
            };
            if let Some(e) = self.entries.remove(&key) {
                self.bytes -= size(&key, &e.value);
                self.stats.evictions += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000;

    fn core() -> Core {
        let mut c = Core::new(Bounds {
            max_entries: 3,
            max_bytes: 100,
        });
        c.subscribed(1);
        c
    }

    fn fill(value: &str, version: u64) -> Option<Fill> {
        Some(Fill {
            value: Some(Bytes::from(value.to_owned())),
            version,
            line_valid: true,
            expires_at_ms: None,
        })
    }

    fn filled(c: &mut Core, key: &str, value: &str, version: u64) -> bool {
        let t = c.begin_fill(key).expect("live");
        c.complete_fill(t, fill(value, version))
    }

    #[test]
    fn a_fill_is_served_as_a_hit_until_invalidated() {
        let mut c = core();
        assert_eq!(c.get("k", NOW), None);
        assert!(filled(&mut c, "k", "v5", 5));
        assert_eq!(c.get("k", NOW), Some((Bytes::from("v5"), 5)));
        c.invalidate("k", 5);
        assert_eq!(c.get("k", NOW), None);
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.invalidations), (1, 2, 1));
    }

    #[test]
    fn an_event_for_an_older_version_leaves_a_newer_entry() {
        let mut c = core();
        assert!(filled(&mut c, "k", "v5", 5));
        c.invalidate("k", 4);
        assert!(c.get("k", NOW).is_some());
    }

    #[test]
    fn rule_1_nothing_is_filled_or_served_without_a_live_stream() {
        let mut c = Core::new(Bounds {
            max_entries: 3,
            max_bytes: 100,
        });
        assert_eq!(c.begin_fill("k"), None);
        let mut c = core();
        let t = c.begin_fill("k").expect("live");
        c.drop_all();
        c.subscribed(2);
        assert!(
            !c.complete_fill(t, fill("v5", 5)),
            "a fill of an ended stream was kept"
        );
        assert_eq!(c.get("k", NOW), None);
    }

    #[test]
    fn rule_2_an_invalidation_that_overtakes_its_fill_discards_it() {
        let mut c = core();
        let t = c.begin_fill("k").expect("live");
        c.invalidate("k", 5);
        assert!(!c.complete_fill(t, fill("v5", 5)));
        // An event about an older line does not discard a newer fill.
        let t = c.begin_fill("k").expect("live");
        c.invalidate("k", 5);
        assert!(c.complete_fill(t, fill("v6", 6)));
    }

    #[test]
    fn rule_2_the_race_is_remembered_until_the_last_fill_in_flight_completes() {
        let mut c = core();
        let a = c.begin_fill("k").expect("live");
        let b = c.begin_fill("k").expect("live");
        c.invalidate("k", 5);
        assert!(!c.complete_fill(a, fill("v5", 5)));
        assert!(!c.complete_fill(b, fill("v5", 5)));
        assert!(c.pending.is_empty());
    }

    #[test]
    fn rule_3_an_older_fill_never_replaces_or_follows_a_newer_one() {
        let mut c = core();
        let old = c.begin_fill("k").expect("live");
        let new = c.begin_fill("k").expect("live");
        assert!(c.complete_fill(new, fill("v6", 6)));
        assert!(!c.complete_fill(old, fill("v5", 5)));
        assert_eq!(c.get("k", NOW), Some((Bytes::from("v6"), 6)));
        // Even when the newer fill was not kept (the node did not keep the line).
        c.invalidate("k", 6);
        let old = c.begin_fill("k").expect("live");
        let new = c.begin_fill("k").expect("live");
        let mut not_kept = fill("v7", 7);
        not_kept.as_mut().expect("some").line_valid = false;
        assert!(!c.complete_fill(new, not_kept));
        assert!(!c.complete_fill(old, fill("v6", 6)));
        assert_eq!(c.get("k", NOW), None);
    }

    #[test]
    fn rule_4_a_value_the_node_did_not_keep_is_not_cached() {
        let mut c = core();
        let t = c.begin_fill("k").expect("live");
        let mut f = fill("v5", 5);
        f.as_mut().expect("some").line_valid = false;
        assert!(!c.complete_fill(t, f));
        let t = c.begin_fill("gone").expect("live");
        let absent = Fill {
            value: None,
            version: 0,
            line_valid: false,
            expires_at_ms: None,
        };
        assert!(!c.complete_fill(t, Some(absent)));
        assert_eq!(c.stats().entries, 0);
    }

    #[test]
    fn rule_5_an_own_write_drops_the_entry_and_poisons_fills_in_flight() {
        let mut c = core();
        assert!(filled(&mut c, "k", "v5", 5));
        let t = c.begin_fill("k").expect("live");
        c.own_write("k");
        assert_eq!(c.get("k", NOW), None);
        assert!(!c.complete_fill(t, fill("v9", 9)));
    }

    #[test]
    fn rule_6_losing_the_stream_empties_the_cache_and_stops_hits() {
        let mut c = core();
        assert!(filled(&mut c, "k", "v5", 5));
        c.drop_all();
        assert_eq!(c.get("k", NOW), None);
        assert_eq!(c.begin_fill("k"), None);
        c.subscribed(2);
        assert_eq!(
            c.get("k", NOW),
            None,
            "an entry survived a new subscription"
        );
        let s = c.stats();
        assert_eq!((s.drops, s.entries, s.bytes), (1, 0, 0));
    }

    #[test]
    fn rule_7_the_least_recently_used_entry_is_evicted_first() {
        let mut c = core();
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            assert!(filled(&mut c, k, "v", i as u64 + 1));
        }
        assert!(c.get("a", NOW).is_some());
        assert!(filled(&mut c, "d", "v", 4));
        assert!(c.get("b", NOW).is_none(), "b was the least recently used");
        assert!(c.get("a", NOW).is_some() && c.get("c", NOW).is_some());
        assert_eq!(c.stats().evictions, 1);
    }

    #[test]
    fn rule_7_the_byte_bound_holds_and_an_oversized_value_is_not_kept() {
        let mut c = core();
        assert!(filled(&mut c, "a", &"x".repeat(60), 1));
        assert!(filled(&mut c, "b", &"x".repeat(30), 2));
        assert!(filled(&mut c, "c", &"x".repeat(30), 3));
        assert!(c.stats().bytes <= 100);
        assert!(c.get("a", NOW).is_none());
        assert!(!filled(&mut c, "big", &"x".repeat(100), 4));
    }

    #[test]
    fn an_expired_entry_is_a_miss() {
        let mut c = core();
        let t = c.begin_fill("k").expect("live");
        let mut f = fill("v", 1);
        f.as_mut().expect("some").expires_at_ms = Some(NOW + 10);
        assert!(c.complete_fill(t, f));
        assert!(c.get("k", NOW + 9).is_some());
        assert!(c.get("k", NOW + 10).is_none());
        assert_eq!(c.stats().entries, 0);
    }
}
