//! One lock: its holders, its FIFO queue of waiters and its lock-delay.
//!
//! Invariants kept by [`super::LockTable`] (and checked by its property tests):
//! - holders are compatible: either any number of SHARED holds, or one EXCLUSIVE hold;
//! - a session holds a lock at most once and waits for it at most once;
//! - upgrade waiters (sessions converting their SHARED hold) come before every other waiter;
//! - the head of the queue is never grantable when [`Lock::head_grantable`] is asked after every
//!   change, so nobody waits for nothing.

use std::collections::VecDeque;

use sync_proto::internal::v1::ClientRequest;
use sync_proto::sync::v1::LockMode;

/// How a lock is held or asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Any number of holders at once.
    Shared,
    /// One holder, and no other.
    Exclusive,
}

impl Mode {
    /// The wire mode; UNSPECIFIED means EXCLUSIVE, unknown values are refused.
    pub fn from_wire(mode: i32) -> Option<Mode> {
        match LockMode::try_from(mode).ok()? {
            LockMode::Shared => Some(Mode::Shared),
            LockMode::Exclusive | LockMode::Unspecified => Some(Mode::Exclusive),
        }
    }

    /// The wire mode.
    pub fn wire(self) -> LockMode {
        match self {
            Mode::Shared => LockMode::Shared,
            Mode::Exclusive => LockMode::Exclusive,
        }
    }

    /// Two holds in these modes cannot coexist.
    pub fn conflicts(self, other: Mode) -> bool {
        self == Mode::Exclusive || other == Mode::Exclusive
    }
}

/// A session's hold on a lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// The holding session.
    pub session: u64,
    /// The mode held.
    pub mode: Mode,
    /// The fencing token of the grant (or of the last conversion).
    pub token: u64,
    /// When it was granted or last converted (leader time).
    pub acquired_ms: u64,
    /// The lock-delay that applies if the hold is lost through expiry or revocation.
    pub lock_delay_ms: u64,
}

/// A request waiting for a lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiter {
    /// Its id: the log index of its Acquire.
    pub id: u64,
    /// The waiting session.
    pub session: u64,
    /// The mode asked for.
    pub mode: Mode,
    /// When it started waiting (leader time).
    pub since_ms: u64,
    /// When its wait ends without a grant (leader time).
    pub deadline_ms: u64,
    /// The session already holds the lock SHARED and converts it to EXCLUSIVE.
    pub upgrade: bool,
    /// Lock-delay for the hold once granted.
    pub lock_delay_ms: u64,
    /// The Acquire's de-duplication id: its remembered answer follows the wait's outcome.
    pub request: Option<ClientRequest>,
}

/// One lock's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lock {
    /// Current holds, in grant order.
    pub holders: Vec<Hold>,
    /// Waiting requests, in service order: upgrades first, then FIFO by arrival.
    pub waiters: VecDeque<Waiter>,
    /// While a lock-delay is in force, when it ends (leader time); 0 otherwise.
    pub delay_until_ms: u64,
}

impl Lock {
    /// The hold of `session`, if any.
    pub fn hold_of(&self, session: u64) -> Option<&Hold> {
        self.holders.iter().find(|h| h.session == session)
    }

    /// The mode the lock is held in, if held.
    pub fn mode(&self) -> Option<Mode> {
        self.holders.first().map(|h| h.mode)
    }

    /// Nobody holds or awaits it and no lock-delay is in force: it can be forgotten.
    pub fn is_free(&self, now_ms: u64) -> bool {
        self.holders.is_empty() && self.waiters.is_empty() && self.delay_until_ms <= now_ms
    }

    /// A new request by `session` in `mode` could be granted at once: no lock-delay, nobody
    /// waiting ahead of it, and compatible with every holder.
    pub fn grantable_now(&self, session: u64, mode: Mode, now_ms: u64) -> bool {
        self.delay_until_ms <= now_ms
            && self.waiters.is_empty()
            && self
                .holders
                .iter()
                .all(|h| h.session == session || !mode.conflicts(h.mode))
    }

    /// The head of the queue can be granted now.
    pub fn head_grantable(&self, now_ms: u64) -> bool {
        if self.delay_until_ms > now_ms {
            return false;
        }
        let Some(head) = self.waiters.front() else {
            return false;
        };
        if head.upgrade {
            self.holders.iter().all(|h| h.session == head.session)
        } else {
            self.holders.iter().all(|h| !head.mode.conflicts(h.mode))
        }
    }

    /// Where a new waiter goes: an upgrade after the upgrades already waiting, anything else at
    /// the back.
    pub fn queue_position(&self, upgrade: bool) -> usize {
        if upgrade {
            self.waiters.iter().take_while(|w| w.upgrade).count()
        } else {
            self.waiters.len()
        }
    }

    /// The sessions the waiter at `position` waits for, in a stable order: holders it
    /// conflicts with, then waiters ahead of it it conflicts with (under FIFO service both must
    /// leave before it is granted). Its own session is never among them.
    pub fn blockers(&self, position: usize) -> Vec<u64> {
        let Some(w) = self.waiters.get(position) else {
            return Vec::new();
        };
        let mut out: Vec<u64> = Vec::new();
        let holders = self
            .holders
            .iter()
            .filter(|h| h.session != w.session && w.mode.conflicts(h.mode))
            .map(|h| h.session);
        let ahead = self
            .waiters
            .iter()
            .take(position)
            .filter(|a| a.session != w.session && w.mode.conflicts(a.mode))
            .map(|a| a.session);
        for s in holders.chain(ahead) {
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    /// The position of the waiter with this id.
    pub fn position_of(&self, waiter_id: u64) -> Option<usize> {
        self.waiters.iter().position(|w| w.id == waiter_id)
    }
}
