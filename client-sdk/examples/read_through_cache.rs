//! A read-through cache in front of a slow "database", with a near cache in this process.
//!
//! A lookup asks the near cache first (no network hop when it holds the key), then the
//! cluster's coherent cache, and only on a miss there loads from the database and fills the
//! cache. The fill is a compare-and-set against "no value" (version 0): if an update wrote the
//! key while the database read was in flight, the older value read from the database does not
//! overwrite it. An update writes the database, then the cache, through the near cache handle,
//! so this process reads it back at once; other processes' near caches are told by their
//! invalidation streams.
//!
//! The "database" is an in-process map with a delay per read, standing in for something slow.
//!
//! Run it against a local cluster (`syncctl dev up` in another terminal):
//!
//! ```text
//! cargo run -p sync-client --example read_through_cache
//! SYNC_ENDPOINTS=10.0.0.5:7001 cargo run -p sync-client --example read_through_cache
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sync_client::{Client, NearCache, NearCacheConfig, NearCacheStats};

/// The slow store the cache is in front of.
pub struct Database {
    rows: Mutex<HashMap<String, String>>,
    /// How long each read takes.
    latency: Duration,
    /// Reads served so far: what the cache saves.
    loads: AtomicU64,
}

impl Database {
    /// A database with `rows`.
    pub fn new(rows: impl IntoIterator<Item = (String, String)>, latency: Duration) -> Database {
        Database {
            rows: Mutex::new(rows.into_iter().collect()),
            latency,
            loads: AtomicU64::new(0),
        }
    }

    async fn load(&self, key: &str) -> Option<String> {
        tokio::time::sleep(self.latency).await;
        self.loads.fetch_add(1, Ordering::Relaxed);
        self.rows.lock().ok()?.get(key).cloned()
    }

    fn store(&self, key: &str, value: &str) {
        if let Ok(mut rows) = self.rows.lock() {
            rows.insert(key.to_owned(), value.to_owned());
        }
    }
}

/// Where a lookup found its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// This process's near cache.
    Near,
    /// The cluster's cache.
    Cluster,
    /// The database (and the cache was filled).
    Database,
}

/// Reads `key` through the caches, loading it from `db` on a miss; `None` if the database
/// does not have it either.
pub async fn lookup(
    near: &NearCache,
    db: &Database,
    key: &str,
) -> anyhow::Result<Option<(String, Source)>> {
    if let Some(v) = near.get(key).await? {
        let source = if v.near_hit {
            Source::Near
        } else {
            Source::Cluster
        };
        return Ok(Some((String::from_utf8(v.value.to_vec())?, source)));
    }
    let Some(value) = db.load(key).await else {
        return Ok(None);
    };
    // Only if the key still has no value: an update that won the race keeps its newer value.
    near.compare_and_set(key, 0, value.clone()).await?;
    Ok(Some((value, Source::Database)))
}

/// Writes `key` to the database, then to the cache.
pub async fn update(near: &NearCache, db: &Database, key: &str, value: &str) -> anyhow::Result<()> {
    db.store(key, value);
    near.set(key, value.to_owned(), None).await?;
    Ok(())
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Lookups answered by each source, in the order (near, cluster, database).
    pub sources: (u32, u32, u32),
    /// Database reads.
    pub loads: u64,
    /// The value read back right after the update.
    pub after_update: Option<String>,
    /// The near cache's counters at the end.
    pub near: NearCacheStats,
}

/// Looks up every key of `keys` (under `prefix`) `rounds` times, then updates the first key
/// and reads it back.
pub async fn run(
    client: &Client,
    prefix: &str,
    keys: &[&str],
    rounds: u32,
) -> anyhow::Result<Summary> {
    let rows = keys
        .iter()
        .map(|k| (format!("{prefix}{k}"), format!("profile of {k}")));
    let db = Database::new(rows, Duration::from_millis(100));
    let near = client.near_cache(NearCacheConfig {
        max_entries: 1_000,
        prefix: prefix.to_owned(),
        ..NearCacheConfig::default()
    })?;
    let home = near.wait_subscribed(Duration::from_secs(10)).await?;
    println!("near cache following invalidations from {home}");
    let mut sources = (0, 0, 0);
    for round in 1..=rounds {
        for k in keys {
            let key = format!("{prefix}{k}");
            let started = tokio::time::Instant::now();
            let Some((value, source)) = lookup(&near, &db, &key).await? else {
                anyhow::bail!("{key} is missing from the database");
            };
            match source {
                Source::Near => sources.0 += 1,
                Source::Cluster => sources.1 += 1,
                Source::Database => sources.2 += 1,
            }
            println!(
                "round {round}: {key} = {value:?} from {source:?} in {:?}",
                started.elapsed()
            );
        }
    }
    let first = format!("{prefix}{}", keys.first().copied().unwrap_or("none"));
    update(&near, &db, &first, "updated profile").await?;
    let after_update = lookup(&near, &db, &first).await?.map(|(v, _)| v);
    println!("after the update: {first} = {after_update:?}");
    let summary = Summary {
        sources,
        loads: db.loads.load(Ordering::Relaxed),
        after_update,
        near: near.stats(),
    };
    println!(
        "lookups from near cache / cluster / database: {} / {} / {}; database reads: {}; \
         near cache: {:?}",
        sources.0, sources.1, sources.2, summary.loads, summary.near
    );
    Ok(summary)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoints = std::env::var("SYNC_ENDPOINTS")
        .unwrap_or_else(|_| "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".to_owned());
    let client = Client::connect(endpoints.split(',')).await?;
    // A fresh prefix per run, so that the first round shows database loads.
    let prefix = format!("users-{}/", std::process::id());
    run(&client, &prefix, &["ada", "grace", "edsger"], 5).await?;
    Ok(())
}
