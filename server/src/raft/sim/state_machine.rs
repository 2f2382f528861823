//! The simulator's replicated state machine and durable storage.
//!
//! The state machine records the commands it applied, in order, behind the real request
//! de-duplication table, so the simulator can check that every acknowledged command is applied
//! exactly once and that reads observe every write acknowledged before they began.

use std::collections::BTreeSet;

use sync_proto::raft::v1 as pb;

use crate::state::dedup::{ClientTable, Dedup};

/// A command: which client and which of its requests.
pub fn encode_command(client: u64, seq: u64) -> bytes::Bytes {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&client.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    bytes::Bytes::from(b)
}

fn command_id(data: &[u8]) -> Option<(u64, u64)> {
    if data.len() != 16 {
        return None;
    }
    let client = u64::from_le_bytes(data[..8].try_into().ok()?);
    let seq = u64::from_le_bytes(data[8..].try_into().ok()?);
    Some((client, seq))
}

/// The outcome of applying one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Not a client command (no-op or configuration).
    Internal,
    /// The command holds this position in the applied order (new or a recognised retry).
    Slot(u64),
    /// Refused as too old to de-duplicate.
    Expired,
}

/// The replicated state: applied commands in order, and the client table.
#[derive(Clone, Debug)]
pub struct StateMachine {
    /// Index of the last applied entry.
    pub applied_index: u64,
    /// `(client, seq)` of each applied command, in apply order.
    pub commands: Vec<(u64, u64)>,
    /// The same, as a set, to detect a second application.
    seen: BTreeSet<(u64, u64)>,
    /// Request de-duplication.
    table: ClientTable<u64>,
}

impl Default for StateMachine {
    fn default() -> Self {
        StateMachine {
            applied_index: 0,
            commands: Vec::new(),
            seen: BTreeSet::new(),
            table: ClientTable::new(64, 16),
        }
    }
}

impl StateMachine {
    /// Applies one committed entry. `Err` describes a command applied twice.
    pub fn apply(&mut self, entry: &pb::Entry) -> Result<Applied, String> {
        if entry.index != self.applied_index + 1 {
            return Err(format!(
                "entry {} applied after entry {}",
                entry.index, self.applied_index
            ));
        }
        self.applied_index = entry.index;
        let (Some(request), Some(id)) = (&entry.request, command_id(&entry.data)) else {
            return Ok(Applied::Internal);
        };
        match self.table.check(request) {
            Dedup::Apply => {
                if !self.seen.insert(id) {
                    return Err(format!(
                        "command {id:?} applied a second time at index {}",
                        entry.index
                    ));
                }
                let slot = self.commands.len() as u64;
                self.commands.push(id);
                self.table.record(request, entry.index, slot);
                Ok(Applied::Slot(slot))
            }
            Dedup::Duplicate(slot) => Ok(Applied::Slot(slot)),
            Dedup::Expired => Ok(Applied::Expired),
        }
    }

    /// True if the command was applied.
    pub fn contains(&self, id: (u64, u64)) -> bool {
        self.seen.contains(&id)
    }
}

/// A snapshot: its metadata and the state machine it captured.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Where it ends and the membership there.
    pub meta: pb::SnapshotMetadata,
    /// The state after applying everything up to `meta.last_index`.
    pub state: StateMachine,
}

/// What survives a crash: the same contract as the storage layer's `LogStore`.
#[derive(Clone, Debug, Default)]
pub struct Durable {
    /// Term, vote, commit.
    pub hard_state: pb::HardState,
    /// Latest snapshot.
    pub snapshot: Option<Snapshot>,
    /// Entries after the snapshot.
    pub entries: Vec<pb::Entry>,
}

impl Durable {
    fn snapshot_index(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.meta.last_index)
    }

    /// Appends entries, replacing any stored suffix they overlap.
    pub fn append(&mut self, entries: &[pb::Entry]) -> Result<(), String> {
        let Some(first) = entries.first().map(|e| e.index) else {
            return Ok(());
        };
        let base = self.snapshot_index();
        let last = base + self.entries.len() as u64;
        if first <= base || first > last + 1 {
            return Err(format!(
                "append at {first} does not fit a log holding {}..={last}",
                base + 1
            ));
        }
        self.entries.truncate((first - base - 1) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    /// Stores a snapshot taken locally and drops the entries it covers.
    pub fn compact(&mut self, snapshot: Snapshot) {
        let drop = (snapshot.meta.last_index - self.snapshot_index()) as usize;
        self.entries.drain(..drop.min(self.entries.len()));
        self.snapshot = Some(snapshot);
    }

    /// Installs a snapshot from the leader, replacing the log.
    pub fn install(&mut self, snapshot: Snapshot) {
        self.entries.clear();
        self.snapshot = Some(snapshot);
    }
}
