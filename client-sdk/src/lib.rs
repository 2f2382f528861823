//! # sync-client
//!
//! The Rust SDK of syncd: a leader-aware client for the cluster's replicated locks, queues and
//! coherent cache.
//!
//! ```no_run
//! # async fn demo() -> sync_client::Result<()> {
//! use std::time::Duration;
//! use sync_client::Client;
//!
//! let client = Client::connect(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]).await?;
//! let session = client.session(Duration::from_secs(10)).await?;
//! let guard = session.lock("reports/daily").exclusive().acquire().await?;
//! println!("holding {} with fencing token {}", guard.name(), guard.token());
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! ## What the client does for you
//!
//! - **Routing.** [`Client::connect`] asks the given endpoints for `Cluster.Status` and learns
//!   the members and the leader. Calls that must run on the leader go to it; a node that answers
//!   "not the leader" names the leader in its trailers and the call follows; when the leader
//!   stops answering, the client asks the members again.
//! - **Retries.** Unreachable nodes, elections and timeouts of calls that are safe to repeat
//!   are retried with exponential backoff inside one deadline per call ([`RetryPolicy`],
//!   [`ClientBuilder::deadline`]).
//! - **Exactly-once mutations.** Every mutating call carries a `RequestHeader` (a random
//!   `client_id` per [`Client`], a sequence number per call, repeated on each retry), so a call
//!   retried after a lost answer or a leader change is applied once.
//! - **Sessions.** [`Client::session`] keeps its lease alive in the background over a
//!   `KeepAlive` stream and tells you when it is lost ([`Session::lost`]).
//! - **Near cache** (opt-in). [`Client::near_cache`] keeps cache values in this process,
//!   invalidated by one node's event stream and emptied whenever that stream is down. Its hits
//!   are boundedly stale for other processes' writes, never for writes made through it: the
//!   exact guarantee is on [`NearCache`].
//! - **Typed errors.** [`Error`] names what happened (a deadlock, a lock not held, a session
//!   expired, an unreachable cluster) in a message a person can act on.
//!
//! ## Layout
//!
//! - `client.rs`: [`Client`], [`ClientBuilder`], [`RetryPolicy`]; the retry loop every call
//!   goes through;
//! - [`routing`]: the view of members and leader, discovery, one channel per member; and, public,
//!   [`routing::leader_in`] and [`routing::leader_hint`] for tools using the generated clients;
//! - `header.rs`: `RequestHeader` numbering (sequence, lowest unacknowledged);
//! - `session.rs`: [`Session`] and its keep-alive task;
//! - `guard.rs`: [`LockRequest`] and [`LockGuard`] (acquire, try-acquire, upgrade, downgrade,
//!   release);
//! - `locks.rs`: the lock table's types ([`LockState`], [`Holder`], [`SessionInfo`],
//!   [`LockEvent`]) and its reads (get, list, validate a token, watch);
//! - `queue.rs`: publishing ([`Client::publish`], [`OutgoingMessage`]), consuming
//!   ([`Consumer`], [`Delivery`] with ack, nack, extend and [`Delivery::auto_extend`]);
//! - `cache.rs`: the coherent cache ([`Client::cache_get`], [`Client::cache_set`],
//!   [`Client::cache_delete`], [`Client::cache_compare_and_set`]);
//! - `cache_admin.rs`: the cache call by call on a chosen node, with the server's whole answers
//!   ([`Client::cache_on`], [`NodeCache`]: hit or miss, MESI state, holders, counters);
//! - `cluster.rs`: administration ([`Client::add_member`], [`Client::remove_member`],
//!   [`Client::promote_learner`], [`Client::transfer_leader`], [`Client::snapshot`]) and any
//!   node's status ([`Client::node_status`]);
//! - `near/`: the opt-in near cache ([`Client::near_cache`], [`NearCache`]): `core.rs` decides
//!   what may be served (pure: no I/O, no clock), `mod.rs` runs the invalidation stream;
//! - `tls.rs`: [`TlsOptions`] (CA, client certificate, server name) for clusters that serve
//!   TLS;
//! - `error.rs`: [`Error`].
//!
//! `examples/` has complete programs (a job under a fenced lock, a worker pool, a read-through
//! cache), each run against a real cluster by `tests/examples.rs`.
//!
//! The generated gRPC clients and messages remain available as [`api`] for anything the typed
//! API does not cover yet.

#![warn(missing_docs)]

mod cache;
mod cache_admin;
mod client;
mod cluster;
pub mod error;
mod guard;
mod header;
mod locks;
mod near;
mod queue;
pub mod routing;
mod session;
mod tls;

pub use cache::CachedValue;
pub use cache_admin::{CasOutcome, NodeCache};
pub use client::{Client, ClientBuilder, RetryPolicy};
pub use cluster::{LeaderInfo, MemberInfo, Membership, SnapshotInfo};
pub use error::{Error, Result};
pub use guard::{LockGuard, LockRequest};
pub use locks::{
    Holder, LockEvent, LockEventKind, LockMode, LockState, SessionInfo, WaitEdge, Waiter,
};
pub use near::{NearCache, NearCacheConfig, NearCacheStats, NearValue};
pub use queue::{AutoExtend, Consumer, Delivery, OutgoingMessage, Published, TopicStats};
pub use session::{Session, SessionBuilder};
pub use tls::TlsOptions;

/// The generated `sync.v1` clients and messages (Cluster, Lock, Queue, Cache).
pub use sync_proto::sync::v1 as api;
