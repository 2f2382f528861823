//! Linearizable reads without writing to the log: the ReadIndex protocol (Raft dissertation
//! §6.4).
//!
//! A read registered at the leader records the commit index at that moment and the *read
//! round* the leader then starts. Every AppendEntries the leader sends carries the current
//! round and every answer echoes it, so once a majority has answered a message of round `r`,
//! the leader knows it was still the leader when round `r` began, and no other leader could
//! have committed anything it does not hold. A read of round `r` may then be served as soon as
//! the state machine has applied its recorded index.
//!
//! A new leader does not know the commit index of its predecessor until it commits an entry
//! of its own term, so reads that arrive before then wait in [`ReadOnly::awaiting_commit`].

use std::collections::VecDeque;

/// A read that is now safe to serve once the state machine has applied `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The caller's identifier of the read, as given to `read_index`.
    pub context: u64,
    /// The commit index the read must observe.
    pub index: u64,
}

/// A read waiting for a majority to confirm its round.
#[derive(Clone, Copy, Debug)]
struct PendingRead {
    /// The caller's identifier.
    context: u64,
    /// The commit index when the read was registered.
    index: u64,
    /// The round that must be confirmed.
    round: u64,
}

/// Reads waiting at the leader.
#[derive(Clone, Debug, Default)]
pub struct ReadOnly {
    /// Reads whose round is not yet confirmed, in registration (so round) order.
    pending: VecDeque<PendingRead>,
    /// Reads that arrived before the leader committed an entry of its term.
    awaiting_commit: Vec<u64>,
}

impl ReadOnly {
    /// Parks a read until the leader commits an entry of its own term.
    pub fn wait_for_commit(&mut self, context: u64) {
        self.awaiting_commit.push(context);
    }

    /// Takes the reads parked by [`ReadOnly::wait_for_commit`].
    pub fn take_awaiting_commit(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.awaiting_commit)
    }

    /// Registers a read of `index` that becomes safe when `round` is confirmed.
    pub fn register(&mut self, context: u64, index: u64, round: u64) {
        debug_assert!(self.pending.back().is_none_or(|p| p.round <= round));
        self.pending.push_back(PendingRead {
            context,
            index,
            round,
        });
    }

    /// Releases every read whose round is at or below `confirmed_round`.
    pub fn release(&mut self, confirmed_round: u64, out: &mut Vec<ReadState>) {
        while let Some(p) = self.pending.front().copied() {
            if p.round > confirmed_round {
                break;
            }
            self.pending.pop_front();
            out.push(ReadState {
                context: p.context,
                index: p.index,
            });
        }
    }

    /// True if any read is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.awaiting_commit.is_empty()
    }

    /// Drops every waiting read (leadership was lost) and returns their contexts so the
    /// caller can fail them at once instead of letting them time out.
    pub fn drain(&mut self) -> Vec<u64> {
        let mut out: Vec<u64> = self.pending.drain(..).map(|p| p.context).collect();
        out.append(&mut self.awaiting_commit);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_released_in_round_order_once_confirmed() {
        let mut ro = ReadOnly::default();
        ro.register(1, 10, 3);
        ro.register(2, 11, 4);
        let mut out = Vec::new();
        ro.release(3, &mut out);
        assert_eq!(
            out,
            vec![ReadState {
                context: 1,
                index: 10
            }]
        );
        ro.release(5, &mut out);
        assert_eq!(out.len(), 2);
        assert!(ro.is_empty());
    }

    #[test]
    fn drain_returns_parked_and_pending_reads() {
        let mut ro = ReadOnly::default();
        ro.wait_for_commit(7);
        ro.register(8, 1, 1);
        let mut dropped = ro.drain();
        dropped.sort();
        assert_eq!(dropped, vec![7, 8]);
        assert!(ro.is_empty());
    }
}
