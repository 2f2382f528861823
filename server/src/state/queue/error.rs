//! Why the queue refuses a command, as a typed value the Queue service maps once to a gRPC
//! status (each [`ipb::QueueErrorCode`] has the name of the status it becomes).

use sync_proto::internal::v1 as ipb;

/// A refused command: its kind and a sentence a person can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct QueueError {
    /// The kind of refusal (the gRPC status it becomes).
    pub code: ipb::QueueErrorCode,
    /// What went wrong and what to do about it.
    pub message: String,
}

impl QueueError {
    fn new(code: ipb::QueueErrorCode, message: impl Into<String>) -> Self {
        QueueError {
            code,
            message: message.into(),
        }
    }

    /// INVALID_ARGUMENT: a name, size or duration is out of range.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ipb::QueueErrorCode::InvalidArgument, message)
    }

    /// NOT_FOUND: the topic or message does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ipb::QueueErrorCode::NotFound, message)
    }

    /// FAILED_PRECONDITION: a stale receipt, an undelivered message, a topic still in use.
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ipb::QueueErrorCode::FailedPrecondition, message)
    }

    /// RESOURCE_EXHAUSTED: a retention limit is reached.
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(ipb::QueueErrorCode::ResourceExhausted, message)
    }

    /// ALREADY_EXISTS: the topic exists with other settings.
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(ipb::QueueErrorCode::AlreadyExists, message)
    }

    /// NOT_FOUND for a missing topic, saying how to get one.
    pub fn no_topic(name: &str) -> Self {
        Self::not_found(format!(
            "topic `{name}` does not exist; create it with CreateTopic (or publish to it with \
             the server's auto-create setting on)"
        ))
    }

    /// The record carried in a [`ipb::QueueResult`].
    pub fn to_proto(&self) -> ipb::QueueError {
        ipb::QueueError {
            code: self.code as i32,
            message: self.message.clone(),
        }
    }
}
