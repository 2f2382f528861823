//! The queue's runtime on each node: the parts of the Queue service that are not replicated
//! state. The replicated part (topics, messages, deliveries, timers) is
//! [`crate::state::queue`]; the gRPC translation is [`crate::api::queue`].
//!
//! - [`ring`]: the consistent-hash ring that places each topic on an owner node;
//! - [`owner`]: this node's view of ownership, and how the owner's consumers wait for messages
//!   (notices, re-checks, claims) without missing any or racing each other;
//! - [`rates`]: publish and ack rates for Stats, from samples of the replicated counters.
//!
//! Nothing here is needed for safety: every delivery, ack and timeout is a Raft command, so two
//! nodes that both think they own a topic, or a new owner that knows nothing of the old one's
//! waiters, cost extra work at most (an empty long poll, a forwarding hop), never a message
//! (see `docs/queues.md`).

pub mod owner;
pub mod rates;
pub mod ring;
