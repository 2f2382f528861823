//! # syncd
//!
//! The syncd server library. Layout:
//! - [`cache`]: the pure cache coherence protocol (MESI lines, directory, leases) and its
//!   deterministic simulator.
//! - [`raft`]: the pure, deterministic Raft engine and its simulator.
//! - [`storage`]: the durable log (segmented WAL with group commit) and snapshots.
//! - [`state`]: the replicated state machine (request de-duplication, registers, and the
//!   primitives as they land).
//! - [`node`]: the async runtime around the engine: driver, WAL thread, transport, config.
//! - [`api`]: the public gRPC services.
//! - [`metrics`]: Prometheus metrics, `/healthz`, per-RPC gRPC metrics.
//! - [`server`]: assembles a serving node (used by the `syncd` binary).

pub mod api;
pub mod cache;
pub mod metrics;
pub mod node;
pub mod queue;
pub mod raft;
pub mod server;
pub mod state;
pub mod storage;
