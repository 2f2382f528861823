//! One topic: its messages in arrival order and the indexes that make delivery, timers and
//! statistics cheap.
//!
//! Every message change goes through [`Topic::insert`], [`Topic::remove`],
//! [`Topic::set_status`] or [`Topic::mark_delivered`], which keep the indexes equal to what a
//! fresh rebuild from the messages alone would give. That equality is what the snapshot round
//! trip checks (a restore rebuilds the indexes), so a forgotten index update shows up as a
//! failed `restore(snapshot()) == state` in the property tests.
//!
//! Invariants:
//! - `seq` is the arrival order in this topic (publish, dead-lettering or redrive); delivery
//!   order is ascending `seq`, which for published messages is publish order.
//! - `ready` holds exactly the visible messages that may be delivered now: those without an
//!   ordering key, and for each ordering key its first message in `seq` order if that one is
//!   visible. Because only a key's first message can be ready, and a message of a key can only
//!   be delivered while it is that key's first, at most one message per key is in flight and
//!   each key is delivered in arrival order.
//! - `timers` holds one entry per pending time-driven transition: every message's age expiry,
//!   and the end of its delay or visibility timeout.

use std::collections::{BTreeMap, BTreeSet};

use sync_proto::internal::v1 as ipb;

use super::error::QueueError;
use super::message::{Message, Status};

/// What a timer does when it fires. The order breaks ties between timers of one message at the
/// same time: ageing out wins, so a message is never dead-lettered in the instant it expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKind {
    /// The message reaches `retention_max_age_ms`: deleted.
    Age,
    /// The delivery's visibility timeout ends: visible again, or dead-lettered.
    Lapse,
    /// The publish or nack delay ends: visible.
    DelayEnd,
}

/// A topic and its messages.
#[derive(Clone, Debug, PartialEq)]
pub struct Topic {
    /// Creation-order number, unique among live topics: orders simultaneous timers of different
    /// topics the same way on every replica.
    pub(super) id: u64,
    /// The topic's name.
    pub(super) name: String,
    /// Settings in force (defaults filled in); fixed at creation.
    pub(super) settings: ipb::QueueTopicSettings,
    /// Creation time (leader's clock).
    pub(super) created_ms: u64,
    /// Recently published dedup_ids.
    pub(super) dedup: super::dedup_window::DedupWindow,
    /// Cumulative counts since creation.
    pub(super) totals: ipb::QueueCounters,
    /// The `seq` the next arriving message gets; never decreases, so `seq`s are not reused.
    next_seq: u64,
    /// Messages by `seq`.
    messages: BTreeMap<u64, Message>,
    /// `seq` by message id (receipts name messages by id).
    by_id: BTreeMap<String, u64>,
    /// Messages whose status is [`Status::Visible`].
    visible: BTreeSet<u64>,
    /// Visible messages deliverable now (see the module invariants).
    ready: BTreeSet<u64>,
    /// The `seq`s of each ordering key's messages, whatever their status.
    keys: BTreeMap<String, BTreeSet<u64>>,
    /// Pending transitions as `(time, seq, kind)`.
    timers: BTreeSet<(u64, u64, TimerKind)>,
    /// `(publish time, seq)`, for the oldest message's age.
    by_publish: BTreeSet<(u64, u64)>,
    /// Messages in flight.
    in_flight: u64,
    /// Messages delayed.
    delayed: u64,
    /// Sum of the messages' sizes.
    bytes: u64,
}

/// True if `seq` may be delivered as far as its ordering key is concerned: it has none, or it is
/// its key's first message.
fn first_of_key(keys: &BTreeMap<String, BTreeSet<u64>>, seq: u64, key: &str) -> bool {
    key.is_empty() || keys.get(key).and_then(|s| s.first()) == Some(&seq)
}

impl Topic {
    /// An empty topic.
    pub fn new(id: u64, name: String, settings: ipb::QueueTopicSettings, created_ms: u64) -> Self {
        Topic {
            id,
            name,
            settings,
            created_ms,
            dedup: Default::default(),
            totals: Default::default(),
            next_seq: 0,
            messages: BTreeMap::new(),
            by_id: BTreeMap::new(),
            visible: BTreeSet::new(),
            ready: BTreeSet::new(),
            keys: BTreeMap::new(),
            timers: BTreeSet::new(),
            by_publish: BTreeSet::new(),
            in_flight: 0,
            delayed: 0,
            bytes: 0,
        }
    }

    /// The topic as reported to clients.
    pub fn to_proto(&self) -> ipb::QueueTopic {
        ipb::QueueTopic {
            name: self.name.clone(),
            settings: Some(self.settings.clone()),
            created_unix_ms: self.created_ms,
        }
    }

    /// Messages held.
    pub fn len(&self) -> u64 {
        self.messages.len() as u64
    }

    /// True if the topic holds no message.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Bytes held, as counted against `retention_max_bytes`.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The `seq` the next arriving message will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Raises [`Topic::next_seq`] to `next` (a restore: the seqs of messages removed from the
    /// end must not be reused).
    pub fn set_next_seq(&mut self, next: u64) {
        self.next_seq = self.next_seq.max(next);
    }

    /// The message at `seq`.
    pub fn get(&self, seq: u64) -> Option<&Message> {
        self.messages.get(&seq)
    }

    /// The `seq` of the message with this id.
    pub fn seq_of(&self, id: &str) -> Option<u64> {
        self.by_id.get(id).copied()
    }

    /// Every message with its `seq`, in arrival order.
    pub fn messages(&self) -> impl Iterator<Item = (u64, &Message)> {
        self.messages.iter().map(|(&seq, m)| (seq, m))
    }

    /// Visible messages in arrival order (including those waiting behind their ordering key).
    pub fn visible_seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.visible.iter().copied()
    }

    /// Messages deliverable now, in delivery order.
    pub fn ready_seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.ready.iter().copied()
    }

    /// Number of messages deliverable now.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// The earliest pending transition.
    pub fn first_timer(&self) -> Option<(u64, u64, TimerKind)> {
        self.timers.first().copied()
    }

    /// When the earliest pending transition is due.
    pub fn next_timer_at(&self) -> Option<u64> {
        self.timers.first().map(|t| t.0)
    }

    /// When a message published at `publish_ms` ages out.
    fn age_deadline(&self, publish_ms: u64) -> u64 {
        publish_ms.saturating_add(self.settings.retention_max_age_ms)
    }

    /// Appends a message at the end of the arrival order; returns its `seq`. Its id must not be
    /// held already (ids come from unique log positions, so they never collide).
    pub fn insert(&mut self, msg: Message) -> u64 {
        let seq = self.next_seq;
        let inserted = self.insert_at(seq, msg);
        debug_assert!(inserted, "message ids are unique");
        seq
    }

    /// Adds a message at `seq`, which must not be below [`Topic::next_seq`] (a snapshot restores
    /// messages in arrival order). False, changing nothing, if `seq` is below it or the id is
    /// already held.
    pub fn insert_at(&mut self, seq: u64, msg: Message) -> bool {
        if seq < self.next_seq || self.by_id.contains_key(&msg.id) {
            return false;
        }
        self.next_seq = seq.saturating_add(1);
        self.by_id.insert(msg.id.clone(), seq);
        if !msg.ordering_key.is_empty() {
            // The new seq is the largest, so it never displaces its key's first message.
            self.keys
                .entry(msg.ordering_key.clone())
                .or_default()
                .insert(seq);
        }
        self.by_publish.insert((msg.publish_ms, seq));
        self.timers
            .insert((self.age_deadline(msg.publish_ms), seq, TimerKind::Age));
        self.bytes += msg.size();
        let first = first_of_key(&self.keys, seq, &msg.ordering_key);
        let status = msg.status;
        self.messages.insert(seq, msg);
        self.index_status(seq, status, first);
        true
    }

    /// Removes the message at `seq` and every index entry of it; the next message of its
    /// ordering key, if visible, becomes deliverable.
    pub fn remove(&mut self, seq: u64) -> Option<Message> {
        let msg = self.messages.remove(&seq)?;
        self.unindex_status(seq, msg.status);
        self.by_id.remove(&msg.id);
        self.by_publish.remove(&(msg.publish_ms, seq));
        self.timers
            .remove(&(self.age_deadline(msg.publish_ms), seq, TimerKind::Age));
        self.bytes -= msg.size();
        if let Some(seqs) = self.keys.get_mut(&msg.ordering_key) {
            seqs.remove(&seq);
            match seqs.first().copied() {
                None => {
                    self.keys.remove(&msg.ordering_key);
                }
                Some(next) => {
                    if self.messages.get(&next).map(|m| m.status) == Some(Status::Visible) {
                        self.ready.insert(next);
                    }
                }
            }
        }
        Some(msg)
    }

    /// Removes every message; returns how many there were.
    pub fn clear(&mut self) -> u64 {
        let n = self.len();
        let seqs: Vec<u64> = self.messages.keys().copied().collect();
        for seq in seqs {
            self.remove(seq);
        }
        n
    }

    /// Moves the message at `seq` to `status`. False if there is no such message.
    pub fn set_status(&mut self, seq: u64, status: Status) -> bool {
        let Some(msg) = self.messages.get_mut(&seq) else {
            return false;
        };
        let old = std::mem::replace(&mut msg.status, status);
        let first = first_of_key(&self.keys, seq, &msg.ordering_key);
        self.unindex_status(seq, old);
        self.index_status(seq, status, first);
        true
    }

    /// Records a delivery of the message at `seq` at `now` to `consumer_tag`, in flight until
    /// `deadline`.
    pub fn mark_delivered(
        &mut self,
        seq: u64,
        now: u64,
        deadline: u64,
        consumer_tag: &str,
    ) -> Option<&Message> {
        let msg = self.messages.get_mut(&seq)?;
        msg.attempts = msg.attempts.saturating_add(1);
        msg.first_delivery_ms.get_or_insert(now);
        consumer_tag.clone_into(&mut msg.consumer_tag);
        self.set_status(seq, Status::InFlight { deadline });
        self.totals.delivered += 1;
        self.messages.get(&seq)
    }

    /// Adds the status-dependent index entries of `seq`. `first` says whether it is its ordering
    /// key's first message.
    fn index_status(&mut self, seq: u64, status: Status, first: bool) {
        match status {
            Status::Visible => {
                self.visible.insert(seq);
                if first {
                    self.ready.insert(seq);
                }
            }
            Status::Delayed { until } => {
                self.delayed += 1;
                self.timers.insert((until, seq, TimerKind::DelayEnd));
            }
            Status::InFlight { deadline } => {
                self.in_flight += 1;
                self.timers.insert((deadline, seq, TimerKind::Lapse));
            }
        }
    }

    /// Removes the status-dependent index entries of `seq`.
    fn unindex_status(&mut self, seq: u64, status: Status) {
        match status {
            Status::Visible => {
                self.visible.remove(&seq);
                self.ready.remove(&seq);
            }
            Status::Delayed { until } => {
                self.delayed -= 1;
                self.timers.remove(&(until, seq, TimerKind::DelayEnd));
            }
            Status::InFlight { deadline } => {
                self.in_flight -= 1;
                self.timers.remove(&(deadline, seq, TimerKind::Lapse));
            }
        }
    }

    /// Refuses adding `messages` messages of `bytes` bytes past a retention limit. Publishes and
    /// redrives are checked; dead-lettering is not (see the `queue` module docs).
    pub fn check_room(&self, messages: u64, bytes: u64) -> Result<(), QueueError> {
        let s = &self.settings;
        let limits = [
            (
                "messages",
                "retention_max_messages",
                self.len(),
                messages,
                s.retention_max_messages,
            ),
            (
                "bytes",
                "retention_max_bytes",
                self.bytes,
                bytes,
                s.retention_max_bytes,
            ),
        ];
        for (unit, setting, held, adding, max) in limits {
            if max > 0 && held.saturating_add(adding) > max {
                return Err(QueueError::exhausted(format!(
                    "topic `{}` holds {held} {unit} and {adding} more would pass its {setting} \
                     of {max}; ack or purge messages, or use a topic with a higher limit",
                    self.name
                )));
            }
        }
        Ok(())
    }

    /// In-flight messages whose latest delivery went to `consumer_tag`.
    pub fn in_flight_for(&self, consumer_tag: &str) -> usize {
        self.timers
            .iter()
            .filter(|(_, _, kind)| *kind == TimerKind::Lapse)
            .filter(|(_, seq, _)| {
                self.messages
                    .get(seq)
                    .is_some_and(|m| m.consumer_tag == consumer_tag)
            })
            .count()
    }

    /// The topic's counts at `now`.
    pub fn stats(&self, now: u64) -> ipb::QueueStats {
        ipb::QueueStats {
            topic: self.name.clone(),
            visible: self.visible.len() as u64,
            in_flight: self.in_flight,
            delayed: self.delayed,
            oldest_age_ms: self
                .by_publish
                .first()
                .map_or(0, |(publish, _)| now.saturating_sub(*publish)),
            bytes: self.bytes,
            totals: Some(self.totals),
        }
    }
}
