//! One stored message and where it is in its life.
//!
//! A message is in exactly one [`Status`] at a time, in exactly one topic. It leaves the state
//! only by being acknowledged, dead-lettered without a dead-letter topic, purged, deleted with
//! its topic, or aged out by retention: the property tests hold the state to that ledger.

use std::collections::BTreeMap;

use bytes::Bytes;
use sync_proto::internal::v1 as ipb;

/// Attribute naming the topic a dead-lettered message came from (documented in queue.proto);
/// Redrive without a destination sends the message back there.
pub const DEAD_LETTER_SOURCE: &str = "sync.dead_letter.source";
/// Attribute holding a dead-lettered message's delivery count, in decimal (documented in
/// queue.proto).
pub const DEAD_LETTER_ATTEMPTS: &str = "sync.dead_letter.attempts";
/// Attribute saying why a message was dead-lettered: one of the `REASON_*` values.
pub const DEAD_LETTER_REASON: &str = "sync.dead_letter.reason";
/// Reason: the last allowed delivery's visibility timeout lapsed.
pub const REASON_TIMED_OUT: &str = "max_deliveries_timed_out";
/// Reason: the last allowed delivery was given back with Nack.
pub const REASON_NACKED: &str = "max_deliveries_nacked";

/// Where a message is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Deliverable now (unless an earlier message of its ordering key is still in the topic).
    Visible,
    /// Not deliverable before `until` (a publish or nack delay).
    Delayed {
        /// When the delay ends (leader's clock).
        until: u64,
    },
    /// Delivered and not yet acknowledged; visible again at `deadline` unless extended.
    InFlight {
        /// When the visibility timeout ends (leader's clock).
        deadline: u64,
    },
}

impl Status {
    /// The status and its time, as a snapshot stores them.
    pub fn to_proto(self) -> (ipb::QueueMessageStatus, u64) {
        match self {
            Status::Visible => (ipb::QueueMessageStatus::Visible, 0),
            Status::Delayed { until } => (ipb::QueueMessageStatus::Delayed, until),
            Status::InFlight { deadline } => (ipb::QueueMessageStatus::InFlight, deadline),
        }
    }

    /// The status a snapshot stored, or None for an unknown code.
    pub fn from_proto(code: i32, until: u64) -> Option<Status> {
        match ipb::QueueMessageStatus::try_from(code).ok()? {
            ipb::QueueMessageStatus::Visible => Some(Status::Visible),
            ipb::QueueMessageStatus::Delayed => Some(Status::Delayed { until }),
            ipb::QueueMessageStatus::InFlight => Some(Status::InFlight { deadline: until }),
            ipb::QueueMessageStatus::Unspecified => None,
        }
    }
}

/// A message held by a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Unique across all topics and never reused: derived from the publish entry's log index.
    pub(super) id: String,
    /// The body.
    pub(super) payload: Bytes,
    /// Application attributes plus the server's `sync.` ones, in key order (a BTreeMap so every
    /// replica encodes them alike).
    pub(super) attributes: BTreeMap<String, String>,
    /// Ordering key; empty for none.
    pub(super) ordering_key: String,
    /// Publish time; retention by age counts from it, also after dead-lettering and redrive.
    pub(super) publish_ms: u64,
    /// Deliveries in the current topic; the receipt of the latest one is `(id, attempts)`.
    pub(super) attempts: u32,
    /// When it was first delivered in the current topic.
    pub(super) first_delivery_ms: Option<u64>,
    /// The consumer tag of the latest delivery (for a subscriber's credit window).
    pub(super) consumer_tag: String,
    /// Where it is in its life.
    pub(super) status: Status,
}

impl Message {
    /// The message's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The body.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Attributes in key order.
    pub fn attributes(&self) -> &BTreeMap<String, String> {
        &self.attributes
    }

    /// Ordering key; empty for none.
    pub fn ordering_key(&self) -> &str {
        &self.ordering_key
    }

    /// Publish time (leader's clock).
    pub fn publish_unix_ms(&self) -> u64 {
        self.publish_ms
    }

    /// Deliveries so far in its current topic.
    pub fn delivery_attempt(&self) -> u32 {
        self.attempts
    }

    /// When it was first delivered in its current topic.
    pub fn first_delivery_unix_ms(&self) -> Option<u64> {
        self.first_delivery_ms
    }

    /// The consumer tag of its latest delivery.
    pub fn consumer_tag(&self) -> &str {
        &self.consumer_tag
    }

    /// Where it is in its life.
    pub fn status(&self) -> Status {
        self.status
    }

    /// Bytes counted against retention and size limits: payload, attribute keys and values, and
    /// ordering key (queue.proto's definition).
    pub fn size(&self) -> u64 {
        message_size(&self.payload, &self.attributes, &self.ordering_key)
    }

    /// The message's attributes as records, in key order.
    pub fn attribute_records(&self) -> Vec<ipb::QueueAttribute> {
        self.attributes
            .iter()
            .map(|(key, value)| ipb::QueueAttribute {
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    }
}

/// The size queue.proto defines for a message with these parts.
pub fn message_size<'a>(
    payload: &[u8],
    attributes: impl IntoIterator<Item = (&'a String, &'a String)>,
    ordering_key: &str,
) -> u64 {
    let attributes: usize = attributes.into_iter().map(|(k, v)| k.len() + v.len()).sum();
    (payload.len() + attributes + ordering_key.len()) as u64
}
