//! The replicated state machine: what committed commands do.
//!
//! Every module here is pure and deterministic: given the same committed entries in the same
//! order, every replica computes the same state. Time, when a command needs it, comes from the
//! log (stamped by the leader), never from the local clock.
//!
//! - [`dedup`]: the client table that makes a retried request apply once (Raft dissertation
//!   §6.3). Each primitive (locks, queues, cache) plugs in beside it in its own module.

pub mod dedup;
