//! The model check: thousands of seeded hostile runs, each checked after every event.
//!
//! `SYNCD_CACHE_SIM_SEEDS=<n>` runs more seeds (a soak); `SYNCD_CACHE_SIM_SEED=<seed>` replays
//! one, and `SYNCD_CACHE_SIM_TRACE=1` prints its events.

use super::{Report, SimConfig, run, seeds_from_env};

/// Runs every seed from `base`, panicking with the replay line on the first violation.
fn run_seeds(name: &str, base: u64, count: u64, tweak: impl Fn(&mut SimConfig)) -> (Report, u64) {
    let seeds = seeds_from_env(base, count);
    let started = std::time::Instant::now();
    let mut total = Report::default();
    for &seed in &seeds {
        let mut cfg = SimConfig::hostile(seed);
        tweak(&mut cfg);
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
/// demand, leases that ran out, evictions, expiries, crashes and epoch changes.
fn assert_exercised(r: &Report, seeds: u64) {
    if seeds < 100 {
        return;
    }
    assert!(r.hits > seeds * 20, "too few hits: {r:?}");
    assert!(r.fills > seeds * 20, "too few fills: {r:?}");
    assert!(r.writes_ok > seeds * 10, "too few writes: {r:?}");
    assert!(r.writes_failed > seeds / 4, "too few failed writes: {r:?}");
    assert!(r.writes_unknown > 0, "no write of unknown outcome: {r:?}");
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
    let (r, seeds) = run_seeds("cache sim", 0, 2000, |_| {});
    assert_exercised(&r, seeds);
}
