//! Sessions: the leases that hold locks.
//!
//! A session lives until its expiry time (leader time from the log). The table keeps an index by
//! expiry so that the lock table finds what is due in order, and an index of implicit sessions by
//! their client string.

use std::collections::{BTreeMap, BTreeSet};

/// One open session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Its id: the log index of the command that opened it, so never 0 and never reused.
    pub id: u64,
    /// The client's name for itself (for an implicit session, the client string).
    pub client_name: String,
    /// Named by a client string rather than opened explicitly; removed once it holds and awaits
    /// nothing.
    pub implicit: bool,
    /// How long it lives without a keep-alive.
    pub ttl_ms: u64,
    /// Leader time at which it expires. Only [`SessionTable::set_expiry`] changes it, so that the
    /// expiry index stays exact.
    expires_ms: u64,
    /// Leader time at which it was opened.
    pub created_ms: u64,
    /// Locks it holds.
    pub held: BTreeSet<String>,
    /// Locks it waits for, with the waiting request's id.
    pub waiting: BTreeMap<String, u64>,
}

impl Session {
    /// A new session that expires at `expires_ms`.
    pub fn new(
        id: u64,
        client_name: String,
        implicit: bool,
        ttl_ms: u64,
        created_ms: u64,
        expires_ms: u64,
    ) -> Session {
        Session {
            id,
            client_name,
            implicit,
            ttl_ms,
            expires_ms,
            created_ms,
            held: BTreeSet::new(),
            waiting: BTreeMap::new(),
        }
    }

    /// Leader time at which it expires.
    pub fn expires_ms(&self) -> u64 {
        self.expires_ms
    }

    /// Locks held plus locks awaited: what the per-session limit counts.
    pub fn footprint(&self) -> usize {
        self.held.len() + self.waiting.len()
    }

    /// Holds and awaits nothing.
    pub fn is_idle(&self) -> bool {
        self.held.is_empty() && self.waiting.is_empty()
    }
}

/// Open sessions with their indexes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionTable {
    /// Sessions by id.
    by_id: BTreeMap<u64, Session>,
    /// `(expires_ms, id)` of every session: the first is the next to expire.
    by_expiry: BTreeSet<(u64, u64)>,
    /// Implicit sessions by client string.
    implicit: BTreeMap<String, u64>,
}

impl SessionTable {
    /// Adds a session.
    pub fn insert(&mut self, session: Session) {
        self.by_expiry.insert((session.expires_ms, session.id));
        if session.implicit {
            self.implicit
                .insert(session.client_name.clone(), session.id);
        }
        self.by_id.insert(session.id, session);
    }

    /// Removes a session.
    pub fn remove(&mut self, id: u64) -> Option<Session> {
        let session = self.by_id.remove(&id)?;
        self.by_expiry.remove(&(session.expires_ms, id));
        if session.implicit {
            self.implicit.remove(&session.client_name);
        }
        Some(session)
    }

    /// A session by id.
    pub fn get(&self, id: u64) -> Option<&Session> {
        self.by_id.get(&id)
    }

    /// A session by id, to change its holds and waits (not its expiry).
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Session> {
        self.by_id.get_mut(&id)
    }

    /// The implicit session of a client string.
    pub fn implicit(&self, client: &str) -> Option<u64> {
        self.implicit.get(client).copied()
    }

    /// Moves a session's expiry.
    pub fn set_expiry(&mut self, id: u64, expires_ms: u64) {
        if let Some(s) = self.by_id.get_mut(&id) {
            self.by_expiry.remove(&(s.expires_ms, id));
            s.expires_ms = expires_ms;
            self.by_expiry.insert((expires_ms, id));
        }
    }

    /// The session that expires first, with its expiry.
    pub fn next_expiry(&self) -> Option<(u64, u64)> {
        self.by_expiry.first().copied()
    }

    /// How many sessions are open.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// No session is open.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Sessions in ascending id order, starting after `after`.
    pub fn after(&self, after: u64) -> impl Iterator<Item = &Session> {
        self.by_id
            .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .map(|(_, s)| s)
    }

    /// Every session id, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.by_id.keys().copied().collect()
    }
}
