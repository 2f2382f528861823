//! Queues: publishing, consuming under a visibility timeout, acknowledging.
//!
//! Every call goes through the client's retry loop. Publishes, acks and consumes carry a
//! `RequestHeader`, so a retried publish stores its message once and a retried consume returns
//! the same deliveries (the server's de-duplication table answers). Delivery is at least once:
//! a message whose consumer dies before [`Delivery::ack`] is delivered again after its
//! visibility timeout.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::queue_client::QueueClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::client::{CallSpec, Client};
use crate::error::{CallKind, Error, Result};

/// A message to publish: a payload and its optional settings.
///
/// ```
/// use std::time::Duration;
/// use sync_client::OutgoingMessage;
///
/// let m = OutgoingMessage::new("resize image 42")
///     .ordering_key("user-7")
///     .dedup_id("upload-42")
///     .delay(Duration::from_secs(5))
///     .attribute("priority", "high");
/// assert_eq!(m.payload(), b"resize image 42".as_slice());
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutgoingMessage {
    entry: api::PublishEntry,
}

impl OutgoingMessage {
    /// A message with this payload and no settings.
    pub fn new(payload: impl Into<Bytes>) -> OutgoingMessage {
        OutgoingMessage {
            entry: api::PublishEntry {
                payload: payload.into(),
                ..Default::default()
            },
        }
    }

    /// Messages with the same ordering key are delivered one at a time, in publish order.
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.entry.ordering_key = key.into();
        self
    }

    /// A repeat of this id within the topic's dedup window publishes nothing and returns the
    /// first message's id.
    pub fn dedup_id(mut self, id: impl Into<String>) -> Self {
        self.entry.dedup_id = id.into();
        self
    }

    /// Not deliverable before this delay has passed.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.entry.delay_ms = delay.as_millis() as u64;
        self
    }

    /// An application attribute.
    pub fn attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.entry.attributes.insert(key.into(), value.into());
        self
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.entry.payload
    }
}

impl<T: Into<Bytes>> From<T> for OutgoingMessage {
    fn from(payload: T) -> Self {
        OutgoingMessage::new(payload)
    }
}

/// What publishing one message did.
///
/// ```no_run
/// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
/// let p = client.publish("jobs", "resize 42").await?;
/// assert!(!p.deduplicated);
/// println!("stored as {}", p.message_id);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The message's id (for a de-duplicated publish, the earlier message's).
    pub message_id: String,
    /// True if the dedup id was seen within the window and nothing new was stored.
    pub deduplicated: bool,
}

impl From<api::PublishResponse> for Published {
    fn from(r: api::PublishResponse) -> Self {
        Published {
            message_id: r.message_id,
            deduplicated: r.deduplicated,
        }
    }
}

/// One delivery of a message. Acknowledge it with [`Delivery::ack`] once handled; otherwise it
/// is delivered again after its visibility timeout.
///
/// ```no_run
/// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
/// use std::time::Duration;
/// for d in client.consumer("jobs").receive().await? {
///     match std::str::from_utf8(d.payload()) {
///         Ok(job) => {
///             println!("attempt {} of {}: {job}", d.attempt(), d.message_id());
///             d.ack().await?;
///         }
///         Err(_) => d.nack(Duration::from_secs(10)).await?,
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Delivery {
    client: Client,
    topic: Arc<str>,
    inner: api::Delivery,
}

impl Delivery {
    /// The message's id.
    pub fn message_id(&self) -> &str {
        &self.inner.message_id
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.inner.payload
    }

    /// The application attributes (and the server's `sync.*` ones, e.g. on dead letters).
    pub fn attributes(&self) -> &HashMap<String, String> {
        &self.inner.attributes
    }

    /// The ordering key, empty if none.
    pub fn ordering_key(&self) -> &str {
        &self.inner.ordering_key
    }

    /// Which delivery of the message this is (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.inner.delivery_attempt
    }

    /// The topic it came from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The raw delivery.
    pub fn raw(&self) -> &api::Delivery {
        &self.inner
    }

    fn receipt(&self) -> Option<api::Receipt> {
        Some(self.inner.receipt.clone().unwrap_or(api::Receipt {
            message_id: self.inner.message_id.clone(),
            delivery_attempt: self.inner.delivery_attempt,
        }))
    }

    /// Acknowledges the delivery: the message is deleted. Fails with
    /// [`Error::FailedPrecondition`](crate::Error::FailedPrecondition) if the message was
    /// delivered again since (this consumer was too slow).
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// for d in client.consumer("jobs").receive().await? {
    ///     d.ack().await?; // deleted: never delivered again
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ack(&self) -> Result<()> {
        self.client
            .queue_write(
                |header| api::AckRequest {
                    header,
                    topic: self.topic.to_string(),
                    receipt: self.receipt(),
                },
                |ch, r| async move { QueueClient::new(ch).ack(r).await },
            )
            .await?;
        Ok(())
    }

    /// Gives the delivery back: the message becomes visible again after `delay`.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// use std::time::Duration;
    /// for d in client.consumer("jobs").receive().await? {
    ///     d.nack(Duration::from_secs(5)).await?; // back in the topic in 5 s
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn nack(&self, delay: Duration) -> Result<()> {
        self.client
            .queue_write(
                |header| api::NackRequest {
                    header,
                    topic: self.topic.to_string(),
                    receipt: self.receipt(),
                    delay_ms: delay.as_millis() as u64,
                },
                |ch, r| async move { QueueClient::new(ch).nack(r).await },
            )
            .await?;
        Ok(())
    }

    /// Keeps the message invisible for `timeout` from now (a heartbeat for long jobs); returns
    /// when it becomes visible again (Unix ms).
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// use std::time::Duration;
    /// for d in client.consumer("jobs").receive().await? {
    ///     let visible_again_unix_ms = d.extend(Duration::from_secs(120)).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn extend(&self, timeout: Duration) -> Result<u64> {
        let r = self
            .client
            .queue_write(
                |header| api::ExtendVisibilityRequest {
                    header,
                    topic: self.topic.to_string(),
                    receipt: self.receipt(),
                    visibility_timeout_ms: timeout.as_millis() as u64,
                },
                |ch, r| async move { QueueClient::new(ch).extend_visibility(r).await },
            )
            .await?;
        Ok(r.visible_again_unix_ms)
    }

    /// Extends the visibility timeout to `timeout` every `timeout / 3` until the returned guard
    /// is dropped: for a handler whose run time is unknown.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// use std::time::Duration;
    /// for d in client.consumer("jobs").visibility(Duration::from_secs(30)).receive().await? {
    ///     let extending = d.auto_extend(Duration::from_secs(30));
    ///     // ... a handler that may run for minutes ...
    ///     drop(extending);
    ///     d.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn auto_extend(&self, timeout: Duration) -> AutoExtend {
        let delivery = self.clone();
        let every = (timeout / 3).max(Duration::from_millis(100));
        AutoExtend(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if delivery.extend(timeout).await.is_err() {
                    return;
                }
            }
        }))
    }
}

/// Stops extending a delivery's visibility when dropped (see [`Delivery::auto_extend`]).
///
/// ```no_run
/// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
/// use std::time::Duration;
/// for d in client.consumer("jobs").receive().await? {
///     let _extending = d.auto_extend(Duration::from_secs(30)); // stops at the end of the block
///     d.ack().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AutoExtend(tokio::task::JoinHandle<()>);

impl Drop for AutoExtend {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How to consume a topic; made by [`Client::consumer`].
///
/// ```no_run
/// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
/// use std::time::Duration;
/// let consumer = client
///     .consumer("jobs")
///     .batch(32)
///     .visibility(Duration::from_secs(60))
///     .wait(Duration::from_secs(10));
/// let deliveries = consumer.receive().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Consumer {
    client: Client,
    topic: Arc<str>,
    batch: u32,
    visibility: Duration,
    wait: Duration,
}

impl Consumer {
    /// Up to this many messages per call (1 to 100; default 10).
    pub fn batch(mut self, n: u32) -> Self {
        self.batch = n.clamp(1, 100);
        self
    }

    /// The visibility timeout of each delivery (default: the topic's).
    pub fn visibility(mut self, timeout: Duration) -> Self {
        self.visibility = timeout;
        self
    }

    /// Long poll: how long one call waits for a message (default 5 s).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// One call: up to `batch` deliveries, waiting up to `wait` for the first.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// for d in client.consumer("jobs").batch(32).receive().await? {
    ///     println!("{}: {} bytes", d.message_id(), d.payload().len());
    ///     d.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn receive(&self) -> Result<Vec<Delivery>> {
        let ticket = self.client.ticket();
        let request = api::ConsumeRequest {
            header: ticket.header(),
            topic: self.topic.to_string(),
            max_messages: self.batch,
            visibility_timeout_ms: self.visibility.as_millis() as u64,
            wait_time_ms: self.wait.as_millis() as u64,
        };
        let mut spec = CallSpec::write(CallKind::Other);
        spec.wait = self.wait;
        let r = self
            .client
            .unary(spec, request, |ch, r| async move {
                QueueClient::new(ch).consume(r).await
            })
            .await?;
        Ok(r.deliveries
            .into_iter()
            .map(|inner| Delivery {
                client: self.client.clone(),
                topic: self.topic.clone(),
                inner,
            })
            .collect())
    }

    /// Deliveries as a stream: long polls one after another, forever (until dropped). An
    /// error ends nothing: it is yielded, and the next poll follows.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// use futures::StreamExt;
    /// let mut deliveries = Box::pin(client.consumer("jobs").stream());
    /// while let Some(d) = deliveries.next().await {
    ///     let d = d?;
    ///     d.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn stream(self) -> impl Stream<Item = Result<Delivery>> {
        futures::stream::unfold(
            (self, std::collections::VecDeque::new()),
            |(consumer, mut buffered)| async move {
                loop {
                    if let Some(d) = buffered.pop_front() {
                        return Some((Ok(d), (consumer, buffered)));
                    }
                    match consumer.receive().await {
                        Ok(batch) => buffered.extend(batch),
                        Err(e) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            return Some((Err(e), (consumer, buffered)));
                        }
                    }
                }
            },
        )
    }
}

/// A topic's counts, as `Stats` reports them.
///
/// ```no_run
/// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
/// let stats = client.topic_stats("jobs").await?;
/// println!("{stats:?}");
/// # Ok(()) }
/// ```
pub type TopicStats = api::QueueStatsResponse;

impl Client {
    /// Publishes one message to `topic` (created with default settings if missing and the
    /// server auto-creates topics); returns once it is committed on a majority.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// use sync_client::OutgoingMessage;
    /// let p = client.publish("jobs", OutgoingMessage::new("resize 42").ordering_key("user-7")).await?;
    /// println!("published {}", p.message_id);
    /// # Ok(()) }
    /// ```
    pub async fn publish(
        &self,
        topic: &str,
        message: impl Into<OutgoingMessage>,
    ) -> Result<Published> {
        let e = message.into().entry;
        let r = self
            .queue_write(
                |header| api::PublishRequest {
                    header,
                    topic: topic.to_owned(),
                    payload: e.payload,
                    dedup_id: e.dedup_id,
                    delay_ms: e.delay_ms,
                    attributes: e.attributes,
                    ordering_key: e.ordering_key,
                },
                |ch, r| async move { QueueClient::new(ch).publish(r).await },
            )
            .await?;
        Ok(r.into())
    }

    /// Publishes up to 1 000 messages atomically (all or none), in order.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let ids = client.publish_batch("jobs", ["a", "b", "c"]).await?;
    /// assert_eq!(ids.len(), 3);
    /// # Ok(()) }
    /// ```
    pub async fn publish_batch<M: Into<OutgoingMessage>>(
        &self,
        topic: &str,
        messages: impl IntoIterator<Item = M>,
    ) -> Result<Vec<Published>> {
        let r = self
            .queue_write(
                |header| api::PublishBatchRequest {
                    header,
                    topic: topic.to_owned(),
                    messages: messages.into_iter().map(|m| m.into().entry).collect(),
                },
                |ch, r| async move { QueueClient::new(ch).publish_batch(r).await },
            )
            .await?;
        Ok(r.results.into_iter().map(Published::from).collect())
    }

    /// Acknowledges deliveries of one topic in one replicated command (1 to 1 000): one
    /// commit instead of one per [`Delivery::ack`]. Returns one outcome per delivery, in order:
    /// `Ok(())` if it was acknowledged, or the error its own `ack` would have given
    /// ([`Error::NotFound`](crate::Error::NotFound), or
    /// [`Error::FailedPrecondition`](crate::Error::FailedPrecondition) if it was delivered
    /// again since). The call as a whole is retried like any write and applied once. Deliveries
    /// of different topics are refused with [`Error::InvalidArgument`](crate::Error::InvalidArgument)
    /// before anything is sent.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let deliveries = client.consumer("jobs").batch(32).receive().await?;
    /// // ... handle them all, then acknowledge them together:
    /// for (d, outcome) in deliveries.iter().zip(client.ack_batch(&deliveries).await?) {
    ///     if let Err(e) = outcome {
    ///         eprintln!("{} was not acknowledged: {e}", d.message_id());
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ack_batch(&self, deliveries: &[Delivery]) -> Result<Vec<Result<()>>> {
        let Some(first) = deliveries.first() else {
            return Ok(Vec::new());
        };
        if let Some(other) = deliveries.iter().find(|d| d.topic != first.topic) {
            return Err(Error::InvalidArgument {
                message: format!(
                    "ack_batch takes deliveries of one topic, got {:?} and {:?}",
                    first.topic(),
                    other.topic()
                ),
            });
        }
        let r = self
            .queue_write(
                |header| api::AckBatchRequest {
                    header,
                    topic: first.topic().to_owned(),
                    receipts: deliveries.iter().filter_map(Delivery::receipt).collect(),
                },
                |ch, r| async move { QueueClient::new(ch).ack_batch(r).await },
            )
            .await?;
        if r.results.len() != deliveries.len() {
            return Err(Error::Protocol {
                message: format!(
                    "AckBatch of {} receipts answered {} outcomes",
                    deliveries.len(),
                    r.results.len()
                ),
            });
        }
        Ok(r.results
            .into_iter()
            .map(|o| match Code::from_i32(o.code) {
                Code::Ok => Ok(()),
                code => Err(Error::from_status(
                    &Status::new(code, o.message),
                    CallKind::Other,
                )),
            })
            .collect())
    }

    /// A consumer of `topic`: set its batch size, visibility timeout and long-poll wait, then
    /// [`Consumer::receive`] or [`Consumer::stream`].
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// for d in client.consumer("jobs").receive().await? {
    ///     d.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn consumer(&self, topic: &str) -> Consumer {
        Consumer {
            client: self.clone(),
            topic: Arc::from(topic),
            batch: 10,
            visibility: Duration::ZERO,
            wait: Duration::from_secs(5),
        }
    }

    /// Creates a topic with `settings` (zero fields take the defaults); true if it was created,
    /// false if it existed with the same settings.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let settings = sync_client::api::TopicSettings::default(); // zero fields: the defaults
    /// client.create_topic("jobs", settings).await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_topic(&self, name: &str, settings: api::TopicSettings) -> Result<bool> {
        let r = self
            .queue_write(
                |header| api::CreateTopicRequest {
                    header,
                    name: name.to_owned(),
                    settings: Some(settings),
                },
                |ch, r| async move { QueueClient::new(ch).create_topic(r).await },
            )
            .await?;
        Ok(r.created)
    }

    /// A topic's counts (visible, in flight, delayed, dead-lettered, oldest age, rates) and
    /// owner.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let stats = client.topic_stats("jobs").await?;
    /// println!("{stats:?}");
    /// # Ok(()) }
    /// ```
    pub async fn topic_stats(&self, topic: &str) -> Result<TopicStats> {
        let request = api::QueueStatsRequest {
            topic: topic.to_owned(),
        };
        self.unary(CallSpec::read(self), request, |ch, r| async move {
            QueueClient::new(ch).stats(r).await
        })
        .await
    }
}

impl Client {
    /// One mutating Queue call: `request` is built once with a fresh header (the same on every
    /// retry, so that a retry is applied once), `send` makes one attempt.
    async fn queue_write<Req, Resp, F, Fut>(
        &self,
        request: impl FnOnce(Option<api::RequestHeader>) -> Req,
        send: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let ticket = self.ticket();
        let request = request(ticket.header());
        self.unary(CallSpec::write(CallKind::Other), request, send)
            .await
    }
}

/// Calls for operators: acting on a delivery known only by its receipt, requeueing, purging,
/// redriving dead letters and listing topics (what `syncctl queue` does).
impl Client {
    /// A handle on a delivery known by its receipt (message id and delivery attempt, 0 for the
    /// latest delivery), e.g. one printed by another process: [`Delivery::ack`],
    /// [`Delivery::nack`] and [`Delivery::extend`] work on it. Its payload is empty.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// // A receipt printed by another process: message id and attempt.
    /// client.delivery("jobs", "42", 1).ack().await?;
    /// # Ok(()) }
    /// ```
    pub fn delivery(&self, topic: &str, message_id: &str, attempt: u32) -> Delivery {
        Delivery {
            client: self.clone(),
            topic: Arc::from(topic),
            inner: api::Delivery {
                message_id: message_id.to_owned(),
                delivery_attempt: attempt,
                ..Default::default()
            },
        }
    }

    /// Makes the messages of `topic` whose visibility timeout lapsed visible again now;
    /// returns how many.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let n = client.requeue_expired("jobs").await?;
    /// # Ok(()) }
    /// ```
    pub async fn requeue_expired(&self, topic: &str) -> Result<u64> {
        let r = self
            .queue_write(
                |header| api::RequeueExpiredRequest {
                    header,
                    topic: topic.to_owned(),
                },
                |ch, r| async move { QueueClient::new(ch).requeue_expired(r).await },
            )
            .await?;
        Ok(r.requeued)
    }

    /// Deletes every message of `topic` (visible, in flight and delayed); returns how many.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let removed = client.purge("jobs").await?;
    /// # Ok(()) }
    /// ```
    pub async fn purge(&self, topic: &str) -> Result<u64> {
        let r = self
            .queue_write(
                |header| api::PurgeRequest {
                    header,
                    topic: topic.to_owned(),
                },
                |ch, r| async move { QueueClient::new(ch).purge(r).await },
            )
            .await?;
        Ok(r.purged)
    }

    /// Moves up to `max` messages (0: all) from the dead-letter topic `dead_letters` to
    /// `destination` (empty: back to the topics they came from); returns how many moved.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// // Every dead letter back to the topic it came from.
    /// let moved = client.redrive("jobs-dlq", "", 0).await?;
    /// # Ok(()) }
    /// ```
    pub async fn redrive(&self, dead_letters: &str, destination: &str, max: u64) -> Result<u64> {
        let r = self
            .queue_write(
                |header| api::RedriveRequest {
                    header,
                    dead_letter_topic: dead_letters.to_owned(),
                    destination_topic: destination.to_owned(),
                    max_messages: max,
                },
                |ch, r| async move { QueueClient::new(ch).redrive(r).await },
            )
            .await?;
        Ok(r.moved)
    }

    /// The topics whose names start with `prefix`, every page of them.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// for t in client.list_topics("").await? {
    ///     println!("{t:?}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_topics(&self, prefix: &str) -> Result<Vec<api::Topic>> {
        let mut topics = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = api::ListTopicsRequest {
                prefix: prefix.to_owned(),
                page_token: page_token.clone(),
                ..Default::default()
            };
            let r = self
                .unary(CallSpec::read(self), request, |ch, r| async move {
                    QueueClient::new(ch).list_topics(r).await
                })
                .await?;
            topics.extend(r.topics);
            if r.next_page_token.is_empty() {
                return Ok(topics);
            }
            page_token = r.next_page_token;
        }
    }
}
