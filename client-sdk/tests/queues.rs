//! The SDK's queue calls against a real 3-node cluster of `syncd` processes: publish (single,
//! batch, de-duplicated, delayed), consume with long poll, ack, nack, extend, a stale receipt as
//! a typed error, ack_batch with an outcome per receipt, the Stream interface, and a publish
//! that survives the leader being killed.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, ensure};
use futures::StreamExt;
use sync_client::{Error, OutgoingMessage};
use sync_tests::{Options, scenario};

const LIMIT: Duration = Duration::from_secs(60);

mod common;
use common::client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_ack_nack_and_extend() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let client = client(c).await?;
        let p = client.publish("jobs", "first").await?;
        ensure!(!p.deduplicated);
        let again = client
            .publish("jobs", OutgoingMessage::new("dup").dedup_id("d-1"))
            .await?;
        let repeat = client
            .publish("jobs", OutgoingMessage::new("dup").dedup_id("d-1"))
            .await?;
        ensure!(repeat.deduplicated && repeat.message_id == again.message_id);
        let batch = client.publish_batch("jobs", ["b1", "b2", "b3"]).await?;
        ensure!(batch.len() == 3);

        let consumer = client
            .consumer("jobs")
            .batch(10)
            .visibility(Duration::from_secs(30))
            .wait(Duration::from_secs(2));
        let got = consumer.receive().await?;
        let payloads: Vec<&[u8]> = got.iter().map(|d| d.payload()).collect();
        ensure!(
            payloads == [b"first".as_slice(), b"dup", b"b1", b"b2", b"b3"],
            "deliveries in publish order: {payloads:?}"
        );
        // Give one back, extend another, ack the rest.
        got[0].nack(Duration::ZERO).await?;
        got[1].extend(Duration::from_secs(60)).await?;
        let outcomes = client.ack_batch(&got[2..]).await?;
        ensure!(
            outcomes.len() == 3 && outcomes.iter().all(Result::is_ok),
            "ack_batch of three current receipts: {outcomes:?}"
        );
        let redelivered = consumer.receive().await?;
        ensure!(
            redelivered.len() == 1,
            "only the nacked message: {redelivered:?}"
        );
        ensure!(redelivered[0].message_id() == got[0].message_id());
        ensure!(redelivered[0].attempt() == got[0].attempt() + 1);
        // The first delivery's receipt is stale now.
        match got[0].ack().await {
            Err(Error::FailedPrecondition { .. }) => {}
            other => anyhow::bail!("a stale receipt was not refused: {other:?}"),
        }
        // A batch mixing topics is refused before anything is sent.
        let elsewhere = client.delivery("other-topic", "1", 1);
        match client.ack_batch(&[redelivered[0].clone(), elsewhere]).await {
            Err(Error::InvalidArgument { .. }) => {}
            other => anyhow::bail!("ack_batch across topics: {other:?}"),
        }
        // In a batch, each receipt gets the outcome its own ack would have.
        let outcomes = client
            .ack_batch(&[got[0].clone(), redelivered[0].clone(), got[1].clone()])
            .await?;
        ensure!(
            matches!(
                outcomes.as_slice(),
                [Err(Error::FailedPrecondition { .. }), Ok(()), Ok(())]
            ),
            "ack_batch with a stale receipt first: {outcomes:?}"
        );
        let stats = client.topic_stats("jobs").await?;
        ensure!(format!("{stats:?}").contains("topic: \"jobs\""));
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_consumer_gets_every_message_and_publishes_survive_a_leader_kill() {
    scenario(3, Options::default(), LIMIT, async |c| {
        let client = client(c).await?;
        let mut published = BTreeSet::new();
        for i in 0..20 {
            published.insert(client.publish("work", format!("m{i}")).await?.message_id);
        }
        let leader = c.wait_for_leader(Duration::from_secs(5)).await?;
        c.kill9(leader.id).await?;
        for i in 20..40 {
            published.insert(
                client
                    .publish("work", format!("m{i}"))
                    .await
                    .with_context(|| format!("publish m{i} after the leader died"))?
                    .message_id,
            );
        }
        ensure!(
            published.len() == 40,
            "a retried publish stored twice or lost"
        );
        let mut stream = Box::pin(
            client
                .consumer("work")
                .batch(16)
                .wait(Duration::from_secs(1))
                .stream(),
        );
        let mut acked = BTreeSet::new();
        while acked.len() < published.len() {
            let d = tokio::time::timeout(Duration::from_secs(20), stream.next())
                .await
                .context("no delivery within 20 s")?
                .context("the stream ended")??;
            d.ack().await?;
            acked.insert(d.message_id().to_string());
        }
        ensure!(acked == published);
        Ok(())
    })
    .await;
}
