//! Property tests: random sequences of lock commands and time, checked after every step
//! against a reference model that knows only the published rules, through the table's public
//! view (`lock_info`, `session_info`, the answers and the notices):
//!
//! - never an EXCLUSIVE holder beside any other holder;
//! - tokens strictly increase per lock;
//! - FIFO: a waiter is granted only from the head of the queue the model keeps from the answers
//!   (upgrades first), and nobody waits while the head could be granted;
//! - deadlocks: the waits-for graph is always acyclic, and a request is refused with ABORTED
//!   exactly when adding it would have closed a cycle (no false positive, no miss);
//! - expiry: a session is never gone before its TTL (as the model computes it from its own
//!   keep-alives) and, once past it, holds and awaits nothing; a grant only goes to a session
//!   live at the grant's time;
//! - a snapshot restores an identical table.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::tests::{Answer, Harness, answer};
use super::*;
use ipb::lock_command::Op;

const SESSIONS: usize = 4;
const LOCKS: [&str; 3] = ["a", "b", "c"];

#[derive(Clone, Debug)]
enum Step {
    Acquire {
        session: usize,
        lock: usize,
        shared: bool,
        wait: u64,
    },
    Release {
        session: usize,
        lock: usize,
    },
    KeepAlive(usize),
    Revoke(usize),
    Cancel(usize),
    Pass(u64),
    Epoch,
    Restore,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..SESSIONS, 0..LOCKS.len(), any::<bool>(), prop_oneof![Just(0u64), Just(300), Just(5_000)])
            .prop_map(|(session, lock, shared, wait)| Step::Acquire { session, lock, shared, wait }),
        3 => (0..SESSIONS, 0..LOCKS.len()).prop_map(|(session, lock)| Step::Release { session, lock }),
        2 => (0..SESSIONS).prop_map(Step::KeepAlive),
        1 => (0..SESSIONS).prop_map(Step::Revoke),
        1 => (0..8usize).prop_map(Step::Cancel),
        3 => prop_oneof![Just(50u64), Just(400), Just(1_500)].prop_map(Step::Pass),
        1 => Just(Step::Epoch),
        1 => Just(Step::Restore),
    ]
}

/// What the model knows of one session.
struct ModelSession {
    id: u64,
    ttl: u64,
    /// Expiry as the rules compute it from the session's own history.
    expires: u64,
    /// Revoked or expired.
    gone: bool,
}

struct Model {
    h: Harness,
    sessions: Vec<ModelSession>,
    /// Per lock: waiter ids in the service order the model derives from the answers.
    queues: BTreeMap<String, Vec<u64>>,
    /// Per lock: the last token seen.
    tokens: BTreeMap<String, u64>,
    /// Waiter id → (session index, lock, wait deadline).
    waiters: BTreeMap<u64, (usize, String, u64)>,
}

fn mode_of(shared: bool) -> Mode {
    if shared {
        Mode::Shared
    } else {
        Mode::Exclusive
    }
}

fn wire_mode(m: i32) -> Mode {
    Mode::from_wire(m).unwrap_or(Mode::Exclusive)
}

/// The waits-for graph from the public view: waiter → sessions holding the lock or waiting
/// ahead of it in a conflicting mode.
fn graph(infos: &[api::LockInfo]) -> BTreeMap<u64, BTreeSet<u64>> {
    let mut g: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for info in infos {
        for (p, w) in info.waiters.iter().enumerate() {
            let wm = wire_mode(w.mode);
            let holders = info
                .holders
                .iter()
                .filter(|h| wm.conflicts(wire_mode(h.mode)))
                .map(|h| h.session_id);
            let ahead = info.waiters[..p]
                .iter()
                .filter(|a| wm.conflicts(wire_mode(a.mode)))
                .map(|a| a.session_id);
            let e = g.entry(w.session_id).or_default();
            e.extend(holders.chain(ahead).filter(|s| *s != w.session_id));
        }
    }
    g
}

/// Whether the graph has a cycle (reachability from every node; the graphs here are tiny).
fn has_cycle(g: &BTreeMap<u64, BTreeSet<u64>>) -> bool {
    for &start in g.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<u64> = g.get(&start).into_iter().flatten().copied().collect();
        while let Some(n) = todo.pop() {
            if n == start {
                return true;
            }
            if seen.insert(n) {
                todo.extend(g.get(&n).into_iter().flatten().copied());
            }
        }
    }
    false
}

impl Model {
    fn new() -> Model {
        let mut h = Harness::new();
        let sessions = (0..SESSIONS)
            .map(|i| {
                let ttl = [1_000, 2_000, 4_000, 8_000][i];
                let id = h.session(ttl, &format!("s{i}"));
                ModelSession {
                    id,
                    ttl,
                    expires: h.now + ttl,
                    gone: false,
                }
            })
            .collect();
        Model {
            h,
            sessions,
            queues: BTreeMap::new(),
            tokens: BTreeMap::new(),
            waiters: BTreeMap::new(),
        }
    }

    fn infos(&self) -> Vec<api::LockInfo> {
        LOCKS.iter().map(|l| self.h.table.lock_info(l)).collect()
    }

    /// Marks sessions past their expiry as gone: the table must have ended them.
    fn expire_due(&mut self) {
        for s in &mut self.sessions {
            if !s.gone && s.expires <= self.h.now {
                s.gone = true;
            }
        }
    }

    fn run(&mut self, step: &Step) {
        let result = match step {
            Step::Acquire {
                session,
                lock,
                shared,
                wait,
            } => {
                let (id, mode) = (self.sessions[*session].id, mode_of(*shared));
                // What falls due happens before the command: apply it first so that the view
                // the deadlock oracle uses is the one the Acquire sees.
                self.expire_due_in_table();
                let before = self.infos();
                let ans = self.h.acquire(id, LOCKS[*lock], mode, *wait);
                self.check_acquire(*session, LOCKS[*lock], mode, *wait, &before, &ans);
                None
            }
            Step::Release { session, lock } => {
                Some(self.h.release(self.sessions[*session].id, LOCKS[*lock]))
            }
            Step::KeepAlive(i) => Some(self.h.keep_alive(self.sessions[*i].id)),
            Step::Revoke(i) => {
                let id = self.sessions[*i].id;
                Some(
                    self.h
                        .run(Op::RevokeSession(ipb::RevokeSession { session_id: id })),
                )
            }
            Step::Cancel(k) => {
                let id = self.waiters.keys().nth(*k).copied().unwrap_or(0);
                Some(
                    self.h
                        .run(Op::CancelWait(ipb::CancelWait { waiter_id: id })),
                )
            }
            Step::Pass(ms) => {
                self.h.pass(*ms);
                None
            }
            Step::Epoch => {
                self.h.table.extend_all_sessions(self.h.now);
                for s in self.sessions.iter_mut().filter(|s| !s.gone) {
                    s.expires = s.expires.max(self.h.now + s.ttl);
                }
                None
            }
            Step::Restore => {
                let notices = self.h.table.take_notices();
                let restored = LockTable::restore(self.h.table.snapshot());
                assert_eq!(restored, self.h.table, "snapshot round trip");
                self.h.table = restored;
                self.h.table.notices = notices;
                None
            }
        };
        // What the command did to a session's life, per the rules.
        match (step, result.as_ref().and_then(|r| r.result.as_ref())) {
            (Step::KeepAlive(i), Some(R::KeptAliveTtlMs(_))) => {
                let s = &mut self.sessions[*i];
                assert!(!s.gone, "a gone session was kept alive");
                s.expires = self.h.now + s.ttl;
            }
            (Step::KeepAlive(i), Some(R::Error(_))) => {
                assert!(
                    self.sessions[*i].gone || self.sessions[*i].expires <= self.h.now,
                    "a live session could not be kept alive"
                );
            }
            (Step::Revoke(i), Some(R::Revoked(_))) => self.sessions[*i].gone = true,
            _ => {}
        }
        self.expire_due();
        self.absorb_notices();
        self.check_state();
    }

    /// Applies due expiries in the table, as the next command would.
    fn expire_due_in_table(&mut self) {
        let at = At {
            index: self.h.index,
            now_ms: self.h.now,
        };
        self.h.table.advance(at);
        self.expire_due();
        self.absorb_notices();
    }

    fn check_acquire(
        &mut self,
        session: usize,
        lock: &str,
        mode: Mode,
        wait: u64,
        before: &[api::LockInfo],
        ans: &Answer,
    ) {
        let (sid, gone) = (self.sessions[session].id, self.sessions[session].gone);
        let info = before
            .iter()
            .find(|i| i.name == lock)
            .cloned()
            .unwrap_or_default();
        let held = info.holders.iter().find(|h| h.session_id == sid).cloned();
        let waiting_already = info.waiters.iter().any(|w| w.session_id == sid);
        if gone {
            assert_eq!(
                *ans,
                Answer::Failed(Code::NotFound),
                "acquire by a gone session"
            );
            return;
        }
        if waiting_already {
            assert_eq!(*ans, Answer::Failed(Code::FailedPrecondition));
            return;
        }
        let upgrade = held.is_some();
        match ans {
            Answer::Granted { token, mode: m } => {
                assert_eq!(*m, mode);
                if let Some(h) = &held
                    && wire_mode(h.mode) == mode
                {
                    assert_eq!(*token, h.token, "a reentrant grant keeps its token");
                } else {
                    self.see_token(lock, *token);
                }
                // FIFO for new requests: granted at once only if nobody waits ahead and it is
                // compatible with every holder; an upgrade only for the sole holder.
                match &held {
                    None => {
                        assert!(info.waiters.is_empty(), "a new request overtook waiters");
                        assert!(
                            info.holders
                                .iter()
                                .all(|h| !mode.conflicts(wire_mode(h.mode))),
                            "granted beside a conflicting holder"
                        );
                    }
                    Some(h) if wire_mode(h.mode) == Mode::Shared && mode == Mode::Exclusive => {
                        assert_eq!(info.holders.len(), 1, "upgraded beside other holders");
                    }
                    Some(_) => {}
                }
            }
            Answer::Refused => assert_eq!(wait, 0, "only a try-lock is refused"),
            Answer::Queued(id) => {
                assert!(wait > 0, "a try-lock never queues");
                let q = self.queues.entry(lock.to_string()).or_default();
                let pos = if upgrade {
                    info.waiters.iter().take_while(|w| w.upgrade).count()
                } else {
                    q.len()
                };
                q.insert(pos.min(q.len()), *id);
                self.waiters
                    .insert(*id, (session, lock.to_string(), self.h.now + wait));
            }
            Answer::Failed(Code::Aborted) => {}
            Answer::Failed(c) => panic!("unexpected refusal {c:?}"),
        }
        // The deadlock oracle: ABORTED exactly when the request, queued, closes a cycle.
        if matches!(ans, Answer::Queued(_) | Answer::Failed(Code::Aborted)) {
            let mut infos = before.to_vec();
            let Some(entry) = infos.iter_mut().find(|i| i.name == lock) else {
                panic!("lock {lock} missing from the view");
            };
            let pos = if upgrade {
                entry.waiters.iter().take_while(|w| w.upgrade).count()
            } else {
                entry.waiters.len()
            };
            entry.waiters.insert(
                pos,
                api::LockWaiter {
                    session_id: sid,
                    mode: mode.wire() as i32,
                    upgrade,
                    ..Default::default()
                },
            );
            assert_eq!(
                has_cycle(&graph(&infos)),
                matches!(ans, Answer::Failed(Code::Aborted)),
                "deadlock verdict disagrees with the graph"
            );
        }
    }

    fn see_token(&mut self, lock: &str, token: u64) {
        let last = self.tokens.entry(lock.to_string()).or_default();
        assert!(token > *last, "token {token} after {last} on {lock}");
        *last = token;
    }

    fn absorb_notices(&mut self) {
        // When each grant happened (its event precedes its WaitEnded notice).
        let mut granted_at: BTreeMap<(String, u64), u64> = BTreeMap::new();
        for n in self.h.table.take_notices() {
            match n {
                Notice::WaitEnded {
                    waiter_id, result, ..
                } => {
                    let Some((session, lock, deadline)) = self.waiters.remove(&waiter_id) else {
                        panic!("an unknown wait {waiter_id} ended");
                    };
                    let Some(pos) = self.queues[&lock].iter().position(|w| *w == waiter_id) else {
                        panic!("wait {waiter_id} ended but the model has it in no queue");
                    };
                    if let Answer::Granted { token, .. } = answer(&result) {
                        assert_eq!(
                            pos, 0,
                            "FIFO: waiter {waiter_id} granted from position {pos}"
                        );
                        let s = &self.sessions[session];
                        let t = granted_at.get(&(lock.clone(), s.id)).copied();
                        assert!(
                            t.is_some_and(|t| s.expires > t),
                            "granted to session {} at {t:?}, not live (expires {})",
                            s.id,
                            s.expires
                        );
                        assert!(
                            t.is_some_and(|t| t < deadline),
                            "granted at {t:?}, at or after its wait's deadline {deadline}"
                        );
                        self.see_token(&lock, token);
                    }
                    if let Some(q) = self.queues.get_mut(&lock) {
                        q.remove(pos);
                    }
                }
                Notice::Event(e) => {
                    if e.r#type == api::LockEventType::Acquired as i32
                        || e.r#type == api::LockEventType::Converted as i32
                    {
                        granted_at.insert((e.name.clone(), e.session_id), e.time_unix_ms);
                    }
                }
            }
        }
    }

    fn check_state(&self) {
        let infos = self.infos();
        for info in &infos {
            let exclusive = info
                .holders
                .iter()
                .filter(|h| wire_mode(h.mode) == Mode::Exclusive)
                .count();
            assert!(
                exclusive == 0 || info.holders.len() == 1,
                "an exclusive holder beside another on {}: {:?}",
                info.name,
                info.holders
            );
            let q = self.queues.get(&info.name).cloned().unwrap_or_default();
            let table_sessions: Vec<u64> = info.waiters.iter().map(|w| w.session_id).collect();
            let model_sessions: Vec<u64> = q
                .iter()
                .map(|w| self.sessions[self.waiters[w].0].id)
                .collect();
            assert_eq!(
                table_sessions, model_sessions,
                "queue order of {}",
                info.name
            );
            if let Some(head) = info.waiters.first()
                && info.lock_delay_until_unix_ms <= self.h.now
            {
                let hm = wire_mode(head.mode);
                let blocked = if head.upgrade {
                    info.holders.iter().any(|h| h.session_id != head.session_id)
                } else {
                    info.holders.iter().any(|h| hm.conflicts(wire_mode(h.mode)))
                };
                assert!(blocked, "the head of {} waits for nothing", info.name);
            }
        }
        assert!(
            !has_cycle(&graph(&infos)),
            "the waits-for graph has a cycle"
        );
        for s in &self.sessions {
            let present = self.h.table.session_info(s.id, self.h.now).is_some();
            if s.gone {
                assert!(!present, "session {} outlived its TTL or revocation", s.id);
                for info in &infos {
                    assert!(info.holders.iter().all(|h| h.session_id != s.id));
                    assert!(info.waiters.iter().all(|w| w.session_id != s.id));
                }
            } else {
                assert!(present, "session {} ended before its TTL", s.id);
            }
        }
    }
}

proptest! {
    // 1 000 cases by default; `PROPTEST_CASES=50000` for a soak.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
    ))]

    #[test]
    fn the_lock_table_follows_the_published_rules(steps in proptest::collection::vec(step(), 1..80)) {
        let mut m = Model::new();
        for s in &steps {
            m.run(s);
        }
    }
}
