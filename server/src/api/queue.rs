//! `sync.v1.Queue`: topics, publishing, consuming and acknowledging, over the replicated queue
//! state machine (`state::queue`) and the owner runtime (`crate::queue`).
//!
//! Every state change is a [`ipb::QueueCommand`] proposed through Raft on the leader, carrying
//! the client's RequestHeader, so a retried call is applied once. What runs where:
//!
//! | rpc | served by |
//! |---|---|
//! | CreateTopic, DeleteTopic, Publish, PublishBatch, Ack, AckBatch, Nack, ExtendVisibility, RequeueExpired, Redrive, Purge | the leader (forwarded once, like the Lock service) |
//! | GetTopic, ListTopics | LINEARIZABLE: the leader; STALE: the receiving node's replica |
//! | Consume, Subscribe | the topic's owner, which waits for messages on its replica and has the leader propose each `Deliver` |
//! | Stats | the topic's owner, from its replica |
//!
//! A call forwarded once (`x-sync-forwarded`) is served where it lands, even if that node's
//! view of the owner has changed meanwhile, so two views can never bounce a call around.
//!
//! **Deliveries.** The owner waits (see `crate::queue::owner`) and then needs a `Deliver`
//! committed. If it leads, it proposes it; otherwise it sends the leader a Consume marked with
//! [`DELIVER_NOW`], which the leader turns into a `Deliver` at once (no owner routing, no
//! waiting) and answers with the entry's log index in [`DELIVER_INDEX`], so the owner can wait
//! until its own replica shows the delivery before it counts those messages as gone. The marker
//! carries the consumer tag (a Subscribe's, so its credit can be counted); anyone may send it,
//! and it then only means "wait_time_ms 0, on the leader".
//!
//! **Auto-create.** With `--queue-auto-create true` (the default) Publish, PublishBatch, Consume
//! and Subscribe create a missing topic with default settings; with `false` they answer
//! NOT_FOUND and only CreateTopic makes topics. The flag travels in the proposed command, so
//! the setting of the node that proposes (the leader) decides and every replica applies the
//! same outcome.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use sync_proto::internal::v1 as ipb;
use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::queue_client::QueueClient;
use tokio::time::Instant;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use super::kv::{propose_within, request_id};
use super::{
    DEFAULT_DEADLINE, FORWARDED, Forwarder, LEADER_ID, Route, client_deadline, deadline_of,
    forward_request, not_leader, read_route, read_state, route, status_of, was_forwarded,
};
use crate::node::NodeHandle;
use crate::node::driver::now_unix_ms;
use crate::queue::owner::{Claims, Owner, Ownership, Wake, wait_applied, wait_for_work};
use crate::queue::rates::{RateTracker, SAMPLE_EVERY, Sample};
use crate::state::queue::QueueError;
use crate::state::queue::limits::{
    MAX_CONSUMER_TAG_BYTES, MAX_DELIVER_MESSAGES, MAX_LIST_PAGE_SIZE, MAX_NACK_DELAY_MS,
    MAX_VISIBILITY_TIMEOUT_MS, check_at_most, fill_settings, validate_topic_name,
};

use ipb::QueueErrorCode as ErrorCode;
use ipb::queue_command::Op;
use ipb::queue_result::Result as R;

/// Metadata on a Consume from a topic's owner to the leader: propose the `Deliver` now. The value
/// is the consumer tag (see the module docs).
pub const DELIVER_NOW: &str = "x-sync-queue-deliver";
/// Metadata on the leader's answer to a [`DELIVER_NOW`] call: the `Deliver`'s log index.
pub const DELIVER_INDEX: &str = "x-sync-queue-index";

/// Longest long poll (queue.proto).
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Credit window of a Subscribe that asks for 0 (queue.proto).
const DEFAULT_WINDOW: u32 = 10;
/// Largest credit window (queue.proto).
const MAX_WINDOW: u32 = 1_000;
/// Largest gRPC message this service takes or sends: a PublishBatch holds up to 4 MiB of
/// messages (queue.proto), plus its protobuf framing, so gRPC's default 4 MiB would refuse a
/// batch at the documented limit.
pub const MAX_GRPC_MESSAGE: usize = 8 << 20;
/// How long an owner waits for its replica to show a delivery the leader made (module docs).
const APPLY_WAIT: Duration = Duration::from_millis(500);
/// Least time a delivery proposal is given, even when the long poll used up the call's budget.
const MIN_PROPOSE: Duration = Duration::from_millis(100);
/// Pause before a subscription retries a delivery the leader could not make (an election).
const SUBSCRIBE_RETRY: Duration = Duration::from_millis(100);

/// The Queue service of one node. Cheap to clone: subscriptions hold a clone.
#[derive(Clone)]
pub struct QueueService {
    /// The node.
    node: NodeHandle,
    /// Connections for forwarding to the leader and to owners.
    forwarder: Arc<Forwarder>,
    /// This node's view of which node owns which topic.
    ownership: Arc<Ownership>,
    /// Ready messages that consumers on this node are about to take.
    claims: Arc<Claims>,
    /// Samples of owned topics' counters, for Stats' rates.
    rates: Arc<RateTracker>,
}

/// Where an owner-served call runs.
enum Place {
    /// Here: this node owns the topic, or the call was forwarded here already.
    Here,
    /// At the owner.
    Owner(Owner),
}

type DeliveryStream = Pin<Box<dyn Stream<Item = Result<api::Delivery, Status>> + Send>>;

/// The gRPC status for a refused queue command (each code has the status' name).
pub fn status_of_queue_error(e: &ipb::QueueError) -> Status {
    let message = e.message.clone();
    match ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified) {
        ErrorCode::InvalidArgument => Status::invalid_argument(message),
        ErrorCode::NotFound => Status::not_found(message),
        ErrorCode::FailedPrecondition => Status::failed_precondition(message),
        ErrorCode::ResourceExhausted => Status::resource_exhausted(message),
        ErrorCode::AlreadyExists => Status::already_exists(message),
        ErrorCode::Unspecified => Status::internal(message),
    }
}

/// A check that failed before anything was proposed.
fn refused(e: QueueError) -> Status {
    status_of_queue_error(&e.to_proto())
}

/// An error from a call forwarded to `owner`. A failure to reach it becomes UNAVAILABLE naming
/// the owner in the trailers (common.proto); the owner's own answers pass unchanged.
fn from_owner(owner: &Owner, s: Status) -> Status {
    let unreached = matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) && s.metadata().get(LEADER_ID).is_none();
    if !unreached {
        return s;
    }
    not_leader(
        Some((owner.id, owner.address.clone())),
        &format!(
            "the topic's owner, node {} at {}, could not be reached ({}); retry shortly: \
             ownership moves if it stays down",
            owner.id,
            owner.address,
            s.message()
        ),
    )
}

fn check_topic(topic: &str) -> Result<(), Status> {
    validate_topic_name("topic", topic).map_err(refused)
}

fn check_visibility(ms: u64) -> Result<(), Status> {
    check_at_most("visibility_timeout_ms", ms, MAX_VISIBILITY_TIMEOUT_MS).map_err(refused)
}

fn check_receipt(receipt: &Option<api::Receipt>) -> Result<ipb::QueueReceipt, Status> {
    match receipt {
        Some(r) if !r.message_id.is_empty() => Ok(ipb::QueueReceipt {
            message_id: r.message_id.clone(),
            delivery_attempt: r.delivery_attempt,
        }),
        Some(_) => Err(Status::invalid_argument(
            "receipt.message_id must not be empty; pass the receipt of the delivery",
        )),
        None => Err(Status::invalid_argument(
            "receipt is required: pass the receipt of the delivery",
        )),
    }
}

fn settings_to_internal(s: &api::TopicSettings) -> ipb::QueueTopicSettings {
    ipb::QueueTopicSettings {
        visibility_timeout_ms: s.visibility_timeout_ms,
        max_deliveries: s.max_deliveries,
        dead_letter_topic: s.dead_letter_topic.clone(),
        retention_max_messages: s.retention_max_messages,
        retention_max_bytes: s.retention_max_bytes,
        retention_max_age_ms: s.retention_max_age_ms,
        max_message_bytes: s.max_message_bytes,
        dedup_window_ms: s.dedup_window_ms,
    }
}

fn topic_from_internal(t: ipb::QueueTopic) -> api::Topic {
    let settings = t.settings.unwrap_or_default();
    api::Topic {
        name: t.name,
        settings: Some(api::TopicSettings {
            visibility_timeout_ms: settings.visibility_timeout_ms,
            max_deliveries: settings.max_deliveries,
            dead_letter_topic: settings.dead_letter_topic,
            retention_max_messages: settings.retention_max_messages,
            retention_max_bytes: settings.retention_max_bytes,
            retention_max_age_ms: settings.retention_max_age_ms,
            max_message_bytes: settings.max_message_bytes,
            dedup_window_ms: settings.dedup_window_ms,
        }),
        created_unix_ms: t.created_unix_ms,
    }
}

fn delivery_from_internal(d: ipb::QueueDelivery) -> api::Delivery {
    api::Delivery {
        receipt: Some(api::Receipt {
            message_id: d.message_id.clone(),
            delivery_attempt: d.delivery_attempt,
        }),
        message_id: d.message_id,
        payload: d.payload,
        attributes: d.attributes.into_iter().map(|a| (a.key, a.value)).collect(),
        ordering_key: d.ordering_key,
        delivery_attempt: d.delivery_attempt,
        publish_unix_ms: d.publish_unix_ms,
        first_delivery_unix_ms: d.first_delivery_unix_ms,
        visible_again_unix_ms: d.visible_again_unix_ms,
    }
}

/// A publish entry as the state machine takes it (attributes in key order, so the log entry
/// does not depend on a HashMap's iteration order).
fn entry_to_internal(e: &api::PublishEntry) -> ipb::QueuePublishEntry {
    let mut attributes: Vec<ipb::QueueAttribute> = e
        .attributes
        .iter()
        .map(|(key, value)| ipb::QueueAttribute {
            key: key.clone(),
            value: value.clone(),
        })
        .collect();
    attributes.sort_by(|a, b| a.key.cmp(&b.key));
    ipb::QueuePublishEntry {
        payload: e.payload.clone(),
        dedup_id: e.dedup_id.clone(),
        delay_ms: e.delay_ms,
        attributes,
        ordering_key: e.ordering_key.clone(),
    }
}

/// A checked publish command for `topic`.
fn publish_op(
    topic: &str,
    auto_create: bool,
    entries: Vec<ipb::QueuePublishEntry>,
) -> Result<Op, Status> {
    check_topic(topic)?;
    crate::state::queue::precheck_batch(&entries).map_err(refused)?;
    Ok(Op::Publish(ipb::QueuePublish {
        topic: topic.to_string(),
        auto_create,
        entries,
    }))
}

fn published(r: ipb::QueuePublished) -> api::PublishResponse {
    api::PublishResponse {
        message_id: r.message_id,
        deduplicated: r.deduplicated,
    }
}

/// An AckBatch's answer: each receipt with the status an Ack of it alone would have given.
fn ack_batch_response(
    receipts: Vec<api::Receipt>,
    applied: ipb::QueueAckBatchResult,
) -> api::AckBatchResponse {
    let results: Vec<api::AckBatchResult> = receipts
        .into_iter()
        .zip(applied.outcomes)
        .map(|(receipt, outcome)| {
            let (code, message) = match outcome.error {
                None => (Code::Ok as i32, String::new()),
                Some(e) => {
                    let status = status_of_queue_error(&e);
                    (status.code() as i32, status.message().to_string())
                }
            };
            api::AckBatchResult {
                receipt: Some(receipt),
                code,
                message,
            }
        })
        .collect();
    let acked = results.iter().filter(|r| r.code == Code::Ok as i32).count() as u32;
    api::AckBatchResponse { results, acked }
}

/// The result a command was expected to produce, or INTERNAL naming what came instead.
fn expect<T>(r: R, pick: impl FnOnce(R) -> Result<T, R>) -> Result<T, Status> {
    pick(r).map_err(|other| Status::internal(format!("unexpected queue result {other:?}")))
}

impl QueueService {
    /// The service, and its background sampler of owned topics' rates (it stops with the node).
    pub fn new(node: NodeHandle, forwarder: Arc<Forwarder>) -> QueueService {
        let service = QueueService {
            node,
            forwarder,
            ownership: Arc::new(Ownership::default()),
            claims: Arc::new(Claims::default()),
            rates: Arc::new(RateTracker::default()),
        };
        tokio::spawn(service.clone().sample_rates());
        service
    }

    /// Whether a publish or delivery this node proposes creates a missing topic.
    fn auto_create(&self) -> bool {
        self.node.settings.queue_auto_create
    }

    /// A client of the node at `address`, taking messages as large as this service does.
    fn client(&self, address: &str) -> Result<QueueClient<Channel>, Status> {
        Ok(QueueClient::new(self.forwarder.channel(address)?)
            .max_decoding_message_size(MAX_GRPC_MESSAGE)
            .max_encoding_message_size(MAX_GRPC_MESSAGE))
    }

    /// Where a call served by the topic's owner runs (see the module docs).
    fn place(&self, topic: &str, md: &MetadataMap) -> Result<Place, Status> {
        if was_forwarded(md) {
            return Ok(Place::Here);
        }
        match self.ownership.owner(&self.node.status(), topic) {
            Some(o) if o.is_self => Ok(Place::Here),
            Some(o) if !o.address.is_empty() => Ok(Place::Owner(o)),
            Some(o) => Err(not_leader(
                Some((o.id, String::new())),
                &format!(
                    "node {} owns topic `{topic}` but its address is unknown here",
                    o.id
                ),
            )),
            None => Err(Status::unavailable(
                "this node does not know the cluster's voters yet, so it cannot tell which \
                 node owns the topic; retry shortly",
            )),
        }
    }

    /// Proposes a queue command on this node (the leader); returns its log index and result,
    /// a refusal becoming its status.
    async fn propose(
        &self,
        op: Op,
        header: Option<api::RequestHeader>,
        deadline: Duration,
    ) -> Result<(u64, R), Status> {
        let cmd = ipb::command::Op::Queue(ipb::QueueCommand { op: Some(op) });
        let (index, r) = propose_within(&self.node, cmd, request_id(header), deadline).await?;
        match r.result {
            Some(ipb::command_result::Result::Queue(ipb::QueueResult {
                result: Some(R::Error(e)),
            })) => Err(status_of_queue_error(&e)),
            Some(ipb::command_result::Result::Queue(ipb::QueueResult { result: Some(r) })) => {
                Ok((index, r))
            }
            Some(ipb::command_result::Result::Rejected(why)) => Err(Status::invalid_argument(why)),
            other => Err(Status::internal(format!(
                "queue command produced {other:?}"
            ))),
        }
    }

    /// A leader-only write: checks the request (`command`, which also builds the command),
    /// forwards it to the leader or proposes it here, and translates the result (`answer`).
    async fn write<Req, Resp, Fut>(
        &self,
        request: Request<Req>,
        command: impl FnOnce(&Req) -> Result<(Op, Option<api::RequestHeader>), Status>,
        forward: impl FnOnce(QueueClient<Channel>, Request<Req>) -> Fut,
        answer: impl FnOnce(R) -> Result<Resp, R>,
    ) -> Result<Response<Resp>, Status>
    where
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let deadline = deadline_of(request.metadata());
        let target = route(&self.node, request.metadata())?;
        let req = request.into_inner();
        let (op, header) = command(&req)?;
        if let Route::Forward(addr) = target {
            return forward(self.client(&addr)?, forward_request(req, deadline)).await;
        }
        let (_, r) = self.propose(op, header, deadline).await?;
        expect(r, answer).map(Response::new)
    }

    /// Has the leader commit a `Deliver`: proposed here if this node leads, else sent to the
    /// leader as a [`DELIVER_NOW`] Consume. Returns the deliveries, and the log index when the
    /// leader is another node (for [`wait_applied`]).
    async fn deliver(
        &self,
        req: &api::ConsumeRequest,
        consumer_tag: &str,
        end: Instant,
    ) -> Result<(Vec<api::Delivery>, Option<u64>), Status> {
        let budget = end
            .saturating_duration_since(Instant::now())
            .max(MIN_PROPOSE);
        if self.node.is_leader() {
            let op = Op::Deliver(ipb::QueueDeliver {
                topic: req.topic.clone(),
                auto_create: self.auto_create(),
                max_messages: req.max_messages,
                visibility_timeout_ms: req.visibility_timeout_ms,
                consumer_tag: consumer_tag.to_string(),
            });
            let (_, r) = self.propose(op, req.header, budget).await?;
            let delivered = expect(r, |r| match r {
                R::Deliver(d) => Ok(d.deliveries),
                other => Err(other),
            })?;
            return Ok((
                delivered.into_iter().map(delivery_from_internal).collect(),
                None,
            ));
        }
        let Some((_, addr)) = self.node.leader().filter(|(_, a)| !a.is_empty()) else {
            return Err(not_leader(
                None,
                "the topic's owner cannot have messages delivered",
            ));
        };
        let tag = MetadataValue::try_from(consumer_tag)
            .map_err(|_| Status::internal(format!("consumer tag {consumer_tag:?}")))?;
        let mut request = forward_request(
            api::ConsumeRequest {
                wait_time_ms: 0,
                ..req.clone()
            },
            budget,
        );
        request.metadata_mut().insert(DELIVER_NOW, tag);
        let response = self.client(&addr)?.consume(request).await?;
        let index = response
            .metadata()
            .get(DELIVER_INDEX)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok((response.into_inner().deliveries, index))
    }

    /// The leader's side of a [`DELIVER_NOW`] Consume: propose the `Deliver` at once.
    async fn deliver_now(
        &self,
        request: Request<api::ConsumeRequest>,
    ) -> Result<Response<api::ConsumeResponse>, Status> {
        if !self.node.is_leader() {
            return Err(not_leader(
                self.node.leader(),
                "this node is not the leader",
            ));
        }
        let deadline = deadline_of(request.metadata());
        let tag = request
            .metadata()
            .get(DELIVER_NOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        crate::state::queue::limits::check_len("consumer tag", &tag, MAX_CONSUMER_TAG_BYTES)
            .map_err(refused)?;
        let req = request.into_inner();
        let op = Op::Deliver(ipb::QueueDeliver {
            topic: req.topic,
            auto_create: self.auto_create(),
            max_messages: req.max_messages,
            visibility_timeout_ms: req.visibility_timeout_ms,
            consumer_tag: tag,
        });
        let (index, r) = self.propose(op, req.header, deadline).await?;
        let delivered = expect(r, |r| match r {
            R::Deliver(d) => Ok(d.deliveries),
            other => Err(other),
        })?;
        let mut response = Response::new(api::ConsumeResponse {
            deliveries: delivered.into_iter().map(delivery_from_internal).collect(),
        });
        response
            .metadata_mut()
            .insert(DELIVER_INDEX, MetadataValue::from(index));
        Ok(response)
    }

    /// The topic's ready messages on this replica (None: no such topic).
    async fn ready_here(&self, topic: &str) -> Result<Option<usize>, Status> {
        let topic = topic.to_string();
        self.node
            .read(false, move |s| s.queues().ready_count(&topic))
            .await
            .map_err(status_of)
    }

    /// The owner's Consume: the long poll, then one `Deliver` (see `crate::queue::owner`).
    async fn consume_here(
        &self,
        req: api::ConsumeRequest,
        wait: Duration,
        end: Instant,
    ) -> Result<api::ConsumeResponse, Status> {
        let max = req.max_messages.max(1) as usize;
        let until = Instant::now() + wait;
        // Subscribed before the first look, so no notice between the look and the wait is lost.
        let mut notices = self.node.notices();
        let claim = loop {
            let ready = self.ready_here(&req.topic).await?;
            if let Some(claim) = self.claims.claim(&req.topic, ready.unwrap_or(0), max) {
                break Some(claim);
            }
            // No such topic here and none will be made for this call: ask the leader at once
            // rather than long-poll (its answer is NOT_FOUND, or the topic if this replica
            // trails a CreateTopic).
            if ready.is_none() && !self.auto_create() {
                break None;
            }
            if Instant::now() >= until {
                break None;
            }
            match wait_for_work(&mut notices, &req.topic, until).await {
                Wake::Look => {}
                Wake::Deadline => break None,
                Wake::Closed => {
                    return Err(Status::unavailable(
                        "the node is shutting down; retry the Consume with the same request \
                         header on another node",
                    ));
                }
            }
        };
        // Deliver even when this replica shows nothing ready: it may trail the leader (a publish
        // acknowledged just before this call), a missing topic is created by the delivery, and a
        // retried request is owed its first attempt's deliveries from the dedup table.
        let (deliveries, index) = self.deliver(&req, "", end).await?;
        // Until this replica shows the deliveries, other waiters here would count them as ready.
        if let Some(index) = index.filter(|_| !deliveries.is_empty()) {
            wait_applied(&self.node, index, APPLY_WAIT).await;
        }
        drop(claim);
        Ok(api::ConsumeResponse { deliveries })
    }

    /// The owner's Subscribe: delivers whenever messages are ready and the window has credit,
    /// until the client goes away, the topic is deleted or ownership moves.
    fn subscription(self, req: api::QueueSubscribeRequest) -> DeliveryStream {
        Box::pin(async_stream::try_stream! {
            let topic = req.topic.clone();
            let window = match req.max_in_flight { 0 => DEFAULT_WINDOW, n => n } as usize;
            // Unique per stream: the state counts this stream's in-flight messages by it.
            let tag = format!("sub-{}-{:016x}", self.node.settings.id, rand::random::<u64>());
            let first_owner = self.ownership.owner(&self.node.status(), &topic).map(|o| o.id);
            let mut notices = self.node.notices();
            let mut known = false;
            loop {
                let owner = self.ownership.owner(&self.node.status(), &topic);
                if owner.as_ref().map(|o| o.id) != first_owner {
                    Err(moved(&topic, owner))?;
                }
                let (ready, used) = {
                    let (t, tag) = (topic.clone(), tag.clone());
                    self.node
                        .read(false, move |s| {
                            let q = s.queues();
                            (q.ready_count(&t), q.in_flight_for(&t, &tag))
                        })
                        .await
                        .map_err(status_of)?
                };
                let credit = window.saturating_sub(used).min(MAX_DELIVER_MESSAGES as usize);
                let claim = match ready {
                    None if known => Err(Status::not_found(format!(
                        "topic `{topic}` was deleted; the subscription ended"
                    )))?,
                    None => None,
                    Some(ready) => {
                        known = true;
                        self.claims.claim(&topic, ready, credit)
                    }
                };
                // A missing topic is created by a delivery (auto-create), or the delivery
                // answers NOT_FOUND, which ends the stream.
                if claim.is_some() || (ready.is_none() && credit > 0) {
                    let consume = api::ConsumeRequest {
                        header: None,
                        topic: topic.clone(),
                        max_messages: credit as u32,
                        visibility_timeout_ms: req.visibility_timeout_ms,
                        wait_time_ms: 0,
                    };
                    let end = Instant::now() + DEFAULT_DEADLINE;
                    match self.deliver(&consume, &tag, end).await {
                        Ok((deliveries, index)) => {
                            known = true;
                            // Until this replica shows them, they count neither as used credit
                            // nor as gone from the ready messages.
                            if let Some(index) = index.filter(|_| !deliveries.is_empty()) {
                                wait_applied(&self.node, index, APPLY_WAIT).await;
                            }
                            drop(claim);
                            let got = !deliveries.is_empty();
                            for d in deliveries {
                                yield d;
                            }
                            if got {
                                continue;
                            }
                        }
                        // An election or a slow commit: try again rather than end the stream.
                        Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                            tracing::debug!(topic = %topic, error = %s.message(), "subscription delivery failed; retrying");
                            tokio::time::sleep(SUBSCRIBE_RETRY).await;
                            continue;
                        }
                        Err(s) => Err(s)?,
                    }
                }
                let until = Instant::now() + MAX_WAIT;
                if wait_for_work(&mut notices, &topic, until).await == Wake::Closed {
                    Err(Status::unavailable("the node is shutting down; resubscribe on another node"))?;
                }
            }
        })
    }

    /// Samples the counters of the topics this node owns, for Stats' rates, until the node stops.
    async fn sample_rates(self) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let counts = self.node.read(false, |s| {
                let q = s.queues();
                let (topics, _) = q
                    .list_topics("", MAX_LIST_PAGE_SIZE as u32, "")
                    .unwrap_or_default();
                topics
                    .into_iter()
                    .filter_map(|t| {
                        let totals = q.stats(&t.name)?.totals.unwrap_or_default();
                        Some((t.name, totals.published, totals.acked))
                    })
                    .collect::<Vec<_>>()
            });
            let Ok(counts) = counts.await else {
                return;
            };
            let status = self.node.status();
            let at = Instant::now();
            let mut owned = BTreeSet::new();
            for (topic, published, acked) in counts {
                if self
                    .ownership
                    .owner(&status, &topic)
                    .is_some_and(|o| o.is_self)
                {
                    self.rates.observe(
                        &topic,
                        Sample {
                            at,
                            published,
                            acked,
                        },
                    );
                    owned.insert(topic);
                }
            }
            self.rates.retain(|t| owned.contains(t));
        }
    }
}

/// UNAVAILABLE ending a subscription whose topic's owner moved, naming the new owner.
fn moved(topic: &str, owner: Option<Owner>) -> Status {
    let message = match &owner {
        Some(o) => format!(
            "the owner of topic `{topic}` moved to node {} at {}; resubscribe",
            o.id, o.address
        ),
        None => format!("the owner of topic `{topic}` is no longer known here; resubscribe"),
    };
    not_leader(owner.map(|o| (o.id, o.address)), &message)
}

#[tonic::async_trait]
impl api::queue_server::Queue for QueueService {
    async fn create_topic(
        &self,
        request: Request<api::CreateTopicRequest>,
    ) -> Result<Response<api::CreateTopicResponse>, Status> {
        self.write(
            request,
            |req| {
                let settings = req.settings.as_ref().map(settings_to_internal);
                validate_topic_name("name", &req.name).map_err(refused)?;
                fill_settings(&req.name, settings.as_ref()).map_err(refused)?;
                let op = Op::CreateTopic(ipb::QueueCreateTopic {
                    name: req.name.clone(),
                    settings,
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.create_topic(r).await },
            |r| match r {
                R::CreateTopic(c) => Ok(api::CreateTopicResponse {
                    topic: c.topic.map(topic_from_internal),
                    created: c.created,
                }),
                other => Err(other),
            },
        )
        .await
    }

    async fn delete_topic(
        &self,
        request: Request<api::DeleteTopicRequest>,
    ) -> Result<Response<api::DeleteTopicResponse>, Status> {
        self.write(
            request,
            |req| {
                validate_topic_name("name", &req.name).map_err(refused)?;
                let op = Op::DeleteTopic(ipb::QueueDeleteTopic {
                    name: req.name.clone(),
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.delete_topic(r).await },
            |r| match r {
                R::DeleteTopic(d) => Ok(api::DeleteTopicResponse {
                    deleted_messages: d.deleted_messages,
                }),
                other => Err(other),
            },
        )
        .await
    }

    async fn get_topic(
        &self,
        request: Request<api::GetTopicRequest>,
    ) -> Result<Response<api::GetTopicResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = read_route(
            &self.node,
            request.get_ref().consistency(),
            request.metadata(),
        )?;
        let req = request.into_inner();
        validate_topic_name("name", &req.name).map_err(refused)?;
        if let Some(Route::Forward(addr)) = target {
            return self
                .client(&addr)?
                .get_topic(forward_request(req, deadline))
                .await;
        }
        let name = req.name;
        let topic = read_state(&self.node, target.is_some(), deadline, {
            let name = name.clone();
            move |s| s.queues().topic(&name)
        })
        .await?;
        match topic {
            Some(t) => Ok(Response::new(api::GetTopicResponse {
                topic: Some(topic_from_internal(t)),
            })),
            None => Err(refused(QueueError::no_topic(&name))),
        }
    }

    async fn list_topics(
        &self,
        request: Request<api::ListTopicsRequest>,
    ) -> Result<Response<api::ListTopicsResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = read_route(
            &self.node,
            request.get_ref().consistency(),
            request.metadata(),
        )?;
        let req = request.into_inner();
        if let Some(Route::Forward(addr)) = target {
            return self
                .client(&addr)?
                .list_topics(forward_request(req, deadline))
                .await;
        }
        let page = read_state(&self.node, target.is_some(), deadline, move |s| {
            s.queues()
                .list_topics(&req.prefix, req.page_size, &req.page_token)
        })
        .await?;
        let (topics, next_page_token) = page.map_err(refused)?;
        Ok(Response::new(api::ListTopicsResponse {
            topics: topics.into_iter().map(topic_from_internal).collect(),
            next_page_token,
        }))
    }

    async fn publish(
        &self,
        request: Request<api::PublishRequest>,
    ) -> Result<Response<api::PublishResponse>, Status> {
        self.write(
            request,
            |req| {
                let entry = entry_to_internal(&api::PublishEntry {
                    payload: req.payload.clone(),
                    dedup_id: req.dedup_id.clone(),
                    delay_ms: req.delay_ms,
                    attributes: req.attributes.clone(),
                    ordering_key: req.ordering_key.clone(),
                });
                Ok((
                    publish_op(&req.topic, self.auto_create(), vec![entry])?,
                    req.header,
                ))
            },
            |mut c, r| async move { c.publish(r).await },
            |r| match r {
                R::Publish(p) if p.results.len() == 1 => Ok(p
                    .results
                    .into_iter()
                    .map(published)
                    .next()
                    .unwrap_or_default()),
                other => Err(other),
            },
        )
        .await
    }

    async fn publish_batch(
        &self,
        request: Request<api::PublishBatchRequest>,
    ) -> Result<Response<api::PublishBatchResponse>, Status> {
        self.write(
            request,
            |req| {
                let entries = req.messages.iter().map(entry_to_internal).collect();
                Ok((
                    publish_op(&req.topic, self.auto_create(), entries)?,
                    req.header,
                ))
            },
            |mut c, r| async move { c.publish_batch(r).await },
            |r| match r {
                R::Publish(p) => Ok(api::PublishBatchResponse {
                    results: p.results.into_iter().map(published).collect(),
                }),
                other => Err(other),
            },
        )
        .await
    }

    async fn consume(
        &self,
        request: Request<api::ConsumeRequest>,
    ) -> Result<Response<api::ConsumeResponse>, Status> {
        {
            let req = request.get_ref();
            check_topic(&req.topic)?;
            check_at_most(
                "max_messages",
                u64::from(req.max_messages),
                u64::from(MAX_DELIVER_MESSAGES),
            )
            .map_err(refused)?;
            check_visibility(req.visibility_timeout_ms)?;
        }
        if request.metadata().contains_key(DELIVER_NOW) {
            return self.deliver_now(request).await;
        }
        let md = request.metadata().clone();
        let req = request.into_inner();
        // The long poll ends at the client's wait or its deadline, whichever comes first,
        // keeping time for the delivery and the answer.
        let client = client_deadline(&md);
        let mut wait = Duration::from_millis(req.wait_time_ms).min(MAX_WAIT);
        if let Some(d) = client {
            wait = wait.min(d.saturating_sub((d / 5).min(Duration::from_millis(300))));
        }
        let budget = client.unwrap_or(wait + DEFAULT_DEADLINE);
        match self.place(&req.topic, &md)? {
            Place::Owner(o) => self
                .client(&o.address)?
                .consume(forward_request(req, budget))
                .await
                .map_err(|s| from_owner(&o, s)),
            Place::Here => {
                let end = Instant::now() + budget;
                self.consume_here(req, wait, end).await.map(Response::new)
            }
        }
    }

    async fn ack(
        &self,
        request: Request<api::AckRequest>,
    ) -> Result<Response<api::AckResponse>, Status> {
        self.write(
            request,
            |req| {
                check_topic(&req.topic)?;
                let op = Op::Ack(ipb::QueueAck {
                    topic: req.topic.clone(),
                    receipt: Some(check_receipt(&req.receipt)?),
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.ack(r).await },
            |r| match r {
                R::Ack(_) => Ok(api::AckResponse {}),
                other => Err(other),
            },
        )
        .await
    }

    async fn ack_batch(
        &self,
        request: Request<api::AckBatchRequest>,
    ) -> Result<Response<api::AckBatchResponse>, Status> {
        // The outcomes come back in the receipts' order; each is paired with its receipt.
        let sent = request.get_ref().receipts.clone();
        self.write(
            request,
            |req| {
                check_topic(&req.topic)?;
                let receipts: Vec<ipb::QueueReceipt> = req
                    .receipts
                    .iter()
                    .map(|r| ipb::QueueReceipt {
                        message_id: r.message_id.clone(),
                        delivery_attempt: r.delivery_attempt,
                    })
                    .collect();
                crate::state::queue::check_ack_batch(&receipts).map_err(refused)?;
                let op = Op::AckBatch(ipb::QueueAckBatch {
                    topic: req.topic.clone(),
                    receipts,
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.ack_batch(r).await },
            move |r| match r {
                R::AckBatch(b) => Ok(ack_batch_response(sent, b)),
                other => Err(other),
            },
        )
        .await
    }

    async fn nack(
        &self,
        request: Request<api::NackRequest>,
    ) -> Result<Response<api::NackResponse>, Status> {
        self.write(
            request,
            |req| {
                check_topic(&req.topic)?;
                check_at_most("delay_ms", req.delay_ms, MAX_NACK_DELAY_MS).map_err(refused)?;
                let op = Op::Nack(ipb::QueueNack {
                    topic: req.topic.clone(),
                    receipt: Some(check_receipt(&req.receipt)?),
                    delay_ms: req.delay_ms,
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.nack(r).await },
            |r| match r {
                R::Nack(_) => Ok(api::NackResponse {}),
                other => Err(other),
            },
        )
        .await
    }

    async fn extend_visibility(
        &self,
        request: Request<api::ExtendVisibilityRequest>,
    ) -> Result<Response<api::ExtendVisibilityResponse>, Status> {
        self.write(
            request,
            |req| {
                check_topic(&req.topic)?;
                if req.visibility_timeout_ms == 0 {
                    return Err(Status::invalid_argument(
                        "visibility_timeout_ms must be at least 1; to give the message back, \
                         use Nack",
                    ));
                }
                check_visibility(req.visibility_timeout_ms)?;
                let op = Op::ExtendVisibility(ipb::QueueExtendVisibility {
                    topic: req.topic.clone(),
                    receipt: Some(check_receipt(&req.receipt)?),
                    visibility_timeout_ms: req.visibility_timeout_ms,
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.extend_visibility(r).await },
            |r| match r {
                R::ExtendVisibility(e) => Ok(api::ExtendVisibilityResponse {
                    visible_again_unix_ms: e.visible_again_unix_ms,
                }),
                other => Err(other),
            },
        )
        .await
    }

    async fn requeue_expired(
        &self,
        request: Request<api::RequeueExpiredRequest>,
    ) -> Result<Response<api::RequeueExpiredResponse>, Status> {
        self.write(
            request,
            |req| {
                check_topic(&req.topic)?;
                let op = Op::RequeueExpired(ipb::QueueRequeueExpired {
                    topic: req.topic.clone(),
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.requeue_expired(r).await },
            |r| match r {
                R::RequeueExpired(q) => Ok(api::RequeueExpiredResponse {
                    requeued: q.requeued,
                }),
                other => Err(other),
            },
        )
        .await
    }

    async fn redrive(
        &self,
        request: Request<api::RedriveRequest>,
    ) -> Result<Response<api::RedriveResponse>, Status> {
        self.write(
            request,
            |req| {
                validate_topic_name("dead_letter_topic", &req.dead_letter_topic)
                    .map_err(refused)?;
                if !req.destination_topic.is_empty() {
                    validate_topic_name("destination_topic", &req.destination_topic)
                        .map_err(refused)?;
                }
                let op = Op::Redrive(ipb::QueueRedrive {
                    dead_letter_topic: req.dead_letter_topic.clone(),
                    destination_topic: req.destination_topic.clone(),
                    max_messages: req.max_messages,
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.redrive(r).await },
            |r| match r {
                R::Redrive(m) => Ok(api::RedriveResponse { moved: m.moved }),
                other => Err(other),
            },
        )
        .await
    }

    async fn purge(
        &self,
        request: Request<api::PurgeRequest>,
    ) -> Result<Response<api::PurgeResponse>, Status> {
        self.write(
            request,
            |req| {
                check_topic(&req.topic)?;
                let op = Op::Purge(ipb::QueuePurge {
                    topic: req.topic.clone(),
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.purge(r).await },
            |r| match r {
                R::Purge(p) => Ok(api::PurgeResponse { purged: p.purged }),
                other => Err(other),
            },
        )
        .await
    }

    async fn stats(
        &self,
        request: Request<api::QueueStatsRequest>,
    ) -> Result<Response<api::QueueStatsResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        check_topic(&request.get_ref().topic)?;
        let place = self.place(&request.get_ref().topic, request.metadata())?;
        let req = request.into_inner();
        if let Place::Owner(o) = place {
            return self
                .client(&o.address)?
                .stats(forward_request(req, deadline))
                .await
                .map_err(|s| from_owner(&o, s));
        }
        let topic = req.topic;
        let (stats, created, clock) = read_state(&self.node, false, deadline, {
            let topic = topic.clone();
            move |s| {
                let q = s.queues();
                let created = q.topic(&topic).map(|t| t.created_unix_ms);
                (q.stats(&topic), created, q.clock_unix_ms())
            }
        })
        .await?;
        let Some(stats) = stats else {
            return Err(refused(QueueError::no_topic(&topic)));
        };
        let totals = stats.totals.unwrap_or_default();
        let now = Sample {
            at: Instant::now(),
            published: totals.published,
            acked: totals.acked,
        };
        // The replica's clock is the last applied entry's leader time, which stands still while
        // nothing is written: ages are counted to this node's clock instead, never less.
        let wall = now_unix_ms().max(clock);
        let age = created.map(|c| Duration::from_millis(wall.saturating_sub(c)));
        let rates = self.rates.rates(&topic, now, age);
        self.rates.observe(&topic, now);
        let held = stats.visible + stats.in_flight + stats.delayed > 0;
        let oldest_age_ms = if held {
            stats.oldest_age_ms + (wall - clock)
        } else {
            0
        };
        let owner = self.ownership.owner(&self.node.status(), &topic);
        Ok(Response::new(api::QueueStatsResponse {
            topic,
            visible: stats.visible,
            in_flight: stats.in_flight,
            delayed: stats.delayed,
            dead_lettered: totals.dead_lettered,
            oldest_age_ms,
            bytes: stats.bytes,
            publish_rate: rates.publish,
            ack_rate: rates.ack,
            owner_node_id: owner.as_ref().map_or(0, |o| o.id),
            owner_address: owner.map(|o| o.address).unwrap_or_default(),
        }))
    }

    type SubscribeStream = DeliveryStream;

    async fn subscribe(
        &self,
        request: Request<api::QueueSubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        {
            let req = request.get_ref();
            check_topic(&req.topic)?;
            check_at_most(
                "max_in_flight",
                u64::from(req.max_in_flight),
                u64::from(MAX_WINDOW),
            )
            .map_err(refused)?;
            check_visibility(req.visibility_timeout_ms)?;
        }
        let place = self.place(&request.get_ref().topic, request.metadata())?;
        let client = client_deadline(request.metadata());
        let req = request.into_inner();
        let Place::Owner(o) = place else {
            return Ok(Response::new(self.clone().subscription(req)));
        };
        // A stream has no deadline unless the client set one.
        let mut forwarded = Request::new(req);
        if let Some(d) = client {
            forwarded.set_timeout(d);
        }
        forwarded
            .metadata_mut()
            .insert(FORWARDED, MetadataValue::from_static("1"));
        let upstream = self
            .client(&o.address)?
            .subscribe(forwarded)
            .await
            .map_err(|s| from_owner(&o, s))?
            .into_inner();
        let stream = upstream.map(move |item| item.map_err(|s| from_owner(&o, s)));
        Ok(Response::new(Box::pin(stream)))
    }
}
