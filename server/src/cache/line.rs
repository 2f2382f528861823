//! A node's lines: the local cache itself.
//!
//! Each line holds a value with its version, its MESI state, the lease it belongs to (epoch and
//! session), the directory's grant number, and its TTL expiry on this node's clock. The store
//! keeps at most `capacity` bytes of keys and values, evicting the least recently used lines to
//! make room; the caller tells the directory about every line dropped (an Evicted notice), so
//! its records stay close to the truth. In write-through mode no line is ever dirty. In
//! write-back mode a dirty line is never evicted: the node writes it back first, and the line
//! may be evicted once clean (dirty lines may hold the store above its capacity meanwhile).
//!
//! The hit rule lives here ([`serves`]): a line is served only if its lease is the node's
//! current lease and that lease is valid now, and its TTL has not run out. The store also
//! remembers which keys changed since the shell last asked ([`Lines::take_changed`]), so the
//! node's published read view ([`super::view`]) can follow it without a scan, and it indexes
//! its dirty lines by the time they became dirty ([`Lines::dirty_since_upto`]), so the
//! write-back tick finds the lines due for a flush without scanning a 64 MiB store every 5 ms.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::lease::NodeLease;
use super::message::{Dirty, Reservation, Stamp};
use super::{GrantId, LineState, Version};

/// The hit rule: `line` may be served at `now` under the lease `stamp` valid until `until` (the
/// node's clock). One function, used by the core ([`Lines::servable`]) and by the published
/// read view ([`super::view::ReadView`]), so the two can never disagree on what a hit is.
pub fn serves(line: &Line, now: u64, stamp: Stamp, until: u64) -> bool {
    stamp.session != 0 && now < until && line.stamp == stamp && !line.expired(now)
}

/// The bytes a line counts against the capacity: its key and its value.
pub fn entry_size(key: &str, value: &Bytes) -> u64 {
    (key.len() + value.len()) as u64
}

/// One cached key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Shared, Exclusive or Modified (an Invalid line is not stored).
    pub state: LineState,
    /// The value.
    pub value: Bytes,
    /// The value's version.
    pub version: Version,
    /// The lease the line was granted under; it is served only under that same lease.
    pub stamp: Stamp,
    /// The directory's grant number for it: demands cover lines up to a grant number.
    pub grant: GrantId,
    /// This node's clock at which the value's TTL runs out; `None`: never.
    pub expires_at: Option<u64>,
    /// Write-back mode, E or M lines only: the versions local writes may take.
    pub reserved: Option<Reservation>,
    /// Write-back mode: this node's clock at the first local write not yet written back
    /// (`None`: clean, memory holds this version).
    pub dirty_since: Option<u64>,
    /// Position in the LRU order (higher: used more recently).
    last_used: u64,
}

impl Line {
    /// A line as granted; its LRU position is set when stored.
    pub fn new(
        state: LineState,
        value: Bytes,
        version: Version,
        stamp: Stamp,
        grant: GrantId,
        expires_at: Option<u64>,
    ) -> Self {
        Line {
            state,
            value,
            version,
            stamp,
            grant,
            expires_at,
            reserved: None,
            dirty_since: None,
            last_used: 0,
        }
    }

    /// True if the line holds a write memory does not have yet.
    pub fn is_dirty(&self) -> bool {
        self.dirty_since.is_some()
    }

    /// The line's newest write, as handed to the directory to be written back.
    pub fn newest_write(&self) -> Dirty {
        Dirty {
            grant: self.grant,
            version: self.version,
            value: self.value.clone(),
        }
    }

    /// True if the TTL has run out at `now`.
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }
}

/// A line that left the store, for the caller to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    /// Its key.
    pub key: String,
    /// The line.
    pub line: Line,
}

/// The node's lines, bounded in bytes, with LRU eviction and TTL expiry.
#[derive(Clone, Debug)]
pub struct Lines {
    /// Lines by key (a BTreeMap: the simulator needs a deterministic iteration order).
    lines: BTreeMap<String, Line>,
    /// Keys by LRU position, oldest first.
    lru: BTreeMap<u64, String>,
    /// `(expiry, key)` of lines with a TTL, soonest first, so expiry needs no scan.
    expiries: BTreeSet<(u64, String)>,
    /// Bytes of keys and values held.
    bytes: u64,
    /// The bound on `bytes`.
    capacity: u64,
    /// The LRU clock.
    uses: u64,
    /// Keys whose line was stored, removed or downgraded since [`Lines::take_changed`].
    changed: BTreeSet<String>,
    /// `(dirty_since, key)` of every dirty line, oldest first. Invariant: it holds exactly the
    /// lines whose `dirty_since` is `Some`, with that time; every method that stores, removes
    /// or cleans a line keeps it so (lines are only changed through this store: [`Lines::peek`]
    /// and [`Lines::servable`] hand out shared references).
    dirty: BTreeSet<(u64, String)>,
}

impl Lines {
    /// An empty store holding at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Lines {
            lines: BTreeMap::new(),
            lru: BTreeMap::new(),
            expiries: BTreeSet::new(),
            bytes: 0,
            capacity,
            uses: 0,
            changed: BTreeSet::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// The line for `key` if it may be served at `now` under `lease` (the hit rule), without
    /// touching its LRU position.
    pub fn servable(&self, now: u64, key: &str, lease: &NodeLease) -> Option<&Line> {
        self.lines
            .get(key)
            .filter(|l| serves(l, now, lease.stamp(), lease.until()))
    }

    /// The hit rule, for a read: the line if servable, marked as just used.
    pub fn get(&mut self, now: u64, key: &str, lease: &NodeLease) -> Option<&Line> {
        self.servable(now, key, lease)?;
        self.touch(key);
        self.lines.get(key)
    }

    /// The line for `key`, servable or not.
    pub fn peek(&self, key: &str) -> Option<&Line> {
        self.lines.get(key)
    }

    /// Stores `line` for `key`, replacing any line there, then evicts least recently used
    /// lines until the store fits. Returns the evicted lines. A line that cannot fit even in
    /// an empty store is not stored and comes back as the only dropped line.
    pub fn insert(&mut self, key: &str, line: Line) -> Vec<Dropped> {
        let size = entry_size(key, &line.value);
        if size > self.capacity {
            return vec![Dropped {
                key: key.to_string(),
                line,
            }];
        }
        self.remove(key);
        self.uses += 1;
        let line = Line {
            last_used: self.uses,
            ..line
        };
        self.lru.insert(line.last_used, key.to_string());
        if let Some(t) = line.expires_at {
            self.expiries.insert((t, key.to_string()));
        }
        if let Some(t) = line.dirty_since {
            self.dirty.insert((t, key.to_string()));
        }
        self.bytes += size;
        self.changed.insert(key.to_string());
        self.lines.insert(key.to_string(), line);
        // Least recently used first; never the line just stored (it fits alone), never a dirty
        // line (it must be written back first: the caller sees `over_capacity`).
        let mut victims = Vec::new();
        let mut freed = 0;
        for (_, k) in self.lru.iter() {
            if self.bytes - freed <= self.capacity {
                break;
            }
            match self.lines.get(k) {
                Some(l) if k != key && !l.is_dirty() => {
                    freed += entry_size(k, &l.value);
                    victims.push(k.clone());
                }
                _ => {}
            }
        }
        victims.iter().filter_map(|k| self.remove(k)).collect()
    }

    /// Removes the line for `key`.
    pub fn remove(&mut self, key: &str) -> Option<Dropped> {
        let line = self.lines.remove(key)?;
        self.lru.remove(&line.last_used);
        if let Some(t) = line.expires_at {
            self.expiries.remove(&(t, key.to_string()));
        }
        if let Some(t) = line.dirty_since {
            self.dirty.remove(&(t, key.to_string()));
        }
        self.bytes -= entry_size(key, &line.value);
        self.changed.insert(key.to_string());
        Some(Dropped {
            key: key.to_string(),
            line,
        })
    }

    /// True if dirty lines keep the store above its capacity (they are written back, then
    /// evicted).
    pub fn over_capacity(&self) -> bool {
        self.bytes > self.capacity
    }

    /// Marks `key`'s line as written back up to `version`: clean if that is its version, or
    /// dirty since `since` if it was written again meanwhile. Returns true if it is clean.
    pub fn mark_written_back(
        &mut self,
        key: &str,
        grant: GrantId,
        version: Version,
        since: u64,
    ) -> bool {
        let Some(l) = self.lines.get_mut(key).filter(|l| l.grant == grant) else {
            return false;
        };
        if let Some(t) = l.dirty_since {
            self.dirty.remove(&(t, key.to_string()));
        }
        if l.version <= version {
            l.dirty_since = None;
        } else {
            l.dirty_since = Some(since);
            self.dirty.insert((since, key.to_string()));
        }
        self.changed.insert(key.to_string());
        l.dirty_since.is_none()
    }

    /// Downgrades an Exclusive or Modified line to Shared; returns true if a line remains. The
    /// line loses its reservation and counts as clean: the caller hands its write over first.
    pub fn downgrade(&mut self, key: &str) -> bool {
        match self.lines.get_mut(key) {
            Some(l) => {
                l.state = l.state.min(LineState::Shared);
                l.reserved = None;
                if let Some(t) = l.dirty_since.take() {
                    self.dirty.remove(&(t, key.to_string()));
                }
                self.changed.insert(key.to_string());
                true
            }
            None => false,
        }
    }

    /// Removes every line whose TTL has run out at `now`.
    pub fn take_expired(&mut self, now: u64) -> Vec<Dropped> {
        let due: Vec<String> = self
            .expiries
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, k)| k.clone())
            .collect();
        due.iter().filter_map(|k| self.remove(k)).collect()
    }

    /// Removes every line.
    pub fn take_all(&mut self) -> Vec<Dropped> {
        let keys: Vec<String> = self.lines.keys().cloned().collect();
        keys.iter().filter_map(|k| self.remove(k)).collect()
    }

    /// Every line, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Line)> {
        self.lines.iter()
    }

    /// Keys of the dirty lines that became dirty at or before `t` (oldest first): the lines a
    /// flush is due for. Costs the number of keys returned, not the store's size.
    pub fn dirty_since_upto(&self, t: u64) -> impl Iterator<Item = &String> {
        self.dirty
            .iter()
            .take_while(move |(since, _)| *since <= t)
            .map(|(_, k)| k)
    }

    /// Keys of every dirty line, oldest first.
    pub fn dirty_keys(&self) -> impl Iterator<Item = &String> {
        self.dirty.iter().map(|(_, k)| k)
    }

    /// Number of dirty lines (the `syncd_cache_dirty_lines` gauge).
    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of lines held.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// True if no line is held.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The keys whose line changed (stored, removed or downgraded) since the last call, each
    /// with its line now (`None`: no line).
    pub fn take_changed(&mut self) -> Vec<(String, Option<Line>)> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|k| {
                let line = self.lines.get(&k).cloned();
                (k, line)
            })
            .collect()
    }

    /// Marks `key` as just used (also for hits served from the read view, reported later).
    pub fn touch(&mut self, key: &str) {
        if let Some(l) = self.lines.get_mut(key) {
            self.lru.remove(&l.last_used);
            self.uses += 1;
            l.last_used = self.uses;
            self.lru.insert(self.uses, key.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(value: &'static str, expires_at: Option<u64>) -> Line {
        Line::new(
            LineState::Shared,
            Bytes::from_static(value.as_bytes()),
            1,
            Stamp::new(1, 1),
            1,
            expires_at,
        )
    }

    fn lease() -> NodeLease {
        let mut l = NodeLease::default();
        l.on_grant(Stamp::new(1, 1), 0, 100);
        l
    }

    #[test]
    fn least_recently_used_line_is_evicted_first() {
        let mut lines = Lines::new(12);
        let l = lease();
        assert!(lines.insert("a", line("xxx", None)).is_empty());
        assert!(lines.insert("b", line("xxx", None)).is_empty());
        assert!(lines.insert("c", line("xxx", None)).is_empty());
        lines.get(0, "a", &l);
        let evicted = lines.insert("d", line("xxxxx", None));
        let keys: Vec<&str> = evicted.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["b", "c"]);
        assert_eq!(lines.bytes(), 10);
    }

    #[test]
    fn a_line_larger_than_the_capacity_is_not_stored() {
        let mut lines = Lines::new(4);
        let dropped = lines.insert("k", line("xxxx", None));
        assert_eq!(dropped.len(), 1);
        assert!(lines.is_empty());
    }

    #[test]
    fn a_line_is_not_served_without_a_valid_lease_or_after_its_ttl() {
        let mut lines = Lines::new(100);
        lines.insert("k", line("v", Some(50)));
        assert!(lines.servable(49, "k", &lease()).is_some());
        assert!(lines.servable(50, "k", &lease()).is_none());
        assert!(lines.servable(10, "k", &NodeLease::default()).is_none());
        assert_eq!(lines.take_expired(50).len(), 1);
        assert_eq!(lines.bytes(), 0);
    }

    fn dirty(value: &'static str, since: u64) -> Line {
        Line {
            state: LineState::Modified,
            dirty_since: Some(since),
            ..line(value, None)
        }
    }

    /// The index must hold exactly the dirty lines with their times: a line missing from it
    /// would never be flushed (its writes lost at the next crash however long ago they were
    /// made), and a clean line left in it would be flushed for nothing forever.
    fn assert_index_matches(lines: &Lines) {
        let mut expected: Vec<(u64, String)> = lines
            .iter()
            .filter_map(|(k, l)| l.dirty_since.map(|t| (t, k.clone())))
            .collect();
        expected.sort();
        let indexed: Vec<(u64, String)> = lines.dirty.iter().cloned().collect();
        assert_eq!(indexed, expected);
        assert_eq!(lines.dirty_len(), expected.len());
    }

    #[test]
    fn the_dirty_index_follows_every_change_of_a_line() {
        let mut lines = Lines::new(100);
        lines.insert("a", dirty("1", 10));
        lines.insert("b", line("2", None));
        lines.insert("c", dirty("3", 5));
        assert_index_matches(&lines);
        let due: Vec<&String> = lines.dirty_since_upto(9).collect();
        assert_eq!(due, ["c"]);
        let all: Vec<&String> = lines.dirty_keys().collect();
        assert_eq!(all, ["c", "a"]);
        // Written again after the write-back was sent: dirty again, since the new time.
        let v = lines.peek("a").unwrap().version;
        assert!(!lines.mark_written_back("a", 1, v - 1, 20));
        assert_index_matches(&lines);
        assert_eq!(lines.dirty_since_upto(19).count(), 1);
        assert!(lines.mark_written_back("a", 1, v, 30));
        assert_index_matches(&lines);
        // Replaced by a clean line, replaced by a dirty one, downgraded, removed.
        lines.insert("c", line("3", None));
        assert_index_matches(&lines);
        lines.insert("b", dirty("2", 40));
        assert_index_matches(&lines);
        assert!(lines.downgrade("b"));
        assert_index_matches(&lines);
        lines.insert("b", dirty("2", 50));
        lines.remove("b");
        assert_index_matches(&lines);
        lines.insert("a", dirty("1", 60));
        lines.take_all();
        assert_index_matches(&lines);
        assert_eq!(lines.dirty_len(), 0);
    }

    #[test]
    fn a_line_of_another_session_is_not_served() {
        let mut lines = Lines::new(100);
        let mut l = lease();
        lines.insert("k", line("v", None));
        l.on_grant(Stamp::new(1, 2), 0, 100);
        assert!(lines.servable(1, "k", &l).is_none());
    }
}
