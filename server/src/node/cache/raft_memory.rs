//! Memory in the replicated state machine (the default `--cache-backend raft`): a write is a Raft
//! proposal of a [`ipb::CacheWrite`], a read a linearizable (ReadIndex) read of
//! [`crate::state::cache_memory`]. See the module docs of [`super`] for why an ambiguous write
//! goes unanswered here.
//!
//! Write-back mode's three requests are proposals too: [`ipb::CacheWriteReserve`],
//! [`ipb::CacheReadReserve`] (a reserving read changes the key's reservation, so it cannot be a
//! ReadIndex read) and [`ipb::CacheWriteBack`]. Each changes state, so each follows the write
//! rule: an outcome that may or may not take effect goes unanswered.

use sync_proto::internal::v1 as ipb;
use sync_proto::raft::v1 as rpb;

use super::wire;
use crate::cache::Stored;
use crate::cache::memory::{MemoryError, MemoryOp, MemoryReply, MemoryRequest};
use crate::cache::message::{Write, WriteResult};
use crate::node::driver::now_unix_ms;
use crate::node::{NodeError, NodeHandle};
use crate::state::Applied;

use ipb::command_result::Result as R;

/// Runs one request; `None` if it may or may not take effect.
pub async fn run(
    node: &NodeHandle,
    req: MemoryRequest,
) -> Option<Result<MemoryReply, MemoryError>> {
    use ipb::command::Op;
    let epoch = req.epoch;
    match req.op {
        MemoryOp::Read { key } => Some(
            node.read(true, move |s| s.cache_memory().read(&key, now_unix_ms()))
                .await
                .map(MemoryReply::Read)
                .map_err(|e| MemoryError::Unavailable(e.to_string())),
        ),
        MemoryOp::Write { key, write } => {
            let (cmd, request) = tagged_write(&key, &write, epoch);
            written(node.propose(Op::CacheWrite(cmd), request).await)
        }
        MemoryOp::WriteReserve { key, write, block } => {
            let (cmd, request) = tagged_write(&key, &write, epoch);
            let cmd = ipb::CacheWriteReserve {
                write: Some(cmd),
                block,
            };
            written(node.propose(Op::CacheWriteReserve(cmd), request).await)
        }
        MemoryOp::ReadReserve { key, block } => {
            let cmd = ipb::CacheReadReserve { key, epoch, block };
            read_reserved(node.propose(Op::CacheReadReserve(cmd), None).await)
        }
        MemoryOp::WriteBack {
            key,
            version,
            value,
        } => {
            let cmd = ipb::CacheWriteBack {
                key,
                epoch,
                version,
                value,
            };
            written_back(node.propose(Op::CacheWriteBack(cmd), None).await)
        }
    }
}

/// A write as its replicated command, and the request id it rides with. The tag rides as the
/// entry's request id, so the state machine's client table applies the write once, as it does
/// every other tagged command.
fn tagged_write(key: &str, write: &Write, epoch: u64) -> (ipb::CacheWrite, Option<rpb::RequestId>) {
    let request = write.tag.map(|t| rpb::RequestId {
        client_id: t.client_id,
        sequence: t.sequence,
        lowest_unacked: t.lowest_unacked,
    });
    let mut cmd = wire::write_to_pb(key, write, epoch);
    cmd.tag = None;
    (cmd, request)
}

/// A proposal's outcome: the command's result; an error if it did not and never will take
/// effect; `None` if it may or may not.
fn settled(r: Result<(u64, Applied), NodeError>) -> Option<Result<R, MemoryError>> {
    let refused = |why: String| Some(Err(MemoryError::Unavailable(why)));
    match r {
        Ok((
            _,
            Applied::Result(ipb::CommandResult {
                result: Some(result),
            }),
        )) => Some(Ok(result)),
        // Too old for the client table: refused, never applied twice.
        Ok((_, Applied::Expired)) => {
            Some(Err(MemoryError::Expired(NodeError::Expired.to_string())))
        }
        // Applied, but as nothing (a command that did not decode): nothing changed.
        Ok((_, other)) => refused(format!("the cache command was not applied: {other:?}")),
        // Refused before it was appended: it can never commit.
        Err(e @ (NodeError::NotLeader { .. } | NodeError::Raft(_))) => refused(e.to_string()),
        Err(e) => {
            tracing::warn!(error = %e, "cache memory outcome unknown; stopping this directory");
            None
        }
    }
}

/// The result of a command that is not the one proposed (a command that did not decode is
/// `Rejected`): it changed nothing.
fn not_applied(result: R) -> MemoryError {
    MemoryError::Unavailable(format!("the cache command was not applied: {result:?}"))
}

/// A write's (or reserving write's) proposal outcome as memory's answer; `None` if it may or
/// may not take effect. A reserving write that applied answers `WrittenReserved`; one that did
/// not apply reserved nothing and answers as a plain write (`Written(Mismatch)`), and a
/// duplicate answers `Duplicate` whatever the first attempt reserved (the directory grants no
/// line for it, so nobody numbers writes from that block).
fn written(r: Result<(u64, Applied), NodeError>) -> Option<Result<MemoryReply, MemoryError>> {
    Some(settled(r)?.and_then(|result| {
        let R::CacheWrite(w) = result else {
            return Err(not_applied(result));
        };
        if !w.refused.is_empty() {
            return Err(MemoryError::Unavailable(w.refused));
        }
        let result = if w.applied {
            WriteResult::Applied {
                version: w.version,
                existed: w.existed,
            }
        } else {
            WriteResult::Mismatch {
                current: w.current_version,
            }
        };
        Ok(match (w.duplicate, w.reserved_base) {
            (true, _) => MemoryReply::Duplicate(result),
            (false, Some(base)) => MemoryReply::WrittenReserved(result, base),
            (false, None) => MemoryReply::Written(result),
        })
    }))
}

/// A reserving read's proposal outcome as memory's answer; `None` if it may or may not take
/// effect (it changes the key's reservation).
fn read_reserved(r: Result<(u64, Applied), NodeError>) -> Option<Result<MemoryReply, MemoryError>> {
    Some(settled(r)?.and_then(|result| {
        let R::CacheReadReserve(r) = result else {
            return Err(not_applied(result));
        };
        if !r.refused.is_empty() {
            return Err(MemoryError::Unavailable(r.refused));
        }
        let stored = Stored {
            version: r.version,
            value: r.value,
            ttl_left_ms: r.ttl_left_ms,
        };
        Ok(MemoryReply::ReadReserved(stored, r.base))
    }))
}

/// A write-back's proposal outcome as memory's answer; `None` if it may or may not take effect.
fn written_back(r: Result<(u64, Applied), NodeError>) -> Option<Result<MemoryReply, MemoryError>> {
    Some(settled(r)?.and_then(|result| {
        let R::CacheWriteBack(w) = result else {
            return Err(not_applied(result));
        };
        if !w.refused.is_empty() {
            return Err(MemoryError::Unavailable(w.refused));
        }
        Ok(MemoryReply::WrittenBack { applied: w.applied })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_ambiguous_proposal_failure_goes_unanswered() {
        assert!(written(Err(NodeError::Lost)).is_none());
        assert!(written(Err(NodeError::ShuttingDown)).is_none());
        assert!(written(Err(NodeError::Timeout("t".into()))).is_none());
        assert!(matches!(
            written(Err(NodeError::NotLeader { leader: None })),
            Some(Err(_))
        ));
        let refused = ipb::CommandResult {
            result: Some(ipb::command_result::Result::CacheWrite(
                ipb::CacheWriteResult {
                    refused: "old epoch".into(),
                    ..Default::default()
                },
            )),
        };
        assert!(matches!(
            written(Ok((3, Applied::Result(refused)))),
            Some(Err(_))
        ));
        let applied = |duplicate| ipb::CommandResult {
            result: Some(ipb::command_result::Result::CacheWrite(
                ipb::CacheWriteResult {
                    applied: true,
                    version: 3,
                    current_version: 3,
                    existed: false,
                    duplicate,
                    ..Default::default()
                },
            )),
        };
        let first = WriteResult::Applied {
            version: 3,
            existed: false,
        };
        assert_eq!(
            written(Ok((3, Applied::Result(applied(false))))),
            Some(Ok(MemoryReply::Written(first)))
        );
        assert_eq!(
            written(Ok((9, Applied::Result(applied(true))))),
            Some(Ok(MemoryReply::Duplicate(first)))
        );
        assert!(matches!(
            written(Ok((9, Applied::Expired))),
            Some(Err(MemoryError::Expired(_)))
        ));
    }

    fn result(r: R) -> Result<(u64, Applied), NodeError> {
        Ok((5, Applied::Result(ipb::CommandResult { result: Some(r) })))
    }

    #[test]
    fn an_ambiguous_reserving_read_or_write_back_goes_unanswered_like_a_write() {
        // Both change state (a reservation, a value), so an unknown outcome must not be
        // answered as a failure.
        for e in [NodeError::Lost, NodeError::ShuttingDown] {
            assert!(read_reserved(Err(e.clone())).is_none());
            assert!(written_back(Err(e)).is_none());
        }
        assert!(matches!(
            read_reserved(Err(NodeError::NotLeader { leader: None })),
            Some(Err(MemoryError::Unavailable(_)))
        ));
        assert!(matches!(
            written_back(Err(NodeError::NotLeader { leader: None })),
            Some(Err(MemoryError::Unavailable(_)))
        ));
    }

    #[test]
    fn a_reserving_write_answers_its_base_only_if_it_applied_and_is_not_a_duplicate() {
        let w = |applied, duplicate, reserved_base| {
            result(R::CacheWrite(ipb::CacheWriteResult {
                applied,
                version: 7,
                current_version: 7,
                duplicate,
                reserved_base,
                ..Default::default()
            }))
        };
        let applied = WriteResult::Applied {
            version: 7,
            existed: false,
        };
        assert_eq!(
            written(w(true, false, Some(7))),
            Some(Ok(MemoryReply::WrittenReserved(applied, 7)))
        );
        // A retry of an applied reserving write: no base, so the directory grants no line.
        assert_eq!(
            written(w(true, true, Some(7))),
            Some(Ok(MemoryReply::Duplicate(applied)))
        );
        // A mismatched CompareAndSet reserved nothing.
        assert_eq!(
            written(w(false, false, None)),
            Some(Ok(MemoryReply::Written(WriteResult::Mismatch {
                current: 7
            })))
        );
    }

    #[test]
    fn a_reserving_read_answers_the_read_and_its_base_and_a_fenced_one_fails() {
        let ok = result(R::CacheReadReserve(ipb::CacheReadReserveResult {
            value: Some("v".into()),
            version: 4,
            ttl_left_ms: Some(10),
            base: 9,
            ..Default::default()
        }));
        let stored = Stored {
            version: 4,
            value: Some("v".into()),
            ttl_left_ms: Some(10),
        };
        assert_eq!(
            read_reserved(ok),
            Some(Ok(MemoryReply::ReadReserved(stored, 9)))
        );
        let fenced = result(R::CacheReadReserve(ipb::CacheReadReserveResult {
            refused: "old epoch".into(),
            base: 9,
            ..Default::default()
        }));
        assert!(matches!(
            read_reserved(fenced),
            Some(Err(MemoryError::Unavailable(_)))
        ));
    }

    #[test]
    fn a_write_back_answers_whether_it_applied_and_a_fenced_one_fails() {
        for applied in [true, false] {
            let r = result(R::CacheWriteBack(ipb::CacheWriteBackResult {
                applied,
                refused: String::new(),
            }));
            assert_eq!(
                written_back(r),
                Some(Ok(MemoryReply::WrittenBack { applied }))
            );
        }
        let fenced = result(R::CacheWriteBack(ipb::CacheWriteBackResult {
            applied: false,
            refused: "old epoch".into(),
        }));
        assert!(matches!(
            written_back(fenced),
            Some(Err(MemoryError::Unavailable(_)))
        ));
    }

    #[test]
    fn a_result_of_another_kind_is_a_failure_never_a_reply() {
        // A command that did not decode is Rejected by every replica: nothing changed.
        let rejected = || result(R::Rejected("does not decode".into()));
        assert!(matches!(written(rejected()), Some(Err(_))));
        assert!(matches!(read_reserved(rejected()), Some(Err(_))));
        assert!(matches!(written_back(rejected()), Some(Err(_))));
    }
}
