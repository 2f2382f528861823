//! # sync-proto
//!
//! The protocol buffer contract of syncd, compiled by `build.rs` with a vendored protoc.
//!
//! - [`sync::v1`] (`proto/sync/v1/*.proto`): the public gRPC API that clients, `syncctl` and
//!   grpcurl use, one file per service:
//!   - `common.proto`: the conventions every service shares (units, routing to the leader or a
//!     topic's owner with the `x-sync-leader-id` / `x-sync-leader-addr` trailers) and the
//!     `RequestHeader` that de-duplicates retried mutations;
//!   - `cluster.proto`: `Cluster`, the Raft group's status, membership, leadership and snapshots;
//!   - `lock.proto`: `Lock`, sessions, shared/exclusive locks with fencing tokens and deadlock
//!     detection;
//!   - `queue.proto`: `Queue`, topics with at-least-once delivery, visibility timeouts and
//!     dead-lettering;
//!   - `cache.proto`: `Cache`, a key-value cache kept coherent by MESI.
//! - [`raft::v1`] (`proto/sync/raft/v1/raft.proto`): the inter-node Raft RPCs and the records the
//!   Raft engine persists (log entries, hard state, snapshot metadata, cluster configuration).
//!   The same messages are the wire format and the on-disk format.
//!
//! Every message of the Raft protocol carries a `group_id`, so one node can host many Raft groups.
//! The proto comments are the API reference: `grpcurl describe` shows them through reflection,
//! served from [`FILE_DESCRIPTOR_SET`].

/// The `sync.*` packages, nested as their names are so that generated cross-package references
/// (`sync.internal.v1` using `sync.v1` messages) resolve.
pub mod sync {
    /// Version 1 of the public API: the `Cluster`, `Lock`, `Queue` and `Cache` services.
    pub mod v1 {
        tonic::include_proto!("sync.v1");
    }

    /// `sync.raft.v1`: the Raft protocol between syncd nodes.
    pub mod raft {
        /// Version 1 of the Raft protocol.
        pub mod v1 {
            tonic::include_proto!("sync.raft.v1");
        }
    }

    /// `sync.internal.v1`: the replicated state machine's commands and snapshot format (never
    /// seen by clients).
    pub mod internal {
        /// Version 1 of the internal records.
        pub mod v1 {
            tonic::include_proto!("sync.internal.v1");
        }
    }
}

pub use sync::{internal, raft};

/// The encoded `FileDescriptorSet` of every syncd proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sync_descriptor");
