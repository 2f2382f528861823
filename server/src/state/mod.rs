//! The replicated state machine: what committed commands do.
//!
//! Every module here is pure and deterministic: given the same committed entries in the same
//! order, every replica computes the same state. Time, when a command needs it, comes from the
//! log (stamped by the leader in [`Command::leader_time_unix_ms`]), never from the local clock.
//!
//! - [`cache_memory`]: the cache's backing copy of every key (memory for the `Cache` service).
//! - [`dedup`]: the client table that makes a retried request apply once (Raft dissertation
//!   §6.3).
//! - [`kv`]: replicated registers (the `Kv` service).
//! - [`locks`]: sessions and the lock table (the `Lock` service).
//! - [`queue`]: topics, messages, deliveries and dead letters (the `Queue` service).
//!
//! **Time.** The state's clock `now_ms` is the largest leader time applied so far, so it never
//! goes back even if leaders' clocks disagree. Time-driven changes (session expiry, wait
//! deadlines, lock-delays) run before each command, but only for entries of the term whose
//! [`ipb::LeaderEpoch`] was applied last: a new leader's first command extends every session by
//! a full TTL, and until it is applied nothing expires. So no session expires because of a
//! failover, nor because a new leader's clock runs ahead of the old one's.
//!
//! [`ReplicatedState`] ties them together: it applies committed entries and snapshots itself.
//! Each primitive (locks, queues, cache) plugs in beside `kv` with its own commands.

pub mod cache_memory;
pub mod dedup;
pub mod kv;
pub mod locks;
pub mod queue;

use bytes::Bytes;
use prost::Message as _;
use sync_proto::internal::v1 as ipb;
use sync_proto::raft::v1 as pb;

use cache_memory::CacheMemory;
use dedup::{ClientTable, Dedup};
use kv::KvState;
use locks::{At, LockTable};
use queue::QueueState;

/// Something applying an entry did that the node reports beside the command's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    /// From the lock table (events, ended waits).
    Lock(locks::Notice),
    /// A topic may have deliverable messages now (published, given back, visible again): its
    /// long polls and subscriptions should look.
    QueueReady(String),
    /// Messages a queue command published, delivered, acknowledged or gave back (for metrics).
    QueueApplied {
        /// What happened to them: `published`, `delivered`, `acked` or `nacked`.
        event: &'static str,
        /// How many.
        count: u64,
    },
}

/// Clients remembered by the de-duplication table.
const MAX_DEDUP_CLIENTS: usize = 100_000;
/// Responses remembered per client (requests a client may have in flight at once).
const MAX_DEDUP_RESPONSES: usize = 1024;

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The snapshot bytes do not decode.
    #[error("snapshot does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The queues' part of the snapshot is inconsistent.
    #[error("snapshot's queues: {0}")]
    Queue(String),
}

/// What applying one committed entry produced.
#[derive(Clone, Debug, PartialEq)]
pub enum Applied {
    /// A no-op or configuration entry: nothing for a client.
    Internal,
    /// The command's result (for a retried request, the result of its first application).
    Result(ipb::CommandResult),
    /// The request was too old to de-duplicate and was not applied.
    Expired,
}

/// The whole replicated state of a node.
#[derive(Clone, Debug)]
pub struct ReplicatedState {
    /// Index of the last applied entry.
    applied_index: u64,
    /// Registers.
    kv: KvState,
    /// Request de-duplication; responses are encoded [`ipb::CommandResult`]s.
    dedup: ClientTable<Bytes>,
    /// The state's clock: the largest leader time applied (see the module docs).
    now_ms: u64,
    /// The term whose LeaderEpoch was applied last.
    epoch_term: u64,
    /// Sessions and locks.
    locks: LockTable,
    /// Topics and messages.
    queues: QueueState,
    /// The cache's memory.
    cache: CacheMemory,
    /// What applying produced for the node to report (lock events, ended waits).
    notices: Vec<Notice>,
}

impl Default for ReplicatedState {
    fn default() -> Self {
        ReplicatedState {
            applied_index: 0,
            kv: KvState::default(),
            dedup: ClientTable::new(MAX_DEDUP_CLIENTS, MAX_DEDUP_RESPONSES),
            now_ms: 0,
            epoch_term: 0,
            locks: LockTable::default(),
            queues: QueueState::default(),
            cache: CacheMemory::default(),
            notices: Vec::new(),
        }
    }
}

impl ReplicatedState {
    /// Index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The registers.
    pub fn kv(&self) -> &KvState {
        &self.kv
    }

    /// The lock table.
    pub fn locks(&self) -> &LockTable {
        &self.locks
    }

    /// The state's clock (leader time, Unix ms).
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// The term whose LeaderEpoch was applied last: a leader whose term differs proposes one.
    pub fn epoch_term(&self) -> u64 {
        self.epoch_term
    }

    /// The queues.
    pub fn queues(&self) -> &QueueState {
        &self.queues
    }

    /// The cache's memory.
    pub fn cache_memory(&self) -> &CacheMemory {
        &self.cache
    }

    /// The earliest leader time at which a [`ipb::Tick`] would change something.
    pub fn next_deadline(&self) -> Option<u64> {
        [self.locks.next_deadline(), self.queues.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The topics where consumers may find new work after a queue command: its own topic (a
    /// publish, a nack, an ack that frees the next message of an ordering key or a
    /// subscriber's credit), that topic's dead-letter topic (a nack past max deliveries moves
    /// the message there), and a redrive's destinations (every topic, for a redrive back to
    /// the messages' sources). A spurious notice only costs a consumer a look.
    fn queue_command_topics(&self, cmd: &ipb::QueueCommand) -> Vec<String> {
        use ipb::queue_command::Op;
        let topic = match cmd.op.as_ref() {
            Some(Op::Publish(p)) => &p.topic,
            Some(Op::Nack(n)) => &n.topic,
            Some(Op::Ack(a)) => &a.topic,
            Some(Op::AckBatch(a)) => &a.topic,
            Some(Op::ExtendVisibility(e)) => &e.topic,
            Some(Op::RequeueExpired(r)) => &r.topic,
            Some(Op::Redrive(r)) if !r.destination_topic.is_empty() => &r.destination_topic,
            Some(Op::Redrive(_)) => {
                return self
                    .queues
                    .list_topics("", 0, "")
                    .map(|(topics, _)| topics.into_iter().map(|t| t.name).collect())
                    .unwrap_or_default();
            }
            _ => return Vec::new(),
        };
        let mut topics = vec![topic.clone()];
        if let Some(dlq) = self
            .queues
            .topic(topic)
            .and_then(|t| t.settings)
            .map(|s| s.dead_letter_topic)
            .filter(|d| !d.is_empty())
        {
            topics.push(dlq);
        }
        topics
    }

    /// Drains what applying produced (lock events and ended waits), for the node to publish.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Applies one committed entry. Entries must come in index order; an entry whose data does
    /// not decode as a [`ipb::Command`] is rejected for the client but still consumes its index
    /// (every replica rejects it the same way).
    pub fn apply(&mut self, entry: &pb::Entry) -> Applied {
        self.applied_index = entry.index;
        if entry.entry_type != pb::EntryType::Normal as i32 || entry.data.is_empty() {
            return Applied::Internal;
        }
        let command = ipb::Command::decode(entry.data.as_ref());
        if let Ok(c) = &command {
            self.advance_time(entry, c);
        }
        let request = entry.request.filter(|r| r.client_id != 0);
        let result = match request {
            Some(request) => match self.dedup.check(&request) {
                Dedup::Apply => {
                    let result = self.execute(entry, command, Some(&request));
                    if !refused_cache_write(&result) {
                        self.dedup.record(
                            &request,
                            entry.index,
                            Bytes::from(result.encode_to_vec()),
                        );
                    }
                    Applied::Result(result)
                }
                Dedup::Duplicate(encoded) => Applied::Result(mark_duplicate(
                    ipb::CommandResult::decode(encoded.as_ref()).unwrap_or_default(),
                )),
                Dedup::Expired => Applied::Expired,
            },
            None => Applied::Result(self.execute(entry, command, None)),
        };
        self.collect_notices();
        result
    }

    /// Moves the clock to the command's leader time and performs what falls due (see the module
    /// docs for why only under the current epoch).
    fn advance_time(&mut self, entry: &pb::Entry, command: &ipb::Command) {
        self.now_ms = self.now_ms.max(command.leader_time_unix_ms);
        // Queue timers (visibility, delays, retention) may fire early if a new leader's clock
        // runs ahead: that redelivers early (a duplicate), never loses, so they need no epoch.
        let woken = self.queues.advance(self.now_ms).woken;
        self.notices
            .extend(woken.into_iter().map(Notice::QueueReady));
        if let Some(ipb::command::Op::LeaderEpoch(_)) = command.op {
            self.epoch_term = entry.term;
            self.locks.extend_all_sessions(self.now_ms);
        } else if entry.term == self.epoch_term {
            self.locks.advance(At {
                index: entry.index,
                now_ms: self.now_ms,
            });
        }
    }

    /// Takes the lock table's notices; a wait that ended rewrites its Acquire's remembered
    /// answer, so a retry of that Acquire learns the outcome.
    fn collect_notices(&mut self) {
        for notice in self.locks.take_notices() {
            if let locks::Notice::WaitEnded {
                request: Some(r),
                result,
                ..
            } = &notice
            {
                let answer = ipb::CommandResult {
                    result: Some(ipb::command_result::Result::Lock(result.clone())),
                };
                self.dedup
                    .replace(r.client_id, r.sequence, Bytes::from(answer.encode_to_vec()));
            }
            self.notices.push(Notice::Lock(notice));
        }
    }

    fn execute(
        &mut self,
        entry: &pb::Entry,
        command: Result<ipb::Command, prost::DecodeError>,
        request: Option<&pb::RequestId>,
    ) -> ipb::CommandResult {
        use ipb::command::Op;
        use ipb::command_result::Result as R;
        let command = match command {
            Ok(c) => c,
            Err(e) => {
                return ipb::CommandResult {
                    result: Some(R::Rejected(format!("command does not decode: {e}"))),
                };
            }
        };
        let index = entry.index;
        let at = At {
            index,
            now_ms: self.now_ms,
        };
        let result =
            match command.op {
                Some(Op::KvPut(put)) => Some(R::KvPut(ipb::KvPutResult {
                    replaced: self.kv.put(put.key, put.value, index),
                })),
                Some(Op::KvDelete(del)) => Some(R::KvDelete(ipb::KvDeleteResult {
                    existed: self.kv.delete(&del.key),
                })),
                Some(Op::Tick(_)) | Some(Op::LeaderEpoch(_)) => None,
                Some(Op::Lock(cmd)) => {
                    let request = request.map(|r| ipb::ClientRequest {
                        client_id: r.client_id,
                        sequence: r.sequence,
                    });
                    Some(R::Lock(self.locks.apply(&cmd, request, at)))
                }
                Some(Op::Queue(cmd)) => {
                    let (result, advanced) = self.queues.apply_reporting(index, self.now_ms, &cmd);
                    let mut ready = advanced.woken;
                    ready.extend(self.queue_command_topics(&cmd));
                    if let Some((event, count)) = queue_applied(&result) {
                        self.notices.push(Notice::QueueApplied { event, count });
                    }
                    self.notices
                        .extend(ready.into_iter().map(Notice::QueueReady));
                    Some(R::Queue(result))
                }
                Some(Op::CacheWrite(w)) => Some(R::CacheWrite(self.cache.apply(
                    index,
                    entry.term,
                    self.now_ms,
                    &w,
                ))),
                Some(Op::CacheWriteReserve(w)) => Some(R::CacheWrite(self.cache.write_reserve(
                    index,
                    entry.term,
                    self.now_ms,
                    &w,
                ))),
                Some(Op::CacheReadReserve(r)) => Some(R::CacheReadReserve(
                    self.cache.read_reserve(entry.term, self.now_ms, &r),
                )),
                Some(Op::CacheWriteBack(w)) => {
                    Some(R::CacheWriteBack(self.cache.write_back(entry.term, &w)))
                }
                None => Some(R::Rejected("command has no operation".into())),
            };
        ipb::CommandResult { result }
    }

    /// Encodes the whole state.
    pub fn snapshot(&self) -> Vec<u8> {
        self.snapshot_message().encode_to_vec()
    }

    /// The whole state as a message, not yet encoded: a copy that no later command changes (values
    /// are shared `Bytes`), so that the node can encode it off its driver task while it goes on
    /// applying.
    pub fn snapshot_message(&self) -> ipb::StateSnapshot {
        let (clients, forgotten) = self.dedup.export();
        ipb::StateSnapshot {
            applied_index: self.applied_index,
            kv: self
                .kv
                .iter()
                .map(|(k, r)| ipb::KvRecord {
                    key: k.clone(),
                    value: r.value.clone(),
                    modified_index: r.modified_index,
                })
                .collect(),
            dedup_clients: clients
                .into_iter()
                .map(
                    |(client_id, floor, last_index, responses)| ipb::DedupClient {
                        client_id,
                        floor,
                        last_index,
                        responses: responses
                            .into_iter()
                            .map(|(sequence, response)| ipb::DedupResponse { sequence, response })
                            .collect(),
                    },
                )
                .collect(),
            dedup_forgotten: forgotten
                .into_iter()
                .map(|(client_id, reached)| ipb::ForgottenClient { client_id, reached })
                .collect(),
            now_unix_ms: self.now_ms,
            epoch_term: self.epoch_term,
            locks: Some(self.locks.snapshot()),
            queues: Some(self.queues.snapshot()),
            cache: Some(self.cache.snapshot()),
        }
    }

    /// Rebuilds the state from [`ReplicatedState::snapshot`]'s bytes.
    pub fn restore(data: &[u8]) -> Result<Self, StateError> {
        let snap = ipb::StateSnapshot::decode(data)?;
        let mut state = ReplicatedState {
            applied_index: snap.applied_index,
            now_ms: snap.now_unix_ms,
            epoch_term: snap.epoch_term,
            locks: LockTable::restore(snap.locks.unwrap_or_default()),
            queues: QueueState::restore(snap.queues.unwrap_or_default())
                .map_err(|e| StateError::Queue(e.to_string()))?,
            cache: CacheMemory::restore(snap.cache.unwrap_or_default()),
            ..Default::default()
        };
        for r in snap.kv {
            state.kv.put(r.key, r.value, r.modified_index);
        }
        state.dedup.import(
            snap.dedup_clients.into_iter().map(|c| {
                let responses = c
                    .responses
                    .into_iter()
                    .map(|r| (r.sequence, r.response))
                    .collect();
                (c.client_id, c.floor, c.last_index, responses)
            }),
            snap.dedup_forgotten
                .into_iter()
                .map(|f| (f.client_id, f.reached)),
        );
        Ok(state)
    }
}

/// A cache write refused outright (a stale epoch) changed nothing and is not remembered, so
/// that its retry, sent by the next directory, can still apply. (A reserving write answers with
/// a CacheWriteResult too; reserving reads and write-backs carry no request id.)
fn refused_cache_write(result: &ipb::CommandResult) -> bool {
    matches!(
        &result.result,
        Some(ipb::command_result::Result::CacheWrite(w)) if !w.refused.is_empty()
    )
}

/// A remembered result given to a retry. A cache write's says so: the cache directory must not
/// hand the writer a line for it (its value may have been overwritten since). Other commands'
/// results are the same for a retry as for the first attempt.
fn mark_duplicate(mut result: ipb::CommandResult) -> ipb::CommandResult {
    if let Some(ipb::command_result::Result::CacheWrite(w)) = &mut result.result {
        w.duplicate = true;
    }
    result
}

/// What a successful queue result did to how many messages, for metrics.
fn queue_applied(result: &ipb::QueueResult) -> Option<(&'static str, u64)> {
    use ipb::queue_result::Result as Q;
    match result.result.as_ref()? {
        Q::Publish(p) => Some((
            "published",
            p.results.iter().filter(|r| !r.deduplicated).count() as u64,
        )),
        Q::Deliver(d) => Some(("delivered", d.deliveries.len() as u64)),
        Q::Ack(_) => Some(("acked", 1)),
        Q::Nack(_) => Some(("nacked", 1)),
        _ => None,
    }
}

/// Encodes a command for a log entry.
pub fn encode_command(op: ipb::command::Op, leader_time_unix_ms: u64) -> Bytes {
    Bytes::from(
        ipb::Command {
            leader_time_unix_ms,
            op: Some(op),
        }
        .encode_to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipb::command::Op;

    fn put_entry(index: u64, key: &str, value: &str, request: Option<(u64, u64)>) -> pb::Entry {
        pb::Entry {
            term: 1,
            index,
            entry_type: pb::EntryType::Normal as i32,
            data: encode_command(
                Op::KvPut(ipb::KvPut {
                    key: Bytes::from(key.to_string()),
                    value: Bytes::from(value.to_string()),
                }),
                0,
            ),
            request: request.map(|(client_id, sequence)| pb::RequestId {
                client_id,
                sequence,
                lowest_unacked: sequence,
            }),
        }
    }

    #[test]
    fn a_retried_put_is_applied_once_and_answered_with_its_first_result() {
        let mut s = ReplicatedState::default();
        let first = s.apply(&put_entry(1, "k", "v1", Some((9, 1))));
        // The retry carries another value (a buggy client): it must not be applied.
        let retry = s.apply(&put_entry(2, "k", "v2", Some((9, 1))));
        assert_eq!(first, retry);
        assert_eq!(s.kv().get(b"k").unwrap().value, Bytes::from("v1"));
        assert_eq!(s.applied_index(), 2);
    }

    /// A Set of `k` to `value` by the directory of `epoch`.
    fn set_k(epoch: u64, value: &str) -> ipb::CacheWrite {
        ipb::CacheWrite {
            key: "k".into(),
            epoch,
            mutation: Some(ipb::cache_write::Mutation::Set(ipb::CacheSet {
                value: Bytes::from(value.to_string()),
                ttl_ms: None,
            })),
            expect_version: None,
            tag: None,
        }
    }

    /// A cache write of `value` to `k` by the directory of `epoch`, in an entry of `term`,
    /// tagged as request `sequence` of client 9.
    fn cache_entry(index: u64, term: u64, epoch: u64, value: &str, sequence: u64) -> pb::Entry {
        let op = Op::CacheWrite(set_k(epoch, value));
        cache_op_entry(index, term, op, Some(sequence))
    }

    fn cache_result(a: Applied) -> ipb::CacheWriteResult {
        match a {
            Applied::Result(ipb::CommandResult {
                result: Some(ipb::command_result::Result::CacheWrite(w)),
            }) => w,
            other => panic!("not a cache write result: {other:?}"),
        }
    }

    #[test]
    fn a_retried_cache_write_is_applied_once_and_its_answer_says_it_is_a_duplicate() {
        let mut s = ReplicatedState::default();
        let first = cache_result(s.apply(&cache_entry(1, 1, 1, "a", 1)));
        assert!(first.applied && !first.duplicate && first.version == 1);
        let other = cache_result(s.apply(&cache_entry(2, 1, 1, "b", 2)));
        assert_eq!(other.version, 2);
        let retry = cache_result(s.apply(&cache_entry(3, 1, 1, "a", 1)));
        assert!(retry.duplicate, "{retry:?}");
        assert_eq!((retry.applied, retry.version), (true, 1));
        let now = s.cache_memory().read("k", 0);
        assert_eq!((now.version, now.value), (2, Some(Bytes::from("b"))));
    }

    #[test]
    fn a_cache_write_refused_for_its_epoch_is_not_remembered_so_its_retry_applies() {
        let mut s = ReplicatedState::default();
        // Proposed by the directory of epoch 1, committed in term 2: refused.
        let refused = cache_result(s.apply(&cache_entry(1, 2, 1, "a", 1)));
        assert!(!refused.refused.is_empty());
        // The retry, through the directory of epoch 2, applies.
        let retry = cache_result(s.apply(&cache_entry(2, 2, 2, "a", 1)));
        assert!(
            retry.applied && !retry.duplicate && retry.version == 2,
            "{retry:?}"
        );
    }

    /// An entry of `term` carrying a cache command, tagged as request `sequence` of client 9.
    fn cache_op_entry(index: u64, term: u64, op: Op, sequence: Option<u64>) -> pb::Entry {
        pb::Entry {
            term,
            index,
            entry_type: pb::EntryType::Normal as i32,
            data: encode_command(op, 0),
            request: sequence.map(|sequence| pb::RequestId {
                client_id: 9,
                sequence,
                lowest_unacked: 1,
            }),
        }
    }

    /// A reserving Set of `k` to `value` by the directory of `epoch`.
    fn write_reserve(epoch: u64, value: &str, block: u64) -> Op {
        Op::CacheWriteReserve(ipb::CacheWriteReserve {
            write: Some(set_k(epoch, value)),
            block,
        })
    }

    #[test]
    fn a_retried_reserving_write_is_applied_once_and_reserves_once() {
        let mut s = ReplicatedState::default();
        let first =
            cache_result(s.apply(&cache_op_entry(1, 1, write_reserve(1, "a", 10), Some(1))));
        assert!(first.applied && !first.duplicate);
        assert_eq!((first.version, first.reserved_base), (1, Some(1)));
        let retry =
            cache_result(s.apply(&cache_op_entry(2, 1, write_reserve(1, "a", 10), Some(1))));
        assert!(retry.duplicate, "{retry:?}");
        // Nothing changed: the reservation is the first one's, not a second block above it.
        assert_eq!(s.cache_memory().reservation("k"), Some((1, 11)));
        assert_eq!(s.cache_memory().read("k", 0).version, 1);
    }

    #[test]
    fn a_reserving_write_refused_for_its_epoch_is_not_remembered_and_reserves_nothing() {
        let mut s = ReplicatedState::default();
        let refused =
            cache_result(s.apply(&cache_op_entry(1, 2, write_reserve(1, "a", 10), Some(1))));
        assert!(!refused.refused.is_empty() && refused.reserved_base.is_none());
        assert_eq!(s.cache_memory().reservation("k"), None);
        let retry =
            cache_result(s.apply(&cache_op_entry(2, 2, write_reserve(2, "a", 10), Some(1))));
        assert!(retry.applied && !retry.duplicate, "{retry:?}");
        assert_eq!(retry.reserved_base, Some(2));
    }

    #[test]
    fn reserving_reads_and_write_backs_are_applied_as_commands_and_survive_a_snapshot() {
        use ipb::command_result::Result as R;
        let mut s = ReplicatedState::default();
        let read = Op::CacheReadReserve(ipb::CacheReadReserve {
            key: "k".into(),
            epoch: 1,
            block: 100,
        });
        let Applied::Result(ipb::CommandResult {
            result: Some(R::CacheReadReserve(r)),
        }) = s.apply(&cache_op_entry(1, 1, read, None))
        else {
            panic!("not a reserving read's result");
        };
        assert_eq!((r.version, r.base), (0, 0));
        let back = |version| {
            Op::CacheWriteBack(ipb::CacheWriteBack {
                key: "k".into(),
                epoch: 1,
                version,
                value: Bytes::from("local"),
            })
        };
        let Applied::Result(ipb::CommandResult {
            result: Some(R::CacheWriteBack(w)),
        }) = s.apply(&cache_op_entry(2, 1, back(40), None))
        else {
            panic!("not a write-back's result");
        };
        assert!(w.applied);
        // After a restart from a snapshot (the holder gone with it), the block still holds:
        // the next write skips it, and a write-back below that write's version is refused.
        let mut restored = ReplicatedState::restore(&s.snapshot()).unwrap();
        assert_eq!(restored.cache_memory(), s.cache_memory());
        let w = cache_result(restored.apply(&cache_entry(3, 1, 1, "b", 1)));
        assert_eq!(w.version, 101);
        let Applied::Result(ipb::CommandResult {
            result: Some(R::CacheWriteBack(late)),
        }) = restored.apply(&cache_op_entry(4, 1, back(50), None))
        else {
            panic!("not a write-back's result");
        };
        assert!(
            !late.applied,
            "a write-back below the key's version applied"
        );
    }

    #[test]
    fn snapshot_round_trip_keeps_registers_and_the_dedup_table() {
        let mut s = ReplicatedState::default();
        s.apply(&put_entry(1, "a", "1", Some((5, 1))));
        s.apply(&put_entry(2, "b", "2", None));
        let mut restored = ReplicatedState::restore(&s.snapshot()).unwrap();
        assert_eq!(restored.applied_index(), 2);
        assert_eq!(restored.kv(), s.kv());
        // The dedup table survived: a retry after restore is still recognised.
        let retry = restored.apply(&put_entry(3, "a", "changed", Some((5, 1))));
        assert!(matches!(retry, Applied::Result(_)));
        assert_eq!(restored.kv().get(b"a").unwrap().value, Bytes::from("1"));
    }

    #[test]
    fn an_undecodable_command_is_rejected_identically_everywhere() {
        let mut s = ReplicatedState::default();
        let e = pb::Entry {
            term: 1,
            index: 1,
            data: Bytes::from_static(&[0xff, 0xff]),
            ..Default::default()
        };
        assert!(matches!(
            s.apply(&e),
            Applied::Result(ipb::CommandResult {
                result: Some(ipb::command_result::Result::Rejected(_))
            })
        ));
    }
}
