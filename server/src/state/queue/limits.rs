//! The queue's limits and defaults, each the number that `proto/sync/v1/queue.proto` documents,
//! and the checks that enforce them before anything changes.
//!
//! Every check returns a [`QueueError`] whose message names the value, the limit and what to do,
//! so the Queue service can pass it to the client unchanged.

use sync_proto::internal::v1 as ipb;

use super::error::QueueError;

/// Longest topic name, in characters (all ASCII, so also bytes).
pub const MAX_TOPIC_NAME_LEN: usize = 255;
/// Default visibility timeout: long enough for a typical handler, short enough that a crashed
/// consumer's messages come back within a minute.
pub const DEFAULT_VISIBILITY_TIMEOUT_MS: u64 = 30_000;
/// Longest visibility timeout (12 hours, SQS's limit): past it a lost consumer holds a message
/// for longer than an operator would wait.
pub const MAX_VISIBILITY_TIMEOUT_MS: u64 = 43_200_000;
/// Default retention age (4 days, SQS's default).
pub const DEFAULT_RETENTION_MAX_AGE_MS: u64 = 345_600_000;
/// Default largest message (payload, attributes and ordering key).
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 1 << 20;
/// Largest `max_message_bytes` a topic may set: gRPC's default 4 MiB message limit, so a
/// delivery always fits in a response.
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 4 << 20;
/// Default dedup window (5 minutes, SQS FIFO's).
pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 300_000;
/// Longest dedup window (1 day): every remembered dedup_id is replicated state.
pub const MAX_DEDUP_WINDOW_MS: u64 = 86_400_000;
/// Most entries in one publish: bounds the size of one log entry.
pub const MAX_PUBLISH_BATCH: usize = 1_000;
/// Most receipts in one AckBatch: bounds the size of one log entry, as for a publish.
pub const MAX_ACK_BATCH: usize = 1_000;
/// Most bytes in one publish (sum of the entries' sizes): one gRPC message.
pub const MAX_PUBLISH_BATCH_BYTES: u64 = 4 << 20;
/// Longest publish delay (1 day).
pub const MAX_PUBLISH_DELAY_MS: u64 = 86_400_000;
/// Longest nack delay: the same bound as a visibility timeout.
pub const MAX_NACK_DELAY_MS: u64 = MAX_VISIBILITY_TIMEOUT_MS;
/// Longest dedup_id, in bytes.
pub const MAX_DEDUP_ID_BYTES: usize = 128;
/// Longest ordering key, in bytes.
pub const MAX_ORDERING_KEY_BYTES: usize = 255;
/// Most attributes on one message.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest attribute key, in bytes.
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 128;
/// Attribute keys with this prefix belong to the server (dead-letter bookkeeping); a client may
/// not set them, so a consumer can trust them.
pub const RESERVED_ATTRIBUTE_PREFIX: &str = "sync.";
/// Most messages in one delivery.
pub const MAX_DELIVER_MESSAGES: u32 = 100;
/// A delivery stops adding messages before their sizes pass this (one gRPC response). The first
/// message is always delivered: it is at most [`MAX_MESSAGE_BYTES_LIMIT`].
pub const MAX_DELIVER_BYTES: u64 = 4 << 20;
/// Longest consumer tag, in bytes.
pub const MAX_CONSUMER_TAG_BYTES: usize = 255;
/// Topics per ListTopics page when the caller asks for 0.
pub const DEFAULT_LIST_PAGE_SIZE: usize = 1_000;
/// Most topics per ListTopics page.
pub const MAX_LIST_PAGE_SIZE: usize = 10_000;

/// Checks a topic name: 1 to [`MAX_TOPIC_NAME_LEN`] characters from `[A-Za-z0-9._-]`.
pub fn validate_topic_name(what: &str, name: &str) -> Result<(), QueueError> {
    if name.is_empty() {
        return Err(QueueError::invalid(format!("{what} must not be empty")));
    }
    if name.len() > MAX_TOPIC_NAME_LEN {
        return Err(QueueError::invalid(format!(
            "{what} is {} characters; the limit is {MAX_TOPIC_NAME_LEN}",
            name.len()
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(QueueError::invalid(format!(
            "{what} `{}` contains {bad:?}; use only letters, digits, `.`, `_` and `-`",
            name.escape_debug()
        )));
    }
    Ok(())
}

/// Checks that `value` is at most `max`, naming the field in the error.
pub fn check_at_most(field: &str, value: u64, max: u64) -> Result<(), QueueError> {
    if value > max {
        return Err(QueueError::invalid(format!(
            "{field} is {value}; the limit is {max}"
        )));
    }
    Ok(())
}

/// Checks that a string field is at most `max` bytes.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), QueueError> {
    check_at_most(field, value.len() as u64, max as u64)
}

/// A topic's settings with every default filled in, after checking each against its limit.
/// `name` is the topic's own name (a topic may not be its own dead-letter topic).
pub fn fill_settings(
    name: &str,
    requested: Option<&ipb::QueueTopicSettings>,
) -> Result<ipb::QueueTopicSettings, QueueError> {
    let mut s = requested.cloned().unwrap_or_default();
    fn default_if_zero(v: &mut u64, default: u64) {
        if *v == 0 {
            *v = default;
        }
    }
    default_if_zero(&mut s.visibility_timeout_ms, DEFAULT_VISIBILITY_TIMEOUT_MS);
    default_if_zero(&mut s.retention_max_age_ms, DEFAULT_RETENTION_MAX_AGE_MS);
    default_if_zero(&mut s.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
    default_if_zero(&mut s.dedup_window_ms, DEFAULT_DEDUP_WINDOW_MS);
    check_at_most(
        "visibility_timeout_ms",
        s.visibility_timeout_ms,
        MAX_VISIBILITY_TIMEOUT_MS,
    )?;
    check_at_most(
        "max_message_bytes",
        s.max_message_bytes,
        MAX_MESSAGE_BYTES_LIMIT,
    )?;
    check_at_most("dedup_window_ms", s.dedup_window_ms, MAX_DEDUP_WINDOW_MS)?;
    if !s.dead_letter_topic.is_empty() {
        validate_topic_name("dead_letter_topic", &s.dead_letter_topic)?;
        if s.dead_letter_topic == name {
            return Err(QueueError::invalid(format!(
                "topic `{name}` names itself as its dead-letter topic; name another topic, or \
                 leave dead_letter_topic empty to delete dead letters"
            )));
        }
    }
    Ok(s)
}

/// The first setting on which `a` and `b` differ, as `name (a, not b)`, for ALREADY_EXISTS.
pub fn settings_difference(
    a: &ipb::QueueTopicSettings,
    b: &ipb::QueueTopicSettings,
) -> Option<String> {
    let numbers = [
        (
            "visibility_timeout_ms",
            a.visibility_timeout_ms,
            b.visibility_timeout_ms,
        ),
        (
            "max_deliveries",
            u64::from(a.max_deliveries),
            u64::from(b.max_deliveries),
        ),
        (
            "retention_max_messages",
            a.retention_max_messages,
            b.retention_max_messages,
        ),
        (
            "retention_max_bytes",
            a.retention_max_bytes,
            b.retention_max_bytes,
        ),
        (
            "retention_max_age_ms",
            a.retention_max_age_ms,
            b.retention_max_age_ms,
        ),
        (
            "max_message_bytes",
            a.max_message_bytes,
            b.max_message_bytes,
        ),
        ("dedup_window_ms", a.dedup_window_ms, b.dedup_window_ms),
    ];
    if a.dead_letter_topic != b.dead_letter_topic {
        return Some(format!(
            "dead_letter_topic `{}`, not `{}`",
            a.dead_letter_topic, b.dead_letter_topic
        ));
    }
    numbers
        .into_iter()
        .find(|(_, x, y)| x != y)
        .map(|(field, x, y)| format!("{field} {x}, not {y}"))
}
