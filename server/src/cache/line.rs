//! A node's lines: the local cache itself.
//!
//! Each line holds a value with its version, its MESI state, the lease it belongs to (epoch and
//! session), the directory's grant number, and its TTL expiry on this node's clock. The store
//! keeps at most `capacity` bytes of keys and values, evicting the least recently used lines to
//! make room; the caller tells the directory about every line dropped (an Evicted notice), so
//! its records stay close to the truth. In write-through mode no line is ever dirty, so an
//! eviction writes nothing back.
//!
//! The hit rule lives here ([`Lines::get`]): a line is served only if its lease is the node's
//! current lease and that lease is valid now, and its TTL has not run out.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::lease::NodeLease;
use super::message::Stamp;
use super::{GrantId, LineState, Version};

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
            last_used: 0,
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
        }
    }

    /// The line for `key` if it may be served at `now` under `lease` (the hit rule), without
    /// touching its LRU position.
    pub fn servable(&self, now: u64, key: &str, lease: &NodeLease) -> Option<&Line> {
        self.lines
            .get(key)
            .filter(|l| lease.serves(now) && l.stamp == lease.stamp() && !l.expired(now))
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
        self.bytes += size;
        self.lines.insert(key.to_string(), line);
        let mut evicted = Vec::new();
        while self.bytes > self.capacity {
            let Some((_, oldest)) = self.lru.iter().next().map(|(&u, k)| (u, k.clone())) else {
                break;
            };
            // The line just stored is the most recent, and fits alone: it is never chosen.
            if let Some(dropped) = self.remove(&oldest) {
                evicted.push(dropped);
            }
        }
        evicted
    }

    /// Removes the line for `key`.
    pub fn remove(&mut self, key: &str) -> Option<Dropped> {
        let line = self.lines.remove(key)?;
        self.lru.remove(&line.last_used);
        if let Some(t) = line.expires_at {
            self.expiries.remove(&(t, key.to_string()));
        }
        self.bytes -= entry_size(key, &line.value);
        Some(Dropped {
            key: key.to_string(),
            line,
        })
    }

    /// Downgrades an Exclusive or Modified line to Shared; returns true if a line remains.
    pub fn downgrade(&mut self, key: &str) -> bool {
        match self.lines.get_mut(key) {
            Some(l) => {
                l.state = l.state.min(LineState::Shared);
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

    /// Marks `key` as just used.
    fn touch(&mut self, key: &str) {
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

    #[test]
    fn a_line_of_another_session_is_not_served() {
        let mut lines = Lines::new(100);
        let mut l = lease();
        lines.insert("k", line("v", None));
        l.on_grant(Stamp::new(1, 2), 0, 100);
        assert!(lines.servable(1, "k", &l).is_none());
    }
}
