//! The model check: thousands of seeded hostile runs, each checked after every event.
//!
//! `SYNCD_CACHE_SIM_SEEDS=<n>` runs more seeds (a soak); `SYNCD_CACHE_SIM_SEED=<seed>` replays
//! one, and `SYNCD_CACHE_SIM_TRACE=1` prints its events.

use super::{Report, SimConfig, run, seeds_from_env};

/// Runs every seed from `base`, panicking with the replay line on the first violation.
fn run_seeds(
    name: &str,
    base: u64,
    count: u64,
    config: impl Fn(u64) -> SimConfig,
) -> (Report, u64) {
    let seeds = seeds_from_env(base, count);
    let started = std::time::Instant::now();
    let mut total = Report::default();
    for &seed in &seeds {
        let cfg = config(seed);
        match run(seed, &cfg) {
            Ok(r) => total.add(&r),
            Err(v) => panic!("{name}: {v}"),
        }
    }
    eprintln!(
        "{name}: {} seeds in {:.1?}: {total:?}",
        seeds.len(),
        started.elapsed()
    );
    (total, seeds.len() as u64)
}

/// A pass means nothing unless the runs did what they claim: hits, fills, writes, every kind of
/// demand, leases that ran out, evictions, expiries, crashes, epoch changes and retried writes.
fn assert_exercised(r: &Report, seeds: u64) {
    if seeds < 100 {
        return;
    }
    assert!(r.hits > seeds * 20, "too few hits: {r:?}");
    assert!(r.fills > seeds * 20, "too few fills: {r:?}");
    assert!(r.writes_ok > seeds * 10, "too few writes: {r:?}");
    assert!(r.writes_failed > seeds / 4, "too few failed writes: {r:?}");
    assert!(r.writes_unknown > 0, "no write of unknown outcome: {r:?}");
    assert!(
        r.duplicates > seeds / 2,
        "too few retried writes were duplicates: {r:?}"
    );
    assert!(r.invalidations > seeds * 5, "too few invalidations: {r:?}");
    assert!(r.recalls > seeds, "too few recalls: {r:?}");
    assert!(
        r.lease_waits > seeds / 4,
        "too few writes waited out a lease: {r:?}"
    );
    assert!(
        r.sessions_ended > seeds / 4,
        "too few sessions ended: {r:?}"
    );
    assert!(r.lease_lapses > seeds / 2, "too few leases ran out: {r:?}");
    assert!(r.epoch_changes > seeds / 2, "too few epoch changes: {r:?}");
    assert!(r.crashes > seeds / 4, "too few crashes: {r:?}");
    assert!(r.evictions > seeds, "too few evictions: {r:?}");
    assert!(r.expirations > seeds / 4, "too few TTL expiries: {r:?}");
    assert!(
        r.replies_not_cached > seeds,
        "too few replies raced a demand: {r:?}"
    );
}

#[test]
fn cache_protocol_holds_under_loss_partitions_pauses_drift_and_leader_changes() {
    let (r, seeds) = run_seeds("cache sim", 0, 2000, SimConfig::hostile);
    assert_exercised(&r, seeds);
    assert_eq!(
        r.local_writes, 0,
        "write-through runs write nothing locally"
    );
}

/// Write-back mode: the same world, with local writes, write-backs and losses, and what they
/// must exercise on top of the rest.
#[test]
fn write_back_mode_holds_under_the_same_faults_and_loses_only_what_it_may() {
    let (r, seeds) = run_seeds(
        "cache sim (write-back)",
        0,
        2000,
        SimConfig::hostile_write_back,
    );
    if seeds < 100 {
        return;
    }
    assert!(r.hits > seeds * 20, "too few hits: {r:?}");
    assert!(r.fills > seeds * 10, "too few fills: {r:?}");
    assert!(r.recalls > seeds, "too few recalls: {r:?}");
    assert!(r.invalidations > seeds, "too few invalidations: {r:?}");
    assert!(r.crashes > seeds / 4, "too few crashes: {r:?}");
    assert!(r.epoch_changes > seeds / 2, "too few epoch changes: {r:?}");
    assert!(r.local_writes > seeds * 2, "too few local writes: {r:?}");
    assert!(
        r.write_backs > seeds / 2,
        "too few write-backs (flushes): {r:?}"
    );
    assert!(
        r.eviction_write_backs >= seeds / 400,
        "too few eviction write-backs: {r:?}"
    );
    assert!(
        r.dirty_handed_over > seeds / 4,
        "too few dirty lines recalled or invalidated: {r:?}"
    );
    assert!(
        r.dirty_written_back > seeds / 4,
        "too few handed-over writes written back: {r:?}"
    );
    assert!(r.gave_up > seeds / 10, "too few holders given up on: {r:?}");
    assert!(r.lost_writes > seeds / 10, "too few lost writes: {r:?}");
}
