//! `syncctl bench cache`: hits, misses, and writes that invalidate sharers, on syncd's coherent
//! cache, beside Redis GET/SET.
//!
//! Cache calls are served by the node that receives them (cache.proto: never forwarded), so
//! every client has a home node, client i on node i mod N, and its own keys
//! (`PREFIX/CLIENT/J`, `--keys-per-client` of them, used in turn). Before the clock starts,
//! each client writes and then reads each of its keys on its home node, so the home node holds
//! every key's line.
//!
//! - `hit`: an operation is a Get on the home node, answered from its valid line; the hit flag
//!   of every answer is counted, and the report's hit ratio shows whether the run measured hits.
//! - `miss`: an operation is an untimed Set through the next node (which invalidates the home
//!   node's line, a write completing only once every other copy is invalid), then the timed
//!   Get on the home node: a miss, which fetches the value through the directory and downgrades
//!   the writer's line. The hit ratio must be 0.
//! - `write --sharers S`: S other nodes read the key first (untimed: each then holds it
//!   SHARED), then the timed Set on the home node, which must invalidate those S copies. S = 0
//!   is a write nobody else holds. Beside it, in the same invocation, `bench raw`'s Kv.Put (a
//!   plain replicated write of the same value size) runs as the reference, and the report gives
//!   the cache write's cost over it.
//!
//! Redis has one node: a Get is GET, a Set is SET, the untimed step of `miss` is a SET, and
//! `write` has no sharers to re-share. A found key counts as a hit there only in the sense of
//! "found": the hit ratio is syncd's alone.
//!
//! The keys are deleted after the run.

use std::future::Future;

use anyhow::bail;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use serde::Serialize;
use tokio::time::Instant;

use super::driver::{Call, Done, Worker};
use super::summary::{Comparison, Summary, compare};
use super::syncd::{SyncdCache, SyncdTarget};
use super::{Peer, Run, ensure_progress, print_results, raw, timing};
use crate::args::{BenchCacheArgs, CacheMode, GlobalOpts};

/// Attempts of each key's fill (a Set, then a Get) before the run gives up.
const FILL_ATTEMPTS: u32 = 3;

/// A system `bench cache` can load.
pub trait CacheTarget: Send + Sync + 'static {
    type Client: CacheClient;

    /// How many nodes serve the cache (a client's node and "another node" index into them).
    fn nodes(&self) -> usize;

    /// A new client, with its own identity and connections.
    fn client(&self, index: usize) -> impl Future<Output = anyhow::Result<Self::Client>> + Send;

    /// Where the clients talk to, `host:port` (syncd: every node).
    fn endpoint(&self) -> String;

    /// Deletes the run's keys.
    fn delete_keys(&self, keys: Vec<String>) -> impl Future<Output = Result<(), String>> + Send;
}

/// One client's connections.
pub trait CacheClient: Send + 'static {
    /// Reads `key` through node `node`: `Some(hit)` where the target says whether it answered
    /// from a valid line (syncd), `None` where it has no such notion (Redis). A missing key is
    /// an error: every key of a run exists.
    fn get(&mut self, node: usize, key: &str) -> impl Future<Output = Call<Option<bool>>> + Send;

    /// Writes `key` through node `node`.
    fn set(
        &mut self,
        node: usize,
        key: &str,
        value: Bytes,
    ) -> impl Future<Output = Call<()>> + Send;
}

/// One row: a target's measured phase, and its hits and misses.
#[derive(Serialize)]
struct Measured {
    #[serde(flatten)]
    summary: Summary,
    /// Timed Gets answered from a valid line (syncd; absent for Redis and for writes).
    hits: Option<u64>,
    misses: Option<u64>,
    /// hits / (hits + misses).
    hit_ratio: Option<f64>,
    /// `write` mode, syncd's row: the cache write over the plain replicated write (Kv.Put).
    vs_kv_put: Option<Comparison>,
}

impl AsRef<Summary> for Measured {
    fn as_ref(&self) -> &Summary {
        &self.summary
    }
}

impl Measured {
    fn new(summary: Summary, hits: u64, misses: u64, reports_hits: bool) -> Self {
        let gets = hits + misses;
        let known = reports_hits && gets > 0;
        Measured {
            summary,
            hits: known.then_some(hits),
            misses: known.then_some(misses),
            hit_ratio: known.then(|| hits as f64 / gets as f64),
            vs_kv_put: None,
        }
    }
}

#[derive(Serialize)]
struct WorkloadJson {
    /// "hit", "miss" or "write".
    mode: &'static str,
    /// Write mode: the other nodes holding the key before each write.
    sharers: u32,
    clients: u32,
    connections: u32,
    duration_secs: f64,
    warmup_secs: f64,
    value_size: u32,
    keys_per_client: u32,
    /// syncd nodes the clients are spread over.
    nodes: usize,
}

fn mode_name(mode: CacheMode) -> &'static str {
    match mode {
        CacheMode::Hit => "hit",
        CacheMode::Miss => "miss",
        CacheMode::Write => "write",
    }
}

pub async fn run(global: &GlobalOpts, args: &BenchCacheArgs) -> anyhow::Result<()> {
    let load = &args.load;
    let run = Run::new(
        global,
        load,
        match args.mode {
            CacheMode::Write => "sets",
            CacheMode::Hit | CacheMode::Miss => "gets",
        },
    );
    run.only_peer("cache", Peer::Redis)?;
    if args.mode != CacheMode::Write && args.sharers > 0 {
        bail!("--sharers applies to --mode write only");
    }
    let view = run.cluster(global).await?;
    let nodes = view.voters.len();
    let needed = match args.mode {
        CacheMode::Hit => 1,
        CacheMode::Miss => 2,
        CacheMode::Write => args.sharers as usize + 1,
    };
    if nodes < needed {
        bail!(
            "--mode {}{} needs {needed} nodes; the cluster has {nodes}",
            mode_name(args.mode),
            if args.mode == CacheMode::Write {
                format!(" --sharers {}", args.sharers)
            } else {
                String::new()
            }
        );
    }
    run.announce(&view);
    let syncd = SyncdCache::connect(&view, load.connections as usize, global.timeout).await?;
    let redis = run.redis(global).await?;
    let plan = Plan {
        run: &run,
        mode: args.mode,
        sharers: args.sharers as usize,
        keys_per_client: args.keys_per_client as usize,
        value: Bytes::from(
            (0..args.value_size)
                .map(|_| rand::random::<u8>())
                .collect::<Vec<_>>(),
        ),
        prefix: format!("syncctl-bench/{:08x}/cache", rand::random::<u32>()),
    };

    let mut results = vec![plan.measure("syncd", &syncd, true).await?];
    if args.mode == CacheMode::Write {
        let leader = SyncdTarget::connect(
            &view.leader.address,
            load.connections as usize,
            global.timeout,
        )
        .await?;
        let put = raw::reference_put(&run, &leader, "syncd-kv-put", args.value_size).await?;
        results[0].vs_kv_put = Some(compare(&results[0].summary, &put));
        results.push(Measured::new(put, 0, 0, false));
    }
    if let Some(redis) = &redis {
        results.push(plan.measure("redis", redis, false).await?);
    }

    let workload = WorkloadJson {
        mode: mode_name(args.mode),
        sharers: args.sharers,
        clients: load.clients,
        connections: load.connections,
        duration_secs: load.duration.as_secs_f64(),
        warmup_secs: load.warmup.as_secs_f64(),
        value_size: args.value_size,
        keys_per_client: args.keys_per_client,
        nodes,
    };
    let describe = || {
        let what = match args.mode {
            CacheMode::Hit => "a Get on the client's node, from its line (redis: GET)".to_owned(),
            CacheMode::Miss => {
                "a Get on the client's node just after another node wrote the key (redis: SET \
                 untimed, GET timed)"
                    .to_owned()
            }
            CacheMode::Write => format!(
                "a Set on the client's node of a key {} other node(s) hold (redis: SET); \
                 syncd-kv-put: bench raw's Kv.Put",
                args.sharers
            ),
        };
        format!(
            "{} client(s) over {nodes} node(s), {} keys each, {}-byte values, {what}; {}",
            load.clients,
            args.keys_per_client,
            args.value_size,
            timing(load)
        )
    };
    print_results(global.output, workload, describe, &results)?;
    if run.people {
        let syncd = &results[0];
        if let (Some(ratio), Some(hits), Some(misses)) = (syncd.hit_ratio, syncd.hits, syncd.misses)
        {
            eprintln!(
                "syncd hit ratio: {:.3} ({hits} hits, {misses} misses)",
                ratio
            );
        }
        if let Some(c) = &syncd.vs_kv_put {
            let ratio = |r: Option<f64>| r.map_or("n/a".to_owned(), |r| format!("{r:.2}x"));
            println!(
                "cache write / Kv.Put: latency p50 {}, p99 {}, throughput {}",
                ratio(c.p50_ratio),
                ratio(c.p99_ratio),
                ratio(c.ops_per_sec_ratio)
            );
        }
    }
    for m in &results {
        ensure_progress(&m.summary, "operation")?;
    }
    // The mode must have measured what it says.
    let syncd = &results[0];
    match (args.mode, syncd.hit_ratio) {
        (CacheMode::Hit, Some(r)) if r < 0.99 => {
            bail!("hit mode measured misses: hit ratio {r:.3}; see `syncctl` cache stats")
        }
        (CacheMode::Miss, Some(r)) if r > 0.0 => {
            bail!("miss mode measured hits: hit ratio {r:.3}")
        }
        _ => Ok(()),
    }
}

/// What every target's run shares.
struct Plan<'a> {
    run: &'a Run<'a>,
    mode: CacheMode,
    sharers: usize,
    keys_per_client: usize,
    /// Every write's value.
    value: Bytes,
    /// `syncctl-bench/<random run id>/cache`.
    prefix: String,
}

impl Plan<'_> {
    async fn measure<T: CacheTarget>(
        &self,
        name: &str,
        target: &T,
        reports_hits: bool,
    ) -> anyhow::Result<Measured> {
        let clients = self.run.load.clients as usize;
        let nodes = target.nodes();
        let mut workers = Vec::with_capacity(clients);
        for index in 0..clients {
            let home = index % nodes;
            let next = |k: usize| (home + k) % nodes;
            let others = match self.mode {
                CacheMode::Hit => Vec::new(),
                CacheMode::Miss => vec![next(1)],
                CacheMode::Write if nodes == 1 => Vec::new(),
                CacheMode::Write => (1..=self.sharers).map(next).collect(),
            };
            workers.push(CacheWorker {
                client: target.client(index).await?,
                mode: self.mode,
                home,
                others,
                keys: (0..self.keys_per_client)
                    .map(|j| format!("{}/{index:05}/{j:05}", self.prefix))
                    .collect(),
                next: 0,
                value: self.value.clone(),
                hits: 0,
                misses: 0,
            });
        }
        let filled = join_all(workers.iter_mut().map(CacheWorker::fill)).await;
        let keys: Vec<String> = workers.iter().flat_map(|w| w.keys.clone()).collect();
        if let Some(Err(reason)) = filled.into_iter().find(Result::is_err) {
            let _ = target.delete_keys(keys).await;
            bail!("cannot fill the cache on {name}: {reason}");
        }
        let measured = self.run.measure(name, workers).await;
        let deleted = target.delete_keys(keys).await;
        let (phase, workers) = measured?;
        if let Err(reason) = deleted
            && self.run.people
        {
            eprintln!("warning: cannot delete the keys on {name}: {reason}");
        }
        let hits = workers.iter().map(|w| w.hits).sum();
        let misses = workers.iter().map(|w| w.misses).sum();
        Ok(Measured::new(
            Summary::new(name, &target.endpoint(), clients, &phase),
            hits,
            misses,
            reports_hits,
        ))
    }
}

/// A client with a home node and keys of its own.
struct CacheWorker<C> {
    client: C,
    mode: CacheMode,
    /// The node its timed calls go to.
    home: usize,
    /// Miss: the node that writes before each Get. Write: the sharers that read before each Set.
    others: Vec<usize>,
    keys: Vec<String>,
    /// Which key the next operation uses.
    next: usize,
    value: Bytes,
    /// Timed Gets answered from a valid line, and not.
    hits: u64,
    misses: u64,
}

impl<C: CacheClient> CacheWorker<C> {
    /// Writes, then reads, every key on the home node: it then holds each key's line.
    ///
    /// Each step is tried up to [`FILL_ATTEMPTS`] times: a directory that has just started
    /// (the cluster was just started, or its leader changed) writes nothing and answers no fill
    /// for a lease plus the drift margin (5.25 s with the defaults, `docs/cache.md`), which is
    /// longer than a call's default deadline.
    async fn fill(&mut self) -> Result<(), String> {
        for i in 0..self.keys.len() {
            let key = self.keys[i].clone();
            let mut attempt = 1;
            loop {
                let value = self.value.clone();
                let step = match self.client.set(self.home, &key, value).await.result {
                    Ok(()) => self.client.get(self.home, &key).await.result.map(drop),
                    Err(reason) => Err(reason),
                };
                match step {
                    Ok(()) => break,
                    Err(_) if attempt < FILL_ATTEMPTS => attempt += 1,
                    Err(reason) => return Err(reason),
                }
            }
        }
        Ok(())
    }

    /// The timed Get; counts its hit or miss.
    async fn timed_get(&mut self, key: &str, retries: u32) -> Call<Done> {
        let start = Instant::now();
        let read = self.client.get(self.home, key).await;
        let latency = start.elapsed();
        let call = Call {
            result: read.result,
            retries: retries + read.retries,
        };
        call.and_then(|hit| {
            match hit {
                Some(true) => self.hits += 1,
                Some(false) => self.misses += 1,
                None => {}
            }
            Ok(Done::One(latency))
        })
    }
}

impl<C: CacheClient> Worker for CacheWorker<C> {
    async fn op(&mut self) -> Call<Done> {
        let key = self.keys[self.next % self.keys.len()].clone();
        self.next += 1;
        let mut retries = 0;
        match self.mode {
            CacheMode::Hit => self.timed_get(&key, 0).await,
            CacheMode::Miss => {
                let writer = self.others[0];
                let written = self.client.set(writer, &key, self.value.clone()).await;
                retries += written.retries;
                if let Err(reason) = written.result {
                    return Call {
                        result: Err(format!("untimed set: {reason}")),
                        retries,
                    };
                }
                self.timed_get(&key, retries).await
            }
            CacheMode::Write => {
                for i in 0..self.others.len() {
                    let read = self.client.get(self.others[i], &key).await;
                    retries += read.retries;
                    if let Err(reason) = read.result {
                        return Call {
                            result: Err(format!("untimed get: {reason}")),
                            retries,
                        };
                    }
                }
                let start = Instant::now();
                let written = self.client.set(self.home, &key, self.value.clone()).await;
                let latency = start.elapsed();
                Call {
                    result: written.result.map(|()| Done::One(latency)),
                    retries: retries + written.retries,
                }
            }
        }
    }
}

/// Runs `delete` on every key, at most 64 at a time; the first failure, if any.
pub async fn delete_each<F, Fut>(keys: Vec<String>, delete: F) -> Result<(), String>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let results: Vec<Result<(), String>> = futures::stream::iter(keys.into_iter().map(delete))
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use indicatif::ProgressBar;

    use super::*;
    use crate::bench::driver;

    /// A MESI-like toy: each key has a version and the set of nodes holding it; a Set through
    /// a node leaves only that node holding it; a Get is a hit where the node holds it. Each
    /// call takes 1 ms; every call is logged as (node, "get"/"set").
    #[derive(Default)]
    struct Toy {
        holders: HashMap<String, Vec<usize>>,
        log: Vec<(usize, &'static str)>,
    }

    struct Fake(Arc<Mutex<Toy>>);

    impl CacheClient for Fake {
        async fn get(&mut self, node: usize, key: &str) -> Call<Option<bool>> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let mut toy = self.0.lock().unwrap();
            toy.log.push((node, "get"));
            let Some(holders) = toy.holders.get_mut(key) else {
                return Call::once(Err("missing".into()));
            };
            let hit = holders.contains(&node);
            if !hit {
                holders.push(node);
            }
            Call::once(Ok(Some(hit)))
        }

        async fn set(&mut self, node: usize, key: &str, _value: Bytes) -> Call<()> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let mut toy = self.0.lock().unwrap();
            toy.log.push((node, "set"));
            toy.holders.insert(key.to_owned(), vec![node]);
            Call::once(Ok(()))
        }
    }

    async fn run_one(mode: CacheMode, home: usize, others: Vec<usize>) -> (u64, u64, Toy) {
        let toy = Arc::new(Mutex::new(Toy::default()));
        let mut worker = CacheWorker {
            client: Fake(Arc::clone(&toy)),
            mode,
            home,
            others,
            keys: vec!["a".into(), "b".into()],
            next: 0,
            value: Bytes::from_static(b"v"),
            hits: 0,
            misses: 0,
        };
        worker.fill().await.unwrap();
        toy.lock().unwrap().log.clear();
        let (phase, workers) = driver::run(
            vec![worker],
            Duration::from_millis(20),
            "ops",
            &ProgressBar::hidden(),
        )
        .await
        .unwrap();
        assert_eq!(phase.errors, 0);
        let toy = std::mem::take(&mut *toy.lock().unwrap());
        (workers[0].hits, workers[0].misses, toy)
    }

    #[tokio::test(start_paused = true)]
    async fn hit_mode_reads_lines_the_home_node_holds() {
        let (hits, misses, toy) = run_one(CacheMode::Hit, 1, vec![]).await;
        assert!(hits >= 10 && misses == 0, "{hits} hits, {misses} misses");
        assert!(toy.log.iter().all(|&call| call == (1, "get")));
    }

    #[tokio::test(start_paused = true)]
    async fn miss_mode_reads_a_key_another_node_has_just_written() {
        let (hits, misses, toy) = run_one(CacheMode::Miss, 0, vec![1]).await;
        assert!(misses >= 5 && hits == 0, "{hits} hits, {misses} misses");
        for pair in toy.log.chunks(2) {
            assert_eq!(pair, [(1, "set"), (0, "get")]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn write_mode_reshares_the_key_before_each_timed_set() {
        let (_, _, toy) = run_one(CacheMode::Write, 2, vec![0, 1]).await;
        assert!(toy.log.len() >= 6);
        for op in toy.log.chunks(3) {
            assert_eq!(op, [(0, "get"), (1, "get"), (2, "set")]);
        }
    }
}
