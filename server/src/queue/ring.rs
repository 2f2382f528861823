//! The consistent-hash ring that places topics on nodes.
//!
//! Each voter contributes [`VNODES`] points to a ring of `u64` hashes; a topic belongs to the
//! node of the first point at or after the topic's hash (wrapping around). Many points per node
//! spread the topics evenly (with 3 nodes and 64 points each, every node gets roughly a third),
//! and a change of membership moves only the topics whose points change hands: adding a node
//! takes about `1/n` of the topics from the others, removing one hands out only its own.
//!
//! Liveness is applied at lookup, not in the ring: [`Ring::owner`] walks clockwise past nodes
//! the caller believes dead. Walking past a dead node gives exactly the owner that a ring built
//! without it would give (its points are simply skipped), so a node that stops moves only its
//! own topics, and they come back when it does.
//!
//! The hash must be the same on every node and in every build, so it cannot be std's
//! `DefaultHasher` (SipHash with per-process random keys): it is FNV-1a followed by the
//! MurmurHash3 finalizer, which spreads FNV's similar outputs for similar inputs (`t1`, `t2`...)
//! over the whole ring. Its values are fixed by a test.

use crate::raft::NodeId;

/// Points each node contributes to the ring. With 64, a node's share of the hash space is
/// typically within about 12% of its fair share (nodes 1, 2, 3: 0.94, 1.00 and 1.06 of it);
/// more points spread better but make every rebuild and lookup slower, for little gain.
pub const VNODES: u32 = 64;

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A hash of `bytes` that is the same on every node, process and build (see the module docs).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    fmix64(h)
}

/// MurmurHash3's 64-bit finalizer: every input bit affects every output bit.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The ring over one set of nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    /// `(point, node)` in ascending order; equal points (a 64-bit collision) are ordered by node
    /// id, so every node still builds the same ring.
    points: Vec<(u64, NodeId)>,
    /// The nodes, ascending: what the ring was built from, to tell when to rebuild.
    nodes: Vec<NodeId>,
}

impl Ring {
    /// The ring over `nodes` with `vnodes` points each (duplicates are ignored).
    pub fn new(nodes: impl IntoIterator<Item = NodeId>, vnodes: u32) -> Ring {
        let mut nodes: Vec<NodeId> = nodes.into_iter().collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut points: Vec<(u64, NodeId)> = nodes
            .iter()
            .flat_map(|&node| {
                (0..vnodes).map(move |i| {
                    let mut key = [0u8; 12];
                    key[..8].copy_from_slice(&node.to_le_bytes());
                    key[8..].copy_from_slice(&i.to_le_bytes());
                    (stable_hash(&key), node)
                })
            })
            .collect();
        points.sort_unstable();
        Ring { points, nodes }
    }

    /// The nodes the ring was built from, ascending.
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// The owner of `key`: the node of the first point at or after the key's hash whose node is
    /// `live`. When no node is live as far as the caller knows, the first one regardless (the
    /// owner if everybody were up), so that a caller cut off from everyone still has an answer
    /// to name. None only for an empty ring.
    pub fn owner(&self, key: &str, live: impl Fn(NodeId) -> bool) -> Option<NodeId> {
        let h = stable_hash(key.as_bytes());
        let start = self.points.partition_point(|&(p, _)| p < h);
        let clockwise = self.points[start..].iter().chain(&self.points[..start]);
        let mut first = None;
        for &(_, node) in clockwise {
            if live(node) {
                return Some(node);
            }
            first.get_or_insert(node);
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn topics(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("topic-{i}")).collect()
    }

    fn owners(ring: &Ring, topics: &[String], live: impl Fn(NodeId) -> bool) -> Vec<NodeId> {
        topics
            .iter()
            .map(|t| ring.owner(t, &live).unwrap())
            .collect()
    }

    #[test]
    fn the_hash_is_fixed_across_processes_and_builds() {
        // Every node must place topics alike: these values (checked against an independent
        // Python computation of FNV-1a + fmix64) may never change (a change would
        // move every topic at an upgrade, with nodes of both versions disagreeing meanwhile).
        assert_eq!(stable_hash(b""), fmix64(FNV_OFFSET));
        assert_eq!(stable_hash(b"orders"), 0x3252_0fbd_b4da_d5b9);
        assert_eq!(
            Ring::new([1, 2, 3], VNODES).owner("orders", |_| true),
            Some(3)
        );
    }

    #[test]
    fn every_node_builds_the_same_ring_whatever_the_order_of_its_member_list() {
        assert_eq!(Ring::new([3, 1, 2, 2], 8), Ring::new([1, 2, 3], 8));
        assert_eq!(Ring::new([1, 2, 3], 8).nodes(), &[1, 2, 3]);
    }

    #[test]
    fn topics_spread_evenly_over_three_nodes() {
        let ring = Ring::new([1, 2, 3], VNODES);
        let all = topics(30_000);
        let mut count: BTreeMap<NodeId, usize> = BTreeMap::new();
        for o in owners(&ring, &all, |_| true) {
            *count.entry(o).or_default() += 1;
        }
        for (node, n) in count {
            let share = n as f64 / all.len() as f64;
            assert!(
                (0.2..=0.45).contains(&share),
                "node {node} owns {share:.3} of the topics"
            );
        }
    }

    #[test]
    fn a_dead_owner_hands_over_exactly_as_if_it_had_left_the_ring() {
        let all = topics(5_000);
        let full = Ring::new([1, 2, 3], VNODES);
        let without_2 = Ring::new([1, 3], VNODES);
        let skipping = owners(&full, &all, |n| n != 2);
        assert_eq!(skipping, owners(&without_2, &all, |_| true));
        // Only node 2's topics moved.
        for ((t, before), after) in all.iter().zip(owners(&full, &all, |_| true)).zip(skipping) {
            if before != 2 {
                assert_eq!(before, after, "{t} moved although its owner is alive");
            }
        }
    }

    #[test]
    fn adding_a_node_moves_about_its_share_and_only_to_it() {
        let all = topics(10_000);
        let before = owners(&Ring::new([1, 2, 3], VNODES), &all, |_| true);
        let after = owners(&Ring::new([1, 2, 3, 4], VNODES), &all, |_| true);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(*a, 4, "a topic moved between two old nodes");
                moved += 1;
            }
        }
        let share = moved as f64 / all.len() as f64;
        assert!((0.15..=0.35).contains(&share), "{share:.3} of topics moved");
    }

    #[test]
    fn a_caller_that_sees_nobody_alive_still_names_the_first_owner() {
        let ring = Ring::new([1, 2, 3], VNODES);
        let primary = ring.owner("t", |_| true);
        assert_eq!(ring.owner("t", |_| false), primary);
        assert_eq!(Ring::new([], VNODES).owner("t", |_| true), None);
    }
}
