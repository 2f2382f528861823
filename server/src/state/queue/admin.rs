//! Topic lifecycle: CreateTopic, DeleteTopic and Purge.
//!
//! Settings are fixed at creation, so a retried or repeated CreateTopic is harmless (same
//! settings: `created` false) and a conflicting one is refused rather than silently changing
//! how existing messages are kept. A dead-letter topic cannot be deleted while a topic names it,
//! so dead-lettering always has somewhere to go; since a topic's dead-letter topic is created
//! with default settings (no dead-letter topic of its own) and settings never change, the
//! dead-letter relation has no cycles.

use sync_proto::internal::v1 as ipb;

use super::QueueState;
use super::error::QueueError;
use super::limits::{fill_settings, settings_difference, validate_topic_name};

impl QueueState {
    /// Creates a topic, and its dead-letter topic with default settings if that is missing.
    pub(super) fn create_topic(
        &mut self,
        now: u64,
        cmd: &ipb::QueueCreateTopic,
    ) -> Result<ipb::QueueCreateTopicResult, QueueError> {
        validate_topic_name("topic name", &cmd.name)?;
        let settings = fill_settings(&cmd.name, cmd.settings.as_ref())?;
        if let Some(existing) = self.topics.get(&cmd.name) {
            if let Some(diff) = settings_difference(&existing.settings, &settings) {
                return Err(QueueError::already_exists(format!(
                    "topic `{}` exists with other settings ({diff}); settings cannot change \
                     after creation: create it with the settings it has, use another name, or \
                     delete it first",
                    cmd.name
                )));
            }
            return Ok(ipb::QueueCreateTopicResult {
                topic: Some(existing.to_proto()),
                created: false,
                dead_letter_topic_created: false,
            });
        }
        let dlq = settings.dead_letter_topic.clone();
        let dlq_created = !dlq.is_empty() && !self.topics.contains_key(&dlq);
        if dlq_created {
            self.add_topic(&dlq, fill_settings(&dlq, None)?, now);
        }
        self.add_topic(&cmd.name, settings, now);
        Ok(ipb::QueueCreateTopicResult {
            topic: self.topic(&cmd.name),
            created: true,
            dead_letter_topic_created: dlq_created,
        })
    }

    /// Deletes a topic and its messages, unless another topic uses it as its dead-letter topic.
    pub(super) fn delete_topic(
        &mut self,
        cmd: &ipb::QueueDeleteTopic,
    ) -> Result<ipb::QueueDeleteTopicResult, QueueError> {
        self.existing("topic name", &cmd.name)?;
        let users: Vec<&str> = self
            .topics
            .values()
            .filter(|t| t.settings.dead_letter_topic == cmd.name)
            .map(|t| t.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(QueueError::precondition(format!(
                "topic `{}` is the dead-letter topic of {}; delete {} first",
                cmd.name,
                users
                    .iter()
                    .map(|u| format!("`{u}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if users.len() == 1 { "it" } else { "them" }
            )));
        }
        let deleted_messages = self.remove_topic(&cmd.name).map_or(0, |t| t.len());
        Ok(ipb::QueueDeleteTopicResult { deleted_messages })
    }

    /// Deletes every message of a topic (visible, delayed and in flight); keeps the topic, its
    /// counters and its dedup window (a publish retried after a purge is still a duplicate).
    pub(super) fn purge(
        &mut self,
        cmd: &ipb::QueuePurge,
    ) -> Result<ipb::QueuePurgeResult, QueueError> {
        self.existing("topic", &cmd.topic)?;
        let purged = self
            .update(&cmd.topic, |t| {
                let n = t.clear();
                t.totals.purged += n;
                n
            })
            .unwrap_or(0);
        Ok(ipb::QueuePurgeResult { purged })
    }
}
