//! The simulated network between nodes and the directory: it delays, reorders, drops and
//! duplicates messages, and cuts a node off from the directory one way or both ways. A message
//! to a paused node waits until the node resumes; one to a crashed node is lost.
//!
//! Write requests are never duplicated: a duplicate would be a second write (the shell sends
//! each client write once, and retries of a client's call go through request de-duplication).

use std::collections::BTreeSet;

use crate::cache::NodeId;
use crate::cache::message::{Envelope, ToHome, ToNode};
use crate::raft::rng::SplitMix64;
/// The Raft simulator's fault settings, read with one round = one millisecond.
pub use crate::raft::sim::network::Faults;

/// A message on the wire.
#[derive(Clone, Debug)]
pub enum Packet {
    /// Node `from` → directory.
    ToHome {
        /// The sender.
        from: NodeId,
        /// The message.
        env: Envelope<ToHome>,
    },
    /// Directory → node `to`.
    ToNode {
        /// The recipient.
        to: NodeId,
        /// The message.
        env: Envelope<ToNode>,
    },
}

impl Packet {
    /// The node at the other end from the directory.
    pub fn node(&self) -> NodeId {
        match self {
            Packet::ToHome { from, .. } => *from,
            Packet::ToNode { to, .. } => *to,
        }
    }
}

/// Messages in flight and cut links.
#[derive(Debug, Default)]
pub struct Network {
    /// `(deliver_at, packet)`.
    in_flight: Vec<(u64, Packet)>,
    /// Nodes whose messages to the directory are lost.
    cut_to_home: BTreeSet<NodeId>,
    /// Nodes that lose the directory's messages.
    cut_from_home: BTreeSet<NodeId>,
}

impl Network {
    /// Sends a packet at `now`, subject to cuts and faults.
    pub fn send(&mut self, rng: &mut SplitMix64, faults: &Faults, now: u64, p: Packet) {
        if self.is_cut(&p) || rng.chance(faults.drop) {
            return;
        }
        let is_write = matches!(
            &p,
            Packet::ToHome {
                env: Envelope {
                    msg: ToHome::WriteRequest { .. },
                    ..
                },
                ..
            }
        );
        let copies = if !is_write && rng.chance(faults.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if rng.chance(faults.straggle) {
                10 + rng.below(40)
            } else {
                rng.below(faults.max_delay + 1)
            };
            self.in_flight.push((now + delay, p.clone()));
        }
    }

    /// Takes the packets due by `now` whose recipient can take them (`ready`), in random
    /// order. Packets on a link cut while they were in flight are lost.
    pub fn take_due(
        &mut self,
        rng: &mut SplitMix64,
        now: u64,
        ready: impl Fn(&Packet) -> bool,
    ) -> Vec<Packet> {
        let mut due = take_due(&mut self.in_flight, now, ready);
        rng.shuffle(&mut due);
        due.retain(|p| !self.is_cut(p));
        due
    }

    /// Cuts `node` off from the directory: its messages to the directory if `to_home`, the
    /// directory's messages to it if `from_home`.
    pub fn cut(&mut self, node: NodeId, to_home: bool, from_home: bool) {
        if to_home {
            self.cut_to_home.insert(node);
        }
        if from_home {
            self.cut_from_home.insert(node);
        }
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut_to_home.clear();
        self.cut_from_home.clear();
    }

    /// Loses every message on its way to `node` (it crashed).
    pub fn drop_to(&mut self, node: NodeId) {
        self.in_flight
            .retain(|(_, p)| !matches!(p, Packet::ToNode { to, .. } if *to == node));
    }

    /// Messages in flight.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// True if no message is in flight.
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    fn is_cut(&self, p: &Packet) -> bool {
        match p {
            Packet::ToHome { from, .. } => self.cut_to_home.contains(from),
            Packet::ToNode { to, .. } => self.cut_from_home.contains(to),
        }
    }
}

/// Removes and returns the items of `queue` due by `now` (`(due time, item)`) that `ready`
/// accepts, in no particular order.
pub fn take_due<T>(queue: &mut Vec<(u64, T)>, now: u64, ready: impl Fn(&T) -> bool) -> Vec<T> {
    let mut due = Vec::new();
    let mut i = 0;
    while i < queue.len() {
        if queue[i].0 <= now && ready(&queue[i].1) {
            due.push(queue.swap_remove(i).1);
        } else {
            i += 1;
        }
    }
    due
}
