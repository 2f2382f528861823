//! The cache as an operator sees it: every call aimed at a chosen node, with the server's whole
//! answer (hit or miss, the line's MESI state, expiry, the directory's holders, the node's
//! counters).
//!
//! Cache calls are served by the node that receives them and never forwarded, so which node a
//! call reaches is part of its answer: a Get on node 2 after a Set on node 1 is a MISS on node 2
//! and then a HIT on node 1. [`Client::cache_on`] pins the calls to one node by id (retrying
//! that node, never another); without a node they go where the client's other cache calls go.
//!
//! Retries follow `cache.rs`: every call may be repeated on failure, and a repeated write is
//! applied once (memory de-duplicates it by its request header).

use std::time::Duration;

use bytes::Bytes;
use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::cache_client::CacheClient;

use crate::client::{CallSpec, Client, Target};
use crate::error::{CallKind, Result};

/// Cache calls sent to one node (or wherever the client sends cache calls); see
/// [`Client::cache_on`].
#[derive(Clone, Debug)]
pub struct NodeCache {
    client: Client,
    target: Target,
}

/// The outcome of a compare-and-set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written: the key's new version.
    Written(u64),
    /// Not written: the key's version was not the expected one; this is its current version
    /// (0 if it has no value).
    Mismatch(u64),
}

impl Client {
    /// Cache calls served by node `node`, or, with `None`, by whichever member the client picks
    /// (the leader if it knows one). Fails with [`crate::Error::NotFound`] if no member has
    /// that id.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// client.cache_on(Some(1)).await?.set("k1", "v1", None).await?;
    /// let read = client.cache_on(Some(2)).await?.get("k1").await?;
    /// println!("node 2: hit {} state {:?}", read.hit, read.state());
    /// # Ok(()) }
    /// ```
    pub async fn cache_on(&self, node: Option<u64>) -> Result<NodeCache> {
        Ok(NodeCache {
            client: self.clone(),
            target: self.target_node(node, Target::Any).await?,
        })
    }
}

impl NodeCache {
    /// Every cache call may be retried (see `crate::cache`): writes carry their header.
    fn spec(&self) -> CallSpec {
        CallSpec {
            kind: CallKind::Other,
            target: self.target,
            repeatable: true,
            wait: Duration::ZERO,
        }
    }

    /// Reads `key` through the node's line: found or not, value, version, hit or miss, the
    /// line's state after the read and the key's expiry.
    pub async fn get(&self, key: &str) -> Result<api::CacheGetResponse> {
        let request = api::CacheGetRequest {
            key: key.to_owned(),
        };
        self.client
            .unary(self.spec(), request, |ch, r| async move {
                CacheClient::new(ch).get(r).await
            })
            .await
    }

    /// Writes `key` (expiring after `ttl`, if given) through the node; returns the new version.
    pub async fn set(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<u64> {
        let request = api::CacheSetRequest {
            header: self.client.ticket().header(),
            key: key.to_owned(),
            value: value.into(),
            ttl_ms: ttl_ms(ttl),
        };
        let r = self
            .client
            .unary(self.spec(), request, |ch, r| async move {
                CacheClient::new(ch).set(r).await
            })
            .await?;
        Ok(r.version)
    }

    /// Writes `key` (no TTL) through the node without a request header and without retries,
    /// so that a cluster in write-back mode (`syncd --cache-write-mode write-back`) may answer
    /// it from the node's line: a node holding the key Exclusive or Modified takes the write at
    /// once and writes it back later (docs/cache.md, "Write-back mode"). A tagged write, as
    /// [`set`](NodeCache::set) and [`Client::cache_set`] send, is never served that way,
    /// because the node cannot tell a retry from a first attempt. Writes of one key through
    /// one node keep its line there; alternating nodes move the line at every write.
    ///
    /// The price, which is why this is a separate call:
    /// - it is sent once: a failure that leaves its outcome unknown (a timeout, a broken
    ///   connection) is returned as an error, and the write may or may not have been applied;
    /// - in write-back mode an acknowledged write may be lost within the node's loss window
    ///   (a crash, or the node cut off from the leader, before its next flush).
    ///
    /// Refusals that say the write was not applied (no leader yet, memory unavailable) are
    /// still retried. On a write-through cluster this is `set` without de-duplication.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let node = client.cache_on(Some(2)).await?;
    /// let version = node.set_unretried("counter/page-views", "1041").await?;
    /// println!("written as version {version}");
    /// # Ok(()) }
    /// ```
    pub async fn set_unretried(&self, key: &str, value: impl Into<Bytes>) -> Result<u64> {
        let request = api::CacheSetRequest {
            header: None,
            key: key.to_owned(),
            value: value.into(),
            ttl_ms: 0,
        };
        let once = CallSpec {
            repeatable: false,
            ..self.spec()
        };
        let r = self
            .client
            .unary(once, request, |ch, r| async move {
                CacheClient::new(ch).set(r).await
            })
            .await?;
        Ok(r.version)
    }

    /// Writes `key` only if its version is `expected_version` (0: only if it has no value).
    pub async fn compare_and_set(
        &self,
        key: &str,
        expected_version: u64,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<CasOutcome> {
        let request = api::CompareAndSetRequest {
            header: self.client.ticket().header(),
            key: key.to_owned(),
            expected_version,
            value: value.into(),
            ttl_ms: ttl_ms(ttl),
        };
        let r = self
            .client
            .unary(self.spec(), request, |ch, r| async move {
                CacheClient::new(ch).compare_and_set(r).await
            })
            .await?;
        Ok(if r.success {
            CasOutcome::Written(r.version)
        } else {
            CasOutcome::Mismatch(r.version)
        })
    }

    /// Deletes `key`: whether it existed, and the version given to the deletion.
    pub async fn delete(&self, key: &str) -> Result<api::CacheDeleteResponse> {
        let request = api::CacheDeleteRequest {
            header: self.client.ticket().header(),
            key: key.to_owned(),
        };
        self.client
            .unary(self.spec(), request, |ch, r| async move {
                CacheClient::new(ch).delete(r).await
            })
            .await
    }

    /// The coherence state of `key`: the node's line, and, on the node running the directory
    /// (the leader), every holder.
    pub async fn state(&self, key: &str) -> Result<api::CacheStateResponse> {
        let request = api::CacheStateRequest {
            key: key.to_owned(),
        };
        self.client
            .unary(self.spec(), request, |ch, r| async move {
                CacheClient::new(ch).state(r).await
            })
            .await
    }

    /// The node's cache counters since it started.
    pub async fn stats(&self) -> Result<api::CacheStatsResponse> {
        self.client
            .unary(self.spec(), api::CacheStatsRequest {}, |ch, r| async move {
                CacheClient::new(ch).stats(r).await
            })
            .await
    }
}

fn ttl_ms(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
}
