//! The Redis target: the reference for `bench queue|cache --compare-redis URL`, through fred.
//!
//! Redis is one unreplicated process: that is the point of the comparison (what the
//! replication, the fsyncs and the coherence protocol cost against a local in-memory server).
//! Each benchmark client has its own connection, as a Redis application's worker would (and as
//! `redis-benchmark -c N` does): a blocking XREADGROUP holds its connection, so clients
//! sharing one would wait for each other.
//!
//! - `bench queue`: a topic is a stream with one consumer group, `bench`, created from id 0
//!   with MKSTREAM before the clock starts. A publish is an XADD with one field `p` (a batch: as
//!   many XADDs, pipelined on one connection); a consume is XREADGROUP GROUP bench CONSUMER
//!   COUNT n BLOCK wait STREAMS key >; an ack is one XACK of every id received. After the run:
//!   XLEN (publish modes) or the group's pending count plus its lag (end-to-end), then DEL.
//! - `bench cache`: a Get is GET (a "hit" is a found key), a Set is SET, of the same value
//!   size; Redis has one node, so "the client's node" and "another node" are the same server.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::{
    Builder, Client, ClientLike, Config, Error as FredError, KeysInterface, StreamsInterface, Value,
};
use fred::types::streams::XReadResponse;
use tokio::time::timeout;

use super::cache::{CacheClient, CacheTarget};
use super::driver::Call;
use super::queue::{QueueClient, QueueTarget, Received, delete_all, topic_name};

/// The consumer group of every stream.
const GROUP: &str = "bench";
/// The stream entry's only field.
const FIELD: &str = "p";

pub struct RedisTarget {
    url: String,
    /// For setting up, checking and cleaning up, never for measured calls.
    admin: Client,
    /// Every call's deadline, connecting included.
    rpc_timeout: Duration,
}

fn describe(e: &FredError) -> String {
    format!("redis: {e}")
}

impl RedisTarget {
    /// Connects to the server at `url` (`redis://HOST:PORT`), failing fast if it does not
    /// answer.
    pub async fn connect(url: &str, rpc_timeout: Duration) -> anyhow::Result<Self> {
        let admin = open(url, rpc_timeout)
            .await
            .map_err(|reason| anyhow::anyhow!("cannot connect to Redis at {url}: {reason}"))?;
        Ok(RedisTarget {
            url: url.to_owned(),
            admin,
            rpc_timeout,
        })
    }

    async fn connection(&self) -> anyhow::Result<Client> {
        open(&self.url, self.rpc_timeout)
            .await
            .map_err(|reason| anyhow::anyhow!("cannot connect to Redis at {}: {reason}", self.url))
    }

    fn endpoint(&self) -> String {
        let rest = self.url.strip_prefix("redis://").unwrap_or(&self.url);
        rest.split('/').next().unwrap_or(rest).to_owned()
    }
}

/// One connection, initialised (connected, PING answered) within `deadline`.
async fn open(url: &str, deadline: Duration) -> Result<Client, String> {
    let config = Config::from_url(url).map_err(|e| describe(&e))?;
    let client = Builder::from_config(config)
        .build()
        .map_err(|e| describe(&e))?;
    match timeout(deadline, client.init()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err(format!(
            "redis: no answer within {}",
            humantime::format_duration(deadline)
        )),
    }
}

/// A fred call's outcome as a benchmark call (fred does not retry here: no reconnect policy).
fn once<T>(result: Result<T, FredError>) -> Call<T> {
    Call::once(result.map_err(|e| describe(&e)))
}

impl QueueTarget for RedisTarget {
    type Client = RedisQueueClient;

    async fn create_topics(&self, prefix: &str, count: usize) -> anyhow::Result<Vec<String>> {
        let mut topics = Vec::with_capacity(count);
        for k in 0..count {
            let key = topic_name(prefix, k);
            let _: Value = self
                .admin
                .xgroup_create(key.as_str(), GROUP, "0", true)
                .await
                .map_err(|e| anyhow::anyhow!(describe(&e)))?;
            topics.push(key);
        }
        Ok(topics)
    }

    async fn client(&self, index: usize, topic: &str) -> anyhow::Result<RedisQueueClient> {
        Ok(RedisQueueClient {
            connection: self.connection().await?,
            key: topic.to_owned(),
            consumer: format!("c{index}"),
        })
    }

    fn endpoint(&self) -> String {
        RedisTarget::endpoint(self)
    }

    async fn stored(&self, topic: &str) -> Result<u64, String> {
        self.admin.xlen(topic).await.map_err(|e| describe(&e))
    }

    async fn outstanding(&self, topic: &str) -> Result<u64, String> {
        let groups: Vec<HashMap<String, Value>> = self
            .admin
            .xinfo_groups(topic)
            .await
            .map_err(|e| describe(&e))?;
        let group = groups
            .iter()
            .find(|g| g.get("name").and_then(Value::as_string).as_deref() == Some(GROUP))
            .ok_or_else(|| format!("redis: no group {GROUP} on {topic}"))?;
        let count = |field: &str| group.get(field).and_then(Value::as_u64).unwrap_or(0);
        // pending: delivered, not acknowledged; lag: not delivered yet.
        Ok(count("pending") + count("lag"))
    }

    async fn delete_topics(&self, topics: &[String]) -> Result<(), String> {
        delete_all(topics, |key| async move {
            let _: u64 = self.admin.del(key).await.map_err(|e| describe(&e))?;
            Ok(())
        })
        .await
    }
}

/// One client's connection, stream and consumer name.
pub struct RedisQueueClient {
    connection: Client,
    key: String,
    consumer: String,
}

impl QueueClient for RedisQueueClient {
    type Handle = String;

    async fn publish(&mut self, payloads: Vec<Bytes>) -> Call<()> {
        if let [payload] = payloads.as_slice() {
            let added: Result<String, _> = self
                .connection
                .xadd(
                    self.key.as_str(),
                    false,
                    None,
                    "*",
                    vec![(FIELD, payload.clone())],
                )
                .await;
            return once(added).and_then(|_| Ok(()));
        }
        let pipeline = self.connection.pipeline();
        for payload in payloads {
            let queued: Result<(), _> = pipeline
                .xadd(self.key.as_str(), false, None, "*", vec![(FIELD, payload)])
                .await;
            if let Err(e) = queued {
                return once(Err(e));
            }
        }
        once(pipeline.all::<Vec<String>>().await).and_then(|_| Ok(()))
    }

    async fn consume(&mut self, max: u32, wait: Duration) -> Call<Vec<Received<String>>> {
        let read: Result<XReadResponse<String, String, String, Bytes>, _> = self
            .connection
            .xreadgroup_map(
                GROUP,
                self.consumer.as_str(),
                Some(u64::from(max)),
                Some(wait.as_millis() as u64),
                false,
                self.key.as_str(),
                ">",
            )
            .await;
        once(read).and_then(|streams| {
            let entries = streams.into_values().flatten();
            entries
                .map(|(id, mut fields)| {
                    let payload = fields
                        .remove(FIELD)
                        .ok_or_else(|| format!("redis: entry {id} has no field {FIELD}"))?;
                    Ok(Received {
                        payload,
                        handle: id,
                    })
                })
                .collect()
        })
    }

    async fn ack(&mut self, handles: Vec<String>) -> Call<()> {
        let count = handles.len() as u64;
        let acked: Result<u64, _> = self
            .connection
            .xack(self.key.as_str(), GROUP, handles)
            .await;
        once(acked).and_then(|n| {
            if n == count {
                Ok(())
            } else {
                Err(format!("redis: XACK acknowledged {n} of {count}"))
            }
        })
    }
}

impl CacheTarget for RedisTarget {
    type Client = RedisCacheClient;

    fn nodes(&self) -> usize {
        1
    }

    async fn client(&self, _index: usize) -> anyhow::Result<RedisCacheClient> {
        Ok(RedisCacheClient {
            connection: self.connection().await?,
        })
    }

    fn endpoint(&self) -> String {
        RedisTarget::endpoint(self)
    }

    async fn delete_keys(&self, keys: Vec<String>) -> Result<(), String> {
        for chunk in keys.chunks(1_000) {
            let _: u64 = self
                .admin
                .del(chunk.to_vec())
                .await
                .map_err(|e| describe(&e))?;
        }
        Ok(())
    }
}

/// One client's connection, for GET and SET.
pub struct RedisCacheClient {
    connection: Client,
}

impl CacheClient for RedisCacheClient {
    /// A GET of a missing key is an error, as on syncd: every key of a run exists.
    async fn get(&mut self, _node: usize, key: &str) -> Call<Option<bool>> {
        let value: Result<Option<Bytes>, _> = self.connection.get(key).await;
        once(value).and_then(|v| match v {
            Some(_) => Ok(None),
            None => Err(format!("redis: {key} is missing")),
        })
    }

    async fn set(&mut self, _node: usize, key: &str, value: Bytes) -> Call<()> {
        let done: Result<(), _> = self.connection.set(key, value, None, None, false).await;
        once(done)
    }
}
