//! The queue part of a snapshot: every topic with its messages (including in-flight deadlines
//! and delivery attempts), dedup window and counters, and the queue's clock.
//!
//! Indexes are not stored: [`QueueState::restore`] rebuilds them by inserting the messages in
//! arrival order, so `restore(snapshot())` equal to the original state also proves the
//! incrementally maintained indexes right (see `topic.rs`).

use std::collections::BTreeSet;

use sync_proto::internal::v1 as ipb;

use super::QueueState;
use super::message::{Message, Status};
use super::topic::Topic;

/// Why a snapshot could not be restored: it was not written by [`QueueState::snapshot`] (or was
/// damaged). Restoring refuses rather than guess, since a guessed state would differ from the
/// other replicas'.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// A topic record has no topic or settings.
    #[error("snapshot topic record {0} has no topic or settings")]
    MissingTopic(usize),
    /// Two topic records share a name or an id.
    #[error("snapshot holds topic `{0}` (or its id) twice")]
    DuplicateTopic(String),
    /// A topic id is not below the next topic id (a new topic could reuse it).
    #[error("topic `{0}` has id {1}, not below the snapshot's next_topic_id {2}")]
    TopicId(String, u64, u64),
    /// A message has an unknown status.
    #[error("message `{id}` of topic `{topic}` has an unknown status {status}")]
    BadStatus {
        /// The topic.
        topic: String,
        /// The message.
        id: String,
        /// The stored status code.
        status: i32,
    },
    /// A message id appears twice, or messages are out of arrival order.
    #[error("message `{id}` of topic `{topic}` is repeated or out of order")]
    BadMessage {
        /// The topic.
        topic: String,
        /// The message.
        id: String,
    },
}

impl QueueState {
    /// The whole queue state as a snapshot record.
    pub fn snapshot(&self) -> ipb::QueueSnapshot {
        let topics = self
            .topics
            .values()
            .map(|t| ipb::QueueTopicRecord {
                id: t.id,
                topic: Some(t.to_proto()),
                next_seq: t.next_seq(),
                messages: t
                    .messages()
                    .map(|(seq, m)| message_record(seq, m))
                    .collect(),
                dedup: t
                    .dedup
                    .iter()
                    .map(|(dedup_id, e)| ipb::QueueDedupRecord {
                        dedup_id: dedup_id.clone(),
                        message_id: e.message_id.clone(),
                        expires_unix_ms: e.expires_ms,
                    })
                    .collect(),
                totals: Some(t.totals),
            })
            .collect();
        ipb::QueueSnapshot {
            clock_unix_ms: self.clock_ms,
            next_topic_id: self.next_topic_id,
            topics,
            last_index: self.last_index,
        }
    }

    /// Rebuilds the state a snapshot describes.
    pub fn restore(snapshot: ipb::QueueSnapshot) -> Result<QueueState, RestoreError> {
        let mut state = QueueState {
            clock_ms: snapshot.clock_unix_ms,
            next_topic_id: snapshot.next_topic_id,
            last_index: snapshot.last_index,
            ..Default::default()
        };
        let mut ids = BTreeSet::new();
        for (i, record) in snapshot.topics.into_iter().enumerate() {
            let Some(ipb::QueueTopic {
                name,
                settings: Some(settings),
                created_unix_ms,
            }) = record.topic
            else {
                return Err(RestoreError::MissingTopic(i));
            };
            if state.topics.contains_key(&name) || state.names.contains_key(&record.id) {
                return Err(RestoreError::DuplicateTopic(name));
            }
            if record.id >= snapshot.next_topic_id {
                return Err(RestoreError::TopicId(
                    name,
                    record.id,
                    snapshot.next_topic_id,
                ));
            }
            let mut topic = Topic::new(record.id, name.clone(), settings, created_unix_ms);
            for m in record.messages {
                let Some(status) = Status::from_proto(m.status, m.status_until_unix_ms) else {
                    return Err(RestoreError::BadStatus {
                        topic: name,
                        id: m.id,
                        status: m.status,
                    });
                };
                let seq = m.seq;
                let msg = Message {
                    id: m.id,
                    payload: m.payload,
                    attributes: m.attributes.into_iter().map(|a| (a.key, a.value)).collect(),
                    ordering_key: m.ordering_key,
                    publish_ms: m.publish_unix_ms,
                    attempts: m.delivery_attempt,
                    first_delivery_ms: m.first_delivery_unix_ms,
                    consumer_tag: m.consumer_tag,
                    status,
                };
                let id = msg.id.clone();
                if !ids.insert(id.clone()) || !topic.insert_at(seq, msg) {
                    return Err(RestoreError::BadMessage { topic: name, id });
                }
            }
            if record.next_seq < topic.next_seq() {
                return Err(RestoreError::BadMessage {
                    topic: name,
                    id: "(next_seq)".into(),
                });
            }
            // `insert_at` moved `next_seq` past the last message; the record's may be further
            // (messages at the end were removed), and seqs must never be reused.
            topic.set_next_seq(record.next_seq);
            for d in record.dedup {
                topic
                    .dedup
                    .remember(d.dedup_id, d.message_id, d.expires_unix_ms);
            }
            topic.totals = record.totals.unwrap_or_default();
            state.names.insert(record.id, name.clone());
            if let Some(at) = topic.next_timer_at() {
                state.wakeups.insert((at, record.id));
            }
            state.topics.insert(name, topic);
        }
        Ok(state)
    }
}

/// A message as a snapshot stores it.
fn message_record(seq: u64, m: &Message) -> ipb::QueueMessageRecord {
    let (status, until) = m.status.to_proto();
    ipb::QueueMessageRecord {
        seq,
        id: m.id.clone(),
        payload: m.payload.clone(),
        attributes: m.attribute_records(),
        ordering_key: m.ordering_key.clone(),
        publish_unix_ms: m.publish_ms,
        delivery_attempt: m.attempts,
        first_delivery_unix_ms: m.first_delivery_ms,
        consumer_tag: m.consumer_tag.clone(),
        status: status as i32,
        status_until_unix_ms: until,
    }
}
