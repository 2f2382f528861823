//! Memory in the replicated state machine (the default `--cache-backend raft`): a write is a Raft
//! proposal of a [`ipb::CacheWrite`], a read a linearizable (ReadIndex) read of
//! [`crate::state::cache_memory`]. See the module docs of [`super`] for why an ambiguous write
//! goes unanswered here.

use sync_proto::internal::v1 as ipb;
use sync_proto::raft::v1 as rpb;

use super::wire;
use crate::cache::memory::{MemoryError, MemoryOp, MemoryReply, MemoryRequest};
use crate::cache::message::WriteResult;
use crate::node::driver::now_unix_ms;
use crate::node::{NodeError, NodeHandle};
use crate::state::Applied;

/// Write-back mode's memory requests are not supported by the shell's backends yet; the
/// runtime never enables write-back, so the directory never makes them.
pub const WRITE_BACK_UNSUPPORTED: &str = "write-back is not supported by this memory backend yet";

/// Runs one request; `None` if a write may or may not take effect.
pub async fn run(
    node: &NodeHandle,
    req: MemoryRequest,
) -> Option<Result<MemoryReply, MemoryError>> {
    match req.op {
        MemoryOp::ReadReserve { .. }
        | MemoryOp::WriteReserve { .. }
        | MemoryOp::WriteBack { .. } => {
            Some(Err(MemoryError::Unavailable(WRITE_BACK_UNSUPPORTED.into())))
        }
        MemoryOp::Read { key } => Some(
            node.read(true, move |s| s.cache_memory().read(&key, now_unix_ms()))
                .await
                .map(MemoryReply::Read)
                .map_err(|e| MemoryError::Unavailable(e.to_string())),
        ),
        MemoryOp::Write { key, write } => {
            // The tag rides as the entry's request id, so the state machine's client table
            // applies the write once, as it does every other tagged command.
            let request = write.tag.map(|t| rpb::RequestId {
                client_id: t.client_id,
                sequence: t.sequence,
                lowest_unacked: t.lowest_unacked,
            });
            let mut cmd = wire::write_to_pb(&key, &write, req.epoch);
            cmd.tag = None;
            written(
                node.propose(ipb::command::Op::CacheWrite(cmd), request)
                    .await,
            )
        }
    }
}

/// A write proposal's outcome as memory's answer; `None` if it may or may not take effect.
fn written(r: Result<(u64, Applied), NodeError>) -> Option<Result<MemoryReply, MemoryError>> {
    use ipb::command_result::Result as R;
    let refused = |why: String| Some(Err(MemoryError::Unavailable(why)));
    match r {
        Ok((
            _,
            Applied::Result(ipb::CommandResult {
                result: Some(R::CacheWrite(w)),
            }),
        )) => {
            if !w.refused.is_empty() {
                return refused(w.refused);
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
            Some(Ok(if w.duplicate {
                MemoryReply::Duplicate(result)
            } else {
                MemoryReply::Written(result)
            }))
        }
        // Too old for the client table: refused, never applied twice.
        Ok((_, Applied::Expired)) => {
            Some(Err(MemoryError::Expired(NodeError::Expired.to_string())))
        }
        // Applied, but not as a cache write (a command that did not decode): nothing changed.
        Ok((_, other)) => refused(format!("the cache write was not applied: {other:?}")),
        // Refused before it was appended: it can never commit.
        Err(e @ (NodeError::NotLeader { .. } | NodeError::Raft(_))) => refused(e.to_string()),
        Err(e) => {
            tracing::warn!(error = %e, "cache write outcome unknown; stopping this directory");
            None
        }
    }
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
                    refused: String::new(),
                    duplicate,
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
}
