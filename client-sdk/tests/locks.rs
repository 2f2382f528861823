//! The SDK against a real 3-node cluster of `syncd` processes (started by the cluster-test
//! harness of `tests/`, which finds or builds the binary, uses free ports and kills every node
//! at the end, also when a test panics).
//!
//! Each test names the behaviour it checks: routing through a follower, the lock calls and
//! their typed errors, the session's `lost()` signal, and calls that survive the leader being
//! killed with SIGKILL, applied once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use sync_client::api::ClusterStatusRequest;
use sync_client::api::cluster_client::ClusterClient;
use sync_client::{Client, Error, LockEventKind, LockGuard, LockMode, Session};
use sync_tests::wait::eventually;
use sync_tests::{Cluster, Options, scenario};

/// The longest any one test may run.
const LIMIT: Duration = Duration::from_secs(45);
const TTL: Duration = Duration::from_secs(10);

fn endpoints(c: &Cluster) -> Vec<String> {
    c.ids()
        .iter()
        .map(|&id| c.address(id).to_string())
        .collect()
}

async fn client(c: &Cluster, name: &str) -> anyhow::Result<Client> {
    Ok(Client::builder(endpoints(c))
        .client_name(name)
        .connect()
        .await?)
}

/// Alice's and Bob's sessions, each on its own client, and a third client to look on.
struct Pair {
    observer: Client,
    a: Session,
    b: Session,
}

async fn alice_and_bob(c: &Cluster) -> anyhow::Result<Pair> {
    c.wait_for_leader(Duration::from_secs(10)).await?;
    Ok(Pair {
        observer: client(c, "observer").await?,
        a: client(c, "alice").await?.session(TTL).await?,
        b: client(c, "bob").await?.session(TTL).await?,
    })
}

/// Alice and Bob both holding `name` SHARED, with conversions allowed to wait 20 s.
async fn two_readers(c: &Cluster, name: &str) -> anyhow::Result<(Pair, LockGuard, LockGuard)> {
    let pair = alice_and_bob(c).await?;
    let wait = Duration::from_secs(20);
    let reader_a = pair.a.lock(name).shared().timeout(wait).acquire().await?;
    let reader_b = pair.b.lock(name).shared().timeout(wait).acquire().await?;
    Ok((pair, reader_a, reader_b))
}

/// Waits until `session` waits for `name` (optionally as an upgrade), as the leader sees it.
async fn wait_until_waiting(client: &Client, name: &str, session: &Session) -> anyhow::Result<()> {
    let id = session.id();
    eventually(
        &format!("session {id} waiting for {name}"),
        Duration::from_secs(10),
        async || {
            let lock = client.get_lock(name).await?;
            ensure!(
                lock.waiters.iter().any(|w| w.session_id == id),
                "waiters are {:?}",
                lock.waiters
            );
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_through_a_follower_finds_the_leader_and_every_member() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let leader = c.wait_for_leader(Duration::from_secs(10)).await?;
        let follower = c
            .ids()
            .into_iter()
            .find(|&id| id != leader.id)
            .context("no follower")?;
        let client = Client::connect([c.address(follower).to_string()]).await?;
        // Members name each other by the addresses in --initial-cluster, which in this harness
        // are fault proxies in front of the nodes; ask the believed leader who it is.
        let believed = client.leader().context("the client found no leader")?;
        let mut cluster = ClusterClient::connect(format!("http://{believed}")).await?;
        let status = cluster.status(ClusterStatusRequest {}).await?.into_inner();
        ensure!(
            status.node_id == leader.id,
            "the client believes in {believed} (node {}), the leader is node {}",
            status.node_id,
            leader.id
        );
        ensure!(
            client.members().len() >= 3,
            "members {:?}",
            client.members()
        );
        let session = client.session(TTL).await?;
        let guard = session.lock("via-follower").acquire().await?;
        ensure!(guard.token() > 0);
        guard.release().await?;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_release_and_the_lock_table() {
    scenario(3, Options::default(), LIMIT, async |c| {
        c.wait_for_leader(Duration::from_secs(10)).await?;
        let client = client(c, "alice").await?;
        let session = client.session(TTL).await?;
        let guard = session.lock("res-A").exclusive().acquire().await?;
        ensure!(guard.token() > 0 && guard.mode() == LockMode::Exclusive);
        ensure!(guard.name() == "res-A");

        let lock = client.get_lock("res-A").await?;
        ensure!(lock.mode == Some(LockMode::Exclusive), "{lock:?}");
        ensure!(lock.holders.len() == 1, "{lock:?}");
        ensure!(lock.holders[0].session_id == session.id());
        ensure!(lock.holders[0].token == guard.token());
        ensure!(lock.holders[0].client_name == "alice");
        ensure!(client.validate_token("res-A", guard.token()).await?);
        ensure!(!client.validate_token("res-A", guard.token() + 1).await?);

        let listed = client.list_locks("res-").await?;
        ensure!(
            listed.iter().map(|l| l.name.as_str()).eq(["res-A"]),
            "{listed:?}"
        );
        let sessions = client.list_sessions().await?;
        let mine = sessions
            .iter()
            .find(|s| s.session_id == session.id())
            .context("own session not listed")?;
        ensure!(mine.held_locks == 1 && mine.ttl_ms == 10_000, "{mine:?}");

        // Reentrant: the same mode again is the same grant.
        let again = session.lock("res-A").try_acquire().await?;
        ensure!(again.token() == guard.token());
        let token = again.detach();
        ensure!(token == guard.token());

        guard.release().await?;
        ensure!(client.get_lock("res-A").await?.is_free());
        ensure!(!client.validate_token("res-A", token).await?);
        match session.release("res-A").await {
            Err(Error::NotHeld { .. }) => {}
            other => bail!("releasing a free lock: {other:?}"),
        }
        match client.session(Duration::from_millis(500)).await {
            Err(Error::InvalidArgument { message }) => {
                ensure!(message.contains("TTL"), "{message}")
            }
            other => bail!("a 500 ms TTL: {other:?}"),
        }
        match session.lock("").acquire().await {
            Err(Error::InvalidArgument { .. }) => {}
            other => bail!("an empty lock name: {other:?}"),
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_acquire_of_a_held_lock_is_refused_and_a_short_wait_times_out() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let Pair { observer, a, b } = alice_and_bob(c).await?;
        let held = a.lock("res-B").acquire().await?;
        match b.lock("res-B").try_acquire().await {
            Err(Error::NotAcquired { name, holders }) => {
                ensure!(name == "res-B");
                ensure!(
                    holders.len() == 1 && holders[0].session_id == a.id(),
                    "{holders:?}"
                );
                ensure!(holders[0].token == held.token());
            }
            other => bail!("try-acquire of a held lock: {other:?}"),
        }
        match b
            .lock("res-B")
            .timeout(Duration::from_millis(400))
            .acquire()
            .await
        {
            Err(e @ Error::Timeout { .. }) => ensure!(e.is_not_acquired()),
            other => bail!("a 400 ms wait for a held lock: {other:?}"),
        }
        // The timed-out wait was withdrawn.
        ensure!(observer.get_lock("res-B").await?.waiters.is_empty());
        // Shared holders do not exclude each other.
        let r1 = a.lock("res-S").shared().try_acquire().await?;
        let r2 = b.lock("res-S").shared().try_acquire().await?;
        ensure!(r1.token() != r2.token());
        ensure!(observer.get_lock("res-S").await?.holders.len() == 2);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_acquire_is_granted_when_the_holder_releases() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let Pair { observer, a, b } = alice_and_bob(c).await?;
        let first = a.lock("res-W").acquire().await?;
        let waiting = tokio::spawn({
            let b = b.clone();
            async move {
                b.lock("res-W")
                    .timeout(Duration::from_secs(20))
                    .acquire()
                    .await
            }
        });
        wait_until_waiting(&observer, "res-W", &b).await?;
        let first_token = first.token();
        first.release().await?;
        let second = waiting.await??;
        ensure!(
            second.token() > first_token,
            "{} after {first_token}",
            second.token()
        );
        let lock = observer.get_lock("res-W").await?;
        ensure!(
            lock.holders.len() == 1 && lock.holders[0].session_id == b.id(),
            "{lock:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_waits_for_the_other_reader_and_downgrade_is_immediate() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let (Pair { observer, a, b }, mut reader_a, reader_b) = two_readers(c, "res-U").await?;
        let shared_token = reader_a.token();
        let upgrading = tokio::spawn(async move { reader_a.upgrade().await.map(|()| reader_a) });
        wait_until_waiting(&observer, "res-U", &a).await?;
        let lock = observer.get_lock("res-U").await?;
        ensure!(lock.waiters[0].upgrade, "{lock:?}");
        reader_b.release().await?;
        let mut writer = upgrading.await??;
        ensure!(writer.mode() == LockMode::Exclusive);
        ensure!(writer.token() > shared_token);
        let exclusive_token = writer.token();
        writer.downgrade().await?;
        ensure!(writer.mode() == LockMode::Shared && writer.token() > exclusive_token);
        // Now a reader gets in at once.
        let reader = b.lock("res-U").shared().try_acquire().await?;
        ensure!(observer.get_lock("res-U").await?.holders.len() == 2);
        reader.release().await?;
        writer.release().await?;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_upgraders_deadlock_and_the_victim_gets_the_typed_error() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let (Pair { observer, a, .. }, mut reader_a, mut reader_b) =
            two_readers(c, "res-D").await?;
        let first = tokio::spawn(async move { reader_a.upgrade().await.map(|()| reader_a) });
        wait_until_waiting(&observer, "res-D", &a).await?;
        match reader_b.upgrade().await {
            Err(Error::Deadlock { message }) => {
                ensure!(message.contains("deadlock"), "{message}");
                ensure!(message.contains("res-D"), "{message}");
            }
            other => bail!("the second upgrader: {other:?}"),
        }
        // The victim keeps its shared hold; releasing it lets the first upgrader through.
        ensure!(reader_b.mode() == LockMode::Shared);
        reader_b.release().await?;
        let writer = first.await??;
        ensure!(writer.mode() == LockMode::Exclusive);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_fires_lost_and_watchers_see_the_lock_go() {
    scenario(3, Options::default(), LIMIT, async |c| {
        c.wait_for_leader(Duration::from_secs(10)).await?;
        let admin = client(c, "admin").await?;
        let mut events = Box::pin(admin.watch_locks("res-L").await?);
        let session = client(c, "alice")
            .await?
            .session(Duration::from_secs(3))
            .await?;
        let guard = session.lock("res-L").acquire().await?;
        ensure!(!session.is_lost());
        let released = admin.revoke_session(session.id()).await?;
        ensure!(released == ["res-L"], "{released:?}");
        // The next renewal (every TTL/3 = 1 s) is answered "unknown session".
        tokio::time::timeout(Duration::from_secs(5), session.lost())
            .await
            .context("lost() did not fire within 5 s of the revocation")?;
        ensure!(session.is_lost());
        drop(guard); // Nothing to release any more; must not panic or hang.

        use futures::StreamExt;
        let mut kinds = Vec::new();
        while kinds.len() < 2 {
            let event = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .context("no lock event")?
                .context("the watch ended")??;
            ensure!(
                event.name == "res-L" && event.session_id == session.id(),
                "{event:?}"
            );
            kinds.push(event.kind);
        }
        ensure!(
            kinds == [LockEventKind::Acquired, LockEventKind::Revoked],
            "{kinds:?}"
        );
        match admin.keep_alive_once(session.id()).await {
            Err(Error::SessionExpired { .. }) => {}
            other => bail!("renewing a revoked session: {other:?}"),
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_cannot_renew_is_lost_when_its_ttl_has_passed() {
    scenario(3, Options::default(), LIMIT, async |c| {
        c.wait_for_leader(Duration::from_secs(10)).await?;
        let ttl = Duration::from_secs(3);
        let session = client(c, "alice").await?.session(ttl).await?;
        // Let a few renewals through, then freeze every node: connections stay open but
        // nothing answers, so only the client's own clock can tell.
        tokio::time::sleep(ttl).await;
        ensure!(!session.is_lost());
        for id in c.ids() {
            c.sigstop(id)?;
        }
        let frozen = tokio::time::Instant::now();
        tokio::time::timeout(ttl + Duration::from_secs(2), session.lost())
            .await
            .context("lost() did not fire after the TTL passed without a renewal")?;
        let after = frozen.elapsed();
        // The last confirmed renewal was sent at most TTL/3 before the freeze.
        ensure!(
            after >= ttl * 2 / 3 - Duration::from_millis(100),
            "lost after {after:?}, before the TTL could have passed"
        );
        for id in c.ids() {
            c.sigcont(id)?;
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_acquire_survives_the_leader_being_killed() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let leader = c.wait_for_leader(Duration::from_secs(10)).await?;
        let alice = client(c, "alice").await?;
        let bob = client(c, "bob").await?;
        let a = alice.session(TTL).await?;
        let b = bob.session(TTL).await?;
        let first = a.lock("res-F").acquire().await?;
        let waiting = tokio::spawn({
            let b = b.clone();
            async move {
                b.lock("res-F")
                    .timeout(Duration::from_secs(30))
                    .acquire()
                    .await
            }
        });
        wait_until_waiting(&alice, "res-F", &b).await?;
        // Bob's Acquire is in flight on the leader: kill it under the call.
        c.kill9(leader.id).await?;
        let new_leader = c.wait_for_leader(Duration::from_secs(10)).await?;
        ensure!(new_leader.id != leader.id);
        let first_token = first.token();
        first.release().await?;
        let second = tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .context("the waiting Acquire never finished")???;
        ensure!(second.token() > first_token);
        ensure!(bob.retries() > 0, "bob's call was never retried");
        let lock = alice.get_lock("res-F").await?;
        ensure!(
            lock.holders.len() == 1 && lock.holders[0].session_id == b.id(),
            "{lock:?}"
        );
        ensure!(lock.holders[0].token == second.token(), "{lock:?}");
        ensure!(lock.waiters.is_empty(), "{lock:?}");
        ensure!(
            !a.is_lost() && !b.is_lost(),
            "a session was lost across the failover"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_created_across_a_leader_kill_are_each_applied_once() {
    scenario(3, Options::default(), LIMIT, async |c| {
        const NAME: &str = "dedup-probe";
        let leader = c.wait_for_leader(Duration::from_secs(10)).await?;
        let client = client(c, NAME).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut creators = Vec::new();
        for _ in 0..4 {
            let (client, stop) = (client.clone(), Arc::clone(&stop));
            creators.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let session = client
                        .session_builder()
                        .ttl(Duration::from_secs(120))
                        .keep_alive(false)
                        .create()
                        .await?;
                    ids.push(session.detach());
                }
                anyhow::Ok(ids)
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.kill9(leader.id).await?;
        c.wait_for_leader(Duration::from_secs(10)).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        let mut created = BTreeSet::new();
        for creator in creators {
            for id in creator.await?? {
                ensure!(created.insert(id), "session {id} returned twice");
            }
        }
        ensure!(
            client.retries() > 0,
            "no call was retried across the leader's death"
        );
        eprintln!(
            "{} sessions created by 4 concurrent creators, {} attempts retried",
            created.len(),
            client.retries()
        );
        let listed: BTreeSet<u64> = client
            .list_sessions()
            .await?
            .into_iter()
            .filter(|s| s.client_name == NAME)
            .map(|s| s.session_id)
            .collect();
        let extra: Vec<_> = listed.difference(&created).collect();
        let missing: Vec<_> = created.difference(&listed).collect();
        ensure!(
            extra.is_empty() && missing.is_empty(),
            "{} sessions created; applied twice (extra): {extra:?}; missing: {missing:?}",
            created.len()
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_cluster_is_one_actionable_error() {
    let started = tokio::time::Instant::now();
    let result = Client::builder(["127.0.0.1:1", "127.0.0.1:2"])
        .deadline(Duration::from_secs(1))
        .connect()
        .await;
    match result {
        Err(e @ Error::Unavailable { .. }) => {
            let text = e.to_string();
            assert_eq!(
                text,
                "no member reachable at 127.0.0.1:1, 127.0.0.1:2: connection refused; is the \
                 cluster running? try `syncctl dev up`"
            );
        }
        other => panic!("connecting to nothing: {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}
