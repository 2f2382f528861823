//! A topic's dedup window: the `dedup_id`s published recently, so that a repeated publish
//! returns the first message's id and stores nothing.
//!
//! This is application-level de-duplication (two producers, or a producer that lost its
//! RequestHeader state, sending the same logical message); request retries are handled by the
//! state machine's client table before a command reaches the queue. An entry is remembered for
//! the topic's `dedup_window_ms` from its publish, whatever happens to the message meanwhile
//! (acknowledged, purged or dead-lettered messages still de-duplicate, as in SQS FIFO).

use std::collections::{BTreeMap, BTreeSet};

/// A remembered dedup_id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedupEntry {
    /// The id of the message the first publish stored.
    pub message_id: String,
    /// When the entry stops de-duplicating (publish time plus the window).
    pub expires_ms: u64,
}

/// The remembered dedup_ids of one topic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedupWindow {
    /// Entries by dedup_id.
    entries: BTreeMap<String, DedupEntry>,
    /// `(expires_ms, dedup_id)` for every entry, so forgetting is in expiry order without a scan.
    expiry: BTreeSet<(u64, String)>,
}

impl DedupWindow {
    /// The message id remembered for `dedup_id`, if its window has not ended at `now`.
    pub fn lookup(&self, dedup_id: &str, now: u64) -> Option<&str> {
        self.entries
            .get(dedup_id)
            .filter(|e| e.expires_ms > now)
            .map(|e| e.message_id.as_str())
    }

    /// Remembers `dedup_id` for `message_id` until `expires_ms`.
    pub fn remember(&mut self, dedup_id: String, message_id: String, expires_ms: u64) {
        if let Some(old) = self.entries.get(&dedup_id) {
            self.expiry.remove(&(old.expires_ms, dedup_id.clone()));
        }
        self.expiry.insert((expires_ms, dedup_id.clone()));
        self.entries.insert(
            dedup_id,
            DedupEntry {
                message_id,
                expires_ms,
            },
        );
    }

    /// Forgets the entries whose window ended at `now`. Only memory depends on when this runs
    /// ([`DedupWindow::lookup`] ignores ended entries), and it runs only while applying an entry,
    /// so replicas still hold identical tables.
    pub fn forget_expired(&mut self, now: u64) {
        while let Some((expires, _)) = self.expiry.first() {
            if *expires > now {
                break;
            }
            if let Some((_, id)) = self.expiry.pop_first() {
                self.entries.remove(&id);
            }
        }
    }

    /// Every entry in dedup_id order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &DedupEntry)> {
        self.entries.iter()
    }

    /// Number of remembered entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
