//! The lock table: sessions, shared/exclusive locks, fencing tokens, FIFO waiting and deadlock
//! detection, as a pure state machine over committed commands.
//!
//! Everything here is deterministic: time is the leader time carried in the log (`now_ms`), ids
//! are log indexes, and every collection iterates in a fixed order, so every replica that applies
//! the same entries holds the same table, makes the same grants and picks the same deadlock
//! victims. `docs/locks.md` states the guarantees for users; the rules, briefly:
//!
//! - **Sessions** expire at `expires_ms`; [`LockTable::advance`] ends every session, wait and
//!   lock-delay that is due before any command is applied, so a grant only ever goes to a session
//!   that is live at that moment.
//! - **Grants** are FIFO: a request is granted at once only if nobody waits ahead of it and it is
//!   compatible with every holder; when holders leave, the head of the queue is granted (one
//!   EXCLUSIVE request, or the run of SHARED requests at the head). Upgrades queue ahead of
//!   everyone else.
//! - **Tokens** come from one counter ([`LockTable::last_token`]): every grant and conversion
//!   draws the next, so tokens strictly increase per lock (and across locks).
//! - **Deadlocks**: a request about to wait adds edges to the waits-for graph (waiter → every
//!   session that holds the lock, or waits ahead of it, in a conflicting mode). The graph is
//!   acyclic before the request (invariant), and every new edge touches the requester, so a new
//!   cycle exists iff a path leads from the requester back to itself; the requester, the youngest
//!   request of the cycle, is then refused with ABORTED. Grants and departures only remove edges
//!   (a waiter's blockers after a grant are a subset of its blockers before), so cycles can form
//!   at no other moment.

mod deadlock;
mod lock;
#[cfg(test)]
mod model;
mod session;
mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use sync_proto::internal::v1 as ipb;
use sync_proto::sync::v1 as api;

use ipb::LockErrorCode as Code;
use ipb::lock_result::Result as R;
pub use lock::{Hold, Lock, Mode, Waiter};
pub use session::{Session, SessionTable};

/// Longest lock name, in bytes.
pub const MAX_NAME_BYTES: usize = 512;
/// Longest client name or client string, in bytes.
pub const MAX_CLIENT_NAME_BYTES: usize = 256;
/// TTL of a session that asks for none, and of implicit sessions.
pub const DEFAULT_TTL_MS: u64 = 10_000;
/// Shortest TTL: below it a client could not renew in time over a real network.
pub const MIN_TTL_MS: u64 = 1_000;
/// Longest TTL: a crashed client's locks come back within this.
pub const MAX_TTL_MS: u64 = 600_000;
/// Longest lock-delay.
pub const MAX_LOCK_DELAY_MS: u64 = 60_000;
/// Most open sessions.
pub const MAX_SESSIONS: usize = 100_000;
/// Most locks one session may hold or await at once.
pub const MAX_LOCKS_PER_SESSION: usize = 10_000;
/// Most requests waiting for one lock.
pub const MAX_WAITERS_PER_LOCK: usize = 10_000;

/// Something applying a command did that a node reports outside the command's own answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    /// A lock event, for Watch streams.
    Event(api::LockEvent),
    /// A waiting request ended (granted, timed out, cancelled, session gone, deadlock): for the
    /// call that waits, and for the de-duplication record of its Acquire.
    WaitEnded {
        /// The request (the log index of its Acquire).
        waiter_id: u64,
        /// Its de-duplication id.
        request: Option<ipb::ClientRequest>,
        /// Its final answer.
        result: ipb::LockResult,
    },
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Expired,
    Revoked,
}

/// The lock table (see the module docs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LockTable {
    /// Open sessions.
    sessions: SessionTable,
    /// Locks held, awaited or under lock-delay, by name.
    locks: BTreeMap<String, Lock>,
    /// Waiting request id → the lock it waits for.
    waiter_locks: BTreeMap<u64, String>,
    /// `(deadline_ms, waiter id)` of every waiting request.
    wait_deadlines: BTreeSet<(u64, u64)>,
    /// `(until_ms, lock name)` of every lock-delay in force.
    delays: BTreeSet<(u64, String)>,
    /// The last fencing token drawn.
    last_token: u64,
    /// What applying produced for the node to report; drained by [`LockTable::take_notices`].
    notices: Vec<Notice>,
}

/// The position of an apply in the log: its index and leader time.
#[derive(Clone, Copy, Debug)]
pub struct At {
    /// The entry's log index.
    pub index: u64,
    /// The entry's leader time (Unix ms), as the state's clock has it.
    pub now_ms: u64,
}

fn error(code: Code, message: impl Into<String>) -> ipb::LockResult {
    ipb::LockResult {
        result: Some(R::Error(ipb::LockError {
            code: code as i32,
            message: message.into(),
        })),
    }
}

fn result(r: R) -> ipb::LockResult {
    ipb::LockResult { result: Some(r) }
}

/// Checks a lock name.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("lock name is empty; give a name of 1 to 512 bytes".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "lock name is {} bytes; the limit is {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    Ok(())
}

/// Checks a requested TTL (0 = default) and returns the TTL to use.
pub fn validate_ttl(ttl_ms: u64) -> Result<u64, String> {
    match ttl_ms {
        0 => Ok(DEFAULT_TTL_MS),
        t if (MIN_TTL_MS..=MAX_TTL_MS).contains(&t) => Ok(t),
        t => Err(format!(
            "session TTL {t} ms is out of bounds; use 0 for the default ({DEFAULT_TTL_MS} ms) or \
             a value from {MIN_TTL_MS} to {MAX_TTL_MS} ms"
        )),
    }
}

impl LockTable {
    /// The last fencing token drawn.
    pub fn last_token(&self) -> u64 {
        self.last_token
    }

    /// Drains what applying produced.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// The earliest leader time at which [`LockTable::advance`] would change something.
    pub fn next_deadline(&self) -> Option<u64> {
        [
            self.sessions.next_expiry().map(|(t, _)| t),
            self.wait_deadlines.first().map(|(t, _)| *t),
            self.delays.first().map(|(t, _)| *t),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Extends every session to at least a full TTL from `now_ms`: a new leader's term starts
    /// with this, so that no session expires because of the failover.
    pub fn extend_all_sessions(&mut self, now_ms: u64) {
        for id in self.sessions.ids() {
            if let Some(s) = self.sessions.get(id) {
                let until = s.expires_ms().max(now_ms.saturating_add(s.ttl_ms));
                self.sessions.set_expiry(id, until);
            }
        }
    }

    /// Performs everything due by `at.now_ms` in time order, as if each had happened at its
    /// own time. Everything due at one instant t happens before any queue is served at t:
    /// sessions expiring at t, then waits whose deadline is t, then lock-delays ending at t;
    /// only then are the touched locks' queues served. So a lock freed at t1 goes to a waiter
    /// still waiting and live at t1, never to one whose session or wait ended at or before t1.
    pub fn advance(&mut self, at: At) {
        while let Some(t) = self.next_deadline().filter(|t| *t <= at.now_ms) {
            let at_t = At {
                index: at.index,
                now_ms: t,
            };
            let mut touched = BTreeSet::new();
            while let Some((expires, id)) = self.sessions.next_expiry()
                && expires <= t
            {
                touched.extend(self.end_session_quietly(id, Ending::Expired, at_t).1);
            }
            while let Some(&(deadline, id)) = self.wait_deadlines.first()
                && deadline <= t
            {
                let waited = self.waiter(id).map_or(0, |w| t.saturating_sub(w.since_ms));
                let name = self.waiter_locks.get(&id).cloned().unwrap_or_default();
                let outcome = error(
                    Code::DeadlineExceeded,
                    format!(
                        "waited {waited} ms for lock `{name}` without a grant; retry with a \
                         longer wait, or see who holds it with GetLock"
                    ),
                );
                touched.extend(self.withdraw_quietly(id, outcome));
            }
            while let Some((until, name)) = self.delays.first().cloned()
                && until <= t
            {
                self.delays.remove(&(until, name.clone()));
                if let Some(lock) = self.locks.get_mut(&name)
                    && lock.delay_until_ms == until
                {
                    lock.delay_until_ms = 0;
                }
                touched.insert(name);
            }
            for name in &touched {
                self.serve(name, at_t);
            }
        }
    }

    /// Applies one lock command. `request` is the command's de-duplication id (a waiting Acquire
    /// keeps it so that its recorded answer can follow the wait's outcome).
    pub fn apply(
        &mut self,
        cmd: &ipb::LockCommand,
        request: Option<ipb::ClientRequest>,
        at: At,
    ) -> ipb::LockResult {
        use ipb::lock_command::Op;
        match &cmd.op {
            Some(Op::CreateSession(c)) => self.create_session(c, at),
            Some(Op::KeepAlive(k)) => self.keep_alive(k.session_id, at),
            Some(Op::RevokeSession(r)) => self.revoke(r.session_id, at),
            Some(Op::Acquire(a)) => self.acquire(a, request, at),
            Some(Op::Release(r)) => self.release(r, at),
            Some(Op::CancelWait(c)) => {
                let was_waiting = self.waiter_locks.contains_key(&c.waiter_id);
                if was_waiting {
                    self.withdraw(
                        c.waiter_id,
                        error(
                            Code::Cancelled,
                            "the call went away before the grant; its wait was withdrawn",
                        ),
                        at,
                    );
                }
                result(R::Cancelled(was_waiting))
            }
            None => error(Code::InvalidArgument, "lock command has no operation"),
        }
    }

    fn create_session(&mut self, c: &ipb::CreateSession, at: At) -> ipb::LockResult {
        let ttl = match validate_ttl(c.ttl_ms) {
            Ok(t) => t,
            Err(e) => return error(Code::InvalidArgument, e),
        };
        if c.client_name.len() > MAX_CLIENT_NAME_BYTES {
            return error(
                Code::InvalidArgument,
                format!(
                    "client name is {} bytes; the limit is {MAX_CLIENT_NAME_BYTES}",
                    c.client_name.len()
                ),
            );
        }
        if self.sessions.len() >= MAX_SESSIONS {
            return error(
                Code::ResourceExhausted,
                format!(
                    "{MAX_SESSIONS} sessions are open, the limit; revoke sessions you no longer \
                     need"
                ),
            );
        }
        self.sessions.insert(Session::new(
            at.index,
            c.client_name.clone(),
            false,
            ttl,
            at.now_ms,
            at.now_ms.saturating_add(ttl),
        ));
        result(R::SessionOpened(ipb::SessionOpened {
            session_id: at.index,
            ttl_ms: ttl,
        }))
    }

    fn keep_alive(&mut self, id: u64, at: At) -> ipb::LockResult {
        match self.sessions.get(id).map(|s| s.ttl_ms) {
            Some(ttl) => {
                self.sessions.set_expiry(id, at.now_ms.saturating_add(ttl));
                result(R::KeptAliveTtlMs(ttl))
            }
            None => error(Code::NotFound, session_gone(id)),
        }
    }

    fn revoke(&mut self, id: u64, at: At) -> ipb::LockResult {
        if self.sessions.get(id).is_none() {
            return error(Code::NotFound, session_gone(id));
        }
        let released_locks = self.end_session(id, Ending::Revoked, at);
        result(R::Revoked(ipb::Revoked { released_locks }))
    }

    /// Finds the session an owner names. An implicit session is created if `create` (an
    /// Acquire), and renewed on every use.
    fn resolve(
        &mut self,
        owner: Option<&ipb::LockOwner>,
        create: bool,
        at: At,
    ) -> Result<u64, ipb::LockResult> {
        use ipb::lock_owner::Owner;
        match owner.and_then(|o| o.owner.as_ref()) {
            Some(Owner::SessionId(id)) if *id != 0 => {
                if self.sessions.get(*id).is_some() {
                    Ok(*id)
                } else {
                    Err(error(Code::NotFound, session_gone(*id)))
                }
            }
            Some(Owner::ClientId(client)) if !client.is_empty() => {
                if client.len() > MAX_CLIENT_NAME_BYTES {
                    return Err(error(
                        Code::InvalidArgument,
                        format!(
                            "client_id is {} bytes; the limit is {MAX_CLIENT_NAME_BYTES}",
                            client.len()
                        ),
                    ));
                }
                if let Some(id) = self.sessions.implicit(client) {
                    let ttl = self.sessions.get(id).map_or(DEFAULT_TTL_MS, |s| s.ttl_ms);
                    self.sessions.set_expiry(id, at.now_ms.saturating_add(ttl));
                    return Ok(id);
                }
                if !create {
                    return Err(error(
                        Code::FailedPrecondition,
                        format!("client `{client}` holds no lock; there is nothing to release"),
                    ));
                }
                if self.sessions.len() >= MAX_SESSIONS {
                    return Err(error(
                        Code::ResourceExhausted,
                        format!("{MAX_SESSIONS} sessions are open, the limit"),
                    ));
                }
                self.sessions.insert(Session::new(
                    at.index,
                    client.clone(),
                    true,
                    DEFAULT_TTL_MS,
                    at.now_ms,
                    at.now_ms.saturating_add(DEFAULT_TTL_MS),
                ));
                Ok(at.index)
            }
            _ => Err(error(
                Code::InvalidArgument,
                "set exactly one of session_id and client_id",
            )),
        }
    }

    fn acquire(
        &mut self,
        a: &ipb::AcquireLock,
        request: Option<ipb::ClientRequest>,
        at: At,
    ) -> ipb::LockResult {
        if let Err(e) = validate_name(&a.name) {
            return error(Code::InvalidArgument, e);
        }
        let Some(mode) = Mode::from_wire(a.mode) else {
            return error(
                Code::InvalidArgument,
                format!("unknown lock mode {}; use SHARED or EXCLUSIVE", a.mode),
            );
        };
        if a.lock_delay_ms > MAX_LOCK_DELAY_MS {
            return error(
                Code::InvalidArgument,
                format!(
                    "lock_delay_ms {} is above the limit of {MAX_LOCK_DELAY_MS}",
                    a.lock_delay_ms
                ),
            );
        }
        let session_id = match self.resolve(a.owner.as_ref(), true, at) {
            Ok(id) => id,
            Err(e) => return e,
        };
        let answer = self.acquire_for(session_id, mode, a, request, at);
        self.forget_if_idle_implicit(session_id);
        answer
    }

    fn acquire_for(
        &mut self,
        session_id: u64,
        mode: Mode,
        a: &ipb::AcquireLock,
        request: Option<ipb::ClientRequest>,
        at: At,
    ) -> ipb::LockResult {
        let name = a.name.as_str();
        if self
            .sessions
            .get(session_id)
            .is_some_and(|s| s.waiting.contains_key(name))
        {
            return error(
                Code::FailedPrecondition,
                format!(
                    "session {session_id} already has an Acquire of `{name}` waiting; wait for \
                     it or cancel it first"
                ),
            );
        }
        let lock = self.locks.entry(name.to_string()).or_default();
        let held = lock.hold_of(session_id).cloned();
        match held {
            // Reentrant: the same grant, the same token.
            Some(h) if h.mode == mode => return self.granted(session_id, &h),
            // Downgrade: at once, with a new token; compatible waiters may follow.
            Some(h) if h.mode == Mode::Exclusive => {
                let hold = self.convert(name, session_id, Mode::Shared, at);
                self.serve(name, at);
                return match hold {
                    Some(h) => self.granted(session_id, &h),
                    None => error(Code::FailedPrecondition, "hold vanished"),
                };
            }
            // Upgrade of the sole holder with nobody converting ahead: at once.
            Some(_) if lock.holders.len() == 1 && !lock.waiters.iter().any(|w| w.upgrade) => {
                return match self.convert(name, session_id, Mode::Exclusive, at) {
                    Some(h) => self.granted(session_id, &h),
                    None => error(Code::FailedPrecondition, "hold vanished"),
                };
            }
            Some(_) => {}
            None if lock.grantable_now(session_id, mode, at.now_ms) => {
                if let Some(e) = self.over_session_limit(session_id) {
                    self.forget_if_free(name, at.now_ms);
                    return e;
                }
                let hold = self.grant_new(name, session_id, mode, a.lock_delay_ms, at);
                return self.granted(session_id, &hold);
            }
            None => {}
        }
        let upgrade = held.is_some();
        if a.wait_ms == 0 {
            let answer = self.refused(name, session_id, held.as_ref());
            self.forget_if_free(name, at.now_ms);
            return answer;
        }
        if !upgrade && let Some(e) = self.over_session_limit(session_id) {
            self.forget_if_free(name, at.now_ms);
            return e;
        }
        let lock = self.locks.entry(name.to_string()).or_default();
        if lock.waiters.len() >= MAX_WAITERS_PER_LOCK {
            return error(
                Code::ResourceExhausted,
                format!("{MAX_WAITERS_PER_LOCK} requests already wait for `{name}`, the limit"),
            );
        }
        let waiter = Waiter {
            id: at.index,
            session: session_id,
            mode,
            since_ms: at.now_ms,
            deadline_ms: at.now_ms.saturating_add(a.wait_ms),
            upgrade,
            lock_delay_ms: if upgrade {
                held.as_ref().map_or(0, |h| h.lock_delay_ms)
            } else {
                a.lock_delay_ms
            },
            request,
        };
        self.enqueue(name, waiter);
        if let Some(cycle) = self.find_cycle(session_id) {
            let message = self.describe_cycle(&cycle);
            self.unlink_waiter(at.index);
            self.forget_if_free(name, at.now_ms);
            let event = self.event(
                api::LockEventType::Deadlock,
                name,
                session_id,
                mode,
                0,
                at,
                self.cycle_edges(&cycle),
            );
            self.notices.push(Notice::Event(event));
            return error(Code::Aborted, message);
        }
        result(R::Queued(ipb::Queued {
            waiter_id: at.index,
            session_id,
        }))
    }

    fn over_session_limit(&self, session_id: u64) -> Option<ipb::LockResult> {
        let s = self.sessions.get(session_id)?;
        (s.footprint() >= MAX_LOCKS_PER_SESSION).then(|| {
            error(
                Code::ResourceExhausted,
                format!(
                    "session {session_id} holds or awaits {MAX_LOCKS_PER_SESSION} locks, the \
                     limit; release some first"
                ),
            )
        })
    }

    fn granted(&self, session_id: u64, h: &Hold) -> ipb::LockResult {
        result(R::Acquired(api::AcquireResponse {
            granted: true,
            token: h.token,
            mode: h.mode.wire() as i32,
            session_id,
            holders: Vec::new(),
        }))
    }

    fn refused(&self, name: &str, session_id: u64, held: Option<&Hold>) -> ipb::LockResult {
        result(R::Acquired(api::AcquireResponse {
            granted: false,
            token: 0,
            mode: held.map_or(api::LockMode::Unspecified, |h| h.mode.wire()) as i32,
            session_id,
            holders: self.holders_of(name),
        }))
    }

    fn release(&mut self, r: &ipb::ReleaseLock, at: At) -> ipb::LockResult {
        if let Err(e) = validate_name(&r.name) {
            return error(Code::InvalidArgument, e);
        }
        let session_id = match self.resolve(r.owner.as_ref(), false, at) {
            Ok(id) => id,
            Err(e) => return e,
        };
        let name = r.name.as_str();
        let holds = self
            .locks
            .get(name)
            .is_some_and(|l| l.hold_of(session_id).is_some());
        if !holds {
            let waiting = self
                .sessions
                .get(session_id)
                .is_some_and(|s| s.waiting.contains_key(name));
            let hint = if waiting {
                "; it is still waiting for it: cancel that Acquire instead"
            } else {
                ""
            };
            return error(
                Code::FailedPrecondition,
                format!("session {session_id} does not hold lock `{name}`{hint}"),
            );
        }
        // An upgrade in progress loses its point once the SHARED hold is gone.
        if let Some(&id) = self
            .sessions
            .get(session_id)
            .and_then(|s| s.waiting.get(name))
        {
            self.withdraw(
                id,
                error(
                    Code::FailedPrecondition,
                    format!("the SHARED hold on `{name}` being upgraded was released"),
                ),
                at,
            );
        }
        self.drop_hold(name, session_id, api::LockEventType::Released, at);
        self.serve(name, at);
        self.forget_if_idle_implicit(session_id);
        result(R::Released(true))
    }

    /// Ends a session and lets the queues of its locks move on. Returns the names of the locks
    /// it held.
    fn end_session(&mut self, id: u64, ending: Ending, at: At) -> Vec<String> {
        let (held, touched) = self.end_session_quietly(id, ending, at);
        for name in &touched {
            self.serve(name, at);
        }
        held
    }

    /// Ends a session: its holds are dropped (with their lock-delays), its waits withdrawn; no
    /// queue is served yet. Returns the locks it held and every lock it touched.
    fn end_session_quietly(
        &mut self,
        id: u64,
        ending: Ending,
        at: At,
    ) -> (Vec<String>, BTreeSet<String>) {
        let Some(session) = self.sessions.get(id) else {
            return (Vec::new(), BTreeSet::new());
        };
        let held: Vec<String> = session.held.iter().cloned().collect();
        let waits: Vec<(String, u64)> = session
            .waiting
            .iter()
            .map(|(n, w)| (n.clone(), *w))
            .collect();
        let (kind, word) = match ending {
            Ending::Expired => (api::LockEventType::Expired, "expired"),
            Ending::Revoked => (api::LockEventType::Revoked, "was revoked"),
        };
        for (name, waiter) in &waits {
            let request = self.unlink_waiter(*waiter).and_then(|w| w.request);
            self.notices.push(Notice::WaitEnded {
                waiter_id: *waiter,
                request,
                result: error(
                    Code::NotFound,
                    format!("session {id} {word} while waiting for lock `{name}`"),
                ),
            });
        }
        for name in &held {
            if let Some(hold) = self.drop_hold(name, id, kind, at)
                && hold.lock_delay_ms > 0
            {
                let until = at.now_ms.saturating_add(hold.lock_delay_ms);
                if let Some(lock) = self.locks.get_mut(name)
                    && until > lock.delay_until_ms
                {
                    self.delays.remove(&(lock.delay_until_ms, name.clone()));
                    lock.delay_until_ms = until;
                    self.delays.insert((until, name.clone()));
                }
            }
        }
        self.sessions.remove(id);
        let mut touched: BTreeSet<String> = held.iter().cloned().collect();
        touched.extend(waits.into_iter().map(|(n, _)| n));
        (held, touched)
    }

    /// Removes a waiting request and tells its caller `outcome`; the lock's queue then moves
    /// on if it can.
    fn withdraw(&mut self, waiter_id: u64, outcome: ipb::LockResult, at: At) {
        if let Some(name) = self.withdraw_quietly(waiter_id, outcome) {
            self.serve(&name, at);
        }
    }

    /// Removes a waiting request and tells its caller `outcome`, serving no queue; returns the
    /// lock it waited for.
    fn withdraw_quietly(&mut self, waiter_id: u64, outcome: ipb::LockResult) -> Option<String> {
        let name = self.waiter_locks.get(&waiter_id).cloned()?;
        let request = self.unlink_waiter(waiter_id).and_then(|w| w.request);
        self.notices.push(Notice::WaitEnded {
            waiter_id,
            request,
            result: outcome,
        });
        Some(name)
    }

    /// Removes a waiter from every index; returns it.
    fn unlink_waiter(&mut self, waiter_id: u64) -> Option<Waiter> {
        let name = self.waiter_locks.remove(&waiter_id)?;
        let lock = self.locks.get_mut(&name)?;
        let pos = lock.position_of(waiter_id)?;
        let w = lock.waiters.remove(pos)?;
        self.wait_deadlines.remove(&(w.deadline_ms, w.id));
        if let Some(s) = self.sessions.get_mut(w.session) {
            s.waiting.remove(&name);
        }
        Some(w)
    }

    fn enqueue(&mut self, name: &str, waiter: Waiter) {
        let lock = self.locks.entry(name.to_string()).or_default();
        let pos = lock.queue_position(waiter.upgrade);
        self.waiter_locks.insert(waiter.id, name.to_string());
        self.wait_deadlines.insert((waiter.deadline_ms, waiter.id));
        if let Some(s) = self.sessions.get_mut(waiter.session) {
            s.waiting.insert(name.to_string(), waiter.id);
        }
        lock.waiters.insert(pos, waiter);
    }

    /// Grants the head of the lock's queue for as long as it can be granted, then forgets the
    /// lock if it is free.
    fn serve(&mut self, name: &str, at: At) {
        loop {
            let Some(lock) = self.locks.get(name) else {
                return;
            };
            if !lock.head_grantable(at.now_ms) {
                break;
            }
            let Some(head) = lock.waiters.front() else {
                break;
            };
            let id = head.id;
            let Some(w) = self.unlink_waiter(id) else {
                break;
            };
            let hold = if w.upgrade {
                self.convert(name, w.session, Mode::Exclusive, at)
            } else {
                Some(self.grant_new(name, w.session, w.mode, w.lock_delay_ms, at))
            };
            if let Some(hold) = hold {
                let answer = self.granted(w.session, &hold);
                self.notices.push(Notice::WaitEnded {
                    waiter_id: id,
                    request: w.request,
                    result: answer,
                });
            }
        }
        self.forget_if_free(name, at.now_ms);
    }

    fn next_token(&mut self) -> u64 {
        self.last_token += 1;
        self.last_token
    }

    /// A new hold for `session`, which must not hold the lock.
    fn grant_new(&mut self, name: &str, session: u64, mode: Mode, delay: u64, at: At) -> Hold {
        let hold = Hold {
            session,
            mode,
            token: self.next_token(),
            acquired_ms: at.now_ms,
            lock_delay_ms: delay,
        };
        self.locks
            .entry(name.to_string())
            .or_default()
            .holders
            .push(hold.clone());
        if let Some(s) = self.sessions.get_mut(session) {
            s.held.insert(name.to_string());
        }
        let event = self.event(
            api::LockEventType::Acquired,
            name,
            session,
            mode,
            hold.token,
            at,
            Vec::new(),
        );
        self.notices.push(Notice::Event(event));
        hold
    }

    /// Changes the mode of an existing hold, with a new token.
    fn convert(&mut self, name: &str, session: u64, mode: Mode, at: At) -> Option<Hold> {
        let token = self.next_token();
        let hold = self
            .locks
            .get_mut(name)?
            .holders
            .iter_mut()
            .find(|h| h.session == session)?;
        hold.mode = mode;
        hold.token = token;
        hold.acquired_ms = at.now_ms;
        let hold = hold.clone();
        let event = self.event(
            api::LockEventType::Converted,
            name,
            session,
            mode,
            token,
            at,
            Vec::new(),
        );
        self.notices.push(Notice::Event(event));
        Some(hold)
    }

    /// Removes a hold and reports it; returns it.
    fn drop_hold(
        &mut self,
        name: &str,
        session: u64,
        kind: api::LockEventType,
        at: At,
    ) -> Option<Hold> {
        let lock = self.locks.get_mut(name)?;
        let pos = lock.holders.iter().position(|h| h.session == session)?;
        let hold = lock.holders.remove(pos);
        if let Some(s) = self.sessions.get_mut(session) {
            s.held.remove(name);
        }
        let event = self.event(kind, name, session, hold.mode, hold.token, at, Vec::new());
        self.notices.push(Notice::Event(event));
        Some(hold)
    }

    fn forget_if_free(&mut self, name: &str, now_ms: u64) {
        if self.locks.get(name).is_some_and(|l| l.is_free(now_ms)) {
            self.locks.remove(name);
        }
    }

    fn forget_if_idle_implicit(&mut self, session_id: u64) {
        if self
            .sessions
            .get(session_id)
            .is_some_and(|s| s.implicit && s.is_idle())
        {
            self.sessions.remove(session_id);
        }
    }

    fn waiter(&self, id: u64) -> Option<&Waiter> {
        let name = self.waiter_locks.get(&id)?;
        let lock = self.locks.get(name)?;
        lock.waiters.get(lock.position_of(id)?)
    }

    fn client_name(&self, session: u64) -> String {
        self.sessions
            .get(session)
            .map(|s| s.client_name.clone())
            .unwrap_or_default()
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        kind: api::LockEventType,
        name: &str,
        session: u64,
        mode: Mode,
        token: u64,
        at: At,
        cycle: Vec<api::WaitEdge>,
    ) -> api::LockEvent {
        api::LockEvent {
            r#type: kind as i32,
            name: name.to_string(),
            session_id: session,
            client_name: self.client_name(session),
            mode: mode.wire() as i32,
            token,
            index: at.index,
            time_unix_ms: at.now_ms,
            cycle,
        }
    }

    // ---- reads ----

    /// The holders of a lock, as the API shows them.
    pub fn holders_of(&self, name: &str) -> Vec<api::LockHolder> {
        self.locks
            .get(name)
            .map(|l| {
                l.holders
                    .iter()
                    .map(|h| api::LockHolder {
                        session_id: h.session,
                        client_name: self.client_name(h.session),
                        mode: h.mode.wire() as i32,
                        token: h.token,
                        acquired_unix_ms: h.acquired_ms,
                        lock_delay_ms: h.lock_delay_ms,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One lock as the API shows it (free if unknown).
    pub fn lock_info(&self, name: &str) -> api::LockInfo {
        let Some(lock) = self.locks.get(name) else {
            return api::LockInfo {
                name: name.to_string(),
                ..Default::default()
            };
        };
        api::LockInfo {
            name: name.to_string(),
            mode: lock.mode().map_or(api::LockMode::Unspecified, Mode::wire) as i32,
            holders: self.holders_of(name),
            waiters: lock
                .waiters
                .iter()
                .map(|w| api::LockWaiter {
                    session_id: w.session,
                    client_name: self.client_name(w.session),
                    mode: w.mode.wire() as i32,
                    since_unix_ms: w.since_ms,
                    upgrade: w.upgrade,
                })
                .collect(),
            lock_delay_until_unix_ms: lock.delay_until_ms,
        }
    }

    /// Locks whose names start with `prefix` and sort after `after`, at most `limit`, and
    /// whether more follow.
    pub fn list_locks(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> (Vec<api::LockInfo>, bool) {
        let start = if after.is_empty() || after < prefix {
            std::ops::Bound::Included(prefix.to_string())
        } else {
            std::ops::Bound::Excluded(after.to_string())
        };
        let mut it = self
            .locks
            .range((start, std::ops::Bound::Unbounded))
            .map(|(n, _)| n)
            .take_while(|n| n.starts_with(prefix));
        let out: Vec<api::LockInfo> = it.by_ref().take(limit).map(|n| self.lock_info(n)).collect();
        (out, it.next().is_some())
    }

    /// One session as the API shows it.
    pub fn session_info(&self, id: u64, now_ms: u64) -> Option<api::Session> {
        self.sessions.get(id).map(|s| api::Session {
            session_id: s.id,
            client_name: s.client_name.clone(),
            implicit: s.implicit,
            ttl_ms: s.ttl_ms,
            remaining_ms: s.expires_ms().saturating_sub(now_ms),
            created_unix_ms: s.created_ms,
            held_locks: s.held.len() as u32,
        })
    }

    /// Sessions with ids above `after`, at most `limit`, and whether more follow.
    pub fn list_sessions(
        &self,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> (Vec<api::Session>, bool) {
        let mut it = self.sessions.after(after).map(|s| s.id);
        let out = it
            .by_ref()
            .take(limit)
            .filter_map(|id| self.session_info(id, now_ms))
            .collect();
        (out, it.next().is_some())
    }

    /// Whether `token` belongs to a current holder of `name`.
    pub fn token_valid(&self, name: &str, token: u64) -> bool {
        token != 0
            && self
                .locks
                .get(name)
                .is_some_and(|l| l.holders.iter().any(|h| h.token == token))
    }

    /// The session's current hold of `name`.
    pub fn hold(&self, name: &str, session: u64) -> Option<&Hold> {
        self.locks.get(name)?.hold_of(session)
    }

    /// Whether the request `waiter_id` still waits.
    pub fn is_waiting(&self, waiter_id: u64) -> bool {
        self.waiter_locks.contains_key(&waiter_id)
    }

    /// The session of an implicit client string.
    pub fn implicit_session(&self, client: &str) -> Option<u64> {
        self.sessions.implicit(client)
    }

    /// How many sessions are open.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// How many locks are held, awaited or delayed.
    pub fn lock_count(&self) -> usize {
        self.locks.len()
    }
}

fn session_gone(id: u64) -> String {
    format!(
        "session {id} does not exist or has expired (its locks are released); open a new \
         session"
    )
}
