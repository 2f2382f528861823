//! # The deterministic cluster simulator
//!
//! A seeded cluster of [`RaftNode`]s over a simulated network that drops, duplicates, reorders
//! and delays messages, cuts links both ways and one way, crashes members (losing whatever they
//! had not yet made durable) and restarts them from their durable state, takes snapshots,
//! transfers leadership, and changes membership. Clients write through whichever member they
//! believe leads, retrying with the same request id, and read through ReadIndex.
//!
//! After every Ready it checks the properties in [`invariants`]; after the faults heal it checks
//! liveness: a leader commits a new proposal within a bounded number of rounds, and every member
//! converges. Everything random comes from one seed, so a failing run replays exactly:
//! [`run`] returns a [`Violation`] that names its seed.
//!
//! One round is one tick of every member's clock (or, with clock drift, of most of them) plus
//! the delivery of every message due by then.

pub mod invariants;
pub mod mem_cluster;
pub mod network;
pub mod state_machine;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use bytes::Bytes;
use sync_proto::raft::v1 as pb;

use invariants::{ClientHistory, History};
use network::{Fate, Faults, Network, Packet};
use state_machine::{Applied, Durable, Snapshot, StateMachine, encode_command};

use super::rng::SplitMix64;
use super::{
    ClusterConfigExt, Config, ConfigChange, Message, NodeId, ProgressState, RaftNode,
    ReadOnlyOption, Role,
};

/// What a simulation run does and how hostile its world is.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Founding voters.
    pub voters: usize,
    /// Extra members that may be added during the run.
    pub spares: usize,
    /// Rounds with faults.
    pub chaos_rounds: u64,
    /// Network faults during the chaotic phase.
    pub faults: Faults,
    /// Per round: probability that a live member crashes.
    pub crash: f64,
    /// Per round: probability that a crashed member restarts.
    pub restart: f64,
    /// Per Ready: probability of crashing after sending the leader's messages but before
    /// persisting.
    pub crash_before_persist: f64,
    /// Per round: probability of a new partition.
    pub partition: f64,
    /// Per round: probability that all links heal.
    pub heal: f64,
    /// Per round: probability of a membership change.
    pub membership: f64,
    /// Per round: probability that a member snapshots and compacts its log.
    pub compact: f64,
    /// Per round: probability of a leadership transfer.
    pub transfer: f64,
    /// Number of clients.
    pub clients: usize,
    /// Per round and client: probability of a new write.
    pub write: f64,
    /// Per round: probability of a linearizable read.
    pub read: f64,
    /// Every member ticks every round (no clock drift). Required for lease-based reads.
    pub lockstep_ticks: bool,
    /// How reads are confirmed.
    pub read_only: ReadOnlyOption,
    /// Engine setting: pre-vote.
    pub pre_vote: bool,
    /// Engine setting: check-quorum.
    pub check_quorum: bool,
    /// Election timeout base, in ticks.
    pub election_tick: u32,
    /// Rounds allowed after healing for a leader to commit a new proposal, and again for every
    /// member to catch up.
    pub liveness_rounds: u64,
}

impl SimConfig {
    /// A hostile run over `voters` founding members.
    pub fn hostile(voters: usize) -> Self {
        SimConfig {
            voters,
            spares: 2,
            chaos_rounds: 300,
            faults: Faults {
                drop: 0.05,
                duplicate: 0.03,
                max_delay: 3,
                straggle: 0.03,
            },
            crash: 0.01,
            restart: 0.08,
            crash_before_persist: 0.002,
            partition: 0.01,
            heal: 0.03,
            membership: 0.01,
            compact: 0.02,
            transfer: 0.005,
            clients: 3,
            write: 0.3,
            read: 0.2,
            lockstep_ticks: false,
            read_only: ReadOnlyOption::Safe,
            pre_vote: true,
            check_quorum: true,
            election_tick: 10,
            liveness_rounds: 400,
        }
    }
}

/// A broken property, with everything needed to replay it.
#[derive(Clone, Debug)]
pub struct Violation {
    /// The run's seed.
    pub seed: u64,
    /// The round at which it was found.
    pub round: u64,
    /// Which property.
    pub property: &'static str,
    /// What exactly.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} violated at round {}: {}\n  replay with: SYNCD_SIM_SEED={} cargo test -p syncd --test raft_sim -- --nocapture",
            self.seed, self.property, self.round, self.detail, self.seed
        )
    }
}

impl std::error::Error for Violation {}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Writes acknowledged to clients.
    pub acked_writes: u64,
    /// Linearizable reads completed.
    pub reads: u64,
    /// Leaders elected.
    pub elections: u64,
    /// Crashes (including crashes before persisting).
    pub crashes: u64,
    /// Snapshots installed from a leader.
    pub snapshots_installed: u64,
    /// Membership changes proposed and accepted by a leader.
    pub membership_changes: u64,
    /// Rounds from healing to a new proposal committed.
    pub rounds_to_commit_after_heal: u64,
    /// Highest term reached.
    pub max_term: u64,
    /// Readies after which a leader had two or more AppendEntries unacknowledged to one
    /// follower: the pipeline was in use.
    pub pipelined: u64,
    /// AppendEntries with entries that the network lost.
    pub appends_lost: u64,
    /// AppendEntries delivered after a later one of the same leader on the same link.
    pub appends_reordered: u64,
    /// Rejections that moved a follower from Replicate back to Probe.
    pub probe_fallbacks: u64,
}

/// Runs one simulation.
pub fn run(seed: u64, cfg: &SimConfig) -> Result<Report, Violation> {
    let mut sim = Sim::new(seed, cfg);
    sim.run().map_err(|(property, detail)| Violation {
        seed,
        round: sim.round,
        property,
        detail,
    })?;
    Ok(sim.report)
}

type Check = Result<(), (&'static str, String)>;

fn fail(property: &'static str) -> impl FnOnce(String) -> (&'static str, String) {
    move |detail| (property, detail)
}

/// One member: its engine (absent while crashed), what survives a crash, and its state machine.
struct SimNode {
    engine: Option<RaftNode>,
    durable: Durable,
    sm: StateMachine,
    /// Commit index up to which committed entries were checked.
    checked_commit: u64,
    /// Was leader at the previous Ready (to spot a new leadership).
    was_leader: bool,
    /// Reads confirmed, waiting for the state machine to reach their index.
    reads_to_serve: Vec<(u64, u64)>,
    /// The snapshot that came with the last InstallSnapshot.
    incoming_snapshot: Option<Snapshot>,
}

/// A client with at most one write outstanding.
struct Client {
    id: u64,
    seq: u64,
    outstanding: Option<Outstanding>,
}

struct Outstanding {
    seq: u64,
    /// Round of the latest attempt.
    last_try: u64,
    /// Where the latest attempt was proposed: (member, index).
    target: Option<(NodeId, u64)>,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    seed: u64,
    rng: SplitMix64,
    round: u64,
    faults: Faults,
    net: Network,
    nodes: BTreeMap<NodeId, SimNode>,
    founders: pb::ClusterConfig,
    next_spare: NodeId,
    last_id: NodeId,
    history: History,
    client_history: ClientHistory,
    clients: Vec<Client>,
    acked_commands: Vec<(u64, u64)>,
    next_read: u64,
    reads_invoked: HashMap<u64, u64>,
    marker: Option<(NodeId, u64)>,
    marker_applied: Option<u64>,
    /// Faults are over (liveness phase): no more crashes.
    calm: bool,
    /// Print every delivery and Ready (`SYNCD_SIM_TRACE=1`), to debug a replayed seed.
    trace: bool,
    /// Per link (from, to): term and prev_log_index of the last AppendEntries delivered, to
    /// count reorderings.
    last_append: HashMap<(NodeId, NodeId), (u64, u64)>,
    report: Report,
}

impl<'a> Sim<'a> {
    fn new(seed: u64, cfg: &'a SimConfig) -> Self {
        let founders = pb::ClusterConfig {
            members: (1..=cfg.voters as u64)
                .map(|id| pb::Member {
                    id,
                    address: format!("node-{id}"),
                    learner: false,
                })
                .collect(),
        };
        let mut sim = Sim {
            cfg,
            seed,
            rng: SplitMix64(seed ^ 0x005E_ED0F_5EED),
            round: 0,
            faults: cfg.faults.clone(),
            net: Network::default(),
            nodes: BTreeMap::new(),
            founders,
            next_spare: cfg.voters as u64 + 1,
            last_id: (cfg.voters + cfg.spares) as u64,
            history: History::default(),
            client_history: ClientHistory::default(),
            clients: (1..=cfg.clients as u64)
                .map(|id| Client {
                    id: 1000 + id,
                    seq: 0,
                    outstanding: None,
                })
                .collect(),
            acked_commands: Vec::new(),
            next_read: 1,
            reads_invoked: HashMap::new(),
            marker: None,
            marker_applied: None,
            calm: false,
            trace: std::env::var_os("SYNCD_SIM_TRACE").is_some(),
            last_append: HashMap::new(),
            report: Report::default(),
        };
        for id in 1..=cfg.voters as u64 {
            sim.add_node(id);
        }
        sim
    }

    fn engine_config(&self, id: NodeId) -> Config {
        let mut c = Config::new(id);
        c.election_tick = self.cfg.election_tick;
        c.heartbeat_tick = 1;
        c.read_only = self.cfg.read_only;
        c.pre_vote = self.cfg.pre_vote;
        c.check_quorum = self.cfg.check_quorum;
        // Small windows and batches, so that pipelining, flow control and batching are all
        // exercised by a few entries. They vary by seed: with one entry per message an entry
        // can reach a majority without the ones after it, which the Figure 8 scenario needs.
        c.max_inflight_msgs = [1, 4, 16][(self.seed % 3) as usize];
        c.max_entries_per_msg = [1, 2, 8][((self.seed / 3) % 3) as usize];
        c.seed = self.seed ^ id.wrapping_mul(0x2545_F491_4F6C_DD1D);
        c
    }

    fn initial_config_for(&self, id: NodeId) -> pb::ClusterConfig {
        if id <= self.cfg.voters as u64 {
            self.founders.clone()
        } else {
            pb::ClusterConfig::default()
        }
    }

    fn add_node(&mut self, id: NodeId) {
        let engine = RaftNode::new(self.engine_config(id), self.initial_config_for(id))
            .expect("simulator settings are valid");
        self.nodes.insert(
            id,
            SimNode {
                engine: Some(engine),
                durable: Durable::default(),
                sm: StateMachine::default(),
                checked_commit: 0,
                was_leader: false,
                reads_to_serve: Vec::new(),
                incoming_snapshot: None,
            },
        );
    }

    fn live_ids(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.engine.is_some())
            .map(|(&id, _)| id)
            .collect()
    }

    fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.engine.as_ref().is_some_and(|e| e.role() == Role::Leader))
            .map(|(&id, _)| id)
            .collect()
    }

    fn pick(&mut self, ids: &[NodeId]) -> Option<NodeId> {
        (!ids.is_empty()).then(|| ids[self.rng.below(ids.len() as u64) as usize])
    }

    fn engine(&mut self, id: NodeId) -> Option<&mut RaftNode> {
        self.nodes.get_mut(&id).and_then(|n| n.engine.as_mut())
    }

    // ----- the run ---------------------------------------------------------------------------

    fn run(&mut self) -> Check {
        for _ in 0..self.cfg.chaos_rounds {
            self.round += 1;
            self.chaos()?;
            self.round_step(true)?;
        }
        self.heal_everything()?;
        let healed_at = self.round;
        // Liveness 1: a leader commits a new proposal.
        while self.marker_applied.is_none() {
            if self.round - healed_at > self.cfg.liveness_rounds {
                return Err((
                    "liveness",
                    format!(
                        "no leader committed a new proposal within {} rounds after healing\n{}",
                        self.cfg.liveness_rounds,
                        self.dump()
                    ),
                ));
            }
            self.round += 1;
            self.propose_marker()?;
            self.round_step(false)?;
        }
        self.report.rounds_to_commit_after_heal = self.round - healed_at;
        // Liveness 2: every member catches up to it.
        let target = self.marker_applied.unwrap_or(0);
        let caught_up_by = self.round + self.cfg.liveness_rounds;
        loop {
            let lagging = self.lagging_members(target);
            if lagging.is_empty() {
                break;
            }
            if self.round > caught_up_by {
                return Err((
                    "liveness",
                    format!(
                        "members {lagging:?} did not apply index {target} within {} rounds\n{}",
                        self.cfg.liveness_rounds,
                        self.dump()
                    ),
                ));
            }
            self.round += 1;
            self.round_step(false)?;
        }
        self.every_acked_write_is_everywhere()?;
        self.report.max_term = self
            .nodes
            .values()
            .filter_map(|n| n.engine.as_ref().map(|e| e.term()))
            .max()
            .unwrap_or(0);
        Ok(())
    }

    /// Every member's state, for a liveness failure's report.
    fn dump(&self) -> String {
        let mut out = String::new();
        for (id, n) in &self.nodes {
            let Some(e) = n.engine.as_ref() else {
                out.push_str(&format!("  node {id}: crashed\n"));
                continue;
            };
            out.push_str(&format!(
                "  node {id}: {:?} term {} vote {} leader {:?} first {} last {} (term {}) commit {} \
                 applied {} persisted {} voters {:?} members {:?}\n",
                e.role(),
                e.term(),
                e.vote(),
                e.leader(),
                e.first_index(),
                e.last_index(),
                e.last_term(),
                e.commit_index(),
                e.applied_index(),
                e.persisted_index(),
                e.config().voter_ids(),
                e.config().members.iter().map(|m| m.id).collect::<Vec<_>>(),
            ));
            for p in e.peers() {
                out.push_str(&format!("      peer {p:?}\n"));
            }
        }
        out
    }

    /// Members of the current leader's configuration that have not applied `index`.
    fn lagging_members(&self, index: u64) -> Vec<NodeId> {
        let Some(leader) = self.leaders().first().copied() else {
            return vec![0];
        };
        let Some(config) = self.nodes[&leader]
            .engine
            .as_ref()
            .map(|e| e.config().clone())
        else {
            return vec![0];
        };
        config
            .members
            .iter()
            .filter(|m| {
                self.nodes
                    .get(&m.id)
                    .is_none_or(|n| n.sm.applied_index < index)
            })
            .map(|m| m.id)
            .collect()
    }

    /// Durability of acknowledged writes: every member of the final configuration applied every
    /// acknowledged command.
    fn every_acked_write_is_everywhere(&self) -> Check {
        let Some(leader) = self.leaders().first().copied() else {
            return Ok(());
        };
        let config = self.nodes[&leader]
            .engine
            .as_ref()
            .map(|e| e.config().clone())
            .unwrap_or_default();
        for m in &config.members {
            let sm = &self.nodes[&m.id].sm;
            if let Some(lost) = self.acked_commands.iter().find(|c| !sm.contains(**c)) {
                return Err((
                    "acknowledged writes are durable",
                    format!(
                        "member {} never applied acknowledged command {lost:?}",
                        m.id
                    ),
                ));
            }
        }
        Ok(())
    }

    fn heal_everything(&mut self) -> Check {
        self.calm = true;
        self.net.heal();
        self.faults = Faults {
            drop: 0.0,
            duplicate: 0.0,
            max_delay: 1,
            straggle: 0.0,
        };
        let crashed: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.engine.is_none())
            .map(|(&id, _)| id)
            .collect();
        for id in crashed {
            self.restart(id)?;
        }
        Ok(())
    }

    fn propose_marker(&mut self) -> Check {
        if let Some((node, _)) = self.marker
            && self
                .nodes
                .get(&node)
                .and_then(|n| n.engine.as_ref())
                .is_some_and(|e| e.role() == Role::Leader)
        {
            return Ok(());
        }
        self.marker = None;
        if let Some(leader) = self.leaders().first().copied()
            && let Some(engine) = self.engine(leader)
            && let Ok(index) = engine.propose(Bytes::from_static(b"marker"), None)
        {
            self.marker = Some((leader, index));
            self.process_ready(leader)?;
        }
        Ok(())
    }

    // ----- one round -------------------------------------------------------------------------

    fn round_step(&mut self, clients_active: bool) -> Check {
        for id in self.live_ids() {
            if self.cfg.lockstep_ticks || self.rng.chance(0.9) {
                if let Some(e) = self.engine(id) {
                    e.tick();
                }
                self.process_ready(id)?;
            }
        }
        let (due, lost) = self.net.take_due(&mut self.rng, self.round);
        for p in lost {
            self.on_lost(&p.msg)?;
        }
        for p in due {
            self.deliver(p)?;
        }
        if clients_active {
            for c in 0..self.clients.len() {
                self.client_step(c)?;
            }
            if self.rng.chance(self.cfg.read) {
                self.start_read()?;
            }
        }
        Ok(())
    }

    fn deliver(&mut self, p: Packet) -> Check {
        let to = p.msg.to();
        let Some(node) = self.nodes.get_mut(&to) else {
            return self.on_lost(&p.msg);
        };
        let Some(engine) = node.engine.as_mut() else {
            return self.on_lost(&p.msg);
        };
        if matches!(p.msg, Message::InstallSnapshot(_)) {
            node.incoming_snapshot = p.snapshot;
        }
        let kind = p.msg.kind();
        if self.trace {
            eprintln!("r{} deliver {}", self.round, describe(&p.msg));
        }
        // Coverage of the replication pipeline (see `Report`).
        let mut rejected_while_replicating = None;
        match &p.msg {
            Message::AppendEntries(r) if !r.heartbeat => {
                let at = (r.term, r.prev_log_index);
                if let Some(last) = self.last_append.insert((r.from, to), at)
                    && last.0 == at.0
                    && last.1 > at.1
                {
                    self.report.appends_reordered += 1;
                }
            }
            Message::AppendEntriesResponse(r) if r.rejected && engine.role() == Role::Leader => {
                rejected_while_replicating = engine
                    .peers()
                    .iter()
                    .any(|s| s.id == r.from && s.state == ProgressState::Replicate)
                    .then_some(r.from);
            }
            _ => {}
        }
        engine.step(p.msg).map_err(|e| {
            (
                "messages are well-formed",
                format!("{kind} to {to} refused: {e}"),
            )
        })?;
        if let Some(follower) = rejected_while_replicating
            && engine
                .peers()
                .iter()
                .any(|s| s.id == follower && s.state == ProgressState::Probe)
        {
            self.report.probe_fallbacks += 1;
        }
        self.process_ready(to)
    }

    /// A message that will never arrive. The transport of a real node learns that a snapshot
    /// stream failed and reports it; so does the simulator.
    fn on_lost(&mut self, m: &Message) -> Check {
        let (leader, follower) = match m {
            Message::InstallSnapshot(r) => (r.from, r.to),
            Message::InstallSnapshotResponse(r) => (r.to, r.from),
            _ => return Ok(()),
        };
        if let Some(e) = self.engine(leader) {
            e.report_snapshot_failed(follower);
            self.process_ready(leader)?;
        }
        Ok(())
    }

    /// Acts on every Ready of member `id`, as the node runtime does, checking the invariants.
    fn process_ready(&mut self, id: NodeId) -> Check {
        let Some(mut node) = self.nodes.remove(&id) else {
            return Ok(());
        };
        let mut lost = Vec::new();
        let result = self.drain_ready(id, &mut node, &mut lost);
        self.nodes.insert(id, node);
        result?;
        for m in lost {
            self.on_lost(&m)?;
        }
        Ok(())
    }

    fn drain_ready(&mut self, id: NodeId, node: &mut SimNode, lost: &mut Vec<Message>) -> Check {
        loop {
            let Some(engine) = node.engine.as_mut() else {
                return Ok(());
            };
            if !engine.has_ready() {
                return Ok(());
            }
            let rd = engine.ready();
            if self.trace {
                eprintln!(
                    "r{} ready node {id}: {:?} term {} commit {} hs {:?} entries {:?} snapshot {:?} applied {:?}",
                    self.round,
                    engine.role(),
                    engine.term(),
                    engine.commit_index(),
                    rd.hard_state,
                    rd.entries
                        .iter()
                        .map(|e| (e.index, e.term))
                        .collect::<Vec<_>>(),
                    rd.snapshot.as_ref().map(|s| (s.last_index, s.last_term)),
                    rd.committed_entries
                        .iter()
                        .map(|e| e.index)
                        .collect::<Vec<_>>(),
                );
            }
            invariants::election_safety(&mut self.history, engine)
                .map_err(fail("election safety"))?;
            let is_leader = engine.role() == Role::Leader;
            if is_leader && engine.peers().iter().any(|p| p.inflight >= 2) {
                self.report.pipelined += 1;
            }
            if is_leader && !node.was_leader {
                invariants::leader_completeness(&self.history, engine)
                    .map_err(fail("leader completeness"))?;
                self.report.elections += 1;
            }
            node.was_leader = is_leader;
            invariants::log_matching(&mut self.history, engine, &rd.entries)
                .map_err(fail("log matching"))?;
            invariants::committed_entries_are_immutable(
                &mut self.history,
                engine,
                &rd.entries,
                &mut node.checked_commit,
            )
            .map_err(fail("committed entries never change"))?;

            // 1. Messages that may leave before persisting.
            for m in rd.messages {
                self.transmit(node, m, lost);
            }
            // A crash here loses everything this Ready asked to persist.
            if !self.calm && self.rng.chance(self.cfg.crash_before_persist) {
                lost.extend(rd.persisted_messages);
                self.crash_node(id, node, lost);
                return Ok(());
            }
            // 2. Persist.
            if let Some(meta) = rd.snapshot {
                let snap = node
                    .incoming_snapshot
                    .take()
                    .filter(|s| {
                        s.meta.last_index == meta.last_index && s.meta.last_term == meta.last_term
                    })
                    .ok_or_else(|| {
                        (
                            "snapshots are installed as sent",
                            format!("node {id} asked to install {meta:?} it was not sent"),
                        )
                    })?;
                node.sm = snap.state.clone();
                node.durable.install(Snapshot {
                    meta,
                    state: snap.state,
                });
                node.reads_to_serve.clear();
                self.report.snapshots_installed += 1;
            }
            node.durable
                .append(&rd.entries)
                .map_err(fail("entries fit the durable log"))?;
            if let Some(hs) = rd.hard_state {
                node.durable.hard_state = hs;
            }
            if let (Some(last), Some(engine)) = (rd.entries.last(), node.engine.as_mut()) {
                engine.on_persisted(last.index, last.term);
            }
            // 3. Messages that promise durable state.
            for m in rd.persisted_messages {
                self.transmit(node, m, lost);
            }
            // 4. Apply.
            for e in &rd.committed_entries {
                invariants::state_machine_safety(&mut self.history, id, e)
                    .map_err(fail("state machine safety"))?;
                let outcome = node.sm.apply(e).map_err(fail("applied exactly once"))?;
                self.on_applied(id, e, outcome)?;
            }
            // 5. Reads.
            node.reads_to_serve
                .extend(rd.read_states.iter().map(|r| (r.context, r.index)));
            for ctx in rd.dropped_reads {
                self.reads_invoked.remove(&ctx);
            }
            let applied = node.sm.applied_index;
            let value = node.sm.commands.len() as u64;
            let mut i = 0;
            while i < node.reads_to_serve.len() {
                let (ctx, index) = node.reads_to_serve[i];
                if index > applied {
                    i += 1;
                    continue;
                }
                node.reads_to_serve.swap_remove(i);
                if let Some(invoked) = self.reads_invoked.remove(&ctx) {
                    invariants::reads_are_linearizable(&self.client_history, invoked, value)
                        .map_err(fail("linearizable reads"))?;
                    self.client_history
                        .completed_reads
                        .push((self.round, value));
                    self.report.reads += 1;
                }
            }
        }
    }

    fn transmit(&mut self, sender: &SimNode, m: Message, lost: &mut Vec<Message>) {
        let snapshot = match &m {
            Message::InstallSnapshot(_) => sender.durable.snapshot.clone(),
            _ => None,
        };
        if let Fate::Lost =
            self.net
                .send(&mut self.rng, &self.faults, self.round, m.clone(), snapshot)
        {
            if matches!(&m, Message::AppendEntries(r) if !r.entries.is_empty()) {
                self.report.appends_lost += 1;
            }
            lost.push(m);
        }
    }

    fn on_applied(&mut self, node: NodeId, e: &pb::Entry, outcome: Applied) -> Check {
        if e.data.as_ref() == b"marker" && self.marker == Some((node, e.index)) {
            self.marker_applied = Some(e.index);
        }
        let round = self.round;
        for c in &mut self.clients {
            let Some(o) = c.outstanding.as_mut() else {
                continue;
            };
            if o.target != Some((node, e.index)) {
                continue;
            }
            let ours = e
                .request
                .is_some_and(|r| r.client_id == c.id && r.sequence == o.seq);
            if !ours {
                // Another entry took that index: the proposal was lost; retry.
                o.target = None;
                continue;
            }
            match outcome {
                Applied::Slot(slot) => {
                    self.client_history.acked_writes.push((round, slot));
                    self.acked_commands.push((c.id, o.seq));
                    self.report.acked_writes += 1;
                    c.outstanding = None;
                }
                Applied::Expired | Applied::Internal => {
                    return Err((
                        "applied exactly once",
                        format!(
                            "client {} request {} was refused as expired while outstanding",
                            c.id, o.seq
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    // ----- clients ---------------------------------------------------------------------------

    fn client_step(&mut self, c: usize) -> Check {
        const RETRY_AFTER: u64 = 40;
        let round = self.round;
        let attempt = match &self.clients[c].outstanding {
            None => {
                if !self.rng.chance(self.cfg.write) {
                    return Ok(());
                }
                let client = &mut self.clients[c];
                client.seq += 1;
                client.outstanding = Some(Outstanding {
                    seq: client.seq,
                    last_try: 0,
                    target: None,
                });
                true
            }
            Some(o) => {
                (o.target.is_none() && round - o.last_try >= 3) || round - o.last_try >= RETRY_AFTER
            }
        };
        if !attempt {
            return Ok(());
        }
        let leaders = self.leaders();
        let live = self.live_ids();
        let Some(target) = self.pick(if leaders.is_empty() { &live } else { &leaders }) else {
            return Ok(());
        };
        let client = &self.clients[c];
        let seq = client.seq;
        let request = pb::RequestId {
            client_id: client.id,
            sequence: seq,
            lowest_unacked: seq,
        };
        let data = encode_command(client.id, seq);
        let result = self.engine(target).map(|e| e.propose(data, Some(request)));
        if let Some(o) = self.clients[c].outstanding.as_mut() {
            o.last_try = round;
            o.target = match result {
                Some(Ok(index)) => Some((target, index)),
                _ => None,
            };
        }
        self.process_ready(target)
    }

    fn start_read(&mut self) -> Check {
        let leaders = self.leaders();
        let Some(target) = self.pick(&leaders) else {
            return Ok(());
        };
        let ctx = self.next_read;
        self.next_read += 1;
        if let Some(Ok(())) = self.engine(target).map(|e| e.read_index(ctx)) {
            self.reads_invoked.insert(ctx, self.round);
        }
        self.process_ready(target)
    }

    // ----- faults ----------------------------------------------------------------------------

    fn chaos(&mut self) -> Check {
        if self.rng.chance(self.cfg.crash)
            && let Some(id) = self.pick(&self.live_ids())
        {
            let mut node = self.nodes.remove(&id).expect("live");
            let mut lost = Vec::new();
            self.crash_node(id, &mut node, &mut lost);
            self.nodes.insert(id, node);
            for m in lost {
                self.on_lost(&m)?;
            }
        }
        if self.rng.chance(self.cfg.restart) {
            let crashed: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.engine.is_none())
                .map(|(&id, _)| id)
                .collect();
            if let Some(id) = self.pick(&crashed) {
                self.restart(id)?;
            }
        }
        if self.rng.chance(self.cfg.partition) {
            self.partition();
        }
        if self.rng.chance(self.cfg.heal) {
            self.net.heal();
        }
        if self.rng.chance(self.cfg.membership) {
            self.change_membership()?;
        }
        if self.rng.chance(self.cfg.compact) {
            self.compact()?;
        }
        if self.rng.chance(self.cfg.transfer) {
            self.transfer()?;
        }
        Ok(())
    }

    fn crash_node(&mut self, id: NodeId, node: &mut SimNode, lost: &mut Vec<Message>) {
        if self.trace {
            eprintln!("r{} crash node {id}", self.round);
        }
        node.engine = None;
        node.reads_to_serve.clear();
        node.incoming_snapshot = None;
        node.was_leader = false;
        self.report.crashes += 1;
        lost.extend(self.net.drop_node(id).into_iter().map(|p| p.msg));
    }

    fn restart(&mut self, id: NodeId) -> Check {
        if self.trace {
            eprintln!("r{} restart node {id}", self.round);
        }
        let cfg = self.engine_config(id);
        let initial = self.initial_config_for(id);
        let node = self.nodes.get_mut(&id).expect("known node");
        let d = &node.durable;
        let engine = RaftNode::restore(
            cfg,
            initial,
            d.hard_state,
            d.snapshot.as_ref().map(|s| s.meta.clone()),
            d.entries.clone(),
        )
        .map_err(|e| ("restart from durable state", format!("node {id}: {e}")))?;
        node.sm = d
            .snapshot
            .as_ref()
            .map(|s| s.state.clone())
            .unwrap_or_default();
        node.checked_commit = 0;
        node.engine = Some(engine);
        Ok(())
    }

    fn partition(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        match self.rng.below(3) {
            // Split the members in two at random.
            0 => {
                let group: Vec<NodeId> = ids
                    .iter()
                    .copied()
                    .filter(|_| self.rng.chance(0.5))
                    .collect();
                self.net.partition(&group, &ids);
            }
            // Cut the leader off.
            1 => {
                if let Some(l) = self.leaders().first().copied() {
                    self.net.partition(&[l], &ids);
                }
            }
            // One way: a random member stops hearing from another.
            _ => {
                if let (Some(a), Some(b)) = (self.pick(&ids), self.pick(&ids))
                    && a != b
                {
                    self.net.cut(a, b);
                }
            }
        }
    }

    fn change_membership(&mut self) -> Check {
        let Some(leader) = self.leaders().first().copied() else {
            return Ok(());
        };
        let config = self.nodes[&leader]
            .engine
            .as_ref()
            .map(|e| e.config().clone())
            .unwrap_or_default();
        let learners: Vec<NodeId> = config
            .members
            .iter()
            .filter(|m| m.learner)
            .map(|m| m.id)
            .collect();
        let members: Vec<NodeId> = config.members.iter().map(|m| m.id).collect();
        let spare = (self.next_spare <= self.last_id).then_some(self.next_spare);
        let change = match self.rng.below(4) {
            0 if spare.is_some() => ConfigChange::AddLearner {
                id: self.next_spare,
                address: format!("node-{}", self.next_spare),
            },
            1 if spare.is_some() => ConfigChange::AddVoter {
                id: self.next_spare,
                address: format!("node-{}", self.next_spare),
            },
            2 if !learners.is_empty() => ConfigChange::PromoteLearner {
                id: self.pick(&learners).unwrap_or(0),
            },
            _ => {
                // Keep at least three voters most of the time, so the run stays interesting.
                if config.voter_ids().len() <= 2 && self.rng.chance(0.8) {
                    return Ok(());
                }
                ConfigChange::Remove {
                    id: self.pick(&members).unwrap_or(0),
                }
            }
        };
        let Some(engine) = self.engine(leader) else {
            return Ok(());
        };
        if engine.propose_config_change(change.clone()).is_ok() {
            self.report.membership_changes += 1;
            if let ConfigChange::AddLearner { id, .. } | ConfigChange::AddVoter { id, .. } = change
            {
                self.add_node(id);
                self.next_spare += 1;
            }
        }
        self.process_ready(leader)
    }

    fn compact(&mut self) -> Check {
        let live = self.live_ids();
        let Some(id) = self.pick(&live) else {
            return Ok(());
        };
        let node = self.nodes.get_mut(&id).expect("live");
        let Some(engine) = node.engine.as_mut() else {
            return Ok(());
        };
        let index = node.sm.applied_index;
        if index < engine.first_index() + 4 || index != engine.applied_index() {
            return Ok(());
        }
        let meta = engine
            .compact(index)
            .map_err(|e| ("compaction", format!("node {id}: {e}")))?;
        node.durable.compact(Snapshot {
            meta,
            state: node.sm.clone(),
        });
        Ok(())
    }

    fn transfer(&mut self) -> Check {
        let Some(leader) = self.leaders().first().copied() else {
            return Ok(());
        };
        let voters: Vec<NodeId> = self.nodes[&leader]
            .engine
            .as_ref()
            .map(|e| e.config().voter_ids())
            .unwrap_or_default()
            .into_iter()
            .filter(|&v| v != leader)
            .collect();
        if let Some(target) = self.pick(&voters)
            && let Some(engine) = self.engine(leader)
        {
            let _ = engine.transfer_leader(target);
            self.process_ready(leader)?;
        }
        Ok(())
    }
}

/// Seeds to run: `SYNCD_SIM_SEED` replays one; otherwise `count` seeds from `base`
/// (`SYNCD_SIM_SEEDS` overrides the count, for long soaks).
pub fn seeds_from_env(base: u64, count: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("SYNCD_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count = std::env::var("SYNCD_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(count);
    (base..base + count).collect()
}

/// One line describing a message, for traces.
fn describe(m: &Message) -> String {
    let head = format!("{} {}->{} t{}", m.kind(), m.from(), m.to(), m.term());
    match m {
        Message::AppendEntries(r) => format!(
            "{head} prev ({}, t{}) entries {:?} commit {}",
            r.prev_log_index,
            r.prev_log_term,
            r.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            r.leader_commit
        ),
        Message::AppendEntriesResponse(r) => format!(
            "{head} rejected {} index {} hint ({}, t{})",
            r.rejected, r.index, r.hint_index, r.hint_term
        ),
        Message::RequestVote(r) => {
            format!("{head} last ({}, t{})", r.last_log_index, r.last_log_term)
        }
        Message::RequestVoteResponse(r) => format!("{head} granted {}", r.granted),
        Message::InstallSnapshot(r) => format!(
            "{head} {:?}",
            r.metadata.as_ref().map(|s| (s.last_index, s.last_term))
        ),
        Message::InstallSnapshotResponse(r) => {
            format!("{head} last {} rejected {}", r.last_index, r.rejected)
        }
        _ => head,
    }
}
