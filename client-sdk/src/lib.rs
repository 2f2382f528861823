//! # sync-client
//!
//! The Rust SDK of syncd. For now it re-exports the generated gRPC clients of the public
//! services ([`api`]); the typed, leader-aware SDK (sessions and lock guards, queue streams,
//! a near cache) is built on them as each primitive lands.

/// The generated `sync.v1` clients and messages (Cluster, Lock, Queue, Cache).
pub use sync_proto::sync::v1 as api;
