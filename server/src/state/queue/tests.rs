//! One test per rule of queue.proto, named after the rule, plus regression scenarios.

use bytes::Bytes;
use prost::Message as _;
use sync_proto::internal::v1 as ipb;
use sync_proto::internal::v1::QueueErrorCode as Code;

use super::limits::*;
use super::message::{DEAD_LETTER_ATTEMPTS, DEAD_LETTER_REASON, DEAD_LETTER_SOURCE};
use super::message::{REASON_NACKED, REASON_TIMED_OUT};
use super::testkit::*;
use super::{QueueState, RestoreError, Status, message_id};

/// A topic `t` with a 100 ms visibility timeout and otherwise the given settings.
fn topic_t(max_deliveries: u32, dlq: &str) -> ipb::QueueTopicSettings {
    settings(100, max_deliveries, dlq, 0, 0, 0, 0, 0)
}

/// A harness at time 1 000 with topic `t` (100 ms timeout, no dead-lettering).
fn with_topic() -> Harness {
    let mut h = Harness::at(1_000);
    h.ok(create("t", Some(topic_t(0, ""))));
    h
}

/// Topic `t` with one message whose first delivery timed out and which is now in its second
/// delivery.
fn redelivered() -> (Harness, String) {
    let mut h = with_topic();
    let id = h.publish("t", vec![entry("a")]).remove(0);
    h.deliver("t", 1, 0);
    h.sleep(100);
    assert_eq!(h.deliver("t", 1, 0), [(id.clone(), 2)]);
    (h, id)
}

fn counts(h: &Harness, topic: &str) -> (u64, u64, u64) {
    let s = h.stats(topic);
    (s.visible, s.in_flight, s.delayed)
}

fn attribute<'a>(h: &'a Harness, topic: &str, id: &str, key: &str) -> Option<&'a str> {
    h.state
        .message(topic, id)?
        .attributes()
        .get(key)
        .map(String::as_str)
}

// ----- topics -----

#[test]
fn create_topic_fills_in_defaults_and_creates_the_missing_dead_letter_topic() {
    let mut h = Harness::at(5);
    let dlq_only = ipb::QueueTopicSettings {
        dead_letter_topic: "orders.dlq".into(),
        ..Default::default()
    };
    let R::CreateTopic(r) = h.ok(create("orders", Some(dlq_only))) else {
        panic!()
    };
    assert!(r.created && r.dead_letter_topic_created);
    let s = r.topic.unwrap().settings.unwrap();
    assert_eq!(s.visibility_timeout_ms, DEFAULT_VISIBILITY_TIMEOUT_MS);
    assert_eq!(s.retention_max_age_ms, DEFAULT_RETENTION_MAX_AGE_MS);
    assert_eq!(s.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
    assert_eq!(s.dedup_window_ms, DEFAULT_DEDUP_WINDOW_MS);
    assert_eq!(s.max_deliveries, 0);
    let dlq = h.state.topic("orders.dlq").unwrap();
    assert_eq!(dlq.settings.unwrap().dead_letter_topic, "");
    assert_eq!(dlq.created_unix_ms, 5);
}

#[test]
fn creating_an_identical_topic_again_succeeds_without_creating() {
    let mut h = with_topic();
    let R::CreateTopic(r) = h.ok(create("t", Some(topic_t(0, "")))) else {
        panic!()
    };
    assert!(!r.created);
}

#[test]
fn creating_a_topic_with_other_settings_is_already_exists() {
    let mut h = with_topic();
    let e = h.apply(create("t", Some(topic_t(3, "")))).unwrap_err();
    assert_eq!(e.code, Code::AlreadyExists);
    assert!(
        e.message.contains("max_deliveries 0, not 3"),
        "{}",
        e.message
    );
}

#[test]
fn a_topic_cannot_be_its_own_dead_letter_topic() {
    let mut h = Harness::at(0);
    assert_eq!(
        h.err(create("t", Some(topic_t(1, "t")))),
        Code::InvalidArgument
    );
}

#[test]
fn topic_names_outside_the_allowed_characters_and_length_are_invalid() {
    let mut h = Harness::at(0);
    for bad in ["", "a b", "a/b", "ü", &"x".repeat(MAX_TOPIC_NAME_LEN + 1)] {
        assert_eq!(h.err(create(bad, None)), Code::InvalidArgument, "{bad:?}");
    }
    h.ok(create(&"x".repeat(MAX_TOPIC_NAME_LEN), None));
    h.ok(create("A-z_0.9", None));
}

#[test]
fn settings_out_of_range_are_invalid() {
    let mut h = Harness::at(0);
    let too_long = settings(MAX_VISIBILITY_TIMEOUT_MS + 1, 0, "", 0, 0, 0, 0, 0);
    assert_eq!(h.err(create("t", Some(too_long))), Code::InvalidArgument);
    let too_big = settings(0, 0, "", 0, 0, 0, MAX_MESSAGE_BYTES_LIMIT + 1, 0);
    assert_eq!(h.err(create("t", Some(too_big))), Code::InvalidArgument);
    let window = settings(0, 0, "", 0, 0, 0, 0, MAX_DEDUP_WINDOW_MS + 1);
    assert_eq!(h.err(create("t", Some(window))), Code::InvalidArgument);
    assert_eq!(h.state.topic_count(), 0);
}

#[test]
fn a_topic_used_as_a_dead_letter_topic_cannot_be_deleted() {
    let mut h = Harness::at(0);
    h.ok(create("t", Some(topic_t(1, "dlq"))));
    let e = h.apply(delete("dlq")).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition);
    assert!(e.message.contains("`t`"), "{}", e.message);
    h.ok(delete("t"));
    h.ok(delete("dlq"));
}

#[test]
fn delete_topic_deletes_its_messages_and_outstanding_receipts_answer_not_found() {
    let mut h = with_topic();
    let ids = h.publish("t", vec![entry("a"), entry("b")]);
    h.deliver("t", 1, 0);
    let R::DeleteTopic(r) = h.ok(delete("t")) else {
        panic!()
    };
    assert_eq!(r.deleted_messages, 2);
    assert_eq!(h.err(ack("t", &ids[0], 1)), Code::NotFound);
    assert_eq!(h.state.next_deadline(), None, "no timer survives its topic");
}

#[test]
fn list_topics_pages_through_a_prefix_in_name_order() {
    let mut h = Harness::at(0);
    for name in ["b2", "a", "b1", "b3", "c"] {
        h.ok(create(name, None));
    }
    let (page, token) = h.state.list_topics("b", 2, "").unwrap();
    let names: Vec<_> = page.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["b1", "b2"]);
    let (page, token) = h.state.list_topics("b", 2, &token).unwrap();
    let names: Vec<_> = page.iter().map(|t| t.name.as_str()).collect();
    assert_eq!((names, token.as_str()), (vec!["b3"], ""));
    let (page, _) = h.state.list_topics("b", 2, "a").unwrap();
    assert_eq!(
        page[0].name, "b1",
        "a token before the prefix starts at the prefix"
    );
    assert_eq!(h.state.list_topics("", 0, "").unwrap().0.len(), 5);
    assert_eq!(
        h.state.list_topics("", 0, "not a token").unwrap_err().code,
        Code::InvalidArgument
    );
}

#[test]
fn a_log_index_applied_twice_is_refused_so_ids_are_never_reused() {
    let mut h = with_topic();
    let first = h.publish("t", vec![entry("a")]);
    let replay = ipb::QueueCommand {
        op: Some(publish("t", vec![entry("b")])),
    };
    let r = outcome(h.state.apply(h.index, h.now, &replay));
    assert_eq!(r.unwrap_err().code, Code::FailedPrecondition);
    assert_eq!(h.stats("t").visible, 1);
    let mut restored = QueueState::restore(h.state.snapshot()).unwrap();
    let r = outcome(restored.apply(h.index, h.now, &replay));
    assert_eq!(
        r.unwrap_err().code,
        Code::FailedPrecondition,
        "also after a restore"
    );
    assert!(
        h.publish("t", vec![entry("c")])[0] > first[0],
        "the next entry goes on"
    );
}

#[test]
fn a_command_without_an_operation_is_invalid() {
    let mut q = QueueState::default();
    let r = q.apply(1, 0, &ipb::QueueCommand { op: None });
    assert_eq!(outcome(r).unwrap_err().code, Code::InvalidArgument);
}

// ----- publishing -----

#[test]
fn message_ids_sort_in_publish_order_and_are_never_reused() {
    let mut h = with_topic();
    let first = h.publish("t", vec![entry("a"), entry("b")]);
    h.ok(purge("t"));
    h.ok(delete("t"));
    h.ok(create("t", None));
    let second = h.publish("t", vec![entry("c")]);
    assert_eq!(first, [message_id(2, 0), message_id(2, 1)]);
    assert!(first[0] < first[1] && first[1] < second[0]);
}

#[test]
fn a_publish_to_a_missing_topic_is_not_found_unless_auto_create_is_on() {
    let mut h = Harness::at(0);
    assert_eq!(h.err(publish("new", vec![entry("x")])), Code::NotFound);
    h.ok(publish_with("new", true, vec![entry("x")]));
    let s = h.state.topic("new").unwrap().settings.unwrap();
    assert_eq!(s.visibility_timeout_ms, DEFAULT_VISIBILITY_TIMEOUT_MS);
    assert_eq!(h.stats("new").visible, 1);
}

#[test]
fn deliver_with_auto_create_creates_the_topic_and_delivers_nothing() {
    let mut h = Harness::at(0);
    assert_eq!(h.err(deliver("new", 1, 0)), Code::NotFound);
    let mut d = ipb::QueueDeliver {
        topic: "new".into(),
        auto_create: true,
        ..Default::default()
    };
    let R::Deliver(r) = h.ok(Op::Deliver(d.clone())) else {
        panic!()
    };
    assert!(r.deliveries.is_empty());
    assert!(h.state.topic("new").is_some());
    d.max_messages = MAX_DELIVER_MESSAGES + 1;
    assert_eq!(h.err(Op::Deliver(d)), Code::InvalidArgument);
}

#[test]
fn dedup_id_within_the_window_publishes_nothing() {
    let mut h = Harness::at(0);
    h.ok(create("t", Some(settings(0, 0, "", 0, 0, 0, 0, 1_000))));
    let with_id = || deduped("x", "order-7");
    let R::Publish(first) = h.ok(publish("t", vec![with_id()])) else {
        panic!()
    };
    h.sleep(999);
    let R::Publish(again) = h.ok(publish("t", vec![with_id()])) else {
        panic!()
    };
    assert!(again.results[0].deduplicated);
    assert_eq!(again.results[0].message_id, first.results[0].message_id);
    let s = h.stats("t");
    assert_eq!((s.visible, s.totals.unwrap().published), (1, 1));
}

#[test]
fn dedup_id_after_the_window_publishes_again() {
    let mut h = Harness::at(0);
    h.ok(create("t", Some(settings(0, 0, "", 0, 0, 0, 0, 1_000))));
    let with_id = deduped("x", "d");
    h.ok(publish("t", vec![with_id.clone()]));
    h.sleep(1_000);
    let R::Publish(again) = h.ok(publish("t", vec![with_id])) else {
        panic!()
    };
    assert!(!again.results[0].deduplicated);
    assert_eq!(h.stats("t").visible, 2);
}

#[test]
fn a_repeated_dedup_id_inside_one_batch_is_deduplicated_against_the_first() {
    let mut h = with_topic();
    let e = deduped("x", "d");
    let R::Publish(r) = h.ok(publish("t", vec![e.clone(), entry("y"), e])) else {
        panic!()
    };
    assert_eq!(r.results[2].message_id, r.results[0].message_id);
    assert!(r.results[2].deduplicated && !r.results[0].deduplicated);
    assert_eq!(h.stats("t").visible, 2);
}

#[test]
fn an_acknowledged_message_still_deduplicates_within_the_window() {
    let mut h = with_topic();
    let e = deduped("x", "d");
    let id = h.publish("t", vec![e.clone()]).remove(0);
    h.deliver("t", 1, 0);
    h.ok(ack("t", &id, 1));
    assert_eq!(h.publish("t", vec![e]), [id]);
    assert_eq!(h.stats("t").visible, 0);
}

#[test]
fn entries_outside_the_documented_limits_are_invalid() {
    let attr = |k: &str| ipb::QueueAttribute {
        key: k.into(),
        value: "v".into(),
    };
    let bad_entries = [
        ipb::QueuePublishEntry {
            attributes: vec![attr("sync.source")],
            ..entry("x")
        },
        ipb::QueuePublishEntry {
            attributes: vec![attr("")],
            ..entry("x")
        },
        ipb::QueuePublishEntry {
            attributes: vec![attr(&"k".repeat(MAX_ATTRIBUTE_KEY_BYTES + 1))],
            ..entry("x")
        },
        ipb::QueuePublishEntry {
            attributes: vec![attr("a"), attr("a")],
            ..entry("x")
        },
        ipb::QueuePublishEntry {
            attributes: (0..=MAX_ATTRIBUTES).map(|i| attr(&i.to_string())).collect(),
            ..entry("x")
        },
        delayed("x", MAX_PUBLISH_DELAY_MS + 1),
        ipb::QueuePublishEntry {
            dedup_id: "d".repeat(MAX_DEDUP_ID_BYTES + 1),
            ..entry("x")
        },
        keyed("x", &"k".repeat(MAX_ORDERING_KEY_BYTES + 1)),
    ];
    let mut h = with_topic();
    for e in bad_entries {
        assert_eq!(
            h.err(publish("t", vec![e.clone()])),
            Code::InvalidArgument,
            "{e:?}"
        );
    }
    assert_eq!(h.err(publish("t", vec![])), Code::InvalidArgument);
    let too_many = vec![entry("x"); MAX_PUBLISH_BATCH + 1];
    assert_eq!(h.err(publish("t", too_many)), Code::InvalidArgument);
    assert_eq!(h.stats("t").visible, 0);
}

#[test]
fn a_message_larger_than_max_message_bytes_is_refused_counting_attributes_and_key() {
    let mut h = Harness::at(0);
    h.ok(create("t", Some(settings(0, 0, "", 0, 0, 0, 10, 0))));
    h.ok(publish("t", vec![keyed("12345", "k1234")]));
    let e = h
        .apply(publish("t", vec![keyed("123456", "k1234")]))
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    assert!(e.message.contains("11 bytes"), "{}", e.message);
}

#[test]
fn retention_max_messages_refuses_the_whole_batch_and_stores_nothing() {
    let mut h = Harness::at(0);
    h.ok(create("orders", Some(settings(0, 0, "", 3, 0, 0, 0, 0))));
    h.publish("orders", vec![entry("a"), entry("b")]);
    let e = h
        .apply(publish("orders", vec![entry("c"), entry("d")]))
        .unwrap_err();
    assert_eq!(e.code, Code::ResourceExhausted);
    assert!(
        e.message.contains("retention_max_messages of 3") && e.message.contains("ack or purge"),
        "{}",
        e.message
    );
    assert_eq!(h.stats("orders").visible, 2, "all or none");
    h.publish("orders", vec![entry("c")]);
}

#[test]
fn retention_max_bytes_refuses_with_resource_exhausted() {
    let mut h = Harness::at(0);
    h.ok(create("t", Some(settings(0, 0, "", 0, 5, 0, 0, 0))));
    h.publish("t", vec![entry("abc")]);
    assert_eq!(
        h.err(publish("t", vec![entry("abc")])),
        Code::ResourceExhausted
    );
    assert_eq!(h.stats("t").bytes, 3);
}

#[test]
fn a_refused_auto_create_publish_creates_no_topic() {
    let mut h = Harness::at(0);
    let bad = delayed("x", MAX_PUBLISH_DELAY_MS + 1);
    assert_eq!(
        h.err(publish_with("new", true, vec![entry("ok"), bad])),
        Code::InvalidArgument
    );
    assert!(h.state.topic("new").is_none());
}

#[test]
fn a_delayed_message_is_not_delivered_before_its_delay_ends() {
    let mut h = with_topic();
    let id = h.publish("t", vec![delayed("later", 500)]).remove(0);
    assert_eq!(counts(&h, "t"), (0, 0, 1));
    assert_eq!(h.state.next_deadline(), Some(1_500));
    h.sleep(499);
    assert!(h.deliver("t", 10, 0).is_empty());
    h.sleep(1);
    assert_eq!(h.deliver("t", 10, 0), [(id, 1)]);
}

// ----- delivering -----

#[test]
fn deliver_hands_out_messages_in_publish_order_and_marks_them_in_flight() {
    let mut h = with_topic();
    let ids = h.publish("t", vec![entry("a"), entry("b"), entry("c")]);
    let R::Deliver(d) = h.ok(deliver("t", 2, 0)) else {
        panic!()
    };
    let got: Vec<_> = d.deliveries.iter().map(|d| d.message_id.clone()).collect();
    assert_eq!(got, ids[..2]);
    let first = &d.deliveries[0];
    assert_eq!(first.payload, Bytes::from("a"));
    assert_eq!(first.delivery_attempt, 1);
    assert_eq!(first.publish_unix_ms, 1_000);
    assert_eq!(first.first_delivery_unix_ms, 1_000);
    assert_eq!(
        first.visible_again_unix_ms, 1_100,
        "the topic's 100 ms timeout"
    );
    assert_eq!(counts(&h, "t"), (1, 2, 0));
}

#[test]
fn an_in_flight_message_is_not_delivered_again_before_its_deadline() {
    let mut h = with_topic();
    h.publish("t", vec![entry("a")]);
    h.deliver("t", 1, 300);
    h.sleep(299);
    assert!(h.deliver("t", 1, 0).is_empty());
}

#[test]
fn a_lapsed_visibility_timeout_makes_the_message_visible_with_its_attempt_count_kept() {
    let mut h = with_topic();
    let id = h.publish("t", vec![entry("a")]).remove(0);
    h.deliver("t", 1, 0);
    h.sleep(100);
    assert_eq!(h.deliver("t", 1, 0), [(id.clone(), 2)]);
    let msg = h.state.message("t", &id).unwrap();
    assert_eq!(msg.first_delivery_unix_ms(), Some(1_000));
    assert_eq!(h.stats("t").totals.unwrap().timed_out, 1);
}

#[test]
fn deliver_stops_before_the_response_would_exceed_the_response_limit() {
    let mut h = Harness::at(0);
    h.ok(create(
        "t",
        Some(settings(0, 0, "", 0, 0, 0, MAX_MESSAGE_BYTES_LIMIT, 0)),
    ));
    let big = "x".repeat((MAX_DELIVER_BYTES / 2) as usize);
    for payload in [&big, &big, "small"] {
        h.publish("t", vec![entry(payload)]);
    }
    assert_eq!(
        h.deliver("t", 3, 0).len(),
        2,
        "stops in order, before the third"
    );
    let whole = "y".repeat(MAX_MESSAGE_BYTES_LIMIT as usize);
    h.ok(purge("t"));
    h.publish("t", vec![entry(&whole)]);
    assert_eq!(h.deliver("t", 3, 0).len(), 1, "one message always fits");
}

#[test]
fn deliver_arguments_out_of_range_are_invalid() {
    let mut h = with_topic();
    assert_eq!(
        h.err(deliver("t", 1, MAX_VISIBILITY_TIMEOUT_MS + 1)),
        Code::InvalidArgument
    );
    let tag = Op::Deliver(ipb::QueueDeliver {
        topic: "t".into(),
        consumer_tag: "c".repeat(MAX_CONSUMER_TAG_BYTES + 1),
        ..Default::default()
    });
    assert_eq!(h.err(tag), Code::InvalidArgument);
}

#[test]
fn in_flight_for_counts_the_messages_a_consumer_tag_holds() {
    let mut h = with_topic();
    h.publish("t", vec![entry("a"), entry("b"), entry("c")]);
    let tagged = |tag: &str, n| {
        Op::Deliver(ipb::QueueDeliver {
            topic: "t".into(),
            max_messages: n,
            consumer_tag: tag.into(),
            ..Default::default()
        })
    };
    h.ok(tagged("sub-1", 2));
    h.ok(tagged("sub-2", 1));
    assert_eq!(h.state.in_flight_for("t", "sub-1"), 2);
    assert_eq!(h.state.in_flight_for("t", "sub-2"), 1);
    h.sleep(100);
    h.ok(requeue("t"));
    assert_eq!(
        h.state.in_flight_for("t", "sub-1"),
        0,
        "credit returns on timeout"
    );
}

// ----- ordering keys -----

#[test]
fn ordering_key_blocks_the_next_message_while_one_is_in_flight() {
    let mut h = with_topic();
    let ids = h.publish("t", vec![keyed("1", "k"), keyed("2", "k"), entry("free")]);
    assert_eq!(
        h.deliver("t", 10, 0),
        [(ids[0].clone(), 1), (ids[2].clone(), 1)],
        "the second `k` message waits"
    );
    assert!(h.deliver("t", 10, 0).is_empty());
    assert_eq!(h.state.ready_count("t"), Some(0));
    assert_eq!(
        counts(&h, "t").0,
        1,
        "waiting behind its key still counts as visible"
    );
}

#[test]
fn ordering_key_messages_are_delivered_in_publish_order_one_at_a_time() {
    let mut h = with_topic();
    let ids = h.publish("t", vec![keyed("1", "k"), keyed("2", "k"), keyed("3", "k")]);
    for id in &ids {
        assert_eq!(h.deliver("t", 10, 0), [(id.clone(), 1)]);
        h.ok(ack("t", id, 1));
    }
}

#[test]
fn a_timed_out_message_keeps_its_place_at_the_head_of_its_key() {
    let mut h = with_topic();
    let ids = h.publish("t", vec![keyed("1", "k"), keyed("2", "k")]);
    h.deliver("t", 10, 0);
    h.sleep(100);
    assert_eq!(h.deliver("t", 10, 0), [(ids[0].clone(), 2)]);
}

#[test]
fn a_delayed_first_message_holds_back_later_messages_of_its_key() {
    let mut h = with_topic();
    let first = ipb::QueuePublishEntry {
        delay_ms: 50,
        ..keyed("1", "k")
    };
    let ids = h.publish("t", vec![first, keyed("2", "k")]);
    assert!(
        h.deliver("t", 10, 0).is_empty(),
        "FIFO per key: 2 waits for 1"
    );
    h.sleep(50);
    assert_eq!(h.deliver("t", 10, 0), [(ids[0].clone(), 1)]);
}

#[test]
fn different_ordering_keys_do_not_block_each_other() {
    let mut h = with_topic();
    let ids = h.publish("t", vec![keyed("1", "a"), keyed("2", "a"), keyed("3", "b")]);
    let got: Vec<_> = h.deliver("t", 10, 0).into_iter().map(|d| d.0).collect();
    assert_eq!(got, [ids[0].clone(), ids[2].clone()]);
}

// ----- receipts: ack, nack, extend -----

#[test]
fn ack_deletes_the_message() {
    let mut h = with_topic();
    let id = h.publish("t", vec![entry("a")]).remove(0);
    h.deliver("t", 1, 0);
    h.ok(ack("t", &id, 1));
    assert_eq!(h.stats("t").in_flight, 0);
    assert!(h.state.message("t", &id).is_none());
    assert_eq!(
        h.err(ack("t", &id, 1)),
        Code::NotFound,
        "already acknowledged"
    );
    assert_eq!(h.stats("t").totals.unwrap().acked, 1);
}

#[test]
fn an_ack_batch_acks_each_receipt_on_its_own_and_reports_each_outcome() {
    let (mut h, stale) = redelivered();
    let ids = h.publish("t", vec![entry("b"), entry("c"), entry("d")]);
    h.deliver("t", 3, 0);
    let receipts = [
        (ids[0].as_str(), 1),
        (stale.as_str(), 1),
        ("no-such-id", 1),
        (ids[1].as_str(), 0),
        (ids[0].as_str(), 1),
    ];
    let R::AckBatch(r) = h.ok(ack_batch("t", &receipts)) else {
        panic!()
    };
    let codes: Vec<Option<i32>> = r
        .outcomes
        .iter()
        .map(|o| o.error.as_ref().map(|e| e.code))
        .collect();
    use Code as E;
    assert_eq!(
        codes,
        [
            None,
            Some(E::FailedPrecondition as i32),
            Some(E::NotFound as i32),
            None,
            Some(E::NotFound as i32),
        ],
        "acked, stale, unknown, acked by attempt 0, already acked by this batch"
    );
    assert!(h.state.message("t", &ids[0]).is_none());
    assert!(h.state.message("t", &ids[1]).is_none());
    assert!(h.state.message("t", &ids[2]).is_some(), "not in the batch");
    assert!(
        h.state.message("t", &stale).is_some(),
        "the stale receipt's message stays"
    );
    assert_eq!(h.stats("t").totals.unwrap().acked, 2);
}

#[test]
fn an_ack_batch_that_is_empty_too_large_or_for_a_missing_topic_changes_nothing() {
    let mut h = with_topic();
    let id = h.publish("t", vec![entry("a")]).remove(0);
    h.deliver("t", 1, 0);
    assert_eq!(h.err(ack_batch("t", &[])), Code::InvalidArgument);
    let many: Vec<(&str, u32)> = (0..=MAX_ACK_BATCH).map(|_| (id.as_str(), 1)).collect();
    assert_eq!(h.err(ack_batch("t", &many)), Code::InvalidArgument);
    assert_eq!(h.err(ack_batch("t", &[("", 1)])), Code::InvalidArgument);
    assert_eq!(
        h.err(ack_batch("nope", &[(id.as_str(), 1)])),
        Code::NotFound
    );
    assert!(h.state.message("t", &id).is_some());
    assert_eq!(h.stats("t").in_flight, 1);
}

#[test]
fn a_stale_receipt_is_refused_after_redelivery() {
    let (mut h, id) = redelivered();
    for op in [
        ack("t", &id, 1),
        nack("t", &id, 1, 0),
        extend("t", &id, 1, 50),
    ] {
        let e = h.apply(op).unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition);
        assert!(e.message.contains("delivered again"), "{}", e.message);
    }
    assert_eq!(h.stats("t").in_flight, 1, "the newer delivery is untouched");
    assert_eq!(
        h.err(ack("t", &id, 3)),
        Code::FailedPrecondition,
        "from the future"
    );
    h.ok(ack("t", &id, 2));
}

#[test]
fn receipt_attempt_zero_acts_on_the_latest_delivery() {
    let (mut h, id) = redelivered();
    h.ok(ack("t", &id, 0));
    assert!(h.state.message("t", &id).is_none());
}

#[test]
fn a_receipt_for_a_message_never_delivered_is_failed_precondition() {
    let mut h = with_topic();
    let id = h.publish("t", vec![entry("a")]).remove(0);
    assert_eq!(h.err(ack("t", &id, 0)), Code::FailedPrecondition);
    assert_eq!(h.err(ack("t", "no-such-id", 0)), Code::NotFound);
    let no_receipt = Op::Ack(ipb::QueueAck {
        topic: "t".into(),
        receipt: None,
    });
    assert_eq!(h.err(no_receipt), Code::InvalidArgument);
}

#[test]
fn a_lapsed_delivery_not_yet_redelivered_can_still_be_extended_or_acked() {
    let mut h = with_topic();
    let ids = h.publish("t", vec![entry("a"), entry("b")]);
    h.deliver("t", 2, 0);
    h.sleep(150);
    let R::ExtendVisibility(r) = h.ok(extend("t", &ids[0], 1, 200)) else {
        panic!()
    };
    assert_eq!(r.visible_again_unix_ms, 1_350);
    assert_eq!(h.state.message("t", &ids[0]).unwrap().delivery_attempt(), 1);
    assert_eq!(
        counts(&h, "t"),
        (1, 1, 0),
        "invisible again under the same receipt"
    );
    h.ok(ack("t", &ids[1], 1));
}

#[test]
fn nack_makes_the_message_visible_after_its_delay_and_counts_as_a_delivery() {
    let mut h = with_topic();
    let id = h.publish("t", vec![entry("a")]).remove(0);
    h.deliver("t", 1, 0);
    h.ok(nack("t", &id, 1, 40));
    assert_eq!(counts(&h, "t"), (0, 0, 1));
    h.sleep(39);
    assert!(h.deliver("t", 1, 0).is_empty());
    h.sleep(1);
    assert_eq!(h.deliver("t", 1, 0), [(id.clone(), 2)]);
    h.ok(nack("t", &id, 2, 0));
    assert_eq!(counts(&h, "t"), (1, 0, 0), "no delay: visible at once");
    assert_eq!(
        h.err(nack("t", &id, 2, MAX_NACK_DELAY_MS + 1)),
        Code::InvalidArgument
    );
}

#[test]
fn extend_visibility_sets_the_deadline_from_now_rather_than_adding_to_it() {
    let mut h = with_topic();
    let id = h.publish("t", vec![entry("a")]).remove(0);
    h.deliver("t", 1, 1_000);
    h.sleep(10);
    let R::ExtendVisibility(r) = h.ok(extend("t", &id, 1, 50)) else {
        panic!()
    };
    assert_eq!(r.visible_again_unix_ms, 1_060, "shortened, not 2 050");
    h.sleep(50);
    assert_eq!(h.deliver("t", 1, 0), [(id.clone(), 2)]);
    assert_eq!(h.err(extend("t", &id, 2, 0)), Code::InvalidArgument);
    assert_eq!(
        h.err(extend("t", &id, 2, MAX_VISIBILITY_TIMEOUT_MS + 1)),
        Code::InvalidArgument
    );
}

// ----- dead letters -----

#[test]
fn max_deliveries_moves_the_message_to_the_dead_letter_topic_with_reason_and_count() {
    let mut h = Harness::at(1_000);
    h.ok(create("t", Some(topic_t(2, "dlq"))));
    let id = h.publish("t", vec![keyed("a", "k")]).remove(0);
    h.deliver("t", 1, 0);
    h.sleep(100);
    h.deliver("t", 1, 0);
    h.sleep(100);
    h.ok(requeue("t"));
    assert!(h.state.message("t", &id).is_none());
    assert_eq!(attribute(&h, "dlq", &id, DEAD_LETTER_SOURCE), Some("t"));
    assert_eq!(attribute(&h, "dlq", &id, DEAD_LETTER_ATTEMPTS), Some("2"));
    assert_eq!(
        attribute(&h, "dlq", &id, DEAD_LETTER_REASON),
        Some(REASON_TIMED_OUT)
    );
    let moved = h.state.message("dlq", &id).unwrap();
    assert_eq!(
        (moved.delivery_attempt(), moved.ordering_key()),
        (0, "k"),
        "starts over in the dead-letter topic, keeps its key"
    );
    assert_eq!(moved.publish_unix_ms(), 1_000);
    assert_eq!(h.stats("t").totals.unwrap().dead_lettered, 1);
    assert_eq!(h.deliver("dlq", 1, 0), [(id, 1)]);
}

#[test]
fn nacking_the_last_allowed_delivery_dead_letters_the_message() {
    let mut h = Harness::at(0);
    h.ok(create("t", Some(topic_t(1, "dlq"))));
    let id = h.publish("t", vec![entry("a")]).remove(0);
    h.deliver("t", 1, 0);
    let R::Nack(r) = h.ok(nack("t", &id, 1, 500)) else {
        panic!()
    };
    assert!(r.dead_lettered);
    assert_eq!(
        attribute(&h, "dlq", &id, DEAD_LETTER_REASON),
        Some(REASON_NACKED)
    );
    assert_eq!(
        counts(&h, "dlq"),
        (1, 0, 0),
        "visible at once, the nack delay is moot"
    );
}

#[test]
fn max_deliveries_without_a_dead_letter_topic_deletes_and_counts_the_message() {
    let mut h = Harness::at(0);
    h.ok(create("t", Some(topic_t(1, ""))));
    let id = h.publish("t", vec![entry("a")]).remove(0);
    h.deliver("t", 1, 0);
    h.sleep(100);
    h.ok(requeue("t"));
    assert!(h.state.message("t", &id).is_none());
    assert_eq!(h.stats("t").totals.unwrap().dead_lettered, 1);
}

#[test]
fn dead_lettering_ignores_the_dead_letter_topic_retention_limits() {
    let mut h = Harness::at(0);
    h.ok(create("dlq", Some(settings(0, 0, "", 1, 0, 0, 0, 0))));
    h.ok(create("t", Some(topic_t(1, "dlq"))));
    h.publish("dlq", vec![entry("full")]);
    h.publish("t", vec![entry("a"), entry("b")]);
    h.deliver("t", 2, 0);
    h.sleep(100);
    h.ok(requeue("t"));
    assert_eq!(
        h.stats("dlq").visible,
        3,
        "nothing dropped, nothing kept cycling"
    );
    assert_eq!(
        h.err(publish("dlq", vec![entry("x")])),
        Code::ResourceExhausted
    );
}

#[test]
fn simultaneous_timeouts_dead_letter_in_topic_creation_then_arrival_order() {
    let mut h = Harness::at(0);
    h.ok(create("z", Some(topic_t(1, "dlq"))));
    h.ok(create("a", Some(topic_t(1, "dlq"))));
    let z = h.publish("z", vec![entry("z1"), entry("z2")]);
    let a = h.publish("a", vec![entry("a1")]);
    h.deliver("a", 1, 0);
    h.deliver("z", 2, 0);
    h.sleep(100);
    h.ok(requeue("a"));
    let order: Vec<_> = h.deliver("dlq", 10, 0).into_iter().map(|d| d.0).collect();
    assert_eq!(order, [z[0].clone(), z[1].clone(), a[0].clone()]);
}

#[test]
fn redrive_moves_dead_letters_back_to_their_source_with_attempts_reset() {
    let mut h = Harness::at(0);
    h.ok(create("t", Some(topic_t(1, "dlq"))));
    h.ok(create("u", Some(topic_t(1, "dlq"))));
    let t = h.publish("t", vec![entry("a")]).remove(0);
    let u = h.publish("u", vec![entry("b")]).remove(0);
    h.publish("dlq", vec![entry("no source")]);
    h.deliver("t", 1, 0);
    h.deliver("u", 1, 0);
    h.sleep(100);
    let R::Redrive(r) = h.ok(redrive("dlq", "", 0)) else {
        panic!()
    };
    assert_eq!(r.moved, 2);
    assert_eq!(
        h.stats("dlq").visible,
        1,
        "a message without a source stays"
    );
    assert_eq!(h.deliver("t", 1, 0), [(t, 1)]);
    assert_eq!(h.deliver("u", 1, 0), [(u, 1)]);
    assert_eq!(h.stats("dlq").totals.unwrap().redriven, 2);
}

#[test]
fn redrive_to_a_given_topic_moves_at_most_max_messages_oldest_first() {
    let mut h = with_topic();
    h.ok(create("dlq", None));
    let ids = h.publish("dlq", vec![entry("1"), entry("2"), entry("3")]);
    let R::Redrive(r) = h.ok(redrive("dlq", "t", 2)) else {
        panic!()
    };
    assert_eq!(r.moved, 2);
    let got: Vec<_> = h.deliver("t", 10, 0).into_iter().map(|d| d.0).collect();
    assert_eq!(got, ids[..2]);
    assert_eq!(h.err(redrive("dlq", "dlq", 0)), Code::InvalidArgument);
    assert_eq!(h.err(redrive("dlq", "missing", 0)), Code::NotFound);
    assert_eq!(h.err(redrive("missing", "t", 0)), Code::NotFound);
}

#[test]
fn redrive_stops_at_a_destination_retention_limit_and_keeps_what_it_moved() {
    let mut h = Harness::at(0);
    h.ok(create("small", Some(settings(0, 0, "", 2, 0, 0, 0, 0))));
    h.ok(create("dlq", None));
    h.publish("small", vec![entry("x")]);
    h.publish("dlq", vec![entry("1"), entry("2")]);
    let e = h.apply(redrive("dlq", "small", 0)).unwrap_err();
    assert_eq!(e.code, Code::ResourceExhausted);
    assert!(e.message.starts_with("moved 1 message"), "{}", e.message);
    assert_eq!((h.stats("small").visible, h.stats("dlq").visible), (2, 1));
}

// ----- time, retention, purge, stats -----

#[test]
fn retention_age_deletes_a_message_whatever_its_state() {
    let mut h = Harness::at(0);
    h.ok(create(
        "t",
        Some(settings(10_000, 0, "", 0, 0, 1_000, 0, 0)),
    ));
    h.publish(
        "t",
        vec![entry("flying"), entry("visible"), delayed("delayed", 5_000)],
    );
    h.deliver("t", 1, 0);
    h.sleep(999);
    h.ok(requeue("t"));
    assert_eq!(h.stats("t").oldest_age_ms, 999);
    h.sleep(1);
    h.ok(requeue("t"));
    assert_eq!(counts(&h, "t"), (0, 0, 0));
    let s = h.stats("t");
    assert_eq!((s.oldest_age_ms, s.totals.unwrap().expired), (0, 3));
}

#[test]
fn purge_deletes_every_message_and_keeps_the_topic() {
    let mut h = with_topic();
    let ids = h.publish("t", vec![entry("a"), entry("b"), delayed("d", 50)]);
    h.deliver("t", 1, 0);
    let R::Purge(r) = h.ok(purge("t")) else {
        panic!()
    };
    assert_eq!(r.purged, 3);
    assert_eq!(counts(&h, "t"), (0, 0, 0));
    assert_eq!(h.err(ack("t", &ids[0], 1)), Code::NotFound);
    assert_eq!(h.state.next_deadline(), None);
}

#[test]
fn requeue_expired_reports_the_deliveries_that_lapsed_since_the_previous_entry() {
    let mut h = with_topic();
    h.publish("t", vec![entry("a"), entry("b"), entry("c")]);
    h.deliver("t", 2, 0);
    h.sleep(100);
    let R::RequeueExpired(r) = h.ok(requeue("t")) else {
        panic!()
    };
    assert_eq!(r.requeued, 2);
    let R::RequeueExpired(r) = h.ok(requeue("t")) else {
        panic!()
    };
    assert_eq!(r.requeued, 0, "already requeued by the previous entry");
    assert_eq!(h.err(requeue("missing")), Code::NotFound);
}

#[test]
fn next_deadline_is_the_earliest_pending_transition() {
    let mut h = with_topic();
    assert_eq!(h.state.next_deadline(), None);
    h.publish("t", vec![entry("a")]);
    assert_eq!(
        h.state.next_deadline(),
        Some(1_000 + DEFAULT_RETENTION_MAX_AGE_MS)
    );
    h.deliver("t", 1, 70);
    assert_eq!(h.state.next_deadline(), Some(1_070));
    let report = h.state.advance(1_070);
    assert_eq!(report.requeued.get("t"), Some(&1));
    assert!(report.woken.contains("t"));
    assert!(h.state.next_deadline() > Some(1_070));
}

#[test]
fn time_never_goes_backwards_when_a_leader_clock_lags() {
    let mut h = with_topic();
    let id = h.publish("t", vec![entry("a")]).remove(0);
    h.deliver("t", 1, 0);
    h.sleep(100);
    h.ok(requeue("t"));
    h.now = 500; // A new leader whose clock is behind.
    assert_eq!(h.deliver("t", 1, 0), [(id, 2)]);
    assert_eq!(h.state.clock_unix_ms(), 1_100);
    assert_eq!(
        h.state.messages("t").unwrap().next().unwrap().status(),
        Status::InFlight { deadline: 1_200 }
    );
}

#[test]
fn advancing_in_steps_equals_advancing_at_once() {
    let mut h = Harness::at(0);
    h.ok(create("a", Some(settings(100, 1, "dlq", 0, 0, 0, 0, 0))));
    h.ok(create("dlq", None));
    h.ok(create("b", Some(settings(30, 2, "dlq", 0, 0, 250, 0, 0))));
    for t in ["a", "b"] {
        h.publish(t, vec![keyed("1", "k"), keyed("2", "k"), entry("3")]);
        h.deliver(t, 10, 0);
    }
    let mut stepped = h.state.clone();
    for now in (0..=400).step_by(7) {
        stepped.advance(now);
    }
    stepped.advance(400);
    h.state.advance(400);
    assert_eq!(stepped, h.state);
}

#[test]
fn stats_count_messages_by_state_with_cumulative_totals() {
    let mut h = with_topic();
    let ids = h.publish("t", vec![entry("a"), entry("bb"), delayed("d", 50)]);
    h.deliver("t", 1, 0);
    h.sleep(10);
    h.ok(ack("t", &ids[0], 1));
    let s = h.stats("t");
    assert_eq!((s.visible, s.in_flight, s.delayed, s.bytes), (1, 0, 1, 3));
    assert_eq!(s.oldest_age_ms, 10);
    let totals = s.totals.unwrap();
    assert_eq!(
        (totals.published, totals.delivered, totals.acked),
        (3, 1, 1)
    );
}

// ----- snapshots -----

/// A state with something of everything: delays, deliveries, dedup entries, dead letters.
fn busy_state() -> Harness {
    let mut h = Harness::at(1_000);
    h.ok(create("t", Some(topic_t(2, "dlq"))));
    let e = |p: &str, key: &str, dedup: &str, delay| ipb::QueuePublishEntry {
        payload: Bytes::from(p.to_string()),
        dedup_id: dedup.into(),
        delay_ms: delay,
        attributes: vec![ipb::QueueAttribute {
            key: "a".into(),
            value: p.into(),
        }],
        ordering_key: key.into(),
    };
    h.publish(
        "t",
        vec![
            e("1", "k", "d1", 0),
            e("2", "k", "", 0),
            e("3", "", "d3", 70),
            e("4", "", "", 0),
        ],
    );
    h.deliver("t", 10, 0);
    h.sleep(100);
    h.deliver("t", 10, 0);
    h.sleep(100);
    h.ok(requeue("t"));
    h.deliver("t", 1, 0);
    h
}

#[test]
fn snapshot_round_trip_gives_an_identical_state() {
    let mut h = busy_state();
    let bytes = h.state.snapshot().encode_to_vec();
    let restored = QueueState::restore(ipb::QueueSnapshot::decode(bytes.as_slice()).unwrap());
    let mut other = Harness {
        state: restored.unwrap(),
        ..h.clone()
    };
    assert_eq!(other.state, h.state);
    assert_eq!(other.state.snapshot(), h.state.snapshot());
    // Both carry on identically: same deliveries, same timers.
    h.sleep(500);
    other.sleep(500);
    let ops = || {
        [
            publish("t", vec![keyed("5", "k")]),
            deliver("t", 10, 0),
            requeue("dlq"),
        ]
    };
    for (a, b) in ops().into_iter().zip(ops()) {
        assert_eq!(h.apply(a), other.apply(b));
    }
    assert_eq!(other.state, h.state);
}

#[test]
fn restore_refuses_a_snapshot_with_a_repeated_message_id() {
    let h = busy_state();
    let mut snap = h.state.snapshot();
    let topic = snap
        .topics
        .iter_mut()
        .find(|t| t.messages.len() > 1)
        .unwrap();
    let first = topic.messages[0].id.clone();
    topic.messages[1].id = first;
    assert!(matches!(
        QueueState::restore(snap),
        Err(RestoreError::BadMessage { .. })
    ));
    let mut snap = h.state.snapshot();
    snap.topics[0].messages[0].status = 99;
    assert!(matches!(
        QueueState::restore(snap),
        Err(RestoreError::BadStatus { .. })
    ));
}
