//! The safety properties of Raft, one function each, checked by the simulator as it runs.
//!
//! Each function takes what it needs, checks one property, and returns a description of the
//! violation. The properties are those of Figure 3 of the Raft paper, plus the client-visible
//! ones: acknowledged commands applied exactly once, and linearizable reads.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use sync_proto::raft::v1 as pb;

use crate::raft::{NodeId, RaftNode, Role};

/// A fingerprint of an entry's contents (type, data and request id).
pub fn fingerprint(e: &pb::Entry) -> u64 {
    let mut h = DefaultHasher::new();
    e.entry_type.hash(&mut h);
    e.data.hash(&mut h);
    e.request.map(|r| (r.client_id, r.sequence)).hash(&mut h);
    h.finish()
}

/// What the checker has learnt so far about the whole history.
#[derive(Debug, Default)]
pub struct History {
    /// The leader of each term seen.
    leaders: BTreeMap<u64, NodeId>,
    /// For every `(index, term)` ever appended anywhere: the entry's fingerprint and the term
    /// of the entry before it. Log Matching says both are the same wherever it appears.
    appended: HashMap<(u64, u64), (u64, u64)>,
    /// Committed entries by index: `(term, fingerprint)`.
    committed: Vec<Option<(u64, u64)>>,
}

impl History {
    fn committed_at(&self, index: u64) -> Option<(u64, u64)> {
        self.committed.get(index as usize).copied().flatten()
    }

    /// Records `(term, fingerprint)` as committed at `index`, or checks it matches what was
    /// committed there before.
    fn commit(&mut self, index: u64, value: (u64, u64)) -> Result<(), String> {
        let i = index as usize;
        if self.committed.len() <= i {
            self.committed.resize(i + 1, None);
        }
        match self.committed[i] {
            None => {
                self.committed[i] = Some(value);
                Ok(())
            }
            Some(prev) if prev == value => Ok(()),
            Some(prev) => Err(format!(
                "index {index} committed as term {} then as term {} (fingerprints {:x} vs {:x})",
                prev.0, value.0, prev.1, value.1
            )),
        }
    }
}

/// Election Safety: at most one leader per term.
pub fn election_safety(h: &mut History, node: &RaftNode) -> Result<(), String> {
    if node.role() != Role::Leader {
        return Ok(());
    }
    let leader = *h.leaders.entry(node.term()).or_insert(node.id());
    if leader != node.id() {
        return Err(format!(
            "two leaders in term {}: {leader} and {}",
            node.term(),
            node.id()
        ));
    }
    Ok(())
}

/// Log Matching: two entries with the same index and term hold the same command and follow
/// entries of the same term (so, by induction, the logs are identical up to them). Checked on
/// every entry as it is handed out for persisting, which every entry of every log goes through.
pub fn log_matching(
    h: &mut History,
    node: &RaftNode,
    new_entries: &[pb::Entry],
) -> Result<(), String> {
    for e in new_entries {
        let Some(prev_term) = node.term_at(e.index - 1) else {
            continue;
        };
        let value = (fingerprint(e), prev_term);
        let known = *h.appended.entry((e.index, e.term)).or_insert(value);
        if known != value {
            return Err(format!(
                "node {} holds entry ({}, term {}) with fingerprint {:x} after term {}, \
                 elsewhere it is {:x} after term {}",
                node.id(),
                e.index,
                e.term,
                value.0,
                value.1,
                known.0,
                known.1
            ));
        }
    }
    Ok(())
}

/// Committed entries never change: once an index is committed anywhere, every node whose
/// commit index covers that index holds the same entry there, and no node rewrites an entry at
/// or below its own commit index. (A deposed leader may still append entries at indexes that
/// are committed elsewhere; those are not committed on it, and will be truncated.)
pub fn committed_entries_are_immutable(
    h: &mut History,
    node: &RaftNode,
    new_entries: &[pb::Entry],
    checked_commit: &mut u64,
) -> Result<(), String> {
    for e in new_entries
        .iter()
        .filter(|e| e.index <= node.commit_index())
    {
        if let Some((term, fp)) = h.committed_at(e.index)
            && (term, fp) != (e.term, fingerprint(e))
        {
            return Err(format!(
                "node {} rewrote index {} below its commit index {} with term {} (committed: \
                 term {term})",
                node.id(),
                e.index,
                node.commit_index(),
                e.term
            ));
        }
        if e.index <= *checked_commit {
            return Err(format!(
                "node {} rewrote index {} which it had already committed",
                node.id(),
                e.index
            ));
        }
    }
    let commit = node.commit_index();
    let from = (*checked_commit).max(node.first_index().saturating_sub(1)) + 1;
    for i in from..=commit {
        if let Some(e) = node.entry(i) {
            h.commit(i, (e.term, fingerprint(e)))
                .map_err(|d| format!("node {}: {d}", node.id()))?;
        }
    }
    *checked_commit = (*checked_commit).max(commit);
    Ok(())
}

/// Leader Completeness: a new leader holds every entry committed before its election.
pub fn leader_completeness(h: &History, node: &RaftNode) -> Result<(), String> {
    let first = node.first_index();
    for (i, c) in h.committed.iter().enumerate() {
        let i = i as u64;
        let Some((term, fp)) = *c else { continue };
        if i < first {
            continue;
        }
        match node.entry(i) {
            Some(e) if e.term == term && fingerprint(e) == fp => {}
            other => {
                return Err(format!(
                    "leader {} of term {} lacks committed entry {i} (term {term}); it holds {:?}",
                    node.id(),
                    node.term(),
                    other.map(|e| e.term)
                ));
            }
        }
    }
    Ok(())
}

/// State Machine Safety: every node applies the same entry at each index.
pub fn state_machine_safety(
    h: &mut History,
    node: NodeId,
    applied: &pb::Entry,
) -> Result<(), String> {
    h.commit(applied.index, (applied.term, fingerprint(applied)))
        .map_err(|d| {
            format!("node {node} applied an entry that differs from the committed one: {d}")
        })
}

/// A client-visible history of acknowledged writes and completed reads.
#[derive(Debug, Default)]
pub struct ClientHistory {
    /// `(round acknowledged, slot)` of each acknowledged write.
    pub acked_writes: Vec<(u64, u64)>,
    /// `(round completed, value)` of each completed read.
    pub completed_reads: Vec<(u64, u64)>,
}

/// Linearizable reads: a read returns a state that includes every write acknowledged before the
/// read began, and no older state than any read that completed before it began. (A read's value
/// is the number of commands applied; a write's slot is its position in that order.)
pub fn reads_are_linearizable(c: &ClientHistory, invoked: u64, value: u64) -> Result<(), String> {
    if let Some(&(round, slot)) = c
        .acked_writes
        .iter()
        .filter(|(r, _)| *r < invoked)
        .max_by_key(|(_, s)| *s)
        && slot >= value
    {
        return Err(format!(
            "read begun at round {invoked} saw {value} commands, but the write in slot {slot} \
             was acknowledged at round {round}"
        ));
    }
    if let Some(&(round, seen)) = c
        .completed_reads
        .iter()
        .filter(|(r, _)| *r < invoked)
        .max_by_key(|(_, v)| *v)
        && seen > value
    {
        return Err(format!(
            "read begun at round {invoked} saw {value} commands, but a read completed at round \
             {round} had already seen {seen}"
        ));
    }
    Ok(())
}
