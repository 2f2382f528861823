//! The lock table in and out of a snapshot. Only the primary data is stored; every index is
//! rebuilt on restore, so an index can never disagree with the data after a restart.

use sync_proto::internal::v1 as ipb;

use super::{Hold, LockTable, Mode, Session, Waiter};

fn mode_of(wire: i32) -> Mode {
    Mode::from_wire(wire).unwrap_or(Mode::Exclusive)
}

impl LockTable {
    /// The table as a snapshot record.
    pub fn snapshot(&self) -> ipb::LockSnapshot {
        ipb::LockSnapshot {
            last_token: self.last_token,
            sessions: self
                .sessions
                .after(0)
                .map(|s| ipb::SessionRecord {
                    session_id: s.id,
                    client_name: s.client_name.clone(),
                    implicit: s.implicit,
                    ttl_ms: s.ttl_ms,
                    expires_unix_ms: s.expires_ms(),
                    created_unix_ms: s.created_ms,
                })
                .collect(),
            locks: self
                .locks
                .iter()
                .map(|(name, l)| ipb::LockRecord {
                    name: name.clone(),
                    holders: l
                        .holders
                        .iter()
                        .map(|h| ipb::HoldRecord {
                            session_id: h.session,
                            mode: h.mode.wire() as i32,
                            token: h.token,
                            acquired_unix_ms: h.acquired_ms,
                            lock_delay_ms: h.lock_delay_ms,
                        })
                        .collect(),
                    waiters: l
                        .waiters
                        .iter()
                        .map(|w| ipb::WaiterRecord {
                            waiter_id: w.id,
                            session_id: w.session,
                            mode: w.mode.wire() as i32,
                            since_unix_ms: w.since_ms,
                            deadline_unix_ms: w.deadline_ms,
                            upgrade: w.upgrade,
                            lock_delay_ms: w.lock_delay_ms,
                            request: w.request,
                        })
                        .collect(),
                    delay_until_unix_ms: l.delay_until_ms,
                })
                .collect(),
        }
    }

    /// Rebuilds a table from [`LockTable::snapshot`]'s record.
    pub fn restore(snap: ipb::LockSnapshot) -> LockTable {
        let mut t = LockTable {
            last_token: snap.last_token,
            ..Default::default()
        };
        for s in snap.sessions {
            t.sessions.insert(Session::new(
                s.session_id,
                s.client_name,
                s.implicit,
                s.ttl_ms,
                s.created_unix_ms,
                s.expires_unix_ms,
            ));
        }
        for l in snap.locks {
            let name = l.name;
            let lock = t.locks.entry(name.clone()).or_default();
            lock.delay_until_ms = l.delay_until_unix_ms;
            if l.delay_until_unix_ms > 0 {
                t.delays.insert((l.delay_until_unix_ms, name.clone()));
            }
            for h in l.holders {
                lock.holders.push(Hold {
                    session: h.session_id,
                    mode: mode_of(h.mode),
                    token: h.token,
                    acquired_ms: h.acquired_unix_ms,
                    lock_delay_ms: h.lock_delay_ms,
                });
                if let Some(s) = t.sessions.get_mut(h.session_id) {
                    s.held.insert(name.clone());
                }
            }
            for w in l.waiters {
                t.waiter_locks.insert(w.waiter_id, name.clone());
                t.wait_deadlines.insert((w.deadline_unix_ms, w.waiter_id));
                if let Some(s) = t.sessions.get_mut(w.session_id) {
                    s.waiting.insert(name.clone(), w.waiter_id);
                }
                lock.waiters.push_back(Waiter {
                    id: w.waiter_id,
                    session: w.session_id,
                    mode: mode_of(w.mode),
                    since_ms: w.since_unix_ms,
                    deadline_ms: w.deadline_unix_ms,
                    upgrade: w.upgrade,
                    lock_delay_ms: w.lock_delay_ms,
                    request: w.request,
                });
            }
        }
        t
    }
}
