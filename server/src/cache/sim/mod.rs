//! # The deterministic simulator of the cache protocol
//!
//! A seeded world of 2 to 5 [`CacheNode`]s, one [`Directory`] and a memory, over a simulated
//! network that delays, reorders and drops messages and cuts nodes off from the directory (one
//! way or both). Every process reads its own drifting clock. The world pauses nodes (a long GC
//! pause: time passes, nothing runs), stops a node's lease renewals, crashes and restarts
//! nodes, jumps time forward, makes memory slow, fail and go down, gives caches tiny
//! capacities and values TTLs, and replaces the directory (a Raft leader change: a new epoch,
//! with memory fenced). Clients on every node read and write a handful of keys.
//!
//! After every event (a delivery, a tick, a memory answer, a client call) it checks the
//! properties of [`invariants`] over every line some node would serve as a hit at that
//! instant; when a client operation completes, it checks the answer against memory's history
//! and the client history. After the faults, it heals everything and checks that the protocol
//! works again: every node can write, every node then reads the value, and reads it again as
//! a hit.
//!
//! Everything random comes from the seed: a failure names it, and
//! `SYNCD_CACHE_SIM_SEED=<seed>` replays it (`SYNCD_CACHE_SIM_TRACE=1` prints every event).
//!
//! The world is also driven step by step by the scenario tests (`cache::tests`), with a calm
//! configuration, through its `start_*`, `wait`, `advance` and fault methods.

pub mod clock;
pub mod history;
pub mod invariants;
pub mod memory;
pub mod network;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bytes::Bytes;

use clock::Clock;
use history::{History, Instant};
use invariants::Servable;
use memory::{MemoryFaults, SimMemory};
use network::{Faults, Network, Packet};

use super::directory::HomeEffect;
use super::message::{Mutation, ToHome, Write, WriteResult, WriteTag};
use super::node::{Answer, Lookup, NodeEffect};
use super::view::ReadView;
use super::{CacheConfig, CacheError, CacheNode, Directory, Epoch, NodeId, OpId, Stored};
use crate::raft::rng::SplitMix64;

/// How many recent tagged writes clients may retry.
const RECENT_WRITES: usize = 8;

/// What a run does and how hostile its world is. Probabilities are per millisecond step.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Number of keys clients use.
    pub keys: usize,
    /// Milliseconds of faults and client traffic.
    pub steps: u64,
    /// Protocol settings (the capacity is chosen per node from `capacities`).
    pub cache: CacheConfig,
    /// Per-node cache capacities to choose from, in bytes.
    pub capacities: Vec<u64>,
    /// Largest rate error of any clock, in parts per million (ρ).
    pub max_drift_ppm: u64,
    /// Network faults.
    pub faults: Faults,
    /// Memory latency and failures.
    pub memory: MemoryFaults,
    /// A client operation starts.
    pub op: f64,
    /// Time jumps ahead by up to a lease (everything was slow for a while).
    pub time_jump: f64,
    /// A node is cut off from the directory.
    pub partition: f64,
    /// Every link heals.
    pub heal: f64,
    /// A node pauses for 10 to 159 ms.
    pub pause: f64,
    /// A node's renewals are lost for 50 to 299 ms.
    pub renewals_off: f64,
    /// A node crashes (restarting 20 to 219 ms later).
    pub crash: f64,
    /// The directory is replaced (a leader change).
    pub epoch_change: f64,
    /// Memory goes down for 10 to 109 ms.
    pub memory_outage: f64,
    /// A written value is padded with up to this many bytes (to fill tiny caches).
    pub pad_max: u64,
    /// A Set carries a TTL.
    pub ttl: f64,
    /// A write is a client's retry of one of the last few tagged writes (same key, same
    /// mutation, same tag), sent to any node: memory applies it at most once.
    pub retry: f64,
    /// Check recovery after the faults.
    pub liveness: bool,
    /// A new write carries a client tag (request header). Write-back mode serves only untagged
    /// writes locally.
    pub tag: f64,
    /// An operation on key `k` is issued on node `k mod nodes + 1` (if up): a node that owns
    /// its key keeps its exclusive line, so write-back mode writes locally.
    pub affinity: f64,
}

impl SimConfig {
    /// A hostile run; the number of nodes and the capacities vary with the seed.
    pub fn hostile(seed: u64) -> Self {
        SimConfig {
            nodes: 2 + (seed % 4) as usize,
            keys: 3,
            steps: 600,
            cache: CacheConfig {
                lease_ms: 100,
                drift_margin_ms: 6,
                renew_every_ms: 25,
                op_timeout_ms: 300,
                capacity_bytes: 400,
                max_value_bytes: 64,
                write_back: None,
            },
            capacities: vec![24, 48, 400],
            max_drift_ppm: 10_000,
            faults: Faults {
                drop: 0.03,
                duplicate: 0.02,
                max_delay: 4,
                straggle: 0.01,
            },
            memory: MemoryFaults {
                max_latency: 6,
                fail: 0.03,
            },
            op: 0.15,
            time_jump: 0.01,
            partition: 0.004,
            heal: 0.01,
            pause: 0.003,
            renewals_off: 0.003,
            crash: 0.001,
            epoch_change: 0.0015,
            memory_outage: 0.002,
            pad_max: 16,
            ttl: 0.2,
            retry: 0.1,
            liveness: true,
            tag: 1.0,
            affinity: 0.0,
        }
    }

    /// A hostile run in write-back mode: a short flush interval and small reservation blocks
    /// (so both run out), and mostly untagged writes without TTL (the ones served locally).
    pub fn hostile_write_back(seed: u64) -> Self {
        let mut cfg = SimConfig::hostile(seed);
        cfg.cache.write_back = Some(crate::cache::WriteBackConfig {
            flush_ms: 30,
            block: 4,
        });
        cfg.tag = 0.3;
        cfg.ttl = 0.05;
        cfg.affinity = 0.8;
        // Tight caches, so that dirty lines are chosen for eviction.
        cfg.capacities = vec![28, 40, 400];
        cfg
    }

    /// A perfect world for scripted scenarios: no faults, no drift, no random traffic, 1 ms
    /// messages, roomy caches.
    pub fn calm(nodes: usize) -> Self {
        SimConfig {
            nodes,
            steps: 0,
            capacities: vec![400],
            max_drift_ppm: 0,
            faults: Faults {
                drop: 0.0,
                duplicate: 0.0,
                max_delay: 1,
                straggle: 0.0,
            },
            memory: MemoryFaults {
                max_latency: 1,
                fail: 0.0,
            },
            op: 0.0,
            time_jump: 0.0,
            partition: 0.0,
            heal: 0.0,
            pause: 0.0,
            renewals_off: 0.0,
            crash: 0.0,
            epoch_change: 0.0,
            memory_outage: 0.0,
            retry: 0.0,
            liveness: false,
            ..SimConfig::hostile(0)
        }
    }
}

/// A broken property, with what is needed to replay it.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The run's seed.
    pub seed: u64,
    /// Real time (ms) when it was found.
    pub at_ms: u64,
    /// Which property.
    pub property: &'static str,
    /// What exactly.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} violated at {} ms: {}\n  replay with: SYNCD_CACHE_SIM_SEED={} \
             SYNCD_CACHE_SIM_TRACE=1 cargo test -p syncd --lib cache::sim -- --nocapture",
            self.seed, self.property, self.at_ms, self.detail, self.seed
        )
    }
}

impl std::error::Error for Violation {}

/// What a run did, to check that the runs exercise what they claim to.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Reads answered from a line.
    pub hits: u64,
    /// Reads answered by a fill.
    pub fills: u64,
    /// Reads that failed (timeout, memory down).
    pub reads_failed: u64,
    /// Writes acknowledged.
    pub writes_ok: u64,
    /// Writes refused by memory (Unavailable).
    pub writes_failed: u64,
    /// Writes with no answer in time.
    pub writes_unknown: u64,
    /// CompareAndSets that found another version.
    pub cas_mismatches: u64,
    /// Retried writes that memory answered as duplicates.
    pub duplicates: u64,
    /// Invalidations sent by directories.
    pub invalidations: u64,
    /// Recalls sent by directories.
    pub recalls: u64,
    /// Demands settled by a lease running out.
    pub lease_waits: u64,
    /// Sessions a directory ended.
    pub sessions_ended: u64,
    /// Directory replacements.
    pub epoch_changes: u64,
    /// Node crashes.
    pub crashes: u64,
    /// Lines evicted for room.
    pub evictions: u64,
    /// Lines expired by TTL.
    pub expirations: u64,
    /// Replies that could not install their line.
    pub replies_not_cached: u64,
    /// Leases that ran out.
    pub lease_lapses: u64,
    /// Write-back mode: writes served on a local line.
    pub local_writes: u64,
    /// Write-back mode: WriteBacks a node sent (flushes, evictions, waiting writes).
    pub write_backs_sent: u64,
    /// Write-back mode: WriteBacks a node sent for a dirty line chosen for eviction.
    pub eviction_write_backs: u64,
    /// Write-back mode: dirty writes handed over with a demand's acknowledgement.
    pub dirty_handed_over: u64,
    /// Write-back mode: handed-over writes the directory wrote back before a fill or write.
    pub dirty_written_back: u64,
    /// Write-back mode: holders' WriteBacks the directory wrote to memory.
    pub write_backs: u64,
    /// Write-back mode: times a directory gave up on an exclusive holder.
    pub gave_up: u64,
    /// Write-back mode: acknowledged local writes lost before they were written back.
    pub lost_writes: u64,
}

impl Report {
    /// Adds another run's figures.
    pub fn add(&mut self, o: &Report) {
        self.hits += o.hits;
        self.fills += o.fills;
        self.reads_failed += o.reads_failed;
        self.writes_ok += o.writes_ok;
        self.writes_failed += o.writes_failed;
        self.writes_unknown += o.writes_unknown;
        self.cas_mismatches += o.cas_mismatches;
        self.duplicates += o.duplicates;
        self.invalidations += o.invalidations;
        self.recalls += o.recalls;
        self.lease_waits += o.lease_waits;
        self.sessions_ended += o.sessions_ended;
        self.epoch_changes += o.epoch_changes;
        self.crashes += o.crashes;
        self.evictions += o.evictions;
        self.expirations += o.expirations;
        self.replies_not_cached += o.replies_not_cached;
        self.lease_lapses += o.lease_lapses;
        self.local_writes += o.local_writes;
        self.write_backs_sent += o.write_backs_sent;
        self.eviction_write_backs += o.eviction_write_backs;
        self.dirty_handed_over += o.dirty_handed_over;
        self.dirty_written_back += o.dirty_written_back;
        self.write_backs += o.write_backs;
        self.gave_up += o.gave_up;
        self.lost_writes += o.lost_writes;
    }
}

/// Runs one seeded simulation.
pub fn run(seed: u64, cfg: &SimConfig) -> Result<Report, Violation> {
    let mut w = World::new(seed, cfg.clone());
    w.run()?;
    Ok(w.finish())
}

/// Seeds to run: `SYNCD_CACHE_SIM_SEED` replays one; otherwise `count` seeds from `base`
/// (`SYNCD_CACHE_SIM_SEEDS` overrides the count).
pub fn seeds_from_env(base: u64, count: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("SYNCD_CACHE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("SYNCD_CACHE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(count);
    (base..base + count).collect()
}

type Check = Result<(), (&'static str, String)>;

fn fail(property: &'static str) -> impl FnOnce(String) -> (&'static str, String) {
    move |detail| (property, detail)
}

/// A node: its core (absent while crashed), its published read view, its clock and its
/// troubles.
struct SimNode {
    core: Option<CacheNode>,
    /// What the shell publishes for hits: updated after every call into the core, before that
    /// call's effects are carried out, as the shell does. Gets are served from it first.
    view: ReadView,
    clock: Clock,
    /// This node's cache settings (capacities differ between nodes).
    cfg: CacheConfig,
    /// Counts starts, so that each run's request ids differ.
    incarnation: u64,
    /// Runs nothing before this (a pause).
    paused_until: u64,
    /// Its lease renewals are lost before this.
    renewals_off_until: u64,
    /// While crashed: when it restarts.
    restart_at: u64,
}

/// The directory and the clock of the node it runs on.
struct SimHome {
    dir: Directory,
    clock: Clock,
}

/// A client operation in progress.
struct ClientOp {
    node: NodeId,
    key: String,
    started: Instant,
    /// `None` for a Get; the write's value (`None` for a Delete) otherwise.
    write: Option<Option<Bytes>>,
}

/// The simulated world.
pub struct World {
    cfg: SimConfig,
    seed: u64,
    rng: SplitMix64,
    /// Real time, in ms.
    now: u64,
    /// Event counter (the order the history uses).
    instant: Instant,
    nodes: BTreeMap<NodeId, SimNode>,
    /// The directory; `None` between two epochs.
    home: Option<SimHome>,
    /// When the next directory starts, during an epoch change.
    home_starts_at: Option<u64>,
    /// The latest epoch.
    epoch: Epoch,
    memory: SimMemory,
    net: Network,
    /// Current network faults (calmed for the recovery check).
    faults: Faults,
    /// Current memory faults.
    mem_faults: MemoryFaults,
    keys: Vec<String>,
    history: History,
    ops: BTreeMap<OpId, ClientOp>,
    /// Answers of finished operations, for scripts.
    answers: BTreeMap<OpId, Result<Answer, CacheError>>,
    last_op: OpId,
    /// The last few tagged writes, which clients may retry.
    recent_writes: Vec<(String, Write)>,
    /// Values of retried Sets: a retry may apply a value whose first attempt failed (even one
    /// still in flight), so "a failed write leaves no trace" cannot be checked for them.
    retried: BTreeSet<Bytes>,
    report: Report,
    trace: bool,
    /// Write-back mode: per node and key, the local writes not yet known to be in memory, with
    /// the node's clock when each was acknowledged.
    unflushed: BTreeMap<(NodeId, String), Vec<(u64, u64)>>,
    /// Write-back mode: the epoch of each node's local writes in `unflushed` (a write made
    /// under an epoch whose directory is gone is lost with it).
    unflushed_epoch: BTreeMap<(NodeId, String), Epoch>,
    /// The client operation being started, to tell a write answered in the same call (served
    /// locally) from one answered later.
    in_call: Option<OpId>,
}

impl World {
    /// A world with every node up and a directory of epoch 1 starting now.
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        let mut rng = SplitMix64(seed ^ 0x00CA_C4E5_11ED);
        let mut nodes = BTreeMap::new();
        for id in 1..=cfg.nodes as u64 {
            let pick = rng.below(cfg.capacities.len() as u64) as usize;
            let capacity = cfg
                .capacities
                .get(pick)
                .copied()
                .unwrap_or(cfg.cache.capacity_bytes);
            let node_cfg = CacheConfig {
                capacity_bytes: capacity,
                ..cfg.cache.clone()
            };
            nodes.insert(
                id,
                SimNode {
                    core: Some(CacheNode::new(id, node_cfg.clone(), 1)),
                    view: ReadView::default(),
                    clock: Clock::random(&mut rng, cfg.max_drift_ppm),
                    cfg: node_cfg,
                    incarnation: 1,
                    paused_until: 0,
                    renewals_off_until: 0,
                    restart_at: 0,
                },
            );
        }
        let clock = Clock::random(&mut rng, cfg.max_drift_ppm);
        let home = SimHome {
            dir: Directory::new(cfg.cache.clone(), 1, clock.local(0)),
            clock,
        };
        World {
            seed,
            rng,
            now: 0,
            instant: 0,
            nodes,
            home: Some(home),
            home_starts_at: None,
            epoch: 1,
            memory: SimMemory::default(),
            net: Network::default(),
            faults: cfg.faults.clone(),
            mem_faults: cfg.memory.clone(),
            keys: (0..cfg.keys).map(|k| format!("k{k}")).collect(),
            history: History::default(),
            ops: BTreeMap::new(),
            answers: BTreeMap::new(),
            last_op: 0,
            recent_writes: Vec::new(),
            retried: BTreeSet::new(),
            report: Report::default(),
            trace: std::env::var_os("SYNCD_CACHE_SIM_TRACE").is_some(),
            unflushed: BTreeMap::new(),
            unflushed_epoch: BTreeMap::new(),
            in_call: None,
            cfg,
        }
    }

    fn violation(&self, (property, detail): (&'static str, String)) -> Violation {
        Violation {
            seed: self.seed,
            at_ms: self.now,
            property,
            detail,
        }
    }

    /// Runs the hostile phase, then (if configured) the recovery check.
    pub fn run(&mut self) -> Result<(), Violation> {
        let result = self.run_inner();
        result.map_err(|v| self.violation(v))
    }

    fn run_inner(&mut self) -> Check {
        for _ in 0..self.cfg.steps {
            self.step(true)?;
        }
        if self.cfg.liveness {
            self.recovery()?;
        }
        Ok(())
    }

    /// The run's figures, with the counters of every node and directory still alive.
    pub fn finish(mut self) -> Report {
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.collect_node_stats(id);
        }
        self.collect_home_stats();
        self.report.duplicates = self.memory.duplicates;
        self.report
    }

    // ----- scripting -------------------------------------------------------------------------

    /// Real time, in ms.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Node `id`'s core (`None` while crashed).
    pub fn node(&self, id: NodeId) -> Option<&CacheNode> {
        self.nodes.get(&id).and_then(|n| n.core.as_ref())
    }

    /// Node `id`'s clock now.
    pub fn node_now(&self, id: NodeId) -> u64 {
        self.nodes.get(&id).map_or(0, |n| n.clock.local(self.now))
    }

    /// The directory (`None` during an epoch change).
    pub fn directory(&self) -> Option<&Directory> {
        self.home.as_ref().map(|h| &h.dir)
    }

    /// The directory's clock now.
    pub fn home_now(&self) -> u64 {
        self.home.as_ref().map_or(0, |h| h.clock.local(self.now))
    }

    /// Memory's current version of `key`.
    pub fn memory_version(&self, key: &str) -> u64 {
        self.memory.version(key)
    }

    /// Advances `ms` milliseconds without faults or random traffic.
    pub fn advance(&mut self, ms: u64) -> Result<(), Violation> {
        for _ in 0..ms {
            self.step(false).map_err(|v| self.violation(v))?;
        }
        Ok(())
    }

    /// Starts a Get on `node`; a hit is answered at once.
    pub fn start_get(&mut self, node: NodeId, key: &str) -> Result<OpId, Violation> {
        self.client_get(node, key).map_err(|v| self.violation(v))
    }

    /// Starts a write on `node`.
    pub fn start_write(&mut self, node: NodeId, key: &str, w: Write) -> Result<OpId, Violation> {
        self.client_write(node, key, w)
            .map_err(|v| self.violation(v))
    }

    /// The answer of operation `op` if it has come (without advancing time): a write answered
    /// in the call that started it was served locally.
    pub fn answered(&mut self, op: OpId) -> Option<Result<Answer, CacheError>> {
        self.answers.remove(&op)
    }

    /// Crashes node `id` now; it restarts `restart_in_ms` later.
    pub fn crash_node(&mut self, id: NodeId, restart_in_ms: u64) {
        self.crash(id, self.now + restart_in_ms);
    }

    /// Runs until operation `op` is answered or `max_ms` pass; returns its answer, if any.
    pub fn wait(
        &mut self,
        op: OpId,
        max_ms: u64,
    ) -> Result<Option<Result<Answer, CacheError>>, Violation> {
        self.wait_inner(op, max_ms).map_err(|v| self.violation(v))
    }

    /// Cuts `node` off from the directory (its messages out if `to_home`, in if `from_home`).
    pub fn cut(&mut self, node: NodeId, to_home: bool, from_home: bool) {
        self.net.cut(node, to_home, from_home);
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.net.heal();
    }

    /// Loses `node`'s lease renewals for `ms`.
    pub fn stop_renewals(&mut self, node: NodeId, ms: u64) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.renewals_off_until = self.now + ms;
        }
    }

    /// Memory refuses everything for `ms`.
    pub fn memory_outage(&mut self, ms: u64) {
        self.memory.outage(self.now, ms);
    }

    /// Replaces the directory: the current one stops now, the next (one epoch higher) starts
    /// `gap_ms` later.
    pub fn change_epoch(&mut self, gap_ms: u64) {
        self.collect_home_stats();
        self.home = None;
        self.epoch += 1;
        self.home_starts_at = Some(self.now + gap_ms);
        self.report.epoch_changes += 1;
        if self.trace {
            eprintln!(
                "{} ms: directory stops; epoch {} in {gap_ms} ms",
                self.now, self.epoch
            );
        }
    }

    // ----- one millisecond -------------------------------------------------------------------

    fn step(&mut self, chaos: bool) -> Check {
        self.now += 1;
        if chaos {
            if self.rng.chance(self.cfg.time_jump) {
                self.now += self.rng.below(self.cfg.cache.lease_ms);
            }
            self.chaos();
        }
        self.start_home()?;
        self.lose_all(None)?;
        self.restart_nodes();
        self.memory.step(&mut self.rng, &self.mem_faults, self.now);
        if let Some(epoch) = self.home.as_ref().map(|h| h.dir.epoch()) {
            for (id, result) in self.memory.take_answers(self.now, epoch) {
                let Some(home) = self.home.as_mut() else {
                    break;
                };
                let local = home.clock.local(self.now);
                if self.trace {
                    eprintln!("{} ms: memory answers {id}: {result:?}", self.now);
                }
                home.dir.on_memory(local, id, result);
                self.after_home(true)?;
            }
        }
        let now = self.now;
        let nodes = &self.nodes;
        let due = self.net.take_due(&mut self.rng, now, |p| match p {
            Packet::ToHome { .. } => true,
            Packet::ToNode { to, .. } => nodes.get(to).is_none_or(|n| n.paused_until <= now),
        });
        for p in due {
            self.deliver(p)?;
        }
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            let n = &self.nodes[&id];
            if n.paused_until > self.now {
                continue;
            }
            let local = n.clock.local(self.now);
            if let Some(core) = self.nodes.get_mut(&id).and_then(|n| n.core.as_mut()) {
                core.tick(local);
                self.after_node(id, false)?;
            }
        }
        if let Some(home) = self.home.as_mut() {
            home.dir.tick(home.clock.local(self.now));
            self.after_home(false)?;
        }
        // Time passing alone only ends leases and TTLs, which the ticks above report; one check
        // per millisecond covers what a quiet tick changes.
        self.check()?;
        if chaos {
            self.random_traffic()?;
        }
        Ok(())
    }

    fn deliver(&mut self, p: Packet) -> Check {
        if self.trace {
            eprintln!("{} ms: deliver {p:?}", self.now);
        }
        match p {
            Packet::ToHome { from, env } => {
                let Some(home) = self.home.as_mut() else {
                    return Ok(());
                };
                let local = home.clock.local(self.now);
                home.dir.on_message(local, from, env);
                self.after_home(true)
            }
            Packet::ToNode { to, env } => {
                let Some(n) = self.nodes.get_mut(&to) else {
                    return Ok(());
                };
                let local = n.clock.local(self.now);
                let Some(core) = n.core.as_mut() else {
                    return Ok(());
                };
                core.on_message(local, env);
                self.after_node(to, true)
            }
        }
    }

    /// Carries out a node's effects, then checks the invariants (`always`, or if there were
    /// effects: a tick without effects changed nothing but time).
    fn after_node(&mut self, id: NodeId, always: bool) -> Check {
        let Some(n) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        let renewals_off = self.now < n.renewals_off_until;
        // Publish first: an acknowledgement among the effects must not leave before the view
        // has dropped the line it acknowledges.
        if let Some(c) = n.core.as_mut() {
            n.view.apply(c.take_view_changes());
        }
        let effects = n
            .core
            .as_mut()
            .map(|c| c.take_effects())
            .unwrap_or_default();
        if !always && effects.is_empty() {
            return Ok(());
        }
        for e in effects {
            match e {
                NodeEffect::ToHome(env) => {
                    if renewals_off && matches!(env.msg, ToHome::LeaseRenew { .. }) {
                        continue;
                    }
                    let p = Packet::ToHome { from: id, env };
                    self.net.send(&mut self.rng, &self.faults, self.now, p);
                }
                NodeEffect::Done { op, result } => self.on_done(op, result)?,
                NodeEffect::Invalidated(_) => {}
            }
        }
        self.check()
    }

    /// Carries out the directory's effects, then checks the invariants (`always`, or if there
    /// were effects).
    fn after_home(&mut self, always: bool) -> Check {
        let Some(home) = self.home.as_mut() else {
            return Ok(());
        };
        let effects = home.dir.take_effects();
        if !always && effects.is_empty() {
            return Ok(());
        }
        for e in effects {
            match e {
                HomeEffect::ToNode { to, msg } => {
                    let p = Packet::ToNode { to, env: msg };
                    self.net.send(&mut self.rng, &self.faults, self.now, p);
                }
                HomeEffect::Memory(req) => {
                    if self.trace {
                        eprintln!("{} ms: memory request {req:?}", self.now);
                    }
                    self.memory
                        .submit(&mut self.rng, &self.mem_faults, self.now, req);
                }
                HomeEffect::GaveUp { node, key } => {
                    self.report.gave_up += 1;
                    if let Some(n) = self.nodes.get(&node) {
                        let line = n.view.servable(n.clock.local(self.now), &key);
                        invariants::given_up_holder_serves_nothing_newer(
                            &key,
                            node,
                            line,
                            &self.memory,
                        )
                        .map_err(fail(
                            "a holder given up on serves nothing newer than memory",
                        ))?;
                    }
                    self.lose(node, &key)?;
                }
            }
        }
        self.check()
    }

    /// Node `node`'s local writes of `key` that memory does not hold are lost: they leave the
    /// checks of guarantees 1 and 2, and must all lie within one flush interval.
    fn lose(&mut self, node: NodeId, key: &str) -> Check {
        self.unflushed_epoch.remove(&(node, key.to_string()));
        let Some(entries) = self.unflushed.remove(&(node, key.to_string())) else {
            return Ok(());
        };
        let lost: Vec<(u64, u64)> = entries
            .into_iter()
            .filter(|&(v, _)| !self.memory.written_back(key, v))
            .collect();
        if let Some(wb) = &self.cfg.cache.write_back {
            let acked: Vec<u64> = lost.iter().map(|&(_, at)| at).collect();
            invariants::lost_writes_within_flush_interval(key, node, &acked, wb.flush_ms)
                .map_err(fail("lost writes lie within one flush interval"))?;
        }
        for (v, _) in lost {
            if self.trace {
                eprintln!(
                    "{} ms: node {node}'s write of {key} version {v} is lost",
                    self.now
                );
            }
            self.report.lost_writes += 1;
            self.history.lose(key, v);
        }
        Ok(())
    }

    /// Every local write of `node` not in memory is lost (it crashed); with `None`, every
    /// local write made under an older epoch than the latest (its directory is gone).
    fn lose_all(&mut self, node: Option<NodeId>) -> Check {
        let latest = self.epoch;
        let keys: Vec<(NodeId, String)> = self
            .unflushed_epoch
            .iter()
            .filter(|&(&(n, _), &e)| node.map_or(e < latest, |id| id == n))
            .map(|(k, _)| k.clone())
            .collect();
        for (n, key) in keys {
            self.lose(n, &key)?;
        }
        Ok(())
    }

    /// The properties that hold at every instant, for every key.
    fn check(&mut self) -> Check {
        self.instant += 1;
        invariants::versions_never_reused(&self.memory)
            .map_err(fail("versions are never reused"))?;
        let home = self
            .home
            .as_ref()
            .map(|h| (&h.dir, h.clock.local(self.now)));
        for key in &self.keys {
            for (&node, n) in &self.nodes {
                let now = n.clock.local(self.now);
                let core = n.core.as_ref().and_then(|c| c.servable(now, key));
                invariants::view_matches_core(key, node, core, n.view.servable(now, key))
                    .map_err(fail("the read view serves what the core serves"))?;
            }
            // What readers are served: the published views.
            let lines: Vec<Servable> = self
                .nodes
                .iter()
                .filter_map(|(&node, n)| {
                    let line = n.view.servable(n.clock.local(self.now), key)?;
                    Some(Servable { node, line })
                })
                .collect();
            invariants::single_writer_multiple_readers(key, &lines)
                .map_err(fail("single writer / multiple readers"))?;
            invariants::servable_lines_match_memory(
                key,
                &lines,
                &self.memory,
                &self.history,
                self.instant,
            )
            .map_err(fail("servable lines match memory"))?;
            if let Some((dir, dir_now)) = home {
                invariants::directory_records_are_swmr(key, dir).map_err(fail(
                    "directory records are single writer / multiple readers",
                ))?;
                invariants::directory_covers_servable_lines(key, &lines, dir, dir_now)
                    .map_err(fail("the directory covers every servable line"))?;
            }
        }
        Ok(())
    }

    // ----- clients ---------------------------------------------------------------------------

    fn random_traffic(&mut self) -> Check {
        if !self.rng.chance(self.cfg.op) {
            return Ok(());
        }
        let up: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.core.is_some() && n.paused_until <= self.now)
            .map(|(&id, _)| id)
            .collect();
        if up.is_empty() {
            return Ok(());
        }
        let node = up[self.rng.below(up.len() as u64) as usize];
        let pick = self.rng.below(self.keys.len() as u64) as usize;
        let Some(key) = self.keys.get(pick).cloned() else {
            return Ok(());
        };
        let owner = pick as u64 % self.nodes.len() as u64 + 1;
        let node =
            if self.cfg.affinity > 0.0 && up.contains(&owner) && self.rng.chance(self.cfg.affinity)
            {
                owner
            } else {
                node
            };
        let roll = self.rng.below(100);
        if roll < 70 {
            self.client_get(node, &key)?;
            return Ok(());
        }
        if !self.recent_writes.is_empty() && self.rng.chance(self.cfg.retry) {
            let pick = self.rng.below(self.recent_writes.len() as u64) as usize;
            let (key, write) = self.recent_writes[pick].clone();
            if let Mutation::Set { value, .. } = &write.mutation {
                self.retried.insert(value.clone());
            }
            self.client_op(node, &key, Some(write))?;
            return Ok(());
        }
        let mutation = if roll < 95 {
            let value = self.fresh_value(node, true);
            let ttl_ms = self
                .rng
                .chance(self.cfg.ttl)
                .then(|| 20 + self.rng.below(200));
            Mutation::Set { value, ttl_ms }
        } else {
            Mutation::Delete
        };
        // A CompareAndSet expects a version this node may have seen, or memory's, or none.
        let expect = (roll >= 85).then(|| match self.rng.below(3) {
            0 => 0,
            1 => self.memory.version(&key),
            _ => self.memory.version(&key).saturating_sub(1),
        });
        // (A write-through run draws nothing here: its seeds replay as before.)
        let tagged = self.cfg.tag >= 1.0 || self.rng.chance(self.cfg.tag);
        let tag = tagged.then_some(WriteTag {
            client_id: node,
            sequence: self.last_op + 1,
            lowest_unacked: 0,
        });
        let write = Write {
            mutation,
            expect,
            tag,
        };
        if tag.is_some() {
            if self.recent_writes.len() == RECENT_WRITES {
                self.recent_writes.remove(0);
            }
            self.recent_writes.push((key.clone(), write.clone()));
        }
        self.client_write(node, &key, write)?;
        Ok(())
    }

    /// A value no other write uses, padded to a random length if `pad`.
    fn fresh_value(&mut self, node: NodeId, pad: bool) -> Bytes {
        let pad = if pad {
            self.rng.below(self.cfg.pad_max + 1) as usize
        } else {
            0
        };
        let mut v = format!("n{node}o{}", self.last_op + 1).into_bytes();
        v.resize(v.len() + pad, b'.');
        Bytes::from(v)
    }

    fn client_get(&mut self, node: NodeId, key: &str) -> Result<OpId, (&'static str, String)> {
        self.client_op(node, key, None)
    }

    fn client_write(
        &mut self,
        node: NodeId,
        key: &str,
        w: Write,
    ) -> Result<OpId, (&'static str, String)> {
        self.client_op(node, key, Some(w))
    }

    /// Starts a Get (`write` is `None`) or a write on `node`; nothing happens if it is down.
    fn client_op(
        &mut self,
        node: NodeId,
        key: &str,
        write: Option<Write>,
    ) -> Result<OpId, (&'static str, String)> {
        self.last_op += 1;
        let op = self.last_op;
        let Some(n) = self.nodes.get_mut(&node) else {
            return Ok(op);
        };
        let local = n.clock.local(self.now);
        let Some(core) = n.core.as_mut() else {
            return Ok(op);
        };
        self.instant += 1;
        let pending = ClientOp {
            node,
            key: key.to_string(),
            started: self.instant,
            write: write.as_ref().map(|w| match &w.mutation {
                Mutation::Set { value, .. } => Some(value.clone()),
                Mutation::Delete => None,
            }),
        };
        // `Some(read)`: a hit, answered at once: from the published view, as the shell serves
        // it, with the use reported to the core's LRU order; the core's own hit path otherwise.
        let viewed = match write {
            None => n.view.hit(local, key).map(|(read, _)| read),
            Some(_) => None,
        };
        let outcome = match (viewed, write) {
            (Some(read), _) => {
                core.touch(key);
                Ok(Some(read))
            }
            (None, None) => core.get(local, op, key).map(|lookup| match lookup {
                Lookup::Hit(read) => Some(read),
                Lookup::Pending => None,
            }),
            (None, Some(w)) => core.write(local, op, key, w).map(|()| None),
        };
        match outcome {
            Ok(Some(read)) => {
                self.report.hits += 1;
                self.check_read(key, pending.started, &read.stored, true)?;
                self.answers.insert(op, Ok(Answer::Read(read)));
            }
            Ok(None) => {
                self.ops.insert(op, pending);
            }
            // Too large for this node's cache: refused before anything happened.
            Err(e @ CacheError::ResourceExhausted(_)) => {
                self.answers.insert(op, Err(e));
            }
            Err(e) => return Err(("requests are well-formed", format!("{key}: {e}"))),
        }
        self.in_call = Some(op);
        let checked = self.after_node(node, true);
        self.in_call = None;
        checked?;
        Ok(op)
    }

    fn on_done(&mut self, op: OpId, result: Result<Answer, CacheError>) -> Check {
        let Some(c) = self.ops.remove(&op) else {
            return Err((
                "every operation is answered once",
                format!("operation {op} answered but not outstanding"),
            ));
        };
        self.instant += 1;
        if self.trace {
            eprintln!(
                "{} ms: node {} op {op} on {} -> {result:?}",
                self.now, c.node, c.key
            );
        }
        let key = c.key.as_str();
        match (&c.write, &result) {
            (None, Ok(Answer::Read(read))) => {
                self.report.fills += 1;
                self.check_read(key, c.started, &read.stored, false)?;
            }
            (None, Err(_)) => self.report.reads_failed += 1,
            (Some(Some(value)), Ok(Answer::Write(WriteResult::Applied { version, .. })))
                if self.in_call == Some(op) =>
            {
                // Served on the node's own line (write-back mode): memory has it later, if ever.
                self.memory.record_local(key, *version, value.clone());
                invariants::versions_never_reused(&self.memory)
                    .map_err(fail("versions are never reused"))?;
                let n = self.nodes.get(&c.node);
                let at = n.map_or(0, |n| n.clock.local(self.now));
                let epoch = n
                    .and_then(|n| n.core.as_ref())
                    .map_or(0, |c| c.stamp().epoch);
                let k = (c.node, key.to_string());
                if self.unflushed_epoch.get(&k).is_some_and(|&e| e != epoch) {
                    // Writes of an older epoch are lost (caught on the epoch's change).
                    self.lose(c.node, key)?;
                }
                self.unflushed_epoch.insert(k.clone(), epoch);
                // The writes at risk (not in memory yet) always lie within one flush interval,
                // whether or not they are lost later.
                let memory = &self.memory;
                let entries = self.unflushed.entry(k).or_default();
                entries.retain(|&(v, _)| !memory.written_back(key, v));
                entries.push((*version, at));
                if let Some(wb) = &self.cfg.cache.write_back {
                    let acked: Vec<u64> = entries.iter().map(|&(_, at)| at).collect();
                    invariants::lost_writes_within_flush_interval(key, c.node, &acked, wb.flush_ms)
                        .map_err(fail("writes at risk lie within one flush interval"))?;
                }
                self.history.write_completed(key, self.instant, *version);
                self.report.writes_ok += 1;
            }
            (Some(value), Ok(Answer::Write(WriteResult::Applied { version, .. }))) => {
                invariants::versions_never_reused(&self.memory)
                    .map_err(fail("versions are never reused"))?;
                invariants::acknowledged_write_was_applied(
                    &self.memory,
                    key,
                    *version,
                    value.as_ref(),
                )
                .map_err(fail("acknowledged writes were applied"))?;
                self.history.write_completed(key, self.instant, *version);
                self.report.writes_ok += 1;
            }
            (Some(_), Ok(Answer::Write(WriteResult::Mismatch { .. }))) => {
                self.report.cas_mismatches += 1;
            }
            (Some(value), Err(CacheError::Unavailable(_))) => {
                if let Some(v) = value.as_ref().filter(|v| !self.retried.contains(*v)) {
                    invariants::failed_write_left_no_trace(&self.memory, key, v)
                        .map_err(fail("a failed write leaves no trace"))?;
                }
                self.report.writes_failed += 1;
            }
            (Some(_), Err(_)) => self.report.writes_unknown += 1,
            (_, other) => {
                return Err((
                    "answers match requests",
                    format!("operation {op} on {key} answered {other:?}"),
                ));
            }
        }
        self.answers.insert(op, result);
        Ok(())
    }

    fn check_read(&mut self, key: &str, started: Instant, read: &Stored, hit: bool) -> Check {
        invariants::read_value_was_written(&self.memory, key, read)
            .map_err(fail("no phantom values"))?;
        invariants::read_sees_completed_writes(&self.history, key, started, read.version)
            .map_err(fail("no stale read"))?;
        invariants::read_sees_completed_reads(&self.history, key, started, read.version)
            .map_err(fail("reads do not go back in time"))?;
        if hit {
            invariants::hit_not_expired(
                &self.memory,
                key,
                read.version,
                self.now,
                self.cfg.max_drift_ppm,
            )
            .map_err(fail("no hit after the TTL"))?;
        }
        self.history.read_completed(key, self.instant, read.version);
        Ok(())
    }

    // ----- faults ----------------------------------------------------------------------------

    fn chaos(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let pick = |rng: &mut SplitMix64| {
            let i = rng.below(ids.len() as u64) as usize;
            ids.get(i).copied().unwrap_or(0)
        };
        if self.rng.chance(self.cfg.partition) {
            let node = pick(&mut self.rng);
            let (to_home, from_home) = match self.rng.below(3) {
                0 => (true, false),
                1 => (false, true),
                _ => (true, true),
            };
            self.cut(node, to_home, from_home);
        }
        if self.rng.chance(self.cfg.heal) {
            self.net.heal();
        }
        if self.rng.chance(self.cfg.pause) {
            let node = pick(&mut self.rng);
            let until = self.now + 10 + self.rng.below(150);
            if let Some(n) = self.nodes.get_mut(&node) {
                n.paused_until = until;
            }
        }
        if self.rng.chance(self.cfg.renewals_off) {
            let node = pick(&mut self.rng);
            let ms = 50 + self.rng.below(250);
            self.stop_renewals(node, ms);
        }
        if self.rng.chance(self.cfg.crash) {
            let node = pick(&mut self.rng);
            let restart_at = self.now + 20 + self.rng.below(200);
            self.crash(node, restart_at);
        }
        if self.home.is_some() && self.rng.chance(self.cfg.epoch_change) {
            let gap = self.rng.below(40);
            self.change_epoch(gap);
        }
        if self.rng.chance(self.cfg.memory_outage) {
            let ms = 10 + self.rng.below(100);
            self.memory_outage(ms);
        }
    }

    fn crash(&mut self, id: NodeId, restart_at: u64) {
        self.collect_node_stats(id);
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        if n.core.take().is_none() {
            return;
        }
        // The process is gone, and what it published with it.
        n.view = ReadView::default();
        n.restart_at = restart_at;
        self.net.drop_to(id);
        self.ops.retain(|_, c| c.node != id);
        self.report.crashes += 1;
        // A crash can only lose writes, never break a check: the result is known to be Ok.
        let _ = self.lose_all(Some(id));
        if self.trace {
            eprintln!("{} ms: node {id} crashes", self.now);
        }
    }

    fn restart_nodes(&mut self) {
        for (&id, n) in self.nodes.iter_mut() {
            if n.core.is_none() && n.restart_at <= self.now {
                n.incarnation += 1;
                n.core = Some(CacheNode::new(id, n.cfg.clone(), n.incarnation));
            }
        }
    }

    /// Starts the next directory once an epoch change's gap is over. Memory is fenced first:
    /// the new leader commits or truncates the old one's entries before it serves.
    fn start_home(&mut self) -> Check {
        let Some(at) = self.home_starts_at else {
            return Ok(());
        };
        if self.now < at {
            return Ok(());
        }
        self.home_starts_at = None;
        self.memory.fence(&mut self.rng, self.now, self.epoch);
        let clock = Clock::random(&mut self.rng, self.cfg.max_drift_ppm);
        let dir = Directory::new(self.cfg.cache.clone(), self.epoch, clock.local(self.now));
        self.home = Some(SimHome { dir, clock });
        if self.trace {
            eprintln!("{} ms: directory of epoch {} starts", self.now, self.epoch);
        }
        // Some nodes hear of the new leader from Raft before the directory talks to them.
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            let n = &self.nodes[&id];
            if n.paused_until > self.now || !self.rng.chance(0.5) {
                continue;
            }
            let local = n.clock.local(self.now);
            if let Some(core) = self.nodes.get_mut(&id).and_then(|n| n.core.as_mut()) {
                core.on_new_epoch(local, self.epoch);
                self.after_node(id, true)?;
            }
        }
        self.check()
    }

    /// Heals everything, lets leases and the new-epoch wait settle, then checks the protocol
    /// works: each node writes a key, every node reads it back, and reads it again as a hit.
    fn recovery(&mut self) -> Check {
        self.net.heal();
        self.memory.heal();
        self.faults = Faults {
            drop: 0.0,
            duplicate: 0.0,
            max_delay: 2,
            straggle: 0.0,
        };
        self.mem_faults.fail = 0.0;
        for n in self.nodes.values_mut() {
            n.paused_until = 0;
            n.renewals_off_until = 0;
            n.restart_at = 0;
        }
        if self.home.is_none() {
            self.home_starts_at = Some(self.now);
        }
        // Straggling messages, old leases and the new-epoch wait all end within this.
        let settle = 200 + 3 * self.cfg.cache.directory_lease_ms();
        for _ in 0..settle {
            self.step(false)?;
        }
        let Some(key) = self.keys.first().cloned() else {
            return Ok(());
        };
        let patience = self.cfg.cache.op_timeout_ms;
        for writer in self.nodes.keys().copied().collect::<Vec<_>>() {
            let value = self.fresh_value(writer, false);
            let mutation = Mutation::Set {
                value,
                ttl_ms: None,
            };
            let op = self.client_write(
                writer,
                &key,
                Write {
                    mutation,
                    expect: None,
                    tag: None,
                },
            )?;
            let version = match self.wait_inner(op, patience)? {
                Some(Ok(Answer::Write(WriteResult::Applied { version, .. }))) => version,
                other => return Err(("recovery", format!("node {writer}'s write: {other:?}"))),
            };
            for reader in self.nodes.keys().copied().collect::<Vec<_>>() {
                for attempt in ["first", "second"] {
                    let op = self.client_get(reader, &key)?;
                    let read = match self.wait_inner(op, patience)? {
                        Some(Ok(Answer::Read(read))) => read,
                        other => {
                            return Err(("recovery", format!("node {reader}'s read: {other:?}")));
                        }
                    };
                    if read.stored.version != version || (attempt == "second" && !read.hit) {
                        return Err((
                            "recovery",
                            format!(
                                "node {reader}'s {attempt} read after node {writer}'s write of \
                                 version {version}: {read:?}"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn wait_inner(
        &mut self,
        op: OpId,
        max_ms: u64,
    ) -> Result<Option<Result<Answer, CacheError>>, (&'static str, String)> {
        for _ in 0..=max_ms {
            if let Some(a) = self.answers.remove(&op) {
                return Ok(Some(a));
            }
            self.step(false)?;
        }
        Ok(self.answers.remove(&op))
    }

    fn collect_node_stats(&mut self, id: NodeId) {
        let Some(core) = self.nodes.get(&id).and_then(|n| n.core.as_ref()) else {
            return;
        };
        let (s, _, _) = core.stats();
        self.report.evictions += s.evictions;
        self.report.expirations += s.expirations;
        self.report.replies_not_cached += s.replies_not_cached;
        self.report.lease_lapses += s.lease_lapses;
        self.report.local_writes += s.local_writes;
        self.report.write_backs_sent += s.write_backs;
        self.report.eviction_write_backs += s.eviction_write_backs;
        self.report.dirty_handed_over += s.dirty_handed_over;
    }

    fn collect_home_stats(&mut self) {
        if let Some(h) = self.home.as_ref() {
            let s = h.dir.stats();
            self.report.invalidations += s.invalidations_sent;
            self.report.recalls += s.recalls_sent;
            self.report.lease_waits += s.lease_waits;
            self.report.sessions_ended += s.sessions_ended;
            self.report.dirty_written_back += s.dirty_written_back;
            self.report.write_backs += s.write_backs;
        }
    }
}
