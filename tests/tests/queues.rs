//! Queues on real processes: at-least-once delivery with nothing lost while the leader and a
//! topic's owner are killed under load; visibility timeouts and redelivery with stale receipts
//! refused; the dedup window; delayed messages; FIFO per ordering key with one message in
//! flight per key; a streaming consumer's credit window; dead letters and redrive with the
//! refusals each call documents; and ownership moving to another node when the owner stops,
//! and back when it returns.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use sync_tests::api;
use sync_tests::queues::{CALL, QueueLedger, QueueNodes, QueueUser, Seen, timed};
use sync_tests::wait::eventually;
use sync_tests::workload::leader_hint;
use sync_tests::{Cluster, Options, scenario};
use tokio::time::Instant;
use tonic::Code;

/// How long a test's client keeps retrying one call.
const WITHIN: Duration = Duration::from_secs(15);
const ZERO: Duration = Duration::ZERO;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn message(topic: &str, payload: &str) -> api::PublishRequest {
    api::PublishRequest {
        topic: topic.into(),
        payload: Bytes::from(payload.to_string()),
        ..Default::default()
    }
}

fn text(d: &api::Delivery) -> String {
    String::from_utf8_lossy(&d.payload).into_owned()
}

/// Stats as node `id` answers them (forwarded to the owner if it is not the owner).
async fn stats_via(
    nodes: &QueueNodes,
    id: u64,
    topic: &str,
) -> anyhow::Result<api::QueueStatsResponse> {
    let req = api::QueueStatsRequest {
        topic: topic.into(),
    };
    Ok(nodes
        .client(id)
        .stats(timed(req, CALL))
        .await
        .with_context(|| format!("Stats of {topic} via node {id}"))?
        .into_inner())
}

/// The owner of `topic` once every node in `ids` names the same one.
async fn agreed_owner(nodes: &QueueNodes, ids: &[u64], topic: &str) -> anyhow::Result<u64> {
    eventually(
        &format!("nodes {ids:?} to agree on the owner of {topic}"),
        Duration::from_secs(10),
        async || {
            let mut owners = BTreeSet::new();
            for &id in ids {
                owners.insert(stats_via(nodes, id, topic).await?.owner_node_id);
            }
            match owners.into_iter().collect::<Vec<_>>()[..] {
                [owner] if owner != 0 => Ok(owner),
                ref other => bail!("owners named: {other:?}"),
            }
        },
    )
    .await
}

/// Stats once they satisfy `check`. Stats come from the owner's replica, which may trail the
/// latest acknowledged write by about a heartbeat.
async fn stats_where(
    u: &QueueUser,
    topic: &str,
    what: &str,
    check: impl Fn(&api::QueueStatsResponse) -> bool,
) -> anyhow::Result<api::QueueStatsResponse> {
    eventually(
        &format!("Stats of {topic}: {what}"),
        Duration::from_secs(5),
        async || {
            let s = u.stats(topic, WITHIN).await?;
            ensure!(check(&s), "{s:?}");
            Ok(s)
        },
    )
    .await
}

/// Creates `topic` with these settings through node 1's client.
async fn create(u: &QueueUser, topic: &str, settings: api::TopicSettings) -> anyhow::Result<()> {
    let r = u.create_topic(topic, settings, WITHIN).await?;
    ensure!(r.created, "{topic} existed already: {r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_message_is_delivered_again_after_its_visibility_timeout_and_old_receipts_are_refused()
 {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let nodes = QueueNodes::of(c);
        let (producer, first_consumer, second_consumer) = (
            QueueUser::new(&nodes, 1),
            QueueUser::new(&nodes, 2),
            QueueUser::new(&nodes, 3),
        );
        let topic = "visibility";
        let published = producer.publish(message(topic, "hello"), WITHIN).await?;

        let before_first = Instant::now();
        let first = first_consumer
            .consume(topic, 10, ms(1000), ZERO, WITHIN)
            .await?;
        ensure!(
            first.len() == 1
                && first[0].message_id == published.message_id
                && first[0].delivery_attempt == 1,
            "first delivery: {first:?}"
        );
        let again = first_consumer
            .consume(topic, 10, ms(1000), ZERO, WITHIN)
            .await?;
        ensure!(again.is_empty(), "delivered while in flight: {again:?}");

        // Nobody acks: after the timeout a long poll on another node gets it again.
        let second = second_consumer
            .consume(topic, 10, ms(1000), Duration::from_secs(5), WITHIN)
            .await?;
        let waited = before_first.elapsed();
        ensure!(
            second.len() == 1
                && second[0].message_id == published.message_id
                && second[0].delivery_attempt == 2,
            "redelivery: {second:?}"
        );
        ensure!(
            waited >= ms(950),
            "redelivered after {waited:?}, before the 1 s timeout"
        );
        ensure!(second[0].first_delivery_unix_ms == first[0].first_delivery_unix_ms);
        c.note(format!("redelivered {waited:?} after the first consume"));

        // The first consumer is too late: its receipt names a superseded delivery.
        let stale = first_consumer
            .ack(topic, first[0].receipt.clone(), WITHIN)
            .await
            .expect_err("a stale receipt was accepted");
        ensure!(stale.code() == Code::FailedPrecondition, "{stale:?}");
        let stale = first_consumer
            .extend(topic, first[0].receipt.clone(), ms(1000), WITHIN)
            .await
            .expect_err("a stale receipt was extended");
        ensure!(stale.code() == Code::FailedPrecondition, "{stale:?}");

        // Extending keeps it in flight past its original timeout.
        let until = second_consumer
            .extend(topic, second[0].receipt.clone(), ms(3000), WITHIN)
            .await?;
        ensure!(
            until > second[0].visible_again_unix_ms,
            "extended to {until}, not past {}",
            second[0].visible_again_unix_ms
        );
        tokio::time::sleep(ms(1200)).await;
        ensure!(
            first_consumer
                .consume(topic, 10, ms(1000), ZERO, WITHIN)
                .await?
                .is_empty(),
            "delivered although its visibility was extended"
        );

        // A Nack with a delay makes it visible again after the delay only.
        second_consumer
            .nack(topic, second[0].receipt.clone(), ms(700), WITHIN)
            .await?;
        let nacked = Instant::now();
        ensure!(
            first_consumer
                .consume(topic, 10, ms(1000), ZERO, WITHIN)
                .await?
                .is_empty(),
            "delivered during the nack delay"
        );
        let third = first_consumer
            .consume(topic, 10, ms(5000), Duration::from_secs(5), WITHIN)
            .await?;
        ensure!(
            third.len() == 1 && third[0].delivery_attempt == 3,
            "after the nack: {third:?}"
        );
        ensure!(nacked.elapsed() >= ms(600), "{:?}", nacked.elapsed());

        // The original design's ack names only the message: attempt 0 is the latest delivery.
        let by_id = Some(api::Receipt {
            message_id: published.message_id.clone(),
            delivery_attempt: 0,
        });
        first_consumer.ack(topic, by_id.clone(), WITHIN).await?;
        let gone = first_consumer
            .ack(topic, by_id, WITHIN)
            .await
            .expect_err("acked twice");
        ensure!(gone.code() == Code::NotFound, "{gone:?}");
        stats_where(&producer, topic, "empty", |s| {
            s.visible == 0 && s.in_flight == 0
        })
        .await?;

        // RequeueExpired (the original design's call) answers for a topic, NOT_FOUND otherwise.
        let mut q = nodes.client(2);
        let req = api::RequeueExpiredRequest {
            header: None,
            topic: topic.into(),
        };
        q.requeue_expired(timed(req, CALL)).await?;
        let req = api::RequeueExpiredRequest {
            header: None,
            topic: "no-such-topic".into(),
        };
        let e = q
            .requeue_expired(timed(req, CALL))
            .await
            .expect_err("requeued a missing topic");
        ensure!(e.code() == Code::NotFound, "{e:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_id_repeated_within_the_window_publishes_nothing_and_a_retried_request_applies_once()
 {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let nodes = QueueNodes::of(c);
        let (a, b) = (QueueUser::new(&nodes, 1), QueueUser::new(&nodes, 2));
        let topic = "orders";
        let window = ms(2000);
        create(
            &a,
            topic,
            api::TopicSettings {
                dedup_window_ms: window.as_millis() as u64,
                ..Default::default()
            },
        )
        .await?;
        let with_id = |id: &str| api::PublishRequest {
            dedup_id: id.into(),
            ..message(topic, id)
        };
        let started = Instant::now();
        let first = a.publish(with_id("order-1"), WITHIN).await?;
        ensure!(!first.deduplicated);
        // Another client, another node: still the same logical message.
        let repeat = b.publish(with_id("order-1"), WITHIN).await?;
        ensure!(
            repeat.deduplicated && repeat.message_id == first.message_id,
            "{repeat:?}"
        );
        let entry = |id: &str| api::PublishEntry {
            payload: Bytes::from(id.to_string()),
            dedup_id: id.into(),
            ..Default::default()
        };
        let batch = b
            .publish_batch(topic, vec![entry("order-1"), entry("order-2")], WITHIN)
            .await?;
        ensure!(
            batch[0].deduplicated && batch[0].message_id == first.message_id,
            "{batch:?}"
        );
        ensure!(!batch[1].deduplicated, "{batch:?}");
        stats_where(&a, topic, "two messages stored", |s| s.visible == 2).await?;

        // A retried request (same header) is answered with its first answer, on any node.
        let header = api::RequestHeader {
            client_id: rand::random::<u64>() | 1,
            sequence: 1,
            lowest_unacked: 1,
        };
        let retried = api::PublishRequest {
            header: Some(header),
            ..message(topic, "sent twice")
        };
        let one = nodes
            .client(1)
            .publish(timed(retried.clone(), CALL))
            .await?
            .into_inner();
        let two = nodes
            .client(3)
            .publish(timed(retried, CALL))
            .await?
            .into_inner();
        ensure!(one == two, "{one:?} then {two:?}");
        stats_where(&a, topic, "three messages: the retry stored none", |s| {
            s.visible == 3
        })
        .await?;

        // A retried Consume gets the same deliveries, not new ones, wherever it lands.
        let consume = api::ConsumeRequest {
            header: Some(api::RequestHeader {
                sequence: 2,
                lowest_unacked: 2,
                ..header
            }),
            topic: topic.into(),
            max_messages: 10,
            visibility_timeout_ms: 30_000,
            wait_time_ms: 0,
        };
        let mut answers = Vec::new();
        for id in [2, 1] {
            let r = nodes
                .client(id)
                .consume(timed(consume.clone(), CALL))
                .await?;
            answers.push(r.into_inner().deliveries);
        }
        ensure!(answers[0].len() == 3, "{:?}", answers[0]);
        ensure!(
            answers[0] == answers[1],
            "a retried Consume got {:?}",
            answers[1]
        );
        let got = answers.remove(0);

        // Acknowledged messages still de-duplicate within the window.
        for d in &got {
            a.ack(topic, d.receipt.clone(), WITHIN).await?;
        }
        ensure!(
            b.publish(with_id("order-1"), WITHIN).await?.deduplicated,
            "acked message forgotten within the window"
        );

        // After the window, the same dedup_id publishes a new message.
        tokio::time::sleep(window.saturating_sub(started.elapsed()) + ms(200)).await;
        let later = b.publish(with_id("order-1"), WITHIN).await?;
        ensure!(
            !later.deduplicated && later.message_id != first.message_id,
            "{later:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_is_delivered_after_its_delay_and_not_before() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let nodes = QueueNodes::of(c);
        let u = QueueUser::new(&nodes, 2);
        let topic = "later";
        let delay = ms(1500);
        let delayed = u
            .publish(
                api::PublishRequest {
                    delay_ms: delay.as_millis() as u64,
                    ..message(topic, "delayed")
                },
                WITHIN,
            )
            .await?;
        let published = Instant::now();
        u.publish(message(topic, "now"), WITHIN).await?;
        stats_where(&u, topic, "one delayed, one visible", |s| {
            s.delayed == 1 && s.visible == 1
        })
        .await?;

        let now = u.consume(topic, 10, ms(30_000), ZERO, WITHIN).await?;
        ensure!(
            now.len() == 1 && text(&now[0]) == "now",
            "only the undelayed message: {now:?}"
        );
        let later = u
            .consume(topic, 10, ms(30_000), Duration::from_secs(5), WITHIN)
            .await?;
        ensure!(
            later.len() == 1 && later[0].message_id == delayed.message_id,
            "{later:?}"
        );
        ensure!(
            published.elapsed() >= delay.saturating_sub(ms(100)),
            "delivered {:?} after a {delay:?} delay",
            published.elapsed()
        );
        ensure!(
            later[0].first_delivery_unix_ms >= later[0].publish_unix_ms + delay.as_millis() as u64,
            "{later:?}"
        );

        let too_long = u
            .publish(
                api::PublishRequest {
                    delay_ms: 86_400_001,
                    ..message(topic, "never")
                },
                WITHIN,
            )
            .await
            .expect_err("a delay over a day was accepted");
        ensure!(too_long.code() == Code::InvalidArgument, "{too_long:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_one_ordering_key_are_delivered_one_at_a_time_in_publish_order() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let nodes = QueueNodes::of(c);
        let u = QueueUser::new(&nodes, 1);
        let topic = "ordered";
        let keys = ["a", "b", "c"];
        let per_key = 8;
        // Interleaved: a0 b0 c0 free0 a1 b1 c1 free1 ...
        let mut entries = Vec::new();
        for i in 0..per_key {
            for k in keys {
                entries.push(api::PublishEntry {
                    payload: Bytes::from(format!("{k}{i}")),
                    ordering_key: k.into(),
                    ..Default::default()
                });
            }
            entries.push(api::PublishEntry {
                payload: Bytes::from(format!("free{i}")),
                ..Default::default()
            });
        }
        u.publish_batch(topic, entries, WITHIN).await?;

        // One in flight per key: a first consume gets each key's head and every unkeyed one.
        let first = u.consume(topic, 100, ms(30_000), ZERO, WITHIN).await?;
        let mut got: Vec<String> = first.iter().map(text).collect();
        got.sort();
        let mut want: Vec<String> = keys.iter().map(|k| format!("{k}0")).collect();
        want.extend((0..per_key).map(|i| format!("free{i}")));
        want.sort();
        ensure!(got == want, "first consume: {got:?}");
        ensure!(
            u.consume(topic, 100, ms(30_000), ZERO, WITHIN)
                .await?
                .is_empty(),
            "a key's second message went out while its first was in flight"
        );
        for d in &first {
            u.ack(topic, d.receipt.clone(), WITHIN).await?;
        }

        // Three consumers on three nodes hold each message a while before acking; per key,
        // deliveries must come in publish order and never overlap.
        let log: Arc<std::sync::Mutex<Vec<(String, Instant, Instant)>>> = Default::default();
        let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(
            keys.len() * (per_key - 1),
        ));
        let mut tasks = Vec::new();
        for home in [1, 2, 3] {
            let (nodes, log, remaining) = (nodes.clone(), log.clone(), remaining.clone());
            tasks.push(tokio::spawn(async move {
                let u = QueueUser::new(&nodes, home);
                while remaining.load(Ordering::SeqCst) > 0 {
                    let got = u.consume(topic, 10, ms(30_000), ms(500), WITHIN).await?;
                    for d in got {
                        let start = Instant::now();
                        tokio::time::sleep(ms(30)).await;
                        let end = Instant::now();
                        log.lock().unwrap().push((text(&d), start, end));
                        u.ack(topic, d.receipt.clone(), WITHIN).await?;
                        remaining.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .context("consumers did not finish")???;
        }
        let mut by_key: BTreeMap<String, Vec<(usize, Instant, Instant)>> = BTreeMap::new();
        for (payload, start, end) in log.lock().unwrap().iter() {
            let (k, i) = payload.split_at(1);
            by_key
                .entry(k.to_string())
                .or_default()
                .push((i.parse()?, *start, *end));
        }
        for (k, mut seen) in by_key {
            seen.sort_by_key(|s| s.1);
            let order: Vec<usize> = seen.iter().map(|s| s.0).collect();
            ensure!(
                order == (1..per_key).collect::<Vec<_>>(),
                "key {k} delivered in order {order:?}"
            );
            for w in seen.windows(2) {
                ensure!(
                    w[1].1 >= w[0].2,
                    "key {k}: {} delivered while {} was held",
                    w[1].0,
                    w[0].0
                );
            }
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_never_has_more_unacked_messages_than_its_credit_window() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let nodes = QueueNodes::of(c);
        let u = QueueUser::new(&nodes, 1);
        let topic = "stream";
        let total = 12;
        let entries = (0..total)
            .map(|i| api::PublishEntry {
                payload: Bytes::from(format!("s{i}")),
                ..Default::default()
            })
            .collect();
        u.publish_batch(topic, entries, WITHIN).await?;
        let owner = agreed_owner(&nodes, &c.ids(), topic).await?;
        let elsewhere: Vec<u64> = c.ids().into_iter().filter(|&i| i != owner).collect();
        c.note(format!(
            "node {owner} owns {topic}; subscribing through {elsewhere:?}"
        ));

        // Two competing subscribers through non-owner nodes (forwarded), windows 3 and 2.
        let subscribe = |id: u64, window: u32| {
            let mut q = nodes.client(id);
            async move {
                let req = api::QueueSubscribeRequest {
                    topic: topic.into(),
                    max_in_flight: window,
                    visibility_timeout_ms: 30_000,
                };
                anyhow::Ok(q.subscribe(req).await?.into_inner())
            }
        };
        let mut a = subscribe(elsewhere[0], 3).await?;
        let mut b = subscribe(elsewhere[1], 2).await?;
        let mut held: HashMap<&str, Vec<api::Delivery>> = HashMap::new();
        for (name, stream, window) in [("a", &mut a, 3), ("b", &mut b, 2)] {
            for _ in 0..window {
                let d = tokio::time::timeout(Duration::from_secs(5), stream.message())
                    .await
                    .with_context(|| format!("subscriber {name} got less than its window"))??
                    .context("stream ended")?;
                held.entry(name).or_default().push(d);
            }
            let more = tokio::time::timeout(ms(600), stream.message()).await;
            ensure!(
                more.is_err(),
                "subscriber {name} got more than its window of {window}: {more:?}"
            );
        }
        stats_where(&u, topic, "the two windows in flight", |s| {
            s.in_flight == 5 && s.visible == total - 5
        })
        .await?;

        // An ack returns one credit, and the stream sends one more.
        let acked = held
            .get_mut("a")
            .and_then(|v| v.pop())
            .context("a held nothing")?;
        u.ack(topic, acked.receipt.clone(), WITHIN).await?;
        let next = tokio::time::timeout(Duration::from_secs(3), a.message())
            .await
            .context("no delivery after an ack returned a credit")??
            .context("stream ended")?;
        held.entry("a").or_default().push(next);
        ensure!(
            tokio::time::timeout(ms(400), a.message()).await.is_err(),
            "more than one delivery for one credit"
        );

        // Drain: ack everything as it comes; every message exactly once over both streams.
        let mut seen: BTreeSet<String> = [text(&acked)].into();
        let mut pending: Vec<api::Delivery> = held.into_values().flatten().collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < total as usize {
            ensure!(Instant::now() < deadline, "drained only {seen:?}");
            for d in pending.drain(..) {
                ensure!(seen.insert(text(&d)), "{} delivered twice", text(&d));
                u.ack(topic, d.receipt.clone(), WITHIN).await?;
            }
            tokio::select! {
                m = a.message() => pending.extend(m?),
                m = b.message() => pending.extend(m?),
                _ = tokio::time::sleep(ms(500)) => {}
            }
        }
        ensure!(pending.is_empty(), "extra deliveries: {pending:?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_their_history_and_redrive_brings_them_back_and_refusals_name_the_problem()
 {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let nodes = QueueNodes::of(c);
        let u = QueueUser::new(&nodes, 3);
        let (topic, dlq) = ("jobs", "jobs.dlq");
        let settings = api::TopicSettings {
            max_deliveries: 2,
            dead_letter_topic: dlq.into(),
            ..Default::default()
        };
        create(&u, topic, settings.clone()).await?;
        let published = u.publish(message(topic, "poison"), WITHIN).await?;
        for attempt in 1..=2 {
            let got = u
                .consume(topic, 1, ms(30_000), Duration::from_secs(3), WITHIN)
                .await?;
            ensure!(
                got.len() == 1 && got[0].delivery_attempt == attempt,
                "{got:?}"
            );
            u.nack(topic, got[0].receipt.clone(), ZERO, WITHIN).await?;
        }
        stats_where(&u, topic, "one dead-lettered", |s| {
            s.dead_lettered == 1 && s.visible == 0
        })
        .await?;
        let dead = u
            .consume(dlq, 1, ms(30_000), Duration::from_secs(3), WITHIN)
            .await?;
        ensure!(dead.len() == 1, "{dead:?}");
        let d = &dead[0];
        ensure!(d.message_id == published.message_id && d.delivery_attempt == 1);
        let attr = |k: &str| d.attributes.get(k).map(String::as_str);
        ensure!(
            attr("sync.dead_letter.source") == Some(topic)
                && attr("sync.dead_letter.attempts") == Some("2")
                && attr("sync.dead_letter.reason") == Some("max_deliveries_nacked"),
            "{:?}",
            d.attributes
        );

        // Redrive moves visible dead letters back to their source, to be delivered afresh.
        u.nack(dlq, d.receipt.clone(), ZERO, WITHIN).await?;
        let mut q = nodes.client(1);
        let req = api::RedriveRequest {
            header: None,
            dead_letter_topic: dlq.into(),
            destination_topic: String::new(),
            max_messages: 0,
        };
        let moved = q.redrive(timed(req, CALL)).await?.into_inner();
        ensure!(moved.moved == 1, "{moved:?}");
        let back = u.consume(topic, 1, ms(30_000), ZERO, WITHIN).await?;
        ensure!(
            back.len() == 1
                && back[0].message_id == published.message_id
                && back[0].delivery_attempt == 1,
            "{back:?}"
        );
        u.ack(topic, back[0].receipt.clone(), WITHIN).await?;

        // Refusals, each with the documented code.
        let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code());
        let bad_name = u
            .publish(message("bad name!", "x"), WITHIN)
            .await
            .map(|_| ());
        ensure!(code(bad_name) == Some(Code::InvalidArgument));
        let too_many = u.consume(topic, 101, ZERO, ZERO, WITHIN).await.map(|_| ());
        ensure!(code(too_many) == Some(Code::InvalidArgument));
        let mut reserved = message(topic, "x");
        reserved.attributes.insert("sync.mine".into(), "1".into());
        let reserved = u.publish(reserved, WITHIN).await.map(|_| ());
        ensure!(code(reserved) == Some(Code::InvalidArgument));
        let receipt = Some(api::Receipt {
            message_id: "00000000000000000001-000".into(),
            delivery_attempt: 1,
        });
        let no_topic = u.ack("no-such-topic", receipt.clone(), WITHIN).await;
        ensure!(code(no_topic) == Some(Code::NotFound));
        let no_message = u.ack(topic, receipt.clone(), WITHIN).await;
        ensure!(code(no_message) == Some(Code::NotFound));
        let zero = u.extend(topic, receipt, ZERO, WITHIN).await.map(|_| ());
        ensure!(code(zero) == Some(Code::InvalidArgument));
        let other = api::TopicSettings {
            max_deliveries: 3,
            ..settings
        };
        let exists = u.create_topic(topic, other, WITHIN).await.map(|_| ());
        ensure!(code(exists) == Some(Code::AlreadyExists));
        let req = api::DeleteTopicRequest {
            header: None,
            name: dlq.into(),
        };
        let in_use = q.delete_topic(timed(req, CALL)).await.map(|_| ());
        ensure!(code(in_use) == Some(Code::FailedPrecondition));

        // A retention limit refuses the publish; nothing is dropped silently.
        let small = "small";
        create(
            &u,
            small,
            api::TopicSettings {
                retention_max_messages: 2,
                ..Default::default()
            },
        )
        .await?;
        let first_published = Instant::now();
        for i in 0..2 {
            u.publish(message(small, &format!("{i}")), WITHIN).await?;
        }
        let full = u.publish(message(small, "2"), WITHIN).await.map(|_| ());
        ensure!(code(full) == Some(Code::ResourceExhausted));
        // Stats: the oldest message ages while nothing is written.
        tokio::time::sleep(ms(500)).await;
        stats_where(&u, small, "two messages, the oldest aging", |s| {
            let age = first_published.elapsed().saturating_sub(ms(100));
            s.visible == 2 && s.oldest_age_ms >= age.as_millis() as u64 && s.publish_rate > 0.0
        })
        .await?;

        // Reads: a follower's stale list and the leader's linearizable one agree.
        for consistency in [api::Consistency::Stale, api::Consistency::Linearizable] {
            let req = api::ListTopicsRequest {
                consistency: consistency as i32,
                ..Default::default()
            };
            let mut names: Vec<String> = nodes
                .client(2)
                .list_topics(timed(req, CALL))
                .await?
                .into_inner()
                .topics
                .into_iter()
                .map(|t| t.name)
                .collect();
            names.sort();
            ensure!(names == [topic, dlq, small], "{consistency:?}: {names:?}");
        }
        let req = api::PurgeRequest {
            header: None,
            topic: small.into(),
        };
        ensure!(q.purge(timed(req, CALL)).await?.into_inner().purged == 2);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_moves_when_the_owner_stops_and_consuming_continues_and_it_moves_back() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let nodes = QueueNodes::of(c);
        let u = QueueUser::new(&nodes, 1);
        let topic = "moving";
        let held = u.publish(message(topic, "held"), WITHIN).await?;
        let owner = agreed_owner(&nodes, &c.ids(), topic).await?;
        // Consumed (through whichever node) and never acked: in flight when the owner dies.
        let got = u.consume(topic, 1, ms(1500), ZERO, WITHIN).await?;
        ensure!(got.len() == 1, "{got:?}");

        c.kill9(owner).await?;
        let survivors: Vec<u64> = c.ids().into_iter().filter(|&i| i != owner).collect();
        let new_owner = eventually(
            "the survivors to name a new owner",
            Duration::from_secs(10),
            async || {
                let o = agreed_owner(&nodes, &survivors, topic).await?;
                ensure!(o != owner, "still {o}");
                Ok(o)
            },
        )
        .await?;
        c.note(format!(
            "node {owner} owned {topic}; node {new_owner} took over"
        ));

        // Consuming continues: a new message, and the dead owner's in-flight one at attempt 2.
        let fresh = u.publish(message(topic, "fresh"), WITHIN).await?;
        let mut seen = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.len() < 2 {
            ensure!(
                Instant::now() < deadline,
                "after the move, consumed only {seen:?}"
            );
            for d in u.consume(topic, 10, ms(30_000), ms(1000), WITHIN).await? {
                u.ack(topic, d.receipt.clone(), WITHIN).await?;
                seen.insert(d.message_id.clone(), d.delivery_attempt);
            }
        }
        ensure!(seen.get(&held.message_id) == Some(&2), "{seen:?}");
        ensure!(seen.get(&fresh.message_id) == Some(&1), "{seen:?}");

        // A subscription served by the new owner ends, naming the old owner, once it is back.
        let mut q = nodes.client(new_owner);
        let req = api::QueueSubscribeRequest {
            topic: topic.into(),
            ..Default::default()
        };
        let mut sub = q.subscribe(req).await?.into_inner();
        c.restart(owner).await?;
        nodes.reconnect(owner, c.address(owner));
        let back = agreed_owner(&nodes, &c.ids(), topic).await?;
        ensure!(
            back == owner,
            "ownership went to {back}, not back to {owner}"
        );
        let ended = tokio::time::timeout(Duration::from_secs(5), sub.message())
            .await
            .context("the subscription outlived its ownership")?;
        let status = ended.expect_err("a delivery instead of the end of the stream");
        ensure!(
            status.code() == Code::Unavailable && leader_hint(&status) == Some(owner),
            "{status:?}"
        );
        Ok(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// At least once under failures

/// Messages published in the big test.
const MESSAGES: usize = 10_000;
/// Messages per PublishBatch.
const BATCH: usize = 100;
/// Every this many messages one is a poison message, which consumers always nack.
const POISON_EVERY: usize = 101;
/// Deliveries before a message is dead-lettered.
const MAX_DELIVERIES: u32 = 4;
/// Visibility timeout of a consumed message: how soon a crashed consumer's messages come back.
const VISIBILITY: Duration = Duration::from_secs(2);
/// Chance that a consumer "crashes" after receiving a batch: it drops the batch unacked and
/// starts again as a new client.
const CRASH_CHANCE: f64 = 0.03;

fn is_poison(payload: &str) -> bool {
    payload
        .strip_prefix('m')
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n % POISON_EVERY == 0)
}

/// Publishes batches `first, first + step, ...` of the big test, recording acknowledged ids.
async fn publisher(
    nodes: QueueNodes,
    home: u64,
    first: usize,
    step: usize,
    ledger: QueueLedger,
) -> anyhow::Result<()> {
    let u = QueueUser::new(&nodes, home);
    for b in (first..MESSAGES / BATCH).step_by(step) {
        let payloads: Vec<String> = (b * BATCH..(b + 1) * BATCH)
            .map(|i| format!("m{i}"))
            .collect();
        let entries = payloads
            .iter()
            .map(|p| api::PublishEntry {
                payload: Bytes::from(p.clone()),
                ..Default::default()
            })
            .collect();
        let results = u
            .publish_batch("work", entries, Duration::from_secs(40))
            .await
            .with_context(|| format!("publishing batch {b}"))?;
        ensure!(results.len() == BATCH, "{} results", results.len());
        ledger.with(|l| {
            for (r, p) in results.into_iter().zip(payloads) {
                l.published.insert(r.message_id, p);
            }
        });
        tokio::time::sleep(ms(150)).await;
    }
    Ok(())
}

/// Consumes `work` through node `home` until `stop`: acks, nacks poison, and sometimes crashes.
async fn consumer(
    nodes: QueueNodes,
    home: u64,
    index: usize,
    ledger: QueueLedger,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut u = QueueUser::new(&nodes, home);
    while !stop.load(Ordering::SeqCst) {
        let batch = match u
            .consume("work", 25, VISIBILITY, ms(500), Duration::from_secs(30))
            .await
        {
            Ok(b) => b,
            Err(s) => bail!("consumer {index}: {s:?}"),
        };
        ledger.with(|l| {
            l.deliveries.extend(batch.iter().map(|d| Seen {
                id: d.message_id.clone(),
                payload: text(d),
                attempt: d.delivery_attempt,
                consumer: index,
            }))
        });
        if !batch.is_empty() && rand::random::<f64>() < CRASH_CHANCE {
            ledger.with(|l| l.dropped += batch.len() as u64);
            u = QueueUser::new(&nodes, home);
            continue;
        }
        let answers = futures::future::join_all(batch.iter().map(|d| {
            let u = &u;
            async move {
                let within = Duration::from_secs(30);
                let r = if is_poison(&text(d)) {
                    u.nack("work", d.receipt.clone(), ZERO, within).await
                } else {
                    u.ack("work", d.receipt.clone(), within).await
                };
                (d, r)
            }
        }))
        .await;
        ledger.with(|l| -> anyhow::Result<()> {
            for (d, r) in answers {
                match r {
                    Ok(()) if !is_poison(&text(d)) => {
                        l.acked.insert(d.message_id.clone());
                    }
                    Ok(()) => {}
                    Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {
                        l.ack_refused += 1
                    }
                    Err(s) => bail!("consumer {index}: ack of {}: {s:?}", d.message_id),
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Empties the dead-letter topic until `stop`, recording what it finds.
async fn dead_letter_reader(
    nodes: QueueNodes,
    ledger: QueueLedger,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let u = QueueUser::new(&nodes, 3);
    while !stop.load(Ordering::SeqCst) {
        let batch = u
            .consume("work.dlq", 50, ms(30_000), ms(500), Duration::from_secs(30))
            .await?;
        for d in batch {
            let mut attributes: BTreeMap<String, String> =
                d.attributes.clone().into_iter().collect();
            attributes.insert("payload".into(), text(&d));
            ledger.with(|l| l.dead.insert(d.message_id.clone(), attributes));
            match u
                .ack("work.dlq", d.receipt.clone(), Duration::from_secs(30))
                .await
            {
                Ok(()) => {}
                Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {}
                Err(s) => bail!("ack of dead letter {}: {s:?}", d.message_id),
            }
        }
    }
    Ok(())
}

/// Kills node `id` (SIGKILL), waits a moment, and starts it again.
async fn kill_and_restart(c: &mut Cluster, nodes: &QueueNodes, id: u64) -> anyhow::Result<()> {
    c.kill9(id).await?;
    tokio::time::sleep(ms(1000)).await;
    c.restart(id).await?;
    nodes.reconnect(id, c.address(id));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_are_all_acked_or_dead_lettered_while_the_leader_and_the_owner_are_killed()
 {
    scenario(3, Options::default(), Duration::from_secs(120), async |c| {
        let started = Instant::now();
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let nodes = QueueNodes::of(c);
        let admin = QueueUser::new(&nodes, 1);
        create(
            &admin,
            "work",
            api::TopicSettings {
                visibility_timeout_ms: VISIBILITY.as_millis() as u64,
                max_deliveries: MAX_DELIVERIES,
                dead_letter_topic: "work.dlq".into(),
                ..Default::default()
            },
        )
        .await?;
        let ledger = QueueLedger::default();
        let stop = Arc::new(AtomicBool::new(false));
        let ids = c.ids();
        let publishers: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, &home)| {
                tokio::spawn(publisher(nodes.clone(), home, i, ids.len(), ledger.clone()))
            })
            .collect();
        let mut consumers = Vec::new();
        for &home in &ids {
            for _ in 0..2 {
                let index = consumers.len();
                consumers.push(tokio::spawn(consumer(
                    nodes.clone(),
                    home,
                    index,
                    ledger.clone(),
                    stop.clone(),
                )));
            }
        }
        let reader = tokio::spawn(dead_letter_reader(
            nodes.clone(),
            ledger.clone(),
            stop.clone(),
        ));
        let published = || ledger.with(|l| l.published.len());

        // Kill the leader a fifth of the way in, and the topic's owner past the middle.
        eventually(
            "2000 messages published",
            Duration::from_secs(30),
            async || {
                ensure!(published() >= 2_000, "{}", published());
                Ok(())
            },
        )
        .await?;
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        c.note(format!("killing the leader, node {}", leader.id));
        kill_and_restart(c, &nodes, leader.id).await?;
        eventually(
            "6000 messages published",
            Duration::from_secs(40),
            async || {
                ensure!(published() >= 6_000, "{}", published());
                Ok(())
            },
        )
        .await?;
        // The owner, as a follower: the leader was killed already, and an owner that is not
        // the leader is the case where deliveries go through another node.
        let owner = admin.stats("work", WITHIN).await?.owner_node_id;
        let mut leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        if leader.id == owner {
            let target = ids.iter().copied().find(|&i| i != owner).unwrap_or(0);
            let req = sync_tests::api::TransferLeaderRequest {
                header: None,
                target_id: target,
            };
            c.client(owner).transfer_leader(req).await?;
            leader = c
                .wait_for_leader_where(
                    Duration::from_secs(5),
                    "a leader other than the owner",
                    |l| l.id != owner,
                )
                .await?;
        }
        c.note(format!(
            "killing the owner of work, node {owner} (the leader is node {})",
            leader.id
        ));
        kill_and_restart(c, &nodes, owner).await?;

        for p in publishers {
            p.await??;
        }
        c.note(format!("all {} messages published", published()));
        ensure!(published() == MESSAGES, "published {}", published());
        // Until every message is acked or dead-lettered; a consumer that fails ends the test
        // with its error.
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            if let Some(i) = consumers.iter().position(|t| t.is_finished()) {
                consumers.remove(i).await??;
                bail!("a consumer stopped before the end");
            }
            let left = ledger.outstanding();
            if left == 0 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{left} messages neither acked nor dead-lettered 45 s after the last publish"
            );
            tokio::time::sleep(ms(100)).await;
        }
        c.note("every message acked or dead-lettered");
        stop.store(true, Ordering::SeqCst);
        for t in consumers {
            t.await??;
        }
        reader.await??;

        // Nothing lost, nothing invented; poison went to the dead-letter topic with its history.
        let report = ledger.with(|l| -> anyhow::Result<String> {
            let mut per_message: BTreeMap<&str, usize> = BTreeMap::new();
            for d in &l.deliveries {
                ensure!(
                    l.published.get(&d.id) == Some(&d.payload),
                    "delivered {} ({}) to consumer {}, which was never published",
                    d.id,
                    d.payload,
                    d.consumer
                );
                ensure!(d.attempt >= 1 && d.attempt <= MAX_DELIVERIES, "{d:?}");
                *per_message.entry(&d.id).or_default() += 1;
            }
            let poison: BTreeSet<&String> = l
                .published
                .iter()
                .filter(|(_, p)| is_poison(p))
                .map(|(id, _)| id)
                .collect();
            for (id, attributes) in &l.dead {
                let payload = attributes.get("payload").map(String::as_str).unwrap_or("");
                ensure!(
                    l.published.contains_key(id),
                    "dead letter {id} never published"
                );
                ensure!(
                    attributes
                        .get("sync.dead_letter.source")
                        .map(String::as_str)
                        == Some("work")
                        && attributes
                            .get("sync.dead_letter.attempts")
                            .map(String::as_str)
                            == Some("4"),
                    "dead letter {id} ({payload}): {attributes:?}"
                );
                ensure!(!l.acked.contains(id), "{id} acked and dead-lettered");
            }
            for id in &poison {
                ensure!(l.dead.contains_key(*id), "poison {id} not dead-lettered");
            }
            let (mut deliveries, mut duplicates) = (0, 0);
            for (id, n) in &per_message {
                if !poison.contains(&id.to_string()) {
                    deliveries += n;
                    duplicates += n - 1;
                }
            }
            Ok(format!(
                "{} published, {} acked, {} dead-lettered ({} poison); {deliveries} deliveries of \
                 ordinary messages: {duplicates} duplicates ({} delivered to consumers that \
                 crashed, {} acks refused as stale)",
                l.published.len(),
                l.acked.len(),
                l.dead.len(),
                poison.len(),
                l.dropped,
                l.ack_refused
            ))
        })?;
        c.note(&report);
        eprintln!("{report}");

        for topic in ["work", "work.dlq"] {
            eventually(
                &format!("{topic} to be empty"),
                Duration::from_secs(10),
                async || {
                    let s = admin.stats(topic, WITHIN).await?;
                    ensure!(s.visible + s.in_flight + s.delayed == 0, "{s:?}");
                    Ok(())
                },
            )
            .await?;
        }
        c.note(format!("done in {:?}", started.elapsed()));
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_create_off_a_missing_topic_is_not_found_everywhere_and_only_create_topic_makes_one()
 {
    let options = Options {
        extra_args: vec!["--queue-auto-create".into(), "false".into()],
        ..Options::default()
    };
    scenario(3, options, Duration::from_secs(60), async |c| {
        c.wait_for_leader(Duration::from_secs(5)).await?;
        let nodes = QueueNodes::of(c);
        let topic = "declared-only";
        for id in c.ids() {
            let u = QueueUser::new(&nodes, id);
            let refused = u.publish(message(topic, "early"), WITHIN).await;
            ensure!(
                matches!(&refused, Err(s) if s.code() == Code::NotFound),
                "publish through node {id}: {refused:?}"
            );
            let batch = vec![api::PublishEntry {
                payload: Bytes::from_static(b"early"),
                ..Default::default()
            }];
            let refused = u.publish_batch(topic, batch, WITHIN).await;
            ensure!(
                matches!(&refused, Err(s) if s.code() == Code::NotFound),
                "publish batch through node {id}: {refused:?}"
            );
            // A long poll on a missing topic answers at once instead of waiting it out.
            let long_poll = Duration::from_secs(30);
            let started = Instant::now();
            let refused = u.consume(topic, 1, ms(5_000), long_poll, WITHIN).await;
            ensure!(
                matches!(&refused, Err(s) if s.code() == Code::NotFound),
                "consume through node {id}: {refused:?}"
            );
            ensure!(
                started.elapsed() < long_poll,
                "consume through node {id} waited out its long poll ({:?})",
                started.elapsed()
            );
            let mut q = nodes.client(id);
            let req = api::QueueSubscribeRequest {
                topic: topic.into(),
                max_in_flight: 1,
                visibility_timeout_ms: 5_000,
            };
            let ended = match q.subscribe(timed(req, WITHIN)).await {
                Err(s) => s,
                Ok(stream) => match stream.into_inner().message().await {
                    Err(s) => s,
                    Ok(m) => bail!("subscribe through node {id} yielded {m:?}"),
                },
            };
            ensure!(
                ended.code() == Code::NotFound,
                "subscribe through node {id}: {ended:?}"
            );
        }
        let u = QueueUser::new(&nodes, 2);
        let listed = u
            .retry(WITHIN, CALL, |mut q, t| async move {
                q.list_topics(timed(api::ListTopicsRequest::default(), t))
                    .await
            })
            .await?;
        ensure!(
            listed.topics.is_empty(),
            "a refused call created a topic: {listed:?}"
        );

        create(&u, topic, api::TopicSettings::default()).await?;
        let published = u.publish(message(topic, "after create"), WITHIN).await?;
        let got = u
            .consume(topic, 1, ms(30_000), Duration::from_secs(5), WITHIN)
            .await?;
        ensure!(
            got.len() == 1 && got[0].message_id == published.message_id,
            "{got:?}"
        );
        u.ack(topic, got[0].receipt.clone(), WITHIN).await?;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_batch_through_a_follower_acks_each_receipt_once_and_a_retry_gets_the_same_outcomes()
{
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        let follower = c
            .ids()
            .into_iter()
            .find(|&i| i != leader.id)
            .context("a follower")?;
        let nodes = QueueNodes::of(c);
        let u = QueueUser::new(&nodes, follower);
        let topic = "batched-acks";
        let entries = (0..5)
            .map(|i| api::PublishEntry {
                payload: Bytes::from(format!("m{i}")),
                ..Default::default()
            })
            .collect();
        u.publish_batch(topic, entries, WITHIN).await?;
        let mut got = Vec::new();
        while got.len() < 5 {
            let more = u
                .consume(topic, 5, ms(60_000), Duration::from_secs(5), WITHIN)
                .await?;
            ensure!(!more.is_empty(), "only {} of 5 delivered", got.len());
            got.extend(more);
        }
        let mut receipts: Vec<api::Receipt> =
            got.iter().filter_map(|d| d.receipt.clone()).collect();
        // A receipt naming an attempt that never happened is refused without stopping the
        // others; an unknown message likewise.
        let mut stale = receipts[0].clone();
        stale.delivery_attempt += 1;
        receipts.insert(0, stale);
        receipts.push(api::Receipt {
            message_id: "no-such-message".into(),
            delivery_attempt: 1,
        });
        let request = api::AckBatchRequest {
            header: Some(api::RequestHeader {
                client_id: rand::random::<u64>() | 1,
                sequence: 1,
                lowest_unacked: 1,
            }),
            topic: topic.into(),
            receipts,
        };
        let first = u
            .retry(WITHIN, CALL, |mut q, t| {
                let r = timed(request.clone(), t);
                async move { q.ack_batch(r).await }
            })
            .await?;
        let codes: Vec<i32> = first.results.iter().map(|r| r.code).collect();
        ensure!(
            codes
                == [
                    Code::FailedPrecondition as i32,
                    0,
                    0,
                    0,
                    0,
                    0,
                    Code::NotFound as i32
                ],
            "outcomes {codes:?}: {first:?}"
        );
        ensure!(first.acked == 5, "{first:?}");
        // The same request again (a retry after a lost answer) is answered from the dedup
        // record: the same outcomes, nothing acked twice.
        let again = u
            .retry(WITHIN, CALL, |mut q, t| {
                let r = timed(request.clone(), t);
                async move { q.ack_batch(r).await }
            })
            .await?;
        ensure!(
            again == first,
            "the retry answered {again:?}, the first {first:?}"
        );
        stats_where(&u, topic, "all acknowledged", |s| {
            s.in_flight == 0 && s.visible == 0
        })
        .await?;
        let empty = api::AckBatchRequest {
            header: None,
            topic: topic.into(),
            receipts: Vec::new(),
        };
        let refused = u
            .retry(WITHIN, CALL, |mut q, t| {
                let r = timed(empty.clone(), t);
                async move { q.ack_batch(r).await }
            })
            .await;
        ensure!(
            matches!(&refused, Err(s) if s.code() == Code::InvalidArgument),
            "{refused:?}"
        );
        Ok(())
    })
    .await;
}
