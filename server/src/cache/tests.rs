//! Scenario tests, one per rule of the protocol, named after it. The world-level ones run in
//! the simulator's calm world (no faults, no drift, 1 ms messages), which also checks every
//! invariant after every event; the node-level ones feed a [`CacheNode`] messages by hand to
//! stage races a calm network would never produce.

use bytes::Bytes;

use super::message::{
    Demand, DemandKind, Envelope, LineGrant, Mutation, ReqId, Stamp, ToHome, ToNode, Write,
    WriteResult, WriteTag,
};
use super::node::{Answer, Lookup, NodeEffect};
use super::sim::{SimConfig, World};
use super::{CacheConfig, CacheError, CacheNode, LineState, Stored};

// ----- helpers ---------------------------------------------------------------------------------

/// L + margin + a renewal: after this, a new directory's wait is over and every node has a lease.
const SETTLE_MS: u64 = 140;

fn world(nodes: usize) -> World {
    let mut w = World::new(7, SimConfig::calm(nodes));
    w.advance(SETTLE_MS).expect("invariants hold");
    w
}

/// A world in which node 1 wrote `k` = "v1" (version returned) and node 2 then read it: both
/// hold it Shared.
fn shared_world(nodes: usize) -> (World, u64) {
    let mut w = world(nodes);
    let v1 = write_ok(&mut w, 1, "k", set("v1"));
    read(&mut w, 2, "k");
    (w, v1)
}

fn set(value: &str) -> Write {
    Write::set(value.to_string())
}

/// Runs a write to completion and returns its version.
fn write_ok(w: &mut World, node: u64, key: &str, write: Write) -> u64 {
    let op = w.start_write(node, key, write).expect("invariants hold");
    match w.wait(op, 500).expect("invariants hold") {
        Some(Ok(Answer::Write(WriteResult::Applied { version, .. }))) => version,
        other => panic!("write on node {node}: {other:?}"),
    }
}

/// Runs a read to completion: (value, version, hit, state after).
fn read(w: &mut World, node: u64, key: &str) -> (Option<Bytes>, u64, bool, LineState) {
    let op = w.start_get(node, key).expect("invariants hold");
    match w.wait(op, 500).expect("invariants hold") {
        Some(Ok(Answer::Read(r))) => (r.stored.value, r.stored.version, r.hit, r.state),
        other => panic!("read on node {node}: {other:?}"),
    }
}

/// The state node `node` would serve `key` in now (Invalid if it would not).
fn serving(w: &World, node: u64, key: &str) -> LineState {
    w.node(node)
        .and_then(|n| n.servable(w.node_now(node), key))
        .map_or(LineState::Invalid, |l| l.state)
}

fn recorded(w: &World, key: &str) -> Vec<(u64, LineState)> {
    w.directory()
        .map(|d| d.holders(key).map(|(n, h)| (n, h.state)).collect())
        .unwrap_or_default()
}

const STAMP: Stamp = Stamp {
    epoch: 1,
    session: 1,
};

/// A node holding a lease of epoch 1, session 1, valid for `CacheConfig::default().lease_ms`
/// from time 0.
fn leased_node(cfg: CacheConfig) -> CacheNode {
    let lease_ms = cfg.lease_ms;
    let mut n = CacheNode::new(1, cfg, 1);
    n.on_message(
        0,
        Envelope {
            stamp: STAMP,
            msg: ToNode::LeaseGrant {
                sent_at: 0,
                lease_ms,
                demands: Vec::new(),
            },
        },
    );
    n.take_effects();
    n
}

/// The requests a node sent since the last call.
fn sent(n: &mut CacheNode) -> Vec<ToHome> {
    n.take_effects()
        .into_iter()
        .filter_map(|e| match e {
            NodeEffect::ToHome(env) => Some(env.msg),
            _ => None,
        })
        .collect()
}

/// Starts a Get of "k" on `n` (operation `op`), which misses, and returns its fill's request id.
fn start_fill(n: &mut CacheNode, op: u64) -> ReqId {
    assert_eq!(n.get(1, op, "k"), Ok(Lookup::Pending));
    fill_request(&sent(n))
}

/// Delivers a demand of `kind` for "k" (operation 9, covering grants up to 5) and returns what
/// the node sent back.
fn demand(n: &mut CacheNode, kind: DemandKind) -> Vec<ToHome> {
    let d = Demand {
        key: "k".into(),
        op: 9,
        upto: 5,
        kind,
    };
    let msg = ToNode::Demand(d);
    n.on_message(2, Envelope { stamp: STAMP, msg });
    sent(n)
}

fn fill_request(msgs: &[ToHome]) -> ReqId {
    msgs.iter()
        .find_map(|m| match m {
            ToHome::FillRequest { req, .. } => Some(*req),
            _ => None,
        })
        .expect("a fill request was sent")
}

fn fill_reply(req: ReqId, version: u64, grant: u64, state: LineState) -> Envelope<ToNode> {
    Envelope {
        stamp: STAMP,
        msg: ToNode::FillReply {
            req,
            result: Ok(Stored {
                version,
                value: Some(Bytes::from_static(b"old")),
                ttl_left_ms: None,
            }),
            line: Some(LineGrant {
                grant,
                state,
                reserved: None,
            }),
        },
    }
}

// ----- the original scenario -------------------------------------------------------------------

#[test]
fn original_scenario_set_on_node_1_miss_on_node_2_then_hit_on_node_1() {
    let mut w = world(3);
    let v1 = write_ok(&mut w, 1, "k1", set("v1"));
    assert_eq!(serving(&w, 1, "k1"), LineState::Modified);
    assert_eq!(recorded(&w, "k1"), [(1, LineState::Modified)]);

    let (value, version, hit, state) = read(&mut w, 2, "k1");
    assert_eq!(
        (value.as_deref(), version, hit),
        (Some(&b"v1"[..]), v1, false)
    );
    assert_eq!(state, LineState::Shared, "filled beside a recalled copy");
    assert_eq!(
        serving(&w, 1, "k1"),
        LineState::Shared,
        "node 1 was recalled"
    );

    let (_, version, hit, state) = read(&mut w, 1, "k1");
    assert!(hit, "node 1 answers from its line");
    assert_eq!((version, state), (v1, LineState::Shared));
    assert_eq!(
        recorded(&w, "k1"),
        [(1, LineState::Shared), (2, LineState::Shared)]
    );
}

// ----- reads ------------------------------------------------------------------------------------

/// Leaves `key` in memory with no cached copy anywhere: written through `node`, whose line is
/// then dropped by a CompareAndSet that expects another version (a writer drops its line when
/// it starts, and a mismatch installs none).
fn uncached(w: &mut World, node: u64, key: &str) -> u64 {
    let version = write_ok(w, node, key, set("v"));
    let cas = Write {
        expect: Some(version + 1000),
        tag: None,
        ..set("never")
    };
    let op = w.start_write(node, key, cas).expect("invariants hold");
    assert!(matches!(
        w.wait(op, 500).expect("invariants hold"),
        Some(Ok(Answer::Write(WriteResult::Mismatch { .. })))
    ));
    assert!(recorded(w, key).is_empty(), "{:?}", recorded(w, key));
    version
}

#[test]
fn a_reader_alone_gets_exclusive_the_next_one_recalls_it_and_both_share() {
    let mut w = world(3);
    uncached(&mut w, 3, "k");
    assert_eq!(read(&mut w, 1, "k").3, LineState::Exclusive);
    assert_eq!(recorded(&w, "k"), [(1, LineState::Exclusive)]);
    assert_eq!(read(&mut w, 2, "k").3, LineState::Shared);
    assert_eq!(
        serving(&w, 1, "k"),
        LineState::Shared,
        "the exclusive copy was recalled"
    );
    assert_eq!(read(&mut w, 3, "k").3, LineState::Shared);
    assert!(read(&mut w, 1, "k").2 && read(&mut w, 2, "k").2, "both hit");
}

#[test]
fn a_missing_key_is_not_an_error_and_is_not_cached() {
    let mut w = world(2);
    let (value, version, hit, state) = read(&mut w, 1, "nothing");
    assert_eq!(
        (value, version, hit, state),
        (None, 0, false, LineState::Invalid)
    );
    assert!(recorded(&w, "nothing").is_empty());
}

// ----- writes -----------------------------------------------------------------------------------

#[test]
fn a_write_invalidates_every_other_holder_before_it_completes() {
    let mut w = world(4);
    write_ok(&mut w, 4, "k", set("v1"));
    for node in 1..=3 {
        read(&mut w, node, "k");
    }
    let v2 = write_ok(&mut w, 1, "k", set("v2"));
    // At the instant the writer learns it is done, no other node serves the old value.
    for node in 2..=4 {
        assert_eq!(serving(&w, node, "k"), LineState::Invalid, "node {node}");
    }
    assert_eq!(serving(&w, 1, "k"), LineState::Modified);
    assert_eq!(recorded(&w, "k"), [(1, LineState::Modified)]);
    assert_eq!(read(&mut w, 3, "k").1, v2);
}

#[test]
fn versions_strictly_increase_per_key_deletions_included() {
    let mut w = world(2);
    let a = write_ok(&mut w, 1, "k", set("a"));
    let delete = Write {
        mutation: Mutation::Delete,
        expect: None,
        tag: None,
    };
    let d = write_ok(&mut w, 2, "k", delete);
    let b = write_ok(&mut w, 1, "k", set("b"));
    assert!(a < d && d < b, "{a} < {d} < {b}");
    // A deleted key reads as absent, with the deletion's version, and is not cached.
    let mut w = world(2);
    write_ok(&mut w, 1, "k", set("a"));
    let delete = Write {
        mutation: Mutation::Delete,
        expect: None,
        tag: None,
    };
    let d = write_ok(&mut w, 1, "k", delete);
    assert_eq!(serving(&w, 1, "k"), LineState::Invalid);
    assert_eq!(read(&mut w, 2, "k"), (None, d, false, LineState::Invalid));
}

#[test]
fn compare_and_set_writes_only_on_the_expected_version() {
    let mut w = world(2);
    let v = write_ok(&mut w, 1, "k", set("a"));
    let stale = Write {
        expect: Some(v - 1),
        tag: None,
        ..set("b")
    };
    let op = w.start_write(2, "k", stale).expect("ok");
    assert_eq!(
        w.wait(op, 500).expect("ok"),
        Some(Ok(Answer::Write(WriteResult::Mismatch { current: v })))
    );
    let fresh = Write {
        expect: Some(v),
        tag: None,
        ..set("c")
    };
    let v2 = write_ok(&mut w, 2, "k", fresh);
    assert_eq!(read(&mut w, 1, "k").0.as_deref(), Some(&b"c"[..]));
    assert!(v2 > v);
}

#[test]
fn a_failed_memory_write_leaves_no_line_and_memory_unchanged() {
    let (mut w, v1) = shared_world(2);
    w.memory_outage(30);
    let op = w.start_write(1, "k", set("v2")).expect("ok");
    let answer = w.wait(op, 500).expect("invariants hold");
    assert!(
        matches!(answer, Some(Err(CacheError::Unavailable(_)))),
        "{answer:?}"
    );
    assert_eq!(w.memory_version("k"), v1);
    assert_eq!(
        serving(&w, 1, "k"),
        LineState::Invalid,
        "the writer dropped its line"
    );
    assert_eq!(
        serving(&w, 2, "k"),
        LineState::Invalid,
        "invalidated: harmless"
    );
    w.advance(40).expect("ok");
    assert_eq!(read(&mut w, 2, "k").0.as_deref(), Some(&b"v1"[..]));
}

// ----- leases -----------------------------------------------------------------------------------

#[test]
fn a_node_cut_off_from_its_directory_stops_hitting_when_its_lease_ends() {
    let (mut w, _) = shared_world(2);
    w.cut(2, true, true);
    let lease = w
        .node(2)
        .map(|n| n.line_view(w.node_now(2), "k").lease_remaining_ms);
    let lease = lease.expect("node 2 is up");
    assert!(lease > 0);
    w.advance(lease - 1).expect("ok");
    assert!(read(&mut w, 2, "k").2, "still a hit within the lease");
    w.advance(1).expect("ok");
    let op = w.start_get(2, "k").expect("ok");
    assert!(
        w.wait(op, 0).expect("ok").is_none(),
        "a miss, which waits for the directory"
    );
    assert_eq!(serving(&w, 2, "k"), LineState::Invalid);
}

#[test]
fn a_write_waits_for_the_lease_of_a_holder_it_cannot_reach() {
    let (mut w, _) = shared_world(2);
    w.cut(2, true, true);
    let started = w.now();
    let op = w.start_write(1, "k", set("v2")).expect("ok");
    let old = w.memory_version("k");
    let mut done_at = None;
    let mut overlapped = false;
    for _ in 0..300 {
        w.advance(1).expect("invariants hold");
        if serving(&w, 2, "k") != LineState::Invalid {
            assert!(
                w.wait(op, 0).expect("ok").is_none(),
                "the write completed while node 2 still served the old value"
            );
            // The memory write does not wait for the invalidation round: it overlaps it.
            overlapped |= w.memory_version("k") > old;
        } else if done_at.is_none() && w.wait(op, 0).expect("ok").is_some() {
            done_at = Some(w.now());
            break;
        }
    }
    let done_at = done_at.expect("the write completed once node 2's lease ran out");
    assert!(
        overlapped,
        "memory was written while the invalidation was still out"
    );
    assert!(
        done_at - started > 50,
        "it waited for the lease: {} ms",
        done_at - started
    );
    w.heal();
    w.advance(SETTLE_MS).expect("ok");
    assert_eq!(read(&mut w, 2, "k").0.as_deref(), Some(&b"v2"[..]));
}

#[test]
fn a_lease_grant_carries_the_invalidations_a_holder_missed() {
    let (mut w, _) = shared_world(2);
    // Node 2 misses the invalidation, then hears from the directory again before its lease
    // ends: the renewal's grant carries it, node 2 drops the line and acknowledges, and the
    // write completes without waiting for the lease.
    w.cut(2, false, true);
    let started = w.now();
    let op = w.start_write(1, "k", set("v2")).expect("ok");
    w.advance(3).expect("ok");
    w.heal();
    let answer = w.wait(op, 300).expect("invariants hold");
    assert!(matches!(answer, Some(Ok(_))), "{answer:?}");
    let took = w.now() - started;
    assert!(
        took < 60,
        "completed on the acknowledgement, not the lease: {took} ms"
    );
    assert_eq!(serving(&w, 2, "k"), LineState::Invalid);
}

#[test]
fn a_node_whose_lease_ran_out_is_forgotten_and_starts_a_new_session() {
    let (mut w, _) = shared_world(2);
    let before = w.node(2).map(|n| n.stamp()).expect("up");
    w.stop_renewals(2, 200);
    w.advance(200).expect("invariants hold");
    assert!(
        recorded(&w, "k").iter().all(|&(n, _)| n != 2),
        "forgotten: {:?}",
        recorded(&w, "k")
    );
    w.advance(40).expect("ok");
    let after = w.node(2).map(|n| n.stamp()).expect("up");
    assert!(after.session > before.session, "{before:?} -> {after:?}");
    assert_eq!(serving(&w, 2, "k"), LineState::Invalid, "old lines dropped");
    assert!(!read(&mut w, 2, "k").2);
}

// ----- epochs -----------------------------------------------------------------------------------

#[test]
fn a_new_epoch_writes_nothing_until_every_old_lease_has_run_out() {
    let (mut w, _) = shared_world(3);
    read(&mut w, 3, "k");
    w.change_epoch(0);
    w.advance(1).expect("ok");
    let started = w.now();
    let op = w.start_write(1, "k", set("v2")).expect("ok");
    let answer = w.wait(op, 400).expect("invariants hold");
    assert!(matches!(answer, Some(Ok(_))), "{answer:?}");
    let cfg = SimConfig::calm(1).cache;
    assert!(
        w.now() - started >= cfg.directory_lease_ms() - 1,
        "waited L + margin: {} ms",
        w.now() - started
    );
    // Every node dropped its epoch-1 lines on hearing of epoch 2.
    assert_eq!(serving(&w, 3, "k"), LineState::Invalid);
    // Reads during the wait wait it out too (a write of the old directory may have reached
    // memory while a node of the old epoch still serves the value before it), and are not
    // cached.
    w.change_epoch(0);
    w.advance(1).expect("ok");
    let started = w.now();
    let (_, _, hit, state) = read(&mut w, 3, "k");
    assert_eq!((hit, state), (false, LineState::Invalid));
    assert!(
        w.now() - started >= cfg.directory_lease_ms() - 1,
        "the read waited L + margin: {} ms",
        w.now() - started
    );
    w.advance(SETTLE_MS).expect("ok");
    assert_eq!(read(&mut w, 3, "k").3, LineState::Exclusive);
}

// ----- capacity and TTL -------------------------------------------------------------------------

#[test]
fn evicting_the_least_recently_used_line_tells_the_directory() {
    let cfg = SimConfig {
        capacities: vec![24],
        ..SimConfig::calm(2)
    };
    let mut w = World::new(7, cfg);
    w.advance(SETTLE_MS).expect("ok");
    for key in ["a", "b", "c"] {
        write_ok(&mut w, 2, key, set("ten bytes!"));
    }
    read(&mut w, 1, "a");
    read(&mut w, 1, "b");
    assert!(read(&mut w, 1, "a").2, "a hit: a is now the most recent");
    read(&mut w, 1, "c");
    assert_eq!(
        serving(&w, 1, "b"),
        LineState::Invalid,
        "b was least recently used"
    );
    assert_ne!(serving(&w, 1, "a"), LineState::Invalid);
    w.advance(3).expect("ok");
    assert!(recorded(&w, "b").iter().all(|&(n, _)| n != 1));
}

#[test]
fn a_line_past_its_ttl_is_a_miss() {
    let mut w = world(2);
    let write = Write::set_with_ttl(Bytes::from_static(b"v"), 30);
    write_ok(&mut w, 1, "k", write);
    assert!(read(&mut w, 1, "k").2);
    w.advance(30).expect("ok");
    let (value, _, hit, _) = read(&mut w, 1, "k");
    assert_eq!((value, hit), (None, false), "expired in memory too");
}

#[test]
fn a_value_over_the_maximum_size_is_an_invalid_argument_and_one_over_the_capacity_is_exhausted() {
    let cfg = CacheConfig {
        capacity_bytes: 100,
        max_value_bytes: 50,
        ..CacheConfig::default()
    };
    let mut n = leased_node(cfg.clone());
    let big = |len| Write::set(vec![b'x'; len]);
    assert!(matches!(
        n.write(1, 1, "k", big(51)),
        Err(CacheError::InvalidArgument(_))
    ));
    assert!(matches!(
        n.get(1, 2, ""),
        Err(CacheError::InvalidArgument(_))
    ));
    let tight = CacheConfig {
        capacity_bytes: 40,
        ..cfg
    };
    let mut n = leased_node(tight);
    assert!(matches!(
        n.write(1, 3, "k", big(45)),
        Err(CacheError::ResourceExhausted(_))
    ));
    assert!(sent(&mut n).is_empty(), "nothing was sent");
}

// ----- races, staged by hand --------------------------------------------------------------------

#[test]
fn a_fill_that_raced_an_invalidation_answers_its_reader_but_is_not_cached() {
    let mut n = leased_node(CacheConfig::default());
    let req = start_fill(&mut n, 1);
    // The directory served the fill (grant 5), then a write invalidated the node; the
    // invalidation overtakes the reply.
    let acks = demand(&mut n, DemandKind::Invalidate);
    let ack = ToHome::InvalidateAck {
        key: "k".into(),
        op: 9,
    };
    assert_eq!(acks, [ack]);
    n.on_message(3, fill_reply(req, 4, 5, LineState::Exclusive));
    let effects = n.take_effects();
    assert!(effects.iter().any(|e| matches!(
        e,
        NodeEffect::Done {
            op: 1,
            result: Ok(_)
        }
    )));
    assert!(n.servable(4, "k").is_none(), "not cached");
    // The directory is told, so that it can drop any record of grant 5.
    assert!(effects.iter().any(|e| matches!(
        e,
        NodeEffect::ToHome(Envelope {
            msg: ToHome::Evicted { grant: 5, .. },
            ..
        })
    )));
}

#[test]
fn a_fill_that_raced_a_recall_is_not_cached_either() {
    let mut n = leased_node(CacheConfig::default());
    let req = start_fill(&mut n, 1);
    let ack = ToHome::RecallAck {
        key: "k".into(),
        op: 9,
        kept: false,
    };
    let acks = demand(&mut n, DemandKind::Recall);
    assert_eq!(acks, [ack], "it told the directory it keeps nothing");
    n.on_message(3, fill_reply(req, 4, 5, LineState::Exclusive));
    assert!(
        n.servable(4, "k").is_none(),
        "so it must not install the exclusive line"
    );
}

#[test]
fn a_reply_older_than_the_line_held_does_not_replace_it() {
    let mut n = leased_node(CacheConfig::default());
    let first = start_fill(&mut n, 1);
    let second = start_fill(&mut n, 2);
    n.on_message(2, fill_reply(second, 7, 6, LineState::Shared));
    n.on_message(3, fill_reply(first, 4, 5, LineState::Exclusive));
    let line = n.servable(4, "k").expect("the newer line stays");
    assert_eq!(
        (line.version, line.grant, line.state),
        (7, 6, LineState::Shared)
    );
}

#[test]
fn replies_meant_for_a_previous_run_of_the_node_are_ignored() {
    let mut old = leased_node(CacheConfig::default());
    let req = start_fill(&mut old, 1);
    let mut restarted = CacheNode::new(1, CacheConfig::default(), 2);
    restarted.get(1, 1, "k").expect("valid");
    restarted.take_effects();
    restarted.on_message(2, fill_reply(req, 4, 5, LineState::Exclusive));
    let answered = restarted
        .take_effects()
        .into_iter()
        .any(|e| matches!(e, NodeEffect::Done { .. }));
    assert!(!answered, "not an answer to this run's request");
    assert!(restarted.servable(3, "k").is_none());
}

#[test]
fn a_grant_of_a_new_session_drops_every_line_of_the_old_one() {
    let mut n = leased_node(CacheConfig::default());
    let req = start_fill(&mut n, 1);
    n.on_message(2, fill_reply(req, 4, 5, LineState::Exclusive));
    assert!(n.servable(3, "k").is_some());
    let new_session = Envelope {
        stamp: Stamp::new(1, 2),
        msg: ToNode::LeaseGrant {
            sent_at: 3,
            lease_ms: 100,
            demands: Vec::new(),
        },
    };
    n.on_message(4, new_session);
    assert!(n.servable(5, "k").is_none());
    assert_eq!(n.stats().2, 0, "dropped, not merely unserved");
    let reported = n.take_effects().into_iter().any(|e| {
        matches!(e, NodeEffect::Invalidated(ev) if ev.key == "k"
            && ev.reason == super::node::InvalidationReason::LeaseExpired)
    });
    assert!(reported, "near caches are told");
    assert!(
        n.line_view(5, "k").lease_remaining_ms > 0,
        "but the node has a lease again"
    );
}

// ----- regressions ------------------------------------------------------------------------------

/// Found by the simulator (seed 31656 of the 40,000-seed soak): a write sent under epoch 1 and
/// delivered to the directory of epoch 2 named an epoch-1 grant as the line its writer had
/// dropped. The directory compared it with its own grant numbers, dropped its record of the
/// writer's epoch-2 line without invalidating it, and the writer kept serving that line after
/// memory changed.
#[test]
fn a_write_stamped_with_an_older_epoch_still_invalidates_its_writers_line() {
    use super::Directory;
    use super::directory::HomeEffect;
    use super::memory::MemoryReply;

    let cfg = SimConfig::calm(1).cache;
    let t = cfg.directory_lease_ms() + 1; // past the new-epoch wait
    let mut d = Directory::new(cfg, 2, 0);
    let renew = ToHome::LeaseRenew { sent_at: 0 };
    d.on_message(
        t,
        2,
        Envelope {
            stamp: Stamp::new(2, 0),
            msg: renew,
        },
    );
    let session = d.session_of(2, t).expect("a lease");
    let fill = ToHome::FillRequest {
        req: ReqId {
            incarnation: 1,
            seq: 1,
        },
        key: "k".into(),
    };
    d.on_message(
        t,
        2,
        Envelope {
            stamp: Stamp::new(2, session),
            msg: fill,
        },
    );
    let read = d
        .take_effects()
        .into_iter()
        .find_map(|e| match e {
            HomeEffect::Memory(r) => Some(r.id),
            _ => None,
        })
        .expect("a memory read");
    let stored = Stored {
        version: 3,
        value: Some(Bytes::from_static(b"v")),
        ttl_left_ms: None,
    };
    d.on_memory(t, read, Ok(MemoryReply::Read(stored)));
    d.take_effects();
    assert_eq!(d.holders("k").count(), 1);

    let write = ToHome::WriteRequest {
        req: ReqId {
            incarnation: 1,
            seq: 2,
        },
        key: "k".into(),
        write: set("w"),
        dropped_upto: 8,
    };
    d.on_message(
        t,
        2,
        Envelope {
            stamp: Stamp::new(1, 5),
            msg: write,
        },
    );
    let effects = d.take_effects();
    let invalidated = effects.iter().any(|e| {
        matches!(e, HomeEffect::ToNode { to: 2, msg: Envelope { msg: ToNode::Demand(dm), .. } }
            if dm.kind == DemandKind::Invalidate)
    });
    assert!(invalidated, "{effects:?}");
    // The memory write overlaps the invalidation, but the write completes only after it.
    let memory_write = effects
        .iter()
        .find_map(|e| match e {
            HomeEffect::Memory(r) => Some(r.id),
            _ => None,
        })
        .expect("the memory write goes out with the invalidation");
    let applied = WriteResult::Applied {
        version: 4,
        existed: true,
    };
    d.on_memory(t, memory_write, Ok(MemoryReply::Written(applied)));
    let effects = d.take_effects();
    assert!(
        !effects.iter().any(|e| matches!(
            e,
            HomeEffect::ToNode {
                msg: Envelope {
                    msg: ToNode::WriteDone { .. },
                    ..
                },
                ..
            }
        )),
        "the write waits for the invalidation: {effects:?}"
    );
}

// ----- write-back mode -----------------------------------------------------------------------

/// A calm world in write-back mode, flushing `flush_ms` after a line's first unflushed write.
fn write_back_world(nodes: usize, flush_ms: u64) -> World {
    let mut cfg = SimConfig::calm(nodes);
    cfg.cache.write_back = Some(super::WriteBackConfig { flush_ms, block: 8 });
    let mut w = World::new(7, cfg);
    w.advance(SETTLE_MS).expect("invariants hold");
    w
}

/// A write-back world in which node 1 wrote `k` = "v1" through the directory (an M line with
/// reserved versions) and then "v2" locally: returns the world and both versions.
fn dirty_world(flush_ms: u64) -> (World, u64, u64) {
    let mut w = write_back_world(2, flush_ms);
    let v1 = write_ok(&mut w, 1, "k", set("v1"));
    let Some(WriteResult::Applied { version: v2, .. }) = write_locally(&mut w, 1, "k", set("v2"))
    else {
        panic!("node 1 holds k in M with reserved versions: its write is local");
    };
    (w, v1, v2)
}

/// Starts a write and returns its answer if it came within the same call (served locally).
fn write_locally(w: &mut World, node: u64, key: &str, write: Write) -> Option<WriteResult> {
    let op = w.start_write(node, key, write).expect("invariants hold");
    match w.answered(op) {
        Some(Ok(Answer::Write(r))) => Some(r),
        None => None,
        other => panic!("write on node {node}: {other:?}"),
    }
}

#[test]
fn an_exclusive_holder_writes_locally_without_a_message_and_memory_is_behind() {
    let (mut w, v1, v2) = dirty_world(1_000);
    assert!(v2 > v1);
    assert_eq!(w.memory_version("k"), v1, "not written back yet");
    assert_eq!(serving(&w, 1, "k"), LineState::Modified);
    // A CompareAndSet compares with the line, which is the key's newest version.
    let mut cas = set("v3");
    cas.expect = Some(v1);
    assert_eq!(
        write_locally(&mut w, 1, "k", cas),
        Some(WriteResult::Mismatch { current: v2 })
    );
}

#[test]
fn a_read_elsewhere_makes_the_dirty_holder_write_back_first() {
    let (mut w, _, v2) = dirty_world(1_000);
    let (value, version, hit, state) = read(&mut w, 2, "k");
    assert_eq!(
        (value.as_deref(), version, hit),
        (Some(&b"v2"[..]), v2, false)
    );
    assert_eq!(
        w.memory_version("k"),
        v2,
        "written back before the fill read memory"
    );
    // The dirty holder dropped its line with the recall; the reader has the key to itself.
    assert_eq!(serving(&w, 1, "k"), LineState::Invalid);
    assert_eq!(state, LineState::Exclusive);
}

#[test]
fn a_write_elsewhere_sees_the_dirty_version_and_comes_after_it() {
    let (mut w, v1, v2) = dirty_world(1_000);
    let mut cas = set("v3");
    cas.expect = Some(v2);
    let v3 = write_ok(&mut w, 2, "k", cas);
    // Node 1's write reserved versions v1 + 1 ..= v1 + 8 (block 8) for its line.
    assert!(v3 > v1 + 8, "above node 1's reserved block");
    assert_eq!(serving(&w, 1, "k"), LineState::Invalid);
}

#[test]
fn a_dirty_line_is_written_back_within_the_flush_interval_and_stays_modified() {
    let (mut w, _, v2) = dirty_world(40);
    w.advance(40).expect("invariants hold");
    assert_eq!(w.memory_version("k"), v2);
    assert_eq!(serving(&w, 1, "k"), LineState::Modified);
    assert!(
        write_locally(&mut w, 1, "k", set("v3")).is_some(),
        "clean M writes locally"
    );
}

#[test]
fn a_line_dirty_for_a_whole_flush_interval_takes_no_more_local_writes() {
    let (mut w, _, _) = dirty_world(40);
    // Memory refuses every write-back: the line stays dirty.
    w.memory_outage(200);
    w.advance(39).expect("invariants hold");
    assert!(
        write_locally(&mut w, 1, "k", set("v3")).is_some(),
        "still inside the interval"
    );
    w.advance(1).expect("invariants hold");
    assert_eq!(
        write_locally(&mut w, 1, "k", set("v4")),
        None,
        "waits for the line to be written back"
    );
}

#[test]
fn tagged_writes_deletes_and_ttls_are_not_served_locally() {
    let mut w = write_back_world(2, 1_000);
    write_ok(&mut w, 1, "k", set("v1"));
    let mut tagged = set("t");
    tagged.tag = Some(WriteTag {
        client_id: 9,
        sequence: 1,
        lowest_unacked: 1,
    });
    assert_eq!(write_locally(&mut w, 1, "k", tagged), None);
    write_ok(&mut w, 1, "k", set("v2"));
    let ttl = Write::set_with_ttl(Bytes::from_static(b"x"), 1_000);
    assert_eq!(write_locally(&mut w, 1, "k", ttl), None);
}

#[test]
fn a_crashed_holder_loses_its_unflushed_writes_but_never_a_version() {
    let (mut w, v1, v2) = dirty_world(1_000);
    w.crash_node(1, 10_000);
    // Node 2's read waits out node 1's lease (the recall gets no answer), then reads memory:
    // the lost write is gone.
    let (_, version, _, _) = read(&mut w, 2, "k");
    assert_eq!(version, v1);
    let v3 = write_ok(&mut w, 2, "k", set("v3"));
    assert!(
        v3 > v2 + 8 - 1,
        "above node 1's whole reserved block, {v3} vs {v2}"
    );
}
