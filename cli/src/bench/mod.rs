//! `syncctl bench`: load tests.
//!
//! - `driver.rs`: the closed-loop clients, the timing, the merge of per-client histograms;
//! - `summary.rs`: throughput and percentiles from a phase, and the syncd ÷ peer ratios;
//! - `raw.rs`: `bench raw`, a replicated write (a put of a new key) per operation, and the
//!   read-back check after it;
//! - `locks.rs`: `bench locks`, an exclusive Acquire and a Release per operation, on a lock of
//!   each client's own or, contended, on one lock for all;
//! - `syncd.rs`: the syncd target (Kv.Put, Lock.Acquire/Release, each with a RequestHeader, on
//!   the leader, following `x-sync-leader-addr`);
//! - `queue.rs`: `bench queue`, single or batched publishes, or publish -> consume -> ack
//!   rounds, on syncd (publishes and acks to the leader, consumes to each topic's owner) and on
//!   Redis Streams;
//! - `cache.rs`: `bench cache`, hits, misses and writes with 0, 1 or 2 sharers on syncd's
//!   coherent cache (each client on one node), against Redis GET/SET, and the plain replicated
//!   write beside the cache write;
//! - `etcd.rs`: the etcd target (etcd's KV.Put, and its lock API with leases, on etcd's
//!   leader), from vendored protos;
//! - `redis.rs`: the Redis target (GET/SET, and the streams commands), through fred.
//!
//! A bench compares syncd with one peer at most: etcd (`--compare-etcd`: raw, locks) or Redis
//! (`--compare-redis`: queue, cache). It runs syncd first, then the peer, one after the other so
//! the two systems never compete for the machine. Each target gets its clients (connections, sessions)
//! set up before the clock starts, then an untimed warm-up, then the measured phase, both with
//! the same clients, then a check of its own (raw: the written keys are read back; locks: no
//! two clients held the lock at once).

mod cache;
mod driver;
mod etcd;
mod locks;
mod queue;
mod raw;
mod redis;
mod summary;
mod syncd;

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use self::driver::{PhaseResult, Worker};
use self::summary::{Comparison, Summary};
use crate::args::parse_endpoint;
use crate::args::{BenchCommand, BenchLoadArgs, GlobalOpts, Output};
use crate::cluster::{Leader, find_leader, status_of};
use crate::output::{duration, micros, print_json, table, three_digits};

pub async fn run(global: &GlobalOpts, command: &BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Raw(args) => raw::run(global, args).await,
        BenchCommand::Locks(args) => locks::run(global, args).await,
        BenchCommand::Queue(args) => queue::run(global, args).await,
        BenchCommand::Cache(args) => cache::run(global, args).await,
    }
}

/// A request whose deadline (sent as `grpc-timeout`) is `timeout`.
fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// The systems one bench run measures, connected before any load.
struct Targets {
    syncd: syncd::SyncdTarget,
    /// With `--compare-etcd`.
    etcd: Option<etcd::EtcdTarget>,
}

/// The syncd cluster as the queue and cache benches see it.
struct ClusterView {
    leader: Leader,
    /// Every voter's id and `host:port`, in id order (the leader among them).
    voters: Vec<(u64, String)>,
}

/// How a run reports itself as it goes.
struct Run<'a> {
    load: &'a BenchLoadArgs,
    /// Tables for people rather than JSON for scripts: notes go to stderr.
    people: bool,
    /// Draw progress bars on stderr.
    progress: bool,
    /// What one operation is called on the progress bar ("puts", "hand-offs").
    unit: &'static str,
}

impl<'a> Run<'a> {
    fn new(global: &GlobalOpts, load: &'a BenchLoadArgs, unit: &'static str) -> Self {
        let people = global.output == Output::Table;
        Run {
            load,
            people,
            progress: people && std::io::stderr().is_terminal(),
            unit,
        }
    }

    /// Fails, before any load, a run that names a peer this bench has no workload for.
    fn only_peer(&self, bench: &str, supported: Peer) -> anyhow::Result<()> {
        let asked = match (&self.load.compare_etcd, &self.load.compare_redis) {
            (Some(_), _) => Peer::Etcd,
            (_, Some(_)) => Peer::Redis,
            _ => return Ok(()),
        };
        if asked != supported {
            anyhow::bail!(
                "bench {bench} has no {} counterpart; it compares with {} ({})",
                asked.name(),
                supported.name(),
                supported.flag()
            );
        }
        Ok(())
    }

    /// Finds syncd's leader and, if asked, etcd's, and connects to them: everything that can
    /// fail fast does, before any load.
    async fn connect(&self, global: &GlobalOpts, bench: &str) -> anyhow::Result<Targets> {
        self.only_peer(bench, Peer::Etcd)?;
        let connections = self.load.connections as usize;
        let leader = find_leader(&global.endpoints, global.timeout, global.timeout).await?;
        let syncd =
            syncd::SyncdTarget::connect(&leader.address, connections, global.timeout).await?;
        let etcd = match &self.load.compare_etcd {
            None => None,
            Some(endpoints) => {
                let (endpoint, is_leader) = etcd::find_leader(endpoints, global.timeout).await?;
                if !is_leader && self.people {
                    eprintln!(
                        "warning: etcd's leader is not among {}; measuring through {endpoint}",
                        endpoints
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                Some(etcd::EtcdTarget::connect(&endpoint, connections, global.timeout).await?)
            }
        };
        if self.people {
            eprintln!(
                "syncd leader: node {} at {} (term {})",
                leader.id, leader.address, leader.term
            );
        }
        Ok(Targets { syncd, etcd })
    }

    /// Finds syncd's leader and every voter (by asking the leader), for the benches that
    /// talk to every node (queue: topic owners; cache: each client's node). Prints nothing:
    /// see `announce`.
    async fn cluster(&self, global: &GlobalOpts) -> anyhow::Result<ClusterView> {
        let leader = find_leader(&global.endpoints, global.timeout, global.timeout).await?;
        let endpoint = parse_endpoint(&leader.address)
            .map_err(|e| anyhow::anyhow!("the cluster reported a bad leader address: {e}"))?;
        let status = status_of(&endpoint, global.timeout, None)
            .await
            .map_err(|reason| {
                anyhow::anyhow!("the leader at {endpoint} did not answer: {reason}")
            })?;
        let mut voters: Vec<(u64, String)> = status
            .members
            .iter()
            .filter(|m| !m.learner)
            .map(|m| (m.id, m.address.clone()))
            .collect();
        voters.sort();
        if voters.is_empty() {
            voters.push((leader.id, leader.address.clone()));
        }
        Ok(ClusterView { leader, voters })
    }

    /// The Redis target of `--compare-redis`, connected, if asked.
    async fn redis(&self, global: &GlobalOpts) -> anyhow::Result<Option<redis::RedisTarget>> {
        match &self.load.compare_redis {
            Some(url) => Ok(Some(
                redis::RedisTarget::connect(url, global.timeout).await?,
            )),
            None => Ok(None),
        }
    }

    /// Says, for people, which cluster the run measures (once the flags are known to fit it,
    /// so that a refusal stays one line).
    fn announce(&self, view: &ClusterView) {
        if self.people {
            eprintln!(
                "syncd leader: node {} at {} (term {}); {} voter(s)",
                view.leader.id,
                view.leader.address,
                view.leader.term,
                view.voters.len()
            );
        }
    }

    fn bar(&self, label: String, duration: Duration) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(
            Some(duration.as_millis() as u64),
            ProgressDrawTarget::stderr(),
        );
        if let Ok(style) =
            ProgressStyle::with_template("{prefix:>13} [{bar:30}] {elapsed:>3} {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(label);
        bar
    }

    /// The warm-up (unless `--warmup 0s`), then the measured phase, with the same workers.
    async fn measure<W: Worker>(
        &self,
        name: &str,
        workers: Vec<W>,
    ) -> anyhow::Result<(PhaseResult, Vec<W>)> {
        let mut workers = workers;
        let warmup = self.load.warmup;
        if !warmup.is_zero() {
            let bar = self.bar(format!("{name} warm-up"), warmup);
            workers = driver::run(workers, warmup, self.unit, &bar).await?.1;
        }
        let bar = self.bar(name.to_owned(), self.load.duration);
        driver::run(workers, self.load.duration, self.unit, &bar).await
    }
}

/// The systems syncd is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Etcd,
    Redis,
}

impl Peer {
    /// The target name its result row carries.
    fn name(self) -> &'static str {
        match self {
            Peer::Etcd => "etcd",
            Peer::Redis => "redis",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Peer::Etcd => "--compare-etcd ENDPOINTS",
            Peer::Redis => "--compare-redis URL",
        }
    }
}

/// `bench … --output json`: what was run, each target's result, and the ratios.
#[derive(Serialize)]
struct Report<'a, W, M> {
    workload: W,
    results: &'a [M],
    /// Present with --compare-etcd or --compare-redis: the first row (syncd) over the peer's.
    comparison: Option<Comparison>,
}

/// Prints the results: the `Report` as JSON, or for people the workload (`describe`), the table
/// and the ratios. Each target's own check is the caller's to print.
fn print_results<W, M>(
    output: Output,
    workload: W,
    describe: impl FnOnce() -> String,
    results: &[M],
) -> anyhow::Result<()>
where
    W: Serialize,
    M: Serialize + AsRef<Summary>,
{
    let summaries: Vec<&Summary> = results.iter().map(AsRef::as_ref).collect();
    match output {
        Output::Json => print_json(&Report {
            workload,
            results,
            comparison: comparison(&summaries),
        }),
        Output::Table => {
            println!("workload: {}", describe());
            print_table(&summaries);
            Ok(())
        }
    }
}

/// The first row (syncd's) over the peer's row, when a peer ran.
fn comparison(summaries: &[&Summary]) -> Option<Comparison> {
    let syncd = summaries.first()?;
    let peer = summaries.iter().find(|s| {
        [Peer::Etcd, Peer::Redis]
            .iter()
            .any(|p| s.target == p.name())
    })?;
    Some(summary::compare(syncd, peer))
}

/// The result table, the ratios, and a warning per target whose operations failed.
fn print_table(summaries: &[&Summary]) {
    let headers = [
        "target", "endpoint", "ops", "ops/s", "p50", "p90", "p99", "max", "errors", "retries",
    ];
    let numbers = [
        "ops", "ops/s", "p50", "p90", "p99", "max", "errors", "retries",
    ];
    let mut t = table(&headers, &numbers);
    for s in summaries {
        t.add_row(vec![
            s.target.clone(),
            s.endpoint.clone(),
            s.ops.to_string(),
            three_digits(s.ops_per_sec),
            micros(s.latency_us.p50),
            micros(s.latency_us.p90),
            micros(s.latency_us.p99),
            micros(s.latency_us.max),
            s.errors.to_string(),
            s.retries.to_string(),
        ]);
    }
    println!("{t}");
    if let Some(c) = comparison(summaries) {
        let ratio =
            |r: Option<f64>| r.map_or("n/a".to_owned(), |r| format!("{}x", three_digits(r)));
        println!(
            "{}/{}: throughput {} (higher is better for syncd), latency p50 {}, p99 {} \
             (lower is better)",
            c.target,
            c.peer,
            ratio(c.ops_per_sec_ratio),
            ratio(c.p50_ratio),
            ratio(c.p99_ratio)
        );
    }
    for s in summaries {
        if let Some(first) = &s.first_error {
            eprintln!(
                "warning: {} operation(s) on {} failed; first: {first}",
                s.errors, s.target
            );
        }
    }
}

/// Fails a run in which a target did not complete a single operation.
fn ensure_progress(summary: &Summary, what: &str) -> anyhow::Result<()> {
    if summary.ops == 0 {
        anyhow::bail!(
            "no {what} on {} succeeded ({} failed; first: {})",
            summary.target,
            summary.errors,
            summary.first_error.as_deref().unwrap_or("none")
        );
    }
    Ok(())
}

/// "8s measured after 1s warm-up".
fn timing(load: &BenchLoadArgs) -> String {
    format!(
        "{} measured after {} warm-up",
        duration(load.duration),
        duration(load.warmup)
    )
}
