//! The simulated memory: a linearizable key-value store with versions, TTLs and epoch
//! fencing, that takes time and sometimes fails, as the replicated state machine or Redis
//! would. It honours the contract in [`crate::cache::memory`]: a failed request did not and
//! never will take effect.
//!
//! It also keeps the history the invariants need: every version ever written, with its value.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::network::take_due;
use crate::cache::memory::{MemOpId, MemoryError, MemoryOp, MemoryReply, MemoryRequest};
use crate::cache::message::{Mutation, Write, WriteResult, WriteTag};
use crate::cache::{Epoch, Stored, Version};
use crate::raft::rng::SplitMix64;

/// Memory fault and latency settings.
#[derive(Clone, Debug)]
pub struct MemoryFaults {
    /// A request takes effect 1..=max_latency ms after it is sent, and its answer takes as long
    /// again to come back.
    pub max_latency: u64,
    /// Probability that a request is refused (not applied).
    pub fail: f64,
}

/// A key as stored.
#[derive(Clone, Debug)]
struct Record {
    /// The version of the last write (or deletion).
    version: Version,
    /// The value; `None` after a deletion.
    value: Option<Bytes>,
    /// Real time at which the value expires.
    expires_at: Option<u64>,
}

/// A version ever written: its value and expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The value (`None` for a deletion).
    pub value: Option<Bytes>,
    /// Real time at which it expires.
    pub expires_at: Option<u64>,
    /// Its TTL.
    pub ttl_ms: Option<u64>,
}

/// The store.
#[derive(Debug, Default)]
pub struct SimMemory {
    /// Keys as stored now.
    data: BTreeMap<String, Record>,
    /// The last version given out (a global counter, like a commit index).
    last_version: Version,
    /// Requests of an epoch older than this fail (a new leader took over).
    fence: Epoch,
    /// Requests accepted, taking effect at the given real time.
    pending: Vec<(u64, MemoryRequest)>,
    /// Answers on their way back: `(deliver_at, epoch, id, result)`.
    answers: Vec<(u64, Epoch, MemOpId, Result<MemoryReply, MemoryError>)>,
    /// Every version written, by key.
    history: BTreeMap<(String, Version), Written>,
    /// Per key, the version it had before its last write (0: none).
    previous: BTreeMap<String, Version>,
    /// Until this real time, every request fails (an outage).
    outage_until: u64,
    /// The result of every tagged write applied, by tag (contract rule 6).
    applied_tags: BTreeMap<WriteTag, WriteResult>,
    /// Retries answered as duplicates.
    pub duplicates: u64,
    /// Write-back mode: per key, the latest reservation `(base, limit)` (contract rule 6).
    reserved: BTreeMap<String, (Version, Version)>,
    /// Write-back writes applied.
    pub write_backs: u64,
    /// Every reservation ever made, by key: `(base, limit)`.
    blocks: BTreeMap<String, Vec<(Version, Version)>>,
    /// Versions written locally by nodes (write-back mode), by key and version, for the
    /// checks: a value read may have been written there rather than in memory.
    local: BTreeMap<(String, Version), Written>,
    /// The first time a version was given twice to a key, if ever.
    pub reused: Option<String>,
}

impl SimMemory {
    /// Accepts a request from the directory at `now`.
    pub fn submit(
        &mut self,
        rng: &mut SplitMix64,
        faults: &MemoryFaults,
        now: u64,
        req: MemoryRequest,
    ) {
        let latency = 1 + rng.below(faults.max_latency);
        if now < self.outage_until || rng.chance(faults.fail) {
            self.refuse(
                now + latency,
                req,
                "memory refused the request (simulated failure)",
            );
            return;
        }
        self.pending.push((now + latency, req));
    }

    /// Applies the requests due by `now`, in random order, and queues their answers.
    pub fn step(&mut self, rng: &mut SplitMix64, faults: &MemoryFaults, now: u64) {
        let mut due = take_due(&mut self.pending, now, |_| true);
        rng.shuffle(&mut due);
        for req in due {
            let back = now + 1 + rng.below(faults.max_latency);
            if req.epoch < self.fence {
                self.refuse(back, req, "a newer epoch has taken over memory");
                continue;
            }
            let (id, epoch) = (req.id, req.epoch);
            let reply = self.apply(now, req.op);
            self.answers.push((back, epoch, id, reply));
        }
    }

    /// Answers due by `now` to the directory of `epoch` (answers to older directories are
    /// lost with them).
    pub fn take_answers(
        &mut self,
        now: u64,
        epoch: Epoch,
    ) -> Vec<(MemOpId, Result<MemoryReply, MemoryError>)> {
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.answers)
            .into_iter()
            .partition(|a| a.0 <= now);
        self.answers = rest;
        due.into_iter()
            .filter(|a| a.1 == epoch)
            .map(|a| (a.2, a.3))
            .collect()
    }

    /// A new directory of `epoch` takes over: every request of an older epoch still pending
    /// is decided now, applied or dropped at random (a new Raft leader commits or truncates
    /// the old leader's entries before its own), and later ones fail.
    pub fn fence(&mut self, rng: &mut SplitMix64, now: u64, epoch: Epoch) {
        self.fence = self.fence.max(epoch);
        for (at, req) in std::mem::take(&mut self.pending) {
            if req.epoch >= epoch {
                self.pending.push((at, req));
            } else if rng.chance(0.5) {
                let _ = self.apply(now, req.op);
            }
        }
    }

    /// Fails every request for `ms` from `now`.
    pub fn outage(&mut self, now: u64, ms: u64) {
        self.outage_until = now + ms;
    }

    /// Ends any outage.
    pub fn heal(&mut self) {
        self.outage_until = 0;
    }

    /// The current version of `key` (0 if never written).
    pub fn version(&self, key: &str) -> Version {
        self.data.get(key).map_or(0, |r| r.version)
    }

    /// The version `key` had before its last write (0 if none).
    pub fn previous_version(&self, key: &str) -> Version {
        self.previous.get(key).copied().unwrap_or(0)
    }

    /// What was written as `version` of `key`, in memory or locally by a node.
    pub fn written(&self, key: &str, version: Version) -> Option<&Written> {
        let k = (key.to_string(), version);
        self.history.get(&k).or_else(|| self.local.get(&k))
    }

    /// What memory itself applied as `version` of `key`.
    pub fn applied(&self, key: &str, version: Version) -> Option<&Written> {
        self.history.get(&(key.to_string(), version))
    }

    /// True if a write of `value` was ever applied.
    pub fn ever_applied(&self, value: &Bytes) -> bool {
        self.history
            .values()
            .any(|w| w.value.as_ref() == Some(value))
    }

    fn refuse(&mut self, at: u64, req: MemoryRequest, why: &str) {
        self.answers.push((
            at,
            req.epoch,
            req.id,
            Err(MemoryError::Unavailable(why.to_string())),
        ));
    }

    /// The latest reservation of `key` (base, limit), if any.
    pub fn reservation(&self, key: &str) -> Option<(Version, Version)> {
        self.reserved.get(key).copied()
    }

    /// Reserves `block` versions of `key` above both its version and every earlier
    /// reservation; returns the base.
    fn reserve(&mut self, key: &str, block: u64) -> Version {
        let floor = self.reserved.get(key).map_or(0, |r| r.1);
        let base = self.version(key).max(floor);
        self.reserved.insert(key.to_string(), (base, base + block));
        self.blocks
            .entry(key.to_string())
            .or_default()
            .push((base, base + block));
        base
    }

    /// A node acknowledged a local write of `value` as `version` of `key`.
    pub fn record_local(&mut self, key: &str, version: Version, value: Bytes) {
        let k = (key.to_string(), version);
        if self.history.contains_key(&k) || self.local.contains_key(&k) {
            self.reused.get_or_insert(format!(
                "key {key}: a node wrote version {version} locally, which was given before"
            ));
        }
        let w = Written {
            value: Some(value),
            expires_at: None,
            ttl_ms: None,
        };
        self.local.insert(k, w);
    }

    /// True if memory holds `version` of `key` or a later version written back from the same
    /// reservation: the local write of `version` is durable.
    pub fn written_back(&self, key: &str, version: Version) -> bool {
        let Some(&(_, limit)) = self.blocks.get(key).and_then(|b| {
            b.iter()
                .find(|&&(base, limit)| base < version && version <= limit)
        }) else {
            return false;
        };
        self.history
            .range((key.to_string(), version)..=(key.to_string(), limit))
            .next()
            .is_some()
    }

    fn apply(&mut self, now: u64, op: MemoryOp) -> Result<MemoryReply, MemoryError> {
        Ok(match op {
            MemoryOp::ReadReserve { key, block } => {
                let stored = self.read(now, &key);
                let base = self.reserve(&key, block);
                MemoryReply::ReadReserved(stored, base)
            }
            MemoryOp::WriteReserve { key, write, block } => match self.apply(
                now,
                MemoryOp::Write {
                    key: key.clone(),
                    write,
                },
            )? {
                MemoryReply::Written(result) => {
                    MemoryReply::WrittenReserved(result, self.reserve(&key, block))
                }
                other => other,
            },
            MemoryOp::WriteBack {
                key,
                version,
                value,
            } => {
                let inside = self
                    .reservation(&key)
                    .is_some_and(|(base, limit)| version > base && version <= limit);
                if !inside || version <= self.version(&key) {
                    return Ok(MemoryReply::WrittenBack { applied: false });
                }
                self.write_backs += 1;
                self.put(key, version, Some(value), None, now);
                MemoryReply::WrittenBack { applied: true }
            }
            MemoryOp::Read { key } => MemoryReply::Read(self.read(now, &key)),
            MemoryOp::Write { key, write } => {
                if let Some(first) = write.tag.and_then(|t| self.applied_tags.get(&t)) {
                    self.duplicates += 1;
                    return Ok(MemoryReply::Duplicate(*first));
                }
                let tag = write.tag;
                let result = self.write(now, key, write);
                if let Some(t) = tag {
                    self.applied_tags.insert(t, result);
                }
                MemoryReply::Written(result)
            }
        })
    }

    /// Stores `version` of `key`, keeping the history.
    fn put(
        &mut self,
        key: String,
        version: Version,
        value: Option<Bytes>,
        ttl_ms: Option<u64>,
        now: u64,
    ) {
        let expires_at = ttl_ms.map(|t| now + t);
        let before = self.version(&key);
        if let Some(local) = self.local.get(&(key.clone(), version))
            && local.value != value
        {
            self.reused.get_or_insert(format!(
                "key {key}: memory gave version {version} to {value:?}, but a node had written \
                 it locally as {:?}",
                local.value
            ));
        }
        self.history.insert(
            (key.clone(), version),
            Written {
                value: value.clone(),
                expires_at,
                ttl_ms,
            },
        );
        self.previous.insert(key.clone(), before);
        self.data.insert(
            key,
            Record {
                version,
                value,
                expires_at,
            },
        );
    }

    /// Applies a write (its tag already checked).
    fn write(&mut self, now: u64, key: String, write: Write) -> WriteResult {
        let current = self.read(now, &key);
        let live_version = if current.value.is_some() {
            current.version
        } else {
            0
        };
        if let Some(expected) = write.expect
            && expected != live_version
        {
            return WriteResult::Mismatch {
                current: live_version,
            };
        }
        // Above every version reserved for the key: a holder may have given those to clients.
        let floor = self.reserved.get(&key).map_or(0, |r| r.1);
        self.last_version = (self.last_version + 1).max(floor + 1);
        let version = self.last_version;
        let (value, ttl_ms) = match write.mutation {
            Mutation::Set { value, ttl_ms } => (Some(value), ttl_ms),
            Mutation::Delete => (None, None),
        };
        self.put(key, version, value, ttl_ms, now);
        WriteResult::Applied {
            version,
            existed: current.value.is_some(),
        }
    }

    fn read(&self, now: u64, key: &str) -> Stored {
        match self.data.get(key) {
            None => Stored {
                version: 0,
                value: None,
                ttl_left_ms: None,
            },
            Some(r) if r.expires_at.is_some_and(|t| now >= t) => Stored {
                version: r.version,
                value: None,
                ttl_left_ms: None,
            },
            Some(r) => Stored {
                version: r.version,
                value: r.value.clone(),
                ttl_left_ms: r.expires_at.map(|t| t - now),
            },
        }
    }
}
