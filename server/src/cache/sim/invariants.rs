//! The properties the simulator checks, one function each.
//!
//! The first four are checked after every event, over every line some node would serve as a
//! hit at that instant (valid lease, current session, TTL not run out); the others whenever a
//! client operation completes. Each returns a description of the violation.

use bytes::Bytes;

use super::history::{History, Instant};
use super::memory::SimMemory;
use crate::cache::directory::Holder;
use crate::cache::line::Line;
use crate::cache::{Directory, NodeId, Stored, Version};

/// A line that node `node` would serve as a hit right now.
#[derive(Clone, Copy, Debug)]
pub struct Servable<'a> {
    /// The node.
    pub node: NodeId,
    /// Its line.
    pub line: &'a Line,
}

/// (1) Single writer / multiple readers: never two servable lines of a key in M or E, and
/// never one in M or E beside a servable S.
pub fn single_writer_multiple_readers(key: &str, lines: &[Servable]) -> Result<(), String> {
    let exclusive: Vec<NodeId> = lines
        .iter()
        .filter(|s| s.line.state.is_exclusive())
        .map(|s| s.node)
        .collect();
    if exclusive.is_empty() || lines.len() == 1 {
        return Ok(());
    }
    Err(format!(
        "key {key}: nodes {exclusive:?} serve it exclusively while {} serve it: {}",
        lines.len(),
        describe(lines)
    ))
}

/// (0) The node's published read view serves exactly what its core would serve (after every
/// call into the core, the view is updated before anything else happens).
pub fn view_matches_core(
    key: &str,
    node: NodeId,
    core: Option<&Line>,
    view: Option<&Line>,
) -> Result<(), String> {
    // Everything but the LRU position, which hits from the view move in the core only.
    let same = |a: &Line, b: &Line| {
        (a.state, &a.value, a.version, a.stamp, a.grant, a.expires_at)
            == (b.state, &b.value, b.version, b.stamp, b.grant, b.expires_at)
    };
    let agree = match (core, view) {
        (Some(a), Some(b)) => same(a, b),
        (a, b) => a.is_none() && b.is_none(),
    };
    if agree {
        Ok(())
    } else {
        Err(format!(
            "key {key}: node {node}'s core serves {core:?} but its read view serves {view:?}"
        ))
    }
}

/// (2) Servable lines are never stale: each holds the version memory holds now, or the one
/// just before it while nobody has seen the newer one (no writer was answered with it and no
/// reader returned it). A write's memory request overlaps its invalidations, so memory can be
/// one write ahead of the lines for a while; this says it is never more than that, and never
/// once the write could be known.
pub fn servable_lines_match_memory(
    key: &str,
    lines: &[Servable],
    memory: &SimMemory,
    history: &History,
    now: Instant,
) -> Result<(), String> {
    let current = memory.version(key);
    let seen = |newest: Option<(Version, Instant)>| newest.is_some_and(|(v, _)| v >= current);
    let unseen =
        !seen(history.newest_write_before(key, now)) && !seen(history.newest_read_before(key, now));
    let previous = memory.previous_version(key);
    // Write-back mode: a dirty exclusive line is ahead of memory, inside the key's latest
    // reservation (single writer / multiple readers makes it the only servable line).
    let reservation = memory.reservation(key);
    let dirty_ok = |l: &Line| {
        l.is_dirty()
            && l.state.is_exclusive()
            && l.version > current
            && reservation.is_some_and(|(base, limit)| base < l.version && l.version <= limit)
    };
    let ok = |l: &Line| l.version == current || (unseen && l.version == previous) || dirty_ok(l);
    match lines.iter().find(|s| !ok(s.line)) {
        None => Ok(()),
        Some(s) => Err(format!(
            "key {key}: node {} serves version {} but memory holds version {current} (before \
             it: {previous}, seen by a client: {}); lines: {}",
            s.node,
            s.line.version,
            !unseen,
            describe(lines)
        )),
    }
}

/// (3) The directory covers every servable line of its epoch: it records the node as a holder
/// under the line's session, with a grant at least as new and a state at least as exclusive.
/// (Lines of an older epoch are the new directory's concern only in that it waits them out.)
pub fn directory_covers_servable_lines(
    key: &str,
    lines: &[Servable],
    dir: &Directory,
    dir_now: u64,
) -> Result<(), String> {
    for s in lines.iter().filter(|s| s.line.stamp.epoch == dir.epoch()) {
        let record = dir.holders(key).find(|(n, _)| *n == s.node).map(|(_, h)| h);
        let session = dir.session_of(s.node, dir_now);
        let covered = record.is_some_and(|h| {
            h.grant >= s.line.grant
                && (h.state.is_exclusive() || h.state == s.line.state)
                && session == Some(s.line.stamp.session)
        });
        if !covered {
            return Err(format!(
                "key {key}: node {} serves {:?} (grant {}, session {}) but the directory records \
                 {record:?} with session {session:?}",
                s.node, s.line.state, s.line.grant, s.line.stamp.session
            ));
        }
    }
    Ok(())
}

/// (4) The directory's own records are single-writer / multiple-reader.
pub fn directory_records_are_swmr(key: &str, dir: &Directory) -> Result<(), String> {
    let exclusive = dir
        .holders(key)
        .filter(|(_, h)| h.state.is_exclusive())
        .count();
    if exclusive == 0 || dir.holders(key).count() == 1 {
        return Ok(());
    }
    let holders: Vec<(NodeId, Holder)> = dir.holders(key).collect();
    Err(format!(
        "key {key}: the directory records {exclusive} exclusive holder(s) among {holders:?}"
    ))
}

/// (5) No stale read: a read returns the version of the newest write acknowledged before it
/// began, or a newer one (one written while it ran).
pub fn read_sees_completed_writes(
    h: &History,
    key: &str,
    started: Instant,
    version: Version,
) -> Result<(), String> {
    not_older(
        key,
        started,
        version,
        h.newest_write_before(key, started),
        "acknowledged to its writer",
    )
}

/// (6) Reads do not go back in time: a read returns at least the version of every read that
/// completed before it began, on any node.
pub fn read_sees_completed_reads(
    h: &History,
    key: &str,
    started: Instant,
    version: Version,
) -> Result<(), String> {
    not_older(
        key,
        started,
        version,
        h.newest_read_before(key, started),
        "returned to a reader",
    )
}

/// A read begun at `started` that returned `version` is not older than `newest`, the newest
/// version of `key` `what` before it began (and when).
fn not_older(
    key: &str,
    started: Instant,
    version: Version,
    newest: Option<(Version, Instant)>,
    what: &str,
) -> Result<(), String> {
    match newest {
        Some((newest, at)) if newest > version => Err(format!(
            "key {key}: a read begun at event {started} returned version {version}, but version \
             {newest} was {what} at event {at}"
        )),
        _ => Ok(()),
    }
}

/// (7) No phantom values: a read returns exactly what was written with its version.
pub fn read_value_was_written(memory: &SimMemory, key: &str, read: &Stored) -> Result<(), String> {
    if read.version == 0 {
        return match &read.value {
            None => Ok(()),
            Some(v) => Err(format!("key {key}: version 0 read with value {v:?}")),
        };
    }
    let Some(w) = memory.written(key, read.version) else {
        return Err(format!(
            "key {key}: read version {} that memory never wrote",
            read.version
        ));
    };
    let consistent = match &read.value {
        Some(v) => w.value.as_ref() == Some(v),
        // Absent: deleted, or the value expired.
        None => w.value.is_none() || w.expires_at.is_some(),
    };
    if consistent {
        Ok(())
    } else {
        Err(format!(
            "key {key}: read version {} as {:?}, but it was written as {:?}",
            read.version, read.value, w.value
        ))
    }
}

/// (8) A hit does not serve a value after its TTL ran out, beyond what clock drift allows: the
/// node counts the TTL on its own clock, from before memory started it.
pub fn hit_not_expired(
    memory: &SimMemory,
    key: &str,
    version: Version,
    real_now: u64,
    max_drift_ppm: u64,
) -> Result<(), String> {
    let Some(w) = memory.written(key, version) else {
        return Ok(());
    };
    let (Some(expires_at), Some(ttl)) = (w.expires_at, w.ttl_ms) else {
        return Ok(());
    };
    let tolerance = 2 * ttl * max_drift_ppm / 1_000_000 + 2;
    if real_now < expires_at + tolerance {
        Ok(())
    } else {
        Err(format!(
            "key {key}: version {version} served as a hit at {real_now} ms, but it expired at \
             {expires_at} ms (tolerance {tolerance} ms)"
        ))
    }
}

/// (9) A write that failed as Unavailable left no trace: memory never applied its value (and
/// so, by (2), no line can hold it).
pub fn failed_write_left_no_trace(
    memory: &SimMemory,
    key: &str,
    value: &Bytes,
) -> Result<(), String> {
    if memory.ever_applied(value) {
        Err(format!(
            "key {key}: a write of {value:?} was reported unavailable, but memory applied it"
        ))
    } else {
        Ok(())
    }
}

/// (10) An acknowledged write is the one memory applied with that version (write-back mode: a
/// write acknowledged by the directory; a local write is checked by (11)).
pub fn acknowledged_write_was_applied(
    memory: &SimMemory,
    key: &str,
    version: Version,
    value: Option<&Bytes>,
) -> Result<(), String> {
    match memory.applied(key, version) {
        Some(w) if w.value.as_ref() == value => Ok(()),
        other => Err(format!(
            "key {key}: a write of {value:?} was acknowledged as version {version}, but memory \
             holds {other:?} there"
        )),
    }
}

fn describe(lines: &[Servable]) -> String {
    lines
        .iter()
        .map(|s| {
            format!(
                "node {} {:?} v{} grant {} epoch {} session {}",
                s.node,
                s.line.state,
                s.line.version,
                s.line.grant,
                s.line.stamp.epoch,
                s.line.stamp.session
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// (11) Write-back mode: a version is given to a key once: memory never gives a version a node
/// used for a local write (its reservation), and nodes never reuse one.
pub fn versions_never_reused(memory: &SimMemory) -> Result<(), String> {
    memory.reused.clone().map_or(Ok(()), Err)
}

/// (12) Write-back mode: when the directory gives up on a holder's exclusive line, that holder
/// serves no version memory does not hold: its lease has run out, or it dropped the line when
/// it handed the write over.
pub fn given_up_holder_serves_nothing_newer(
    key: &str,
    node: NodeId,
    line: Option<&Line>,
    memory: &SimMemory,
) -> Result<(), String> {
    match line {
        Some(l) if l.version > memory.version(key) => Err(format!(
            "key {key}: the directory gave up on node {node}'s line, which still serves version \
             {} while memory holds {}",
            l.version,
            memory.version(key)
        )),
        _ => Ok(()),
    }
}

/// (13) Write-back mode: the writes of one node and key that memory does not hold yet (the
/// ones it could lose), and the ones it lost, were all acknowledged within one flush interval
/// (on the node's clock): a line dirty that long takes no more local writes.
pub fn lost_writes_within_flush_interval(
    key: &str,
    node: NodeId,
    acked_at: &[u64],
    flush_ms: u64,
) -> Result<(), String> {
    let (Some(first), Some(last)) = (acked_at.iter().min(), acked_at.iter().max()) else {
        return Ok(());
    };
    if last - first < flush_ms {
        Ok(())
    } else {
        Err(format!(
            "key {key}: node {node} has writes at risk or lost acknowledged from {first} ms to {last} ms, more \
             than the flush interval ({flush_ms} ms)"
        ))
    }
}
