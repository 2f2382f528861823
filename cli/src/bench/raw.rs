//! `syncctl bench raw`: a replicated write per operation.
//!
//! Each client puts a new key (`PREFIX/CLIENT/SEQUENCE`) with the same value, so no two writes
//! of a run touch the same key. What is timed, per put: from just before the client hands the
//! request to the target (the request is encoded, sent over the HTTP/2 connection, replicated
//! and made durable by the server, answered, decoded) to the moment the answer is back in the
//! task, including any redirect to a new leader. Building the key is outside the timed span.
//!
//! After the measured phase, the last key every client wrote is read back linearizably and must
//! hold the value written, so a target that acknowledges writes it did not keep cannot post a
//! good number.

use std::future::Future;
use std::sync::Arc;

use anyhow::bail;
use bytes::Bytes;
use futures::future::join_all;
use serde::Serialize;
use tokio::time::Instant;

use super::driver::{Call, Done, Worker};
use super::summary::Summary;
use super::syncd::SyncdTarget;
use super::{Run, ensure_progress, print_results, timing};
use crate::args::{BenchRawArgs, GlobalOpts};

/// A system `bench raw` can load.
pub trait KvTarget: Send + Sync + 'static {
    type Putter: Putter;

    /// A new client, with its own identity (for syncd: its own RequestHeader client id).
    /// `index` picks which of the shared connections it uses.
    fn putter(&self, index: usize) -> Self::Putter;

    /// The member the clients send to now (after any redirect), `host:port`.
    fn endpoint(&self) -> String;

    /// Reads a key back, linearizably, for the check after the run.
    fn read_back(&self, key: Bytes) -> impl Future<Output = Result<Option<Bytes>, String>> + Send;
}

/// One client's connection to the target.
pub trait Putter: Send + 'static {
    /// Writes `key = value` and returns once the target acknowledged it (or gave up).
    fn put(&mut self, key: Bytes, value: Bytes) -> impl Future<Output = Call<()>> + Send;
}

/// One target's measured phase and its read-back check.
#[derive(Serialize)]
struct Measured {
    #[serde(flatten)]
    summary: Summary,
    read_back: ReadBack,
}

impl AsRef<Summary> for Measured {
    fn as_ref(&self) -> &Summary {
        &self.summary
    }
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

pub async fn run(global: &GlobalOpts, args: &BenchRawArgs) -> anyhow::Result<()> {
    let load = &args.load;
    let run = Run::new(global, load, "puts");
    let targets = run.connect(global, "raw").await?;

    let value = Bytes::from(
        (0..args.value_size)
            .map(|_| rand::random::<u8>())
            .collect::<Vec<_>>(),
    );
    // Random per invocation: keys of different runs never collide.
    let prefix: Arc<str> = format!("syncctl-bench/{:08x}", rand::random::<u32>()).into();
    let plan = Plan {
        run: &run,
        value,
        prefix,
    };

    let mut results = vec![plan.measure("syncd", &targets.syncd).await?];
    if let Some(etcd) = &targets.etcd {
        results.push(plan.measure("etcd", etcd).await?);
    }
    let workload = WorkloadJson {
        clients: load.clients,
        connections: load.connections,
        duration_secs: load.duration.as_secs_f64(),
        warmup_secs: load.warmup.as_secs_f64(),
        value_size: args.value_size,
        key_size: key(&plan.prefix, 0, 1).len(),
    };
    let describe = || {
        format!(
            "{} client(s) on {} connection(s), {}, {}-byte values, a new key per put",
            load.clients,
            load.connections,
            timing(load),
            args.value_size
        )
    };
    print_results(global.output, workload, describe, &results)?;
    if run.people {
        for m in &results {
            eprintln!(
                "read-back: {} of {} last-written keys on {} hold their value",
                m.read_back.matched, m.read_back.checked, m.summary.target
            );
        }
    }

    for m in &results {
        let target = &m.summary.target;
        ensure_progress(&m.summary, "put")?;
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

/// `bench raw`'s workload on syncd as the reference row of another bench (`bench cache
/// --mode write`: the plain replicated write beside the cache write), named `name`, with the
/// same read-back check.
pub(super) async fn reference_put(
    run: &Run<'_>,
    target: &SyncdTarget,
    name: &str,
    value_size: u32,
) -> anyhow::Result<Summary> {
    let plan = Plan {
        run,
        value: Bytes::from(
            (0..value_size)
                .map(|_| rand::random::<u8>())
                .collect::<Vec<_>>(),
        ),
        prefix: format!("syncctl-bench/{:08x}", rand::random::<u32>()).into(),
    };
    let measured = plan.measure(name, target).await?;
    let check = &measured.read_back;
    if check.lost > 0 || check.unreadable > 0 {
        bail!(
            "{name}: the read-back after the run failed: {}",
            check.first_problem.as_deref().unwrap_or("?")
        );
    }
    Ok(measured.summary)
}

/// What every target's run shares: the value and the keys' prefix.
struct Plan<'a> {
    run: &'a Run<'a>,
    value: Bytes,
    /// `syncctl-bench/<random run id>`.
    prefix: Arc<str>,
}

impl Plan<'_> {
    async fn measure<T: KvTarget>(&self, name: &str, target: &T) -> anyhow::Result<Measured> {
        let clients = self.run.load.clients as usize;
        let workers = (0..clients)
            .map(|index| PutWorker {
                putter: target.putter(index),
                prefix: Arc::clone(&self.prefix),
                index,
                sequence: 0,
                value: self.value.clone(),
                last_key: None,
            })
            .collect();
        let (phase, workers) = self.run.measure(name, workers).await?;
        let last_keys: Vec<Bytes> = workers.into_iter().filter_map(|w| w.last_key).collect();
        Ok(Measured {
            summary: Summary::new(name, &target.endpoint(), clients, &phase),
            read_back: read_back(target, &last_keys, &self.value).await,
        })
    }
}

/// A client that puts a new key per operation.
struct PutWorker<P> {
    putter: P,
    prefix: Arc<str>,
    /// The client's number, part of its keys.
    index: usize,
    /// The sequence number of the last put, part of its key.
    sequence: u64,
    /// The value of every put; shared, never copied.
    value: Bytes,
    /// The last key written successfully: what the read-back check reads.
    last_key: Option<Bytes>,
}

impl<P: Putter> Worker for PutWorker<P> {
    async fn op(&mut self) -> Call<Done> {
        self.sequence += 1;
        let key = key(&self.prefix, self.index, self.sequence);
        let sent = Instant::now();
        let call = self.putter.put(key.clone(), self.value.clone()).await;
        let latency = sent.elapsed();
        call.and_then(|()| {
            self.last_key = Some(key);
            Ok(Done::One(latency))
        })
    }
}

/// The key of put number `sequence` of client `client`.
fn key(prefix: &str, client: usize, sequence: u64) -> Bytes {
    Bytes::from(format!("{prefix}/{client:05}/{sequence:010}"))
}

async fn read_back<T: KvTarget>(target: &T, keys: &[Bytes], value: &Bytes) -> ReadBack {
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::time::Duration;

    use indicatif::ProgressBar;

    use super::*;
    use crate::bench::driver;

    /// A putter that records every key and acknowledges all but every tenth put.
    struct Recorder {
        seen: Arc<Mutex<Vec<Bytes>>>,
        count: u64,
    }

    impl Putter for Recorder {
        async fn put(&mut self, key: Bytes, _value: Bytes) -> Call<()> {
            self.count += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.seen.lock().unwrap().push(key);
            Call::once(if self.count.is_multiple_of(10) {
                Err("injected".into())
            } else {
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn clients_write_unique_keys_and_remember_the_last_acknowledged() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..4)
            .map(|index| PutWorker {
                putter: Recorder {
                    seen: Arc::clone(&seen),
                    count: 0,
                },
                prefix: "p".into(),
                index,
                sequence: 0,
                value: Bytes::from_static(b"v"),
                last_key: None,
            })
            .collect();
        let duration = Duration::from_millis(200);
        let (result, workers) = driver::run(workers, duration, "puts", &ProgressBar::hidden())
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        let unique: HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "a key was written twice");
        assert_eq!(result.ops + result.errors, seen.len() as u64);
        for w in &workers {
            let last = w.last_key.clone().expect("no put acknowledged");
            // The last acknowledged put is the last put, or the one before a failed last put.
            let expected = if w.putter.count.is_multiple_of(10) {
                w.sequence - 1
            } else {
                w.sequence
            };
            assert_eq!(last, key("p", w.index, expected));
        }
    }

    #[test]
    fn keys_name_prefix_client_and_sequence() {
        assert_eq!(
            key("run/m", 3, 42),
            Bytes::from_static(b"run/m/00003/0000000042")
        );
    }
}
