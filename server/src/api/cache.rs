//! `sync.v1.Cache`: reads and writes through this node's coherent cache.
//!
//! Every call is served by the node that receives it and is never forwarded: which node a
//! client talks to is part of the answer (hit or miss, the line's state). The protocol runs in
//! the cache runtime ([`crate::node::cache`]); this file only translates requests, answers and
//! errors.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use sync_proto::sync::v1 as api;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::deadline_of;
use crate::cache::message::{Mutation, Write, WriteResult, WriteTag};
use crate::cache::node::{InvalidationReason, Read};
use crate::cache::{CacheError, LineState};
use crate::node::NodeHandle;
use crate::node::cache::{CacheHandle, MemoryBackend};
use crate::node::driver::now_unix_ms;
use crate::raft::rng::SplitMix64;

/// Most keys in a GetMany or SetMany.
pub const MAX_KEYS: usize = 1000;

/// The Cache service of one node.
pub struct CacheService {
    /// The node (for the leader's id and memory's version in State).
    pub node: NodeHandle,
    /// The node's cache runtime.
    pub cache: CacheHandle,
}

/// The cache error as a gRPC status (the mapping documented in cache.proto).
pub fn status_of(e: CacheError) -> Status {
    let message = e.to_string();
    match e {
        CacheError::InvalidArgument(_) => Status::invalid_argument(message),
        CacheError::ResourceExhausted(_) => Status::resource_exhausted(message),
        CacheError::Unavailable(_) => Status::unavailable(message),
        CacheError::Timeout(_) => Status::deadline_exceeded(message),
        CacheError::Expired(_) => Status::aborted(message),
    }
}

/// The public MESI state of a line state.
pub fn mesi(s: LineState) -> api::MesiState {
    match s {
        LineState::Invalid => api::MesiState::Invalid,
        LineState::Shared => api::MesiState::Shared,
        LineState::Exclusive => api::MesiState::Exclusive,
        LineState::Modified => api::MesiState::Modified,
    }
}

/// Runs `f` within the call's deadline.
async fn within<T>(
    deadline: Duration,
    f: impl Future<Output = Result<T, CacheError>>,
) -> Result<T, Status> {
    match tokio::time::timeout(deadline, f).await {
        Ok(r) => r.map_err(status_of),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within {} ms; a write may or may not have happened",
            deadline.as_millis()
        ))),
    }
}

fn get_response(key: String, r: Read) -> api::CacheGetResponse {
    let expires_unix_ms = r
        .stored
        .ttl_left_ms
        .map_or(0, |t| now_unix_ms().saturating_add(t));
    api::CacheGetResponse {
        key,
        found: r.stored.value.is_some(),
        value: r.stored.value.unwrap_or_default(),
        version: r.stored.version,
        hit: r.hit,
        state: mesi(r.state) as i32,
        expires_unix_ms,
    }
}

fn set(value: Bytes, ttl_ms: u64, expect: Option<u64>, tag: Option<WriteTag>) -> Write {
    Write {
        mutation: Mutation::Set {
            value,
            ttl_ms: (ttl_ms > 0).then_some(ttl_ms),
        },
        expect,
        tag,
    }
}

/// The de-duplication tag of a write's request header (none without a client id).
fn tag_of(header: Option<api::RequestHeader>) -> Option<WriteTag> {
    header.filter(|h| h.client_id != 0).map(|h| WriteTag {
        client_id: h.client_id,
        sequence: h.sequence,
        lowest_unacked: h.lowest_unacked,
    })
}

/// The tag of entry `index` of a SetMany sent with `tag`. A SetMany is several writes, each
/// de-duplicated on its own, under one request header; each entry is therefore tagged as
/// request `index + 1` of a client of its own, whose id is derived from the header's client and
/// sequence (so every node derives the same one, and a retry of the call the same ones).
fn set_many_entry_tag(tag: Option<WriteTag>, index: usize) -> Option<WriteTag> {
    tag.map(|t| {
        let mix = SplitMix64(t.client_id ^ t.sequence.rotate_left(32)).next_u64();
        WriteTag {
            client_id: mix.max(1),
            sequence: index as u64 + 1,
            lowest_unacked: 0,
        }
    })
}

/// The version of an applied write; a mismatch cannot answer a plain Set.
fn applied_version(r: WriteResult) -> Result<u64, Status> {
    match r {
        WriteResult::Applied { version, .. } => Ok(version),
        WriteResult::Mismatch { .. } => Err(Status::internal("a plain write reported a mismatch")),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<api::InvalidationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl api::cache_server::Cache for CacheService {
    async fn get(
        &self,
        request: Request<api::CacheGetRequest>,
    ) -> Result<Response<api::CacheGetResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let key = request.into_inner().key;
        // A hit is served here, on this task, from the node's read view: no timer, no hop.
        if let Some(read) = self.cache.hit(&key) {
            return Ok(Response::new(get_response(key, read)));
        }
        let read = within(deadline, self.cache.through_runtime(key.clone())).await?;
        Ok(Response::new(get_response(key, read)))
    }

    async fn set(
        &self,
        request: Request<api::CacheSetRequest>,
    ) -> Result<Response<api::CacheSetResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let req = request.into_inner();
        let write = set(req.value, req.ttl_ms, None, tag_of(req.header));
        let r = within(deadline, self.cache.write(req.key, write)).await?;
        Ok(Response::new(api::CacheSetResponse {
            version: applied_version(r)?,
        }))
    }

    async fn delete(
        &self,
        request: Request<api::CacheDeleteRequest>,
    ) -> Result<Response<api::CacheDeleteResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let req = request.into_inner();
        let write = Write {
            mutation: Mutation::Delete,
            expect: None,
            tag: tag_of(req.header),
        };
        match within(deadline, self.cache.write(req.key, write)).await? {
            WriteResult::Applied { version, existed } => {
                Ok(Response::new(api::CacheDeleteResponse {
                    deleted: existed,
                    version: if existed { version } else { 0 },
                }))
            }
            WriteResult::Mismatch { .. } => Err(Status::internal("a delete reported a mismatch")),
        }
    }

    async fn compare_and_set(
        &self,
        request: Request<api::CompareAndSetRequest>,
    ) -> Result<Response<api::CompareAndSetResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let req = request.into_inner();
        let write = set(
            req.value,
            req.ttl_ms,
            Some(req.expected_version),
            tag_of(req.header),
        );
        let (success, version) = match within(deadline, self.cache.write(req.key, write)).await? {
            WriteResult::Applied { version, .. } => (true, version),
            WriteResult::Mismatch { current } => (false, current),
        };
        Ok(Response::new(api::CompareAndSetResponse {
            success,
            version,
        }))
    }

    async fn get_many(
        &self,
        request: Request<api::GetManyRequest>,
    ) -> Result<Response<api::GetManyResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let keys = request.into_inner().keys;
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(Status::invalid_argument(format!(
                "GetMany takes 1 to {MAX_KEYS} keys, not {}",
                keys.len()
            )));
        }
        // Concurrently: each miss waits for its own fill.
        let reads = keys.into_iter().map(|key| async move {
            let read = self.cache.get(key.clone()).await?;
            Ok::<_, CacheError>(get_response(key, read))
        });
        let results = within(deadline, async {
            futures::future::join_all(reads)
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        Ok(Response::new(api::GetManyResponse { results }))
    }

    async fn set_many(
        &self,
        request: Request<api::SetManyRequest>,
    ) -> Result<Response<api::SetManyResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let req = request.into_inner();
        let (entries, tag) = (req.entries, tag_of(req.header));
        if entries.is_empty() || entries.len() > MAX_KEYS {
            return Err(Status::invalid_argument(format!(
                "SetMany takes 1 to {MAX_KEYS} entries, not {}",
                entries.len()
            )));
        }
        // In request order, one at a time, as documented (not atomic).
        let writes = async {
            let mut versions = Vec::with_capacity(entries.len());
            for (i, e) in entries.into_iter().enumerate() {
                let write = set(e.value, e.ttl_ms, None, set_many_entry_tag(tag, i));
                let r = self.cache.write(e.key, write).await?;
                versions.push(r);
            }
            Ok(versions)
        };
        let versions = within(deadline, writes)
            .await?
            .into_iter()
            .map(applied_version)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(api::SetManyResponse { versions }))
    }

    async fn state(
        &self,
        request: Request<api::CacheStateRequest>,
    ) -> Result<Response<api::CacheStateResponse>, Status> {
        let key = request.into_inner().key;
        let s = self.cache.state(key.clone()).await.map_err(status_of)?;
        let status = self.node.status();
        // Memory's version is known here only on the leader (it is what the directory reads).
        let directory_version = if s.holders.is_some() {
            let k = key.clone();
            match &self.cache.backend {
                MemoryBackend::Raft => self
                    .node
                    .read(false, move |st| {
                        st.cache_memory().read(&k, now_unix_ms()).version
                    })
                    .await
                    .unwrap_or(0),
                MemoryBackend::Redis(redis) => redis.version_of(&k).await.unwrap_or(0),
            }
        } else {
            0
        };
        let line = s.line;
        let valid = line.state != LineState::Invalid;
        Ok(Response::new(api::CacheStateResponse {
            key,
            node_id: status.id,
            state: mesi(line.state) as i32,
            version: line.version,
            lease_remaining_ms: if valid { line.lease_remaining_ms } else { 0 },
            directory_node_id: status.leader.unwrap_or(0),
            directory_version,
            holders: s
                .holders
                .unwrap_or_default()
                .into_iter()
                .map(|(node_id, h)| api::CacheHolder {
                    node_id,
                    state: mesi(h.state) as i32,
                })
                .collect(),
            dirty: line.dirty,
        }))
    }

    async fn stats(
        &self,
        _request: Request<api::CacheStatsRequest>,
    ) -> Result<Response<api::CacheStatsResponse>, Status> {
        let s = self.cache.stats().await.map_err(status_of)?;
        Ok(Response::new(api::CacheStatsResponse {
            node_id: self.node.settings.id,
            hits: s.node.hits,
            misses: s.node.misses,
            invalidations_sent: s.invalidations_sent,
            invalidations_received: s.node.invalidations_received,
            write_backs: s.node.write_backs,
            evictions: s.node.evictions,
            bytes: s.bytes,
            entries: s.entries as u64,
            capacity_bytes: self.cache.cfg.capacity_bytes,
            local_writes: s.node.local_writes,
            dirty_lines: s.dirty_lines as u64,
            dirty_lines_lost: s.node.dirty_lost,
        }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<api::CacheSubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let prefix = request.into_inner().prefix;
        let mut events = self.cache.subscribe();
        let stream = async_stream::stream! {
            loop {
                match events.recv().await {
                    Ok(ev) if ev.key.starts_with(&prefix) => {
                        let reason = match ev.reason {
                            InvalidationReason::Written => api::InvalidationReason::Written,
                            InvalidationReason::Deleted => api::InvalidationReason::Deleted,
                            InvalidationReason::Expired => api::InvalidationReason::Expired,
                            InvalidationReason::Evicted => api::InvalidationReason::Evicted,
                            InvalidationReason::LeaseExpired => {
                                api::InvalidationReason::LeaseExpired
                            }
                        };
                        yield Ok(api::InvalidationEvent {
                            key: ev.key,
                            version: ev.version,
                            reason: reason as i32,
                        });
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => {
                        yield Err(Status::aborted(format!(
                            "this subscriber fell {n} events behind; empty the near cache and \
                             subscribe again"
                        )));
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}
