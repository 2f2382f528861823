//! A pool of workers consuming one topic.
//!
//! Each worker long-polls the topic, and for each delivery runs a handler while
//! [`Delivery::auto_extend`] keeps the message invisible to the other workers (the handler may
//! run longer than the visibility timeout: here every fifth job does). A job that succeeds is
//! acknowledged; one that fails is given back with [`Delivery::nack`] and a delay, and is
//! delivered again (here every fourth job fails on its first attempt).
//!
//! The program publishes its own demo jobs to a fresh topic, runs the pool until every job has
//! succeeded, and prints one line per event and a summary. Without auto-extend, the slow jobs
//! would be delivered to a second worker while the first still runs them, and the summary would
//! report them as handled twice.
//!
//! Run it against a local cluster (`syncctl dev up` in another terminal):
//!
//! ```text
//! cargo run -p sync-client --example worker_pool
//! SYNC_ENDPOINTS=10.0.0.5:7001 cargo run -p sync-client --example worker_pool
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sync_client::{Client, Delivery, Error};

/// How the pool runs.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// The topic to publish the demo jobs to and consume.
    pub topic: String,
    /// How many demo jobs.
    pub jobs: u32,
    /// How many workers.
    pub workers: usize,
    /// The visibility timeout; the slow jobs take longer than this.
    pub visibility: Duration,
    /// How long a failed job waits before it is delivered again.
    pub retry_delay: Duration,
}

/// What the pool did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Successful runs per job number: exactly one each if no delivery was duplicated.
    pub succeeded: BTreeMap<u32, u32>,
    /// Failed runs that were given back (nacked).
    pub nacked: u32,
    /// Jobs each worker completed.
    pub per_worker: Vec<u32>,
}

/// The handler: sleeps to stand for work; every fifth job is slow (longer than the visibility
/// timeout), every fourth fails on its first attempt.
async fn handle(job: u32, attempt: u32, config: &PoolConfig) -> Result<(), String> {
    let work = if job.is_multiple_of(5) {
        config.visibility + config.visibility / 2
    } else {
        Duration::from_millis(50)
    };
    tokio::time::sleep(work).await;
    if job.is_multiple_of(4) && attempt == 1 {
        return Err(format!("job {job}: transient failure"));
    }
    Ok(())
}

/// One worker: receive, handle under auto-extend, ack or nack, until every job succeeded.
async fn worker(
    id: usize,
    client: Client,
    config: PoolConfig,
    summary: Arc<Mutex<Summary>>,
) -> Result<(), Error> {
    let consumer = client
        .consumer(&config.topic)
        .batch(1)
        .visibility(config.visibility)
        .wait(Duration::from_millis(500));
    let done = |s: &Summary| s.succeeded.len() as u32 == config.jobs;
    while !done(&summary.lock().unwrap_or_else(PoisonError::into_inner)) {
        for delivery in consumer.receive().await? {
            run_one(id, &delivery, &config, &summary).await?;
        }
    }
    Ok(())
}

async fn run_one(
    worker: usize,
    delivery: &Delivery,
    config: &PoolConfig,
    summary: &Mutex<Summary>,
) -> Result<(), Error> {
    let payload = String::from_utf8_lossy(delivery.payload());
    let Some(job) = payload
        .strip_prefix("job-")
        .and_then(|n| n.parse::<u32>().ok())
    else {
        // Not ours: acknowledge it so that it does not come back forever.
        println!("worker {worker}: dropping unexpected message {payload:?}");
        return delivery.ack().await;
    };
    let outcome = {
        // Keeps the message invisible while the handler runs; dropped when it returns.
        let _extend = delivery.auto_extend(config.visibility);
        handle(job, delivery.attempt(), config).await
    };
    match outcome {
        Ok(()) => {
            delivery.ack().await?;
            println!(
                "worker {worker}: job {job} done (attempt {})",
                delivery.attempt()
            );
            let mut s = summary.lock().unwrap_or_else(PoisonError::into_inner);
            *s.succeeded.entry(job).or_default() += 1;
            s.per_worker[worker] += 1;
        }
        Err(why) => {
            delivery.nack(config.retry_delay).await?;
            println!(
                "worker {worker}: {why}; retrying in {:?}",
                config.retry_delay
            );
            summary
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .nacked += 1;
        }
    }
    Ok(())
}

/// Publishes `config.jobs` jobs and runs `config.workers` workers until all succeeded.
pub async fn run(client: &Client, config: PoolConfig) -> anyhow::Result<Summary> {
    let jobs: Vec<String> = (1..=config.jobs).map(|n| format!("job-{n}")).collect();
    client.publish_batch(&config.topic, jobs).await?;
    println!(
        "published {} jobs to {}; starting {} workers",
        config.jobs, config.topic, config.workers
    );
    let summary = Arc::new(Mutex::new(Summary {
        per_worker: vec![0; config.workers],
        ..Summary::default()
    }));
    let workers: Vec<_> = (0..config.workers)
        .map(|id| {
            tokio::spawn(worker(
                id,
                client.clone(),
                config.clone(),
                Arc::clone(&summary),
            ))
        })
        .collect();
    for w in workers {
        w.await??;
    }
    let summary = summary
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let twice = summary.succeeded.values().filter(|&&n| n > 1).count();
    println!(
        "all {} jobs done: {} failures retried, {} jobs handled twice, per worker {:?}",
        summary.succeeded.len(),
        summary.nacked,
        twice,
        summary.per_worker
    );
    Ok(summary)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoints = std::env::var("SYNC_ENDPOINTS")
        .unwrap_or_else(|_| "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".to_owned());
    let client = Client::connect(endpoints.split(',')).await?;
    // A fresh topic per run, so that jobs left by an interrupted run do not mix in.
    let config = PoolConfig {
        topic: format!("worker-pool-{}", std::process::id()),
        jobs: 20,
        workers: 4,
        visibility: Duration::from_secs(2),
        retry_delay: Duration::from_millis(500),
    };
    run(&client, config).await?;
    Ok(())
}
