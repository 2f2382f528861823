//! The simulated network: it delays, reorders, drops and duplicates messages, and cuts links
//! both ways or one way.

use std::collections::BTreeSet;

use crate::raft::rng::SplitMix64;
use crate::raft::{Message, NodeId};

use super::state_machine::Snapshot;

/// A message on its way, with the snapshot bytes that travel beside an InstallSnapshot.
#[derive(Clone, Debug)]
pub struct Packet {
    /// Round at which it may be delivered.
    pub deliver_at: u64,
    /// The message.
    pub msg: Message,
    /// For InstallSnapshot: the snapshot being streamed.
    pub snapshot: Option<Snapshot>,
}

/// Fault settings of the network.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Probability that a message is lost.
    pub drop: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Messages take 0..=max_delay rounds; different delays reorder them.
    pub max_delay: u64,
    /// Probability that a message straggles: it arrives 10 to 49 rounds late, typically after
    /// its sender crashed, restarted or changed term (a long-delayed packet on a real network).
    pub straggle: f64,
}

/// Messages in flight and the links that are cut.
#[derive(Debug, Default)]
pub struct Network {
    /// Messages not yet delivered.
    in_flight: Vec<Packet>,
    /// Directed links `(from, to)` that lose everything.
    cut: BTreeSet<(NodeId, NodeId)>,
}

/// What happened to a message handed to the network.
pub enum Fate {
    /// Queued for delivery.
    Queued,
    /// Lost (a cut link or a random drop).
    Lost,
}

impl Network {
    /// Sends a message, subject to the faults.
    pub fn send(
        &mut self,
        rng: &mut SplitMix64,
        faults: &Faults,
        now: u64,
        msg: Message,
        snapshot: Option<Snapshot>,
    ) -> Fate {
        if self.cut.contains(&(msg.from(), msg.to())) || rng.chance(faults.drop) {
            return Fate::Lost;
        }
        let copies = if rng.chance(faults.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if rng.chance(faults.straggle) {
                10 + rng.below(40)
            } else {
                rng.below(faults.max_delay + 1)
            };
            let deliver_at = now + delay;
            self.in_flight.push(Packet {
                deliver_at,
                msg: msg.clone(),
                snapshot: snapshot.clone(),
            });
        }
        Fate::Queued
    }

    /// Takes the messages due by `now`, in a random order. A message whose link was cut while
    /// it was in flight is lost and returned in the second list.
    pub fn take_due(&mut self, rng: &mut SplitMix64, now: u64) -> (Vec<Packet>, Vec<Packet>) {
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.in_flight[i].deliver_at <= now {
                due.push(self.in_flight.swap_remove(i));
            } else {
                i += 1;
            }
        }
        rng.shuffle(&mut due);
        due.into_iter()
            .partition(|p| !self.cut.contains(&(p.msg.from(), p.msg.to())))
    }

    /// Cuts the link from `a` to `b` (one way).
    pub fn cut(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert((a, b));
    }

    /// Isolates `group` from everyone else, both ways.
    pub fn partition(&mut self, group: &[NodeId], all: &[NodeId]) {
        for &a in group {
            for &b in all.iter().filter(|b| !group.contains(b)) {
                self.cut.insert((a, b));
                self.cut.insert((b, a));
            }
        }
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// True if any link is cut.
    pub fn is_partitioned(&self) -> bool {
        !self.cut.is_empty()
    }

    /// Drops every message on its way to `node` (it crashed). Messages it sent before crashing
    /// are already on the wire and may still arrive.
    pub fn drop_node(&mut self, node: NodeId) -> Vec<Packet> {
        let (lost, kept) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|p| p.msg.to() == node);
        self.in_flight = kept;
        lost
    }
}
