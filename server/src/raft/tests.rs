//! Paper-rule and regression tests of the engine, each named after the rule it checks or the
//! bug it catches. Most drive one engine with hand-made messages, so the scenario is exact; the
//! rest use [`Net`], a tiny synchronous network of engines with isolatable members.

use std::collections::VecDeque;

use bytes::Bytes;
use sync_proto::raft::v1 as pb;

use super::sim::mem_cluster::{MemCluster as Net, voters as members};
use super::sim::state_machine::{Snapshot, StateMachine};
use super::*;

// ----- helpers -------------------------------------------------------------------------------

fn entry(index: u64, term: u64) -> pb::Entry {
    pb::Entry {
        term,
        index,
        data: Bytes::from(format!("e{index}t{term}")),
        ..Default::default()
    }
}

fn entries(from: u64, terms: &[u64]) -> Vec<pb::Entry> {
    terms
        .iter()
        .enumerate()
        .map(|(i, &t)| entry(from + i as u64, t))
        .collect()
}

/// An engine restored with `term`, `log` (terms of entries 1..) and `commit`.
fn restored(id: u64, voters: &[u64], term: u64, log: &[u64], commit: u64) -> RaftNode {
    let hs = pb::HardState {
        term,
        vote: 0,
        commit,
    };
    RaftNode::restore(Config::new(id), members(voters), hs, None, entries(1, log)).unwrap()
}

/// Acts on the engine's Ready as a runtime with instant, perfect storage would, returning the
/// messages it sent.
fn persist(node: &mut RaftNode) -> Vec<Message> {
    let mut out = Vec::new();
    while node.has_ready() {
        let rd = node.ready();
        out.extend(rd.messages);
        if let Some(last) = rd.entries.last() {
            node.on_persisted(last.index, last.term);
        }
        out.extend(rd.persisted_messages);
    }
    out
}

fn vote_granted(from: u64, to: u64, term: u64, pre_vote: bool) -> Message {
    Message::RequestVoteResponse(pb::RequestVoteResponse {
        group_id: 0,
        term,
        from,
        to,
        granted: true,
        pre_vote,
    })
}

/// Makes `node` leader by feeding it granted (pre-)votes from `voters`.
fn make_leader(node: &mut RaftNode, voters: &[u64]) {
    node.campaign();
    let _ = persist(node);
    if node.role() == Role::PreCandidate {
        let term = node.term() + 1;
        for &v in voters {
            node.step(vote_granted(v, node.id(), term, true)).unwrap();
        }
        let _ = persist(node);
    }
    let term = node.term();
    for &v in voters {
        if node.role() == Role::Candidate {
            node.step(vote_granted(v, node.id(), term, false)).unwrap();
        }
    }
    let _ = persist(node);
    assert_eq!(node.role(), Role::Leader);
}

fn append_ok(from: u64, to: u64, term: u64, index: u64) -> Message {
    Message::AppendEntriesResponse(pb::AppendEntriesResponse {
        group_id: 0,
        term,
        from,
        to,
        rejected: false,
        index,
        ..Default::default()
    })
}

fn append(
    from: u64,
    to: u64,
    term: u64,
    prev: (u64, u64),
    ents: Vec<pb::Entry>,
    commit: u64,
) -> Message {
    Message::AppendEntries(pb::AppendEntriesRequest {
        group_id: 0,
        term,
        from,
        to,
        prev_log_index: prev.0,
        prev_log_term: prev.1,
        entries: ents,
        leader_commit: commit,
        heartbeat: false,
        read_round: 0,
    })
}

// ----- elections -----------------------------------------------------------------------------

#[test]
fn a_member_votes_at_most_once_per_term() {
    let mut n = restored(1, &[1, 2, 3], 5, &[1, 2], 0);
    let req = |from| {
        Message::RequestVote(pb::RequestVoteRequest {
            group_id: 0,
            term: 6,
            from,
            to: 1,
            last_log_index: 2,
            last_log_term: 2,
            pre_vote: false,
            leadership_transfer: false,
        })
    };
    n.step(req(2)).unwrap();
    n.step(req(3)).unwrap();
    let granted: Vec<(u64, bool)> = persist(&mut n)
        .into_iter()
        .filter_map(|m| match m {
            Message::RequestVoteResponse(r) => Some((r.to, r.granted)),
            _ => None,
        })
        .collect();
    assert_eq!(granted, vec![(2, true), (3, false)]);
}

#[test]
fn a_vote_is_refused_to_a_candidate_whose_log_is_less_up_to_date() {
    let mut n = restored(1, &[1, 2, 3], 5, &[1, 3], 0);
    n.step(Message::RequestVote(pb::RequestVoteRequest {
        group_id: 0,
        term: 6,
        from: 2,
        to: 1,
        last_log_index: 5,
        last_log_term: 2,
        pre_vote: false,
        leadership_transfer: false,
    }))
    .unwrap();
    let granted = persist(&mut n)
        .into_iter()
        .any(|m| matches!(m, Message::RequestVoteResponse(r) if r.granted));
    assert!(
        !granted,
        "a longer log of an older term is less up-to-date (§5.4.1)"
    );
}

#[test]
fn term_and_vote_are_persisted_before_any_reply() {
    let mut n = restored(1, &[1, 2, 3], 1, &[1], 0);
    n.step(Message::RequestVote(pb::RequestVoteRequest {
        group_id: 0,
        term: 2,
        from: 2,
        to: 1,
        last_log_index: 1,
        last_log_term: 1,
        pre_vote: false,
        leadership_transfer: false,
    }))
    .unwrap();
    let rd = n.ready();
    assert!(
        rd.messages.is_empty(),
        "nothing may leave before the vote is durable"
    );
    assert_eq!(
        rd.hard_state,
        Some(pb::HardState {
            term: 2,
            vote: 2,
            commit: 0
        })
    );
    assert!(matches!(
        rd.persisted_messages.as_slice(),
        [Message::RequestVoteResponse(r)] if r.granted
    ));

    // The same holds for a candidate's own vote, and for an append acknowledgement.
    let mut c = restored(1, &[1, 2, 3], 1, &[1], 0);
    let mut cfg_no_prevote = c.settings().clone();
    cfg_no_prevote.pre_vote = false;
    c = RaftNode::restore(
        cfg_no_prevote,
        members(&[1, 2, 3]),
        c.hard_state(),
        None,
        entries(1, &[1]),
    )
    .unwrap();
    c.campaign();
    let rd = c.ready();
    assert_eq!(rd.hard_state.map(|h| (h.term, h.vote)), Some((2, 1)));
    assert!(rd.messages.is_empty());
    assert_eq!(rd.persisted_messages.len(), 2);

    let mut f = restored(1, &[1, 2, 3], 1, &[1], 0);
    f.step(append(2, 1, 1, (1, 1), entries(2, &[1]), 0))
        .unwrap();
    let rd = f.ready();
    assert_eq!(rd.entries.len(), 1);
    assert!(rd.messages.is_empty());
    assert!(matches!(
        rd.persisted_messages.as_slice(),
        [Message::AppendEntriesResponse(r)] if !r.rejected && r.index == 2
    ));
}

#[test]
fn prevote_and_checkquorum_a_rejoining_partitioned_member_does_not_unseat_a_healthy_leader() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    let term = net.node(1).term();
    net.isolated.insert(3);
    // Many election timeouts: node 3 keeps asking for pre-votes, which nobody answers.
    net.tick(200);
    assert_eq!(
        net.node(3).term(),
        term,
        "pre-vote keeps the cut-off member's term"
    );
    net.isolated.clear();
    net.tick(30);
    assert_eq!(net.leaders(), vec![1]);
    assert_eq!(net.node(1).term(), term);
    assert_eq!(net.node(3).leader(), Some(1));
}

#[test]
fn checkquorum_a_leader_that_lost_its_majority_steps_down() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.isolated.insert(1);
    net.tick(25);
    assert_ne!(net.node(1).role(), Role::Leader);
    let others = net.leaders();
    assert_eq!(others.len(), 1, "the majority side elected a new leader");
    assert_ne!(others[0], 1);
}

#[test]
fn leader_stickiness_a_member_that_hears_from_its_leader_ignores_vote_requests() {
    let mut n = restored(1, &[1, 2, 3], 1, &[1], 1);
    n.step(append(2, 1, 1, (1, 1), vec![], 1)).unwrap();
    let _ = persist(&mut n);
    n.step(Message::RequestVote(pb::RequestVoteRequest {
        group_id: 0,
        term: 5,
        from: 3,
        to: 1,
        last_log_index: 9,
        last_log_term: 1,
        pre_vote: false,
        leadership_transfer: false,
    }))
    .unwrap();
    assert_eq!(n.term(), 1, "the request's higher term is ignored");
    assert_eq!(n.leader(), Some(2));
}

// ----- replication and commitment ------------------------------------------------------------

#[test]
fn figure_8_an_entry_of_an_earlier_term_is_not_committed_by_counting_replicas() {
    // Node 1 holds entries (1, t1) and (2, t1); only entry 1 is committed. It becomes leader
    // in term 3 and appends its no-op (3, t3).
    let mut n = restored(1, &[1, 2, 3, 4, 5], 2, &[1, 1], 1);
    make_leader(&mut n, &[2, 3]);
    assert_eq!((n.last_index(), n.last_term()), (3, 3));
    let term = n.term();
    // A majority (1, 2, 3) now holds entry 2 of term 1: it must NOT be committed by counting,
    // because a leader of a later term could still overwrite it (Figure 8, (c) to (d)).
    n.step(append_ok(2, 1, term, 2)).unwrap();
    n.step(append_ok(3, 1, term, 2)).unwrap();
    let _ = persist(&mut n);
    assert_eq!(n.commit_index(), 1);
    // Once the entry of the current term is on a majority, both commit (Figure 8, (e)).
    n.step(append_ok(2, 1, term, 3)).unwrap();
    n.step(append_ok(3, 1, term, 3)).unwrap();
    let _ = persist(&mut n);
    assert_eq!(n.commit_index(), 3);
}

#[test]
fn a_leader_counts_its_own_entries_only_once_they_are_durable() {
    let mut n = restored(1, &[1, 2, 3], 1, &[1], 1);
    make_leader(&mut n, &[2, 3]);
    let term = n.term();
    let index = n.propose(Bytes::from_static(b"x"), None).unwrap();
    let rd = n.ready(); // taken, not yet persisted
    assert!(rd.entries.iter().any(|e| e.index == index));
    n.step(append_ok(2, 1, term, index)).unwrap();
    assert!(
        n.commit_index() < index,
        "1 durable copy of 3 is no majority"
    );
    n.on_persisted(index, term);
    assert_eq!(n.commit_index(), index);
}

#[test]
fn a_stale_append_entries_must_not_truncate_committed_entries() {
    let mut f = restored(1, &[1, 2, 3], 2, &[1, 1, 2, 2, 2], 3);
    // A delayed copy of an older message from the same leader: it holds a prefix of our log.
    f.step(append(2, 1, 2, (2, 1), entries(3, &[2]), 3))
        .unwrap();
    let out = persist(&mut f);
    assert_eq!(f.last_index(), 5, "matching entries never truncate the log");
    assert!(matches!(
        out.as_slice(),
        [Message::AppendEntriesResponse(r)] if !r.rejected && r.index == 3
    ));
    // A message whose prev is below the commit index is answered with the commit index.
    f.step(append(2, 1, 2, (1, 1), entries(2, &[1]), 3))
        .unwrap();
    let out = persist(&mut f);
    assert_eq!(f.last_index(), 5);
    assert!(matches!(
        out.as_slice(),
        [Message::AppendEntriesResponse(r)] if !r.rejected && r.index == 3
    ));
}

#[test]
fn a_follower_truncates_a_conflicting_uncommitted_suffix() {
    let mut f = restored(1, &[1, 2, 3], 3, &[1, 1, 2, 2], 2);
    f.step(append(2, 1, 3, (2, 1), entries(3, &[3]), 3))
        .unwrap();
    let _ = persist(&mut f);
    assert_eq!((f.last_index(), f.last_term()), (3, 3));
    assert_eq!(f.commit_index(), 3);
}

#[test]
fn a_follower_never_commits_past_the_entries_it_knows_match_the_leader() {
    // Entries 3..4 of term 2 may differ from the leader's; only up to prev+len is known to match.
    let mut f = restored(1, &[1, 2, 3], 3, &[1, 1, 2, 2], 1);
    f.step(append(2, 1, 3, (2, 1), vec![], 4)).unwrap();
    let _ = persist(&mut f);
    assert_eq!(f.commit_index(), 2);
}

#[test]
fn fast_backtracking_skips_a_whole_conflicting_term_in_one_round_trip() {
    // Follower 2 has a long tail of term 2 that the leader (term 4) does not have.
    let mut leader = restored(1, &[1, 2, 3], 3, &[1, 1, 3, 3, 3], 2);
    make_leader(&mut leader, &[3]);
    let mut follower = restored(2, &[1, 2, 3], 3, &[1, 1, 2, 2, 2, 2, 2, 2], 2);
    leader.tick(); // a heartbeat starts the exchange
    let mut to_follower: VecDeque<Message> = persist(&mut leader)
        .into_iter()
        .filter(|m| m.to() == 2)
        .collect();
    let mut appends = 0;
    while let Some(m) = to_follower.pop_front() {
        let repaired =
            follower.term_at(3) == Some(3) && follower.last_index() == leader.last_index();
        if !repaired && matches!(&m, Message::AppendEntries(r) if !r.heartbeat) {
            appends += 1;
        }
        assert!(appends < 10, "backtracking does not converge");
        follower.step(m).unwrap();
        for reply in persist(&mut follower) {
            leader.step(reply).unwrap();
        }
        to_follower.extend(persist(&mut leader).into_iter().filter(|m| m.to() == 2));
    }
    assert_eq!(follower.last_index(), leader.last_index());
    assert_eq!(follower.term_at(3), Some(3));
    // One probe finds the conflict term, the second AppendEntries carries the fix. Without
    // term hints it would take one probe per conflicting entry (6 here).
    assert!(appends <= 2, "took {appends} AppendEntries");
}

#[test]
fn pipelining_sends_up_to_the_inflight_window_without_waiting() {
    let mut n = restored(1, &[1, 2], 1, &[1], 1);
    make_leader(&mut n, &[2]);
    let term = n.term();
    n.step(append_ok(2, 1, term, n.last_index())).unwrap(); // now in Replicate state
    let _ = persist(&mut n);
    let window = n.settings().max_inflight_msgs;
    for i in 0..window + 10 {
        n.propose(Bytes::from(format!("{i}")), None).unwrap();
        let _ = persist(&mut n);
    }
    let peers = n.peers();
    assert_eq!(peers[0].state, ProgressState::Replicate);
    // Without acknowledgements, exactly `window` messages went out; the rest wait.
    assert_eq!(peers[0].next, n.last_index() - 10 + 1);
}

fn append_rejected(from: u64, term: u64, prev: u64, hint: u64) -> Message {
    Message::AppendEntriesResponse(pb::AppendEntriesResponse {
        term,
        from,
        to: 1,
        rejected: true,
        index: prev,
        hint_index: hint,
        ..Default::default()
    })
}

/// The AppendEntries (not heartbeats) in `msgs`, as (prev_log_index, first, last) entry index.
fn appends_sent(msgs: &[Message]) -> Vec<(u64, u64, u64)> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::AppendEntries(r) if !r.heartbeat => Some((
                r.prev_log_index,
                r.entries.first().map_or(0, |e| e.index),
                r.entries.last().map_or(0, |e| e.index),
            )),
            _ => None,
        })
        .collect()
}

/// Leader 1 of {1, 2} with follower 2 in Replicate state, caught up: (engine, term, match).
fn replicating_leader() -> (RaftNode, u64, u64) {
    let mut n = restored(1, &[1, 2], 1, &[1], 1);
    make_leader(&mut n, &[2]);
    let term = n.term();
    n.step(append_ok(2, 1, term, n.last_index())).unwrap();
    let _ = persist(&mut n);
    let matched = n.last_index();
    (n, term, matched)
}

#[test]
fn a_rejected_pipelined_message_falls_back_to_probing_from_the_match_point() {
    let (mut n, term, matched) = replicating_leader();
    let mut sent = Vec::new();
    for i in 0..3 {
        n.propose(Bytes::from(format!("{i}")), None).unwrap();
        sent.extend(appends_sent(&persist(&mut n)));
    }
    assert_eq!(
        sent,
        vec![
            (matched, matched + 1, matched + 1),
            (matched + 1, matched + 2, matched + 2),
            (matched + 2, matched + 3, matched + 3)
        ],
        "three messages in flight without waiting"
    );
    assert_eq!(n.peers()[0].inflight, 3);
    // The first message was lost: the follower rejects the second, whose prev it lacks.
    n.step(append_rejected(2, term, matched + 1, matched))
        .unwrap();
    let probe = appends_sent(&persist(&mut n));
    let p = &n.peers()[0];
    assert_eq!(p.state, ProgressState::Probe);
    assert_eq!(p.inflight, 0, "the window is forgotten on the way to Probe");
    assert_eq!(
        probe,
        vec![(matched, matched + 1, matched + 3)],
        "one probe, resending everything after the match point"
    );
    // The rejection of the third message answers a message the leader already gave up on.
    n.step(append_rejected(2, term, matched + 2, matched))
        .unwrap();
    assert!(
        appends_sent(&persist(&mut n)).is_empty(),
        "a stale rejection sends nothing while the probe is out"
    );
    assert_eq!(n.peers()[0].next, matched + 1);
    // The probe is accepted: back to streaming.
    n.step(append_ok(2, 1, term, matched + 3)).unwrap();
    let _ = persist(&mut n);
    let p = &n.peers()[0];
    assert_eq!(
        (p.state, p.matched),
        (ProgressState::Replicate, matched + 3)
    );
}

#[test]
fn a_late_acknowledgement_inside_the_window_frees_only_the_messages_it_covers() {
    let (mut n, term, matched) = replicating_leader();
    for i in 0..4 {
        n.propose(Bytes::from(format!("{i}")), None).unwrap();
        let _ = persist(&mut n);
    }
    assert_eq!(n.peers()[0].inflight, 4);
    // Answers arrive out of order: the third, then (late) the first.
    n.step(append_ok(2, 1, term, matched + 3)).unwrap();
    let _ = persist(&mut n);
    assert_eq!(n.peers()[0].inflight, 1);
    n.step(append_ok(2, 1, term, matched + 1)).unwrap();
    let _ = persist(&mut n);
    let p = &n.peers()[0];
    assert_eq!(
        (p.state, p.matched, p.inflight),
        (ProgressState::Replicate, matched + 3, 1),
        "an older acknowledgement neither lowers the match nor frees the fourth message"
    );
}

// ----- reads ---------------------------------------------------------------------------------

/// The highest read round among the heartbeats in `msgs`.
fn heartbeat_round(msgs: &[Message]) -> Option<u64> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::AppendEntries(r) if r.heartbeat => Some(r.read_round),
            _ => None,
        })
        .max()
}

fn heartbeat_ack(from: u64, term: u64, round: u64) -> Message {
    Message::AppendEntriesResponse(pb::AppendEntriesResponse {
        group_id: 0,
        term,
        from,
        to: 1,
        heartbeat: true,
        read_round: round,
        index: 0,
        ..Default::default()
    })
}

#[test]
fn read_index_right_after_a_leader_change_waits_for_an_entry_of_the_new_term() {
    let mut n = restored(1, &[1, 2, 3], 1, &[1, 1], 1);
    make_leader(&mut n, &[2, 3]);
    let term = n.term();
    n.read_index(7).unwrap();
    n.tick(); // heartbeats go out
    let rd = n.ready();
    assert!(
        rd.read_states.is_empty(),
        "no read before the new term's no-op commits"
    );
    let early_round = heartbeat_round(&rd.messages).expect("heartbeats were sent");
    // A majority confirming leadership is not enough while the no-op is uncommitted: the
    // commit index might still be behind the previous leader's.
    n.step(heartbeat_ack(2, term, early_round)).unwrap();
    n.step(heartbeat_ack(3, term, early_round)).unwrap();
    assert!(n.ready().read_states.is_empty());
    // The no-op commits; the read then needs a round started after that.
    n.step(append_ok(2, 1, term, 3)).unwrap();
    let rd = n.ready();
    assert!(rd.read_states.is_empty());
    let round = heartbeat_round(&rd.messages).expect("the read started a heartbeat round");
    assert!(round > early_round);
    n.step(heartbeat_ack(2, term, round)).unwrap();
    let rd = n.ready();
    assert_eq!(
        rd.read_states,
        vec![ReadState {
            context: 7,
            index: 3
        }]
    );
}

#[test]
fn a_read_is_confirmed_only_by_a_round_started_after_it_arrived() {
    let mut n = restored(1, &[1, 2, 3], 1, &[1], 1);
    make_leader(&mut n, &[2, 3]);
    let term = n.term();
    n.step(append_ok(2, 1, term, 2)).unwrap();
    let _ = persist(&mut n);
    let old_round = n
        .ready()
        .messages
        .iter()
        .filter_map(|m| match m {
            Message::AppendEntries(r) => Some(r.read_round),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    n.read_index(1).unwrap();
    // An answer to a message sent before the read arrived proves nothing about now.
    n.step(Message::AppendEntriesResponse(pb::AppendEntriesResponse {
        group_id: 0,
        term,
        from: 2,
        to: 1,
        heartbeat: true,
        read_round: old_round,
        ..Default::default()
    }))
    .unwrap();
    assert!(n.ready().read_states.is_empty());
}

#[test]
fn lease_reads_are_served_without_a_round_trip_while_the_lease_holds() {
    let mut net = Net::new(3, |c| c.read_only = ReadOnlyOption::LeaseBased);
    // Members refuse votes for their first election timeout (boot quiet); let it pass.
    net.tick(12);
    if net.leaders().is_empty() {
        net.elect(1);
    }
    let leader = net.leaders()[0];
    net.tick(2);
    net.node(leader).read_index(42).unwrap();
    let rd = net.node(leader).ready();
    assert_eq!(rd.read_states.len(), 1, "served from the lease");
    assert!(rd.messages.is_empty(), "no round trip");
    // A leader cut off from the others loses its lease before anyone else can be elected.
    net.isolated.insert(leader);
    net.tick(9);
    net.node(leader).read_index(43).unwrap();
    let rd = net.node(leader).ready();
    assert!(
        rd.read_states.is_empty(),
        "lease expired: no read without confirmation"
    );
}

#[test]
fn reads_waiting_at_a_leader_that_steps_down_are_dropped_not_left_hanging() {
    let mut n = restored(1, &[1, 2, 3], 1, &[1], 1);
    make_leader(&mut n, &[2, 3]);
    n.read_index(9).unwrap();
    n.step(append(2, 1, 9, (0, 0), vec![], 0)).unwrap();
    let rd = n.ready();
    assert_eq!(rd.dropped_reads, vec![9]);
}

fn lease_config(id: u64, lease: bool) -> Config {
    let mut c = Config::new(id);
    if lease {
        c.read_only = ReadOnlyOption::LeaseBased;
    }
    c
}

#[test]
fn a_stale_answer_echoes_no_read_round_so_a_restarted_leader_confirms_nothing_with_it() {
    // Found in review. Node 1 led term 5 with read rounds up to 1000, restarted (rounds start
    // again from 0) and now leads term 6. Node 2, already in term 6, answers a delayed term-5
    // heartbeat of round 1000 with its term, 6: if it echoed the round, node 1 would count it as
    // confirming its next thousand rounds and serve reads with no round trip at all.
    for lease in [false, true] {
        let hs = |term| pb::HardState {
            term,
            vote: 1,
            commit: 1,
        };
        let mut n1 = RaftNode::restore(
            lease_config(1, lease),
            members(&[1, 2, 3]),
            hs(5),
            None,
            entries(1, &[5]),
        )
        .unwrap();
        make_leader(&mut n1, &[2, 3]);
        let term = n1.term();
        n1.step(append_ok(2, 1, term, 2)).unwrap();
        n1.tick();
        let _ = persist(&mut n1);
        let mut n2 = RaftNode::restore(
            lease_config(2, lease),
            members(&[1, 2, 3]),
            hs(term),
            None,
            entries(1, &[5]),
        )
        .unwrap();
        n2.step(Message::AppendEntries(pb::AppendEntriesRequest {
            group_id: 0,
            term: 5,
            from: 1,
            to: 2,
            heartbeat: true,
            read_round: 1000,
            ..Default::default()
        }))
        .unwrap();
        let answer = persist(&mut n2)
            .into_iter()
            .find(|m| matches!(m, Message::AppendEntriesResponse(_)))
            .expect("a stale request is answered");
        assert!(
            matches!(&answer, Message::AppendEntriesResponse(r) if r.term == term && r.read_round == 0)
        );
        n1.step(answer).unwrap();
        n1.read_index(77).unwrap();
        assert!(
            n1.ready().read_states.is_empty(),
            "lease={lease}: a read must wait for a round started after it"
        );
    }
}

#[test]
fn a_leader_that_sent_timeout_now_serves_no_more_lease_reads_this_term() {
    // Found in review: a transfer abandoned after an election timeout, whose TimeoutNow arrives
    // later, lets the target win an election that overrides stickiness while the old leader
    // still believed its lease.
    let mut net = Net::new(3, |c| c.read_only = ReadOnlyOption::LeaseBased);
    net.tick(12);
    if net.leaders().is_empty() {
        net.elect(1);
    }
    let leader = net.leaders()[0];
    let target = (1..=3).find(|&i| i != leader).unwrap();
    net.propose(leader, 1);
    net.node(leader).transfer_leader(target).unwrap();
    let delayed: Vec<Message> = net
        .node(leader)
        .ready()
        .messages
        .into_iter()
        .filter(|m| matches!(m, Message::TimeoutNow(_)))
        .collect();
    assert_eq!(delayed.len(), 1, "the caught-up target is told at once");
    net.tick(11);
    assert_eq!(net.leaders(), vec![leader], "the transfer was abandoned");
    net.node(leader).read_index(1).unwrap();
    assert!(
        net.node(leader).ready().read_states.is_empty(),
        "no lease read after a TimeoutNow went out this term"
    );
    net.isolated.insert(leader);
    for m in delayed {
        net.node(target).step(m).unwrap();
    }
    net.flush();
    assert_eq!(net.node(target).role(), Role::Leader);
    net.node(leader).read_index(2).unwrap();
    assert!(net.node(leader).ready().read_states.is_empty());
}

#[test]
fn a_higher_term_answer_does_not_lift_leader_stickiness() {
    // Found in review: `leader` is cleared by any higher-term message, so stickiness tied to it
    // ended early; it now counts ticks since a leader was last heard.
    let mut f = restored(1, &[1, 2, 3], 5, &[5], 1);
    f.step(append(2, 1, 5, (1, 5), vec![], 1)).unwrap();
    let _ = persist(&mut f);
    f.step(Message::RequestVoteResponse(pb::RequestVoteResponse {
        group_id: 0,
        term: 6,
        from: 3,
        to: 1,
        granted: false,
        pre_vote: false,
    }))
    .unwrap();
    assert_eq!((f.term(), f.leader()), (6, None));
    f.step(Message::RequestVote(pb::RequestVoteRequest {
        group_id: 0,
        term: 7,
        from: 3,
        to: 1,
        last_log_index: 9,
        last_log_term: 6,
        pre_vote: false,
        leadership_transfer: false,
    }))
    .unwrap();
    assert_eq!(
        f.term(),
        6,
        "still sticky: the leader was heard one tick ago"
    );
    let granted = persist(&mut f)
        .into_iter()
        .any(|m| matches!(m, Message::RequestVoteResponse(r) if r.granted));
    assert!(!granted);
}

#[test]
fn extreme_indexes_from_a_peer_are_refused_or_ignored_without_panicking() {
    // Found in review: arithmetic on peer-supplied indexes overflowed.
    let mut f = restored(1, &[1, 2, 3], 1, &[1], 0);
    let overflow = append(2, 1, 1, (u64::MAX, 1), vec![entry(0, 1)], 0);
    assert!(matches!(f.step(overflow), Err(RaftError::Malformed(_))));
    let huge_snapshot = Message::InstallSnapshot(pb::InstallSnapshotRequest {
        group_id: 0,
        term: 1,
        from: 2,
        to: 1,
        metadata: Some(pb::SnapshotMetadata {
            last_index: u64::MAX,
            last_term: 1,
            config: None,
        }),
    });
    assert!(matches!(
        f.step(huge_snapshot),
        Err(RaftError::Malformed(_))
    ));

    let mut n = restored(1, &[1, 2, 3], 1, &[1], 1);
    make_leader(&mut n, &[2, 3]);
    let term = n.term();
    n.step(append_ok(2, 1, term, u64::MAX)).unwrap();
    n.step(Message::AppendEntriesResponse(pb::AppendEntriesResponse {
        group_id: 0,
        term,
        from: 3,
        to: 1,
        rejected: true,
        index: 1,
        hint_index: u64::MAX,
        hint_term: 0,
        ..Default::default()
    }))
    .unwrap();
    n.step(Message::InstallSnapshotResponse(
        pb::InstallSnapshotResponse {
            group_id: 0,
            term,
            from: 2,
            to: 1,
            last_index: u64::MAX,
            rejected: false,
        },
    ))
    .unwrap();
    let _ = persist(&mut n);
    assert!(n.peers().iter().all(|p| p.matched <= n.last_index()));
    assert_eq!(
        n.commit_index(),
        1,
        "nothing was committed on a peer's false claim"
    );
}

// ----- snapshots and compaction --------------------------------------------------------------

#[test]
fn slow_follower_after_compaction_catches_up_by_snapshot() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.isolated.insert(3);
    net.propose(1, 30);
    let applied = net.node(1).applied_index();
    assert!(applied >= 31);
    let meta = net.node(1).compact(applied).unwrap();
    assert!(net.node(1).first_index() > net.node(3).last_index() + 1);
    net.durable.get_mut(&1).unwrap().compact(Snapshot {
        meta,
        state: StateMachine::default(),
    });
    net.isolated.clear();
    net.tick(5);
    assert_eq!(net.node(3).last_index(), net.node(1).last_index());
    assert_eq!(
        net.node(3).first_index(),
        applied + 1,
        "caught up through the snapshot"
    );
    assert_eq!(net.node(3).commit_index(), net.node(1).commit_index());
    // And it keeps replicating normally afterwards.
    net.propose(1, 3);
    assert_eq!(net.node(3).last_index(), net.node(1).last_index());
}

#[test]
fn snapshot_install_racing_appends_keeps_the_log_that_extends_it() {
    // The follower already received entries past the snapshot point, matching it.
    let mut f = restored(1, &[1, 2, 3], 2, &[1, 1, 2, 2, 2], 2);
    let snap = |index, term| {
        Message::InstallSnapshot(pb::InstallSnapshotRequest {
            group_id: 0,
            term: 2,
            from: 2,
            to: 1,
            metadata: Some(pb::SnapshotMetadata {
                last_index: index,
                last_term: term,
                config: Some(members(&[1, 2, 3])),
            }),
        })
    };
    f.step(snap(4, 2)).unwrap();
    let rd = f.ready();
    assert!(
        rd.snapshot.is_none(),
        "the log already holds the snapshot's last entry"
    );
    assert_eq!(
        f.last_index(),
        5,
        "entries after the snapshot point are kept"
    );
    assert_eq!(f.commit_index(), 4);
    // A snapshot older than the commit index changes nothing.
    f.step(snap(3, 2)).unwrap();
    assert!(f.ready().snapshot.is_none());
    assert_eq!(f.last_index(), 5);
    // A snapshot that conflicts with the log replaces it; a stale append after it is harmless.
    f.step(snap(9, 2)).unwrap();
    let rd = f.ready();
    assert_eq!(rd.snapshot.map(|s| s.last_index), Some(9));
    assert_eq!(
        (f.first_index(), f.last_index(), f.commit_index()),
        (10, 9, 9)
    );
    f.step(append(2, 1, 2, (5, 2), entries(6, &[2, 2]), 7))
        .unwrap();
    let out = persist(&mut f);
    assert_eq!(f.last_index(), 9);
    assert!(matches!(
        out.as_slice(),
        [Message::AppendEntriesResponse(r)] if !r.rejected && r.index == 9
    ));
}

#[test]
fn compaction_is_refused_beyond_what_is_applied() {
    let mut n = restored(1, &[1], 1, &[1, 1, 1], 1);
    assert!(n.compact(3).is_err());
    let _ = persist(&mut n);
    assert!(n.compact(1).is_ok());
    assert!(n.compact(1).is_err(), "already compacted");
}

// ----- membership ----------------------------------------------------------------------------

#[test]
fn a_membership_change_before_the_new_leaders_first_commit_is_refused() {
    let mut n = restored(1, &[1, 2, 3], 1, &[1], 1);
    make_leader(&mut n, &[2, 3]);
    let add = ConfigChange::AddLearner {
        id: 4,
        address: "n4".into(),
    };
    assert_eq!(
        n.propose_config_change(add.clone()),
        Err(RaftError::LeaderNotReady)
    );
    let term = n.term();
    n.step(append_ok(2, 1, term, 2)).unwrap();
    let _ = persist(&mut n);
    let index = n.propose_config_change(add).unwrap();
    // One change at a time.
    assert_eq!(
        n.propose_config_change(ConfigChange::PromoteLearner { id: 4 }),
        Err(RaftError::ConfigChangePending { index })
    );
    // The change is in force as soon as it is appended.
    assert!(n.config().member(4).is_some());
}

#[test]
fn learner_added_promoted_and_a_voter_removed() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.add_empty_member(4);
    net.node(1)
        .propose_config_change(ConfigChange::AddLearner {
            id: 4,
            address: "n4".into(),
        })
        .unwrap();
    net.flush();
    net.propose(1, 5);
    assert_eq!(net.node(4).last_index(), net.node(1).last_index());
    assert_eq!(net.node(4).role(), Role::Follower);
    net.tick(40);
    assert_eq!(net.leaders(), vec![1], "a learner never campaigns");
    net.node(1)
        .propose_config_change(ConfigChange::PromoteLearner { id: 4 })
        .unwrap();
    net.flush();
    net.node(1)
        .propose_config_change(ConfigChange::Remove { id: 2 })
        .unwrap();
    net.flush();
    assert_eq!(net.node(1).config().voter_ids(), vec![1, 3, 4]);
    // The new majority (1, 3, 4) commits without node 2.
    net.isolated.insert(2);
    let before = net.node(1).commit_index();
    net.propose(1, 1);
    assert!(net.node(1).commit_index() > before);
}

#[test]
fn a_removed_leader_steps_down_once_its_removal_commits() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.node(1)
        .propose_config_change(ConfigChange::Remove { id: 1 })
        .unwrap();
    net.flush();
    assert_ne!(net.node(1).role(), Role::Leader);
    net.tick(40);
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1);
    assert_ne!(leaders[0], 1);
    assert_eq!(net.node(leaders[0]).config().voter_ids(), vec![2, 3]);
}

#[test]
fn a_member_removed_by_an_uncommitted_change_keeps_campaigning() {
    // Regression for simulator seed 606: node 1 appended its own removal (voters {2}), lost
    // its quorum and stepped down; node 2 still has voters {1, 2} and a shorter log, so only
    // node 1 can win, and it must still campaign.
    let mut n = restored(1, &[1, 2], 2, &[1, 2], 1);
    make_leader(&mut n, &[2]);
    let term = n.term();
    n.step(append_ok(2, 1, term, 3)).unwrap();
    let _ = persist(&mut n);
    n.propose_config_change(ConfigChange::Remove { id: 1 })
        .unwrap();
    let _ = persist(&mut n);
    assert_eq!(n.config().voter_ids(), vec![2]);
    // Check-quorum: node 2 is silent, node 1 steps down.
    for _ in 0..n.settings().election_tick * 2 {
        n.tick();
    }
    assert_ne!(n.role(), Role::Leader);
    // The removal is not committed, so node 1 still campaigns when its timer fires.
    for _ in 0..n.settings().election_tick * 3 {
        n.tick();
    }
    let out = persist(&mut n);
    assert!(
        out.iter()
            .any(|m| matches!(m, Message::RequestVote(r) if r.to == 2)),
        "node 1 must ask node 2 for a (pre-)vote"
    );
}

#[test]
fn a_removed_member_that_never_learned_of_its_removal_cannot_disrupt_the_leader() {
    // Regression for simulator seed 3002472 (plain Raft): stickiness must not depend on
    // check-quorum, or a removed member's ever-higher terms keep deposing the leader.
    let mut net = Net::new(3, |c| {
        c.pre_vote = false;
        c.check_quorum = false;
    });
    net.elect(1);
    net.isolated.insert(3);
    net.node(1)
        .propose_config_change(ConfigChange::Remove { id: 3 })
        .unwrap();
    net.flush();
    net.tick(5);
    assert_eq!(net.node(1).config().voter_ids(), vec![1, 2]);
    let term = net.node(1).term();
    net.isolated.clear();
    net.tick(100);
    assert!(net.node(3).term() > term, "node 3 kept campaigning");
    assert_eq!(net.leaders(), vec![1]);
    assert_eq!(net.node(1).term(), term, "the leader was never deposed");
}

// ----- leadership transfer ---------------------------------------------------------------------

#[test]
fn leadership_transfer_hands_over_to_a_caught_up_member() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.propose(1, 3);
    net.isolated.insert(3);
    net.propose(1, 3);
    net.isolated.clear();
    net.node(1).transfer_leader(3).unwrap();
    assert!(matches!(
        net.node(1).propose(Bytes::from_static(b"x"), None),
        Err(RaftError::TransferInProgress { target: 3 })
    ));
    net.flush();
    assert_eq!(net.leaders(), vec![3]);
    assert_eq!(net.node(3).last_index(), net.node(1).last_index());
}

#[test]
fn a_transfer_to_an_unreachable_member_is_abandoned_after_an_election_timeout() {
    let mut net = Net::new(3, |_| {});
    net.elect(1);
    net.isolated.insert(3);
    net.node(1).transfer_leader(3).unwrap();
    net.tick(11);
    assert_eq!(net.leaders(), vec![1]);
    assert!(net.node(1).propose(Bytes::from_static(b"x"), None).is_ok());
}

// ----- inputs that must be refused --------------------------------------------------------------

#[test]
fn malformed_messages_are_refused_without_changing_state() {
    let mut f = restored(1, &[1, 2, 3], 1, &[1], 0);
    let gap = append(2, 1, 1, (1, 1), vec![entry(3, 1)], 0);
    assert!(matches!(f.step(gap), Err(RaftError::Malformed(_))));
    let mut bad_config = entry(2, 1);
    bad_config.entry_type = pb::EntryType::Config as i32;
    bad_config.data = Bytes::from_static(&[0xff, 0xff, 0xff]);
    assert!(matches!(
        f.step(append(2, 1, 1, (1, 1), vec![bad_config], 0)),
        Err(RaftError::Malformed(_))
    ));
    let mut other_group = append(2, 1, 1, (1, 1), vec![], 0);
    if let Message::AppendEntries(r) = &mut other_group {
        r.group_id = 7;
    }
    assert!(matches!(
        f.step(other_group),
        Err(RaftError::WrongGroup { .. })
    ));
    assert_eq!((f.last_index(), f.term()), (1, 1));
}

#[test]
fn restore_refuses_a_hard_state_that_commits_beyond_the_log() {
    let hs = pb::HardState {
        term: 1,
        vote: 0,
        commit: 5,
    };
    let err = RaftNode::restore(Config::new(1), members(&[1]), hs, None, entries(1, &[1, 1]));
    assert!(matches!(err, Err(RaftError::Malformed(_))));
}

#[test]
fn proposals_on_a_follower_name_the_leader() {
    let mut f = restored(1, &[1, 2, 3], 1, &[1], 0);
    f.step(append(2, 1, 1, (1, 1), vec![], 0)).unwrap();
    assert_eq!(
        f.propose(Bytes::from_static(b"x"), None),
        Err(RaftError::NotLeader { leader: Some(2) })
    );
}

#[test]
fn a_single_member_group_elects_itself_and_commits_alone() {
    let mut n = RaftNode::new(Config::new(1), members(&[1])).unwrap();
    n.campaign();
    let _ = persist(&mut n);
    assert_eq!(n.role(), Role::Leader);
    let index = n.propose(Bytes::from_static(b"x"), None).unwrap();
    let _ = persist(&mut n);
    assert_eq!(n.commit_index(), index);
    n.read_index(1).unwrap();
    assert_eq!(n.ready().read_states.len(), 1);
}
