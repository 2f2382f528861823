//! `syncctl bench queue`: messages published, or published, consumed and acknowledged.
//!
//! Three modes (`--mode`), one per invocation, so that every figure in a report means one
//! thing:
//! - `publish`: an operation is one Publish of one message; the latency is the call's.
//! - `publish-batch`: an operation is one PublishBatch of `--batch` messages; each message
//!   counts, with the batch call's latency, so ops/s is messages per second.
//! - `end-to-end`: an operation is a round: the client publishes a batch, then consumes (long
//!   poll, at most the batch per call) until it has received as many messages as it published,
//!   and acknowledges each consume's messages before the next consume. Each received message
//!   counts once, with its delivery latency: from the start of the publish that carried it to
//!   its arrival at a consumer. The publish's start is stamped in the payload's first 8 bytes
//!   (nanoseconds since the run's epoch, one process, one monotonic clock), so a message
//!   consumed by another client of a shared topic is timed as well as one's own.
//!
//! Why a round cannot starve: a client consumes only after publishing, and never more than it
//! published in the round, so while a client of a topic still waits for messages, the topic
//! holds at least that many that nobody else will take. A round that an error cuts short
//! leaves its messages in the topic: the check after the run counts them.
//!
//! Topics: `--topics K` shared topics (client i uses topic i mod K), or one per client. Each
//! target creates them before the clock starts (syncd: chosen so that their owners are spread
//! evenly over the nodes; Redis: a stream and a consumer group each) and deletes them after
//! the check.
//!
//! The check after the run: publish modes: every acknowledged publish is stored (a target that
//! acknowledges messages it does not keep cannot post a good number); end-to-end: every
//! message published was consumed, and nothing is left in the topics, visible or unacked.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use futures::future::join_all;
use serde::Serialize;
use tokio::time::Instant;

use super::driver::{Call, Done, Worker};
use super::summary::Summary;
use super::syncd::SyncdQueue;
use super::{Peer, Run, ensure_progress, print_results, timing};
use crate::args::{BenchQueueArgs, GlobalOpts, QueueMode};

/// How long one consume call waits for a message (long poll).
const CONSUME_WAIT: Duration = Duration::from_millis(1_000);
/// The visibility timeout of every delivery: far longer than a round, so no message is
/// delivered twice during the run.
pub const VISIBILITY: Duration = Duration::from_secs(300);
/// How long a round waits, in consecutive empty consumes, for messages it published before it
/// gives up and reports an error.
const EMPTY_POLLS_BEFORE_GIVING_UP: u32 = 30;
/// How long the check after a run waits for the topics' counts to settle.
const SETTLE: Duration = Duration::from_secs(10);

/// A system `bench queue` can load.
pub trait QueueTarget: Send + Sync + 'static {
    type Client: QueueClient;

    /// Creates `count` topics (streams) for this run, named from `prefix`; returns their names.
    fn create_topics(
        &self,
        prefix: &str,
        count: usize,
    ) -> impl Future<Output = anyhow::Result<Vec<String>>> + Send;

    /// A new client, with its own identity and connection, using `topic`.
    fn client(
        &self,
        index: usize,
        topic: &str,
    ) -> impl Future<Output = anyhow::Result<Self::Client>> + Send;

    /// The member publishes go to, `host:port`.
    fn endpoint(&self) -> String;

    /// Messages `topic` holds, in any state (publish modes' check).
    fn stored(&self, topic: &str) -> impl Future<Output = Result<u64, String>> + Send;

    /// Messages of `topic` not yet consumed and acknowledged (end-to-end's check).
    fn outstanding(&self, topic: &str) -> impl Future<Output = Result<u64, String>> + Send;

    /// Deletes the run's topics.
    fn delete_topics(&self, topics: &[String]) -> impl Future<Output = Result<(), String>> + Send;
}

/// One delivered message, as the workload sees it.
pub struct Received<H> {
    pub payload: Bytes,
    /// What acknowledging it takes (syncd: its receipt; Redis: its entry id).
    pub handle: H,
}

/// One client's connection and topic.
pub trait QueueClient: Send + 'static {
    type Handle: Send;

    /// Publishes `payloads` to the client's topic: one message per call, or a batch.
    fn publish(&mut self, payloads: Vec<Bytes>) -> impl Future<Output = Call<()>> + Send;

    /// Receives up to `max` messages, waiting up to `wait` for the first.
    fn consume(
        &mut self,
        max: u32,
        wait: Duration,
    ) -> impl Future<Output = Call<Vec<Received<Self::Handle>>>> + Send;

    /// Acknowledges deliveries (syncd: one Ack each, concurrently; Redis: one XACK).
    fn ack(&mut self, handles: Vec<Self::Handle>) -> impl Future<Output = Call<()>> + Send;
}

/// One target's measured phase and its check.
#[derive(Serialize)]
struct Measured {
    #[serde(flatten)]
    summary: Summary,
    check: Check,
}

impl AsRef<Summary> for Measured {
    fn as_ref(&self) -> &Summary {
        &self.summary
    }
}

/// What the check after a run found.
#[derive(Serialize, Debug, Default, PartialEq)]
struct Check {
    /// Messages whose publish was acknowledged (warm-up included).
    published: u64,
    /// Messages received by a consumer (end-to-end; warm-up included).
    consumed: u64,
    /// Publish modes: messages the topics hold. End-to-end: messages left unconsumed or
    /// unacknowledged.
    in_topics: u64,
    /// Whether the counts are what a target that keeps and delivers every message shows.
    passed: bool,
    /// Why not, in words.
    problem: Option<String>,
    /// Whether the run's topics (streams) were deleted.
    cleaned_up: bool,
}

impl Check {
    /// Judges the counts. A failed publish may still have been applied (its answer lost), so
    /// after errors the topics may hold more than was acknowledged, never less.
    fn judge(mode: QueueMode, published: u64, consumed: u64, in_topics: u64, errors: u64) -> Self {
        let problem = match mode {
            QueueMode::Publish | QueueMode::PublishBatch => {
                if in_topics < published {
                    Some(format!(
                        "{} acknowledged message(s) are missing: {published} acknowledged, \
                         {in_topics} stored",
                        published - in_topics
                    ))
                } else if in_topics > published && errors == 0 {
                    Some(format!(
                        "{in_topics} stored but only {published} published, with no error"
                    ))
                } else {
                    None
                }
            }
            QueueMode::EndToEnd => {
                if in_topics > 0 {
                    Some(format!(
                        "{in_topics} message(s) left unconsumed or unacknowledged"
                    ))
                } else if consumed != published && errors == 0 {
                    Some(format!(
                        "{published} published but {consumed} consumed, with no error"
                    ))
                } else {
                    None
                }
            }
        };
        Check {
            published,
            consumed,
            in_topics,
            passed: problem.is_none(),
            problem,
            cleaned_up: false,
        }
    }
}

#[derive(Serialize)]
struct WorkloadJson {
    /// "publish", "publish-batch" or "end-to-end".
    mode: &'static str,
    clients: u32,
    connections: u32,
    duration_secs: f64,
    warmup_secs: f64,
    /// Messages per publish call (1 in publish mode).
    batch: u32,
    payload_bytes: u32,
    topics: usize,
    /// What ops counts: always messages.
    unit: &'static str,
}

fn mode_name(mode: QueueMode) -> &'static str {
    match mode {
        QueueMode::Publish => "publish",
        QueueMode::PublishBatch => "publish-batch",
        QueueMode::EndToEnd => "end-to-end",
    }
}

pub async fn run(global: &GlobalOpts, args: &BenchQueueArgs) -> anyhow::Result<()> {
    let load = &args.load;
    let run = Run::new(global, load, "msgs");
    run.only_peer("queue", Peer::Redis)?;
    let batch = match args.mode {
        QueueMode::Publish => 1,
        QueueMode::PublishBatch | QueueMode::EndToEnd => args.batch,
    };
    let topics = match args.topics {
        0 => load.clients as usize,
        k => k as usize,
    };
    let view = run.cluster(global).await?;
    run.announce(&view);
    let syncd = SyncdQueue::connect(&view, load.connections as usize, global.timeout).await?;
    let redis = run.redis(global).await?;
    let plan = Plan {
        run: &run,
        mode: args.mode,
        batch,
        topics,
        filler: Bytes::from(
            (0..args.payload_bytes.saturating_sub(8))
                .map(|_| rand::random::<u8>())
                .collect::<Vec<_>>(),
        ),
        // Random per invocation: topics of different runs never meet.
        prefix: format!("syncctl-bench-{:08x}", rand::random::<u32>()),
        epoch: std::time::Instant::now(),
    };

    let mut results = vec![plan.measure("syncd", &syncd).await?];
    if let Some(redis) = &redis {
        results.push(plan.measure("redis", redis).await?);
    }
    let workload = WorkloadJson {
        mode: mode_name(args.mode),
        clients: load.clients,
        connections: load.connections,
        duration_secs: load.duration.as_secs_f64(),
        warmup_secs: load.warmup.as_secs_f64(),
        batch,
        payload_bytes: args.payload_bytes,
        topics,
        unit: "messages",
    };
    let describe = || {
        let what = match args.mode {
            QueueMode::Publish => "one Publish per message (XADD); latency per call".to_owned(),
            QueueMode::PublishBatch => format!(
                "PublishBatch of {batch} (pipelined XADDs); every message counts, with its \
                 batch's latency"
            ),
            QueueMode::EndToEnd => format!(
                "rounds of publish {batch}, consume them (long poll), ack (XADD, XREADGROUP, \
                 XACK); latency from publish start to delivery, per message"
            ),
        };
        format!(
            "{} client(s) on {topics} topic(s), {}-byte messages, {what}; {}; ops are messages",
            load.clients,
            args.payload_bytes,
            timing(load)
        )
    };
    print_results(global.output, workload, describe, &results)?;
    if run.people {
        for m in &results {
            let c = &m.check;
            eprintln!(
                "check on {}: {} published, {} consumed, {} in topics: {}{}",
                m.summary.target,
                c.published,
                c.consumed,
                c.in_topics,
                c.problem.as_deref().unwrap_or("ok"),
                if c.cleaned_up {
                    ""
                } else {
                    " (topics NOT deleted)"
                }
            );
        }
    }
    for m in &results {
        ensure_progress(&m.summary, "message")?;
        if let Some(problem) = &m.check.problem {
            bail!("check on {} failed: {problem}", m.summary.target);
        }
    }
    Ok(())
}

/// What every target's run shares.
struct Plan<'a> {
    run: &'a Run<'a>,
    mode: QueueMode,
    /// Messages per publish call.
    batch: u32,
    topics: usize,
    /// The payload after the 8-byte timestamp; shared, never copied.
    filler: Bytes,
    /// `syncctl-bench-<random run id>`: topic names start with it.
    prefix: String,
    /// What payload timestamps count from.
    epoch: std::time::Instant,
}

impl Plan<'_> {
    async fn measure<T: QueueTarget>(&self, name: &str, target: &T) -> anyhow::Result<Measured> {
        let clients = self.run.load.clients as usize;
        let topics = target
            .create_topics(&self.prefix, self.topics)
            .await
            .with_context(|| format!("cannot create the topics on {name}"))?;
        let mut workers = Vec::with_capacity(clients);
        for index in 0..clients {
            let topic = &topics[index % topics.len()];
            workers.push(QueueWorker {
                client: target.client(index, topic).await?,
                mode: self.mode,
                batch: self.batch,
                filler: self.filler.clone(),
                epoch: self.epoch,
                published: 0,
                consumed: 0,
            });
        }
        let measured = self.run.measure(name, workers).await;
        // The topics go, whatever happened, once counted.
        let (phase, workers) = match measured {
            Ok(done) => done,
            Err(e) => {
                let _ = target.delete_topics(&topics).await;
                return Err(e);
            }
        };
        let published = workers.iter().map(|w| w.published).sum();
        let consumed = workers.iter().map(|w| w.consumed).sum();
        // The counts come from each topic's owner, which may apply the last acks and publishes
        // a moment after the leader answered them: the check waits (boundedly) for them to
        // settle, and judges the last counts.
        let settle_until = Instant::now() + SETTLE;
        let check = loop {
            let in_topics = self
                .count(target, &topics)
                .await
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("cannot count the messages left on {name}"));
            let in_topics = match in_topics {
                Ok(n) => n,
                Err(e) => {
                    let _ = target.delete_topics(&topics).await;
                    return Err(e);
                }
            };
            let check = Check::judge(self.mode, published, consumed, in_topics, phase.errors);
            if check.passed || Instant::now() >= settle_until {
                break check;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let cleaned_up = target.delete_topics(&topics).await;
        let mut check = check;
        check.cleaned_up = cleaned_up.is_ok();
        if let Err(reason) = cleaned_up
            && self.run.people
        {
            eprintln!("warning: cannot delete the topics on {name}: {reason}");
        }
        Ok(Measured {
            summary: Summary::new(name, &target.endpoint(), clients, &phase),
            check,
        })
    }
}

impl Plan<'_> {
    /// Messages in the run's topics: stored (publish modes) or outstanding (end-to-end).
    async fn count<T: QueueTarget>(&self, target: &T, topics: &[String]) -> Result<u64, String> {
        let counts = join_all(topics.iter().map(|t| async {
            match self.mode {
                QueueMode::EndToEnd => target.outstanding(t).await,
                QueueMode::Publish | QueueMode::PublishBatch => target.stored(t).await,
            }
        }))
        .await;
        counts.into_iter().sum()
    }
}

/// A client that publishes, or publishes and consumes, once per operation.
struct QueueWorker<C> {
    client: C,
    mode: QueueMode,
    batch: u32,
    filler: Bytes,
    epoch: std::time::Instant,
    /// Messages whose publish was acknowledged.
    published: u64,
    /// Messages received.
    consumed: u64,
}

impl<C: QueueClient> QueueWorker<C> {
    /// `count` payloads stamped with now.
    fn payloads(&self, count: u32) -> Vec<Bytes> {
        let stamp = stamp(self.epoch);
        (0..count)
            .map(|_| {
                let mut p = BytesMut::with_capacity(8 + self.filler.len());
                p.put_u64(stamp);
                p.put_slice(&self.filler);
                p.freeze()
            })
            .collect()
    }

    /// Publish, then consume and acknowledge as many messages as were published.
    async fn round(&mut self) -> Call<Done> {
        let published = self.client.publish(self.payloads(self.batch)).await;
        let mut retries = published.retries;
        if let Err(reason) = published.result {
            return Call {
                result: Err(format!("publish: {reason}")),
                retries,
            };
        }
        self.published += u64::from(self.batch);
        let mut latencies = Vec::with_capacity(self.batch as usize);
        let mut empty_polls = 0;
        while latencies.len() < self.batch as usize {
            let want = self.batch - latencies.len() as u32;
            let consumed = self.client.consume(want, CONSUME_WAIT).await;
            retries += consumed.retries;
            let received = match consumed.result {
                Ok(received) => received,
                Err(reason) => {
                    return Call {
                        result: Err(format!("consume: {reason}")),
                        retries,
                    };
                }
            };
            if received.is_empty() {
                empty_polls += 1;
                if empty_polls >= EMPTY_POLLS_BEFORE_GIVING_UP {
                    return Call {
                        result: Err(format!(
                            "consume: {} of {} messages did not arrive in {} empty polls",
                            want, self.batch, EMPTY_POLLS_BEFORE_GIVING_UP
                        )),
                        retries,
                    };
                }
                continue;
            }
            empty_polls = 0;
            let now = stamp(self.epoch);
            self.consumed += received.len() as u64;
            let mut handles = Vec::with_capacity(received.len());
            for r in received {
                let sent = read_stamp(&r.payload).unwrap_or(now);
                latencies.push(Duration::from_nanos(now.saturating_sub(sent)));
                handles.push(r.handle);
            }
            let acked = self.client.ack(handles).await;
            retries += acked.retries;
            if let Err(reason) = acked.result {
                return Call {
                    result: Err(format!("ack: {reason}")),
                    retries,
                };
            }
        }
        Call {
            result: Ok(Done::Each(latencies)),
            retries,
        }
    }
}

impl<C: QueueClient> Worker for QueueWorker<C> {
    async fn op(&mut self) -> Call<Done> {
        match self.mode {
            QueueMode::Publish | QueueMode::PublishBatch => {
                let payloads = self.payloads(self.batch);
                let sent = Instant::now();
                let call = self.client.publish(payloads).await;
                let latency = sent.elapsed();
                call.and_then(|()| {
                    self.published += u64::from(self.batch);
                    Ok(match self.batch {
                        1 => Done::One(latency),
                        n => Done::Batch {
                            latency,
                            count: u64::from(n),
                        },
                    })
                })
            }
            QueueMode::EndToEnd => self.round().await,
        }
    }
}

/// Nanoseconds since `epoch`.
fn stamp(epoch: std::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The publish time a payload carries; `None` for a payload too short to carry one.
fn read_stamp(payload: &[u8]) -> Option<u64> {
    let head: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(head))
}

/// Topic `k` of a run.
pub fn topic_name(prefix: &str, k: usize) -> String {
    format!("{prefix}-{k:05}")
}

/// Shared by the targets' `delete_topics`: runs `delete` on every topic at once and reports
/// the first failure.
pub async fn delete_all<F, Fut>(topics: &[String], delete: F) -> Result<(), String>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    join_all(topics.iter().cloned().map(delete))
        .await
        .into_iter()
        .collect::<Result<Vec<()>, String>>()
        .map(drop)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use indicatif::ProgressBar;

    use super::*;
    use crate::bench::driver;

    /// One topic in memory: visible messages and the count of unacked deliveries.
    #[derive(Default)]
    struct Topic {
        visible: VecDeque<Bytes>,
        unacked: u64,
    }

    /// A client of an in-memory topic whose calls take 1 ms each.
    struct Fake {
        topic: Arc<Mutex<Topic>>,
    }

    impl QueueClient for Fake {
        type Handle = ();

        async fn publish(&mut self, payloads: Vec<Bytes>) -> Call<()> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.topic.lock().unwrap().visible.extend(payloads);
            Call::once(Ok(()))
        }

        async fn consume(&mut self, max: u32, wait: Duration) -> Call<Vec<Received<()>>> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let got: Vec<_> = {
                let mut topic = self.topic.lock().unwrap();
                let n = (max as usize).min(topic.visible.len());
                topic.unacked += n as u64;
                topic
                    .visible
                    .drain(..n)
                    .map(|payload| Received {
                        payload,
                        handle: (),
                    })
                    .collect()
            };
            if got.is_empty() {
                tokio::time::sleep(wait).await;
            }
            Call::once(Ok(got))
        }

        async fn ack(&mut self, handles: Vec<()>) -> Call<()> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.topic.lock().unwrap().unacked -= handles.len() as u64;
            Call::once(Ok(()))
        }
    }

    fn worker(topic: &Arc<Mutex<Topic>>, mode: QueueMode, batch: u32) -> QueueWorker<Fake> {
        QueueWorker {
            client: Fake {
                topic: Arc::clone(topic),
            },
            mode,
            batch,
            filler: Bytes::from_static(&[7; 248]),
            epoch: std::time::Instant::now(),
            published: 0,
            consumed: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn end_to_end_rounds_on_a_shared_topic_drain_it_and_count_every_message() {
        let topic = Arc::new(Mutex::new(Topic::default()));
        let workers = (0..4)
            .map(|_| worker(&topic, QueueMode::EndToEnd, 8))
            .collect();
        let (phase, workers) = driver::run(
            workers,
            Duration::from_millis(100),
            "msgs",
            &ProgressBar::hidden(),
        )
        .await
        .unwrap();
        let published: u64 = workers.iter().map(|w| w.published).sum();
        let consumed: u64 = workers.iter().map(|w| w.consumed).sum();
        assert_eq!(phase.errors, 0);
        assert!(
            phase.ops > 0 && phase.ops.is_multiple_of(8),
            "{}",
            phase.ops
        );
        assert_eq!((published, consumed), (phase.ops, phase.ops));
        let t = topic.lock().unwrap();
        assert!(t.visible.is_empty() && t.unacked == 0);
        let check = Check::judge(QueueMode::EndToEnd, published, consumed, 0, 0);
        assert!(check.passed, "{check:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_counts_each_message() {
        let topic = Arc::new(Mutex::new(Topic::default()));
        let (phase, workers) = driver::run(
            vec![worker(&topic, QueueMode::PublishBatch, 32)],
            Duration::from_millis(10),
            "msgs",
            &ProgressBar::hidden(),
        )
        .await
        .unwrap();
        assert_eq!(phase.ops, 10 * 32);
        assert_eq!(workers[0].published, phase.ops);
        assert_eq!(topic.lock().unwrap().visible.len() as u64, phase.ops);
    }

    #[test]
    fn payloads_carry_their_publish_time_first() {
        let w = worker(&Arc::default(), QueueMode::Publish, 1);
        let p = w.payloads(3);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].len(), 256);
        let at = read_stamp(&p[0]).unwrap();
        assert!(at <= stamp(w.epoch));
        assert_eq!(read_stamp(b"short"), None);
    }

    #[test]
    fn the_check_catches_lost_extra_and_leftover_messages() {
        use QueueMode::*;
        assert!(Check::judge(Publish, 10, 0, 10, 0).passed);
        assert!(!Check::judge(Publish, 10, 0, 9, 0).passed, "a lost message");
        assert!(
            !Check::judge(PublishBatch, 10, 0, 11, 0).passed,
            "a phantom"
        );
        assert!(
            Check::judge(PublishBatch, 10, 0, 11, 1).passed,
            "a failed but applied publish"
        );
        assert!(Check::judge(EndToEnd, 64, 64, 0, 0).passed);
        assert!(!Check::judge(EndToEnd, 64, 64, 1, 0).passed, "a leftover");
        assert!(
            !Check::judge(EndToEnd, 64, 60, 0, 0).passed,
            "a message not delivered"
        );
    }
}
