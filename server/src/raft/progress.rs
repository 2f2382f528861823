//! What the leader knows about each follower's log, and how fast it may send to it.
//!
//! A follower's progress is in one of three states, as in etcd's raft:
//! - **Probe**: the leader does not know where the follower's log matches its own. It sends one
//!   AppendEntries at a time and waits for the answer (or the next heartbeat response) before
//!   sending another, walking `next` back with the follower's conflict hints.
//! - **Replicate**: the logs match up to `matched`. The leader streams entries optimistically,
//!   advancing `next` as it sends, bounded by the [`Inflights`] window so a slow follower cannot
//!   make the leader buffer without limit.
//! - **Snapshot**: the entries the follower needs were compacted; a snapshot is on its way and
//!   nothing else is sent until it is acknowledged or reported failed.

use std::collections::VecDeque;

/// The replication state of one follower (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// One message at a time until the match point is found.
    Probe,
    /// Optimistic pipelining within the inflight window.
    Replicate,
    /// A snapshot ending at `pending` is being sent.
    Snapshot {
        /// The last index of the snapshot being sent.
        pending: u64,
    },
}

/// A bounded window of AppendEntries messages sent but not yet acknowledged, remembered by the
/// last index each carried.
#[derive(Clone, Debug)]
pub struct Inflights {
    /// Last index of each unacknowledged message, in send order (so ascending).
    last_indexes: VecDeque<u64>,
    /// The window size: no more than this many messages may be unacknowledged.
    capacity: usize,
}

impl Inflights {
    /// An empty window of `capacity` messages (at least 1).
    pub fn new(capacity: usize) -> Self {
        Inflights {
            last_indexes: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// True when no further message may be sent.
    pub fn full(&self) -> bool {
        self.last_indexes.len() >= self.capacity
    }

    /// Records a message whose last entry is `last_index`.
    pub fn add(&mut self, last_index: u64) {
        self.last_indexes.push_back(last_index);
    }

    /// Forgets every message whose entries are all at or below `index` (acknowledged).
    pub fn free_up_to(&mut self, index: u64) {
        while self.last_indexes.front().is_some_and(|&i| i <= index) {
            self.last_indexes.pop_front();
        }
    }

    /// Forgets the oldest message: a heartbeat answer showed the member is alive, so a full
    /// window more likely means lost messages than a slow member, and one new message will
    /// find out (it is either accepted or rejected, which moves the member to probing).
    pub fn free_first_one(&mut self) {
        self.last_indexes.pop_front();
    }

    /// Forgets everything (on a state change).
    pub fn reset(&mut self) {
        self.last_indexes.clear();
    }

    /// Number of unacknowledged messages.
    pub fn len(&self) -> usize {
        self.last_indexes.len()
    }

    /// True if nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.last_indexes.is_empty()
    }
}

/// The leader's view of one member (including itself).
#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to match the leader's log on this member. Never decreases while the
    /// leader keeps its term.
    pub matched: u64,
    /// Next index to send. Invariant: `matched < next`.
    pub next: u64,
    /// Probe, Replicate or Snapshot.
    pub state: ProgressState,
    /// In Probe state: a message was sent and the leader waits before sending another.
    pub probe_sent: bool,
    /// Messages in flight in Replicate state.
    pub inflights: Inflights,
    /// Heard from in the current check-quorum period.
    pub recent_active: bool,
    /// The highest read round this member acknowledged (for ReadIndex and leases).
    pub read_round_acked: u64,
    /// The leader's tick at which it last heard from this member.
    pub last_contact_tick: u64,
    /// A learner: replicated to, but not counted in any quorum.
    pub learner: bool,
}

impl Progress {
    /// A fresh progress in Probe state that starts probing at `next`.
    pub fn new(next: u64, inflight_capacity: usize, learner: bool) -> Self {
        Progress {
            matched: 0,
            next: next.max(1),
            state: ProgressState::Probe,
            probe_sent: false,
            inflights: Inflights::new(inflight_capacity),
            recent_active: false,
            read_round_acked: 0,
            last_contact_tick: 0,
            learner,
        }
    }

    /// Enters Probe state, probing right after the match point (or after a pending snapshot).
    pub fn become_probe(&mut self) {
        let after = match self.state {
            ProgressState::Snapshot { pending } => pending.max(self.matched),
            _ => self.matched,
        };
        self.state = ProgressState::Probe;
        self.next = after + 1;
        self.probe_sent = false;
        self.inflights.reset();
    }

    /// Enters Replicate state: stream from just after the match point.
    pub fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next = self.matched + 1;
        self.probe_sent = false;
        self.inflights.reset();
    }

    /// Enters Snapshot state for a snapshot ending at `pending`.
    pub fn become_snapshot(&mut self, pending: u64) {
        self.state = ProgressState::Snapshot { pending };
        self.probe_sent = false;
        self.inflights.reset();
    }

    /// Records that the member holds the leader's log up to `index`. Returns true if that is
    /// news (the match point advanced). Also lifts a probe pause: the member answered.
    pub fn maybe_update(&mut self, index: u64) -> bool {
        let updated = index > self.matched;
        if updated {
            self.matched = index;
            self.probe_sent = false;
        }
        self.next = self.next.max(index.saturating_add(1));
        updated
    }

    /// Handles a rejection of the AppendEntries whose prev_log_index was `rejected`, with
    /// `hint` the leader's best guess of the last index that may match. Returns false if the
    /// rejection is stale (answers an older message) and must be ignored.
    pub fn maybe_decrease_to(&mut self, rejected: u64, hint: u64) -> bool {
        if self.state == ProgressState::Replicate {
            // Entries up to `matched` are known to match; a rejection at or below it answers an
            // older probe and says nothing new.
            if rejected <= self.matched {
                return false;
            }
            self.next = self.matched + 1;
            return true;
        }
        // In Probe state only the answer to the last probe (prev = next - 1) counts.
        if self.next == 0 || self.next - 1 != rejected {
            return false;
        }
        self.next = rejected.min(hint.saturating_add(1)).max(self.matched + 1);
        self.probe_sent = false;
        true
    }

    /// True when the leader must not send this member another AppendEntries now.
    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflights_free_up_to_releases_acknowledged_messages_only() {
        let mut w = Inflights::new(3);
        w.add(5);
        w.add(9);
        w.add(12);
        assert!(w.full());
        w.free_up_to(9);
        assert_eq!(w.len(), 1);
        assert!(!w.full());
        w.free_up_to(11);
        assert_eq!(w.len(), 1);
        w.free_up_to(12);
        assert!(w.is_empty());
    }

    #[test]
    fn probe_ignores_a_rejection_of_an_older_probe() {
        let mut p = Progress::new(10, 4, false);
        assert!(
            !p.maybe_decrease_to(5, 3),
            "prev 5 is not the last probe (9)"
        );
        assert!(p.maybe_decrease_to(9, 6));
        assert_eq!(p.next, 7);
    }

    #[test]
    fn replicate_ignores_rejections_at_or_below_match() {
        let mut p = Progress::new(1, 4, false);
        p.maybe_update(10);
        p.become_replicate();
        assert!(!p.maybe_decrease_to(10, 0));
        assert!(p.maybe_decrease_to(11, 0));
        assert_eq!(p.next, 11);
    }

    #[test]
    fn decrease_never_goes_below_match() {
        let mut p = Progress::new(1, 4, false);
        p.maybe_update(4);
        p.next = 9;
        assert!(p.maybe_decrease_to(8, 0));
        assert_eq!(p.next, 5);
    }
}
