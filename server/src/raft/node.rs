//! The Raft state machine of one group member.
//!
//! Safety rules enforced here, each with the section of the Raft paper or dissertation it
//! comes from:
//! - a member votes at most once per term, and only for a candidate whose log is at least as
//!   up-to-date as its own (§5.2, §5.4.1); term and vote are persisted before the vote leaves;
//! - a leader never overwrites its log, and a follower truncates only entries that conflict and
//!   are not committed (§5.3); a stale or duplicated AppendEntries never truncates anything;
//! - a leader commits by counting replicas only entries of its own term (§5.4.2, Figure 8);
//!   earlier entries commit with them;
//! - a leader counts its own entries toward a quorum only once they are durable (§10.2.1);
//! - reads are linearizable through ReadIndex, and none is served before the leader commits an
//!   entry of its own term (§6.4);
//! - pre-vote and check-quorum (§9.6) keep a member that was cut off from unseating a healthy
//!   leader when it returns, and make a leader that lost its majority step down.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use prost::Message as _;
use sync_proto::raft::v1 as pb;

use super::log::RaftLog;
use super::membership::{
    ClusterConfigExt, ConfigChange, ConfigHistory, decode_config, is_config_entry,
};
use super::progress::{Progress, ProgressState};
use super::quorum::{self, VoteResult};
use super::read_only::{ReadOnly, ReadState};
use super::rng::SplitMix64;
use super::{Config, Message, NodeId, RaftError, ReadOnlyOption, Ready, Role};

/// What the leader knows about one peer, for status displays and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer.
    pub id: NodeId,
    /// Highest index known to match the leader's log.
    pub matched: u64,
    /// Next index the leader will send.
    pub next: u64,
    /// Replication state.
    pub state: ProgressState,
    /// AppendEntries sent and not yet acknowledged (Replicate state's pipeline depth).
    pub inflight: usize,
    /// A learner (does not vote).
    pub learner: bool,
    /// Ticks since the leader last heard from the peer.
    pub ticks_since_contact: u64,
}

/// One member of one Raft group (see the module docs).
#[derive(Clone, Debug)]
pub struct RaftNode {
    /// Settings.
    cfg: Config,
    /// Current term (persisted).
    term: u64,
    /// Who this member voted for in `term`, 0 for nobody (persisted).
    vote: NodeId,
    /// The leader of `term`, if known.
    leader: Option<NodeId>,
    /// Role in `term`.
    role: Role,
    /// The log after the snapshot.
    log: RaftLog,
    /// Configurations along the log; the latest is in force.
    configs: ConfigHistory,
    /// Leader only: the progress of every other member.
    progress: BTreeMap<NodeId, Progress>,
    /// Candidate only: votes received (true = granted).
    votes: BTreeMap<NodeId, bool>,
    /// Ticks since the last election timeout reset (follower, candidate) or since the last
    /// check-quorum (leader).
    election_elapsed: u32,
    /// Leader only: ticks since the last heartbeat.
    heartbeat_elapsed: u32,
    /// This term's election timeout, drawn from `[election_tick, 2 * election_tick)`.
    randomized_election_timeout: u32,
    /// Ticks since the engine was created: the leader's clock for leases and contact times.
    ticks: u64,
    /// Ticks since this member last heard from a leader of its term (AppendEntries or
    /// InstallSnapshot). Leader stickiness refuses votes while it is below `election_tick`.
    /// Unlike `leader`, it is not reset by a higher-term message, so a stray answer cannot
    /// lift stickiness early (which would break leases). With leases it starts at 0, so a
    /// restarted member does not vote before a lease it may have confirmed could run out.
    ticks_since_leader: u32,
    /// Leader only: a TimeoutNow was sent this term, so the target may win an election that
    /// overrides stickiness at any later moment: no more lease reads this term.
    lease_forfeited: bool,
    /// Leader only: the member leadership is being transferred to.
    transfer_target: Option<NodeId>,
    /// The leader's current read round (see `read_only`). Monotonic for the engine's life.
    read_round: u64,
    /// Leader only: the tick at which each recent round was started, for leases.
    round_ticks: VecDeque<(u64, u64)>,
    /// A read was registered and a heartbeat round must go out with the next Ready.
    read_round_pending: bool,
    /// Reads waiting at the leader.
    reads: ReadOnly,
    /// Election-timeout randomness.
    rng: SplitMix64,
    /// The hard state last handed out in a Ready.
    last_hard_state: pb::HardState,
    /// Output: messages that may be sent at once.
    msgs: Vec<Message>,
    /// Output: messages to send after persisting.
    persisted_msgs: Vec<Message>,
    /// Output: reads now safe.
    read_states: Vec<ReadState>,
    /// Output: reads that failed.
    dropped_reads: Vec<u64>,
    /// Output: a snapshot from the leader to install.
    snapshot_to_install: Option<pb::SnapshotMetadata>,
}

impl RaftNode {
    /// A member of a new group whose initial membership is `initial` (the same on every
    /// founding member). A member that joins an existing group later starts with an empty
    /// configuration and learns it from the leader.
    pub fn new(cfg: Config, initial: pb::ClusterConfig) -> Result<Self, RaftError> {
        Self::restore(cfg, initial, pb::HardState::default(), None, Vec::new())
    }

    /// A member restarted from its durable state: hard state, the latest snapshot's metadata
    /// (if any) and the log entries after it. `initial` is the founding membership (used when
    /// there is no snapshot).
    pub fn restore(
        cfg: Config,
        initial: pb::ClusterConfig,
        hard_state: pb::HardState,
        snapshot: Option<pb::SnapshotMetadata>,
        entries: Vec<pb::Entry>,
    ) -> Result<Self, RaftError> {
        cfg.validate()?;
        let (snap_index, snap_term, base) = match snapshot {
            Some(s) => (s.last_index, s.last_term, s.config.unwrap_or_default()),
            None => (0, 0, initial),
        };
        let mut configs = ConfigHistory::new(base);
        for (i, e) in entries.iter().enumerate() {
            let expected = snap_index + 1 + i as u64;
            if e.index != expected {
                return Err(RaftError::Malformed(format!(
                    "recovered log is not contiguous: expected index {expected}, found {}",
                    e.index
                )));
            }
            if is_config_entry(e) {
                configs.push(e.index, decode_config(e)?);
            }
        }
        let last = snap_index + entries.len() as u64;
        if hard_state.commit > last {
            return Err(RaftError::Malformed(format!(
                "hard state commit {} is beyond the last recovered entry {last}",
                hard_state.commit
            )));
        }
        let log = RaftLog::restore(snap_index, snap_term, entries, hard_state.commit);
        let rng = SplitMix64(cfg.seed);
        let ticks_since_leader = if cfg.read_only == ReadOnlyOption::LeaseBased {
            0
        } else {
            cfg.election_tick
        };
        let mut node = RaftNode {
            term: hard_state.term,
            vote: hard_state.vote,
            leader: None,
            role: Role::Follower,
            log,
            configs,
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: cfg.election_tick,
            ticks: 0,
            ticks_since_leader,
            lease_forfeited: false,
            transfer_target: None,
            read_round: 0,
            round_ticks: VecDeque::new(),
            read_round_pending: false,
            reads: ReadOnly::default(),
            rng,
            last_hard_state: pb::HardState::default(),
            msgs: Vec::new(),
            persisted_msgs: Vec::new(),
            read_states: Vec::new(),
            dropped_reads: Vec::new(),
            snapshot_to_install: None,
            cfg,
        };
        node.last_hard_state = node.hard_state();
        node.reset_election_timer();
        Ok(node)
    }

    // ----- accessors -------------------------------------------------------------------------

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    /// The group this engine runs.
    pub fn group_id(&self) -> u64 {
        self.cfg.group_id
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The leader of the current term, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// Who this member voted for in the current term (0 if nobody).
    pub fn vote(&self) -> NodeId {
        self.vote
    }

    /// Highest committed index.
    pub fn commit_index(&self) -> u64 {
        self.log.committed()
    }

    /// Highest index handed out for applying.
    pub fn applied_index(&self) -> u64 {
        self.log.applied()
    }

    /// Highest durable index.
    pub fn persisted_index(&self) -> u64 {
        self.log.persisted()
    }

    /// Index of the last log entry.
    pub fn last_index(&self) -> u64 {
        self.log.last_index()
    }

    /// Term of the last log entry.
    pub fn last_term(&self) -> u64 {
        self.log.last_term()
    }

    /// First index still in the log (entries before it are in the snapshot).
    pub fn first_index(&self) -> u64 {
        self.log.first_index()
    }

    /// Bytes of entry data in the log after the snapshot.
    pub fn log_bytes(&self) -> u64 {
        self.log.data_bytes()
    }

    /// Term of the entry at `index`, if held.
    pub fn term_at(&self, index: u64) -> Option<u64> {
        self.log.term(index)
    }

    /// The entry at `index`, if held.
    pub fn entry(&self, index: u64) -> Option<&pb::Entry> {
        self.log.entry(index)
    }

    /// The membership in force.
    pub fn config(&self) -> &pb::ClusterConfig {
        self.configs.current()
    }

    /// The hard state as it stands (persisted or about to be).
    pub fn hard_state(&self) -> pb::HardState {
        pb::HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Config {
        &self.cfg
    }

    /// Leader only: the member leadership is being transferred to.
    pub fn transfer_target(&self) -> Option<NodeId> {
        self.transfer_target
    }

    /// Leader only: each peer's replication status, in id order.
    pub fn peers(&self) -> Vec<PeerStatus> {
        self.progress
            .iter()
            .map(|(&id, p)| PeerStatus {
                id,
                matched: p.matched,
                next: p.next,
                state: p.state,
                inflight: p.inflights.len(),
                learner: p.learner,
                ticks_since_contact: self.ticks.saturating_sub(p.last_contact_tick),
            })
            .collect()
    }

    /// True if this member may campaign: it is a voter of the configuration in force, or it
    /// was a voter before the latest change and that change is not committed yet. The second
    /// case is from the Raft dissertation (§4.2.2): the previous configuration's majority may
    /// still need this member, and if it stopped campaigning as soon as it appended its own
    /// removal, a group whose other members lack that entry could never elect a leader. (The
    /// simulator found exactly that: seed 606 of the 3-member run.)
    fn promotable(&self) -> bool {
        if self.configs.current().is_voter(self.cfg.id) {
            return true;
        }
        let change = self.configs.last_change_index();
        change > self.log.committed() && self.configs.at(change - 1).is_voter(self.cfg.id)
    }

    /// True if the leader has committed an entry of its own term (so its commit index is at
    /// least the previous leader's).
    fn committed_in_current_term(&self) -> bool {
        self.log.term(self.log.committed()) == Some(self.term)
    }

    // ----- output ----------------------------------------------------------------------------

    /// True if a call to [`RaftNode::ready`] would return something.
    pub fn has_ready(&self) -> bool {
        self.hard_state() != self.last_hard_state
            || self.snapshot_to_install.is_some()
            || self.log.has_unstable()
            || !self.msgs.is_empty()
            || !self.persisted_msgs.is_empty()
            || self.log.has_committed()
            || !self.read_states.is_empty()
            || !self.dropped_reads.is_empty()
            || self.read_round_pending
    }

    /// Takes everything decided since the previous call (see the module docs of `raft`).
    pub fn ready(&mut self) -> Ready {
        if self.read_round_pending {
            self.read_round_pending = false;
            if self.role == Role::Leader {
                self.broadcast_heartbeat();
            }
        }
        let hs = self.hard_state();
        let hard_state = (hs != self.last_hard_state).then(|| {
            self.last_hard_state = hs;
            hs
        });
        Ready {
            hard_state,
            snapshot: self.snapshot_to_install.take(),
            entries: self.log.take_unstable(),
            messages: std::mem::take(&mut self.msgs),
            persisted_messages: std::mem::take(&mut self.persisted_msgs),
            committed_entries: self.log.take_committed(self.cfg.max_apply_bytes),
            read_states: std::mem::take(&mut self.read_states),
            dropped_reads: std::mem::take(&mut self.dropped_reads),
        }
    }

    /// The runtime made entries up to `index` (whose term is `term`) durable. A leader now
    /// counts them toward the quorum.
    pub fn on_persisted(&mut self, index: u64, term: u64) {
        if self.log.persisted_to(index, term) && self.role == Role::Leader && self.maybe_commit() {
            self.broadcast_append(true);
        }
    }

    /// The state machine was snapshotted at `index` (already applied and durable): drop the log
    /// up to it. Returns the snapshot's metadata, which the runtime stores with the snapshot.
    pub fn compact(&mut self, index: u64) -> Result<pb::SnapshotMetadata, RaftError> {
        let (snap_index, _) = self.log.snapshot_point();
        if index <= snap_index {
            return Err(RaftError::Compaction {
                index,
                reason: "already compacted",
            });
        }
        if index > self.log.applied() || index > self.log.persisted() {
            return Err(RaftError::Compaction {
                index,
                reason: "not yet applied and durable",
            });
        }
        let meta = self.snapshot_metadata_at(index);
        self.configs.compact_to(index);
        self.log.compact_to(index);
        Ok(meta)
    }

    /// Metadata of a snapshot of the state machine at `index` (the term there and the
    /// configuration in force), if `index` is applied and still in the log. The runtime saves
    /// the snapshot with it, then calls [`RaftNode::compact`].
    pub fn snapshot_metadata(&self, index: u64) -> Option<pb::SnapshotMetadata> {
        let (snap_index, _) = self.log.snapshot_point();
        (index >= snap_index && index <= self.log.applied() && self.log.term(index).is_some())
            .then(|| self.snapshot_metadata_at(index))
    }

    /// Metadata of a snapshot at `index` (held in the log or the snapshot point).
    fn snapshot_metadata_at(&self, index: u64) -> pb::SnapshotMetadata {
        pb::SnapshotMetadata {
            last_index: index,
            last_term: self.log.term(index).unwrap_or(0),
            config: Some(self.configs.at(index).clone()),
        }
    }

    /// The transport could not reach `peer`: stop streaming to it optimistically.
    pub fn report_unreachable(&mut self, peer: NodeId) {
        if let Some(p) = self.progress.get_mut(&peer)
            && p.state == ProgressState::Replicate
        {
            p.become_probe();
        }
    }

    /// Sending a snapshot to `peer` failed: probe again (after the next heartbeat answer).
    pub fn report_snapshot_failed(&mut self, peer: NodeId) {
        if let Some(p) = self.progress.get_mut(&peer)
            && matches!(p.state, ProgressState::Snapshot { .. })
        {
            p.state = ProgressState::Probe;
            p.next = p.matched + 1;
            p.probe_sent = true;
        }
    }

    /// Starts an election now, as if the election timeout had elapsed (with pre-vote first if
    /// enabled). Useful when a single-member group starts, and in tests.
    pub fn campaign(&mut self) {
        if self.role != Role::Leader {
            self.election_elapsed = 0;
            self.start_election(false);
        }
    }

    // ----- time ------------------------------------------------------------------------------

    /// One tick of logical time.
    pub fn tick(&mut self) {
        self.ticks += 1;
        if self.role == Role::Leader {
            self.tick_leader();
            return;
        }
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        self.ticks_since_leader = self.ticks_since_leader.saturating_add(1);
        if self.election_elapsed >= self.randomized_election_timeout && self.promotable() {
            self.election_elapsed = 0;
            self.start_election(false);
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_tick {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.quorum_recently_active() {
                self.become_follower(self.term, None);
                return;
            }
            // A transfer that did not complete within an election timeout is abandoned, so
            // the leader accepts proposals again.
            self.transfer_target = None;
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
    }

    /// Check-quorum: true if a majority of voters (counting this leader) was heard from since
    /// the previous check. Resets the marks for the next period.
    fn quorum_recently_active(&mut self) -> bool {
        let voters = self.configs.current().voter_ids();
        let mut active = 0;
        for v in &voters {
            if *v == self.cfg.id {
                active += 1;
            } else if let Some(p) = self.progress.get_mut(v)
                && std::mem::replace(&mut p.recent_active, false)
            {
                active += 1;
            }
        }
        active >= quorum::majority(voters.len())
    }

    fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        let spread = u64::from(self.cfg.election_tick);
        self.randomized_election_timeout =
            self.cfg.election_tick + (self.rng.next_u64() % spread) as u32;
    }

    // ----- role changes ----------------------------------------------------------------------

    fn become_follower(&mut self, term: u64, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.vote = 0;
        }
        if self.role == Role::Leader {
            self.dropped_reads.extend(self.reads.drain());
            self.round_ticks.clear();
            self.read_round_pending = false;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.progress.clear();
        self.votes.clear();
        self.transfer_target = None;
        self.reset_election_timer();
    }

    /// Starts a pre-vote round, or (for a leadership transfer, or without pre-vote) a real
    /// election.
    fn start_election(&mut self, transfer: bool) {
        if self.role == Role::Leader || !self.promotable() {
            return;
        }
        if self.cfg.pre_vote && !transfer {
            self.role = Role::PreCandidate;
            self.leader = None;
            self.votes.clear();
            self.votes.insert(self.cfg.id, true);
            self.reset_election_timer();
            self.request_votes(true, false);
        } else {
            self.campaign_in_new_term(transfer);
        }
    }

    fn campaign_in_new_term(&mut self, transfer: bool) {
        self.term += 1;
        self.vote = self.cfg.id;
        self.role = Role::Candidate;
        self.leader = None;
        self.votes.clear();
        self.votes.insert(self.cfg.id, true);
        self.reset_election_timer();
        self.request_votes(false, transfer);
    }

    fn request_votes(&mut self, pre_vote: bool, transfer: bool) {
        if self.count_votes() == VoteResult::Won {
            self.on_election_won();
            return;
        }
        let term = if pre_vote { self.term + 1 } else { self.term };
        for to in self.configs.current().voter_ids() {
            if to == self.cfg.id {
                continue;
            }
            let m = Message::RequestVote(pb::RequestVoteRequest {
                group_id: self.cfg.group_id,
                term,
                from: self.cfg.id,
                to,
                last_log_index: self.log.last_index(),
                last_log_term: self.log.last_term(),
                pre_vote,
                leadership_transfer: transfer,
            });
            // A real vote request follows a vote for ourselves, which must be durable first.
            if pre_vote {
                self.msgs.push(m);
            } else {
                self.persisted_msgs.push(m);
            }
        }
    }

    fn count_votes(&self) -> VoteResult {
        let voters = self.configs.current().voter_ids();
        let granted = voters
            .iter()
            .filter(|v| self.votes.get(v) == Some(&true))
            .count();
        let rejected = voters
            .iter()
            .filter(|v| self.votes.get(v) == Some(&false))
            .count();
        quorum::tally(voters.len(), granted, rejected)
    }

    fn on_election_won(&mut self) {
        match self.role {
            Role::PreCandidate => self.campaign_in_new_term(false),
            Role::Candidate => self.become_leader(),
            _ => {}
        }
    }

    fn become_leader(&mut self) {
        self.role = Role::Leader;
        self.lease_forfeited = false;
        self.leader = Some(self.cfg.id);
        self.transfer_target = None;
        self.votes.clear();
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.progress.clear();
        self.sync_progress_with_config();
        // Commit an entry of our own term at once: it commits every earlier entry with it, and
        // until it commits neither reads nor membership changes may proceed.
        let noop = pb::Entry {
            term: self.term,
            index: self.log.last_index() + 1,
            ..Default::default()
        };
        self.append_own(vec![noop]);
        self.broadcast_append(false);
    }

    /// Leader: keeps one Progress per other member of the configuration in force.
    fn sync_progress_with_config(&mut self) {
        let config = self.configs.current().clone();
        let next = self.log.last_index() + 1;
        self.progress
            .retain(|id, _| config.member(*id).is_some() && *id != self.cfg.id);
        for m in &config.members {
            if m.id == self.cfg.id {
                continue;
            }
            let p = self.progress.entry(m.id).or_insert_with(|| {
                let mut p = Progress::new(next, self.cfg.max_inflight_msgs, m.learner);
                p.last_contact_tick = self.ticks;
                p
            });
            p.learner = m.learner;
        }
        if let Some(t) = self.transfer_target
            && !config.is_voter(t)
        {
            self.transfer_target = None;
        }
    }

    /// Reacts to the configuration in force changing (appended or truncated). Only a leader has
    /// work to do: the other roles step down before appending anyone's entries.
    fn on_config_changed(&mut self) {
        if self.role == Role::Leader {
            self.sync_progress_with_config();
            // Removing a lagging voter can make entries committed.
            if self.maybe_commit() {
                self.broadcast_append(true);
            }
        }
    }

    // ----- client requests -------------------------------------------------------------------

    fn check_can_propose(&self) -> Result<(), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if let Some(target) = self.transfer_target {
            return Err(RaftError::TransferInProgress { target });
        }
        Ok(())
    }

    /// Proposes one command. Returns the index it will have if committed: the runtime
    /// matches the applied entry at that index, and treats a different term there as a lost
    /// proposal.
    pub fn propose(
        &mut self,
        data: Bytes,
        request: Option<pb::RequestId>,
    ) -> Result<u64, RaftError> {
        self.propose_batch(std::iter::once((data, request)))
            .map(|(first, _)| first)
    }

    /// Proposes several commands as consecutive entries, sent to followers together. Returns
    /// the first and last index.
    pub fn propose_batch(
        &mut self,
        commands: impl IntoIterator<Item = (Bytes, Option<pb::RequestId>)>,
    ) -> Result<(u64, u64), RaftError> {
        self.check_can_propose()?;
        let first = self.log.last_index() + 1;
        let term = self.term;
        let entries: Vec<pb::Entry> = commands
            .into_iter()
            .enumerate()
            .map(|(i, (data, request))| pb::Entry {
                term,
                index: first + i as u64,
                entry_type: pb::EntryType::Normal as i32,
                data,
                request,
            })
            .collect();
        let last = first + entries.len() as u64 - 1;
        if entries.is_empty() {
            return Ok((first, first - 1));
        }
        self.append_own(entries);
        self.broadcast_append(false);
        Ok((first, last))
    }

    /// Proposes a one-step membership change. Refused while another change is uncommitted or
    /// before the leader has committed an entry of its term.
    pub fn propose_config_change(&mut self, change: ConfigChange) -> Result<u64, RaftError> {
        self.check_can_propose()?;
        let pending = self.configs.last_change_index();
        if pending > self.log.committed() {
            return Err(RaftError::ConfigChangePending { index: pending });
        }
        if !self.committed_in_current_term() {
            return Err(RaftError::LeaderNotReady);
        }
        let next = self.configs.current().apply_change(&change)?;
        let index = self.log.last_index() + 1;
        self.append_own(vec![pb::Entry {
            term: self.term,
            index,
            entry_type: pb::EntryType::Config as i32,
            data: Bytes::from(next.encode_to_vec()),
            request: None,
        }]);
        self.broadcast_append(false);
        Ok(index)
    }

    /// Records the configuration entries among `entries` (about to be appended): each takes
    /// effect now. They always decode: a leader encoded its own, and `step` validated a peer's.
    /// Returns true if any was found.
    fn record_configs(&mut self, entries: &[pb::Entry]) -> bool {
        let mut found = false;
        for e in entries.iter().filter(|e| is_config_entry(e)) {
            if let Ok(c) = decode_config(e) {
                self.configs.push(e.index, c);
                found = true;
            }
        }
        found
    }

    /// Leader: appends its own new entries; a configuration among them takes effect now.
    fn append_own(&mut self, entries: Vec<pb::Entry>) {
        let config_changed = self.record_configs(&entries);
        self.log.append(entries);
        if config_changed {
            self.on_config_changed();
        }
    }

    /// Asks for a linearizable read identified by `context`. The answer comes in a later
    /// Ready's `read_states` (or `dropped_reads` if leadership is lost first).
    pub fn read_index(&mut self, context: u64) -> Result<(), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if !self.committed_in_current_term() {
            self.reads.wait_for_commit(context);
            return Ok(());
        }
        self.register_read(context);
        Ok(())
    }

    fn register_read(&mut self, context: u64) {
        let index = self.log.committed();
        if self.cfg.read_only == ReadOnlyOption::LeaseBased && self.lease_valid() {
            self.read_states.push(ReadState { context, index });
            return;
        }
        if !self.read_round_pending {
            // Reads registered before the next Ready share one heartbeat round.
            self.read_round += 1;
            self.read_round_pending = true;
        }
        self.reads.register(context, index, self.read_round);
        self.release_confirmed_reads();
    }

    /// The read round a majority of voters has confirmed (this leader confirms every round).
    fn confirmed_round(&self) -> u64 {
        let mut rounds: Vec<u64> = self
            .configs
            .current()
            .voter_ids()
            .iter()
            .map(|v| {
                if *v == self.cfg.id {
                    self.read_round
                } else {
                    self.progress.get(v).map_or(0, |p| p.read_round_acked)
                }
            })
            .collect();
        quorum::majority_value(&mut rounds)
    }

    fn release_confirmed_reads(&mut self) {
        if self.reads.is_empty() {
            return;
        }
        let confirmed = self.confirmed_round();
        self.reads.release(confirmed, &mut self.read_states);
    }

    /// Leader lease (see [`ReadOnlyOption::LeaseBased`]): true while a majority confirmed a
    /// round started less than `election_tick - lease_margin` ticks ago, and no transfer is in
    /// progress (a transfer lets the successor skip the followers' lease check).
    fn lease_valid(&self) -> bool {
        if self.role != Role::Leader || self.transfer_target.is_some() || self.lease_forfeited {
            return false;
        }
        let confirmed = self.confirmed_round();
        let Some(&(_, started)) = self.round_ticks.iter().rev().find(|(r, _)| *r <= confirmed)
        else {
            return false;
        };
        let lease = u64::from(self.cfg.election_tick - self.cfg.lease_margin);
        self.ticks < started + lease
    }

    /// Starts handing leadership to `target`: once it has the whole log, it is told to
    /// campaign at once. Proposals are refused meanwhile; the transfer is abandoned after an
    /// election timeout.
    pub fn transfer_leader(&mut self, target: NodeId) -> Result<(), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if target == self.cfg.id {
            return Ok(());
        }
        if !self.configs.current().is_voter(target) {
            return Err(RaftError::InvalidTransferTarget(target));
        }
        self.transfer_target = Some(target);
        self.election_elapsed = 0;
        let caught_up = self
            .progress
            .get(&target)
            .is_some_and(|p| p.matched == self.log.last_index());
        if caught_up {
            self.send_timeout_now(target);
        } else {
            self.send_append(target, true);
        }
        Ok(())
    }

    // ----- sending ---------------------------------------------------------------------------

    fn broadcast_append(&mut self, allow_empty: bool) {
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for id in peers {
            self.send_append(id, allow_empty);
        }
    }

    /// Sends `to` the entries it needs next, or a snapshot if they were compacted. Returns
    /// true if a message was sent.
    fn send_append(&mut self, to: NodeId, allow_empty: bool) -> bool {
        let Some(p) = self.progress.get(&to) else {
            return false;
        };
        if p.is_paused() {
            return false;
        }
        let prev = p.next - 1;
        let prev_term = self.log.term(prev);
        let entries = self.log.entries_from(
            p.next,
            self.cfg.max_entries_per_msg,
            self.cfg.max_bytes_per_msg,
        );
        let (Some(prev_term), Some(entries)) = (prev_term, entries) else {
            return self.send_snapshot(to);
        };
        if entries.is_empty() && !allow_empty {
            return false;
        }
        let last = entries.last().map(|e| e.index);
        let p = self.progress.get_mut(&to).expect("checked above");
        match p.state {
            ProgressState::Replicate => {
                if let Some(last) = last {
                    p.next = last + 1;
                    p.inflights.add(last);
                }
            }
            ProgressState::Probe => p.probe_sent = true,
            ProgressState::Snapshot { .. } => unreachable!("paused"),
        }
        self.msgs
            .push(Message::AppendEntries(pb::AppendEntriesRequest {
                group_id: self.cfg.group_id,
                term: self.term,
                from: self.cfg.id,
                to,
                prev_log_index: prev,
                prev_log_term: prev_term,
                entries,
                leader_commit: self.log.committed(),
                heartbeat: false,
                read_round: self.read_round,
            }));
        true
    }

    fn send_snapshot(&mut self, to: NodeId) -> bool {
        let Some(p) = self.progress.get_mut(&to) else {
            return false;
        };
        // Do not stream a snapshot to a member that has not answered lately; the next
        // heartbeat answer will bring us back here.
        if !p.recent_active {
            return false;
        }
        let (snap_index, _) = self.log.snapshot_point();
        p.become_snapshot(snap_index);
        let metadata = self.snapshot_metadata_at(snap_index);
        self.msgs
            .push(Message::InstallSnapshot(pb::InstallSnapshotRequest {
                group_id: self.cfg.group_id,
                term: self.term,
                from: self.cfg.id,
                to,
                metadata: Some(metadata),
            }));
        true
    }

    /// Heartbeats to every member, starting a new read round. A heartbeat carries the commit
    /// index only up to what the member is known to hold, so a member never learns a commit
    /// index past entries it may hold differently.
    fn broadcast_heartbeat(&mut self) {
        self.read_round += 1;
        self.round_ticks.push_back((self.read_round, self.ticks));
        let horizon = u64::from(self.cfg.election_tick) * 2;
        while self
            .round_ticks
            .front()
            .is_some_and(|(_, t)| t + horizon < self.ticks)
            && self.round_ticks.len() > 1
        {
            self.round_ticks.pop_front();
        }
        for (&to, p) in &self.progress {
            self.msgs
                .push(Message::AppendEntries(pb::AppendEntriesRequest {
                    group_id: self.cfg.group_id,
                    term: self.term,
                    from: self.cfg.id,
                    to,
                    prev_log_index: 0,
                    prev_log_term: 0,
                    entries: Vec::new(),
                    leader_commit: p.matched.min(self.log.committed()),
                    heartbeat: true,
                    read_round: self.read_round,
                }));
        }
        // A single-voter group confirms rounds by itself.
        self.release_confirmed_reads();
    }

    fn send_timeout_now(&mut self, to: NodeId) {
        self.lease_forfeited = true;
        self.msgs.push(Message::TimeoutNow(pb::TimeoutNowRequest {
            group_id: self.cfg.group_id,
            term: self.term,
            from: self.cfg.id,
            to,
        }));
    }

    /// Leader: commits the highest index a majority holds, if it is of the current term.
    fn maybe_commit(&mut self) -> bool {
        let mut matched: Vec<u64> = self
            .configs
            .current()
            .voter_ids()
            .iter()
            .map(|v| {
                if *v == self.cfg.id {
                    self.log.persisted()
                } else {
                    self.progress.get(v).map_or(0, |p| p.matched)
                }
            })
            .collect();
        let candidate = quorum::majority_value(&mut matched);
        // Figure 8: an entry of an earlier term is never committed by counting replicas.
        if candidate > self.log.committed() && self.log.term(candidate) == Some(self.term) {
            self.log.commit_to(candidate);
            self.on_commit_advanced();
            return true;
        }
        false
    }

    fn on_commit_advanced(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        if self.committed_in_current_term() {
            for context in self.reads.take_awaiting_commit() {
                self.register_read(context);
            }
        }
        // A leader that removed itself hands over once the change is committed (§4.2.2).
        if !self.promotable() && self.configs.last_change_index() <= self.log.committed() {
            self.become_follower(self.term, None);
        }
    }

    // ----- receiving -------------------------------------------------------------------------

    /// Handles a message from a peer.
    pub fn step(&mut self, m: Message) -> Result<(), RaftError> {
        if m.group_id() != self.cfg.group_id {
            return Err(RaftError::WrongGroup {
                expected: self.cfg.group_id,
                got: m.group_id(),
            });
        }
        if m.to() != self.cfg.id {
            return Err(RaftError::Misaddressed {
                me: self.cfg.id,
                to: m.to(),
            });
        }
        if m.from() == 0 || m.from() == self.cfg.id {
            return Err(RaftError::Malformed(format!(
                "{} claims to come from node {}",
                m.kind(),
                m.from()
            )));
        }
        validate(&m)?;

        let term = m.term();
        if term > self.term {
            match &m {
                Message::RequestVote(req) => {
                    // Leader stickiness (dissertation §4.2.3): while we hear from a leader, an
                    // election is not needed and a vote request most likely comes from a member
                    // that was cut off, or removed without learning it (the leader stops
                    // replicating to removed members, so they campaign forever). Always on: the
                    // simulator showed removed members starving a group of leaders without it
                    // (plain-Raft seed 3002472). Only a transfer the leader asked for overrides it.
                    let in_lease = (self.role == Role::Leader
                        || self.ticks_since_leader < self.cfg.election_tick)
                        && !req.leadership_transfer;
                    if in_lease {
                        self.reply_vote(req, false);
                        return Ok(());
                    }
                    if !req.pre_vote {
                        self.become_follower(term, None);
                    }
                }
                // A granted pre-vote carries the term we would campaign in.
                Message::RequestVoteResponse(r) if r.pre_vote && r.granted => {}
                Message::AppendEntries(_)
                | Message::InstallSnapshot(_)
                | Message::TimeoutNow(_) => self.become_follower(term, Some(m.from())),
                _ => self.become_follower(term, None),
            }
        } else if term < self.term {
            self.answer_stale(&m);
            return Ok(());
        }

        match m {
            Message::AppendEntries(req) => self.handle_append(req),
            Message::AppendEntriesResponse(r) => self.handle_append_response(r),
            Message::RequestVote(req) => self.handle_vote_request(req),
            Message::RequestVoteResponse(r) => self.handle_vote_response(r),
            Message::InstallSnapshot(req) => self.handle_snapshot(req),
            Message::InstallSnapshotResponse(r) => self.handle_snapshot_response(r),
            Message::TimeoutNow(req) => self.handle_timeout_now(req),
            Message::TimeoutNowResponse(_) => {}
        }
        Ok(())
    }

    /// Answers a request from an older term with our term, so the sender learns it is stale
    /// (a deposed leader steps down on the answer). Stale responses are dropped.
    fn answer_stale(&mut self, m: &Message) {
        let group_id = self.cfg.group_id;
        let term = self.term;
        let from = self.cfg.id;
        let reply = match m {
            Message::AppendEntries(req) => {
                Message::AppendEntriesResponse(pb::AppendEntriesResponse {
                    group_id,
                    term,
                    from,
                    to: req.from,
                    rejected: true,
                    // Neither the index nor the read round of a request from an older term may
                    // be echoed: our term may equal the sender's *current* term (it restarted
                    // and won again), and an old round would confirm its new reads without any
                    // round trip (found in review; `a_stale_answer_confirms_no_read_round`).
                    index: 0,
                    hint_index: 0,
                    hint_term: 0,
                    heartbeat: req.heartbeat,
                    read_round: 0,
                })
            }
            Message::RequestVote(req) => {
                self.reply_vote(req, false);
                return;
            }
            Message::InstallSnapshot(req) => {
                Message::InstallSnapshotResponse(pb::InstallSnapshotResponse {
                    group_id,
                    term,
                    from,
                    to: req.from,
                    last_index: 0,
                    rejected: true,
                })
            }
            Message::TimeoutNow(req) => Message::TimeoutNowResponse(pb::TimeoutNowResponse {
                group_id,
                term,
                from,
                to: req.from,
            }),
            _ => return,
        };
        self.persisted_msgs.push(reply);
    }

    fn reply_vote(&mut self, req: &pb::RequestVoteRequest, granted: bool) {
        let m = Message::RequestVoteResponse(pb::RequestVoteResponse {
            group_id: self.cfg.group_id,
            term: if granted { req.term } else { self.term },
            from: self.cfg.id,
            to: req.from,
            granted,
            pre_vote: req.pre_vote,
        });
        // A granted real vote was recorded in the hard state and must be durable first.
        if req.pre_vote {
            self.msgs.push(m);
        } else {
            self.persisted_msgs.push(m);
        }
    }

    fn handle_vote_request(&mut self, req: pb::RequestVoteRequest) {
        // Here req.term == self.term, or a pre-vote for a later term.
        let can_vote = self.vote == req.from
            || (self.vote == 0 && self.leader.is_none())
            || (req.pre_vote && req.term > self.term);
        let grant = can_vote
            && self
                .log
                .is_up_to_date(req.last_log_index, req.last_log_term);
        if grant && !req.pre_vote {
            self.vote = req.from;
            self.election_elapsed = 0;
        }
        self.reply_vote(&req, grant);
    }

    fn handle_vote_response(&mut self, r: pb::RequestVoteResponse) {
        let expected = match self.role {
            Role::PreCandidate => r.pre_vote && (!r.granted || r.term == self.term + 1),
            Role::Candidate => !r.pre_vote,
            _ => false,
        };
        if !expected || !self.configs.current().is_voter(r.from) {
            return;
        }
        self.votes.insert(r.from, r.granted);
        match self.count_votes() {
            VoteResult::Won => self.on_election_won(),
            VoteResult::Lost => self.become_follower(self.term, None),
            VoteResult::Pending => {}
        }
    }

    fn reply_append(&mut self, req: &pb::AppendEntriesRequest, outcome: AppendOutcome) {
        let (rejected, index, hint_index, hint_term) = match outcome {
            AppendOutcome::Accepted { matched } => (false, matched, 0, 0),
            AppendOutcome::Rejected {
                hint_index,
                hint_term,
            } => (true, req.prev_log_index, hint_index, hint_term),
        };
        self.persisted_msgs
            .push(Message::AppendEntriesResponse(pb::AppendEntriesResponse {
                group_id: self.cfg.group_id,
                term: self.term,
                from: self.cfg.id,
                to: req.from,
                rejected,
                index,
                hint_index,
                hint_term,
                heartbeat: req.heartbeat,
                read_round: req.read_round,
            }));
    }

    fn handle_append(&mut self, mut req: pb::AppendEntriesRequest) {
        if self.role != Role::Follower {
            self.become_follower(self.term, Some(req.from));
        }
        self.leader = Some(req.from);
        self.election_elapsed = 0;
        self.ticks_since_leader = 0;

        if req.heartbeat {
            self.log.commit_to(req.leader_commit);
            // A heartbeat checks no log, so its answer claims no match index.
            self.reply_append(&req, AppendOutcome::Accepted { matched: 0 });
            return;
        }
        // Everything up to our commit index is already known to match the leader.
        if req.prev_log_index < self.log.committed() {
            let matched = self.log.committed();
            self.reply_append(&req, AppendOutcome::Accepted { matched });
            return;
        }
        if !self.log.matches(req.prev_log_index, req.prev_log_term) {
            let probe = req.prev_log_index.min(self.log.last_index());
            let (hint_index, hint_term) = self.log.find_conflict_by_term(probe, req.prev_log_term);
            self.reply_append(
                &req,
                AppendOutcome::Rejected {
                    hint_index,
                    hint_term,
                },
            );
            return;
        }
        let entries = std::mem::take(&mut req.entries);
        let last_new = req.prev_log_index + entries.len() as u64;
        if let Some(conflict) = self.log.find_conflict(&entries) {
            let tail: Vec<pb::Entry> = entries
                .into_iter()
                .skip((conflict - req.prev_log_index - 1) as usize)
                .collect();
            let truncated = self.configs.truncate_from(conflict);
            let config_changed = self.record_configs(&tail) | truncated;
            self.log.truncate_and_append(tail);
            if config_changed {
                self.on_config_changed();
            }
        }
        // Commit only what is known to match the leader: entries past `last_new` may differ.
        self.log.commit_to(req.leader_commit.min(last_new));
        self.reply_append(&req, AppendOutcome::Accepted { matched: last_new });
    }

    fn handle_append_response(&mut self, r: pb::AppendEntriesResponse) {
        if self.role != Role::Leader {
            return;
        }
        let last_index = self.log.last_index();
        if r.index > last_index || r.hint_index > last_index {
            // No answer to anything this leader sent can name an index past its log.
            return;
        }
        let Some(p) = self.progress.get_mut(&r.from) else {
            return;
        };
        p.recent_active = true;
        p.last_contact_tick = self.ticks;
        p.read_round_acked = p.read_round_acked.max(r.read_round);

        if r.heartbeat {
            p.probe_sent = false;
            // Messages may have been lost: make room so the leader can find out.
            if p.state == ProgressState::Replicate && p.inflights.full() {
                p.inflights.free_first_one();
            }
            if p.matched < last_index {
                self.send_append(r.from, true);
            }
        } else if r.rejected {
            let hint = if r.hint_term > 0 {
                self.log.find_conflict_by_term(r.hint_index, r.hint_term).0
            } else {
                r.hint_index
            };
            let p = self.progress.get_mut(&r.from).expect("present");
            if p.maybe_decrease_to(r.index, hint) {
                if p.state == ProgressState::Replicate {
                    p.become_probe();
                }
                self.send_append(r.from, true);
            }
        } else if p.maybe_update(r.index) {
            match p.state {
                ProgressState::Probe => p.become_replicate(),
                ProgressState::Snapshot { pending } if p.matched >= pending => {
                    p.become_probe();
                    p.become_replicate();
                }
                ProgressState::Replicate => p.inflights.free_up_to(r.index),
                ProgressState::Snapshot { .. } => {}
            }
            if self.maybe_commit() {
                self.broadcast_append(true);
            }
            while self.send_append(r.from, false) {}
            if self.transfer_target == Some(r.from)
                && self
                    .progress
                    .get(&r.from)
                    .is_some_and(|p| p.matched == self.log.last_index())
            {
                self.send_timeout_now(r.from);
            }
        }
        self.release_confirmed_reads();
    }

    fn handle_snapshot(&mut self, req: pb::InstallSnapshotRequest) {
        if self.role != Role::Follower {
            self.become_follower(self.term, Some(req.from));
        }
        self.leader = Some(req.from);
        self.election_elapsed = 0;
        self.ticks_since_leader = 0;
        let meta = req.metadata.unwrap_or_default();
        let last_index = if meta.last_index <= self.log.committed() {
            // We already have everything it covers.
            self.log.committed()
        } else if self.log.matches(meta.last_index, meta.last_term) {
            // Our log holds its last entry, so it holds everything before it too.
            self.log.commit_to(meta.last_index);
            meta.last_index
        } else {
            self.log.restore_snapshot(meta.last_index, meta.last_term);
            self.configs.reset(meta.config.clone().unwrap_or_default());
            let index = meta.last_index;
            self.snapshot_to_install = Some(meta);
            self.on_config_changed();
            index
        };
        self.persisted_msgs.push(Message::InstallSnapshotResponse(
            pb::InstallSnapshotResponse {
                group_id: self.cfg.group_id,
                term: self.term,
                from: self.cfg.id,
                to: req.from,
                last_index,
                rejected: false,
            },
        ));
    }

    fn handle_snapshot_response(&mut self, r: pb::InstallSnapshotResponse) {
        if self.role != Role::Leader || r.rejected || r.last_index > self.log.last_index() {
            return;
        }
        let Some(p) = self.progress.get_mut(&r.from) else {
            return;
        };
        p.recent_active = true;
        p.last_contact_tick = self.ticks;
        p.maybe_update(r.last_index);
        if matches!(p.state, ProgressState::Snapshot { .. }) {
            p.become_probe();
        }
        if self.maybe_commit() {
            self.broadcast_append(true);
        }
        self.send_append(r.from, true);
    }

    fn handle_timeout_now(&mut self, req: pb::TimeoutNowRequest) {
        if self.role == Role::Follower && self.promotable() {
            self.start_election(true);
        }
        self.persisted_msgs
            .push(Message::TimeoutNowResponse(pb::TimeoutNowResponse {
                group_id: self.cfg.group_id,
                term: self.term,
                from: self.cfg.id,
                to: req.from,
            }));
    }
}

/// What a follower answers to an AppendEntries.
enum AppendOutcome {
    /// The follower's log now matches the leader's up to `matched`.
    Accepted { matched: u64 },
    /// The follower lacks the entry at prev_log_index; the hint helps the leader back up.
    Rejected { hint_index: u64, hint_term: u64 },
}

/// Rejects messages whose contents would break the engine's invariants if trusted: entries that
/// do not follow `prev_log_index` contiguously, configuration entries that do not decode, or an
/// InstallSnapshot without metadata.
fn validate(m: &Message) -> Result<(), RaftError> {
    match m {
        Message::AppendEntries(req) => {
            if req
                .prev_log_index
                .checked_add(req.entries.len() as u64 + 1)
                .is_none()
            {
                return Err(RaftError::Malformed(format!(
                    "AppendEntries prev_log_index {} overflows with {} entries",
                    req.prev_log_index,
                    req.entries.len()
                )));
            }
            for (i, e) in req.entries.iter().enumerate() {
                let expected = req.prev_log_index + 1 + i as u64;
                if e.index != expected {
                    return Err(RaftError::Malformed(format!(
                        "AppendEntries entry {i} has index {}, expected {expected}",
                        e.index
                    )));
                }
                if e.term > req.term || e.term < req.prev_log_term {
                    return Err(RaftError::Malformed(format!(
                        "AppendEntries entry {} has term {} outside [{}, {}]",
                        e.index, e.term, req.prev_log_term, req.term
                    )));
                }
                if is_config_entry(e) {
                    decode_config(e)?;
                }
            }
            Ok(())
        }
        Message::InstallSnapshot(req) => match &req.metadata {
            None => Err(RaftError::Malformed(
                "InstallSnapshot without metadata".into(),
            )),
            Some(m) if m.last_index == u64::MAX || m.last_term > req.term => {
                Err(RaftError::Malformed(format!(
                    "InstallSnapshot of ({}, term {}) from a leader of term {}",
                    m.last_index, m.last_term, req.term
                )))
            }
            Some(_) => Ok(()),
        },
        _ => Ok(()),
    }
}
