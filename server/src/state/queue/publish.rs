//! Publish and PublishBatch: one atomic command for 1 to [`MAX_PUBLISH_BATCH`] messages.
//!
//! Atomicity: every entry is checked (sizes, attributes, dedup, retention limits) before the
//! first one is stored, so a refused batch changes nothing, not even an auto-created topic.
//!
//! Message ids come from the log position of the publish, `{index:020}-{position:03}`: unique
//! across topics (a log index holds one command), never reused (indexes only grow), and sorting
//! in publish order. A message keeps its id when it is dead-lettered or redriven, which stays
//! unique because a message is in exactly one topic.

use std::collections::BTreeMap;

use sync_proto::internal::v1 as ipb;

use super::QueueState;
use super::error::QueueError;
use super::limits::{
    MAX_ATTRIBUTE_KEY_BYTES, MAX_ATTRIBUTES, MAX_DEDUP_ID_BYTES, MAX_MESSAGE_BYTES_LIMIT,
    MAX_ORDERING_KEY_BYTES, MAX_PUBLISH_BATCH, MAX_PUBLISH_BATCH_BYTES, MAX_PUBLISH_DELAY_MS,
    RESERVED_ATTRIBUTE_PREFIX, check_at_most, check_len, fill_settings, validate_topic_name,
};
use super::message::{Message, Status, message_size};

/// The id of the message published by entry `position` of the publish at log `index`.
pub fn message_id(index: u64, position: usize) -> String {
    format!("{index:020}-{position:03}")
}

/// An entry that passed its checks.
struct Checked<'a> {
    /// The entry as sent.
    entry: &'a ipb::QueuePublishEntry,
    /// Its attributes, keys unique, in key order.
    attributes: BTreeMap<String, String>,
    /// Its size, as counted against limits.
    size: u64,
}

/// Checks one entry against queue.proto's limits and the topic's max_message_bytes.
fn check_entry<'a>(
    position: usize,
    entry: &'a ipb::QueuePublishEntry,
    settings: &ipb::QueueTopicSettings,
) -> Result<Checked<'a>, QueueError> {
    let at = |e: QueueError| QueueError {
        message: format!("entry {position}: {}", e.message),
        ..e
    };
    check_len("dedup_id", &entry.dedup_id, MAX_DEDUP_ID_BYTES).map_err(at)?;
    check_len("ordering_key", &entry.ordering_key, MAX_ORDERING_KEY_BYTES).map_err(at)?;
    check_at_most("delay_ms", entry.delay_ms, MAX_PUBLISH_DELAY_MS).map_err(at)?;
    check_at_most(
        "the number of attributes",
        entry.attributes.len() as u64,
        MAX_ATTRIBUTES as u64,
    )
    .map_err(at)?;
    let mut attributes = BTreeMap::new();
    for a in &entry.attributes {
        if a.key.is_empty() {
            return Err(at(QueueError::invalid("an attribute key is empty")));
        }
        check_len("attribute key", &a.key, MAX_ATTRIBUTE_KEY_BYTES).map_err(at)?;
        if a.key.starts_with(RESERVED_ATTRIBUTE_PREFIX) {
            return Err(at(QueueError::invalid(format!(
                "attribute key `{}` starts with `{RESERVED_ATTRIBUTE_PREFIX}`, which is reserved \
                 for the server; rename it",
                a.key
            ))));
        }
        if attributes.insert(a.key.clone(), a.value.clone()).is_some() {
            return Err(at(QueueError::invalid(format!(
                "attribute key `{}` appears twice",
                a.key
            ))));
        }
    }
    let size = message_size(&entry.payload, &attributes, &entry.ordering_key);
    if size > settings.max_message_bytes {
        return Err(at(QueueError::invalid(format!(
            "the message is {size} bytes (payload, attributes and ordering key); the topic's \
             max_message_bytes is {}; send a smaller message, or store the data elsewhere and \
             publish a reference to it",
            settings.max_message_bytes
        ))));
    }
    Ok(Checked {
        entry,
        attributes,
        size,
    })
}

/// Checks the batch's length: 1 to [`MAX_PUBLISH_BATCH`] entries.
fn check_batch_len(entries: usize) -> Result<(), QueueError> {
    if entries == 0 {
        return Err(QueueError::invalid(
            "the publish has no messages; send 1 to 1000",
        ));
    }
    check_at_most(
        "the number of messages in the batch",
        entries as u64,
        MAX_PUBLISH_BATCH as u64,
    )
}

/// Checks a batch against every limit that does not depend on its topic (an entry's size is
/// held to the largest `max_message_bytes` a topic may set, not to its topic's own). The Queue
/// service runs it before proposing, so that a publish bound to be refused costs no log entry;
/// [`QueueState::apply`] checks everything again.
pub fn precheck_batch(entries: &[ipb::QueuePublishEntry]) -> Result<(), QueueError> {
    check_batch_len(entries.len())?;
    let widest = ipb::QueueTopicSettings {
        max_message_bytes: MAX_MESSAGE_BYTES_LIMIT,
        ..Default::default()
    };
    let mut bytes = 0u64;
    for (position, e) in entries.iter().enumerate() {
        bytes += check_entry(position, e, &widest)?.size;
    }
    check_at_most("the batch's size in bytes", bytes, MAX_PUBLISH_BATCH_BYTES)
}

impl QueueState {
    /// Publishes a batch atomically (see the module docs).
    pub(super) fn publish(
        &mut self,
        index: u64,
        now: u64,
        cmd: &ipb::QueuePublish,
    ) -> Result<ipb::QueuePublishResult, QueueError> {
        validate_topic_name("topic", &cmd.topic)?;
        check_batch_len(cmd.entries.len())?;
        let topic = self.topics.get(&cmd.topic);
        let settings = match topic {
            Some(t) => t.settings.clone(),
            None if cmd.auto_create => fill_settings(&cmd.topic, None)?,
            None => return Err(QueueError::no_topic(&cmd.topic)),
        };
        let checked = cmd
            .entries
            .iter()
            .enumerate()
            .map(|(position, e)| check_entry(position, e, &settings))
            .collect::<Result<Vec<_>, _>>()?;
        let batch_bytes: u64 = checked.iter().map(|c| c.size).sum();
        check_at_most(
            "the batch's size in bytes",
            batch_bytes,
            MAX_PUBLISH_BATCH_BYTES,
        )?;

        // De-duplicate against the window and against earlier entries of this batch.
        let mut results = Vec::with_capacity(checked.len());
        let mut in_batch: BTreeMap<&str, String> = BTreeMap::new();
        let mut adding = (0u64, 0u64);
        for (position, c) in checked.iter().enumerate() {
            let dedup_id = c.entry.dedup_id.as_str();
            let earlier = (!dedup_id.is_empty())
                .then(|| {
                    topic
                        .and_then(|t| t.dedup.lookup(dedup_id, now))
                        .map(str::to_string)
                        .or_else(|| in_batch.get(dedup_id).cloned())
                })
                .flatten();
            let result = match earlier {
                Some(message_id) => ipb::QueuePublished {
                    message_id,
                    deduplicated: true,
                },
                None => {
                    let message_id = message_id(index, position);
                    if !dedup_id.is_empty() {
                        in_batch.insert(dedup_id, message_id.clone());
                    }
                    adding = (adding.0 + 1, adding.1 + c.size);
                    ipb::QueuePublished {
                        message_id,
                        deduplicated: false,
                    }
                }
            };
            results.push(result);
        }
        // A topic about to be auto-created has default settings: no count or byte limit.
        if let Some(t) = topic {
            t.check_room(adding.0, adding.1)?;
        }

        // Everything is checked: store.
        let window_end = now.saturating_add(settings.dedup_window_ms);
        if topic.is_none() {
            self.add_topic(&cmd.topic, settings, now);
        }
        self.update(&cmd.topic, |t| {
            t.dedup.forget_expired(now);
            for (c, r) in checked.into_iter().zip(&results) {
                if r.deduplicated {
                    continue;
                }
                if !c.entry.dedup_id.is_empty() {
                    t.dedup
                        .remember(c.entry.dedup_id.clone(), r.message_id.clone(), window_end);
                }
                let status = match c.entry.delay_ms {
                    0 => Status::Visible,
                    delay => Status::Delayed {
                        until: now.saturating_add(delay),
                    },
                };
                t.insert(Message {
                    id: r.message_id.clone(),
                    payload: c.entry.payload.clone(),
                    attributes: c.attributes,
                    ordering_key: c.entry.ordering_key.clone(),
                    publish_ms: now,
                    attempts: 0,
                    first_delivery_ms: None,
                    consumer_tag: String::new(),
                    status,
                });
                t.totals.published += 1;
            }
        });
        Ok(ipb::QueuePublishResult { results })
    }
}
