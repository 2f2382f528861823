//! # sync-tests
//!
//! Cluster-level tests of syncd against real `syncd` processes. The engine-level guarantees are
//! tested in `server/` (unit tests, scenario tests and the deterministic simulator); this crate
//! holds what needs real processes, sockets and disks.
//!
//! ## Layout
//!
//! - [`harness`]: [`Cluster`] starts `syncd` nodes on free loopback ports, each with a
//!   temporary data dir and a log file; kills (`kill9`), pauses (`sigstop`/`sigcont`),
//!   terminates (`sigterm`) and restarts them; adds joining nodes; waits, always with a
//!   deadline, for an agreed leader, catch-up and convergence. [`scenario`] runs one test body
//!   and prints a diagnosis (timeline, node states, statuses, log tails) when it fails.
//! - [`proxy`]: the fault proxy. Node `i` reaches peer `j` only through `P(i→j)`, so a test can
//!   cut one direction of one link, partition groups, isolate a node, add latency, and heal.
//! - [`workload`]: writers that number their requests (`RequestHeader`) and retry them
//!   unchanged; a [`Ledger`] of what was acknowledged; the checks that every acknowledged write
//!   is readable, nothing was applied twice and all nodes agree.
//! - [`locks`]: a lock user that retries every call unchanged on any node, and a history of
//!   holds with an overlap checker.
//! - [`cache`]: cache calls, the original scenario and the concurrent workload with its
//!   stale-read checks, for the tests of both memory backends.
//! - [`redis`]: a real `redis-server` on a free port (stop, start again, `redis-cli`).
//! - [`tls`]: a CA and certificates made with rcgen, for clusters that serve TLS
//!   ([`Options::with_tls`]).
//! - [`wait`]: bounded polling.
//! - `binary`: finds the `syncd` binary (and asks cargo to bring it up to date).
//!
//! The tests live in `tests/tests/`, one file per guarantee: `leader_election`,
//! `leader_failover`, `paused_leader`, `snapshot_catch_up`, `membership`, `partition`,
//! `one_way_partition`, `shutdown`, `crash_loop`. Each starts at most five processes and bounds
//! its own time.

mod binary;
pub mod cache;
pub mod harness;
pub mod locks;
pub mod proxy;
pub mod queues;
pub mod redis;
pub mod tls;
pub mod wait;
pub mod workload;

/// The path of an up-to-date `syncd` binary (built by cargo if needed), for tests that run it
/// outside a cluster.
pub use binary::syncd as syncd_binary;
pub use harness::{Clients, Cluster, Leader, NodeClient, NodeState, Options, scenario};
pub use proxy::{Mode, Network, Proxy};
pub use sync_proto::sync::v1 as api;
pub use tls::TlsMaterial;
pub use workload::{BackgroundWriter, Ledger, WriterConfig, verify_converged, write_keys};
