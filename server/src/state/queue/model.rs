//! Model-based property test: random sequences of queue commands applied both to
//! [`QueueState`] and to a deliberately simple reference model, compared after every step.
//!
//! The model shares no data structure with the implementation: each topic is a `Vec` of
//! messages in arrival order, every question is a linear scan, visibility is computed from
//! times when asked (the implementation moves messages between indexes eagerly), and the
//! ordering-key rule is "no earlier message of the same key is still in the topic". Its
//! numbers are queue.proto's, written out literally.
//!
//! After every step the test compares results (ids, attempts, deadlines, payloads, attributes,
//! error codes), every topic's settings, messages (id, status, attempt) and statistics, and
//! `next_deadline`; and it checks these invariants on the implementation alone:
//! - conservation: every message a publish acknowledged is, at every step, in exactly one
//!   place: in one topic (visible, delayed or in flight), or gone for a reason the model
//!   recorded (acknowledged, dead-lettered without a dead-letter topic, purged, deleted with
//!   its topic, aged out); and no message exists that was not published;
//! - at most one in-flight message per ordering key in a topic;
//! - no message is delivered while an earlier delivery of it is in flight before its deadline
//!   (checked from the results alone);
//! - `restore(snapshot())` is identical to the state (which also checks every index);
//! - nothing is due: `next_deadline()` is later than the clock.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use prop::option;
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message as _;
use sync_proto::internal::v1 as ipb;
use sync_proto::internal::v1::QueueErrorCode as Code;

use super::testkit::*;
use super::{QueueError, QueueState, Status};

/// The topics the test uses; settings from [`menu`].
const TOPICS: [&str; 4] = ["a", "b", "c", "dlq"];

/// Each topic's CreateTopic settings: small limits, so that retention, size and dead-letter
/// rules are reached often. `c` dead-letters into `b`, which has a byte limit.
fn menu(topic: usize) -> Option<ipb::QueueTopicSettings> {
    match topic {
        0 => Some(settings(100, 2, "dlq", 6, 0, 5_000, 32, 1_000)),
        1 => Some(settings(300, 0, "", 0, 120, 2_000, 64, 500)),
        2 => Some(settings(50, 1, "b", 0, 0, 3_000, 0, 0)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The reference model.

/// queue.proto's defaults for settings left at 0.
fn fill(s: Option<ipb::QueueTopicSettings>) -> ipb::QueueTopicSettings {
    let mut s = s.unwrap_or_default();
    let or = |v: u64, d: u64| if v == 0 { d } else { v };
    s.visibility_timeout_ms = or(s.visibility_timeout_ms, 30_000);
    s.retention_max_age_ms = or(s.retention_max_age_ms, 345_600_000);
    s.max_message_bytes = or(s.max_message_bytes, 1_048_576);
    s.dedup_window_ms = or(s.dedup_window_ms, 300_000);
    s
}

#[derive(Clone, Debug)]
struct MMsg {
    id: String,
    payload: Vec<u8>,
    /// Sorted by key.
    attrs: Vec<(String, String)>,
    key: String,
    publish: u64,
    attempts: u32,
    first_delivery: Option<u64>,
    /// Not deliverable before this (when not in flight).
    available_at: u64,
    in_flight_until: Option<u64>,
}

impl MMsg {
    fn size(&self) -> u64 {
        let attrs: usize = self.attrs.iter().map(|(k, v)| k.len() + v.len()).sum();
        (self.payload.len() + attrs + self.key.len()) as u64
    }

    fn visible(&self, now: u64) -> bool {
        self.in_flight_until.is_none() && self.available_at <= now
    }

    fn status(&self, now: u64) -> Status {
        match self.in_flight_until {
            Some(deadline) => Status::InFlight { deadline },
            None if self.available_at > now => Status::Delayed {
                until: self.available_at,
            },
            None => Status::Visible,
        }
    }
}

#[derive(Clone, Debug)]
struct MTopic {
    name: String,
    s: ipb::QueueTopicSettings,
    created: u64,
    /// Arrival order.
    msgs: Vec<MMsg>,
    /// (dedup_id, message id, expires).
    dedup: Vec<(String, String, u64)>,
    totals: ipb::QueueCounters,
}

impl MTopic {
    fn bytes(&self) -> u64 {
        self.msgs.iter().map(MMsg::size).sum()
    }

    fn full_for(&self, adding: u64, adding_bytes: u64) -> bool {
        let max = &self.s;
        (max.retention_max_messages > 0
            && self.msgs.len() as u64 + adding > max.retention_max_messages)
            || (max.retention_max_bytes > 0
                && self.bytes() + adding_bytes > max.retention_max_bytes)
    }
}

/// A result, reduced to what both sides must agree on.
#[derive(Clone, Debug, PartialEq)]
enum Out {
    Err(Code),
    Created(bool),
    Deleted(u64),
    Published(Vec<(String, bool)>),
    Delivered(Vec<Seen>),
    Acked,
    /// Each receipt's refusal, `None` where it was acknowledged.
    AckedBatch(Vec<Option<Code>>),
    Nacked(bool),
    Extended(u64),
    Requeued(u64),
    Redriven(u64),
    Purged(u64),
}

/// One delivery as a consumer sees it.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    id: String,
    attempt: u32,
    payload: Vec<u8>,
    attrs: Vec<(String, String)>,
    key: String,
    publish: u64,
    first_delivery: u64,
    visible_again: u64,
}

#[derive(Clone, Debug, Default)]
struct Model {
    now: u64,
    /// Creation order.
    topics: Vec<MTopic>,
    /// Messages no longer in any topic, and why.
    gone: BTreeMap<String, &'static str>,
    /// Requeues per topic by the transitions that ran before the current command.
    requeued: BTreeMap<String, u64>,
    /// Time-driven and dead-letter events so far, for the coverage check.
    events: BTreeMap<&'static str, u64>,
}

/// One entry of a generated publish.
#[derive(Clone, Debug)]
struct GenEntry {
    payload_len: usize,
    /// 0: no ordering key; else `k1`, `k2`.
    key: u8,
    /// 0: no dedup_id; else `d1`..`d3`.
    dedup: u8,
    delay: u64,
    /// 0: none; 1: `color=red`; 2: the reserved `sync.x=1`.
    attr: u8,
}

impl GenEntry {
    fn key(&self) -> String {
        if self.key == 0 {
            String::new()
        } else {
            format!("k{}", self.key)
        }
    }

    fn dedup(&self) -> String {
        if self.dedup == 0 {
            String::new()
        } else {
            format!("d{}", self.dedup)
        }
    }

    fn attrs(&self) -> Vec<(String, String)> {
        match self.attr {
            1 => vec![("color".into(), "red".into())],
            2 => vec![("sync.x".into(), "1".into())],
            _ => vec![],
        }
    }

    fn to_proto(&self) -> ipb::QueuePublishEntry {
        ipb::QueuePublishEntry {
            payload: Bytes::from(vec![b'x'; self.payload_len]),
            dedup_id: self.dedup(),
            delay_ms: self.delay,
            attributes: self
                .attrs()
                .into_iter()
                .map(|(key, value)| ipb::QueueAttribute { key, value })
                .collect(),
            ordering_key: self.key(),
        }
    }
}

impl Model {
    fn find(&self, name: &str) -> Option<usize> {
        self.topics.iter().position(|t| t.name == name)
    }

    fn find_msg(&self, ti: usize, id: &str) -> Option<usize> {
        self.topics[ti].msgs.iter().position(|m| m.id == id)
    }

    /// Runs due timeouts and expiries one at a time, earliest first (ties: topic creation
    /// order, arrival order, expiry before timeout). Returns requeues per topic.
    fn advance(&mut self, now: u64) -> BTreeMap<String, u64> {
        self.now = self.now.max(now);
        let now = self.now;
        let mut requeued = BTreeMap::new();
        loop {
            let mut due: Option<(u64, usize, usize, u8)> = None;
            for (ti, t) in self.topics.iter().enumerate() {
                for (mi, m) in t.msgs.iter().enumerate() {
                    let age = m.publish.saturating_add(t.s.retention_max_age_ms);
                    let mut events = vec![(age, ti, mi, 0)];
                    if let Some(d) = m.in_flight_until {
                        events.push((d, ti, mi, 1));
                    }
                    for e in events {
                        if e.0 <= now && due.is_none_or(|d| e < d) {
                            due = Some(e);
                        }
                    }
                }
            }
            let Some((at, ti, mi, kind)) = due else {
                return requeued;
            };
            if kind == 0 {
                let m = self.topics[ti].msgs.remove(mi);
                self.gone.insert(m.id, "aged out");
                *self.events.entry("aged out").or_default() += 1;
                self.topics[ti].totals.expired += 1;
                continue;
            }
            let t = &mut self.topics[ti];
            t.totals.timed_out += 1;
            let max = t.s.max_deliveries;
            if max > 0 && t.msgs[mi].attempts >= max {
                self.dead_letter(ti, mi, "max_deliveries_timed_out");
            } else {
                t.msgs[mi].in_flight_until = None;
                t.msgs[mi].available_at = at;
                *requeued.entry(t.name.clone()).or_default() += 1;
            }
        }
    }

    fn dead_letter(&mut self, ti: usize, mi: usize, reason: &'static str) {
        let now = self.now;
        *self.events.entry(reason).or_default() += 1;
        let t = &mut self.topics[ti];
        t.totals.dead_lettered += 1;
        let mut m = t.msgs.remove(mi);
        let source = t.name.clone();
        let dlq = t.s.dead_letter_topic.clone();
        if dlq.is_empty() {
            self.gone
                .insert(m.id, "dead-lettered without a dead-letter topic");
            return;
        }
        m.attrs.retain(|(k, _)| !k.starts_with("sync.dead_letter."));
        m.attrs.push(("sync.dead_letter.source".into(), source));
        m.attrs
            .push(("sync.dead_letter.attempts".into(), m.attempts.to_string()));
        m.attrs
            .push(("sync.dead_letter.reason".into(), reason.into()));
        m.attrs.sort();
        m.attempts = 0;
        m.first_delivery = None;
        m.available_at = now;
        m.in_flight_until = None;
        let di = self
            .find(&dlq)
            .expect("a dead-letter topic cannot be deleted while in use");
        self.topics[di].msgs.push(m);
    }

    fn create(&mut self, name: &str, s: Option<ipb::QueueTopicSettings>) -> Out {
        let s = fill(s);
        if let Some(ti) = self.find(name) {
            return if self.topics[ti].s == s {
                Out::Created(false)
            } else {
                Out::Err(Code::AlreadyExists)
            };
        }
        let dlq = s.dead_letter_topic.clone();
        if !dlq.is_empty() && self.find(&dlq).is_none() {
            self.add(&dlq, fill(None));
        }
        self.add(name, s);
        Out::Created(true)
    }

    fn add(&mut self, name: &str, s: ipb::QueueTopicSettings) {
        self.topics.push(MTopic {
            name: name.into(),
            s,
            created: self.now,
            msgs: vec![],
            dedup: vec![],
            totals: Default::default(),
        });
    }

    fn delete(&mut self, name: &str) -> Out {
        let Some(ti) = self.find(name) else {
            return Out::Err(Code::NotFound);
        };
        if self.topics.iter().any(|t| t.s.dead_letter_topic == name) {
            return Out::Err(Code::FailedPrecondition);
        }
        let t = self.topics.remove(ti);
        for m in &t.msgs {
            self.gone.insert(m.id.clone(), "deleted with its topic");
        }
        Out::Deleted(t.msgs.len() as u64)
    }

    fn publish(&mut self, index: u64, name: &str, auto_create: bool, entries: &[GenEntry]) -> Out {
        let now = self.now;
        if entries.is_empty() {
            return Out::Err(Code::InvalidArgument);
        }
        let s = match self.find(name) {
            Some(ti) => self.topics[ti].s.clone(),
            None if auto_create => fill(None),
            None => return Out::Err(Code::NotFound),
        };
        let mut msgs = Vec::new();
        for (pos, e) in entries.iter().enumerate() {
            let m = MMsg {
                id: format!("{index:020}-{pos:03}"),
                payload: vec![b'x'; e.payload_len],
                attrs: e.attrs(),
                key: e.key(),
                publish: now,
                attempts: 0,
                first_delivery: None,
                available_at: now + e.delay,
                in_flight_until: None,
            };
            if e.attr == 2 || m.size() > s.max_message_bytes || e.delay > 86_400_000 {
                return Out::Err(Code::InvalidArgument);
            }
            msgs.push((e.dedup(), m));
        }
        let mut results = Vec::new();
        let mut kept: Vec<(String, MMsg)> = Vec::new();
        for (dedup, m) in msgs {
            let earlier = self
                .find(name)
                .and_then(|ti| {
                    let window = &self.topics[ti].dedup;
                    window.iter().find(|(d, _, exp)| *d == dedup && *exp > now)
                })
                .map(|(_, id, _)| id.clone())
                .or_else(|| {
                    kept.iter()
                        .find(|(d, _)| *d == dedup)
                        .map(|(_, m)| m.id.clone())
                })
                .filter(|_| !dedup.is_empty());
            match earlier {
                Some(id) => results.push((id, true)),
                None => {
                    results.push((m.id.clone(), false));
                    kept.push((dedup, m));
                }
            }
        }
        let adding_bytes = kept.iter().map(|(_, m)| m.size()).sum();
        let existing = self.find(name).map(|ti| &self.topics[ti]);
        if existing.is_some_and(|t| t.full_for(kept.len() as u64, adding_bytes)) {
            return Out::Err(Code::ResourceExhausted);
        }
        if self.find(name).is_none() {
            self.add(name, s.clone());
        }
        let ti = self.find(name).unwrap();
        let t = &mut self.topics[ti];
        for (dedup, m) in kept {
            if !dedup.is_empty() {
                t.dedup.push((dedup, m.id.clone(), now + s.dedup_window_ms));
            }
            t.msgs.push(m);
            t.totals.published += 1;
        }
        Out::Published(results)
    }

    fn deliver(&mut self, name: &str, max: u32, vis: u64) -> Out {
        let now = self.now;
        let Some(ti) = self.find(name) else {
            return Out::Err(Code::NotFound);
        };
        let t = &mut self.topics[ti];
        let timeout = if vis == 0 {
            t.s.visibility_timeout_ms
        } else {
            vis
        };
        let mut out = Vec::new();
        for i in 0..t.msgs.len() {
            if out.len() == max.max(1) as usize {
                break;
            }
            let blocked = {
                let m = &t.msgs[i];
                !m.key.is_empty() && t.msgs[..i].iter().any(|o| o.key == m.key)
            };
            let m = &mut t.msgs[i];
            if !m.visible(now) || blocked {
                continue;
            }
            m.attempts += 1;
            m.first_delivery.get_or_insert(now);
            m.in_flight_until = Some(now + timeout);
            t.totals.delivered += 1;
            out.push(Seen {
                id: m.id.clone(),
                attempt: m.attempts,
                payload: m.payload.clone(),
                attrs: m.attrs.clone(),
                key: m.key.clone(),
                publish: m.publish,
                first_delivery: m.first_delivery.unwrap_or(now),
                visible_again: now + timeout,
            });
        }
        Out::Delivered(out)
    }

    /// The topic and message a receipt names, or the refusal.
    fn resolve(&self, name: &str, id: &str, attempt: u32) -> Result<(usize, usize), Code> {
        let ti = self.find(name).ok_or(Code::NotFound)?;
        let mi = self.find_msg(ti, id).ok_or(Code::NotFound)?;
        let latest = self.topics[ti].msgs[mi].attempts;
        if latest == 0 || (attempt != 0 && attempt != latest) {
            return Err(Code::FailedPrecondition);
        }
        Ok((ti, mi))
    }

    fn ack(&mut self, name: &str, id: &str, attempt: u32) -> Out {
        match self.resolve(name, id, attempt) {
            Err(c) => Out::Err(c),
            Ok((ti, mi)) => {
                let m = self.topics[ti].msgs.remove(mi);
                self.gone.insert(m.id, "acknowledged");
                self.topics[ti].totals.acked += 1;
                Out::Acked
            }
        }
    }

    /// Each receipt acked on its own, as separate Acks (a missing topic refuses the whole).
    fn ack_batch(&mut self, name: &str, receipts: &[(String, u32)]) -> Out {
        if self.find(name).is_none() {
            return Out::Err(Code::NotFound);
        }
        Out::AckedBatch(
            receipts
                .iter()
                .map(|(id, attempt)| match self.ack(name, id, *attempt) {
                    Out::Err(c) => Some(c),
                    _ => None,
                })
                .collect(),
        )
    }

    fn nack(&mut self, name: &str, id: &str, attempt: u32, delay: u64) -> Out {
        match self.resolve(name, id, attempt) {
            Err(c) => Out::Err(c),
            Ok((ti, mi)) => {
                let now = self.now;
                let t = &mut self.topics[ti];
                t.totals.nacked += 1;
                let max = t.s.max_deliveries;
                if max > 0 && t.msgs[mi].attempts >= max {
                    self.dead_letter(ti, mi, "max_deliveries_nacked");
                    return Out::Nacked(true);
                }
                t.msgs[mi].in_flight_until = None;
                t.msgs[mi].available_at = now + delay;
                Out::Nacked(false)
            }
        }
    }

    fn extend(&mut self, name: &str, id: &str, attempt: u32, timeout: u64) -> Out {
        if timeout == 0 {
            return Out::Err(Code::InvalidArgument);
        }
        match self.resolve(name, id, attempt) {
            Err(c) => Out::Err(c),
            Ok((ti, mi)) => {
                let deadline = self.now + timeout;
                self.topics[ti].msgs[mi].in_flight_until = Some(deadline);
                Out::Extended(deadline)
            }
        }
    }

    fn redrive(&mut self, from: &str, to: Option<&str>, max: u64) -> Out {
        let now = self.now;
        if to == Some(from) {
            return Out::Err(Code::InvalidArgument);
        }
        let Some(fi) = self.find(from) else {
            return Out::Err(Code::NotFound);
        };
        if to.is_some_and(|to| self.find(to).is_none()) {
            return Out::Err(Code::NotFound);
        }
        let limit = if max == 0 { u64::MAX } else { max };
        let mut plan = Vec::new();
        for m in &self.topics[fi].msgs {
            if plan.len() as u64 == limit {
                break;
            }
            if !m.visible(now) {
                continue;
            }
            let source = m
                .attrs
                .iter()
                .find(|(k, _)| k == "sync.dead_letter.source")
                .map(|(_, v)| v.as_str());
            let dest = match to {
                Some(to) => to,
                None => match source {
                    Some(s) if s != from && self.find(s).is_some() => s,
                    _ => continue,
                },
            };
            plan.push((m.id.clone(), dest.to_string()));
        }
        let mut moved = 0;
        for (id, dest) in plan {
            let fi = self.find(from).unwrap();
            let mi = self.find_msg(fi, &id).unwrap();
            let di = self.find(&dest).unwrap();
            if self.topics[di].full_for(1, self.topics[fi].msgs[mi].size()) {
                return Out::Err(Code::ResourceExhausted);
            }
            let mut m = self.topics[fi].msgs.remove(mi);
            self.topics[fi].totals.redriven += 1;
            m.attempts = 0;
            m.first_delivery = None;
            m.available_at = now;
            self.topics[di].msgs.push(m);
            moved += 1;
        }
        Out::Redriven(moved)
    }

    fn purge(&mut self, name: &str) -> Out {
        let Some(ti) = self.find(name) else {
            return Out::Err(Code::NotFound);
        };
        let msgs = std::mem::take(&mut self.topics[ti].msgs);
        for m in &msgs {
            self.gone.insert(m.id.clone(), "purged");
        }
        self.topics[ti].totals.purged += msgs.len() as u64;
        Out::Purged(msgs.len() as u64)
    }

    fn stats(&self, ti: usize) -> ipb::QueueStats {
        let t = &self.topics[ti];
        let now = self.now;
        let count = |f: &dyn Fn(&MMsg) -> bool| t.msgs.iter().filter(|m| f(m)).count() as u64;
        ipb::QueueStats {
            topic: t.name.clone(),
            visible: count(&|m| m.visible(now)),
            in_flight: count(&|m| m.in_flight_until.is_some()),
            delayed: count(&|m| m.in_flight_until.is_none() && m.available_at > now),
            oldest_age_ms: t.msgs.iter().map(|m| now - m.publish).max().unwrap_or(0),
            bytes: t.bytes(),
            totals: Some(t.totals),
        }
    }

    /// The earliest future change: an expiry, a timeout or the end of a delay.
    fn next_deadline(&self) -> Option<u64> {
        let mut times = Vec::new();
        for t in &self.topics {
            for m in &t.msgs {
                times.push(m.publish.saturating_add(t.s.retention_max_age_ms));
                times.extend(m.in_flight_until);
                if m.in_flight_until.is_none() && m.available_at > self.now {
                    times.push(m.available_at);
                }
            }
        }
        times.into_iter().min()
    }
}

// ---------------------------------------------------------------------------------------------
// Steps and the run comparing both.

/// How a generated receipt relates to the delivery it was picked from.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Exact,
    Latest,
    Older,
    Newer,
}

/// What happens after time passes.
#[derive(Clone, Copy, Debug)]
enum Tick {
    /// Nothing: the next command advances the state.
    Nothing,
    /// The state is advanced explicitly.
    Advance,
    /// The owner's timer proposes RequeueExpired for a topic (what a node does at
    /// `next_deadline`).
    Requeue(usize),
}

#[derive(Clone, Debug)]
enum Step {
    Publish(usize, bool, Vec<GenEntry>),
    Deliver(usize, u32, u64),
    Ack(usize, Mode),
    /// Receipts of recent deliveries, sent to the first one's topic.
    AckBatch(Vec<(usize, Mode)>),
    Nack(usize, Mode, u64),
    Extend(usize, Mode, u64),
    /// Time passes, then what the node does about it.
    Sleep(u64, Tick),
    Requeue(usize),
    Redrive(usize, Option<usize>, u64),
    Purge(usize),
    Create(usize),
    Delete(usize),
    SnapshotRestore,
}

fn gen_entry() -> impl Strategy<Value = GenEntry> {
    // Mostly valid entries; now and then one too large, too delayed or with a reserved key.
    let payload_len = prop_oneof![24 => 0..20usize, 1 => 20..40usize];
    let delay = prop_oneof![12 => Just(0u64), 4 => Just(30), 3 => Just(150), 1 => Just(86_400_001)];
    let attr = prop_oneof![20 => Just(0u8), 8 => Just(1), 1 => Just(2)];
    (payload_len, 0..3u8, 0..4u8, delay, attr).prop_map(|(payload_len, key, dedup, delay, attr)| {
        GenEntry {
            payload_len,
            key,
            dedup,
            delay,
            attr,
        }
    })
}

fn gen_mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        6 => Just(Mode::Exact),
        2 => Just(Mode::Latest),
        1 => Just(Mode::Older),
        1 => Just(Mode::Newer),
    ]
}

fn gen_step() -> impl Strategy<Value = Step> {
    let topic = 0..TOPICS.len();
    let entries = prop_oneof![1 => Just(vec![]), 15 => vec(gen_entry(), 1..4)];
    let sleep = prop_oneof![
        2 => Just(0u64),
        2 => Just(1),
        8 => 10..120u64,
        2 => Just(300),
        1 => Just(2_500),
    ];
    prop_oneof![
        6 => (topic.clone(), any::<bool>(), entries)
            .prop_map(|(t, auto, e)| Step::Publish(t, auto, e)),
        6 => (topic.clone(), 0..4u32, prop_oneof![Just(0u64), Just(60), Just(250)])
            .prop_map(|(t, n, v)| Step::Deliver(t, n, v)),
        4 => (any::<usize>(), gen_mode()).prop_map(|(p, m)| Step::Ack(p, m)),
        2 => proptest::collection::vec((any::<usize>(), gen_mode()), 1..5).prop_map(Step::AckBatch),
        2 => (any::<usize>(), gen_mode(), prop_oneof![Just(0u64), Just(40)])
            .prop_map(|(p, m, d)| Step::Nack(p, m, d)),
        2 => (any::<usize>(), gen_mode(), prop_oneof![Just(0u64), Just(30), Just(200)])
            .prop_map(|(p, m, t)| Step::Extend(p, m, t)),
        6 => (sleep, prop_oneof![
            Just(Tick::Nothing),
            Just(Tick::Advance),
            topic.clone().prop_map(Tick::Requeue),
        ])
        .prop_map(|(ms, tick)| Step::Sleep(ms, tick)),
        2 => topic.clone().prop_map(Step::Requeue),
        1 => (topic.clone(), option::of(topic.clone()), 0..3u64)
            .prop_map(|(f, t, m)| Step::Redrive(f, t, m)),
        1 => topic.clone().prop_map(Step::Purge),
        1 => topic.clone().prop_map(Step::Create),
        1 => topic.prop_map(Step::Delete),
        1 => Just(Step::SnapshotRestore),
    ]
}

/// The implementation's result reduced to an [`Out`].
fn observe(r: Result<R, QueueError>) -> Out {
    match r {
        Err(e) => Out::Err(e.code),
        Ok(R::CreateTopic(c)) => Out::Created(c.created),
        Ok(R::DeleteTopic(d)) => Out::Deleted(d.deleted_messages),
        Ok(R::Publish(p)) => Out::Published(
            p.results
                .into_iter()
                .map(|r| (r.message_id, r.deduplicated))
                .collect(),
        ),
        Ok(R::Deliver(d)) => Out::Delivered(
            d.deliveries
                .into_iter()
                .map(|d| Seen {
                    id: d.message_id,
                    attempt: d.delivery_attempt,
                    payload: d.payload.to_vec(),
                    attrs: d.attributes.into_iter().map(|a| (a.key, a.value)).collect(),
                    key: d.ordering_key,
                    publish: d.publish_unix_ms,
                    first_delivery: d.first_delivery_unix_ms,
                    visible_again: d.visible_again_unix_ms,
                })
                .collect(),
        ),
        Ok(R::Ack(_)) => Out::Acked,
        Ok(R::AckBatch(b)) => Out::AckedBatch(
            b.outcomes
                .into_iter()
                .map(|o| o.error.map(|e| Code::try_from(e.code).unwrap_or_default()))
                .collect(),
        ),
        Ok(R::Nack(n)) => Out::Nacked(n.dead_lettered),
        Ok(R::ExtendVisibility(e)) => Out::Extended(e.visible_again_unix_ms),
        Ok(R::RequeueExpired(r)) => Out::Requeued(r.requeued),
        Ok(R::Redrive(r)) => Out::Redriven(r.moved),
        Ok(R::Purge(p)) => Out::Purged(p.purged),
        Ok(R::Error(e)) => Out::Err(Code::try_from(e.code).unwrap_or_default()),
    }
}

/// The rule a step's result shows was reached, if any.
fn rule_reached(got: &Out, step: &Step) -> Option<&'static str> {
    Some(match (got, step) {
        (Out::Published(r), _) if r.iter().any(|(_, dedup)| *dedup) => "publish deduplicated",
        (Out::Published(_), _) => "publish",
        (Out::Err(Code::ResourceExhausted), Step::Publish(..)) => "publish over a retention limit",
        (Out::Err(Code::InvalidArgument), Step::Publish(..)) => "publish invalid",
        (Out::Delivered(d), _) if d.iter().any(|s| s.attempt > 1) => {
            "redelivery after a timeout or nack"
        }
        (Out::Delivered(d), _) if !d.is_empty() => "delivery",
        (Out::Acked, _) => "ack",
        (Out::AckedBatch(o), _) if o.iter().any(Option::is_none) => "ack batch",
        (Out::Err(Code::FailedPrecondition), Step::Delete(_)) => {
            "topic in use as a dead-letter topic"
        }
        (Out::Err(Code::FailedPrecondition), _) => "stale receipt",
        (Out::Nacked(false), _) => "nack",
        (Out::Requeued(n), _) if *n > 0 => "requeue reported a lapse",
        (Out::Redriven(n), _) if *n > 0 => "redrive moved",
        _ => return None,
    })
}

/// A command as the model applies it, given the log index.
type ModelOp = Box<dyn FnOnce(&mut Model, u64) -> Out>;

/// The implementation, the model, and what the test observed of the results.
struct Run {
    sut: Harness,
    model: Model,
    /// Every delivery seen: (topic, message id, attempt), for picking receipts.
    deliveries: Vec<(String, String, u32)>,
    /// Every message id a publish stored.
    published: BTreeSet<String>,
    /// Deadline of each message's latest delivery, from results alone.
    held: BTreeMap<String, u64>,
    /// How often each rule was reached (see [`RULES`]).
    reached: BTreeMap<&'static str, u64>,
    /// The message ids of the AckBatch being applied, in receipt order.
    batch_ids: Vec<String>,
}

/// The rules a useful sequence reaches (results classified by [`rule_reached`], plus the
/// model's events); `generated_sequences_reach_every_rule` checks that the generators still
/// reach them all, so the property cannot quietly become vacuous.
const RULES: [&str; 17] = [
    "publish",
    "publish deduplicated",
    "publish over a retention limit",
    "publish invalid",
    "delivery",
    "redelivery after a timeout or nack",
    "ordering key held a message back",
    "ack",
    "ack batch",
    "stale receipt",
    "nack",
    "max_deliveries_nacked",
    "max_deliveries_timed_out",
    "requeue reported a lapse",
    "redrive moved",
    "topic in use as a dead-letter topic",
    "aged out",
];

impl Run {
    fn new() -> Self {
        Run {
            sut: Harness::at(1_000),
            model: Model::default(),
            deliveries: vec![],
            published: BTreeSet::new(),
            held: BTreeMap::new(),
            reached: BTreeMap::new(),
            batch_ids: Vec::new(),
        }
    }

    fn reach(&mut self, rule: &'static str) {
        *self.reached.entry(rule).or_default() += 1;
    }

    /// The receipt a step names: one of the last few deliveries seen, varied by `mode`.
    fn receipt(&self, pick: usize, mode: Mode) -> (String, String, u32) {
        let recent = self.deliveries.len().clamp(1, 4);
        let at = self.deliveries.len().checked_sub(1 + pick % recent);
        let Some((topic, id, attempt)) = at.and_then(|i| self.deliveries.get(i)).cloned() else {
            return ("a".into(), "no-such-message".into(), 1);
        };
        let attempt = match mode {
            Mode::Exact => attempt,
            Mode::Latest => 0,
            Mode::Older => attempt.saturating_sub(1),
            Mode::Newer => attempt + 1,
        };
        (topic, id, attempt)
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        let name = |t: usize| TOPICS[t];
        let (op, model_op): (Op, ModelOp) = match step.clone() {
            Step::Sleep(ms, tick) => {
                self.sut.sleep(ms);
                match tick {
                    Tick::Nothing => return Ok(()),
                    Tick::Requeue(t) => return self.step(&Step::Requeue(t)),
                    Tick::Advance => {}
                }
                let report = self.sut.state.advance(self.sut.now);
                let requeued = self.model.advance(self.sut.now);
                prop_assert_eq!(report.requeued, requeued);
                return Ok(());
            }
            Step::SnapshotRestore => {
                let bytes = self.sut.state.snapshot().encode_to_vec();
                let decoded = ipb::QueueSnapshot::decode(bytes.as_slice())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let restored =
                    QueueState::restore(decoded).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&restored, &self.sut.state);
                self.sut.state = restored;
                return Ok(());
            }
            Step::Publish(t, auto, entries) => (
                publish_with(
                    name(t),
                    auto,
                    entries.iter().map(GenEntry::to_proto).collect(),
                ),
                Box::new(move |m, index| m.publish(index, name(t), auto, &entries)),
            ),
            Step::Deliver(t, n, v) => (
                deliver(name(t), n, v),
                Box::new(move |m, _| m.deliver(name(t), n, v)),
            ),
            Step::Ack(pick, mode) => {
                let (t, id, att) = self.receipt(pick, mode);
                (ack(&t, &id, att), Box::new(move |m, _| m.ack(&t, &id, att)))
            }
            Step::AckBatch(picks) => {
                let receipts: Vec<(String, String, u32)> =
                    picks.into_iter().map(|(p, m)| self.receipt(p, m)).collect();
                let topic = receipts[0].0.clone();
                let pairs: Vec<(String, u32)> =
                    receipts.into_iter().map(|(_, id, att)| (id, att)).collect();
                self.batch_ids = pairs.iter().map(|(id, _)| id.clone()).collect();
                let refs: Vec<(&str, u32)> =
                    pairs.iter().map(|(id, a)| (id.as_str(), *a)).collect();
                (
                    ack_batch(&topic, &refs),
                    Box::new(move |m, _| m.ack_batch(&topic, &pairs)),
                )
            }
            Step::Nack(pick, mode, delay) => {
                let (t, id, att) = self.receipt(pick, mode);
                (
                    nack(&t, &id, att, delay),
                    Box::new(move |m, _| m.nack(&t, &id, att, delay)),
                )
            }
            Step::Extend(pick, mode, timeout) => {
                let (t, id, att) = self.receipt(pick, mode);
                (
                    extend(&t, &id, att, timeout),
                    Box::new(move |m, _| m.extend(&t, &id, att, timeout)),
                )
            }
            Step::Requeue(t) => (requeue(name(t)), Box::new(move |m, _| m.requeue(name(t)))),
            Step::Redrive(f, to, max) => (
                redrive(name(f), to.map_or("", name), max),
                Box::new(move |m, _| m.redrive(name(f), to.map(name), max)),
            ),
            Step::Purge(t) => (purge(name(t)), Box::new(move |m, _| m.purge(name(t)))),
            Step::Create(t) => (
                create(name(t), menu(t)),
                Box::new(move |m, _| m.create(name(t), menu(t))),
            ),
            Step::Delete(t) => (delete(name(t)), Box::new(move |m, _| m.delete(name(t)))),
        };
        let receipt_id = match &op {
            Op::Ack(c) => c.receipt.as_ref().map(|r| r.message_id.clone()),
            Op::Nack(c) => c.receipt.as_ref().map(|r| r.message_id.clone()),
            Op::ExtendVisibility(c) => c.receipt.as_ref().map(|r| r.message_id.clone()),
            _ => None,
        };
        let got = observe(self.sut.apply(op));
        let want = self.model.apply(self.sut.index, self.sut.now, model_op);
        prop_assert_eq!(&got, &want, "step {:?}", step);
        self.observe_result(&got, step, receipt_id)
    }

    /// Records what a result says, checking that nothing is delivered while still held.
    fn observe_result(
        &mut self,
        got: &Out,
        step: &Step,
        receipt_id: Option<String>,
    ) -> Result<(), TestCaseError> {
        let now = self.sut.state.clock_unix_ms();
        if let Some(rule) = rule_reached(got, step) {
            self.reach(rule);
        }
        match (got, step) {
            (Out::Published(results), _) => {
                for (id, dedup) in results {
                    if !dedup {
                        prop_assert!(self.published.insert(id.clone()), "id {} reused", id);
                    }
                }
            }
            (Out::Delivered(seen), Step::Deliver(t, ..)) => {
                for s in seen {
                    let held = self.held.get(&s.id).copied().unwrap_or(0);
                    prop_assert!(
                        held <= now,
                        "{} delivered at {} while held until {}",
                        s.id,
                        now,
                        held
                    );
                    self.held.insert(s.id.clone(), s.visible_again);
                    self.deliveries
                        .push((TOPICS[*t].into(), s.id.clone(), s.attempt));
                }
            }
            (Out::Extended(deadline), _) => {
                self.held.extend(receipt_id.map(|id| (id, *deadline)));
            }
            (Out::Acked | Out::Nacked(_), _) => {
                if let Some(id) = receipt_id {
                    self.held.remove(&id);
                }
            }
            (Out::AckedBatch(outcomes), Step::AckBatch(_)) => {
                for (id, outcome) in self.batch_ids.drain(..).zip(outcomes) {
                    if outcome.is_none() {
                        self.held.remove(&id);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Compares everything observable, then checks the invariants.
    fn check(&mut self) -> Result<(), TestCaseError> {
        let state = &self.sut.state;
        let (topics, _) = state
            .list_topics("", 0, "")
            .map_err(|e| TestCaseError::fail(e.message))?;
        let mut model_topics: Vec<_> = self.model.topics.iter().collect();
        model_topics.sort_by(|a, b| a.name.cmp(&b.name));
        let names = |ts: &[ipb::QueueTopic]| ts.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        let model_names: Vec<_> = model_topics.iter().map(|t| t.name.clone()).collect();
        prop_assert_eq!(names(&topics), model_names);
        prop_assert_eq!(state.next_deadline(), self.model.next_deadline());
        prop_assert!(
            state
                .next_deadline()
                .is_none_or(|d| d > state.clock_unix_ms())
        );

        let mut live: BTreeMap<String, usize> = BTreeMap::new();
        let mut held_back = false;
        for (topic, mt) in topics.iter().zip(model_topics) {
            let ti = self.model.find(&mt.name).unwrap();
            prop_assert_eq!(topic.settings.as_ref(), Some(&mt.s));
            prop_assert_eq!(topic.created_unix_ms, mt.created);
            prop_assert_eq!(state.stats(&topic.name), Some(self.model.stats(ti)));
            let messages: Vec<_> = state.messages(&topic.name).unwrap().collect();
            let got: Vec<_> = messages
                .iter()
                .map(|m| (m.id().to_string(), m.status(), m.delivery_attempt()))
                .collect();
            let want: Vec<_> = mt
                .msgs
                .iter()
                .map(|m| (m.id.clone(), m.status(self.model.now), m.attempts))
                .collect();
            prop_assert_eq!(got, want, "messages of {}", topic.name);

            // At most one in-flight message per ordering key.
            let mut flying = BTreeSet::new();
            for m in &messages {
                if matches!(m.status(), Status::InFlight { .. }) && !m.ordering_key().is_empty() {
                    prop_assert!(
                        flying.insert(m.ordering_key()),
                        "two messages of key {} in flight in {}",
                        m.ordering_key(),
                        topic.name
                    );
                }
            }
            let visible = messages.iter().filter(|m| m.status() == Status::Visible);
            if visible.count() > state.ready_count(&topic.name).unwrap_or(0) {
                held_back = true;
            }
            for m in messages {
                *live.entry(m.id().to_string()).or_default() += 1;
            }
        }

        // Conservation: each published message is in exactly one topic or gone for a reason.
        for (id, n) in &live {
            prop_assert_eq!(*n, 1, "{} is in {} topics", id, n);
            prop_assert!(self.published.contains(id), "{} was never published", id);
            prop_assert!(!self.model.gone.contains_key(id), "{} is back", id);
        }
        for id in &self.published {
            prop_assert!(
                live.contains_key(id) || self.model.gone.contains_key(id),
                "{} was lost",
                id
            );
        }

        // Snapshot round trip (which also proves the indexes).
        let restored = QueueState::restore(state.snapshot())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&restored, state);
        if held_back {
            self.reach("ordering key held a message back");
        }
        Ok(())
    }
}

impl Model {
    /// Applies one command: transitions due before it, the command, then any it made due.
    fn apply(&mut self, index: u64, now: u64, op: ModelOp) -> Out {
        let requeued = self.advance(now);
        self.requeued = requeued;
        let out = op(self, index);
        self.advance(now);
        out
    }

    fn requeue(&mut self, name: &str) -> Out {
        if self.find(name).is_none() {
            return Out::Err(Code::NotFound);
        }
        Out::Requeued(self.requeued.get(name).copied().unwrap_or(0))
    }
}

proptest! {
    // 1 000 sequences take about a second in a dev build; PROPTEST_CASES overrides.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_queue_matches_the_reference_model_and_never_loses_a_message(
        steps in vec(gen_step(), 1..120)
    ) {
        let mut run = Run::new();
        let setup = (0..3).map(Step::Create);
        for step in setup.chain(steps) {
            run.step(&step)?;
            run.check()?;
        }
    }
}

#[test]
fn generated_sequences_reach_every_rule() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut reached: BTreeMap<&str, u64> = BTreeMap::new();
    for _ in 0..64 {
        let steps = vec(gen_step(), 1..120)
            .new_tree(&mut runner)
            .expect("a sequence")
            .current();
        let mut run = Run::new();
        for step in (0..3).map(Step::Create).chain(steps) {
            run.step(&step).expect("matches the model");
            run.check().expect("invariants hold");
        }
        for (rule, n) in run.reached.into_iter().chain(run.model.events) {
            *reached.entry(rule).or_default() += n;
        }
    }
    let missing: Vec<_> = RULES.iter().filter(|r| !reached.contains_key(*r)).collect();
    assert!(
        missing.is_empty(),
        "never reached: {missing:?} (reached: {reached:?})"
    );
}
