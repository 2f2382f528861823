//! Consuming: Deliver (the owner's Consume and Subscribe), Ack, Nack, ExtendVisibility and
//! RequeueExpired.
//!
//! A delivery is named by its receipt, `(message id, attempt)`. A receipt is valid while the
//! message is still in the topic and has not been delivered again: its attempt equals the
//! message's attempt count (or is 0, meaning "the latest delivery"). That includes a delivery
//! whose timeout lapsed but whose message nobody received since, which may still be
//! acknowledged, nacked or extended (queue.proto). Everything else is refused without a change:
//! a delivery superseded by a newer one, or a message never delivered, with FAILED_PRECONDITION
//! (so a slow consumer cannot act on a message someone else now holds); a message no longer in
//! the topic with NOT_FOUND.

use sync_proto::internal::v1 as ipb;

use super::error::QueueError;
use super::limits::{
    MAX_ACK_BATCH, MAX_CONSUMER_TAG_BYTES, MAX_DELIVER_BYTES, MAX_DELIVER_MESSAGES,
    MAX_NACK_DELAY_MS, MAX_VISIBILITY_TIMEOUT_MS, check_at_most, check_len, fill_settings,
    validate_topic_name,
};
use super::message::{Message, REASON_NACKED, Status};
use super::topic::Topic;
use super::{Advanced, QueueState};

/// The delivery record of a message just marked delivered.
fn delivery_record(msg: &Message, visible_again: u64) -> ipb::QueueDelivery {
    ipb::QueueDelivery {
        message_id: msg.id.clone(),
        payload: msg.payload.clone(),
        attributes: msg.attribute_records(),
        ordering_key: msg.ordering_key.clone(),
        delivery_attempt: msg.attempts,
        publish_unix_ms: msg.publish_ms,
        first_delivery_unix_ms: msg.first_delivery_ms.unwrap_or_default(),
        visible_again_unix_ms: visible_again,
    }
}

/// Checks an AckBatch's shape before anything is proposed (and again when it is applied): 1 to
/// [`MAX_ACK_BATCH`] receipts, each naming a message.
pub fn check_ack_batch(receipts: &[ipb::QueueReceipt]) -> Result<(), QueueError> {
    if receipts.is_empty() {
        return Err(QueueError::invalid(format!(
            "the batch has no receipts; send 1 to {MAX_ACK_BATCH}"
        )));
    }
    check_at_most(
        "the number of receipts in the batch",
        receipts.len() as u64,
        MAX_ACK_BATCH as u64,
    )?;
    match receipts.iter().position(|r| r.message_id.is_empty()) {
        Some(i) => Err(QueueError::invalid(format!(
            "receipts[{i}].message_id must not be empty"
        ))),
        None => Ok(()),
    }
}

/// The `seq` of the message a receipt names, if the receipt is still valid (module docs).
fn resolve(topic: &Topic, receipt: Option<&ipb::QueueReceipt>) -> Result<u64, QueueError> {
    let Some(receipt) = receipt else {
        return Err(QueueError::invalid(
            "receipt is required: pass the receipt of the delivery",
        ));
    };
    if receipt.message_id.is_empty() {
        return Err(QueueError::invalid("receipt.message_id must not be empty"));
    }
    let id = &receipt.message_id;
    let Some((seq, msg)) = topic.seq_of(id).and_then(|s| Some((s, topic.get(s)?))) else {
        return Err(QueueError::not_found(format!(
            "message `{id}` is not in topic `{}`: it was acknowledged, dead-lettered, purged or \
             expired (or never existed)",
            topic.name
        )));
    };
    let latest = msg.attempts;
    if latest == 0 {
        return Err(QueueError::precondition(format!(
            "message `{id}` has not been delivered yet, so there is no delivery to act on; \
             consume it first"
        )));
    }
    let asked = receipt.delivery_attempt;
    if asked != 0 && asked != latest {
        let why = if asked < latest {
            format!("it has been delivered again since (delivery {latest})")
        } else {
            format!("it has been delivered only {latest} time(s)")
        };
        return Err(QueueError::precondition(format!(
            "receipt names delivery {asked} of message `{id}`, but {why}; act only on the \
             latest delivery you received"
        )));
    }
    Ok(seq)
}

impl QueueState {
    /// The topic and `seq` a receipt names, after checking the topic name.
    fn receipt_target(
        &self,
        topic: &str,
        receipt: Option<&ipb::QueueReceipt>,
    ) -> Result<u64, QueueError> {
        resolve(self.existing("topic", topic)?, receipt)
    }

    /// Delivers up to `max_messages` deliverable messages in delivery order, each in flight until
    /// now plus the visibility timeout.
    pub(super) fn deliver(
        &mut self,
        now: u64,
        cmd: &ipb::QueueDeliver,
    ) -> Result<ipb::QueueDeliverResult, QueueError> {
        validate_topic_name("topic", &cmd.topic)?;
        check_at_most(
            "max_messages",
            u64::from(cmd.max_messages),
            u64::from(MAX_DELIVER_MESSAGES),
        )?;
        check_at_most(
            "visibility_timeout_ms",
            cmd.visibility_timeout_ms,
            MAX_VISIBILITY_TIMEOUT_MS,
        )?;
        check_len("consumer_tag", &cmd.consumer_tag, MAX_CONSUMER_TAG_BYTES)?;
        let Some(topic) = self.topics.get(&cmd.topic) else {
            if !cmd.auto_create {
                return Err(QueueError::no_topic(&cmd.topic));
            }
            self.add_topic(&cmd.topic, fill_settings(&cmd.topic, None)?, now);
            return Ok(ipb::QueueDeliverResult::default());
        };
        let max = cmd.max_messages.max(1) as usize;
        let timeout = match cmd.visibility_timeout_ms {
            0 => topic.settings.visibility_timeout_ms,
            t => t,
        };
        let deadline = now.saturating_add(timeout);
        let deliveries = self
            .update(&cmd.topic, |t| {
                let mut picked = Vec::new();
                let mut bytes = 0u64;
                for seq in t.ready_seqs() {
                    let size = t.get(seq).map_or(0, Message::size);
                    if picked.len() == max
                        || (!picked.is_empty() && bytes + size > MAX_DELIVER_BYTES)
                    {
                        break;
                    }
                    bytes += size;
                    picked.push(seq);
                }
                picked
                    .into_iter()
                    .filter_map(|seq| {
                        t.mark_delivered(seq, now, deadline, &cmd.consumer_tag)
                            .map(|m| delivery_record(m, deadline))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(ipb::QueueDeliverResult { deliveries })
    }

    /// Acknowledges a delivery: the message is deleted.
    pub(super) fn ack(&mut self, cmd: &ipb::QueueAck) -> Result<ipb::QueueAckResult, QueueError> {
        let seq = self.receipt_target(&cmd.topic, cmd.receipt.as_ref())?;
        self.update(&cmd.topic, |t| {
            t.remove(seq);
            t.totals.acked += 1;
        });
        Ok(ipb::QueueAckResult {})
    }

    /// Acknowledges each receipt on its own, in order, as separate Acks would: one that is
    /// refused (stale, unknown) changes nothing and does not stop the others. Refused as a whole
    /// only for an unknown topic or a malformed batch, so a retried batch (same request header)
    /// gets the outcomes remembered with the first attempt rather than new ones.
    pub(super) fn ack_batch(
        &mut self,
        cmd: &ipb::QueueAckBatch,
    ) -> Result<ipb::QueueAckBatchResult, QueueError> {
        check_ack_batch(&cmd.receipts)?;
        self.existing("topic", &cmd.topic)?;
        let outcomes = cmd
            .receipts
            .iter()
            .map(|receipt| {
                let ack = ipb::QueueAck {
                    topic: cmd.topic.clone(),
                    receipt: Some(receipt.clone()),
                };
                ipb::QueueAckOutcome {
                    error: self.ack(&ack).err().map(|e| e.to_proto()),
                }
            })
            .collect();
        Ok(ipb::QueueAckBatchResult { outcomes })
    }

    /// Gives a delivery back: visible again after the delay, or dead-lettered if it was the last
    /// delivery `max_deliveries` allows (a nacked delivery counts).
    pub(super) fn nack(
        &mut self,
        now: u64,
        cmd: &ipb::QueueNack,
    ) -> Result<ipb::QueueNackResult, QueueError> {
        check_at_most("delay_ms", cmd.delay_ms, MAX_NACK_DELAY_MS)?;
        let seq = self.receipt_target(&cmd.topic, cmd.receipt.as_ref())?;
        let exhausted = self
            .update(&cmd.topic, |t| {
                t.totals.nacked += 1;
                let max = t.settings.max_deliveries;
                max > 0 && t.get(seq).is_some_and(|m| m.attempts >= max)
            })
            .unwrap_or(false);
        if exhausted && self.dead_letter(&cmd.topic, seq, REASON_NACKED) {
            return Ok(ipb::QueueNackResult {
                dead_lettered: true,
            });
        }
        let status = match cmd.delay_ms {
            0 => Status::Visible,
            delay => Status::Delayed {
                until: now.saturating_add(delay),
            },
        };
        self.update(&cmd.topic, |t| t.set_status(seq, status));
        Ok(ipb::QueueNackResult {
            dead_lettered: false,
        })
    }

    /// Sets a delivery's deadline to now plus the timeout; a lapsed delivery whose message was
    /// not delivered again becomes in flight again under the same receipt.
    pub(super) fn extend_visibility(
        &mut self,
        now: u64,
        cmd: &ipb::QueueExtendVisibility,
    ) -> Result<ipb::QueueExtendVisibilityResult, QueueError> {
        if cmd.visibility_timeout_ms == 0 {
            return Err(QueueError::invalid(
                "visibility_timeout_ms must be at least 1; to give the message back, use Nack",
            ));
        }
        check_at_most(
            "visibility_timeout_ms",
            cmd.visibility_timeout_ms,
            MAX_VISIBILITY_TIMEOUT_MS,
        )?;
        let seq = self.receipt_target(&cmd.topic, cmd.receipt.as_ref())?;
        let deadline = now.saturating_add(cmd.visibility_timeout_ms);
        self.update(&cmd.topic, |t| {
            t.set_status(seq, Status::InFlight { deadline })
        });
        Ok(ipb::QueueExtendVisibilityResult {
            visible_again_unix_ms: deadline,
        })
    }

    /// Reports the topic's deliveries that lapsed since the previous entry. The transitions
    /// themselves already ran in [`QueueState::advance`] before this command, as they do before
    /// every command; the count is what that run did for this topic.
    pub(super) fn requeue_expired(
        &mut self,
        cmd: &ipb::QueueRequeueExpired,
        report: &Advanced,
    ) -> Result<ipb::QueueRequeueExpiredResult, QueueError> {
        self.existing("topic", &cmd.topic)?;
        Ok(ipb::QueueRequeueExpiredResult {
            requeued: report.requeued.get(&cmd.topic).copied().unwrap_or(0),
        })
    }
}
