//! Conversions between the protocol core's messages (`crate::cache::message`) and their
//! protobuf form (`proto/sync/internal/v1/cache_protocol.proto`).
//!
//! Decoding never panics: a peer running another version, or a corrupted message, gives a
//! [`WireError`] and the message is dropped, which the protocol treats as a lost message.

use sync_proto::internal::v1 as ipb;

use crate::cache::message::{
    Demand, DemandKind, Dirty, Envelope, LineGrant, Mutation, ReqId, Reservation, Stamp, ToHome,
    ToNode, Write, WriteBackResult, WriteResult, WriteTag,
};
use crate::cache::{CacheError, Epoch, LineState, Stored};

use ipb::cache_envelope::Msg;

/// A message that does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed cache protocol message: {0}")]
pub struct WireError(&'static str);

/// A decoded message, by direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// For the directory.
    ToHome(Envelope<ToHome>),
    /// For the node.
    ToNode(Envelope<ToNode>),
}

/// A write as the replicated command (and the protocol's WriteRequest) carries it.
pub fn write_to_pb(key: &str, write: &Write, epoch: Epoch) -> ipb::CacheWrite {
    let mutation = match &write.mutation {
        Mutation::Set { value, ttl_ms } => ipb::cache_write::Mutation::Set(ipb::CacheSet {
            value: value.clone(),
            ttl_ms: *ttl_ms,
        }),
        Mutation::Delete => ipb::cache_write::Mutation::Delete(ipb::CacheDelete {}),
    };
    ipb::CacheWrite {
        key: key.to_string(),
        epoch,
        mutation: Some(mutation),
        expect_version: write.expect,
        tag: write.tag.map(|t| ipb::WriteTag {
            client_id: t.client_id,
            sequence: t.sequence,
            lowest_unacked: t.lowest_unacked,
        }),
    }
}

/// The key and write of a [`ipb::CacheWrite`].
pub fn write_from_pb(w: ipb::CacheWrite) -> Result<(String, Write), WireError> {
    let mutation = match w.mutation.ok_or(WireError("a write without a mutation"))? {
        ipb::cache_write::Mutation::Set(s) => Mutation::Set {
            value: s.value,
            ttl_ms: s.ttl_ms,
        },
        ipb::cache_write::Mutation::Delete(_) => Mutation::Delete,
    };
    Ok((
        w.key,
        Write {
            mutation,
            expect: w.expect_version,
            tag: w.tag.filter(|t| t.client_id != 0).map(|t| WriteTag {
                client_id: t.client_id,
                sequence: t.sequence,
                lowest_unacked: t.lowest_unacked,
            }),
        },
    ))
}

/// A node's message for the directory, encoded.
pub fn encode_to_home(env: Envelope<ToHome>) -> ipb::CacheEnvelope {
    let msg = match env.msg {
        ToHome::LeaseRenew { sent_at } => Msg::LeaseRenew(ipb::LeaseRenew { sent_at }),
        ToHome::FillRequest { req, key } => Msg::FillRequest(ipb::FillRequest {
            req: Some(req_to_pb(req)),
            key,
        }),
        ToHome::WriteRequest {
            req,
            key,
            write,
            dropped_upto,
        } => Msg::WriteRequest(ipb::WriteRequest {
            req: Some(req_to_pb(req)),
            write: Some(write_to_pb(&key, &write, 0)),
            dropped_upto,
        }),
        ToHome::InvalidateAck { key, op } => Msg::InvalidateAck(ipb::DemandAck {
            key,
            op,
            kept: false,
        }),
        ToHome::RecallAck { key, op, kept } => Msg::RecallAck(ipb::DemandAck { key, op, kept }),
        ToHome::Evicted { key, grant } => Msg::Evicted(ipb::Evicted { key, grant }),
        ToHome::DirtyAck {
            key,
            op,
            kept,
            dirty,
        } => Msg::DirtyAck(ipb::DirtyAck {
            key,
            op,
            kept,
            dirty: Some(dirty_to_pb(dirty)),
        }),
        ToHome::WriteBack { req, key, dirty } => Msg::WriteBack(ipb::WriteBack {
            req: Some(req_to_pb(req)),
            key,
            dirty: Some(dirty_to_pb(dirty)),
        }),
    };
    envelope(env.stamp, msg)
}

/// The directory's message for a node, encoded.
pub fn encode_to_node(env: Envelope<ToNode>) -> ipb::CacheEnvelope {
    let msg = match env.msg {
        ToNode::LeaseGrant {
            sent_at,
            lease_ms,
            demands,
        } => Msg::LeaseGrant(ipb::LeaseGrant {
            sent_at,
            lease_ms,
            demands: demands.into_iter().map(demand_to_pb).collect(),
        }),
        ToNode::FillReply { req, result, line } => Msg::FillReply(ipb::FillReply {
            req: Some(req_to_pb(req)),
            result: Some(match result {
                Ok(s) => ipb::fill_reply::Result::Stored(ipb::CacheStored {
                    version: s.version,
                    value: s.value,
                    ttl_left_ms: s.ttl_left_ms,
                }),
                Err(e) => ipb::fill_reply::Result::Failure(failure_to_pb(e)),
            }),
            line: line.map(grant_to_pb),
        }),
        ToNode::WriteDone { req, result, line } => Msg::WriteDone(ipb::WriteDone {
            req: Some(req_to_pb(req)),
            result: Some(match result {
                Ok(r) => ipb::write_done::Result::Outcome(outcome_to_pb(r)),
                Err(e) => ipb::write_done::Result::Failure(failure_to_pb(e)),
            }),
            line: line.map(grant_to_pb),
        }),
        ToNode::Demand(d) => Msg::Demand(demand_to_pb(d)),
        ToNode::WriteBackDone { req, result } => {
            use ipb::write_back_done::{NotHolder, Result as R, Written};
            Msg::WriteBackDone(ipb::WriteBackDone {
                req: Some(req_to_pb(req)),
                result: Some(match result {
                    WriteBackResult::Written => R::Written(Written {}),
                    WriteBackResult::NotHolder => R::NotHolder(NotHolder {}),
                    WriteBackResult::Failed(e) => R::Failed(failure_to_pb(e)),
                }),
            })
        }
    };
    envelope(env.stamp, msg)
}

/// Decodes a message of either direction.
pub fn decode(env: ipb::CacheEnvelope) -> Result<Decoded, WireError> {
    let stamp = Stamp::new(env.epoch, env.session);
    let home = |msg| Ok(Decoded::ToHome(Envelope { stamp, msg }));
    let node = |msg| Ok(Decoded::ToNode(Envelope { stamp, msg }));
    match env.msg.ok_or(WireError("an envelope without a message"))? {
        Msg::LeaseRenew(r) => home(ToHome::LeaseRenew { sent_at: r.sent_at }),
        Msg::FillRequest(f) => home(ToHome::FillRequest {
            req: req_from_pb(f.req)?,
            key: f.key,
        }),
        Msg::WriteRequest(w) => {
            let (key, write) = write_from_pb(
                w.write
                    .ok_or(WireError("a write request without a write"))?,
            )?;
            home(ToHome::WriteRequest {
                req: req_from_pb(w.req)?,
                key,
                write,
                dropped_upto: w.dropped_upto,
            })
        }
        Msg::InvalidateAck(a) => home(ToHome::InvalidateAck {
            key: a.key,
            op: a.op,
        }),
        Msg::RecallAck(a) => home(ToHome::RecallAck {
            key: a.key,
            op: a.op,
            kept: a.kept,
        }),
        Msg::Evicted(e) => home(ToHome::Evicted {
            key: e.key,
            grant: e.grant,
        }),
        Msg::DirtyAck(a) => home(ToHome::DirtyAck {
            key: a.key,
            op: a.op,
            kept: a.kept,
            dirty: dirty_from_pb(a.dirty)?,
        }),
        Msg::WriteBack(w) => home(ToHome::WriteBack {
            req: req_from_pb(w.req)?,
            key: w.key,
            dirty: dirty_from_pb(w.dirty)?,
        }),
        Msg::LeaseGrant(g) => node(ToNode::LeaseGrant {
            sent_at: g.sent_at,
            lease_ms: g.lease_ms,
            demands: g
                .demands
                .into_iter()
                .map(demand_from_pb)
                .collect::<Result<_, _>>()?,
        }),
        Msg::FillReply(f) => node(ToNode::FillReply {
            req: req_from_pb(f.req)?,
            result: match f.result.ok_or(WireError("a fill reply without a result"))? {
                ipb::fill_reply::Result::Stored(s) => Ok(Stored {
                    version: s.version,
                    value: s.value,
                    ttl_left_ms: s.ttl_left_ms,
                }),
                ipb::fill_reply::Result::Failure(f) => Err(failure_from_pb(f)),
            },
            line: f.line.map(grant_from_pb).transpose()?,
        }),
        Msg::WriteDone(w) => node(ToNode::WriteDone {
            req: req_from_pb(w.req)?,
            result: match w
                .result
                .ok_or(WireError("a write reply without a result"))?
            {
                ipb::write_done::Result::Outcome(o) => Ok(outcome_from_pb(o)?),
                ipb::write_done::Result::Failure(f) => Err(failure_from_pb(f)),
            },
            line: w.line.map(grant_from_pb).transpose()?,
        }),
        Msg::Demand(d) => node(ToNode::Demand(demand_from_pb(d)?)),
        Msg::WriteBackDone(w) => {
            use ipb::write_back_done::Result as R;
            node(ToNode::WriteBackDone {
                req: req_from_pb(w.req)?,
                result: match w
                    .result
                    .ok_or(WireError("a write-back reply without a result"))?
                {
                    R::Written(_) => WriteBackResult::Written,
                    R::NotHolder(_) => WriteBackResult::NotHolder,
                    R::Failed(f) => WriteBackResult::Failed(failure_from_pb(f)),
                },
            })
        }
    }
}

fn envelope(stamp: Stamp, msg: Msg) -> ipb::CacheEnvelope {
    ipb::CacheEnvelope {
        epoch: stamp.epoch,
        session: stamp.session,
        msg: Some(msg),
    }
}

fn req_to_pb(r: ReqId) -> ipb::CacheReqId {
    ipb::CacheReqId {
        incarnation: r.incarnation,
        seq: r.seq,
    }
}

fn req_from_pb(r: Option<ipb::CacheReqId>) -> Result<ReqId, WireError> {
    let r = r.ok_or(WireError("a request id is missing"))?;
    Ok(ReqId {
        incarnation: r.incarnation,
        seq: r.seq,
    })
}

/// The protocol's line state for a core state.
pub fn state_to_pb(s: LineState) -> ipb::CacheLineState {
    match s {
        LineState::Invalid => ipb::CacheLineState::Invalid,
        LineState::Shared => ipb::CacheLineState::Shared,
        LineState::Exclusive => ipb::CacheLineState::Exclusive,
        LineState::Modified => ipb::CacheLineState::Modified,
    }
}

fn grant_to_pb(g: LineGrant) -> ipb::LineGrant {
    ipb::LineGrant {
        grant: g.grant,
        state: state_to_pb(g.state) as i32,
        reserved: g.reserved.map(|r| ipb::Reservation {
            base: r.base,
            limit: r.limit,
        }),
    }
}

fn grant_from_pb(g: ipb::LineGrant) -> Result<LineGrant, WireError> {
    let state = match ipb::CacheLineState::try_from(g.state) {
        Ok(ipb::CacheLineState::Shared) => LineState::Shared,
        Ok(ipb::CacheLineState::Exclusive) => LineState::Exclusive,
        Ok(ipb::CacheLineState::Modified) => LineState::Modified,
        _ => return Err(WireError("a line grant without a valid state")),
    };
    // A reservation is only ever made for an exclusive line, and never an empty or inverted
    // one: anything else would let the node number local writes memory could give again.
    let reserved = match g.reserved {
        None => None,
        Some(r) if state.is_exclusive() && r.limit >= r.base => Some(Reservation {
            base: r.base,
            limit: r.limit,
        }),
        Some(_) => return Err(WireError("a reservation on a shared line, or limit < base")),
    };
    Ok(LineGrant {
        grant: g.grant,
        state,
        reserved,
    })
}

fn dirty_to_pb(d: Dirty) -> ipb::DirtyWrite {
    ipb::DirtyWrite {
        grant: d.grant,
        version: d.version,
        value: d.value,
    }
}

fn dirty_from_pb(d: Option<ipb::DirtyWrite>) -> Result<Dirty, WireError> {
    let d = d.ok_or(WireError("a dirty write is missing"))?;
    Ok(Dirty {
        grant: d.grant,
        version: d.version,
        value: d.value,
    })
}

fn demand_to_pb(d: Demand) -> ipb::Demand {
    ipb::Demand {
        key: d.key,
        op: d.op,
        upto: d.upto,
        kind: match d.kind {
            DemandKind::Recall => ipb::DemandKind::Recall,
            DemandKind::Invalidate => ipb::DemandKind::Invalidate,
        } as i32,
    }
}

fn demand_from_pb(d: ipb::Demand) -> Result<Demand, WireError> {
    let kind = match ipb::DemandKind::try_from(d.kind) {
        Ok(ipb::DemandKind::Recall) => DemandKind::Recall,
        Ok(ipb::DemandKind::Invalidate) => DemandKind::Invalidate,
        _ => return Err(WireError("a demand of unknown kind")),
    };
    Ok(Demand {
        key: d.key,
        op: d.op,
        upto: d.upto,
        kind,
    })
}

fn outcome_to_pb(r: WriteResult) -> ipb::CacheWriteOutcome {
    use ipb::cache_write_outcome::{Applied, Outcome};
    ipb::CacheWriteOutcome {
        outcome: Some(match r {
            WriteResult::Applied { version, existed } => {
                Outcome::Applied(Applied { version, existed })
            }
            WriteResult::Mismatch { current } => Outcome::MismatchCurrent(current),
        }),
    }
}

fn outcome_from_pb(o: ipb::CacheWriteOutcome) -> Result<WriteResult, WireError> {
    use ipb::cache_write_outcome::Outcome;
    Ok(
        match o.outcome.ok_or(WireError("a write outcome is missing"))? {
            Outcome::Applied(a) => WriteResult::Applied {
                version: a.version,
                existed: a.existed,
            },
            Outcome::MismatchCurrent(current) => WriteResult::Mismatch { current },
        },
    )
}

fn failure_to_pb(e: CacheError) -> ipb::CacheFailure {
    use ipb::cache_failure::Kind;
    let (kind, message) = match e {
        CacheError::InvalidArgument(m) => (Kind::InvalidArgument, m),
        CacheError::ResourceExhausted(m) => (Kind::ResourceExhausted, m),
        CacheError::Unavailable(m) => (Kind::Unavailable, m),
        CacheError::Timeout(m) => (Kind::Timeout, m),
        CacheError::Expired(m) => (Kind::Expired, m),
    };
    ipb::CacheFailure {
        kind: kind as i32,
        message,
    }
}

/// An unknown kind is read as UNAVAILABLE: the operation failed, and nothing says it happened.
fn failure_from_pb(f: ipb::CacheFailure) -> CacheError {
    use ipb::cache_failure::Kind;
    match Kind::try_from(f.kind) {
        Ok(Kind::InvalidArgument) => CacheError::InvalidArgument(f.message),
        Ok(Kind::ResourceExhausted) => CacheError::ResourceExhausted(f.message),
        Ok(Kind::Timeout) => CacheError::Timeout(f.message),
        Ok(Kind::Expired) => CacheError::Expired(f.message),
        _ => CacheError::Unavailable(f.message),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn stamp() -> Stamp {
        Stamp::new(3, 7)
    }

    fn req() -> ReqId {
        ReqId {
            incarnation: 11,
            seq: 4,
        }
    }

    fn dirty() -> Dirty {
        Dirty {
            grant: 6,
            version: 42,
            value: Bytes::from("local"),
        }
    }

    #[test]
    fn every_message_to_the_directory_round_trips() {
        let set = Write {
            mutation: Mutation::Set {
                value: Bytes::from("v"),
                ttl_ms: Some(50),
            },
            expect: Some(9),
            tag: Some(WriteTag {
                client_id: 77,
                sequence: 5,
                lowest_unacked: 3,
            }),
        };
        let del = Write {
            mutation: Mutation::Delete,
            expect: None,
            tag: None,
        };
        let msgs = vec![
            ToHome::LeaseRenew { sent_at: 123 },
            ToHome::FillRequest {
                req: req(),
                key: "k".into(),
            },
            ToHome::WriteRequest {
                req: req(),
                key: "k".into(),
                write: set,
                dropped_upto: 5,
            },
            ToHome::WriteRequest {
                req: req(),
                key: "k".into(),
                write: del,
                dropped_upto: 0,
            },
            ToHome::InvalidateAck {
                key: "k".into(),
                op: 2,
            },
            ToHome::RecallAck {
                key: "k".into(),
                op: 2,
                kept: true,
            },
            ToHome::Evicted {
                key: "k".into(),
                grant: 8,
            },
            ToHome::DirtyAck {
                key: "k".into(),
                op: 2,
                kept: false,
                dirty: dirty(),
            },
            ToHome::DirtyAck {
                key: "k".into(),
                op: 3,
                kept: true,
                dirty: dirty(),
            },
            ToHome::WriteBack {
                req: req(),
                key: "k".into(),
                dirty: dirty(),
            },
        ];
        for msg in msgs {
            let env = Envelope {
                stamp: stamp(),
                msg,
            };
            assert_eq!(
                decode(encode_to_home(env.clone())),
                Ok(Decoded::ToHome(env))
            );
        }
    }

    #[test]
    fn every_message_to_a_node_round_trips() {
        let demand = |kind| Demand {
            key: "k".into(),
            op: 3,
            upto: 6,
            kind,
        };
        let line = Some(LineGrant {
            grant: 4,
            state: LineState::Exclusive,
            reserved: None,
        });
        let msgs = vec![
            ToNode::LeaseGrant {
                sent_at: 5,
                lease_ms: 5_000,
                demands: vec![demand(DemandKind::Recall), demand(DemandKind::Invalidate)],
            },
            ToNode::FillReply {
                req: req(),
                result: Ok(Stored {
                    version: 4,
                    value: Some(Bytes::from("x")),
                    ttl_left_ms: Some(10),
                }),
                line,
            },
            ToNode::FillReply {
                req: req(),
                result: Ok(Stored {
                    version: 0,
                    value: None,
                    ttl_left_ms: None,
                }),
                line: None,
            },
            ToNode::FillReply {
                req: req(),
                result: Err(CacheError::Unavailable("down".into())),
                line: None,
            },
            ToNode::WriteDone {
                req: req(),
                result: Ok(WriteResult::Applied {
                    version: 9,
                    existed: true,
                }),
                line: Some(LineGrant {
                    grant: 5,
                    state: LineState::Modified,
                    reserved: None,
                }),
            },
            ToNode::WriteDone {
                req: req(),
                result: Ok(WriteResult::Mismatch { current: 2 }),
                line: None,
            },
            ToNode::WriteDone {
                req: req(),
                result: Err(CacheError::Timeout("slow".into())),
                line: None,
            },
            ToNode::Demand(demand(DemandKind::Invalidate)),
            ToNode::FillReply {
                req: req(),
                result: Ok(Stored {
                    version: 4,
                    value: Some(Bytes::from("x")),
                    ttl_left_ms: None,
                }),
                line: Some(LineGrant {
                    grant: 7,
                    state: LineState::Exclusive,
                    reserved: Some(Reservation { base: 4, limit: 68 }),
                }),
            },
            ToNode::WriteDone {
                req: req(),
                result: Ok(WriteResult::Applied {
                    version: 70,
                    existed: false,
                }),
                line: Some(LineGrant {
                    grant: 8,
                    state: LineState::Modified,
                    reserved: Some(Reservation {
                        base: 70,
                        limit: 134,
                    }),
                }),
            },
            ToNode::WriteBackDone {
                req: req(),
                result: WriteBackResult::Written,
            },
            ToNode::WriteBackDone {
                req: req(),
                result: WriteBackResult::NotHolder,
            },
            ToNode::WriteBackDone {
                req: req(),
                result: WriteBackResult::Failed(CacheError::Unavailable("fenced".into())),
            },
        ];
        for msg in msgs {
            let env = Envelope {
                stamp: stamp(),
                msg,
            };
            assert_eq!(
                decode(encode_to_node(env.clone())),
                Ok(Decoded::ToNode(env))
            );
        }
    }

    #[test]
    fn a_malformed_message_is_an_error_not_a_panic() {
        let empty = ipb::CacheEnvelope::default();
        assert!(decode(empty).is_err());
        let no_req = ipb::CacheEnvelope {
            msg: Some(Msg::FillRequest(ipb::FillRequest {
                req: None,
                key: "k".into(),
            })),
            ..Default::default()
        };
        assert!(decode(no_req).is_err());
        let bad_state = ipb::CacheEnvelope {
            msg: Some(Msg::FillReply(ipb::FillReply {
                req: Some(req_to_pb(req())),
                result: Some(ipb::fill_reply::Result::Failure(
                    ipb::CacheFailure::default(),
                )),
                line: Some(ipb::LineGrant {
                    grant: 1,
                    state: 0,
                    reserved: None,
                }),
            })),
            ..Default::default()
        };
        assert!(decode(bad_state).is_err());
    }

    #[test]
    fn a_malformed_write_back_message_is_an_error() {
        let fill = |state: ipb::CacheLineState, base, limit| ipb::CacheEnvelope {
            msg: Some(Msg::FillReply(ipb::FillReply {
                req: Some(req_to_pb(req())),
                result: Some(ipb::fill_reply::Result::Failure(
                    ipb::CacheFailure::default(),
                )),
                line: Some(ipb::LineGrant {
                    grant: 1,
                    state: state as i32,
                    reserved: Some(ipb::Reservation { base, limit }),
                }),
            })),
            ..Default::default()
        };
        assert!(decode(fill(ipb::CacheLineState::Exclusive, 3, 9)).is_ok());
        // Local writes on a shared line, or from an inverted block, could reuse versions.
        assert!(decode(fill(ipb::CacheLineState::Shared, 3, 9)).is_err());
        assert!(decode(fill(ipb::CacheLineState::Exclusive, 9, 3)).is_err());
        let no_dirty = ipb::CacheEnvelope {
            msg: Some(Msg::DirtyAck(ipb::DirtyAck {
                key: "k".into(),
                op: 1,
                kept: false,
                dirty: None,
            })),
            ..Default::default()
        };
        assert!(decode(no_dirty).is_err());
        let no_write = ipb::CacheEnvelope {
            msg: Some(Msg::WriteBack(ipb::WriteBack {
                req: Some(req_to_pb(req())),
                key: "k".into(),
                dirty: None,
            })),
            ..Default::default()
        };
        assert!(decode(no_write).is_err());
        let no_result = ipb::CacheEnvelope {
            msg: Some(Msg::WriteBackDone(ipb::WriteBackDone {
                req: Some(req_to_pb(req())),
                result: None,
            })),
            ..Default::default()
        };
        assert!(decode(no_result).is_err());
    }
}
