//! The SDK's near cache against a real 3-node cluster of `syncd` processes: a hit after a read,
//! a write made on another node invalidating it through the stream, the LRU bound, and the
//! home node being killed (the near cache is emptied, serves nothing stale, and comes back on
//! another node).
//!
//! Every wait is a bounded poll with a generous deadline: the first fills after a leader change
//! are not cached by the server for one cache lease (1 s here), and a loaded machine is slow.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use sync_client::{NearCache, NearCacheConfig, NearValue, api};
use sync_tests::{Cluster, scenario};
use tokio::time::Instant;

mod common;
use common::{client, short_cache_lease as options};

const LIMIT: Duration = Duration::from_secs(120);
/// How long a condition that needs a fill, an event or a re-subscription may take.
const PATIENCE: Duration = Duration::from_secs(30);

/// The id of the node at `address`.
fn node_at(c: &Cluster, address: &str) -> anyhow::Result<u64> {
    c.ids()
        .into_iter()
        .find(|&id| c.address(id).to_string() == address)
        .with_context(|| format!("no node at {address}"))
}

/// Writes `key` through node `id` (not through the SDK, which would route to the leader),
/// retrying while the cluster elects or the cache waits out a lease.
async fn set_on(c: &Cluster, id: u64, key: &str, value: &str) -> anyhow::Result<u64> {
    let node = c.client(id);
    let started = Instant::now();
    loop {
        let request = api::CacheSetRequest {
            header: None,
            key: key.to_owned(),
            value: value.to_owned().into(),
            ttl_ms: 0,
        };
        match node.cache().set(request).await {
            Ok(r) => return Ok(r.into_inner().version),
            Err(e) if started.elapsed() < PATIENCE => {
                eprintln!("set {key} on node {id}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("set {key} on node {id}: {e}"),
        }
    }
}

/// Reads `key` through `near` until `done` holds of the read, at most [`PATIENCE`].
async fn near_until(
    near: &NearCache,
    key: &str,
    what: &str,
    done: impl Fn(&NearValue) -> bool,
) -> anyhow::Result<NearValue> {
    let started = Instant::now();
    loop {
        let read = near.get(key).await?;
        if let Some(v) = read.as_ref().filter(|v| done(v)) {
            return Ok(v.clone());
        }
        ensure!(
            started.elapsed() < PATIENCE,
            "{key}: {what} not seen within {PATIENCE:?}; last read {read:?}, stats {:?}",
            near.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_after_a_read_is_invalidated_by_a_write_on_another_node_and_lru_evicts() {
    scenario(3, options(), LIMIT, async |c| {
        let client = client(c).await?;
        let near = client.near_cache(NearCacheConfig::default())?;
        let home = near.wait_subscribed(PATIENCE).await?;
        let writer = c
            .ids()
            .into_iter()
            .find(|&id| c.address(id).to_string() != home)
            .context("a node other than the home")?;
        let v1 = set_on(c, writer, "k", "v1").await?;
        let hit = near_until(&near, "k", "a near hit of v1", |v| v.near_hit).await?;
        ensure!(hit.value == "v1" && hit.version == v1, "hit {hit:?}");

        // A write on another node: the home node's line is invalidated and the event reaches
        // the near cache; with the event lost, every read would stay a hit of v1.
        let v2 = set_on(c, writer, "k", "v2").await?;
        let fresh = near_until(&near, "k", "v2", |v| v.version >= v2).await?;
        ensure!(fresh.value == "v2", "read {fresh:?}");
        ensure!(near.stats().invalidations >= 1, "stats {:?}", near.stats());
        near_until(&near, "k", "a near hit of v2", |v| {
            v.near_hit && v.version == v2
        })
        .await?;

        // Own writes are read back at once, never hidden by the entry they replace.
        let v3 = near.set("k", "v3", None).await?;
        let own = near.get("k").await?.context("k vanished")?;
        ensure!(
            own.version >= v3 && !own.near_hit,
            "own write hidden: {own:?}"
        );

        // The LRU bound: two entries at most, the least recently used goes first. Keys are
        // filled until one was evicted (a lease lapse on a loaded machine may invalidate some
        // first, which is why this is a loop); the bound must hold after every fill.
        let small = client.near_cache(NearCacheConfig {
            max_entries: 2,
            ..NearCacheConfig::default()
        })?;
        small.wait_subscribed(PATIENCE).await?;
        for i in 0..20 {
            let key = format!("lru-{i}");
            set_on(c, writer, &key, &key).await?;
            near_until(&small, &key, "a near hit", |v| v.near_hit).await?;
            let stats = small.stats();
            ensure!(stats.entries <= 2, "a 2-entry near cache holds {stats:?}");
            if i >= 2 && stats.evictions >= 1 {
                break;
            }
        }
        ensure!(
            small.stats().evictions >= 1,
            "nothing evicted: {:?}",
            small.stats()
        );
        let first = small.get("lru-0").await?.context("lru-0 vanished")?;
        ensure!(
            !first.near_hit,
            "the least recently used entry was kept: {first:?}"
        );
        eprintln!(
            "near cache stats: {:?}; small: {:?}",
            near.stats(),
            small.stats()
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_home_node_empties_the_near_cache_until_a_new_stream_is_up() {
    scenario(3, options(), LIMIT, async |c| {
        let client = client(c).await?;
        let near = client.near_cache(NearCacheConfig {
            liveness: Duration::from_secs(1),
            ..NearCacheConfig::default()
        })?;
        let home = near.wait_subscribed(PATIENCE).await?;
        let home_id = node_at(c, &home)?;
        let other = c
            .ids()
            .into_iter()
            .find(|&id| id != home_id)
            .context("another node")?;
        let v1 = set_on(c, other, "k", "v1").await?;
        near_until(&near, "k", "a near hit of v1", |v| {
            v.near_hit && v.version == v1
        })
        .await?;
        let before = near.stats();

        c.kill9(home_id).await?;
        // The stream breaks: the near cache must notice (its home changes) and empty itself.
        let started = Instant::now();
        while near.home().as_deref() == Some(home.as_str()) {
            ensure!(
                started.elapsed() < PATIENCE,
                "the home node died {PATIENCE:?} ago and the near cache still trusts it: {:?}",
                near.stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ensure!(
            near.stats().drops > before.drops,
            "the stream ended without a drop: {:?}",
            near.stats()
        );
        // The next read cannot be a near hit: the entry is gone.
        let after = near.get("k").await?.context("k vanished")?;
        ensure!(
            !after.near_hit,
            "a near hit after the stream died: {after:?}"
        );

        // It comes back on a surviving node and is kept coherent there.
        let new_home = near.wait_subscribed(PATIENCE).await?;
        ensure!(new_home != home, "re-subscribed to the dead node {home}");
        let v2 = set_on(c, other, "k", "v2").await?;
        near_until(&near, "k", "v2", |v| v.version >= v2).await?;
        near_until(&near, "k", "a near hit of v2", |v| {
            v.near_hit && v.version == v2
        })
        .await?;
        eprintln!("near cache stats: {:?}", near.stats());
        Ok(())
    })
    .await;
}
