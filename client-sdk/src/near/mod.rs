//! The near cache: an opt-in, in-process copy of cache values, kept coherent through one node's
//! invalidation stream (`Cache.Subscribe`).
//!
//! The shell here owns the stream, the connection to the node it comes from (the *home*), and
//! the calls; the rules that decide what may be served live in the pure [`core`].
//!
//! What a hit guarantees is stated on [`NearCache`], where users of the crate read it.

pub(crate) mod core;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::cache_client::CacheClient;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tonic::transport::Channel;

pub use self::core::NearCacheStats;
use self::core::{Bounds, Core, Fill};
use crate::client::Client;
use crate::error::{Error, Result};

/// The shortest and longest pause before subscribing again after a stream failed.
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(2);

/// Settings of a near cache; see [`Client::near_cache`].
///
/// ```
/// use std::time::Duration;
/// use sync_client::NearCacheConfig;
///
/// let config = NearCacheConfig {
///     max_entries: 1_000,
///     prefix: "users/".to_owned(),
///     ..NearCacheConfig::default()
/// };
/// assert_eq!(config.max_bytes, 64 << 20);
/// assert_eq!(config.liveness, Duration::from_secs(2));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearCacheConfig {
    /// The most entries kept; the least recently used go first. Default 10 000.
    pub max_entries: usize,
    /// The most bytes of keys and values kept; a larger value is never kept. Default 64 MiB.
    pub max_bytes: usize,
    /// Only keys starting with this are cached (and only their events are streamed); other keys
    /// are read through the cluster. Default: empty (every key).
    pub prefix: String,
    /// How long a silently broken connection to the home node may go unnoticed: HTTP/2 pings
    /// go every half of it and must be answered within the other half. The staleness bound for
    /// other processes' writes under a partition. Default 2 s; at least 200 ms.
    pub liveness: Duration,
}

impl Default for NearCacheConfig {
    fn default() -> Self {
        NearCacheConfig {
            max_entries: 10_000,
            max_bytes: 64 << 20,
            prefix: String::new(),
            liveness: Duration::from_secs(2),
        }
    }
}

impl NearCacheConfig {
    /// Refuses bounds that could hold nothing and a liveness too short to be answered.
    ///
    /// ```
    /// use sync_client::NearCacheConfig;
    ///
    /// let empty = NearCacheConfig { max_entries: 0, ..NearCacheConfig::default() };
    /// assert!(empty.validate().is_err());
    /// assert!(NearCacheConfig::default().validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        let bad = |message: &str| {
            Err(Error::InvalidArgument {
                message: format!("near cache: {message}"),
            })
        };
        if self.max_entries == 0 {
            return bad("max_entries must be at least 1");
        }
        if self.max_bytes == 0 {
            return bad("max_bytes must be at least 1");
        }
        if self.liveness < Duration::from_millis(200) {
            return bad("liveness must be at least 200ms");
        }
        Ok(())
    }
}

/// A value read through a [`NearCache`].
///
/// ```
/// let v = sync_client::NearValue { value: "Ada".into(), version: 3, near_hit: true };
/// assert!(v.near_hit);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearValue {
    /// The value.
    pub value: Bytes,
    /// Its version (as in [`CachedValue`](crate::CachedValue)).
    pub version: u64,
    /// True if it came from the near cache, with no call to the cluster.
    pub near_hit: bool,
}

/// An in-process cache in front of the cluster's cache, kept coherent by an invalidation
/// stream. Cheap to clone: clones share the entries and the stream, which stops when the last
/// clone is dropped.
///
/// # What a hit guarantees, and what it does not
///
/// The server's `Subscribe` reports an invalidation when the home node's line stops being
/// valid, and the home node's line stops being valid *before* a write elsewhere completes (the
/// directory waits for its acknowledgement, or for its lease to run out; the node publishes
/// the event in the same step as it drops the line, before it acknowledges). But the event then
/// travels to this process on its own, after the node acknowledged: a write can complete while
/// its event is still on the wire. So a near cache gives **bounded staleness**, not the
/// linearizable reads of [`Client::cache_get`]:
///
/// - **Writes of this process are never hidden.** A write made through the [`NearCache`]
///   handle drops the key before it is sent and again when it is answered, and discards fills
///   in flight, so a read through the handle after the write returned sees it or something
///   newer. Hits never go back in version. (A write made with [`Client::cache_set`] directly,
///   not through the handle, is seen like another process's write.)
/// - **Writes of other processes** are hidden by a hit for at most the time their invalidation
///   takes from the home node to this process: normally one network hop. If the connection to
///   the home node breaks silently (a partition, a paused node process), HTTP/2 keep-alive
///   pings notice within [`NearCacheConfig::liveness`]; until then hits may be stale by that
///   much, plus the hop. Two cases have no bound: this process stalling with events unread, and
///   a home node whose process still answers pings while its cache task is stuck (its own hits
///   stop then, at the end of its lease; this cache's do not, since the server's stream carries
///   no heartbeat to tell the two apart).
/// - **Only values the home node keeps.** Fills come from the home node only, over the same
///   connection as the stream, and are kept only if that node kept a valid line (it then owes
///   an event when the line ends: a write anywhere, a delete, a TTL, an eviction, a lost lease,
///   a new leader). The stream is established (the server holds the subscriber) before the
///   first fill is sent.
/// - **A fill that raced an invalidation is discarded** by version: an event for version `v`
///   discards every fill in flight of version `v` or older (the event can overtake the answer).
/// - **No stream, no hits.** When the stream ends or breaks (the node died, restarted, lagged
///   more than its buffer and was cut off with ABORTED, or keep-alive found the connection
///   dead), the whole near cache is emptied, and reads go to the cluster (through
///   [`Client::cache_get`], with its routing and retries) until a new stream, to any member,
///   is established. Nothing filled under the old stream is kept.
/// - **TTLs** are checked against this process's wall clock, from the expiry the node reports
///   on its own clock; the node's `EXPIRED` event is what normally ends the entry, and clock
///   skew can make the local check late by the skew.
///
/// # Example
///
/// ```no_run
/// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
/// use sync_client::NearCacheConfig;
///
/// let near = client.near_cache(NearCacheConfig { max_entries: 1_000, ..Default::default() })?;
/// near.set("users/42", "Ada", None).await?;
/// let first = near.get("users/42").await?; // from the cluster, then kept
/// let again = near.get("users/42").await?; // from memory, until invalidated
/// println!("{first:?} {again:?} {:?}", near.stats());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct NearCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// For misses without a stream, and for writes (routed and retried as usual).
    client: Client,
    prefix: String,
    shared: Arc<Shared>,
    /// The stream task: aborted when the last handle goes, so the subscription ends with it.
    task: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the handles and the stream task share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The address of the home node while a stream is live (for [`NearCache::wait_subscribed`]).
    home: watch::Sender<Option<String>>,
}

#[derive(Debug)]
struct State {
    core: Core,
    /// The connection the live stream runs on, used for fills so that they come from the node
    /// whose events the core applies; `None` while no stream is live.
    channel: Option<Channel>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Milliseconds since the Unix epoch on this process's clock (for TTLs only).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Client {
    /// Starts a near cache over this client; its stream to one member starts at once in the
    /// background (reads go to the cluster until it is established). Must be called inside a
    /// Tokio runtime. Fails only on a bad [`NearCacheConfig`].
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// use sync_client::NearCacheConfig;
    /// let near = client.near_cache(NearCacheConfig { prefix: "users/".into(), ..Default::default() })?;
    /// # Ok(()) }
    /// ```
    pub fn near_cache(&self, config: NearCacheConfig) -> Result<NearCache> {
        config.validate()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                core: Core::new(Bounds {
                    max_entries: config.max_entries,
                    max_bytes: config.max_bytes,
                }),
                channel: None,
            }),
            home: watch::channel(None).0,
        });
        let task = tokio::spawn(follow(self.clone(), config.clone(), Arc::clone(&shared)));
        Ok(NearCache {
            inner: Arc::new(Inner {
                client: self.clone(),
                prefix: config.prefix,
                shared,
                task: task.abort_handle(),
            }),
        })
    }
}

impl NearCache {
    /// Reads `key`: from the near cache if it holds it, else from the home node (keeping the
    /// answer if the rules allow), else, with no live stream or if the home node fails, through
    /// the cluster like [`Client::cache_get`]. `None` if the key has no value.
    ///
    /// ```no_run
    /// # async fn demo(near: sync_client::NearCache) -> sync_client::Result<()> {
    /// if let Some(v) = near.get("users/42").await? {
    ///     println!("{:?} (version {}, from memory: {})", v.value, v.version, v.near_hit);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get(&self, key: &str) -> Result<Option<NearValue>> {
        let inner = &self.inner;
        let fill = if key.starts_with(&inner.prefix) {
            let mut state = inner.shared.state();
            if let Some((value, version)) = state.core.get(key, now_ms()) {
                return Ok(Some(NearValue {
                    value,
                    version,
                    near_hit: true,
                }));
            }
            match state.channel.clone() {
                Some(channel) => state.core.begin_fill(key).map(|t| (channel, t)),
                None => None,
            }
        } else {
            None
        };
        if let Some((channel, ticket)) = fill {
            let client = &inner.client;
            let timeout = client.inner.config.request_timeout;
            let request = client.request(
                api::CacheGetRequest {
                    key: key.to_owned(),
                },
                Some(timeout),
            );
            let answer = tokio::time::timeout(timeout, CacheClient::new(channel).get(request))
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|r| r.into_inner());
            let fill = answer.as_ref().map(|r| Fill {
                value: r.found.then(|| r.value.clone()),
                version: r.version,
                line_valid: r.state != api::MesiState::Invalid as i32,
                expires_at_ms: (r.expires_unix_ms > 0).then_some(r.expires_unix_ms),
            });
            inner.shared.state().core.complete_fill(ticket, fill);
            if let Some(r) = answer {
                return Ok(r.found.then_some(NearValue {
                    value: r.value,
                    version: r.version,
                    near_hit: false,
                }));
            }
            // The home node failed this read: the stream will notice if it is gone; this read
            // goes through the cluster instead.
        }
        let read = inner.client.cache_get(key).await?;
        Ok(read.map(|v| NearValue {
            value: v.value,
            version: v.version,
            near_hit: false,
        }))
    }

    /// Writes `key` like [`Client::cache_set`], dropping it from the near cache before and after
    /// so that this process reads its own write.
    ///
    /// ```no_run
    /// # async fn demo(near: sync_client::NearCache) -> sync_client::Result<()> {
    /// let version = near.set("users/42", "Ada", None).await?;
    /// assert!(near.get("users/42").await?.is_some_and(|v| v.version >= version));
    /// # Ok(()) }
    /// ```
    pub async fn set(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<u64> {
        self.own_write(key, self.inner.client.cache_set(key, value, ttl))
            .await
    }

    /// Deletes `key` like [`Client::cache_delete`], dropping it from the near cache.
    ///
    /// ```no_run
    /// # async fn demo(near: sync_client::NearCache) -> sync_client::Result<()> {
    /// near.delete("users/42").await?;
    /// assert!(near.get("users/42").await?.is_none());
    /// # Ok(()) }
    /// ```
    pub async fn delete(&self, key: &str) -> Result<bool> {
        self.own_write(key, self.inner.client.cache_delete(key))
            .await
    }

    /// Compare-and-set like [`Client::cache_compare_and_set`], dropping `key` from the near
    /// cache.
    ///
    /// ```no_run
    /// # async fn demo(near: sync_client::NearCache) -> sync_client::Result<()> {
    /// // Fill only if nobody wrote the key meanwhile (version 0: no value).
    /// let filled = near.compare_and_set("users/42", 0, "Ada").await?;
    /// println!("filled: {}", filled.is_some());
    /// # Ok(()) }
    /// ```
    pub async fn compare_and_set(
        &self,
        key: &str,
        expected_version: u64,
        value: impl Into<Bytes>,
    ) -> Result<Option<u64>> {
        let write = self
            .inner
            .client
            .cache_compare_and_set(key, expected_version, value);
        self.own_write(key, write).await
    }

    async fn own_write<T>(&self, key: &str, write: impl Future<Output = Result<T>>) -> Result<T> {
        self.inner.shared.state().core.own_write(key);
        let result = write.await;
        self.inner.shared.state().core.own_write(key);
        result
    }

    /// What the near cache did so far, and its size now.
    ///
    /// ```no_run
    /// # async fn demo(near: sync_client::NearCache) -> sync_client::Result<()> {
    /// let s = near.stats();
    /// println!("hit ratio {:.2}", s.hits as f64 / (s.hits + s.misses).max(1) as f64);
    /// # Ok(()) }
    /// ```
    pub fn stats(&self) -> NearCacheStats {
        self.inner.shared.state().core.stats()
    }

    /// The address of the node whose invalidation stream is live; `None` while there is none
    /// (and nothing is served from the near cache).
    ///
    /// ```no_run
    /// # async fn demo(near: sync_client::NearCache) -> sync_client::Result<()> {
    /// match near.home() {
    ///     Some(node) => println!("following invalidations from {node}"),
    ///     None => println!("no stream: every read goes to the cluster"),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn home(&self) -> Option<String> {
        self.inner.shared.home.borrow().clone()
    }

    /// Waits until a stream is live, at most `timeout`; returns the home node's address.
    ///
    /// ```no_run
    /// # async fn demo(near: sync_client::NearCache) -> sync_client::Result<()> {
    /// use std::time::Duration;
    /// let home = near.wait_subscribed(Duration::from_secs(5)).await?;
    /// println!("near cache live on {home}");
    /// # Ok(()) }
    /// ```
    pub async fn wait_subscribed(&self, timeout: Duration) -> Result<String> {
        let mut home = self.inner.shared.home.subscribe();
        let found = tokio::time::timeout(timeout, home.wait_for(Option::is_some)).await;
        match found {
            Ok(Ok(address)) => Ok(address.clone().unwrap_or_default()),
            _ => Err(Error::Timeout {
                message: format!(
                    "no invalidation stream established within {}",
                    crate::client::humanize(timeout)
                ),
            }),
        }
    }
}

/// The stream task: subscribe to a member, apply its events, and on any end or failure empty the
/// near cache and subscribe again (to another member first), forever.
async fn follow(client: Client, config: NearCacheConfig, shared: Arc<Shared>) {
    static SUBSCRIPTIONS: AtomicU64 = AtomicU64::new(1);
    let mut avoid: Option<String> = None;
    let mut pause = RESUBSCRIBE_MIN;
    loop {
        let address = client.inner.router.next_member(avoid.as_deref());
        if let Ok((channel, mut stream)) = subscribe(&client, &config, &address).await {
            let subscription = SUBSCRIPTIONS.fetch_add(1, Ordering::Relaxed);
            {
                let mut state = shared.state();
                state.core.subscribed(subscription);
                state.channel = Some(channel);
            }
            shared.home.send_replace(Some(address.clone()));
            tracing::debug!(%address, "near cache: invalidation stream established");
            pause = RESUBSCRIBE_MIN;
            while let Ok(Some(event)) = stream.message().await {
                shared.state().core.invalidate(&event.key, event.version);
            }
            tracing::debug!(%address, "near cache: invalidation stream ended; emptied");
        }
        // Empty first, then say so: whoever sees no home (or a new one) sees an empty cache.
        {
            let mut state = shared.state();
            state.core.drop_all();
            state.channel = None;
        }
        shared.home.send_replace(None);
        avoid = Some(address);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RESUBSCRIBE_MAX);
    }
}

/// Opens a connection to `address` with keep-alive pings, and a Subscribe stream on it; returns
/// once the server has answered (its subscriber exists, so no later event is missed).
async fn subscribe(
    client: &Client,
    config: &NearCacheConfig,
    address: &str,
) -> std::result::Result<(Channel, tonic::Streaming<api::InvalidationEvent>), ()> {
    let settings = &client.inner.config;
    let half = config.liveness / 2;
    let endpoint = client
        .inner
        .router
        .endpoint(address)
        .map_err(|_| ())?
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(half)
        .keep_alive_timeout(half)
        .keep_alive_while_idle(true);
    let channel = tokio::time::timeout(settings.connect_timeout, endpoint.connect())
        .await
        .map_err(|_| ())?
        .map_err(|_| ())?;
    let request = client.request(
        api::CacheSubscribeRequest {
            prefix: config.prefix.clone(),
        },
        None,
    );
    let opened = tokio::time::timeout(
        settings.request_timeout,
        CacheClient::new(channel.clone()).subscribe(request),
    )
    .await
    .map_err(|_| ())?
    .map_err(|_| ())?;
    Ok((channel, opened.into_inner()))
}
