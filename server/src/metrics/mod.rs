//! Metrics: what a syncd node measures and how Prometheus reads it.
//!
//! Layout:
//! - [`names`]: every metric name, with its type, labels and meaning. The single place a name
//!   is spelled.
//! - [`record`]: typed helpers the runtime calls (`record::role(Role::Leader)`,
//!   `record::wal_fsync(elapsed)`, ...), so label names and values cannot drift.
//! - [`grpc`]: a tower-style middleware that counts every gRPC request by service, method and
//!   final status code, and times it.
//! - `endpoint`: [`serve`], a small HTTP/1 server for `GET /metrics` (Prometheus text format)
//!   and `GET /healthz`, bounded in connections and time.
//!
//! Recording goes through the `metrics` facade into one process-wide Prometheus recorder,
//! installed by [`install_recorder`]. Until it is installed, recording is a no-op, so the
//! pure parts of syncd (the Raft engine, the simulator) never depend on it.
//!
//! Histograms get explicit buckets chosen per metric (see [`buckets`]); without buckets the
//! exporter would render summaries, which cannot be aggregated across nodes.

pub mod grpc;
pub mod names;
pub mod record;

mod endpoint;

#[cfg(test)]
pub(crate) mod testutil;

use std::sync::{Mutex, PoisonError};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

pub use endpoint::{HealthReport, serve};
pub use grpc::{GrpcMetrics, GrpcMetricsLayer};
pub use metrics_exporter_prometheus::PrometheusHandle;

/// Histogram bucket upper bounds, one set per kind of measurement.
pub mod buckets {
    /// WAL fsync: 50µs (a write-back cache or tmpfs) to 1s (a saturated disk). Commit latency
    /// is bounded below by this, so the low end is finely divided.
    pub const FSYNC_SECONDS: &[f64] = &[
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0,
    ];

    /// RPC latency and peer round trips: 100µs (loopback) to 10s (a client's long deadline).
    /// Also the default for any histogram without its own buckets.
    pub const RPC_SECONDS: &[f64] = &[
        0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5, 5.0, 10.0,
    ];

    /// Snapshots: a small state machine serialises in a millisecond, a large one over a slow
    /// disk takes minutes.
    pub const SNAPSHOT_SECONDS: &[f64] = &[
        0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ];

    /// Entries per WAL batch: powers of 4 from 1 (no grouping) to 65536.
    pub const BATCH_ENTRIES: &[f64] = &[
        1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0,
    ];
}

/// Why the metrics recorder could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The exporter refused a bucket configuration (a programming error in [`buckets`]).
    #[error("invalid histogram buckets: {0}")]
    Buckets(#[source] BuildError),
    /// Some other `metrics` recorder was installed in this process before ours; ours can
    /// only be installed once and never replaced.
    #[error("a different metrics recorder is already installed in this process")]
    OtherRecorderInstalled,
}

/// The handle of the recorder this process installed, if it did. A mutex rather than a
/// `OnceLock` so that two threads calling [`install_recorder`] at once cannot both build a
/// recorder and have the loser report a spurious "already installed" error.
static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the process-wide Prometheus recorder, describes every metric in [`names`] and sets
/// `syncd_build_info`, then returns the handle that renders the scrape output.
///
/// Call it once at startup, before recording. Later calls return the same handle (so tests
/// may call it freely). Histogram samples are folded into buckets when rendered and by
/// [`PrometheusHandle::run_upkeep`], which [`serve`] runs periodically.
pub fn install_recorder() -> Result<PrometheusHandle, MetricsError> {
    let mut installed = INSTALLED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = prometheus_builder()?
        .install_recorder()
        .map_err(|e| match e {
            BuildError::FailedToSetGlobalRecorder(_) => MetricsError::OtherRecorderInstalled,
            other => MetricsError::Buckets(other),
        })?;
    *installed = Some(handle.clone());
    drop(installed);

    describe_all();
    record::build_info(env!("CARGO_PKG_VERSION"));
    Ok(handle)
}

/// The exporter configuration: per-metric buckets, plus a default for histograms added later
/// without their own (so they render as histograms, not summaries).
fn prometheus_builder() -> Result<PrometheusBuilder, MetricsError> {
    let per_metric: [(&str, &[f64]); 5] = [
        (names::WAL_FSYNC_DURATION, buckets::FSYNC_SECONDS),
        (names::WAL_BATCH_ENTRIES, buckets::BATCH_ENTRIES),
        (names::SNAPSHOT_DURATION, buckets::SNAPSHOT_SECONDS),
        (names::PEER_RTT, buckets::RPC_SECONDS),
        (names::GRPC_SERVER_REQUEST_DURATION, buckets::RPC_SECONDS),
    ];
    let mut builder = PrometheusBuilder::new()
        .set_buckets(buckets::RPC_SECONDS)
        .map_err(MetricsError::Buckets)?;
    for (name, bounds) in per_metric {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), bounds)
            .map_err(MetricsError::Buckets)?;
    }
    Ok(builder)
}

/// Registers the unit and help text of every metric in [`names`] with the installed recorder
/// (a no-op without one). [`install_recorder`] calls it; calling it again is harmless.
pub fn describe_all() {
    use names::*;

    describe_gauge!(LOCK_SESSIONS, Unit::Count, "Open lock sessions.");
    describe_gauge!(QUEUE_TOPICS, Unit::Count, "Queue topics.");
    describe_counter!(
        QUEUE_MESSAGES,
        Unit::Count,
        "Queue messages by event (published, delivered, acked, nacked)."
    );
    describe_gauge!(
        LOCK_LOCKS,
        Unit::Count,
        "Locks held, awaited or under lock-delay."
    );
    describe_counter!(
        LOCK_EVENTS,
        Unit::Count,
        "Lock events applied, by type (acquired, converted, released, expired, revoked, deadlock)."
    );
    describe_counter!(
        CACHE_MEMORY_REQUESTS,
        Unit::Count,
        "Memory requests of the cache directory by backend, op and outcome (ok, refused, unknown)."
    );
    describe_histogram!(
        CACHE_MEMORY_DURATION,
        Unit::Seconds,
        "Time from a cache memory request's start to its answer."
    );
    describe_gauge!(
        CACHE_DIRTY_LINES,
        Unit::Count,
        "Cache lines holding writes memory does not have yet (write-back mode)."
    );
    describe_counter!(
        CACHE_LOCAL_WRITES,
        Unit::Count,
        "Cache writes answered on this node's own line without memory (write-back mode)."
    );
    describe_counter!(
        CACHE_WRITE_BACKS,
        Unit::Count,
        "Write-backs of dirty cache lines by outcome (written, not_holder, failed, unanswered)."
    );
    describe_histogram!(
        CACHE_WRITE_BACK_DURATION,
        Unit::Seconds,
        "Time from sending a dirty line's write-back to memory holding it."
    );
    describe_counter!(
        CACHE_WRITE_BACK_LOSSES,
        Unit::Count,
        "Unwritten cache writes lost, by event (dirty_dropped on the node, given_up by the directory)."
    );
    describe_histogram!(
        LOCK_WAIT_DURATION,
        Unit::Seconds,
        "Time Acquire calls served here waited in a lock's queue."
    );

    describe_gauge!(
        RAFT_ROLE,
        Unit::Count,
        "Role of this member: 1 for the current role, 0 for the others."
    );
    describe_gauge!(RAFT_TERM, Unit::Count, "Current Raft term.");
    describe_counter!(
        RAFT_LEADER_CHANGES,
        Unit::Count,
        "Leader changes observed by this member."
    );
    describe_gauge!(
        RAFT_COMMIT_INDEX,
        Unit::Count,
        "Highest log index known to be committed."
    );
    describe_gauge!(
        RAFT_APPLIED_INDEX,
        Unit::Count,
        "Highest log index applied to the state machine."
    );
    describe_counter!(
        RAFT_PROPOSALS,
        Unit::Count,
        "Client proposals by result: ok (committed), rejected (refused by the engine), dropped (lost without a verdict)."
    );
    describe_gauge!(
        LOG_ENTRIES,
        Unit::Count,
        "Log entries retained since the last snapshot."
    );
    describe_gauge!(
        LOG_BYTES,
        Unit::Bytes,
        "Bytes of log retained on disk since the last snapshot."
    );
    describe_counter!(SNAPSHOTS, Unit::Count, "Snapshots taken by this member.");
    describe_histogram!(
        SNAPSHOT_DURATION,
        Unit::Seconds,
        "Time to take and persist one snapshot."
    );
    describe_histogram!(
        WAL_FSYNC_DURATION,
        Unit::Seconds,
        "Duration of one WAL fsync."
    );
    describe_histogram!(
        WAL_BATCH_ENTRIES,
        Unit::Count,
        "Entries written per WAL append batch."
    );
    describe_gauge!(
        PEER_REPLICATION_LAG,
        Unit::Count,
        "Entries the peer's log is behind the leader's last index (set on the leader)."
    );
    describe_histogram!(
        PEER_RTT,
        Unit::Seconds,
        "Round-trip time of Raft RPCs to the peer."
    );
    describe_gauge!(
        PEER_REACHABLE,
        Unit::Count,
        "1 if the failure detector considers the peer reachable, else 0."
    );
    describe_counter!(
        GRPC_SERVER_REQUESTS,
        Unit::Count,
        "Finished gRPC requests by service, method and status code."
    );
    describe_histogram!(
        GRPC_SERVER_REQUEST_DURATION,
        Unit::Seconds,
        "Time from receiving a gRPC request to its final status."
    );
    describe_gauge!(
        BUILD_INFO,
        Unit::Count,
        "Always 1; the version label is the syncd version."
    );
    describe_gauge!(
        NODE_INFO,
        Unit::Count,
        "Always 1; the node_id label is this member's Raft node id."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_recorder_twice_returns_the_same_recorder() {
        let first = install_recorder().expect("first install");
        let second = install_recorder().expect("second install");
        metrics::counter!(names::SNAPSHOTS).increment(1);
        let a = testutil::sample(&first.render(), names::SNAPSHOTS, &[]);
        let b = testutil::sample(&second.render(), names::SNAPSHOTS, &[]);
        assert!(
            a.is_some(),
            "counter missing from the first handle's output"
        );
        assert_eq!(a, b);
    }

    #[test]
    fn every_bucket_list_is_strictly_increasing_and_positive() {
        for bounds in [
            buckets::FSYNC_SECONDS,
            buckets::RPC_SECONDS,
            buckets::SNAPSHOT_SECONDS,
            buckets::BATCH_ENTRIES,
        ] {
            assert!(bounds[0] > 0.0);
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        }
        assert_eq!(buckets::FSYNC_SECONDS.first(), Some(&0.000_05));
        assert_eq!(buckets::FSYNC_SECONDS.last(), Some(&1.0));
        assert_eq!(buckets::RPC_SECONDS.first(), Some(&0.000_1));
        assert_eq!(buckets::RPC_SECONDS.last(), Some(&10.0));
        let powers_of_4: Vec<f64> = (0..=8).map(|i| f64::from(4u32.pow(i))).collect();
        assert_eq!(buckets::BATCH_ENTRIES, powers_of_4.as_slice());
    }

    #[test]
    fn histograms_render_with_their_own_buckets() {
        let handle = install_recorder().expect("install");
        record::wal_batch(3);
        record::wal_fsync(std::time::Duration::from_micros(70));
        let text = handle.render();
        assert!(
            text.contains("# TYPE syncd_wal_batch_entries histogram"),
            "{text}"
        );
        assert!(
            text.contains("syncd_wal_batch_entries_bucket{le=\"65536\"}"),
            "{text}"
        );
        assert!(
            text.contains("syncd_wal_fsync_duration_seconds_bucket{le=\"0.00005\"}"),
            "{text}"
        );
    }

    #[test]
    fn names_are_unique_and_prefixed() {
        let mut seen = std::collections::HashSet::new();
        for name in names::ALL {
            assert!(name.starts_with("syncd_"), "{name}");
            assert!(seen.insert(name), "duplicate {name}");
        }
    }
}
