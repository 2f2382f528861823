//! From a phase's raw numbers to the figures a benchmark reports, and the syncd ÷ peer ratios
//! (the peer being etcd or Redis).

use hdrhistogram::Histogram;
use serde::Serialize;

use super::driver::PhaseResult;

/// Latency percentiles of the successful operations, in microseconds. All zero when none
/// succeeded.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
            mean: histogram.mean(),
        }
    }
}

/// One target's result row.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Summary {
    /// "syncd", "etcd", "redis", or a syncd reference workload ("syncd-kv-put").
    pub target: String,
    /// The member the clients talked to (the leader).
    pub endpoint: String,
    pub clients: usize,
    /// Successful operations (puts, acquire+release cycles, hand-offs).
    pub ops: u64,
    /// Operations that failed (after retries).
    pub errors: u64,
    /// Extra attempts: redirects to a new leader and retries after UNAVAILABLE.
    pub retries: u64,
    /// Wall time of the measured phase, in seconds.
    pub elapsed_secs: f64,
    /// `ops / elapsed_secs`.
    pub ops_per_sec: f64,
    pub latency_us: Latency,
    /// The first failure's reason, if any operation failed.
    pub first_error: Option<String>,
}

impl Summary {
    pub fn new(target: &str, endpoint: &str, clients: usize, phase: &PhaseResult) -> Self {
        let secs = phase.elapsed.as_secs_f64();
        Summary {
            target: target.to_owned(),
            endpoint: endpoint.to_owned(),
            clients,
            ops: phase.ops,
            errors: phase.errors,
            retries: phase.retries,
            elapsed_secs: secs,
            ops_per_sec: if secs > 0.0 {
                phase.ops as f64 / secs
            } else {
                0.0
            },
            latency_us: Latency::of(&phase.histogram),
            first_error: phase.first_error.clone(),
        }
    }
}

/// One target relative to another (syncd to its peer). A ratio is absent when the peer's
/// figure is zero.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Comparison {
    /// The measured target ("syncd").
    pub target: String,
    /// The one it is divided by ("etcd", "redis").
    pub peer: String,
    /// syncd ops/s ÷ etcd ops/s: above 1 means syncd sustained more operations per second.
    pub ops_per_sec_ratio: Option<f64>,
    /// syncd p50 ÷ etcd p50: below 1 means syncd's median operation was faster.
    pub p50_ratio: Option<f64>,
    /// syncd p99 ÷ etcd p99: below 1 means syncd's tail was shorter.
    pub p99_ratio: Option<f64>,
}

pub fn compare(syncd: &Summary, etcd: &Summary) -> Comparison {
    let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
    Comparison {
        target: syncd.target.clone(),
        peer: etcd.target.clone(),
        ops_per_sec_ratio: (etcd.ops_per_sec > 0.0).then(|| syncd.ops_per_sec / etcd.ops_per_sec),
        p50_ratio: ratio(syncd.latency_us.p50, etcd.latency_us.p50),
        p99_ratio: ratio(syncd.latency_us.p99, etcd.latency_us.p99),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A phase with these latencies, counts and wall time.
    fn phase(
        values_us: impl IntoIterator<Item = u64>,
        (ops, errors, retries): (u64, u64, u64),
        elapsed: Duration,
    ) -> PhaseResult {
        let mut histogram = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in values_us {
            histogram.record(v).unwrap();
        }
        PhaseResult {
            histogram,
            ops,
            errors,
            retries,
            elapsed,
            first_error: (errors > 0).then(|| "boom".to_owned()),
        }
    }

    /// hdrhistogram with 3 significant digits reports values within 0.1%.
    fn close(actual: u64, expected: u64) -> bool {
        actual.abs_diff(expected) as f64 <= expected as f64 * 0.001 + 1.0
    }

    #[test]
    fn percentiles_come_from_the_latencies() {
        // 1 ms .. 100 ms in 1 ms steps.
        let p = phase(
            (1..=100).map(|ms| ms * 1_000),
            (100, 2, 3),
            Duration::from_secs(4),
        );
        let s = Summary::new("syncd", "127.0.0.1:7001", 4, &p);
        assert!(close(s.latency_us.p50, 50_000), "{:?}", s.latency_us);
        assert!(close(s.latency_us.p90, 90_000), "{:?}", s.latency_us);
        assert!(close(s.latency_us.p99, 99_000), "{:?}", s.latency_us);
        assert!(close(s.latency_us.max, 100_000), "{:?}", s.latency_us);
        assert!((s.latency_us.mean - 50_500.0).abs() < 100.0);
        assert_eq!(s.ops_per_sec, 25.0);
        assert_eq!((s.ops, s.errors, s.retries), (100, 2, 3));
        assert_eq!(s.first_error.as_deref(), Some("boom"));
    }

    #[test]
    fn a_run_without_successful_operations_reports_zeros() {
        let s = Summary::new(
            "etcd",
            "x:1",
            1,
            &phase([], (0, 7, 0), Duration::from_secs(1)),
        );
        assert_eq!(s.latency_us, Latency::default());
        assert_eq!(s.ops_per_sec, 0.0);
        let s = Summary::new("etcd", "x:1", 1, &phase([], (0, 0, 0), Duration::ZERO));
        assert_eq!(s.ops_per_sec, 0.0);
    }

    #[test]
    fn ratios_are_syncd_over_etcd() {
        let second = Duration::from_secs(1);
        let fast = Summary::new("syncd", "a:1", 1, &phase([500, 500], (300, 0, 0), second));
        let slow = Summary::new(
            "etcd",
            "b:1",
            1,
            &phase([2_000, 2_000, 8_000], (100, 0, 0), second),
        );
        let c = compare(&fast, &slow);
        assert_eq!(c.ops_per_sec_ratio, Some(3.0));
        assert_eq!(c.p50_ratio, Some(0.25));
        assert!(
            c.p99_ratio.is_some_and(|r| (r - 0.0625).abs() < 0.001),
            "{c:?}"
        );
        let idle = Summary::new("etcd", "b:1", 1, &phase([], (0, 5, 0), second));
        assert_eq!(
            compare(&fast, &idle),
            Comparison {
                target: "syncd".into(),
                peer: "etcd".into(),
                ops_per_sec_ratio: None,
                p50_ratio: None,
                p99_ratio: None,
            }
        );
    }
}
