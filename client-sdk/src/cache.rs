//! The coherent cache: get, set, delete and compare-and-set.
//!
//! A Get is answered by the node that receives it: a HIT from its own line (no network hop
//! beyond the call) or a MISS that fills the line from the directory. A completed Set is never
//! hidden by a stale hit anywhere (see docs/cache.md). Every write carries the call's request
//! header, so a write the client retries (after a timeout, or on another node after a failover)
//! is applied once and answered as its first attempt was: a retried CompareAndSet reports its
//! own success, not a mismatch against itself.

use std::time::Duration;

use bytes::Bytes;
use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::cache_client::CacheClient;

use crate::client::{CallSpec, Client, Target};
use crate::error::{CallKind, Result};

/// A value read from the cache.
///
/// ```
/// use sync_client::CachedValue;
///
/// let v = CachedValue { value: "v1".into(), version: 7, hit: false };
/// assert_eq!(&v.value[..], b"v1");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedValue {
    /// The value.
    pub value: Bytes,
    /// Its version: it only grows, and names the write that produced it.
    pub version: u64,
    /// True if the serving node answered from its own line.
    pub hit: bool,
}

/// Every cache call may be retried: a read changes nothing, and a write carries its request
/// header, so memory applies it once.
fn spec() -> CallSpec {
    CallSpec {
        kind: CallKind::Other,
        target: Target::Any,
        repeatable: true,
        wait: Duration::ZERO,
    }
}

impl Client {
    /// Reads `key`; `None` if it has no value.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// client.cache_set("k1", "v1", None).await?;
    /// let v = client.cache_get("k1").await?.expect("just written");
    /// println!("{:?} (version {}, hit {})", v.value, v.version, v.hit);
    /// # Ok(()) }
    /// ```
    pub async fn cache_get(&self, key: &str) -> Result<Option<CachedValue>> {
        let request = api::CacheGetRequest {
            key: key.to_owned(),
        };
        let r = self
            .unary(spec(), request, |ch, r| async move {
                CacheClient::new(ch).get(r).await
            })
            .await?;
        Ok(r.found.then_some(CachedValue {
            value: r.value,
            version: r.version,
            hit: r.hit,
        }))
    }

    /// Writes `key` (with an optional TTL); returns the new version once every other copy is
    /// invalidated and the value is in the cache's memory.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// use std::time::Duration;
    /// let version = client.cache_set("session/abc", "user 42", Some(Duration::from_secs(60))).await?;
    /// println!("written as version {version}");
    /// # Ok(()) }
    /// ```
    pub async fn cache_set(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<u64> {
        let ticket = self.ticket();
        let request = api::CacheSetRequest {
            header: ticket.header(),
            key: key.to_owned(),
            value: value.into(),
            ttl_ms: ttl.map_or(0, |t| t.as_millis() as u64),
        };
        let r = self
            .unary(spec(), request, |ch, r| async move {
                CacheClient::new(ch).set(r).await
            })
            .await?;
        Ok(r.version)
    }

    /// Deletes `key`; true if it had a value.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// if client.cache_delete("session/abc").await? {
    ///     println!("logged out");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn cache_delete(&self, key: &str) -> Result<bool> {
        let ticket = self.ticket();
        let request = api::CacheDeleteRequest {
            header: ticket.header(),
            key: key.to_owned(),
        };
        let r = self
            .unary(spec(), request, |ch, r| async move {
                CacheClient::new(ch).delete(r).await
            })
            .await?;
        Ok(r.deleted)
    }

    /// Writes `key` only if its version is still `expected_version` (0: only if it has no
    /// value). Returns `Ok(Some(new_version))` on success, `Ok(None)` if the version differed.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// // An increment that loses no update: retry while another writer got in between.
    /// loop {
    ///     let current = client.cache_get("counter").await?;
    ///     let (n, version) = current.map_or((0, 0), |v| {
    ///         (String::from_utf8_lossy(&v.value).parse::<u64>().unwrap_or(0), v.version)
    ///     });
    ///     if client.cache_compare_and_set("counter", version, (n + 1).to_string()).await?.is_some() {
    ///         break;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn cache_compare_and_set(
        &self,
        key: &str,
        expected_version: u64,
        value: impl Into<Bytes>,
    ) -> Result<Option<u64>> {
        let ticket = self.ticket();
        let request = api::CompareAndSetRequest {
            header: ticket.header(),
            key: key.to_owned(),
            expected_version,
            value: value.into(),
            ttl_ms: 0,
        };
        let r = self
            .unary(spec(), request, |ch, r| async move {
                CacheClient::new(ch).compare_and_set(r).await
            })
            .await?;
        Ok(r.success.then_some(r.version))
    }
}
