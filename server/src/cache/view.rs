//! The read view: the lines a node may serve as hits, published outside the core.
//!
//! A hit should cost no more than a lookup. Asking the node's task for it (a channel hop there
//! and back, behind whatever the task is doing) cost more than the lookup itself, so the node
//! publishes what a hit needs, its lines and its lease, in a [`ReadView`] that readers consult
//! directly, and only a miss goes to the task.
//!
//! The view follows the core through [`ViewChanges`] ([`super::CacheNode::take_view_changes`]).
//! Two rules keep a hit from the view exactly as safe as one from the core:
//! 1. **Publish before acting.** The caller applies the changes of a core call before it carries
//!    out any of that call's effects. An InvalidateAck (or a RecallAck) therefore leaves only
//!    once the view has dropped (or downgraded) the line, so a write that completes on that
//!    acknowledgement can never be followed by a hit of the old value from the view.
//! 2. **Lines first, lease last.** [`ReadView::apply`] applies a batch's lines before its
//!    lease. A lease grant extends the lease and applies the demands it carries in one core step;
//!    published in the other order, a line the directory already counts as gone could be served
//!    for a moment under the extended lease.
//!
//! The view checks the lease's end and the TTL itself, with the same hit rule
//! ([`super::line::serves`]) and on the same clock as the core, so time alone (a lapse, an
//! expiry) needs no publication. Hits served from the view do not move the line in the core's
//! LRU order; the view marks each line's first use and the caller reports it
//! ([`super::CacheNode::touch`]) before its next call into the core that could evict.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use super::line::{Line, serves};
use super::message::Stamp;
use super::node::Read;

/// What changed in a node's lines and lease since the last publication.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewChanges {
    /// Each changed key with its line now (`None`: no line).
    pub lines: Vec<(String, Option<Line>)>,
    /// The lease's stamp and end, if either changed.
    pub lease: Option<(Stamp, u64)>,
}

impl ViewChanges {
    /// True if there is nothing to publish.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.lease.is_none()
    }
}

/// A published line.
#[derive(Debug)]
struct ViewLine {
    /// The core's line, as of the last publication.
    line: Line,
    /// Served since its use was last reported (so each line is reported once per report, not
    /// once per hit).
    used: AtomicBool,
}

/// The lines a node may serve, and its lease: everything a hit needs.
#[derive(Debug, Default)]
pub struct ReadView {
    /// Lines by key, in any state; the hit rule decides which may be served.
    lines: HashMap<String, ViewLine>,
    /// The lease's stamp: only lines granted under it are served.
    stamp: Stamp,
    /// The node's clock at which the lease ends.
    until: u64,
}

impl ReadView {
    /// Applies a batch of changes: lines first, then the lease (rule 2 of the module docs).
    pub fn apply(&mut self, changes: ViewChanges) {
        for (key, line) in changes.lines {
            match line {
                Some(line) => {
                    let used = AtomicBool::new(false);
                    self.lines.insert(key, ViewLine { line, used });
                }
                None => {
                    self.lines.remove(&key);
                }
            }
        }
        if let Some((stamp, until)) = changes.lease {
            self.stamp = stamp;
            self.until = until;
        }
    }

    /// The line for `key` if it may be served at `now` (the node's clock).
    pub fn servable(&self, now: u64, key: &str) -> Option<&Line> {
        self.lines
            .get(key)
            .map(|v| &v.line)
            .filter(|l| serves(l, now, self.stamp, self.until))
    }

    /// A hit for `key` at `now`, if its line may be served, and whether this is the line's first
    /// use since [`ReadView::clear_used`] (the caller then reports the use to the core's LRU).
    pub fn hit(&self, now: u64, key: &str) -> Option<(Read, bool)> {
        let v = self.lines.get(key)?;
        if !serves(&v.line, now, self.stamp, self.until) {
            return None;
        }
        // A load first: a hot line is read by every core, and a store on every hit would make
        // them fight over its cache line.
        let first = !v.used.load(Ordering::Relaxed) && !v.used.swap(true, Ordering::Relaxed);
        Some((Read::hit(&v.line, now), first))
    }

    /// `key`'s use was reported: its next hit is a first use again.
    pub fn clear_used(&self, key: &str) {
        if let Some(v) = self.lines.get(key) {
            v.used.store(false, Ordering::Relaxed);
        }
    }

    /// Number of lines published.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// True if no line is published.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::cache::LineState;

    fn line(stamp: Stamp, expires_at: Option<u64>) -> Line {
        Line::new(
            LineState::Shared,
            Bytes::from_static(b"v"),
            7,
            stamp,
            1,
            expires_at,
        )
    }

    #[test]
    fn a_published_line_is_served_only_under_its_lease_and_before_its_ttl() {
        let s = Stamp::new(1, 1);
        let mut v = ReadView::default();
        v.apply(ViewChanges {
            lines: vec![("k".into(), Some(line(s, Some(50))))],
            lease: Some((s, 100)),
        });
        assert_eq!(v.hit(10, "k").map(|(r, _)| r.stored.version), Some(7));
        assert!(v.hit(50, "k").is_none(), "TTL");
        v.apply(ViewChanges {
            lines: vec![("k".into(), Some(line(s, None)))],
            lease: None,
        });
        assert!(v.hit(99, "k").is_some());
        assert!(v.hit(100, "k").is_none(), "lease ended");
        v.apply(ViewChanges {
            lines: Vec::new(),
            lease: Some((Stamp::new(1, 2), 500)),
        });
        assert!(v.hit(10, "k").is_none(), "a line of another session");
    }

    #[test]
    fn a_removed_line_is_not_served_even_under_an_extended_lease() {
        let s = Stamp::new(1, 1);
        let mut v = ReadView::default();
        v.apply(ViewChanges {
            lines: vec![("k".into(), Some(line(s, None)))],
            lease: Some((s, 100)),
        });
        v.apply(ViewChanges {
            lines: vec![("k".into(), None)],
            lease: Some((s, 1_000)),
        });
        assert!(v.hit(500, "k").is_none());
        assert!(v.is_empty());
    }

    #[test]
    fn each_line_reports_its_first_use_once_until_cleared() {
        let s = Stamp::new(1, 1);
        let mut v = ReadView::default();
        v.apply(ViewChanges {
            lines: vec![("k".into(), Some(line(s, None)))],
            lease: Some((s, 100)),
        });
        assert_eq!(v.hit(1, "k").map(|(_, first)| first), Some(true));
        assert_eq!(v.hit(2, "k").map(|(_, first)| first), Some(false));
        v.clear_used("k");
        assert_eq!(v.hit(3, "k").map(|(_, first)| first), Some(true));
    }
}
