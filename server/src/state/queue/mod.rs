//! The queue's replicated state machine: topics, messages, deliveries and dead letters, as a pure
//! function of the committed log.
//!
//! Layout:
//! - [`limits`]: every limit and default of `queue.proto`, and the checks enforcing them;
//! - [`error`]: [`QueueError`], a refusal with its gRPC-named code and an actionable message;
//! - [`message`]: one stored message and its [`Status`] (visible, delayed, in flight);
//! - [`topic`]: a topic's messages and indexes (delivery order, ordering keys, timers);
//! - [`dedup_window`]: the dedup_ids a topic remembers;
//! - `admin`, `publish`, `delivery`, `dead_letter`: the commands, one concept per file;
//! - `snapshot`: [`QueueState::snapshot`] and [`QueueState::restore`];
//! - `tests` (rule by rule), `model` (the model-based property test) and `testkit` (their
//!   command builders).
//!
//! # Determinism
//! Nothing here reads a clock, does I/O or draws random numbers. Time is the leader-stamped
//! `now_ms` carried by each log entry; the state keeps the largest it has seen as its clock (a
//! new leader whose clock lags cannot move time backwards). Every collection is ordered
//! (BTreeMap/BTreeSet), so replicas applying the same entries reach identical states and
//! identical results.
//!
//! # Time
//! Time-driven transitions (a visibility timeout lapses, a delay ends, a message ages out) run in
//! [`QueueState::advance`], which [`QueueState::apply`] calls before every command. They are
//! processed one at a time in `(time, topic id, seq, kind)` order across all topics, so the
//! result does not depend on how often `advance` ran in between: advancing to `t1` then `t2`
//! equals advancing to `t2`. [`QueueState::next_deadline`] tells the topic owner when the next
//! transition is due, so it can propose a command (RequeueExpired, or a Deliver for a waiting
//! consumer) at that time.
//!
//! # At least once
//! A message leaves the state only when it is acknowledged, dead-lettered (moved, or deleted when
//! its topic has no dead-letter topic), purged, deleted with its topic, or aged out by
//! `retention_max_age_ms`. Publishes over a retention limit are refused, never accepted and
//! dropped. Dead-lettering and timeouts never fail: moving a message into a dead-letter topic
//! ignores that topic's count and byte limits (which bound publishes and redrives), because the
//! alternative would be to lose the message or to keep redelivering a poison message.

pub mod dedup_window;
pub mod error;
pub mod limits;
pub mod message;
pub mod topic;

mod admin;
mod dead_letter;
mod delivery;
mod publish;
mod snapshot;

#[cfg(test)]
mod model;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use sync_proto::internal::v1 as ipb;

pub use delivery::check_ack_batch;
pub use error::QueueError;
pub use message::{Message, Status};
pub use publish::{message_id, precheck_batch};
pub use snapshot::RestoreError;

use limits::{DEFAULT_LIST_PAGE_SIZE, MAX_LIST_PAGE_SIZE, validate_topic_name};
use message::REASON_TIMED_OUT;
use topic::{TimerKind, Topic};

/// What one [`QueueState::advance`] did, for the node: which topics have messages to wake long
/// polls for, and counts for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Advanced {
    /// Per topic, deliveries whose visibility timeout lapsed and whose message is visible again
    /// (what RequeueExpired reports).
    pub requeued: BTreeMap<String, u64>,
    /// Topics in which a message became visible (a timeout lapsed or a delay ended).
    pub woken: BTreeSet<String>,
    /// Messages dead-lettered because their last allowed delivery timed out.
    pub dead_lettered: u64,
    /// Messages deleted by retention age.
    pub expired: u64,
}

impl Advanced {
    /// Adds `other`'s transitions to these.
    fn merge(&mut self, other: Advanced) {
        for (topic, n) in other.requeued {
            *self.requeued.entry(topic).or_default() += n;
        }
        self.woken.extend(other.woken);
        self.dead_lettered += other.dead_lettered;
        self.expired += other.expired;
    }
}

/// The state of every topic (see the module docs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueState {
    /// The latest leader time applied: "now" for every command and read.
    clock_ms: u64,
    /// Log index of the last applied command. Message ids are derived from log indexes, so a
    /// command at or below it (a replay: a bug in the caller) is refused rather than allowed to
    /// reuse ids.
    last_index: u64,
    /// The id the next created topic gets.
    next_topic_id: u64,
    /// Topics by name.
    topics: BTreeMap<String, Topic>,
    /// Topic names by id, to find the topic of a wakeup.
    names: BTreeMap<u64, String>,
    /// `(time of the topic's earliest timer, topic id)` for every topic with a timer: finding
    /// the next transition across all topics without a scan.
    wakeups: BTreeSet<(u64, u64)>,
}

impl QueueState {
    /// Applies one committed queue command, written at log `index` with leader time `now_ms`,
    /// after the time-driven transitions up to `now_ms`. Every replica returns the same result.
    /// Indexes must increase from one call to the next; a repeated or older index is refused
    /// with FAILED_PRECONDITION and changes nothing.
    pub fn apply(&mut self, index: u64, now_ms: u64, cmd: &ipb::QueueCommand) -> ipb::QueueResult {
        self.apply_reporting(index, now_ms, cmd).0
    }

    /// [`QueueState::apply`], also returning what the time-driven transitions did.
    pub fn apply_reporting(
        &mut self,
        index: u64,
        now_ms: u64,
        cmd: &ipb::QueueCommand,
    ) -> (ipb::QueueResult, Advanced) {
        use ipb::queue_result::Result as R;
        if index <= self.last_index {
            let e = QueueError::precondition(format!(
                "log index {index} is not after the last applied queue command ({}); each entry \
                 must be applied once, in log order",
                self.last_index
            ));
            let result = Some(R::Error(e.to_proto()));
            return (ipb::QueueResult { result }, Advanced::default());
        }
        self.last_index = index;
        let mut report = self.advance(now_ms);
        let result = match self.execute(index, cmd, &report) {
            Ok(r) => r,
            Err(e) => R::Error(e.to_proto()),
        };
        // A command can make a transition due at once (a message dead-lettered or redriven into
        // a topic with a shorter retention age): settle it now, so that no timer is ever due
        // between entries.
        report.merge(self.advance(now_ms));
        let result = ipb::QueueResult {
            result: Some(result),
        };
        (result, report)
    }

    fn execute(
        &mut self,
        index: u64,
        cmd: &ipb::QueueCommand,
        report: &Advanced,
    ) -> Result<ipb::queue_result::Result, QueueError> {
        use ipb::queue_command::Op;
        use ipb::queue_result::Result as R;
        let now = self.clock_ms;
        let Some(op) = &cmd.op else {
            return Err(QueueError::invalid("queue command has no operation"));
        };
        Ok(match op {
            Op::CreateTopic(c) => R::CreateTopic(self.create_topic(now, c)?),
            Op::DeleteTopic(c) => R::DeleteTopic(self.delete_topic(c)?),
            Op::Publish(c) => R::Publish(self.publish(index, now, c)?),
            Op::Deliver(c) => R::Deliver(self.deliver(now, c)?),
            Op::Ack(c) => R::Ack(self.ack(c)?),
            Op::Nack(c) => R::Nack(self.nack(now, c)?),
            Op::ExtendVisibility(c) => R::ExtendVisibility(self.extend_visibility(now, c)?),
            Op::RequeueExpired(c) => R::RequeueExpired(self.requeue_expired(c, report)?),
            Op::Redrive(c) => R::Redrive(self.redrive(c)?),
            Op::Purge(c) => R::Purge(self.purge(c)?),
            Op::AckBatch(c) => R::AckBatch(self.ack_batch(c)?),
        })
    }

    /// Performs every time-driven transition due at or before `now_ms` (see the module docs on
    /// time): lapsed visibility timeouts make messages visible again with their attempt count
    /// kept, or dead-letter them after `max_deliveries`; ended delays make messages visible;
    /// messages older than `retention_max_age_ms` are deleted.
    ///
    /// [`QueueState::apply`] calls this; call it yourself only with a time that comes from the
    /// log (never a local clock reading), or this replica will diverge from the others.
    pub fn advance(&mut self, now_ms: u64) -> Advanced {
        self.clock_ms = self.clock_ms.max(now_ms);
        let now = self.clock_ms;
        let mut report = Advanced::default();
        while let Some(&(at, id)) = self.wakeups.first() {
            if at > now {
                break;
            }
            let timer = self
                .names
                .get(&id)
                .and_then(|name| self.topics.get(name))
                .and_then(|t| Some((t.name.clone(), t.first_timer()?)));
            let Some((name, (_, seq, kind))) = timer else {
                // A wakeup without a timer behind it: cannot happen, as `update` keeps them in
                // step; dropping it keeps this loop finite regardless.
                self.wakeups.remove(&(at, id));
                continue;
            };
            // Each arm changes the message so that this timer is gone, so the loop advances.
            match kind {
                TimerKind::Age => {
                    self.update(&name, |t| {
                        t.remove(seq);
                        t.totals.expired += 1;
                    });
                    report.expired += 1;
                }
                TimerKind::DelayEnd => {
                    self.update(&name, |t| t.set_status(seq, Status::Visible));
                    report.woken.insert(name);
                }
                TimerKind::Lapse => {
                    let exhausted = self.update(&name, |t| {
                        t.totals.timed_out += 1;
                        let max = t.settings.max_deliveries;
                        max > 0 && t.get(seq).is_some_and(|m| m.attempts >= max)
                    });
                    if exhausted == Some(true) && self.dead_letter(&name, seq, REASON_TIMED_OUT) {
                        report.dead_lettered += 1;
                    } else {
                        self.update(&name, |t| t.set_status(seq, Status::Visible));
                        *report.requeued.entry(name.clone()).or_default() += 1;
                        report.woken.insert(name);
                    }
                }
            }
        }
        report
    }

    /// The earliest time at which [`QueueState::advance`] changes something (a visibility
    /// timeout lapses, a delay ends, a message ages out); None if nothing is pending. Always
    /// later than [`QueueState::clock_unix_ms`] after an apply.
    pub fn next_deadline(&self) -> Option<u64> {
        self.wakeups.first().map(|&(at, _)| at)
    }

    /// The latest leader time applied: the "now" of reads.
    pub fn clock_unix_ms(&self) -> u64 {
        self.clock_ms
    }

    /// A topic's settings (GetTopic).
    pub fn topic(&self, name: &str) -> Option<ipb::QueueTopic> {
        self.topics.get(name).map(Topic::to_proto)
    }

    /// Number of topics.
    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// One page of the topics whose names start with `prefix`, in name order (ListTopics), and
    /// the token of the next page (empty after the last). `page_size` 0 means
    /// [`DEFAULT_LIST_PAGE_SIZE`]; larger than [`MAX_LIST_PAGE_SIZE`] is clamped. The token is
    /// the last name of the previous page.
    pub fn list_topics(
        &self,
        prefix: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<ipb::QueueTopic>, String), QueueError> {
        use std::ops::Bound;
        let size = match page_size as usize {
            0 => DEFAULT_LIST_PAGE_SIZE,
            n => n.min(MAX_LIST_PAGE_SIZE),
        };
        // A token before the prefix (from a listing with another prefix) starts at the prefix.
        let start = if page_token.is_empty() || page_token < prefix {
            Bound::Included(prefix)
        } else {
            validate_topic_name("page_token", page_token).map_err(|_| {
                QueueError::invalid(
                    "page_token is not one this server returned; pass the previous page's \
                     next_page_token unchanged, or empty for the first page",
                )
            })?;
            Bound::Excluded(page_token)
        };
        let mut page: Vec<ipb::QueueTopic> = self
            .topics
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|(name, _)| name.starts_with(prefix))
            .take(size + 1)
            .map(|(_, t)| t.to_proto())
            .collect();
        let next = if page.len() > size {
            page.truncate(size);
            page.last().map(|t| t.name.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((page, next))
    }

    /// A topic's counts as of the last applied entry (Stats).
    pub fn stats(&self, name: &str) -> Option<ipb::QueueStats> {
        self.topics.get(name).map(|t| t.stats(self.clock_ms))
    }

    /// A topic's messages in delivery order, whatever their status.
    pub fn messages(&self, topic: &str) -> Option<impl Iterator<Item = &Message>> {
        self.topics.get(topic).map(|t| t.messages().map(|(_, m)| m))
    }

    /// One message of a topic.
    pub fn message(&self, topic: &str, id: &str) -> Option<&Message> {
        let t = self.topics.get(topic)?;
        t.get(t.seq_of(id)?)
    }

    /// How many messages a Deliver on `topic` could hand out now (for long polls).
    pub fn ready_count(&self, topic: &str) -> Option<usize> {
        self.topics.get(topic).map(Topic::ready_len)
    }

    /// In-flight messages of `topic` whose latest delivery went to `consumer_tag` (a
    /// subscriber's used credit).
    pub fn in_flight_for(&self, topic: &str, consumer_tag: &str) -> usize {
        self.topics
            .get(topic)
            .map_or(0, |t| t.in_flight_for(consumer_tag))
    }

    /// Runs `f` on a topic and keeps its wakeup in step with its timers. Every change to a topic
    /// goes through here. None if there is no such topic.
    fn update<R>(&mut self, name: &str, f: impl FnOnce(&mut Topic) -> R) -> Option<R> {
        let topic = self.topics.get_mut(name)?;
        let before = topic.next_timer_at();
        let r = f(topic);
        let after = topic.next_timer_at();
        if before != after {
            let id = topic.id;
            if let Some(at) = before {
                self.wakeups.remove(&(at, id));
            }
            if let Some(at) = after {
                self.wakeups.insert((at, id));
            }
        }
        Some(r)
    }

    /// Adds an empty topic.
    fn add_topic(&mut self, name: &str, settings: ipb::QueueTopicSettings, now: u64) {
        let id = self.next_topic_id;
        self.next_topic_id += 1;
        self.names.insert(id, name.to_string());
        self.topics
            .insert(name.to_string(), Topic::new(id, name.into(), settings, now));
    }

    /// Removes a topic with its messages.
    fn remove_topic(&mut self, name: &str) -> Option<Topic> {
        let topic = self.topics.remove(name)?;
        if let Some(at) = topic.next_timer_at() {
            self.wakeups.remove(&(at, topic.id));
        }
        self.names.remove(&topic.id);
        Some(topic)
    }

    /// The topic named by a command, after checking the name.
    fn existing(&self, field: &str, name: &str) -> Result<&Topic, QueueError> {
        validate_topic_name(field, name)?;
        self.topics
            .get(name)
            .ok_or_else(|| QueueError::no_topic(name))
    }
}
