//! Locks on real processes: the lock table is replicated (every node shows it), holders keep
//! their locks and tokens across a leader's death and waiters are then granted in order, a
//! session's TTL is a lower bound, deadlocks abort exactly one waiter, and under load with the
//! leader killed twice no exclusive hold overlaps another hold.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use sync_tests::api::{self, Consistency, LockMode};
use sync_tests::locks::{History, HoldRecord, LockUser};
use sync_tests::wait::eventually;
use sync_tests::{Cluster, Options, scenario};
use tokio::time::Instant;
use tonic::{Code, Request};

const WITHIN: Duration = Duration::from_secs(15);
const TTL: Duration = Duration::from_secs(10);

async fn user(c: &Cluster, name: &str, ttl: Duration) -> anyhow::Result<Arc<LockUser>> {
    Ok(Arc::new(
        LockUser::open(&c.clients(), name, ttl, WITHIN)
            .await
            .with_context(|| format!("opening a session for {name}"))?,
    ))
}

/// The lock as node `id` sees it (stale read of its own replica).
async fn lock_on(c: &Cluster, id: u64, name: &str) -> anyhow::Result<api::LockInfo> {
    let mut req = Request::new(api::GetLockRequest {
        name: name.into(),
        consistency: Consistency::Stale as i32,
    });
    req.set_timeout(Duration::from_secs(2));
    let r = c.client(id).lock().get_lock(req).await?.into_inner();
    r.lock.context("GetLock answered no lock")
}

/// Waits until the leader's lock table shows `sessions` waiting for `name`, in that order.
async fn wait_for_waiters(c: &Cluster, name: &str, sessions: &[u64]) -> anyhow::Result<()> {
    eventually(
        &format!("waiters {sessions:?} on {name}"),
        Duration::from_secs(10),
        async || {
            let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
            let info = lock_on(c, leader.id, name).await?;
            let got: Vec<u64> = info.waiters.iter().map(|w| w.session_id).collect();
            ensure!(got == sessions, "waiters are {got:?}");
            Ok(())
        },
    )
    .await
}

fn holder_sessions(info: &api::LockInfo) -> Vec<u64> {
    info.holders.iter().map(|h| h.session_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_acquired_through_one_node_is_seen_on_every_node() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let a = user(c, "alice", TTL).await?;
        let grant = a
            .acquire("res-A", LockMode::Exclusive, Duration::ZERO, WITHIN)
            .await?;
        ensure!(grant.granted && grant.token > 0, "not granted: {grant:?}");
        for id in c.ids() {
            eventually(
                &format!("node {id} shows alice holding res-A"),
                Duration::from_secs(5),
                async || {
                    let info = lock_on(c, id, "res-A").await?;
                    ensure!(holder_sessions(&info) == vec![a.session], "{info:?}");
                    ensure!(info.holders[0].token == grant.token);
                    ensure!(info.holders[0].client_name == "alice");
                    Ok(())
                },
            )
            .await?;
        }
        // The original design's calls: acquire and release by client string, on any node.
        let ids = c.ids();
        let mut req = Request::new(api::AcquireRequest {
            name: "res-B".into(),
            client_id: "cli-1".into(),
            mode: LockMode::Exclusive as i32,
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(5));
        let r = c.client(ids[1]).lock().acquire(req).await?.into_inner();
        ensure!(r.granted, "cli-1 not granted res-B: {r:?}");
        let mut req = Request::new(api::ReleaseRequest {
            name: "res-B".into(),
            client_id: "cli-1".into(),
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(5));
        let r = c.client(ids[2]).lock().release(req).await?.into_inner();
        ensure!(r.released);
        // Releasing it again is refused: nothing is held.
        let mut req = Request::new(api::ReleaseRequest {
            name: "res-B".into(),
            client_id: "cli-1".into(),
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(5));
        let e = c.client(ids[0]).lock().release(req).await.unwrap_err();
        ensure!(e.code() == Code::FailedPrecondition, "{e:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_keep_their_locks_and_waiters_are_granted_in_order_after_the_leader_dies() {
    scenario(3, Options::default(), Duration::from_secs(90), async |c| {
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        let (a, b, w) = (
            user(c, "a", TTL).await?,
            user(c, "b", TTL).await?,
            user(c, "w", TTL).await?,
        );
        let _keep = [
            a.keep_alive_in_background(Duration::from_secs(2)),
            b.keep_alive_in_background(Duration::from_secs(2)),
            w.keep_alive_in_background(Duration::from_secs(2)),
        ];
        let held = a
            .acquire("L", LockMode::Exclusive, Duration::ZERO, WITHIN)
            .await?;
        ensure!(held.granted);
        let wait = Duration::from_secs(40);
        let b2 = b.clone();
        let b_wait =
            tokio::spawn(async move { b2.acquire("L", LockMode::Exclusive, wait, wait * 2).await });
        wait_for_waiters(c, "L", &[b.session]).await?;
        let w2 = w.clone();
        let w_wait =
            tokio::spawn(async move { w2.acquire("L", LockMode::Shared, wait, wait * 2).await });
        wait_for_waiters(c, "L", &[b.session, w.session]).await?;

        c.kill9(leader.id).await?;
        let new = c
            .wait_for_leader_where(Duration::from_secs(10), "a new leader", |l| {
                l.id != leader.id
            })
            .await?;
        c.note(format!("node {} leads after the kill", new.id));
        // The holder keeps its lock and token; the waiters keep their places.
        let info = lock_on(c, new.id, "L").await?;
        ensure!(holder_sessions(&info) == vec![a.session], "{info:?}");
        ensure!(
            info.holders[0].token == held.token,
            "token changed: {info:?}"
        );
        wait_for_waiters(c, "L", &[b.session, w.session]).await?;
        c.restart(leader.id).await?;

        ensure!(a.release("L", WITHIN).await?);
        let gb = b_wait.await??;
        ensure!(gb.granted && gb.token > held.token, "b: {gb:?}");
        ensure!(
            !w_wait.is_finished(),
            "w was granted beside the exclusive holder b"
        );
        ensure!(b.release("L", WITHIN).await?);
        let gw = w_wait.await??;
        ensure!(gw.granted && gw.token > gb.token, "w: {gw:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_without_keep_alives_loses_its_locks_after_its_ttl_and_not_before() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let ttl = Duration::from_secs(3);
        let opened = Instant::now();
        let silent = user(c, "silent", ttl).await?;
        let kept = user(c, "kept", ttl).await?;
        let _keep = kept.keep_alive_in_background(Duration::from_secs(1));
        let waiter = user(c, "waiter", TTL).await?;
        let _keep_w = waiter.keep_alive_in_background(Duration::from_secs(2));
        ensure!(
            silent
                .acquire("S", LockMode::Exclusive, Duration::ZERO, WITHIN)
                .await?
                .granted
        );
        ensure!(
            kept.acquire("K", LockMode::Exclusive, Duration::ZERO, WITHIN)
                .await?
                .granted
        );

        let g = waiter
            .acquire(
                "S",
                LockMode::Exclusive,
                Duration::from_secs(20),
                WITHIN * 2,
            )
            .await?;
        let granted_after = opened.elapsed();
        ensure!(g.granted);
        ensure!(
            granted_after >= ttl,
            "the silent session's lock went to another after {granted_after:?}, before its TTL"
        );
        c.note(format!(
            "the silent session's lock moved after {granted_after:?} (TTL {ttl:?})"
        ));
        // The kept session still holds K after twice its TTL.
        tokio::time::sleep((ttl * 2).saturating_sub(opened.elapsed())).await;
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        let info = lock_on(c, leader.id, "K").await?;
        ensure!(holder_sessions(&info) == vec![kept.session], "{info:?}");
        // The silent session is gone: keep-alive says so.
        let e = silent.keep_alive(WITHIN).await.unwrap_err();
        ensure!(e.code() == Code::NotFound, "{e:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_session_deadlock_and_a_three_session_cycle_each_abort_exactly_one_waiter() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let users = [
            user(c, "u1", TTL).await?,
            user(c, "u2", TTL).await?,
            user(c, "u3", TTL).await?,
        ];
        let wait = Duration::from_secs(30);
        // Two sessions: u1 holds A and waits for B; u2 holds B and asks for A.
        ensure!(
            users[0]
                .acquire("A", LockMode::Exclusive, Duration::ZERO, WITHIN)
                .await?
                .granted
        );
        ensure!(
            users[1]
                .acquire("B", LockMode::Exclusive, Duration::ZERO, WITHIN)
                .await?
                .granted
        );
        let u1 = users[0].clone();
        let first =
            tokio::spawn(async move { u1.acquire("B", LockMode::Exclusive, wait, wait).await });
        wait_for_waiters(c, "B", &[users[0].session]).await?;
        let e = users[1]
            .acquire("A", LockMode::Exclusive, wait, WITHIN)
            .await
            .unwrap_err();
        ensure!(e.code() == Code::Aborted, "expected ABORTED, got {e:?}");
        ensure!(e.message().starts_with("deadlock: u2"), "{}", e.message());
        c.note(format!("victim told: {}", e.message()));
        ensure!(!first.is_finished(), "the other waiter was aborted too");
        ensure!(users[1].release("B", WITHIN).await?);
        ensure!(first.await??.granted);
        ensure!(users[0].release("A", WITHIN).await?);
        ensure!(users[0].release("B", WITHIN).await?);

        // Three sessions: u1 holds X, u2 holds Y, u3 holds Z; u1 → Y, u2 → Z, u3 → X closes it.
        for (u, l) in users.iter().zip(["X", "Y", "Z"]) {
            ensure!(
                u.acquire(l, LockMode::Exclusive, Duration::ZERO, WITHIN)
                    .await?
                    .granted
            );
        }
        let u1 = users[0].clone();
        let w1 =
            tokio::spawn(async move { u1.acquire("Y", LockMode::Exclusive, wait, wait).await });
        wait_for_waiters(c, "Y", &[users[0].session]).await?;
        let u2 = users[1].clone();
        let w2 =
            tokio::spawn(async move { u2.acquire("Z", LockMode::Exclusive, wait, wait).await });
        wait_for_waiters(c, "Z", &[users[1].session]).await?;
        let e = users[2]
            .acquire("X", LockMode::Exclusive, wait, WITHIN)
            .await
            .unwrap_err();
        ensure!(e.code() == Code::Aborted, "expected ABORTED, got {e:?}");
        ensure!(
            !w1.is_finished() && !w2.is_finished(),
            "more than one waiter ended"
        );
        wait_for_waiters(c, "Y", &[users[0].session]).await?;
        wait_for_waiters(c, "Z", &[users[1].session]).await?;
        // Unwinding: u3 gives up Z, so u2 gets Z, then releases Y for u1.
        ensure!(users[2].release("Z", WITHIN).await?);
        ensure!(w2.await??.granted);
        ensure!(users[1].release("Y", WITHIN).await?);
        ensure!(w1.await??.granted);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_concurrent_upgraders_one_is_aborted_and_the_other_upgrades() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let (a, b) = (user(c, "a", TTL).await?, user(c, "b", TTL).await?);
        let sa = a
            .acquire("U", LockMode::Shared, Duration::ZERO, WITHIN)
            .await?;
        ensure!(
            b.acquire("U", LockMode::Shared, Duration::ZERO, WITHIN)
                .await?
                .granted
        );
        let wait = Duration::from_secs(20);
        let (a2, b2) = (a.clone(), b.clone());
        let mut ua =
            tokio::spawn(async move { a2.acquire("U", LockMode::Exclusive, wait, wait).await });
        let mut ub =
            tokio::spawn(async move { b2.acquire("U", LockMode::Exclusive, wait, wait).await });
        // Exactly one ends at once, with ABORTED; the other waits.
        let (victim, survivor, survivor_task) = tokio::select! {
            r = &mut ua => (r?, b.clone(), ub),
            r = &mut ub => (r?, a.clone(), ua),
        };
        let e = match victim {
            Ok(g) => bail!("an upgrader finished without the other releasing: {g:?}"),
            Err(e) => e,
        };
        ensure!(e.code() == Code::Aborted, "{e:?}");
        let victim_user = if survivor.session == a.session {
            &b
        } else {
            &a
        };
        // The victim keeps its shared hold; releasing it lets the survivor upgrade.
        ensure!(victim_user.release("U", WITHIN).await?);
        let g = survivor_task.await??;
        ensure!(
            g.granted && g.mode == LockMode::Exclusive as i32 && g.token > sa.token,
            "{g:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_on_five_locks_never_overlap_while_the_leader_is_killed_twice() {
    scenario(3, Options::default(), Duration::from_secs(150), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let history = History::default();
        let lost = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let stop_at = Instant::now() + Duration::from_secs(25);
        let mut tasks = Vec::new();
        for i in 0..50 {
            let u = user(c, &format!("c{i}"), TTL).await?;
            let (history, lost, errors) = (history.clone(), lost.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let _keep = u.keep_alive_in_background(Duration::from_secs(2));
                let mut rng = rand::random::<u64>();
                while Instant::now() < stop_at {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let lock = format!("lock-{}", (rng >> 33) % 5);
                    let exclusive = (rng >> 40).is_multiple_of(2);
                    let mode = if exclusive {
                        LockMode::Exclusive
                    } else {
                        LockMode::Shared
                    };
                    match u.acquire(&lock, mode, Duration::from_secs(3), WITHIN).await {
                        Ok(g) if g.granted => {
                            let start = Instant::now();
                            tokio::time::sleep(Duration::from_millis((rng >> 50) % 20)).await;
                            let end = Instant::now();
                            match u.release(&lock, WITHIN).await {
                                Ok(true) => history.record(HoldRecord {
                                    lock,
                                    session: u.session,
                                    exclusive,
                                    token: g.token,
                                    start,
                                    end,
                                }),
                                Ok(false) => {
                                    lost.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e)
                                    if e.code() == Code::FailedPrecondition
                                        || e.code() == Code::NotFound =>
                                {
                                    lost.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(_) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(e) if e.code() == Code::DeadlineExceeded => {}
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for round in 0..2 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let leader = c.wait_for_leader(Duration::from_secs(10)).await?;
            c.note(format!("round {round}: killing leader {}", leader.id));
            c.kill9(leader.id).await?;
            c.wait_for_leader_where(Duration::from_secs(10), "a new leader", |l| {
                l.id != leader.id
            })
            .await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            c.restart(leader.id).await?;
        }
        for t in tasks {
            t.await?;
        }
        let checked = history.check()?;
        let (lost, errors) = (lost.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
        c.note(format!(
            "{checked} holds checked, none overlapping; {lost} holds lost, {errors} calls failed"
        ));
        ensure!(checked > 100, "too few holds to mean anything: {checked}");
        ensure!(
            lost == 0,
            "{lost} holds were lost although every session was kept alive"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_lock_events_and_tokens_validate_only_while_held() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        let follower = c
            .ids()
            .into_iter()
            .find(|id| *id != leader.id)
            .context("no follower")?;
        let mut watch = c
            .client(follower)
            .lock()
            .watch(api::LockWatchRequest {
                prefix: "jobs/".into(),
            })
            .await?
            .into_inner();
        let a = user(c, "a", TTL).await?;
        let g = a
            .acquire("jobs/nightly", LockMode::Exclusive, Duration::ZERO, WITHIN)
            .await?;
        // Outside the prefix: not delivered.
        ensure!(
            a.acquire("other", LockMode::Exclusive, Duration::ZERO, WITHIN)
                .await?
                .granted
        );
        let validate = async |consistency: Consistency| -> anyhow::Result<bool> {
            let mut req = Request::new(api::ValidateTokenRequest {
                name: "jobs/nightly".into(),
                token: g.token,
                consistency: consistency as i32,
            });
            req.set_timeout(Duration::from_secs(5));
            Ok(c.client(follower)
                .lock()
                .validate_token(req)
                .await?
                .into_inner()
                .valid)
        };
        ensure!(
            validate(Consistency::Linearizable).await?,
            "the holder's token is not valid"
        );
        ensure!(a.release("jobs/nightly", WITHIN).await?);
        ensure!(
            !validate(Consistency::Linearizable).await?,
            "a released token still validates"
        );

        let mut seen = Vec::new();
        while seen.len() < 2 {
            let e = tokio::time::timeout(Duration::from_secs(5), watch.message())
                .await
                .context("no lock event within 5 s")??
                .context("the watch ended")?;
            seen.push((e.r#type, e.name.clone(), e.token, e.session_id));
        }
        ensure!(
            seen == vec![
                (
                    api::LockEventType::Acquired as i32,
                    "jobs/nightly".to_string(),
                    g.token,
                    a.session
                ),
                (
                    api::LockEventType::Released as i32,
                    "jobs/nightly".to_string(),
                    g.token,
                    a.session
                ),
            ],
            "events: {seen:?}"
        );
        // The lists agree from every node.
        for id in c.ids() {
            let mut req = Request::new(api::ListLocksRequest {
                consistency: Consistency::Linearizable as i32,
                ..Default::default()
            });
            req.set_timeout(Duration::from_secs(5));
            let list = c.client(id).lock().list_locks(req).await?.into_inner();
            let names: Vec<&str> = list.locks.iter().map(|l| l.name.as_str()).collect();
            ensure!(names == vec!["other"], "node {id} lists {names:?}");
            let mut req = Request::new(api::ListSessionsRequest {
                consistency: Consistency::Stale as i32,
                ..Default::default()
            });
            req.set_timeout(Duration::from_secs(5));
            let sessions = c.client(id).lock().list_sessions(req).await?.into_inner();
            ensure!(
                sessions
                    .sessions
                    .iter()
                    .any(|s| s.session_id == a.session && s.held_locks == 1),
                "node {id} sessions: {:?}",
                sessions.sessions
            );
        }
        Ok(())
    })
    .await;
}
