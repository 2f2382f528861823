//! A synchronous, loss-free cluster of engines with instant storage: the scaffolding for
//! scenario tests and the throughput benchmark. Members can be isolated (every message to or
//! from them is lost). Unlike the simulator it injects no faults by itself.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use sync_proto::raft::v1 as pb;

use super::state_machine::{Durable, Snapshot, StateMachine};
use crate::raft::{Config, Message, NodeId, RaftNode, Role};

/// Engines, their durable state, and the messages between them.
pub struct MemCluster {
    /// The engines by id.
    pub nodes: BTreeMap<NodeId, RaftNode>,
    /// What each engine made durable.
    pub durable: BTreeMap<NodeId, Durable>,
    /// Members cut off from everyone.
    pub isolated: BTreeSet<NodeId>,
    /// Entries applied, per member.
    pub applied: BTreeMap<NodeId, u64>,
    /// Messages not yet delivered, in send order.
    inbox: VecDeque<Message>,
}

/// A configuration of voters `ids` with addresses `n<id>`.
pub fn voters(ids: &[NodeId]) -> pb::ClusterConfig {
    pb::ClusterConfig {
        members: ids
            .iter()
            .map(|&id| pb::Member {
                id,
                address: format!("n{id}"),
                learner: false,
            })
            .collect(),
    }
}

impl MemCluster {
    /// A group of `n` voters with ids `1..=n`; `tweak` adjusts each engine's settings.
    pub fn new(n: u64, tweak: impl Fn(&mut Config)) -> MemCluster {
        let ids: Vec<NodeId> = (1..=n).collect();
        let mut nodes = BTreeMap::new();
        for &id in &ids {
            let mut c = Config::new(id);
            tweak(&mut c);
            let node = RaftNode::new(c, voters(&ids)).expect("valid settings");
            nodes.insert(id, node);
        }
        MemCluster {
            durable: ids.iter().map(|&id| (id, Durable::default())).collect(),
            applied: ids.iter().map(|&id| (id, 0)).collect(),
            nodes,
            isolated: BTreeSet::new(),
            inbox: VecDeque::new(),
        }
    }

    /// Adds a member that starts empty (to be added through a membership change).
    pub fn add_empty_member(&mut self, id: NodeId) {
        let node =
            RaftNode::new(Config::new(id), pb::ClusterConfig::default()).expect("valid settings");
        self.nodes.insert(id, node);
        self.durable.insert(id, Durable::default());
        self.applied.insert(id, 0);
    }

    /// The engine of member `id`.
    pub fn node(&mut self, id: NodeId) -> &mut RaftNode {
        self.nodes.get_mut(&id).expect("known member")
    }

    /// Processes every Ready and delivers every message until nothing moves. Panics if that
    /// does not happen within a million steps (a livelock in the engine).
    pub fn flush(&mut self) {
        for _ in 0..1_000_000 {
            for (id, node) in self.nodes.iter_mut() {
                while node.has_ready() {
                    let rd = node.ready();
                    self.inbox.extend(rd.messages);
                    let d = self.durable.get_mut(id).expect("known member");
                    if let Some(meta) = rd.snapshot {
                        d.install(Snapshot {
                            meta,
                            state: StateMachine::default(),
                        });
                    }
                    d.append(&rd.entries).expect("engine appends fit the log");
                    if let Some(hs) = rd.hard_state {
                        d.hard_state = hs;
                    }
                    if let Some(last) = rd.entries.last() {
                        node.on_persisted(last.index, last.term);
                    }
                    self.inbox.extend(rd.persisted_messages);
                    *self.applied.get_mut(id).expect("known member") +=
                        rd.committed_entries.len() as u64;
                }
            }
            let Some(m) = self.inbox.pop_front() else {
                return;
            };
            if self.isolated.contains(&m.from()) || self.isolated.contains(&m.to()) {
                continue;
            }
            if let Some(to) = self.nodes.get_mut(&m.to()) {
                to.step(m).expect("engines send well-formed messages");
            }
        }
        panic!("the cluster did not quiesce");
    }

    /// `rounds` ticks of every member, flushing after each.
    pub fn tick(&mut self, rounds: usize) {
        for _ in 0..rounds {
            for node in self.nodes.values_mut() {
                node.tick();
            }
            self.flush();
        }
    }

    /// Members that believe they lead.
    pub fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.role() == Role::Leader)
            .map(|n| n.id())
            .collect()
    }

    /// Makes `id` campaign and checks that it won.
    pub fn elect(&mut self, id: NodeId) {
        self.node(id).campaign();
        self.flush();
        assert_eq!(self.leaders(), vec![id], "node {id} should have won");
    }

    /// Proposes `n` small commands at `id` and flushes.
    pub fn propose(&mut self, id: NodeId, n: usize) {
        for i in 0..n {
            self.node(id)
                .propose(Bytes::from(format!("cmd{i}")), None)
                .expect("proposer is the leader");
        }
        self.flush();
    }

    /// Snapshots every member at its applied index and compacts its log (bounding memory in
    /// long runs).
    pub fn compact_all(&mut self) {
        for (id, node) in self.nodes.iter_mut() {
            let index = node.applied_index();
            if index < node.first_index() {
                continue;
            }
            if let Ok(meta) = node.compact(index) {
                self.durable
                    .get_mut(id)
                    .expect("known member")
                    .compact(Snapshot {
                        meta,
                        state: StateMachine::default(),
                    });
            }
        }
    }
}
