//! Dead letters: moving a message out of its topic after `max_deliveries`, and Redrive, which
//! moves dead letters back.
//!
//! A dead-lettered message keeps its id, payload, ordering key and publish time (so retention
//! by age still counts from the publish), and gains the attributes [`DEAD_LETTER_SOURCE`],
//! [`DEAD_LETTER_ATTEMPTS`] and [`DEAD_LETTER_REASON`]. Its delivery count starts again in the
//! dead-letter topic, which has its own `max_deliveries`. It arrives last in the dead-letter
//! topic's order.

use sync_proto::internal::v1 as ipb;

use super::QueueState;
use super::error::QueueError;
use super::limits::validate_topic_name;
use super::message::{
    DEAD_LETTER_ATTEMPTS, DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, Message, Status,
};

/// The message as it starts over in another topic: visible, never delivered there.
fn start_over(mut msg: Message) -> Message {
    msg.attempts = 0;
    msg.first_delivery_ms = None;
    msg.consumer_tag.clear();
    msg.status = Status::Visible;
    msg
}

impl QueueState {
    /// Dead-letters the message at `seq` of `source` for `reason`: moves it to the topic's
    /// dead-letter topic, or deletes it when the topic has none. Returns false, changing
    /// nothing, if the dead-letter topic is missing (DeleteTopic refuses to delete a topic in
    /// use, so this does not happen; the message stays rather than be lost).
    pub(super) fn dead_letter(&mut self, source: &str, seq: u64, reason: &str) -> bool {
        let Some(dlq) = self
            .topics
            .get(source)
            .map(|t| t.settings.dead_letter_topic.clone())
        else {
            return false;
        };
        if !dlq.is_empty() && !self.topics.contains_key(&dlq) {
            return false;
        }
        let removed = self.update(source, |t| {
            let msg = t.remove(seq)?;
            t.totals.dead_lettered += 1;
            Some(msg)
        });
        let Some(Some(msg)) = removed else {
            return false;
        };
        if dlq.is_empty() {
            return true;
        }
        let attempts = msg.attempts;
        let mut moved = start_over(msg);
        let extra = [
            (DEAD_LETTER_SOURCE, source.to_string()),
            (DEAD_LETTER_ATTEMPTS, attempts.to_string()),
            (DEAD_LETTER_REASON, reason.to_string()),
        ];
        for (key, value) in extra {
            moved.attributes.insert(key.to_string(), value);
        }
        self.update(&dlq, |t| t.insert(moved));
        true
    }

    /// Moves visible messages, oldest first, out of `dead_letter_topic` to `destination_topic`
    /// or to each message's source topic (messages without a live source stay). Stops with
    /// RESOURCE_EXHAUSTED at a destination's retention limit; the messages moved so far stay
    /// moved, as queue.proto documents.
    pub(super) fn redrive(
        &mut self,
        cmd: &ipb::QueueRedrive,
    ) -> Result<ipb::QueueRedriveResult, QueueError> {
        let from = cmd.dead_letter_topic.as_str();
        validate_topic_name("dead_letter_topic", from)?;
        let fixed_destination = !cmd.destination_topic.is_empty();
        if fixed_destination {
            validate_topic_name("destination_topic", &cmd.destination_topic)?;
            if cmd.destination_topic == from {
                return Err(QueueError::invalid(format!(
                    "destination_topic is `{from}`, the topic to move messages from; name another \
                     topic, or leave it empty to send each message back to its source"
                )));
            }
        }
        let source = self.existing("dead_letter_topic", from)?;
        if fixed_destination {
            self.existing("destination_topic", &cmd.destination_topic)?;
        }
        let limit = match cmd.max_messages {
            0 => u64::MAX,
            n => n,
        };
        // Decide the moves on the state as it is, then make them in order.
        let mut plan = Vec::new();
        for seq in source.visible_seqs() {
            if plan.len() as u64 == limit {
                break;
            }
            let Some(msg) = source.get(seq) else { continue };
            let to = if !fixed_destination {
                match msg.attributes.get(DEAD_LETTER_SOURCE) {
                    Some(to) if to != from && self.topics.contains_key(to) => to.clone(),
                    _ => continue,
                }
            } else {
                cmd.destination_topic.clone()
            };
            plan.push((seq, to));
        }
        let mut moved = 0u64;
        for (seq, to) in plan {
            let size = self
                .topics
                .get(from)
                .and_then(|t| t.get(seq))
                .map_or(0, Message::size);
            // Every planned destination exists (nothing deletes a topic during a command); the
            // check keeps a message from being taken out with nowhere to go regardless.
            let Some(dest) = self.topics.get(&to) else {
                continue;
            };
            if let Err(e) = dest.check_room(1, size) {
                return Err(QueueError::exhausted(format!(
                    "moved {moved} message(s), then stopped: {}; the rest stay in `{from}`, \
                     redrive again once there is room",
                    e.message
                )));
            }
            let taken = self.update(from, |t| {
                let msg = t.remove(seq)?;
                t.totals.redriven += 1;
                Some(msg)
            });
            if let Some(Some(msg)) = taken {
                self.update(&to, |t| t.insert(start_over(msg)));
                moved += 1;
            }
        }
        Ok(ipb::QueueRedriveResult { moved })
    }
}
