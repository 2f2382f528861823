//! Command builders and a harness that numbers log entries, shared by the unit tests and the
//! model-based property test.

use bytes::Bytes;
use sync_proto::internal::v1 as ipb;

use super::{QueueError, QueueState};

pub use ipb::queue_command::Op;
pub use ipb::queue_result::Result as R;

/// A topic's settings with every field given (no defaults involved).
#[allow(clippy::too_many_arguments)]
pub fn settings(
    visibility_timeout_ms: u64,
    max_deliveries: u32,
    dead_letter_topic: &str,
    retention_max_messages: u64,
    retention_max_bytes: u64,
    retention_max_age_ms: u64,
    max_message_bytes: u64,
    dedup_window_ms: u64,
) -> ipb::QueueTopicSettings {
    ipb::QueueTopicSettings {
        visibility_timeout_ms,
        max_deliveries,
        dead_letter_topic: dead_letter_topic.into(),
        retention_max_messages,
        retention_max_bytes,
        retention_max_age_ms,
        max_message_bytes,
        dedup_window_ms,
    }
}

/// CreateTopic.
pub fn create(name: &str, settings: Option<ipb::QueueTopicSettings>) -> Op {
    Op::CreateTopic(ipb::QueueCreateTopic {
        name: name.into(),
        settings,
    })
}

/// DeleteTopic.
pub fn delete(name: &str) -> Op {
    Op::DeleteTopic(ipb::QueueDeleteTopic { name: name.into() })
}

/// A publish entry with only a payload.
pub fn entry(payload: &str) -> ipb::QueuePublishEntry {
    ipb::QueuePublishEntry {
        payload: Bytes::from(payload.to_string()),
        ..Default::default()
    }
}

/// An entry with an ordering key.
pub fn keyed(payload: &str, key: &str) -> ipb::QueuePublishEntry {
    ipb::QueuePublishEntry {
        ordering_key: key.into(),
        ..entry(payload)
    }
}

/// An entry with a dedup_id.
pub fn deduped(payload: &str, dedup_id: &str) -> ipb::QueuePublishEntry {
    ipb::QueuePublishEntry {
        dedup_id: dedup_id.into(),
        ..entry(payload)
    }
}

/// An entry published with a delay.
pub fn delayed(payload: &str, delay_ms: u64) -> ipb::QueuePublishEntry {
    ipb::QueuePublishEntry {
        delay_ms,
        ..entry(payload)
    }
}

/// Publish of `entries` (auto-create off).
pub fn publish(topic: &str, entries: Vec<ipb::QueuePublishEntry>) -> Op {
    publish_with(topic, false, entries)
}

/// Publish with an explicit auto-create flag.
pub fn publish_with(topic: &str, auto_create: bool, entries: Vec<ipb::QueuePublishEntry>) -> Op {
    Op::Publish(ipb::QueuePublish {
        topic: topic.into(),
        auto_create,
        entries,
    })
}

/// Deliver (auto-create off, no consumer tag).
pub fn deliver(topic: &str, max_messages: u32, visibility_timeout_ms: u64) -> Op {
    Op::Deliver(ipb::QueueDeliver {
        topic: topic.into(),
        auto_create: false,
        max_messages,
        visibility_timeout_ms,
        consumer_tag: String::new(),
    })
}

/// A receipt.
pub fn receipt(id: &str, attempt: u32) -> Option<ipb::QueueReceipt> {
    Some(ipb::QueueReceipt {
        message_id: id.into(),
        delivery_attempt: attempt,
    })
}

/// Ack.
pub fn ack(topic: &str, id: &str, attempt: u32) -> Op {
    Op::Ack(ipb::QueueAck {
        topic: topic.into(),
        receipt: receipt(id, attempt),
    })
}

/// AckBatch of `(message id, attempt)` receipts.
pub fn ack_batch(topic: &str, receipts: &[(&str, u32)]) -> Op {
    Op::AckBatch(ipb::QueueAckBatch {
        topic: topic.into(),
        receipts: receipts
            .iter()
            .filter_map(|&(id, attempt)| receipt(id, attempt))
            .collect(),
    })
}

/// Nack.
pub fn nack(topic: &str, id: &str, attempt: u32, delay_ms: u64) -> Op {
    Op::Nack(ipb::QueueNack {
        topic: topic.into(),
        receipt: receipt(id, attempt),
        delay_ms,
    })
}

/// ExtendVisibility.
pub fn extend(topic: &str, id: &str, attempt: u32, visibility_timeout_ms: u64) -> Op {
    Op::ExtendVisibility(ipb::QueueExtendVisibility {
        topic: topic.into(),
        receipt: receipt(id, attempt),
        visibility_timeout_ms,
    })
}

/// RequeueExpired.
pub fn requeue(topic: &str) -> Op {
    Op::RequeueExpired(ipb::QueueRequeueExpired {
        topic: topic.into(),
    })
}

/// Redrive.
pub fn redrive(from: &str, to: &str, max_messages: u64) -> Op {
    Op::Redrive(ipb::QueueRedrive {
        dead_letter_topic: from.into(),
        destination_topic: to.into(),
        max_messages,
    })
}

/// Purge.
pub fn purge(topic: &str) -> Op {
    Op::Purge(ipb::QueuePurge {
        topic: topic.into(),
    })
}

/// A result as a Rust `Result`, the error carrying its code and message.
pub fn outcome(result: ipb::QueueResult) -> Result<R, QueueError> {
    match result.result {
        Some(R::Error(e)) => Err(QueueError {
            code: ipb::QueueErrorCode::try_from(e.code).unwrap_or_default(),
            message: e.message,
        }),
        Some(r) => Ok(r),
        None => Err(QueueError::invalid("the result is empty")),
    }
}

/// A state and the log position of the next command: each apply takes the next index.
#[derive(Clone, Debug, Default)]
pub struct Harness {
    /// The state under test.
    pub state: QueueState,
    /// Index of the last applied command.
    pub index: u64,
    /// Leader time of the next command.
    pub now: u64,
}

impl Harness {
    /// A harness at time `now`.
    pub fn at(now: u64) -> Self {
        Harness {
            now,
            ..Default::default()
        }
    }

    /// Applies `op` as the next log entry.
    pub fn apply(&mut self, op: Op) -> Result<R, QueueError> {
        self.index += 1;
        let cmd = ipb::QueueCommand { op: Some(op) };
        outcome(self.state.apply(self.index, self.now, &cmd))
    }

    /// Applies `op`, which must succeed.
    #[track_caller]
    pub fn ok(&mut self, op: Op) -> R {
        match self.apply(op) {
            Ok(r) => r,
            Err(e) => panic!("refused: {:?}: {}", e.code, e.message),
        }
    }

    /// Applies `op`, which must fail; returns the error code.
    #[track_caller]
    pub fn err(&mut self, op: Op) -> ipb::QueueErrorCode {
        match self.apply(op) {
            Ok(r) => panic!("expected a refusal, got {r:?}"),
            Err(e) => e.code,
        }
    }

    /// Publishes `entries`, which must succeed; returns the message ids.
    #[track_caller]
    pub fn publish(&mut self, topic: &str, entries: Vec<ipb::QueuePublishEntry>) -> Vec<String> {
        match self.ok(publish(topic, entries)) {
            R::Publish(p) => p.results.into_iter().map(|r| r.message_id).collect(),
            r => panic!("unexpected {r:?}"),
        }
    }

    /// Delivers, which must succeed; returns `(id, attempt)` of each delivery.
    #[track_caller]
    pub fn deliver(&mut self, topic: &str, max: u32, visibility_ms: u64) -> Vec<(String, u32)> {
        match self.ok(deliver(topic, max, visibility_ms)) {
            R::Deliver(d) => d
                .deliveries
                .into_iter()
                .map(|d| (d.message_id, d.delivery_attempt))
                .collect(),
            r => panic!("unexpected {r:?}"),
        }
    }

    /// Moves time forward by `ms`; the state sees it at the next apply.
    pub fn sleep(&mut self, ms: u64) {
        self.now += ms;
    }

    /// The topic's stats, which must exist.
    #[track_caller]
    pub fn stats(&self, topic: &str) -> ipb::QueueStats {
        self.state.stats(topic).expect("topic exists")
    }
}
