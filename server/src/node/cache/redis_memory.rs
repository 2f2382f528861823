//! Memory in Redis: the cache's backing store when a node starts with
//! `--cache-backend redis://HOST:PORT[/DB]`. Redis is main memory and the nodes are coherent
//! caches in front of it (write-through: memory holds a value before its Set returns; in
//! write-back mode, a holder's local writes reach it later as WriteBacks).
//!
//! Every [`MemoryRequest`] is one Lua script, so it is atomic in Redis, and every script honours
//! the memory contract of [`crate::cache::memory`]:
//! - **keys** live under `syncd:cache:<cluster id>:`, so several clusters can share a Redis. A
//!   cache key's record is the hash `<prefix>k:<key>` with fields `value`, `version` and
//!   `expires_at` (Unix ms by Redis's own clock, `TIME` inside the script: memory stamps the
//!   expiry, whatever the nodes' clocks say);
//! - **versions** come from one counter `<prefix>seq` (INCR), so they strictly increase and are
//!   never reused, across keys and deletions. A deletion keeps a tombstone (no `value`, the
//!   version kept) and no record ever gets a Redis expiry, so a key's version never goes back. A
//!   key never written reads as version 0;
//! - **fencing**: `<prefix>epoch` holds the newest directory epoch seen. Every script (reads
//!   too) refuses a request of an older epoch with `stale <newest>` and raises the fence to a
//!   newer one, before it touches anything else;
//! - **idempotence**: a write carries an id `<node>:<incarnation>:<epoch>:<memop id>`. Its
//!   result is recorded at `<prefix>done:<id>` (10 minutes) in the same script, and a replay of
//!   the id answers that result without writing again;
//! - **client retries**: a write sent with a request header ([`crate::cache::message::WriteTag`])
//!   is also recorded in its client's record `<prefix>client:<id>`, like the replicated state's
//!   client table: a retry of the header, through any node, answers the first result as a
//!   duplicate and writes nothing (see [`WRITE`]);
//! - **ambiguity** (contract rule 3): when a write may have reached Redis but its answer was lost
//!   (timeout, connection dropped), the shell does not answer. It runs [`RESOLVE`] for the id
//!   until Redis answers: the recorded result if the write happened, else the id is recorded as
//!   `cancelled`, which the write script answers without writing if the original arrives late.
//!   Only then does the directory get its answer. A request that could not be sent (no
//!   connection) fails at once as UNAVAILABLE, naming the Redis URL;
//! - **reservations** (write-back mode, contract rule 6): a ReadReserve is [`READ`] and a
//!   WriteReserve is [`WRITE`], each with a block, recording `reserve_base` and `reserve_limit`
//!   in the key's record; a write's version is always above `reserve_limit`; a WriteBack
//!   ([`WRITE_BACK`]) writes its own version only inside that reservation. All three record
//!   their result under their id and are resolved like writes (a ReadReserve by [`READ`]
//!   itself, which reads the key again rather than keeping a copy of the value).
//!
//! The scripts check everything before their first write, and their writes cannot fail on a
//! well-formed record, so a script never stops half way.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use fred::types::config::UnresponsiveConfig;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};

use crate::cache::memory::{MemOpId, MemoryError, MemoryOp, MemoryReply, MemoryRequest};
use crate::cache::message::{Mutation, Write, WriteResult};
use crate::cache::{Epoch, Stored, Version};

/// How long a write's result (or its cancellation) is remembered for replays. A request still
/// in flight after this long is not a real risk: every command has [`COMMAND_TIMEOUT`].
pub const DONE_TTL: Duration = Duration::from_secs(600);

/// The most write results kept per client, as in the replicated state's client table: past it
/// the oldest is released (its retries are then refused as expired, never applied twice).
pub const CLIENT_RESULTS: usize = 1024;

/// The longest one script may take before its outcome counts as unknown: far above a healthy
/// Redis's latency, well below the cache's operation timeout so an outage is seen in time.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Reconnection backoff bounds (ms): quick at first, then at most every two seconds. The first
/// delay is also the window in which the client still reports itself connected after Redis went
/// away, so a request made then waits in the client's queue and, for a write, is resolved as
/// ambiguous once Redis is back: it is kept short.
const RECONNECT_MIN_MS: u32 = 10;
const RECONNECT_MAX_MS: u32 = 2_000;

/// The resolution of an ambiguous write is retried with backoff between these bounds.
const RESOLVE_MIN: Duration = Duration::from_millis(50);
const RESOLVE_MAX: Duration = Duration::from_secs(1);

/// The start of every script that changes a key ([`WRITE`], [`WRITE_BACK`]), as Lua: answers a
/// replayed id from its record, then checks the fence: refuses an older epoch with `stale
/// <newest>` and raises the fence to a newer one, before anything else is touched. The script
/// names the id's record and the fence first, as the locals `done` and `fence_key`.
macro_rules! replay_then_fence {
    () => {
        r#"
local prior = redis.call('GET', done)
if prior then return prior end
local fence = tonumber(redis.call('GET', fence_key) or '0')
local epoch = tonumber(ARGV[1])
if epoch < fence then return 'stale ' .. string.format('%d', fence) end
if epoch > fence then redis.call('SET', fence_key, ARGV[1]) end
"#
    };
}

/// Checks the fence, then reads a record; with a block, a ReadReserve: also reserves versions.
/// KEYS: record, epoch, and for a ReadReserve its done key. ARGV: epoch, and for a ReadReserve
/// the block, the done ttl ms and `resolve` or ''.
/// Returns `{'stale', newest}` or `{'ok', version, ttl_left_ms or -1, value or false}`, and for a
/// ReadReserve the base as a fifth item; a ReadReserve may also return `{'cancelled'}` or
/// `{'moved'}`.
///
/// A ReadReserve (contract rule 6) reserves `base + 1 ..= base + block` with `base` the larger of
/// the key's version and its previous `reserve_limit`, and records `reserve_base` and
/// `reserve_limit` in the key's record, where neither a deletion nor an expiry of the value
/// removes them. Unlike a plain read it changes memory, so it is resolved like a write when its
/// answer is lost: its done key records `reserved <base> <version>`, small even for a large
/// value. A replay (or, with `resolve`, the resolution) of a recorded ReadReserve reads the key
/// again: if its version and its latest reservation are still the recorded ones, the value is
/// the one read then (a version is never given twice), with the TTL left now, and the answer is
/// the one a ReadReserve now would get (nothing changed the key or its reservation since); if
/// the version moved (a newer write took the key past the block) or a newer reservation replaced
/// this one, the reservation has no effect left (memory takes no write-back from its block), so
/// the request is answered `moved`, as if it never happened. A resolution that finds no record
/// cancels the id.
pub const READ: &str = r#"
local function record()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local r = redis.call('HMGET', KEYS[1], 'value', 'version', 'expires_at', 'reserve_limit',
    'reserve_base')
  local value, ttl = r[1], '-1'
  if value == false or (r[3] ~= false and now >= tonumber(r[3])) then
    value = false
  elseif r[3] ~= false then
    ttl = string.format('%d', tonumber(r[3]) - now)
  end
  return r[2] or '0', ttl, value, tonumber(r[4] or '0'), r[5]
end
local reserving = KEYS[3] ~= nil
if reserving then
  local prior = redis.call('GET', KEYS[3])
  if prior == 'cancelled' then return {'cancelled'} end
  if prior then
    local base, was = string.match(prior, '^reserved (%d+) (%d+)$')
    local version, ttl, value, _, latest = record()
    if version ~= was or latest ~= base then return {'moved'} end
    return {'ok', version, ttl, value, base}
  end
  if ARGV[4] == 'resolve' then
    redis.call('SET', KEYS[3], 'cancelled', 'PX', ARGV[3])
    return {'cancelled'}
  end
end
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
local epoch = tonumber(ARGV[1])
if epoch < fence then return {'stale', string.format('%d', fence)} end
if epoch > fence then redis.call('SET', KEYS[2], ARGV[1]) end
local version, ttl, value, limit = record()
if not reserving then return {'ok', version, ttl, value} end
local base = string.format('%d', math.max(tonumber(version), limit))
redis.call('HSET', KEYS[1], 'reserve_base', base,
  'reserve_limit', string.format('%d', tonumber(base) + tonumber(ARGV[2])))
redis.call('SET', KEYS[3], 'reserved ' .. base .. ' ' .. version, 'PX', ARGV[3])
return {'ok', version, ttl, value, base}
"#;

/// Answers a replayed id, checks the fence, answers a retried client request from the client's
/// record, then writes (Set, Delete, CompareAndSet) and records the result under the id and,
/// for a tagged write, in the client's record; with a block, a WriteReserve: also reserves
/// versions after the write.
/// KEYS: record, seq, epoch, done, client. ARGV: epoch, `set` | `del`, expected version or '',
/// value, ttl ms or '', done ttl ms, the tag's sequence or '' (untagged), the tag's lowest
/// unacked, the most results a client record keeps, the block or '' (a plain write).
/// Returns `stale <newest>`, `cancelled`, `expired`, `mismatch <current>`,
/// `applied <version> <0|1>`, or `duplicate ` and one of the last two; a WriteReserve that wrote
/// or mismatched appends ` base <base>`.
///
/// The client record (`<prefix>client:<id>`, a hash) mirrors the replicated state's client
/// table: `floor` (sequences below it were released by the client) and one field per
/// remembered sequence. A request below the floor is `expired`: it may have been applied, so it
/// is never applied again. The record expires [`DONE_TTL`] after the client's last write.
///
/// Reservations (contract rule 6): a write's version comes from the counter but is above the
/// key's `reserve_limit`. The counter jumps past the limit only when a write of that key needs
/// it, not at every reservation: versions are Lua numbers (doubles, exact up to 2^53), and a jump
/// of `block` per fill would use them up far sooner. A WriteReserve then reserves the `block`
/// versions after the write's (or, after a mismatch, after the key's current version or the
/// previous limit if larger), as [`READ`] does. A duplicate or expired retry reserves nothing:
/// the directory grants no line for it. The client record keeps the write's result without the
/// base, so a retry answers the same duplicate whichever of Write and WriteReserve carries it.
pub const WRITE: &str = concat!(
    "local done, fence_key = KEYS[4], KEYS[3]",
    replay_then_fence!(),
    r#"local tagged = ARGV[7] ~= ''
if tagged then
  local seq = tonumber(ARGV[7])
  local floor = tonumber(redis.call('HGET', KEYS[5], 'floor') or '0')
  local low = tonumber(ARGV[8])
  if low > floor then
    floor = low
    redis.call('HSET', KEYS[5], 'floor', string.format('%d', floor))
    for _, f in ipairs(redis.call('HKEYS', KEYS[5])) do
      if f ~= 'floor' and tonumber(f) < floor then redis.call('HDEL', KEYS[5], f) end
    end
  end
  local recorded = redis.call('HGET', KEYS[5], ARGV[7])
  local early
  if recorded then
    early = 'duplicate ' .. recorded
  elseif seq < floor then
    early = 'expired'
  end
  if early then
    redis.call('SET', done, early, 'PX', ARGV[6])
    return early
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'value', 'version', 'expires_at', 'reserve_limit')
local current = tonumber(r[2] or '0')
local limit = tonumber(r[4] or '0')
local existed = r[1] ~= false and (r[3] == false or now < tonumber(r[3]))
local result
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= current then
  result = 'mismatch ' .. string.format('%d', current)
else
  local version = redis.call('INCR', KEYS[2])
  if version <= limit then
    version = limit + 1
    redis.call('SET', KEYS[2], string.format('%d', version))
  end
  current = version
  if ARGV[2] == 'set' then
    redis.call('HSET', KEYS[1], 'value', ARGV[4], 'version', string.format('%d', version))
    if ARGV[5] ~= '' then
      redis.call('HSET', KEYS[1], 'expires_at', string.format('%d', now + tonumber(ARGV[5])))
    else
      redis.call('HDEL', KEYS[1], 'expires_at')
    end
  else
    redis.call('HDEL', KEYS[1], 'value', 'expires_at')
    redis.call('HSET', KEYS[1], 'version', string.format('%d', version))
  end
  local e = '0'
  if existed then e = '1' end
  result = 'applied ' .. string.format('%d', version) .. ' ' .. e
end
local answer = result
if ARGV[10] ~= '' then
  local base = math.max(current, limit)
  redis.call('HSET', KEYS[1], 'reserve_base', string.format('%d', base),
    'reserve_limit', string.format('%d', base + tonumber(ARGV[10])))
  answer = result .. ' base ' .. string.format('%d', base)
end
redis.call('SET', done, answer, 'PX', ARGV[6])
if tagged then
  redis.call('HSET', KEYS[5], ARGV[7], result)
  if redis.call('HLEN', KEYS[5]) > tonumber(ARGV[9]) + 1 then
    local oldest
    for _, f in ipairs(redis.call('HKEYS', KEYS[5])) do
      if f ~= 'floor' and (oldest == nil or tonumber(f) < oldest) then oldest = tonumber(f) end
    end
    redis.call('HDEL', KEYS[5], string.format('%d', oldest))
    local floor = tonumber(redis.call('HGET', KEYS[5], 'floor') or '0')
    if oldest + 1 > floor then
      redis.call('HSET', KEYS[5], 'floor', string.format('%d', oldest + 1))
    end
  end
  redis.call('PEXPIRE', KEYS[5], ARGV[6])
end
return answer
"#
);

/// A WriteBack (contract rule 6): answers a replayed id, checks the fence, then writes the value
/// as exactly the given version, without a TTL, if that version is inside the key's latest
/// reservation (`reserve_base < version <= reserve_limit`) and above the key's version, and
/// records the outcome under the id.
/// KEYS: record, epoch, done. ARGV: epoch, version, value, done ttl ms.
/// Returns `stale <newest>`, `cancelled`, `wrote_back` or `refused` (nothing changed: memory
/// holds that version or a newer one, or a newer reservation replaced the one the version came
/// from). The counter is not touched: the version is at most the limit, and the key's next
/// ordinary write goes above the limit anyway (see [`WRITE`]).
pub const WRITE_BACK: &str = concat!(
    "local done, fence_key = KEYS[3], KEYS[2]",
    replay_then_fence!(),
    r#"local r = redis.call('HMGET', KEYS[1], 'version', 'reserve_base', 'reserve_limit')
local version = tonumber(ARGV[2])
local result = 'refused'
if r[2] ~= false and r[3] ~= false and version > tonumber(r[2]) and version <= tonumber(r[3])
    and version > tonumber(r[1] or '0') then
  redis.call('HSET', KEYS[1], 'value', ARGV[3], 'version', ARGV[2])
  redis.call('HDEL', KEYS[1], 'expires_at')
  result = 'wrote_back'
end
redis.call('SET', done, result, 'PX', ARGV[4])
return result
"#
);

/// Settles an ambiguous write (a Write, WriteReserve or WriteBack): its recorded result if it
/// happened, else records it as `cancelled` so that it never will. (A ReadReserve is settled by
/// [`READ`] itself, which reads the key again.)
/// KEYS: done. ARGV: done ttl ms. Returns what [`WRITE`] or [`WRITE_BACK`] returns.
pub const RESOLVE: &str = r#"
local prior = redis.call('GET', KEYS[1])
if prior then return prior end
redis.call('SET', KEYS[1], 'cancelled', 'PX', ARGV[1])
return 'cancelled'
"#;

/// Why `--cache-backend` was not accepted.
#[derive(Debug, thiserror::Error)]
#[error(
    "--cache-backend {url:?}: {why} (expected `raft` or redis://HOST:PORT[/DB]; TLS, \
     passwords, Sentinel and Redis Cluster are not supported)"
)]
pub struct BadUrl {
    /// The value given.
    pub url: String,
    /// What is wrong with it.
    pub why: String,
}

/// Checks a `redis://HOST:PORT[/DB]` URL: a host, a port, an optional database number, nothing
/// else.
pub fn check_url(url: &str) -> Result<(), BadUrl> {
    let bad = |why: &str| BadUrl {
        url: url.to_string(),
        why: why.to_string(),
    };
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| bad("not a redis:// URL"))?;
    let (authority, db) = match rest.split_once('/') {
        Some((a, db)) => (a, Some(db)),
        None => (rest, None),
    };
    if authority.contains('@') {
        return Err(bad("credentials are not supported"));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("the port is missing"))?;
    if host.is_empty() {
        return Err(bad("the host is missing"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("the port must be a number from 1 to 65535")),
    }
    if let Some(db) = db
        && !db.is_empty()
        && db.parse::<u8>().is_err()
    {
        return Err(bad("the database must be a number"));
    }
    Config::from_url(url).map_err(|e| bad(e.details()))?;
    Ok(())
}

/// The script's answer to a write, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteAnswer {
    /// Applied (now or, for a replayed id, earlier).
    Written(WriteResult),
    /// A WriteReserve that took effect: the write's result and the reservation's base.
    Reserved(WriteResult, Version),
    /// A WriteBack that took effect: whether it wrote the value (false: refused for good).
    WroteBack {
        /// True if the value was written as its version.
        applied: bool,
    },
    /// Refused: the fence holds a newer epoch.
    Stale(Epoch),
    /// The id was cancelled by a resolution: the write did not and never will happen.
    Cancelled,
    /// A retry of a tagged write Redis had applied: nothing changed now; the first result.
    Duplicate(WriteResult),
    /// A tagged write older than its client's record: refused, not applied.
    Expired,
}

/// Decodes [`WRITE`]'s, [`WRITE_BACK`]'s and [`RESOLVE`]'s answer.
pub fn decode_write(s: &str) -> Result<WriteAnswer, String> {
    let malformed = || format!("malformed write answer {s:?}");
    if let Some(first) = s.strip_prefix("duplicate ") {
        return match decode_write(first)? {
            WriteAnswer::Written(w) => Ok(WriteAnswer::Duplicate(w)),
            _ => Err(malformed()),
        };
    }
    let mut parts = s.split(' ');
    let number = |p: Option<&str>| p.and_then(|p| p.parse::<u64>().ok());
    let answer = match parts.next() {
        Some("applied") => {
            let version = number(parts.next());
            let existed = parts.next();
            match (version, existed) {
                (Some(version), Some(e @ ("0" | "1"))) => {
                    WriteAnswer::Written(WriteResult::Applied {
                        version,
                        existed: e == "1",
                    })
                }
                _ => return Err(malformed()),
            }
        }
        Some("mismatch") => match number(parts.next()) {
            Some(current) => WriteAnswer::Written(WriteResult::Mismatch { current }),
            None => return Err(malformed()),
        },
        Some("stale") => match number(parts.next()) {
            Some(e) => WriteAnswer::Stale(e),
            None => return Err(malformed()),
        },
        Some("wrote_back") => WriteAnswer::WroteBack { applied: true },
        Some("refused") => WriteAnswer::WroteBack { applied: false },
        Some("cancelled") => WriteAnswer::Cancelled,
        Some("expired") => WriteAnswer::Expired,
        _ => return Err(format!("unexpected write answer {s:?}")),
    };
    // A WriteReserve's result ends with its base.
    let answer = match (answer, parts.next()) {
        (WriteAnswer::Written(w), Some("base")) => match number(parts.next()) {
            Some(base) => WriteAnswer::Reserved(w, base),
            None => return Err(malformed()),
        },
        (answer, None) => answer,
        _ => return Err(malformed()),
    };
    if parts.next().is_some() {
        return Err(malformed());
    }
    Ok(answer)
}

/// [`READ`]'s answer, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadAnswer {
    /// The key as stored; for a ReadReserve, with the reservation's base.
    Read(Stored, Option<Version>),
    /// Refused: the fence holds a newer epoch.
    Stale(Epoch),
    /// A ReadReserve whose id was cancelled by a resolution: it did not and never will happen.
    Cancelled,
    /// A replayed or resolved ReadReserve whose key has since been written past its
    /// reservation, or reserved again: the reservation has no effect left, so it is answered as
    /// not done.
    Moved,
}

/// Decodes [`READ`]'s answer.
pub fn decode_read(v: Value) -> Result<ReadAnswer, String> {
    let malformed = |v: &dyn std::fmt::Debug| format!("malformed read answer {v:?}");
    let Value::Array(items) = v else {
        return Err(malformed(&v));
    };
    let text = |v: &Value| v.as_str().map(|s| s.to_string());
    let num = |v: &Value| text(v).and_then(|s| s.parse::<i64>().ok());
    match items.first().and_then(text).as_deref() {
        Some("stale") => match items.get(1).and_then(num) {
            Some(e) if e >= 0 => Ok(ReadAnswer::Stale(e as u64)),
            _ => Err(malformed(&items)),
        },
        Some("cancelled") if items.len() == 1 => Ok(ReadAnswer::Cancelled),
        Some("moved") if items.len() == 1 => Ok(ReadAnswer::Moved),
        Some("ok") if items.len() == 4 || items.len() == 5 => {
            let (Some(version), Some(ttl)) = (num(&items[1]), num(&items[2])) else {
                return Err(malformed(&items));
            };
            let value = match &items[3] {
                Value::Null => None,
                Value::Bytes(b) => Some(b.clone()),
                Value::String(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
                other => return Err(malformed(other)),
            };
            let base = match items.get(4).map(num) {
                None => None,
                Some(Some(base)) if base >= 0 => Some(base as u64),
                Some(_) => return Err(malformed(&items)),
            };
            let stored = Stored {
                version: version.max(0) as u64,
                ttl_left_ms: value.as_ref().and((ttl >= 0).then_some(ttl as u64)),
                value,
            };
            Ok(ReadAnswer::Read(stored, base))
        }
        _ => Err(malformed(&items)),
    }
}

/// How a script call failed.
#[derive(Debug)]
enum CallError {
    /// Not sent: there is no connection.
    NotSent(String),
    /// Sent, or maybe sent: the outcome is unknown.
    Unknown(String),
}

/// One node's connection to Redis as the cache's memory.
pub struct RedisMemory {
    /// The client: one connection, reconnected in the background with backoff.
    client: Client,
    /// As given in `--cache-backend`, for error messages.
    url: String,
    /// `syncd:cache:<cluster id>:`.
    prefix: String,
    /// `<node>:<incarnation>`: with the epoch and the memory op id, a write id never used
    /// before by any run of any node.
    writer: String,
    read: Script,
    write: Script,
    write_back: Script,
    resolve: Script,
}

/// What a [`READ`] call does beyond reading.
#[derive(Clone, Copy, Debug)]
enum ReadMode {
    /// A Read: nothing.
    Plain,
    /// ReadReserve `id`: reserves `block` versions.
    Reserve { id: MemOpId, block: u64 },
    /// Settles ReadReserve `id` whose outcome is unknown.
    Resolve { id: MemOpId },
}

impl RedisMemory {
    /// Creates the client and starts connecting in the background: the node starts even when
    /// Redis is down, and memory requests fail UNAVAILABLE until it is up.
    pub fn connect(url: &str, cluster_id: &str, node: u64) -> Result<Arc<Self>, BadUrl> {
        check_url(url)?;
        let bad = |e: Error| BadUrl {
            url: url.to_string(),
            why: e.details().to_string(),
        };
        let mut config = Config::from_url(url).map_err(bad)?;
        // Keep reconnecting (the first connection too) instead of giving up.
        config.fail_fast = false;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = COMMAND_TIMEOUT;
                c.internal_command_timeout = COMMAND_TIMEOUT;
                // A command whose connection drops is not sent again on the next one: the
                // shell resolves it by its id instead.
                c.max_command_attempts = 1;
                // A Redis that stops answering (hung, or a network that drops packets) has its
                // connection closed and reconnected: requests then fail at once as not sent,
                // rather than each one waiting out its timeout and becoming ambiguous.
                c.unresponsive = UnresponsiveConfig {
                    max_timeout: Some(COMMAND_TIMEOUT),
                    interval: Duration::from_millis(100),
                };
            })
            .with_performance_config(|p| p.default_command_timeout = COMMAND_TIMEOUT)
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                RECONNECT_MIN_MS,
                RECONNECT_MAX_MS,
                2,
            ))
            .build()
            .map_err(bad)?;
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let memory = Arc::new(RedisMemory {
            client,
            url: url.to_string(),
            prefix: format!("syncd:cache:{cluster_id}:"),
            writer: format!("{node}:{incarnation}"),
            read: Script::from_lua(READ),
            write: Script::from_lua(WRITE),
            write_back: Script::from_lua(WRITE_BACK),
            resolve: Script::from_lua(RESOLVE),
        });
        // The task drives the connection until the client is dropped; its errors are
        // reconnection attempts, reported to callers as UNAVAILABLE.
        drop(memory.client.connect());
        Ok(memory)
    }

    /// Waits up to `timeout` for the connection (for tests and tools; the runtime never waits:
    /// requests fail UNAVAILABLE until Redis is reachable). Whether it is connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.client.is_connected() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// The URL, for Status and messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The version memory holds for `key` (0 if never written), read without the fence: for the
    /// State call, which only reports it.
    pub async fn version_of(&self, key: &str) -> Result<u64, String> {
        if !self.client.is_connected() {
            return Err(format!("redis at {} unreachable", self.url));
        }
        let v: Option<u64> = timed(self.client.hget(self.key(key), "version"))
            .await
            .map_err(|e| format!("redis at {}: {}", self.url, e.details()))?;
        Ok(v.unwrap_or(0))
    }

    fn key(&self, key: &str) -> String {
        format!("{}k:{key}", self.prefix)
    }

    fn done_key(&self, epoch: Epoch, id: MemOpId) -> String {
        format!("{}done:{}:{epoch}:{id}", self.prefix, self.writer)
    }

    /// Runs a request. `None` means the outcome of a request that changes memory (anything but
    /// a plain read) could not be learnt before `still_wanted` turned false (the directory that
    /// asked is gone): it goes unanswered.
    pub async fn run(
        &self,
        req: &MemoryRequest,
        still_wanted: impl Fn() -> bool,
    ) -> Option<Result<MemoryReply, MemoryError>> {
        let unavailable = |why: String| Some(Err(MemoryError::Unavailable(why)));
        let (epoch, id) = (req.epoch, req.id);
        let done = self.done_key(epoch, id);
        let sent = match &req.op {
            MemoryOp::Read { key } => {
                return match self.read_key(epoch, key, ReadMode::Plain).await {
                    // A read changes nothing but the fence, so any failure is a plain refusal.
                    Err(CallError::NotSent(why) | CallError::Unknown(why)) => unavailable(why),
                    Ok(answer) => Some(self.read_reply(req, Ok(answer))),
                };
            }
            MemoryOp::ReadReserve { key, block } => {
                let mode = ReadMode::Reserve { id, block: *block };
                let answer = match self.read_key(epoch, key, mode).await {
                    Ok(answer) => Ok(answer),
                    Err(CallError::NotSent(why)) => return unavailable(why),
                    Err(CallError::Unknown(why)) => {
                        tracing::warn!(
                            key,
                            why,
                            "cache read-reserve outcome unknown; resolving it"
                        );
                        self.settle_read_reserve(epoch, id, key, still_wanted)
                            .await?
                    }
                };
                return Some(self.read_reply(req, answer));
            }
            MemoryOp::Write { key, write } => self.write_key(epoch, key, write, None, &done).await,
            MemoryOp::WriteReserve { key, write, block } => {
                self.write_key(epoch, key, write, Some(*block), &done).await
            }
            MemoryOp::WriteBack {
                key,
                version,
                value,
            } => {
                let keys = vec![self.key(key), format!("{}epoch", self.prefix), done];
                let args = vec![
                    Value::from(epoch as i64),
                    Value::from(version.to_string()),
                    Value::Bytes(value.clone()),
                    Value::from(DONE_TTL.as_millis() as i64),
                ];
                self.call(&self.write_back, keys, args)
                    .await
                    .map(|v| self.write_answer(v))
            }
        };
        let answer = match sent {
            Ok(answer) => answer,
            Err(CallError::NotSent(why)) => return unavailable(why),
            Err(CallError::Unknown(why)) => {
                tracing::warn!(why, "cache write outcome unknown; resolving it");
                self.settle(epoch, id, still_wanted).await?
            }
        };
        Some(self.write_reply(req, answer))
    }

    /// Memory's answer to a Read or ReadReserve `req` from [`READ`]'s decoded answer.
    fn read_reply(
        &self,
        req: &MemoryRequest,
        answer: Result<ReadAnswer, String>,
    ) -> Result<MemoryReply, MemoryError> {
        let unavailable = |why: String| Err(MemoryError::Unavailable(why));
        match (answer, &req.op) {
            (Ok(ReadAnswer::Read(stored, None)), MemoryOp::Read { .. }) => {
                Ok(MemoryReply::Read(stored))
            }
            (Ok(ReadAnswer::Read(stored, Some(base))), MemoryOp::ReadReserve { .. }) => {
                Ok(MemoryReply::ReadReserved(stored, base))
            }
            (Ok(ReadAnswer::Stale(newer)), _) => unavailable(self.stale(req.epoch, newer)),
            (Ok(ReadAnswer::Cancelled), _) => unavailable(format!(
                "redis at {} did not confirm the read-reserve in time; it was cancelled",
                self.url
            )),
            (Ok(ReadAnswer::Moved), _) => unavailable(format!(
                "redis at {} did not confirm the read-reserve in time, and the key has been \
                 written past its reservation or reserved again since",
                self.url
            )),
            (Ok(other), op) => unavailable(self.unexpected(&other, op)),
            (Err(why), _) => unavailable(why),
        }
    }

    /// Memory's answer to a Write, WriteReserve or WriteBack `req` from the decoded answer of
    /// [`WRITE`], [`WRITE_BACK`] or [`RESOLVE`].
    fn write_reply(
        &self,
        req: &MemoryRequest,
        answer: Result<WriteAnswer, String>,
    ) -> Result<MemoryReply, MemoryError> {
        let unavailable = |why: String| Err(MemoryError::Unavailable(why));
        match (answer, &req.op) {
            (Ok(WriteAnswer::Written(w)), MemoryOp::Write { .. }) => Ok(MemoryReply::Written(w)),
            (Ok(WriteAnswer::Reserved(w, base)), MemoryOp::WriteReserve { .. }) => {
                Ok(MemoryReply::WrittenReserved(w, base))
            }
            (Ok(WriteAnswer::WroteBack { applied }), MemoryOp::WriteBack { .. }) => {
                Ok(MemoryReply::WrittenBack { applied })
            }
            (
                Ok(WriteAnswer::Duplicate(w)),
                MemoryOp::Write { .. } | MemoryOp::WriteReserve { .. },
            ) => Ok(MemoryReply::Duplicate(w)),
            (Ok(WriteAnswer::Expired), _) => Err(MemoryError::Expired(format!(
                "the write's request header is older than redis at {} remembers for its \
                 client; it was not applied now (use a new sequence number)",
                self.url
            ))),
            (Ok(WriteAnswer::Stale(newer)), _) => unavailable(self.stale(req.epoch, newer)),
            (Ok(WriteAnswer::Cancelled), _) => unavailable(format!(
                "redis at {} did not confirm the write in time; it was cancelled",
                self.url
            )),
            (Ok(other), op) => unavailable(self.unexpected(&other, op)),
            (Err(why), _) => unavailable(why),
        }
    }

    /// An answer of the wrong kind for its request (the scripts never give one: a request's id
    /// is its own).
    fn unexpected(&self, answer: &dyn std::fmt::Debug, op: &MemoryOp) -> String {
        let kind = match op {
            MemoryOp::Read { .. } => "read",
            MemoryOp::ReadReserve { .. } => "read-reserve",
            MemoryOp::Write { .. } => "write",
            MemoryOp::WriteReserve { .. } => "write-reserve",
            MemoryOp::WriteBack { .. } => "write-back",
        };
        format!(
            "unexpected answer {answer:?} from redis at {} to a {kind}",
            self.url
        )
    }

    fn stale(&self, epoch: Epoch, newer: Epoch) -> String {
        format!(
            "stale epoch: redis at {} is fenced at directory epoch {newer}, this request is of \
             epoch {epoch}",
            self.url
        )
    }

    /// Settles write `id` of `epoch` (a Write, WriteReserve or WriteBack) whose outcome is
    /// unknown: runs [`RESOLVE`] until Redis answers, while the answer is still wanted (`None`
    /// once it is not). Afterwards the write either happened (its result) or never will
    /// ([`WriteAnswer::Cancelled`]).
    pub async fn settle(
        &self,
        epoch: Epoch,
        id: MemOpId,
        still_wanted: impl Fn() -> bool,
    ) -> Option<Result<WriteAnswer, String>> {
        let done = self.done_key(epoch, id);
        let args = || vec![Value::from(DONE_TTL.as_millis() as i64)];
        let v = until_answered(still_wanted, || {
            self.call(&self.resolve, vec![done.clone()], args())
        })
        .await?;
        Some(self.write_answer(v))
    }

    /// Settles ReadReserve `id` of `epoch` on `key` whose outcome is unknown, as [`settle`]
    /// does for a write but with [`READ`] in its `resolve` mode: the key read again with the
    /// reservation's base if it happened (or [`ReadAnswer::Moved`]), else
    /// [`ReadAnswer::Cancelled`].
    ///
    /// [`settle`]: RedisMemory::settle
    pub async fn settle_read_reserve(
        &self,
        epoch: Epoch,
        id: MemOpId,
        key: &str,
        still_wanted: impl Fn() -> bool,
    ) -> Option<Result<ReadAnswer, String>> {
        until_answered(still_wanted, || {
            self.read_key(epoch, key, ReadMode::Resolve { id })
        })
        .await
        .map(Ok)
    }

    fn write_answer(&self, v: Value) -> Result<WriteAnswer, String> {
        match v.as_str() {
            Some(s) => decode_write(&s),
            None => Err(format!(
                "unexpected answer from redis at {}: {v:?}",
                self.url
            )),
        }
    }

    /// Runs [`READ`] in `mode`. An answer that does not decode counts as unknown: for a
    /// ReadReserve it is then resolved.
    async fn read_key(
        &self,
        epoch: Epoch,
        key: &str,
        mode: ReadMode,
    ) -> Result<ReadAnswer, CallError> {
        let mut keys = vec![self.key(key), format!("{}epoch", self.prefix)];
        let mut args = vec![Value::from(epoch as i64)];
        let (id, block, resolve) = match mode {
            ReadMode::Plain => (None, 0, ""),
            ReadMode::Reserve { id, block } => (Some(id), block, ""),
            ReadMode::Resolve { id } => (Some(id), 0, "resolve"),
        };
        if let Some(id) = id {
            keys.push(self.done_key(epoch, id));
            args.extend([
                Value::from(block.to_string()),
                Value::from(DONE_TTL.as_millis() as i64),
                Value::from(resolve),
            ]);
        }
        let v = self.call(&self.read, keys, args).await?;
        decode_read(v).map_err(CallError::Unknown)
    }

    async fn write_key(
        &self,
        epoch: Epoch,
        key: &str,
        write: &Write,
        block: Option<u64>,
        done: &str,
    ) -> Result<Result<WriteAnswer, String>, CallError> {
        let keys = vec![
            self.key(key),
            format!("{}seq", self.prefix),
            format!("{}epoch", self.prefix),
            done.to_string(),
            format!(
                "{}client:{}",
                self.prefix,
                write.tag.map_or(0, |t| t.client_id)
            ),
        ];
        let (kind, value, ttl) = match &write.mutation {
            Mutation::Set { value, ttl_ms } => (
                "set",
                Value::Bytes(value.clone()),
                ttl_ms.map_or(Value::from(""), |t| Value::from(t as i64)),
            ),
            Mutation::Delete => ("del", Value::from(""), Value::from("")),
        };
        let expect = write
            .expect
            .map_or(Value::from(""), |v| Value::from(v.to_string()));
        let args = vec![
            Value::from(epoch as i64),
            Value::from(kind),
            expect,
            value,
            ttl,
            Value::from(DONE_TTL.as_millis() as i64),
            write
                .tag
                .map_or(Value::from(""), |t| Value::from(t.sequence.to_string())),
            Value::from(write.tag.map_or(0, |t| t.lowest_unacked).to_string()),
            Value::from(CLIENT_RESULTS as i64),
            block.map_or(Value::from(""), |b| Value::from(b.to_string())),
        ];
        let v = self.call(&self.write, keys, args).await?;
        Ok(self.write_answer(v))
    }

    /// EVALSHA, or EVAL when Redis does not know the script (after a restart): NOSCRIPT means
    /// the script did not run, so running it again is safe.
    async fn call(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, CallError> {
        if !self.client.is_connected() {
            return Err(CallError::NotSent(format!(
                "redis at {} unreachable: not connected (reconnecting in the background)",
                self.url
            )));
        }
        let mut argv: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
        argv.push(Value::from(script.sha1().clone()));
        argv.push(Value::from(keys.len() as i64));
        argv.extend(keys.into_iter().map(Value::from));
        argv.extend(args);
        let unknown =
            |e: Error| CallError::Unknown(format!("redis at {}: {}", self.url, e.details()));
        let evalsha = CustomCommand::new_static("EVALSHA", ClusterHash::FirstKey, false);
        match timed(self.client.custom::<Value, Value>(evalsha, argv.clone())).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                argv[0] = Value::from(script.lua().map(|l| l.to_string()).unwrap_or_default());
                let eval = CustomCommand::new_static("EVAL", ClusterHash::FirstKey, false);
                timed(self.client.custom::<Value, Value>(eval, argv))
                    .await
                    .map_err(unknown)
            }
            other => other.map_err(unknown),
        }
    }
}

/// Runs `attempt` until Redis answers it, with backoff, while the answer is still wanted
/// (`None` once it is not): how an ambiguous request is settled.
async fn until_answered<T, F: Future<Output = Result<T, CallError>>>(
    still_wanted: impl Fn() -> bool,
    attempt: impl Fn() -> F,
) -> Option<T> {
    let mut pause = RESOLVE_MIN;
    while still_wanted() {
        match attempt().await {
            Ok(answer) => return Some(answer),
            Err(CallError::NotSent(why) | CallError::Unknown(why)) => {
                tracing::debug!(why, "cache memory resolution failed; retrying");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RESOLVE_MAX);
    }
    None
}

/// Bounds a command by [`COMMAND_TIMEOUT`] on top of the client's own timeout, in case a
/// command waits in the client's queue for a connection that does not come back.
async fn timed<T>(f: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    match tokio::time::timeout(COMMAND_TIMEOUT + Duration::from_millis(500), f).await {
        Ok(r) => r,
        Err(_) => Err(Error::new(ErrorKind::Timeout, "no answer in time")),
    }
}

impl std::fmt::Debug for RedisMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMemory")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_redis_urls_are_accepted() {
        for ok in [
            "redis://127.0.0.1:6379",
            "redis://localhost:6390/2",
            "redis://[::1]:6379",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("rediss://h:1", "not a redis://"),
            ("redis://h", "port is missing"),
            ("redis://:6379", "host is missing"),
            ("redis://h:0", "port must be"),
            ("redis://h:x", "port must be"),
            ("redis://u:p@h:1", "credentials"),
            ("redis://h:1/x", "database must be"),
        ] {
            let e = check_url(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn write_answers_decode_and_malformed_ones_are_errors() {
        assert_eq!(
            decode_write("applied 7 1"),
            Ok(WriteAnswer::Written(WriteResult::Applied {
                version: 7,
                existed: true
            }))
        );
        assert_eq!(
            decode_write("mismatch 3"),
            Ok(WriteAnswer::Written(WriteResult::Mismatch { current: 3 }))
        );
        assert_eq!(decode_write("stale 9"), Ok(WriteAnswer::Stale(9)));
        assert_eq!(decode_write("cancelled"), Ok(WriteAnswer::Cancelled));
        assert_eq!(decode_write("expired"), Ok(WriteAnswer::Expired));
        assert_eq!(
            decode_write("duplicate applied 7 0"),
            Ok(WriteAnswer::Duplicate(WriteResult::Applied {
                version: 7,
                existed: false
            }))
        );
        assert_eq!(
            decode_write("duplicate mismatch 2"),
            Ok(WriteAnswer::Duplicate(WriteResult::Mismatch { current: 2 }))
        );
        for bad in [
            "",
            "applied",
            "applied 7 2",
            "applied x 1",
            "mismatch",
            "ok 1",
            "cancelled 1",
            "duplicate cancelled",
            "duplicate duplicate applied 1 1",
            "expired 3",
        ] {
            assert!(decode_write(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn write_back_and_reservation_answers_decode() {
        assert_eq!(
            decode_write("applied 7 1 base 7"),
            Ok(WriteAnswer::Reserved(
                WriteResult::Applied {
                    version: 7,
                    existed: true
                },
                7
            ))
        );
        assert_eq!(
            decode_write("mismatch 3 base 9"),
            Ok(WriteAnswer::Reserved(
                WriteResult::Mismatch { current: 3 },
                9
            ))
        );
        assert_eq!(
            decode_write("wrote_back"),
            Ok(WriteAnswer::WroteBack { applied: true })
        );
        assert_eq!(
            decode_write("refused"),
            Ok(WriteAnswer::WroteBack { applied: false })
        );
        for bad in [
            "applied 7 1 base",
            "applied 7 1 base x",
            "applied 7 1 base 7 8",
            "applied 7 1 limit 7",
            "duplicate applied 7 1 base 7",
            "stale 3 base 4",
            "refused 1",
            "wrote_back base 3",
        ] {
            assert!(decode_write(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn read_answers_decode_values_tombstones_ttls_and_bases() {
        let arr = |v: Vec<Value>| Value::Array(v);
        let s = |s: &str| Value::from(s);
        let stored = Stored {
            version: 4,
            value: Some(Bytes::from("v")),
            ttl_left_ms: Some(250),
        };
        assert_eq!(
            decode_read(arr(vec![
                s("ok"),
                s("4"),
                s("250"),
                Value::Bytes("v".into())
            ])),
            Ok(ReadAnswer::Read(stored.clone(), None))
        );
        assert_eq!(
            decode_read(arr(vec![
                s("ok"),
                s("4"),
                s("250"),
                Value::Bytes("v".into()),
                s("12")
            ])),
            Ok(ReadAnswer::Read(stored, Some(12)))
        );
        assert_eq!(
            decode_read(arr(vec![s("ok"), s("5"), s("-1"), Value::Null])),
            Ok(ReadAnswer::Read(
                Stored {
                    version: 5,
                    value: None,
                    ttl_left_ms: None
                },
                None
            ))
        );
        assert_eq!(
            decode_read(arr(vec![s("stale"), s("3")])),
            Ok(ReadAnswer::Stale(3))
        );
        assert_eq!(
            decode_read(arr(vec![s("cancelled")])),
            Ok(ReadAnswer::Cancelled)
        );
        assert_eq!(decode_read(arr(vec![s("moved")])), Ok(ReadAnswer::Moved));
        assert!(decode_read(s("ok")).is_err());
        assert!(decode_read(arr(vec![s("ok"), s("x"), s("-1"), Value::Null])).is_err());
        assert!(decode_read(arr(vec![s("ok"), s("1"), s("-1"), Value::Null, s("x")])).is_err());
        assert!(decode_read(arr(vec![s("moved"), s("1")])).is_err());
    }
}
