//! Retries against a real 3-node cluster of `syncd` processes:
//!
//! - a mutating call sent twice with the same `RequestHeader` (client id + sequence), as the
//!   SDK does when it retries after a lost answer, is applied once: one queue message, one
//!   session, and the second answer is the first one's;
//! - SDK publishes in flight while the leader is killed each succeed or fail with a retryable
//!   error within their deadline, none is applied twice, and every one that succeeded is
//!   durable (consumed afterwards);
//! - SDK cache writes in flight while the leader is killed likewise end within their deadline,
//!   and every acknowledged one is read back afterwards with its version or a newer one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use futures::StreamExt;
use sync_client::api::lock_client::LockClient;
use sync_client::api::queue_client::QueueClient;
use sync_client::{Client, Error, api};
use sync_tests::{Cluster, Options, scenario};
use tokio::time::Instant;

mod common;
use common::{endpoints, short_cache_lease};

const LIMIT: Duration = Duration::from_secs(120);

/// A header as the SDK would send on every attempt of one call.
fn header(client_id: u64, sequence: u64) -> Option<api::RequestHeader> {
    Some(api::RequestHeader {
        client_id,
        sequence,
        lowest_unacked: sequence,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_repeated_with_the_same_header_is_applied_once() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let leader = c.wait_for_leader(Duration::from_secs(10)).await?;
        let client = Client::connect(endpoints(c)).await?;
        let client_id = 0x5eed_0000_0000_0001_u64;
        // Through a follower, so the repeats are forwarded like a retry after a redirect.
        let follower = c
            .ids()
            .into_iter()
            .find(|&id| id != leader.id)
            .context("a follower")?;
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", c.address(follower)))?
                .connect()
                .await?;

        // A publish: the same message id twice, one message in the topic.
        let publish = api::PublishRequest {
            header: header(client_id, 1),
            topic: "dedup-probe".into(),
            payload: "once".into(),
            ..Default::default()
        };
        let mut queue = QueueClient::new(channel.clone());
        let first = queue.publish(publish.clone()).await?.into_inner();
        let second = queue.publish(publish).await?.into_inner();
        ensure!(
            first.message_id == second.message_id,
            "a repeated publish stored a second message: {first:?} then {second:?}"
        );
        let consumer = client
            .consumer("dedup-probe")
            .batch(10)
            .wait(Duration::from_secs(1));
        let got = consumer.receive().await?;
        let payloads: Vec<&[u8]> = got.iter().map(|d| d.payload()).collect();
        ensure!(
            payloads == [b"once".as_slice()],
            "the topic holds {payloads:?}"
        );

        // A session: the same session id twice, one session listed.
        let create = api::CreateSessionRequest {
            header: header(client_id, 2),
            ttl_ms: 60_000,
            client_name: "dedup-header-probe".into(),
        };
        let mut lock = LockClient::new(channel);
        let a = lock.create_session(create.clone()).await?.into_inner();
        let b = lock.create_session(create).await?.into_inner();
        ensure!(a.session_id == b.session_id, "two sessions: {a:?}, {b:?}");
        let listed = client
            .list_sessions()
            .await?
            .into_iter()
            .filter(|s| s.client_name == "dedup-header-probe")
            .count();
        ensure!(listed == 1, "{listed} sessions listed for one create");

        // A repeat of an answered call below the client's lowest_unacked is refused, not
        // applied again.
        let later = api::PublishRequest {
            header: Some(api::RequestHeader {
                client_id,
                sequence: 3,
                lowest_unacked: 3,
            }),
            topic: "dedup-probe".into(),
            payload: "later".into(),
            ..Default::default()
        };
        queue.publish(later).await?;
        let stale = api::PublishRequest {
            header: header(client_id, 1),
            topic: "dedup-probe".into(),
            payload: "once".into(),
            ..Default::default()
        };
        match queue.publish(stale).await {
            Err(s) if s.code() == tonic::Code::Aborted => {}
            other => anyhow::bail!("a discarded sequence was answered {other:?}"),
        }
        Ok(())
    })
    .await;
}

/// The overall deadline of each call in the failover tests.
const DEADLINE: Duration = Duration::from_secs(10);

/// A client whose calls give up after [`DEADLINE`], once the cluster has a leader.
async fn failover_client(c: &Cluster) -> anyhow::Result<Client> {
    c.wait_for_leader(Duration::from_secs(10)).await?;
    Ok(Client::builder(endpoints(c))
        .deadline(DEADLINE)
        .request_timeout(Duration::from_secs(2))
        .connect()
        .await?)
}

/// What calls made across a leader kill gave: the acknowledged ones (name -> answer), the
/// names of every call made, and the failures.
struct Across<T> {
    acknowledged: BTreeMap<String, T>,
    attempted: BTreeSet<String>,
    failures: Vec<(String, Error)>,
}

/// Runs `call(name)` in a loop on three tasks, with fresh names, while the leader is killed and
/// a new one elected, and checks what the SDK promises of each call: it ends within its
/// deadline, and a failure is retryable (unreachable, no leader, or timed out).
async fn across_a_leader_kill<T, F, Fut>(c: &mut Cluster, call: F) -> anyhow::Result<Across<T>>
where
    T: Send + 'static,
    F: Fn(String) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = sync_client::Result<T>> + Send,
{
    let leader = c.wait_for_leader(Duration::from_secs(10)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..3 {
        let (call, stop) = (call.clone(), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("t{t}-{i}");
                let started = Instant::now();
                let outcome = call(name.clone()).await;
                outcomes.push((name, started.elapsed(), outcome));
                i += 1;
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill9(leader.id).await?;
    c.wait_for_leader(Duration::from_secs(20)).await?;
    // Let calls run against the new leader for a while too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut across = Across {
        acknowledged: BTreeMap::new(),
        attempted: BTreeSet::new(),
        failures: Vec::new(),
    };
    for task in tasks {
        for (name, took, outcome) in task.await? {
            // The SDK's deadline plus its per-attempt grace; a slow machine gets 2 s more.
            ensure!(
                took <= DEADLINE + Duration::from_secs(2),
                "call {name} took {took:?}, past its deadline {DEADLINE:?}"
            );
            across.attempted.insert(name.clone());
            match outcome {
                Ok(answer) => {
                    across.acknowledged.insert(name, answer);
                }
                Err(e) => {
                    ensure!(
                        e.is_retryable() || matches!(e, Error::Timeout { .. }),
                        "call {name} failed with a non-retryable error: {e}"
                    );
                    across.failures.push((name, e));
                }
            }
        }
    }
    eprintln!(
        "{} calls acknowledged, {} failed retryably ({:?})",
        across.acknowledged.len(),
        across.failures.len(),
        across
            .failures
            .iter()
            .map(|(_, e)| e.to_string())
            .collect::<Vec<_>>(),
    );
    Ok(across)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_in_flight_when_the_leader_dies_are_applied_at_most_once_and_kept_if_acknowledged()
 {
    scenario(3, Options::default(), LIMIT, async |c| {
        let client = failover_client(c).await?;
        let publisher = client.clone();
        let Across {
            acknowledged,
            attempted,
            ..
        } = across_a_leader_kill(c, move |payload| {
            let client = publisher.clone();
            async move { client.publish("failover", payload).await }
        })
        .await?;
        ensure!(
            client.retries() > 0,
            "no publish was retried across the leader's death"
        );
        eprintln!("{} attempts retried", client.retries());

        // Drain the topic: every acknowledged publish once, nothing twice, nothing unknown.
        let mut seen: BTreeMap<String, u32> = BTreeMap::new();
        let mut stream = Box::pin(
            client
                .consumer("failover")
                .batch(64)
                .wait(Duration::from_secs(1))
                .stream(),
        );
        let drained_by = Instant::now() + Duration::from_secs(40);
        while acknowledged.keys().any(|p| !seen.contains_key(p)) {
            let left = drained_by.saturating_duration_since(Instant::now());
            let d = tokio::time::timeout(left, stream.next())
                .await
                .context("acknowledged publishes missing after 40 s")?
                .context("the stream ended")??;
            d.ack().await?;
            let payload = String::from_utf8(d.payload().to_vec())?;
            *seen.entry(payload).or_default() += 1;
        }
        // Whatever else is still in the topic (failed publishes that did happen) comes within
        // a couple of empty polls.
        let mut quiet = 0;
        while quiet < 2 {
            match tokio::time::timeout(Duration::from_secs(3), stream.next()).await {
                Ok(Some(d)) => {
                    let d = d?;
                    d.ack().await?;
                    *seen
                        .entry(String::from_utf8(d.payload().to_vec())?)
                        .or_default() += 1;
                    quiet = 0;
                }
                _ => quiet += 1,
            }
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        ensure!(twice.is_empty(), "published more than once: {twice:?}");
        let unknown: Vec<_> = seen.keys().filter(|p| !attempted.contains(*p)).collect();
        ensure!(unknown.is_empty(), "messages nobody published: {unknown:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_sets_in_flight_when_the_leader_dies_are_kept_if_acknowledged() {
    scenario(3, short_cache_lease(), LIMIT, async |c| {
        let client = failover_client(c).await?;
        // The first write waits out the new directory's grace (one cache lease), so that the
        // loop below runs at full speed before the kill.
        client.cache_set("warm-up", "x", None).await?;
        let writer = client.clone();
        let across = across_a_leader_kill(c, move |key| {
            let client = writer.clone();
            async move { client.cache_set(&key, key.clone(), None).await }
        })
        .await?;
        ensure!(
            client.retries() > 0,
            "no cache write was retried across the leader's death"
        );
        // Every acknowledged write is in the cache's memory (the replicated state machine),
        // with its version or a newer one (a retried Set may be applied again: cache.proto).
        for (key, version) in &across.acknowledged {
            let read = client
                .cache_get(key)
                .await?
                .with_context(|| format!("acknowledged write of {key} (v{version}) lost"))?;
            ensure!(
                read.value == key.as_bytes() && read.version >= *version,
                "{key}: acknowledged v{version}, read {read:?}"
            );
        }
        eprintln!("{} attempts retried", client.retries());
        Ok(())
    })
    .await;
}
