//! Cluster membership: which members vote, which only learn, and how the configuration changes.
//!
//! Rules (Raft dissertation, chapter 4, single-server changes):
//! - A configuration entry holds the *whole* new configuration, and takes effect on a node as
//!   soon as it is appended to that node's log, committed or not. If the entry is later
//!   truncated away, the node falls back to the latest configuration still in its log (or in its
//!   snapshot). [`ConfigHistory`] keeps that list.
//! - Each change adds or removes at most one voter, so the old and new majorities overlap.
//! - A leader proposes a change only when the previous configuration entry is committed and it
//!   has committed an entry of its own term (the fix to the single-server bug Ongaro described
//!   in 2015: without it, a new leader could overwrite a change it never saw committed).

use prost::Message as _;
use sync_proto::raft::v1 as pb;

use super::{NodeId, RaftError};

/// A request to change the membership by one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigChange {
    /// Add a voting member. Prefer adding a learner and promoting it once caught up: a new
    /// voter with an empty log can stall commits until it catches up.
    AddVoter {
        /// The new member's id.
        id: NodeId,
        /// Its address.
        address: String,
    },
    /// Add a non-voting member that receives the log.
    AddLearner {
        /// The new member's id.
        id: NodeId,
        /// Its address.
        address: String,
    },
    /// Make a learner a voter.
    PromoteLearner {
        /// The learner's id.
        id: NodeId,
    },
    /// Remove a member, voter or learner.
    Remove {
        /// The member's id.
        id: NodeId,
    },
}

/// Read-only helpers on a configuration.
pub trait ClusterConfigExt {
    /// Ids of the voters, ascending.
    fn voter_ids(&self) -> Vec<NodeId>;
    /// The member with this id.
    fn member(&self, id: NodeId) -> Option<&pb::Member>;
    /// True if `id` is a voter.
    fn is_voter(&self, id: NodeId) -> bool;
    /// The configuration after `change`, or why the change is not allowed.
    fn apply_change(&self, change: &ConfigChange) -> Result<pb::ClusterConfig, RaftError>;
}

impl ClusterConfigExt for pb::ClusterConfig {
    fn voter_ids(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|m| !m.learner)
            .map(|m| m.id)
            .collect()
    }

    fn member(&self, id: NodeId) -> Option<&pb::Member> {
        self.members.iter().find(|m| m.id == id)
    }

    fn is_voter(&self, id: NodeId) -> bool {
        self.member(id).is_some_and(|m| !m.learner)
    }

    fn apply_change(&self, change: &ConfigChange) -> Result<pb::ClusterConfig, RaftError> {
        let invalid = |reason: String| Err(RaftError::InvalidConfigChange(reason));
        let mut next = self.clone();
        match change {
            ConfigChange::AddVoter { id, address } | ConfigChange::AddLearner { id, address } => {
                if *id == 0 {
                    return invalid("member id 0 is reserved".into());
                }
                if self.member(*id).is_some() {
                    return invalid(format!("node {id} is already a member"));
                }
                if let Some(other) = self
                    .members
                    .iter()
                    .find(|m| !address.is_empty() && m.address == *address)
                {
                    return invalid(format!(
                        "address {address} is already used by node {}",
                        other.id
                    ));
                }
                next.members.push(pb::Member {
                    id: *id,
                    address: address.clone(),
                    learner: matches!(change, ConfigChange::AddLearner { .. }),
                });
                next.members.sort_by_key(|m| m.id);
            }
            ConfigChange::PromoteLearner { id } => {
                match next.members.iter_mut().find(|m| m.id == *id) {
                    None => return invalid(format!("node {id} is not a member")),
                    Some(m) if !m.learner => {
                        return invalid(format!("node {id} is already a voter"));
                    }
                    Some(m) => m.learner = false,
                }
            }
            ConfigChange::Remove { id } => {
                if self.member(*id).is_none() {
                    return invalid(format!("node {id} is not a member"));
                }
                if self.is_voter(*id) && self.voter_ids().len() == 1 {
                    return invalid(format!("node {id} is the last voter; a group needs one"));
                }
                next.members.retain(|m| m.id != *id);
            }
        }
        Ok(next)
    }
}

/// Decodes the configuration carried by a CONFIG entry.
pub fn decode_config(entry: &pb::Entry) -> Result<pb::ClusterConfig, RaftError> {
    pb::ClusterConfig::decode(entry.data.as_ref()).map_err(|e| {
        RaftError::Malformed(format!(
            "config entry at index {} does not decode: {e}",
            entry.index
        ))
    })
}

/// True if the entry carries a configuration.
pub fn is_config_entry(entry: &pb::Entry) -> bool {
    entry.entry_type == pb::EntryType::Config as i32
}

/// The configurations in force along the log: the one from the snapshot (or the initial
/// cluster) and one per CONFIG entry still in the log.
#[derive(Clone, Debug)]
pub struct ConfigHistory {
    /// Configuration at the snapshot point (or the bootstrap configuration at index 0).
    base: pb::ClusterConfig,
    /// `(index, config)` of each CONFIG entry after the snapshot, ascending by index.
    changes: Vec<(u64, pb::ClusterConfig)>,
}

impl ConfigHistory {
    /// A history holding only the configuration at the snapshot point.
    pub fn new(base: pb::ClusterConfig) -> Self {
        ConfigHistory {
            base,
            changes: Vec::new(),
        }
    }

    /// The configuration in force now: the latest in the log.
    pub fn current(&self) -> &pb::ClusterConfig {
        self.changes.last().map(|(_, c)| c).unwrap_or(&self.base)
    }

    /// Index of the latest CONFIG entry in the log (0 if none after the snapshot).
    pub fn last_change_index(&self) -> u64 {
        self.changes.last().map(|(i, _)| *i).unwrap_or(0)
    }

    /// The configuration in force at `index`.
    pub fn at(&self, index: u64) -> &pb::ClusterConfig {
        self.changes
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map(|(_, c)| c)
            .unwrap_or(&self.base)
    }

    /// Records a CONFIG entry appended at `index`.
    pub fn push(&mut self, index: u64, config: pb::ClusterConfig) {
        debug_assert!(index > self.last_change_index());
        self.changes.push((index, config));
    }

    /// Forgets CONFIG entries at `index` or later (they were truncated away). Returns true if
    /// the current configuration changed.
    pub fn truncate_from(&mut self, index: u64) -> bool {
        let before = self.changes.len();
        self.changes.retain(|(i, _)| *i < index);
        self.changes.len() != before
    }

    /// Folds every change at or below `index` into the base (the log was compacted to it).
    pub fn compact_to(&mut self, index: u64) {
        let base = self.at(index).clone();
        self.changes.retain(|(i, _)| *i > index);
        self.base = base;
    }

    /// Restarts from a snapshot whose configuration is `base`.
    pub fn reset(&mut self, base: pb::ClusterConfig) {
        self.base = base;
        self.changes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(voters: &[u64], learners: &[u64]) -> pb::ClusterConfig {
        let mut members: Vec<pb::Member> = voters
            .iter()
            .map(|&id| pb::Member {
                id,
                address: format!("n{id}"),
                learner: false,
            })
            .chain(learners.iter().map(|&id| pb::Member {
                id,
                address: format!("n{id}"),
                learner: true,
            }))
            .collect();
        members.sort_by_key(|m| m.id);
        pb::ClusterConfig { members }
    }

    #[test]
    fn a_change_may_not_remove_the_last_voter() {
        let c = config(&[1], &[2]);
        assert!(c.apply_change(&ConfigChange::Remove { id: 1 }).is_err());
        assert!(c.apply_change(&ConfigChange::Remove { id: 2 }).is_ok());
    }

    #[test]
    fn add_rejects_duplicate_ids_and_addresses() {
        let c = config(&[1, 2], &[]);
        let dup_id = ConfigChange::AddLearner {
            id: 2,
            address: "x".into(),
        };
        let dup_addr = ConfigChange::AddLearner {
            id: 3,
            address: "n1".into(),
        };
        assert!(c.apply_change(&dup_id).is_err());
        assert!(c.apply_change(&dup_addr).is_err());
    }

    #[test]
    fn promote_turns_a_learner_into_a_voter() {
        let c = config(&[1], &[2]);
        let next = c
            .apply_change(&ConfigChange::PromoteLearner { id: 2 })
            .unwrap();
        assert_eq!(next.voter_ids(), vec![1, 2]);
        assert!(
            c.apply_change(&ConfigChange::PromoteLearner { id: 1 })
                .is_err()
        );
    }

    #[test]
    fn history_falls_back_when_a_config_entry_is_truncated() {
        let mut h = ConfigHistory::new(config(&[1, 2, 3], &[]));
        h.push(5, config(&[1, 2, 3, 4], &[]));
        h.push(9, config(&[1, 2, 4], &[]));
        assert_eq!(h.current().voter_ids(), vec![1, 2, 4]);
        assert_eq!(h.at(6).voter_ids(), vec![1, 2, 3, 4]);
        assert!(h.truncate_from(9));
        assert_eq!(h.current().voter_ids(), vec![1, 2, 3, 4]);
        h.compact_to(7);
        assert_eq!(h.last_change_index(), 0);
        assert_eq!(h.current().voter_ids(), vec![1, 2, 3, 4]);
    }
}
