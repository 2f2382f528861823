//! `syncctl bench`: load tests.
//!
//! - `driver.rs`: the closed-loop clients, the timing, the merge of per-client histograms;
//! - `summary.rs`: throughput and percentiles from a phase, and the syncd ÷ etcd ratios;
//! - `syncd.rs`: the syncd target (Kv.Put with a RequestHeader, on the leader, following
//!   `x-sync-leader-addr`);
//! - `etcd.rs`: the etcd target (etcd's KV.Put, on etcd's leader), from vendored protos.
//!
//! `bench raw` runs syncd first, then (with `--compare-etcd`) etcd, one after the other so the
//! two systems never compete for the machine. Each target gets an untimed warm-up, then the
//! measured phase, then a read-back check: the last key every client wrote is read back
//! linearizably and must hold the value written, so a target that acknowledges writes it did
//! not keep cannot post a good number.

mod driver;
mod etcd;
mod summary;
mod syncd;

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use futures::future::join_all;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use self::driver::{Target, Workload};
use self::summary::{Comparison, Summary, compare};
use crate::args::{BenchCommand, BenchRawArgs, GlobalOpts, Output};
use crate::cluster::find_leader;
use crate::output::{duration, micros, print_json, table, three_digits};

pub async fn run(global: &GlobalOpts, command: &BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Raw(args) => raw(global, args).await,
    }
}

/// One target's measured phase and its read-back check.
#[derive(Serialize)]
struct Measured {
    #[serde(flatten)]
    summary: Summary,
    read_back: ReadBack,
    /// The first failure's reason, if any put failed.
    first_error: Option<String>,
}

/// The check after a run: each client's last acknowledged key, read back.
#[derive(Serialize, Default)]
struct ReadBack {
    checked: usize,
    /// Keys that hold the value written.
    matched: usize,
    /// Keys that are missing or hold another value: acknowledged writes that were lost.
    lost: usize,
    /// Keys whose read failed (the check says nothing about them).
    unreadable: usize,
    /// The first lost or unreadable key, in words.
    first_problem: Option<String>,
}

/// `bench raw --output json`.
#[derive(Serialize)]
struct RawReport<'a> {
    workload: WorkloadJson,
    results: &'a [Measured],
    /// Present with --compare-etcd.
    comparison: Option<Comparison>,
}

#[derive(Serialize)]
struct WorkloadJson {
    clients: u32,
    connections: u32,
    duration_secs: f64,
    warmup_secs: f64,
    value_size: u32,
    /// Length of each key, in bytes.
    key_size: usize,
}

async fn raw(global: &GlobalOpts, args: &BenchRawArgs) -> anyhow::Result<()> {
    let people = global.output == Output::Table;
    let connections = args.connections as usize;

    // Everything that can fail fast does, before any load: the syncd leader and, if asked,
    // etcd's.
    let leader = find_leader(&global.endpoints, global.timeout, global.timeout).await?;
    let syncd = syncd::SyncdTarget::connect(&leader.address, connections, global.timeout).await?;
    let etcd = match &args.compare_etcd {
        None => None,
        Some(endpoints) => {
            let (endpoint, is_leader) = etcd::find_leader(endpoints, global.timeout).await?;
            if !is_leader && people {
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

    let run_id: u32 = rand::random();
    let value = Bytes::from(
        (0..args.value_size)
            .map(|_| rand::random::<u8>())
            .collect::<Vec<_>>(),
    );
    let plan = Plan {
        args,
        value,
        run_id,
        progress: people && std::io::stderr().is_terminal(),
    };
    if people {
        eprintln!(
            "syncd leader: node {} at {} (term {})",
            leader.id, leader.address, leader.term
        );
    }

    let mut results = vec![plan.measure("syncd", &syncd).await?];
    if let Some(target) = &etcd {
        results.push(plan.measure("etcd", target).await?);
    }
    let comparison =
        (results.len() == 2).then(|| compare(&results[0].summary, &results[1].summary));

    match global.output {
        Output::Json => print_json(&RawReport {
            workload: WorkloadJson {
                clients: args.clients,
                connections: args.connections,
                duration_secs: args.duration.as_secs_f64(),
                warmup_secs: args.warmup.as_secs_f64(),
                value_size: args.value_size,
                key_size: driver::key(&plan.prefix("m"), 0, 1).len(),
            },
            results: &results,
            comparison,
        })?,
        Output::Table => print_table(args, &results, comparison),
    }

    for m in &results {
        let target = &m.summary.target;
        if m.summary.ops == 0 {
            bail!(
                "no put to {target} succeeded ({} failed; first: {})",
                m.summary.errors,
                m.first_error.as_deref().unwrap_or("none")
            );
        }
        let check = &m.read_back;
        let first = check.first_problem.as_deref().unwrap_or("?");
        if check.lost > 0 {
            bail!(
                "{target} lost acknowledged writes: {} of the {} keys read back are missing or \
                 hold another value; first: {first}",
                check.lost,
                check.checked
            );
        }
        if check.unreadable > 0 {
            bail!(
                "could not read back {} of {} keys from {target}; first: {first}",
                check.unreadable,
                check.checked
            );
        }
    }
    Ok(())
}

/// What every target's run shares: the flags, the value, the run's identity.
struct Plan<'a> {
    args: &'a BenchRawArgs,
    value: Bytes,
    /// Random per invocation: keys of different runs never collide.
    run_id: u32,
    /// Draw progress bars on stderr.
    progress: bool,
}

impl Plan<'_> {
    /// `syncctl-bench/<run>/<phase>`, phase `w` (warm-up) or `m` (measured). The same for
    /// every target, so both write keys of the same length.
    fn prefix(&self, phase: &str) -> String {
        format!("syncctl-bench/{:08x}/{phase}", self.run_id)
    }

    fn workload(&self, phase: &str, duration: Duration) -> Workload {
        Workload {
            clients: self.args.clients as usize,
            duration,
            value: self.value.clone(),
            key_prefix: self.prefix(phase),
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

    async fn measure<T: Target>(&self, name: &str, target: &T) -> anyhow::Result<Measured> {
        if !self.args.warmup.is_zero() {
            let warmup = self.workload("w", self.args.warmup);
            driver::run(
                target,
                &warmup,
                &self.bar(format!("{name} warm-up"), self.args.warmup),
            )
            .await?;
        }
        let workload = self.workload("m", self.args.duration);
        let phase = driver::run(
            target,
            &workload,
            &self.bar(name.to_owned(), self.args.duration),
        )
        .await?;
        let read_back = read_back(target, &phase.last_keys, &self.value).await;
        let summary = Summary::new(
            name,
            &target.endpoint(),
            workload.clients,
            &phase.histogram,
            (phase.ops, phase.errors, phase.retries),
            phase.elapsed,
        );
        Ok(Measured {
            summary,
            read_back,
            first_error: phase.first_error,
        })
    }
}

async fn read_back<T: Target>(target: &T, keys: &[Bytes], value: &Bytes) -> ReadBack {
    let answers = join_all(keys.iter().map(|key| target.read_back(key.clone()))).await;
    let mut check = ReadBack {
        checked: keys.len(),
        ..ReadBack::default()
    };
    for (key, answer) in keys.iter().zip(answers) {
        let problem = match answer {
            Ok(Some(found)) if found == value => {
                check.matched += 1;
                continue;
            }
            Ok(Some(_)) => {
                check.lost += 1;
                "holds another value".to_owned()
            }
            Ok(None) => {
                check.lost += 1;
                "is missing".to_owned()
            }
            Err(reason) => {
                check.unreadable += 1;
                format!("could not be read: {reason}")
            }
        };
        check
            .first_problem
            .get_or_insert_with(|| format!("{} {problem}", String::from_utf8_lossy(key)));
    }
    check
}

fn print_table(args: &BenchRawArgs, results: &[Measured], comparison: Option<Comparison>) {
    println!(
        "workload: {} client(s) on {} connection(s), {} measured after {} warm-up, \
         {}-byte values, a new key per put",
        args.clients,
        args.connections,
        duration(args.duration),
        duration(args.warmup),
        args.value_size
    );
    let headers = [
        "target", "endpoint", "ops", "ops/s", "p50", "p90", "p99", "max", "errors", "retries",
    ];
    let numbers = [
        "ops", "ops/s", "p50", "p90", "p99", "max", "errors", "retries",
    ];
    let mut t = table(&headers, &numbers);
    for m in results {
        let s = &m.summary;
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
    if let Some(c) = comparison {
        let ratio =
            |r: Option<f64>| r.map_or("n/a".to_owned(), |r| format!("{}x", three_digits(r)));
        println!(
            "syncd/etcd: throughput {} (higher is better for syncd), p50 latency {} (lower is \
             better)",
            ratio(c.ops_per_sec_ratio),
            ratio(c.p50_ratio)
        );
    }
    for m in results {
        if let Some(first) = &m.first_error {
            eprintln!(
                "warning: {} put(s) to {} failed; first: {first}",
                m.summary.errors, m.summary.target
            );
        }
        eprintln!(
            "read-back: {} of {} last-written keys on {} hold their value",
            m.read_back.matched, m.read_back.checked, m.summary.target
        );
    }
}
