//! Deterministic simulation of Raft clusters: thousands of seeded runs per configuration, each
//! checked after every step for election safety, log matching, leader completeness, state
//! machine safety, immutability of committed entries, exactly-once application of acknowledged
//! writes and linearizable reads, and for liveness once the faults heal.
//!
//! A failure prints its seed; replay it with `SYNCD_SIM_SEED=<seed>`. Soak with
//! `SYNCD_SIM_SEEDS=<count>` (see the README).

use syncd::raft::ReadOnlyOption;
use syncd::raft::sim::{Report, SimConfig, run, seeds_from_env};

/// Runs every seed and checks that, taken together, the runs exercised what they claim to.
fn run_seeds(name: &str, cfg: &SimConfig, base: u64, count: u64) -> Report {
    let mut total = Report::default();
    let seeds = seeds_from_env(base, count);
    let started = std::time::Instant::now();
    for &seed in &seeds {
        let outcome = std::panic::catch_unwind(|| run(seed, cfg)).unwrap_or_else(|_| {
            panic!(
                "{name}: seed {seed} panicked (an engine assertion); replay with: \
                 SYNCD_SIM_SEED={seed} cargo test -p syncd --test raft_sim -- --nocapture"
            )
        });
        let r = outcome.unwrap_or_else(|v| panic!("{name}: {v}"));
        total.acked_writes += r.acked_writes;
        total.reads += r.reads;
        total.elections += r.elections;
        total.crashes += r.crashes;
        total.snapshots_installed += r.snapshots_installed;
        total.membership_changes += r.membership_changes;
        total.rounds_to_commit_after_heal = total
            .rounds_to_commit_after_heal
            .max(r.rounds_to_commit_after_heal);
        total.max_term = total.max_term.max(r.max_term);
        total.pipelined += r.pipelined;
        total.appends_lost += r.appends_lost;
        total.appends_reordered += r.appends_reordered;
        total.probe_fallbacks += r.probe_fallbacks;
    }
    eprintln!(
        "{name}: {} seeds in {:.1?}: {} acked writes, {} reads, {} elections, {} crashes, \
         {} snapshots installed, {} membership changes, worst recovery {} rounds, max term {}; \
         pipeline: {} pipelined Readies, {} appends lost, {} reordered, {} probe fallbacks",
        seeds.len(),
        started.elapsed(),
        total.acked_writes,
        total.reads,
        total.elections,
        total.crashes,
        total.snapshots_installed,
        total.membership_changes,
        total.rounds_to_commit_after_heal,
        total.max_term,
        total.pipelined,
        total.appends_lost,
        total.appends_reordered,
        total.probe_fallbacks
    );
    total
}

/// The runs must have exercised every fault and feature, or a pass would mean nothing.
fn assert_exercised(r: &Report, seeds: u64) {
    if seeds < 50 {
        return;
    }
    assert!(
        r.acked_writes > seeds * 10,
        "too few writes acknowledged: {r:?}"
    );
    assert!(r.reads > seeds * 5, "too few reads completed: {r:?}");
    assert!(r.crashes > seeds, "too few crashes: {r:?}");
    assert!(
        r.snapshots_installed > 0,
        "no snapshot was ever installed: {r:?}"
    );
    assert!(
        r.membership_changes > seeds / 2,
        "too few membership changes: {r:?}"
    );
    assert!(r.elections > seeds * 2, "too few elections: {r:?}");
    // The replication pipeline: several AppendEntries in flight to one follower, some lost,
    // some overtaken by later ones, and rejections that send a follower back to probing.
    assert!(
        r.pipelined > seeds * 50,
        "the pipeline was rarely used: {r:?}"
    );
    assert!(
        r.appends_lost > seeds * 5,
        "too few AppendEntries lost: {r:?}"
    );
    assert!(
        r.appends_reordered > seeds * 20,
        "too few AppendEntries reordered: {r:?}"
    );
    assert!(
        r.probe_fallbacks > seeds * 5,
        "too few fallbacks from Replicate to Probe: {r:?}"
    );
}

#[test]
fn three_members_under_partitions_crashes_and_membership_changes() {
    let cfg = SimConfig::hostile(3);
    let seeds = seeds_from_env(0, 5000).len() as u64;
    let r = run_seeds("3 members", &cfg, 0, 5000);
    assert_exercised(&r, seeds);
}

#[test]
fn five_members_under_partitions_crashes_and_membership_changes() {
    let cfg = SimConfig::hostile(5);
    let seeds = seeds_from_env(1_000_000, 5000).len() as u64;
    let r = run_seeds("5 members", &cfg, 1_000_000, 5000);
    assert_exercised(&r, seeds);
}

#[test]
fn lease_reads_are_linearizable_when_clocks_agree() {
    let mut cfg = SimConfig::hostile(3);
    cfg.lockstep_ticks = true;
    cfg.read_only = ReadOnlyOption::LeaseBased;
    cfg.read = 0.5;
    let seeds = seeds_from_env(2_000_000, 500).len() as u64;
    let r = run_seeds("lease reads", &cfg, 2_000_000, 500);
    assert_exercised(&r, seeds);
}

#[test]
fn plain_raft_without_pre_vote_or_check_quorum() {
    let mut cfg = SimConfig::hostile(3);
    cfg.pre_vote = false;
    cfg.check_quorum = false;
    let seeds = seeds_from_env(3_000_000, 500).len() as u64;
    let r = run_seeds("plain raft", &cfg, 3_000_000, 500);
    assert_exercised(&r, seeds);
}
