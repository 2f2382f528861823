//! Rule-by-rule tests of the lock table, each named after the rule it checks.

use super::*;
use ipb::lock_command::Op;

/// A lock table driven as the log would drive it: increasing indexes, a clock we move by hand.
pub(super) struct Harness {
    pub table: LockTable,
    pub index: u64,
    pub now: u64,
}

/// What an Acquire answered, simplified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Answer {
    Granted { token: u64, mode: Mode },
    Refused,
    Queued(u64),
    Failed(Code),
}

pub(super) fn answer(r: &ipb::LockResult) -> Answer {
    match r.result.as_ref() {
        Some(R::Acquired(a)) if a.granted => Answer::Granted {
            token: a.token,
            mode: Mode::from_wire(a.mode).unwrap_or(Mode::Exclusive),
        },
        Some(R::Acquired(_)) => Answer::Refused,
        Some(R::Queued(q)) => Answer::Queued(q.waiter_id),
        Some(R::Error(e)) => Answer::Failed(Code::try_from(e.code).unwrap_or(Code::Unspecified)),
        other => panic!("unexpected result {other:?}"),
    }
}

impl Harness {
    pub fn new() -> Harness {
        Harness {
            table: LockTable::default(),
            index: 0,
            now: 1_000_000,
        }
    }

    fn at(&mut self) -> At {
        self.index += 1;
        At {
            index: self.index,
            now_ms: self.now,
        }
    }

    pub fn run(&mut self, op: Op) -> ipb::LockResult {
        let at = self.at();
        self.table.advance(at);
        self.table
            .apply(&ipb::LockCommand { op: Some(op) }, None, at)
    }

    pub fn session(&mut self, ttl_ms: u64, name: &str) -> u64 {
        match self
            .run(Op::CreateSession(ipb::CreateSession {
                ttl_ms,
                client_name: name.into(),
            }))
            .result
        {
            Some(R::SessionOpened(s)) => s.session_id,
            other => panic!("no session: {other:?}"),
        }
    }

    pub fn acquire(&mut self, session: u64, name: &str, mode: Mode, wait_ms: u64) -> Answer {
        let r = self.run(Op::Acquire(ipb::AcquireLock {
            name: name.into(),
            owner: Some(ipb::LockOwner {
                owner: Some(ipb::lock_owner::Owner::SessionId(session)),
            }),
            mode: mode.wire() as i32,
            wait_ms,
            lock_delay_ms: 0,
        }));
        answer(&r)
    }

    pub fn release(&mut self, session: u64, name: &str) -> ipb::LockResult {
        self.run(Op::Release(ipb::ReleaseLock {
            name: name.into(),
            owner: Some(ipb::LockOwner {
                owner: Some(ipb::lock_owner::Owner::SessionId(session)),
            }),
        }))
    }

    pub fn keep_alive(&mut self, session: u64) -> ipb::LockResult {
        self.run(Op::KeepAlive(ipb::KeepAliveSession {
            session_id: session,
        }))
    }

    /// Moves time and applies what falls due (a Tick).
    pub fn pass(&mut self, ms: u64) {
        self.now += ms;
        let at = self.at();
        self.table.advance(at);
    }

    /// Ended waits since the last call: waiter id → answer.
    pub fn ended(&mut self) -> Vec<(u64, Answer)> {
        self.table
            .take_notices()
            .into_iter()
            .filter_map(|n| match n {
                Notice::WaitEnded {
                    waiter_id, result, ..
                } => Some((waiter_id, answer(&result))),
                Notice::Event(_) => None,
            })
            .collect()
    }

    pub fn holders(&self, name: &str) -> Vec<(u64, Mode)> {
        self.table
            .locks
            .get(name)
            .map(|l| l.holders.iter().map(|h| (h.session, h.mode)).collect())
            .unwrap_or_default()
    }
}

use Mode::{Exclusive as X, Shared as S};

#[test]
fn an_exclusive_lock_has_one_holder_and_a_shared_lock_many() {
    let mut h = Harness::new();
    let (a, b, c) = (h.session(0, "a"), h.session(0, "b"), h.session(0, "c"));
    assert!(matches!(h.acquire(a, "r", S, 0), Answer::Granted { .. }));
    assert!(matches!(h.acquire(b, "r", S, 0), Answer::Granted { .. }));
    assert_eq!(h.acquire(c, "r", X, 0), Answer::Refused);
    h.release(a, "r");
    h.release(b, "r");
    assert!(matches!(h.acquire(c, "r", X, 0), Answer::Granted { .. }));
    assert_eq!(h.acquire(a, "r", S, 0), Answer::Refused);
}

#[test]
fn reacquiring_in_the_same_mode_returns_the_same_token_and_one_release_releases() {
    let mut h = Harness::new();
    let a = h.session(0, "a");
    let first = h.acquire(a, "r", X, 0);
    assert_eq!(h.acquire(a, "r", X, 1000), first);
    assert!(matches!(h.release(a, "r").result, Some(R::Released(true))));
    assert!(h.holders("r").is_empty());
}

#[test]
fn tokens_strictly_increase_per_lock_across_grants_and_conversions() {
    let mut h = Harness::new();
    let (a, b) = (h.session(0, "a"), h.session(0, "b"));
    let mut last = 0;
    for _ in 0..3 {
        for s in [a, b] {
            for mode in [X, S, X] {
                if let Answer::Granted { token, .. } = h.acquire(s, "r", mode, 0) {
                    assert!(token > last, "token {token} after {last}");
                    last = token;
                }
            }
            h.release(s, "r");
        }
    }
}

#[test]
fn waiters_are_granted_in_fifo_order_and_a_shared_request_queues_behind_an_exclusive_waiter() {
    let mut h = Harness::new();
    let (a, b, c, d) = (
        h.session(0, "a"),
        h.session(0, "b"),
        h.session(0, "c"),
        h.session(0, "d"),
    );
    h.acquire(a, "r", S, 0);
    let Answer::Queued(wb) = h.acquire(b, "r", X, 10_000) else {
        panic!()
    };
    // A shared request is compatible with the shared holder but must not overtake b.
    let Answer::Queued(wc) = h.acquire(c, "r", S, 10_000) else {
        panic!()
    };
    let Answer::Queued(wd) = h.acquire(d, "r", S, 10_000) else {
        panic!()
    };
    h.ended();
    h.release(a, "r");
    assert_eq!(h.holders("r"), vec![(b, X)]);
    assert_eq!(h.ended().iter().map(|e| e.0).collect::<Vec<_>>(), vec![wb]);
    h.release(b, "r");
    // The run of shared requests at the head is granted together.
    assert_eq!(h.holders("r"), vec![(c, S), (d, S)]);
    assert_eq!(
        h.ended().iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![wc, wd]
    );
}

#[test]
fn a_session_that_stops_its_keep_alives_loses_its_locks_after_the_ttl_and_not_before() {
    let mut h = Harness::new();
    let a = h.session(2_000, "a");
    let b = h.session(60_000, "b");
    h.acquire(a, "r", X, 0);
    let Answer::Queued(wb) = h.acquire(b, "r", X, 60_000) else {
        panic!()
    };
    h.pass(1_999);
    assert_eq!(h.holders("r"), vec![(a, X)]);
    h.pass(1);
    assert_eq!(h.holders("r"), vec![(b, X)]);
    assert!(
        h.ended()
            .iter()
            .any(|(w, ans)| *w == wb && matches!(ans, Answer::Granted { .. }))
    );
    assert!(matches!(h.keep_alive(a).result, Some(R::Error(_))));
}

#[test]
fn a_keep_alive_extends_the_session_by_a_full_ttl() {
    let mut h = Harness::new();
    let a = h.session(2_000, "a");
    h.acquire(a, "r", X, 0);
    for _ in 0..10 {
        h.pass(1_500);
        h.keep_alive(a);
    }
    assert_eq!(h.holders("r"), vec![(a, X)]);
}

#[test]
fn a_new_epoch_extends_every_session_by_a_full_ttl() {
    let mut h = Harness::new();
    let a = h.session(2_000, "a");
    h.acquire(a, "r", X, 0);
    h.now += 1_900;
    h.table.extend_all_sessions(h.now);
    h.pass(1_999);
    assert_eq!(h.holders("r"), vec![(a, X)]);
    h.pass(1);
    assert!(h.holders("r").is_empty());
}

#[test]
fn a_waiter_whose_session_expired_is_never_granted() {
    // The etcd lock bug found by Jepsen: a waiter granted after its lease ran out.
    let mut h = Harness::new();
    let a = h.session(60_000, "a");
    let b = h.session(2_000, "b");
    h.acquire(a, "r", X, 0);
    let Answer::Queued(wb) = h.acquire(b, "r", X, 60_000) else {
        panic!()
    };
    h.now += 5_000;
    // The release is applied after b's expiry time: b's expiry happens first.
    h.release(a, "r");
    assert!(h.holders("r").is_empty());
    let ended = h.ended();
    assert!(
        ended.contains(&(wb, Answer::Failed(Code::NotFound))),
        "{ended:?}"
    );
}

#[test]
fn a_wait_ends_with_deadline_exceeded_at_its_deadline() {
    let mut h = Harness::new();
    let (a, b) = (h.session(60_000, "a"), h.session(60_000, "b"));
    h.acquire(a, "r", X, 0);
    let Answer::Queued(wb) = h.acquire(b, "r", X, 500) else {
        panic!()
    };
    h.pass(499);
    assert!(h.table.is_waiting(wb));
    h.pass(1);
    assert_eq!(
        h.ended(),
        vec![(wb, Answer::Failed(Code::DeadlineExceeded))]
    );
    assert!(h.table.lock_info("r").waiters.is_empty());
}

#[test]
fn a_downgrade_is_immediate_and_lets_shared_waiters_in() {
    let mut h = Harness::new();
    let (a, b) = (h.session(0, "a"), h.session(0, "b"));
    let Answer::Granted { token: t1, .. } = h.acquire(a, "r", X, 0) else {
        panic!()
    };
    let Answer::Queued(_) = h.acquire(b, "r", S, 10_000) else {
        panic!()
    };
    let Answer::Granted { token: t2, mode } = h.acquire(a, "r", S, 0) else {
        panic!()
    };
    assert!(t2 > t1);
    assert_eq!(mode, S);
    assert_eq!(h.holders("r"), vec![(a, S), (b, S)]);
}

#[test]
fn an_upgrade_waits_for_the_other_shared_holders_and_goes_ahead_of_other_waiters() {
    let mut h = Harness::new();
    let (a, b, c) = (h.session(0, "a"), h.session(0, "b"), h.session(0, "c"));
    h.acquire(a, "r", S, 0);
    h.acquire(b, "r", S, 0);
    let Answer::Queued(_) = h.acquire(c, "r", X, 10_000) else {
        panic!()
    };
    let Answer::Queued(wa) = h.acquire(a, "r", X, 10_000) else {
        panic!()
    };
    assert!(h.table.lock_info("r").waiters[0].upgrade);
    h.ended();
    h.release(b, "r");
    assert_eq!(h.holders("r"), vec![(a, X)]);
    assert!(matches!(h.ended()[..], [(w, Answer::Granted { mode: X, .. })] if w == wa));
}

#[test]
fn two_concurrent_upgraders_are_a_deadlock_and_the_second_is_the_victim() {
    let mut h = Harness::new();
    let (a, b) = (h.session(0, "a"), h.session(0, "b"));
    h.acquire(a, "r", S, 0);
    h.acquire(b, "r", S, 0);
    let Answer::Queued(wa) = h.acquire(a, "r", X, 10_000) else {
        panic!()
    };
    assert_eq!(h.acquire(b, "r", X, 10_000), Answer::Failed(Code::Aborted));
    // The victim keeps its shared hold; the first upgrader still waits.
    assert_eq!(h.holders("r"), vec![(a, S), (b, S)]);
    assert!(h.table.is_waiting(wa));
    h.release(b, "r");
    assert_eq!(h.holders("r"), vec![(a, X)]);
}

#[test]
fn a_two_session_deadlock_aborts_the_request_that_closes_the_cycle() {
    let mut h = Harness::new();
    let (a, b) = (h.session(0, "cli-1"), h.session(0, "cli-2"));
    h.acquire(a, "res-A", X, 0);
    h.acquire(b, "res-B", X, 0);
    let Answer::Queued(wa) = h.acquire(a, "res-B", X, 10_000) else {
        panic!()
    };
    let r = h.run(Op::Acquire(ipb::AcquireLock {
        name: "res-A".into(),
        owner: Some(ipb::LockOwner {
            owner: Some(ipb::lock_owner::Owner::SessionId(b)),
        }),
        mode: X.wire() as i32,
        wait_ms: 10_000,
        lock_delay_ms: 0,
    }));
    let Some(R::Error(e)) = r.result else {
        panic!("{r:?}")
    };
    assert_eq!(e.code, Code::Aborted as i32);
    assert!(
        e.message.starts_with(&format!(
            "deadlock: cli-2 (session {b}) waits for `res-A` held by cli-1 (session {a}), which \
             waits for `res-B` held by cli-2 (session {b})"
        )),
        "{}",
        e.message
    );
    assert!(h.table.is_waiting(wa));
    let deadlock_events = h
        .table
        .take_notices()
        .into_iter()
        .filter(
            |n| matches!(n, Notice::Event(e) if e.r#type == api::LockEventType::Deadlock as i32),
        )
        .count();
    assert_eq!(deadlock_events, 1);
}

#[test]
fn a_three_session_cycle_is_detected_and_a_chain_is_not() {
    let mut h = Harness::new();
    let s: Vec<u64> = (0..3).map(|i| h.session(0, &format!("s{i}"))).collect();
    for (i, &id) in s.iter().enumerate() {
        h.acquire(id, &format!("l{i}"), X, 0);
    }
    // s0 → s1 → s2: a chain, no deadlock.
    assert!(matches!(
        h.acquire(s[0], "l1", X, 10_000),
        Answer::Queued(_)
    ));
    assert!(matches!(
        h.acquire(s[1], "l2", X, 10_000),
        Answer::Queued(_)
    ));
    // s2 → s0 closes the cycle.
    assert_eq!(
        h.acquire(s[2], "l0", X, 10_000),
        Answer::Failed(Code::Aborted)
    );
    // Shared-on-shared is not an edge: no false positive.
    let mut h = Harness::new();
    let (a, b) = (h.session(0, "a"), h.session(0, "b"));
    h.acquire(a, "p", S, 0);
    h.acquire(b, "q", X, 0);
    assert!(matches!(h.acquire(a, "q", X, 10_000), Answer::Queued(_)));
    assert!(matches!(
        h.acquire(b, "p", S, 10_000),
        Answer::Granted { .. }
    ));
}

#[test]
fn lock_delay_keeps_a_lost_lock_unavailable_after_expiry_but_not_after_release() {
    let mut h = Harness::new();
    let a = h.session(2_000, "a");
    let b = h.session(60_000, "b");
    h.run(Op::Acquire(ipb::AcquireLock {
        name: "r".into(),
        owner: Some(ipb::LockOwner {
            owner: Some(ipb::lock_owner::Owner::SessionId(a)),
        }),
        mode: X.wire() as i32,
        wait_ms: 0,
        lock_delay_ms: 3_000,
    }));
    h.pass(2_000);
    assert!(h.holders("r").is_empty());
    assert_eq!(h.acquire(b, "r", X, 0), Answer::Refused);
    let Answer::Queued(_) = h.acquire(b, "r", X, 10_000) else {
        panic!()
    };
    h.pass(2_999);
    assert!(h.holders("r").is_empty());
    h.pass(1);
    assert_eq!(h.holders("r"), vec![(b, X)]);
    // Released normally: no delay.
    h.release(b, "r");
    let c = h.session(0, "c");
    assert!(matches!(h.acquire(c, "r", X, 0), Answer::Granted { .. }));
}

#[test]
fn implicit_sessions_follow_the_original_designs_calls() {
    let mut h = Harness::new();
    let owner = |c: &str| {
        Some(ipb::LockOwner {
            owner: Some(ipb::lock_owner::Owner::ClientId(c.into())),
        })
    };
    let r = h.run(Op::Acquire(ipb::AcquireLock {
        name: "res-A".into(),
        owner: owner("cli-1"),
        mode: X.wire() as i32,
        ..Default::default()
    }));
    assert!(matches!(answer(&r), Answer::Granted { .. }));
    let r = h.run(Op::Acquire(ipb::AcquireLock {
        name: "res-A".into(),
        owner: owner("cli-2"),
        mode: X.wire() as i32,
        ..Default::default()
    }));
    assert_eq!(answer(&r), Answer::Refused);
    // A refused try-lock leaves no implicit session behind.
    assert_eq!(h.table.session_count(), 1);
    let r = h.run(Op::Release(ipb::ReleaseLock {
        name: "res-A".into(),
        owner: owner("cli-1"),
    }));
    assert!(matches!(r.result, Some(R::Released(true))));
    assert_eq!(h.table.session_count(), 0);
}

#[test]
fn bad_input_is_refused_with_the_documented_codes() {
    let mut h = Harness::new();
    let a = h.session(0, "a");
    assert_eq!(
        h.acquire(a, "", X, 0),
        Answer::Failed(Code::InvalidArgument)
    );
    assert_eq!(
        h.acquire(a, &"x".repeat(513), X, 0),
        Answer::Failed(Code::InvalidArgument)
    );
    assert_eq!(h.acquire(999, "r", X, 0), Answer::Failed(Code::NotFound));
    let r = h.run(Op::CreateSession(ipb::CreateSession {
        ttl_ms: 10,
        client_name: String::new(),
    }));
    assert!(matches!(r.result, Some(R::Error(e)) if e.code == Code::InvalidArgument as i32));
    let r = h.release(a, "never-held");
    assert!(matches!(r.result, Some(R::Error(e)) if e.code == Code::FailedPrecondition as i32));
    let r = h.run(Op::Acquire(ipb::AcquireLock {
        name: "r".into(),
        owner: Some(ipb::LockOwner {
            owner: Some(ipb::lock_owner::Owner::SessionId(a)),
        }),
        mode: 7,
        ..Default::default()
    }));
    assert_eq!(answer(&r), Answer::Failed(Code::InvalidArgument));
}

#[test]
fn revoking_a_session_releases_its_locks_and_ends_its_waits() {
    let mut h = Harness::new();
    let (a, b) = (h.session(0, "a"), h.session(0, "b"));
    h.acquire(a, "r1", X, 0);
    h.acquire(b, "r2", X, 0);
    let Answer::Queued(wa) = h.acquire(a, "r2", X, 10_000) else {
        panic!()
    };
    let r = h.run(Op::RevokeSession(ipb::RevokeSession { session_id: a }));
    assert!(matches!(r.result, Some(R::Revoked(ref v)) if v.released_locks == vec!["r1"]));
    assert!(h.holders("r1").is_empty());
    assert!(h.ended().contains(&(wa, Answer::Failed(Code::NotFound))));
}

#[test]
fn a_snapshot_restores_an_identical_table() {
    let mut h = Harness::new();
    let (a, b, c) = (h.session(3_000, "a"), h.session(0, "b"), h.session(0, "c"));
    h.acquire(a, "r", S, 0);
    h.acquire(b, "r", X, 10_000);
    h.acquire(c, "q", X, 0);
    h.acquire(a, "q", S, 5_000);
    h.table.take_notices();
    let restored = LockTable::restore(h.table.snapshot());
    assert_eq!(restored, h.table);
}
