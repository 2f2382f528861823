//! The Redis memory scripts against a real `redis-server` (the Debian package; each test starts
//! its own on a free port): the memory contract of `syncd::cache::memory`, one rule per test.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sync_tests::redis::RedisServer;
use syncd::cache::Stored;
use syncd::cache::memory::{MemOpId, MemoryError, MemoryOp, MemoryReply, MemoryRequest};
use syncd::cache::message::{Mutation, Write, WriteResult, WriteTag};
use syncd::node::cache::redis_memory::{ReadAnswer, RedisMemory, WriteAnswer};

/// A running Redis and a node's memory client connected to it.
async fn memory() -> (RedisServer, Arc<RedisMemory>) {
    let redis = RedisServer::start().await.expect("redis-server");
    let memory = RedisMemory::connect(&redis.url(), "test", 1).expect("client");
    assert!(memory.wait_connected(Duration::from_secs(10)).await);
    (redis, memory)
}

fn set(key: &str, value: &str, expect: Option<u64>) -> MemoryOp {
    MemoryOp::Write {
        key: key.into(),
        write: Write {
            expect,
            ..Write::set(value.to_string())
        },
    }
}

fn set_with_ttl(key: &str, value: &str, ttl_ms: u64) -> MemoryOp {
    MemoryOp::Write {
        key: key.into(),
        write: Write::set_with_ttl(value.to_string(), ttl_ms),
    }
}

fn delete(key: &str) -> MemoryOp {
    MemoryOp::Write {
        key: key.into(),
        write: Write {
            mutation: Mutation::Delete,
            expect: None,
            tag: None,
        },
    }
}

fn read(key: &str) -> MemoryOp {
    MemoryOp::Read { key: key.into() }
}

/// Runs `op` as request `id` of `epoch` and returns memory's answer.
async fn run(
    m: &RedisMemory,
    epoch: u64,
    id: MemOpId,
    op: MemoryOp,
) -> Result<MemoryReply, MemoryError> {
    m.run(&MemoryRequest { id, epoch, op }, || true)
        .await
        .expect("answered while Redis is up")
}

async fn applied(m: &RedisMemory, epoch: u64, id: MemOpId, op: MemoryOp) -> (u64, bool) {
    match run(m, epoch, id, op).await {
        Ok(MemoryReply::Written(WriteResult::Applied { version, existed })) => (version, existed),
        other => panic!("expected an applied write, got {other:?}"),
    }
}

async fn stored(m: &RedisMemory, epoch: u64, id: MemOpId, key: &str) -> Stored {
    match run(m, epoch, id, read(key)).await {
        Ok(MemoryReply::Read(s)) => s,
        other => panic!("expected a read, got {other:?}"),
    }
}

#[tokio::test]
async fn a_key_never_written_reads_as_version_zero_and_a_write_is_read_back() {
    let (_redis, m) = memory().await;
    let s = stored(&m, 1, 1, "k").await;
    assert_eq!((s.version, s.value, s.ttl_left_ms), (0, None, None));
    let (v, existed) = applied(&m, 1, 2, set("k", "v", None)).await;
    assert!(v > 0 && !existed);
    let s = stored(&m, 1, 3, "k").await;
    assert_eq!((s.version, s.value), (v, Some(Bytes::from("v"))));
}

#[tokio::test]
async fn versions_increase_across_deletes_and_a_tombstone_keeps_its_version() {
    let (_redis, m) = memory().await;
    let (v1, _) = applied(&m, 1, 1, set("k", "a", None)).await;
    let (v2, existed) = applied(&m, 1, 2, delete("k")).await;
    assert!(v2 > v1 && existed);
    let s = stored(&m, 1, 3, "k").await;
    assert_eq!(
        (s.version, s.value),
        (v2, None),
        "the tombstone keeps its version"
    );
    let (v3, existed) = applied(&m, 1, 4, delete("k")).await;
    assert!(
        v3 > v2 && !existed,
        "deleting a deleted key is a new version"
    );
    let (v4, _) = applied(&m, 1, 5, set("k", "b", None)).await;
    assert!(v4 > v3);
}

#[tokio::test]
async fn compare_and_set_compares_with_the_tombstones_version() {
    let (_redis, m) = memory().await;
    // A key never written has version 0.
    let (v1, _) = applied(&m, 1, 1, set("k", "a", Some(0))).await;
    let (v2, _) = applied(&m, 1, 2, delete("k")).await;
    // After the delete, 0 no longer matches: the tombstone's version does.
    assert_eq!(
        run(&m, 1, 3, set("k", "b", Some(0))).await,
        Ok(MemoryReply::Written(WriteResult::Mismatch { current: v2 }))
    );
    assert_eq!(
        run(&m, 1, 4, set("k", "b", Some(v1))).await,
        Ok(MemoryReply::Written(WriteResult::Mismatch { current: v2 }))
    );
    let (v3, existed) = applied(&m, 1, 5, set("k", "b", Some(v2))).await;
    assert!(v3 > v2 && !existed);
}

#[tokio::test]
async fn a_request_of_an_older_epoch_is_refused_and_changes_nothing() {
    let (_redis, m) = memory().await;
    let (v, _) = applied(&m, 5, 1, set("k", "new", None)).await;
    let refused = run(&m, 4, 2, set("k", "old", None)).await;
    assert!(
        matches!(&refused, Err(MemoryError::Unavailable(why)) if why.contains("stale epoch")),
        "{refused:?}"
    );
    let refused = run(&m, 4, 3, read("k")).await;
    assert!(
        matches!(refused, Err(MemoryError::Unavailable(_))),
        "{refused:?}"
    );
    let s = stored(&m, 6, 4, "k").await;
    assert_eq!((s.version, s.value), (v, Some(Bytes::from("new"))));
    // The read of epoch 6 raised the fence: epoch 5 is now refused too.
    assert!(run(&m, 5, 5, read("k")).await.is_err());
}

#[tokio::test]
async fn a_replayed_write_id_answers_its_first_result_without_writing_again() {
    let (_redis, m) = memory().await;
    let first = run(&m, 1, 7, set("k", "a", None)).await;
    let (v, _) = applied(&m, 1, 8, set("other", "x", None)).await;
    // The same id again, even with another value: the first result, nothing written.
    let replay = run(&m, 1, 7, set("k", "b", None)).await;
    assert_eq!(replay, first);
    let s = stored(&m, 1, 9, "k").await;
    assert_eq!(s.value, Some(Bytes::from("a")));
    let (next, _) = applied(&m, 1, 10, set("k", "c", None)).await;
    assert_eq!(next, v + 1, "the replay took no version");
}

/// `op` (a write) tagged as request `sequence` of client 42.
fn tagged(op: MemoryOp, sequence: u64, lowest_unacked: u64) -> MemoryOp {
    match op {
        MemoryOp::Write { key, mut write } => {
            write.tag = Some(WriteTag {
                client_id: 42,
                sequence,
                lowest_unacked,
            });
            MemoryOp::Write { key, write }
        }
        read => read,
    }
}

#[tokio::test]
async fn a_retried_client_write_is_applied_once_even_after_another_write_and_from_another_node() {
    let (redis, m) = memory().await;
    let first = run(&m, 1, 1, tagged(set("k", "a", None), 5, 1)).await;
    let Ok(MemoryReply::Written(WriteResult::Applied { version: v1, .. })) = first else {
        panic!("{first:?}")
    };
    let (v2, _) = applied(&m, 1, 2, set("k", "b", None)).await;
    // The retry comes through another node (another memory client, other request ids): the
    // first result as a duplicate, and the newer value stays.
    let other = RedisMemory::connect(&redis.url(), "test", 2).expect("client");
    assert!(other.wait_connected(Duration::from_secs(10)).await);
    let retry = run(&other, 1, 1, tagged(set("k", "a", None), 5, 1)).await;
    assert_eq!(
        retry,
        Ok(MemoryReply::Duplicate(WriteResult::Applied {
            version: v1,
            existed: false
        }))
    );
    assert_eq!(stored(&m, 1, 3, "k").await.version, v2);
    assert_eq!(stored(&m, 1, 4, "k").await.value, Some(Bytes::from("b")));
    // A retried CompareAndSet gets its own first answer, not a mismatch against itself.
    let cas = tagged(set("k", "c", Some(v2)), 6, 1);
    let first_cas = run(&m, 1, 5, cas.clone()).await;
    let Ok(MemoryReply::Written(r @ WriteResult::Applied { .. })) = first_cas else {
        panic!("{first_cas:?}")
    };
    assert_eq!(run(&other, 1, 2, cas).await, Ok(MemoryReply::Duplicate(r)));
    // Once the client says it has every answer below 7, a retry of 5 is refused as expired
    // (never applied again), and a new sequence applies.
    let (_, _) = applied(&m, 1, 6, tagged(set("j", "x", None), 7, 7)).await;
    let late = run(&m, 1, 7, tagged(set("k", "a", None), 5, 7)).await;
    assert!(matches!(late, Err(MemoryError::Expired(_))), "{late:?}");
    assert_eq!(stored(&m, 1, 8, "k").await.value, Some(Bytes::from("c")));
}

#[tokio::test]
async fn a_tagged_write_refused_for_a_stale_epoch_is_not_remembered_and_its_retry_applies() {
    let (_redis, m) = memory().await;
    let _ = applied(&m, 3, 1, set("other", "x", None)).await;
    let stale = run(&m, 2, 2, tagged(set("k", "a", None), 1, 1)).await;
    assert!(
        matches!(stale, Err(MemoryError::Unavailable(_))),
        "{stale:?}"
    );
    let retry = run(&m, 3, 3, tagged(set("k", "a", None), 1, 1)).await;
    assert!(
        matches!(retry, Ok(MemoryReply::Written(WriteResult::Applied { .. }))),
        "{retry:?}"
    );
}

#[tokio::test]
async fn a_resolved_write_is_answered_with_its_result_and_a_cancelled_one_never_applies() {
    let (_redis, m) = memory().await;
    let done = run(&m, 1, 1, set("k", "a", None)).await;
    let Ok(MemoryReply::Written(result)) = done else {
        panic!("{done:?}")
    };
    // The write happened: resolving it finds its result.
    assert_eq!(
        m.settle(1, 1, || true).await,
        Some(Ok(WriteAnswer::Written(result)))
    );
    // A write that has not arrived yet: resolving cancels it, and when it arrives late it is
    // refused without writing.
    assert_eq!(
        m.settle(1, 2, || true).await,
        Some(Ok(WriteAnswer::Cancelled))
    );
    let late = run(&m, 1, 2, set("k", "late", None)).await;
    assert!(matches!(late, Err(MemoryError::Unavailable(_))), "{late:?}");
    assert_eq!(stored(&m, 1, 3, "k").await.value, Some(Bytes::from("a")));
}

#[tokio::test]
async fn memory_stamps_the_ttl_and_an_expired_value_reads_as_absent_with_its_version() {
    let (_redis, m) = memory().await;
    let op = set_with_ttl("t", "v", 300);
    let (v, _) = applied(&m, 1, 1, op).await;
    let s = stored(&m, 1, 2, "t").await;
    assert!(matches!(s.ttl_left_ms, Some(t) if t <= 300), "{s:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = stored(&m, 1, 3, "t").await;
    assert_eq!((s.version, s.value, s.ttl_left_ms), (v, None, None));
}

#[tokio::test]
async fn with_redis_down_a_request_fails_at_once_naming_redis_and_works_after_a_restart() {
    let (mut redis, m) = memory().await;
    let (v, _) = applied(&m, 1, 1, set("k", "kept", None)).await;
    redis.stop().await.expect("stop");
    // The client notices the closed connection; from then on requests fail without waiting.
    // Until it has noticed, a read may fail as sent on the dead connection instead: only a
    // refusal as unreachable shows it has, and a write made before that would be ambiguous
    // (resolved only once Redis is back, so this test would wait for itself). Seen on a loaded
    // machine with the tests running in parallel.
    let started = tokio::time::Instant::now();
    let refused = loop {
        match m
            .run(
                &MemoryRequest {
                    id: 2,
                    epoch: 1,
                    op: read("k"),
                },
                || true,
            )
            .await
        {
            Some(Err(MemoryError::Unavailable(why))) if why.contains("unreachable") => break why,
            other => {
                assert!(started.elapsed() < Duration::from_secs(10), "{other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(refused.contains(&redis.url()), "{refused}");
    let write = run(&m, 1, 3, set("k", "lost", None)).await;
    assert!(matches!(&write, Err(MemoryError::Unavailable(w)) if w.contains("unreachable")));
    redis.start_again().await.expect("restart");
    assert!(m.wait_connected(Duration::from_secs(10)).await);
    // The acknowledged write survived (appendfsync always), the refused one left no trace.
    let s = stored(&m, 1, 4, "k").await;
    assert_eq!((s.version, s.value), (v, Some(Bytes::from("kept"))));
    let (next, _) = applied(&m, 1, 5, set("k", "after", None)).await;
    assert!(next > v);
}

// Write-back mode: reservations and write-backs (contract rule 6).

/// `op` (a write) as a WriteReserve of `block` versions.
fn reserving(op: MemoryOp, block: u64) -> MemoryOp {
    match op {
        MemoryOp::Write { key, write } => MemoryOp::WriteReserve { key, write, block },
        other => other,
    }
}

async fn read_reserved(
    m: &RedisMemory,
    epoch: u64,
    id: MemOpId,
    key: &str,
    block: u64,
) -> (Stored, u64) {
    let op = MemoryOp::ReadReserve {
        key: key.into(),
        block,
    };
    match run(m, epoch, id, op).await {
        Ok(MemoryReply::ReadReserved(s, base)) => (s, base),
        other => panic!("expected a read-reserve, got {other:?}"),
    }
}

async fn write_reserved(
    m: &RedisMemory,
    epoch: u64,
    id: MemOpId,
    op: MemoryOp,
    block: u64,
) -> (WriteResult, u64) {
    match run(m, epoch, id, reserving(op, block)).await {
        Ok(MemoryReply::WrittenReserved(w, base)) => (w, base),
        other => panic!("expected a write-reserve, got {other:?}"),
    }
}

fn write_back(key: &str, version: u64, value: &str) -> MemoryOp {
    MemoryOp::WriteBack {
        key: key.into(),
        version,
        value: Bytes::from(value.to_string()),
    }
}

/// Whether memory took write-back `version` of `key`.
async fn wrote_back(
    m: &RedisMemory,
    epoch: u64,
    id: MemOpId,
    key: &str,
    version: u64,
    value: &str,
) -> bool {
    match run(m, epoch, id, write_back(key, version, value)).await {
        Ok(MemoryReply::WrittenBack { applied }) => applied,
        other => panic!("expected a write-back answer, got {other:?}"),
    }
}

#[tokio::test]
async fn a_reservation_starts_above_the_keys_version_and_every_earlier_limit() {
    let (_redis, m) = memory().await;
    // A key never written: version 0, the block starts at 0.
    let (s, base) = read_reserved(&m, 1, 1, "new", 10).await;
    assert_eq!((s.version, s.value, base), (0, None, 0));
    let (_, base) = read_reserved(&m, 1, 2, "new", 5).await;
    assert_eq!(base, 10, "above the previous limit");
    let (_, base) = read_reserved(&m, 1, 3, "new", 5).await;
    assert_eq!(base, 15);
    // A key with a value: the read is the value, the block starts at its version.
    let (v, _) = applied(&m, 1, 4, set("k", "a", None)).await;
    let (s, base) = read_reserved(&m, 1, 5, "k", 10).await;
    assert_eq!((s.version, s.value, base), (v, Some(Bytes::from("a")), v));
    let (s, base) = read_reserved(&m, 1, 6, "k", 3).await;
    assert_eq!((s.version, base), (v, v + 10));
}

#[tokio::test]
async fn an_ordinary_write_after_a_reservation_gets_a_version_above_its_limit() {
    let (_redis, m) = memory().await;
    let (v1, _) = applied(&m, 1, 1, set("k", "a", None)).await;
    let (_, base) = read_reserved(&m, 1, 2, "k", 100).await;
    let (v2, existed) = applied(&m, 1, 3, set("k", "b", None)).await;
    assert!(
        v2 > base + 100 && existed,
        "{v2} skips {}..={}",
        base + 1,
        base + 100
    );
    // A deletion too, and a CompareAndSet.
    let (_, base) = read_reserved(&m, 1, 4, "k", 100).await;
    assert_eq!(base, v2);
    let (v3, _) = applied(&m, 1, 5, delete("k")).await;
    assert!(v3 > base + 100);
    let (_, base) = read_reserved(&m, 1, 6, "k", 100).await;
    let (v4, _) = applied(&m, 1, 7, set("k", "c", Some(v3))).await;
    assert!(v4 > base + 100);
    // The counter jumped only for that key: another key's writes stay below its limit, so the
    // version space is not used up by reservations.
    let (other, _) = applied(&m, 1, 8, set("other", "x", None)).await;
    assert!(other > v4 && other < v4 + 100, "{other} vs {v4}");
    assert!(v1 < v2);
}

#[tokio::test]
async fn a_write_reserve_writes_like_a_write_then_reserves_after_the_writes_version() {
    let (_redis, m) = memory().await;
    let (w, base) = write_reserved(&m, 1, 1, set("k", "a", None), 10).await;
    let WriteResult::Applied {
        version: v1,
        existed,
    } = w
    else {
        panic!("{w:?}")
    };
    assert_eq!((base, existed), (v1, false));
    // The next write goes above the block and reserves after itself.
    let (w, base) = write_reserved(&m, 1, 2, set("k", "b", Some(v1)), 10).await;
    let WriteResult::Applied {
        version: v2,
        existed,
    } = w
    else {
        panic!("{w:?}")
    };
    assert!(v2 > v1 + 10 && existed);
    assert_eq!(base, v2);
    // A mismatched CompareAndSet writes nothing; its block starts at the previous limit.
    let (w, base) = write_reserved(&m, 1, 3, set("k", "c", Some(v1)), 10).await;
    assert_eq!((w, base), (WriteResult::Mismatch { current: v2 }, v2 + 10));
    let s = stored(&m, 1, 4, "k").await;
    assert_eq!((s.version, s.value), (v2, Some(Bytes::from("b"))));
    // A TTL is stamped as for a write.
    let op = set_with_ttl("t", "v", 60_000);
    let _ = write_reserved(&m, 1, 5, op, 10).await;
    let s = stored(&m, 1, 6, "t").await;
    assert!(matches!(s.ttl_left_ms, Some(t) if t <= 60_000), "{s:?}");
}

#[tokio::test]
async fn a_retried_client_write_reserve_is_a_duplicate_and_reserves_nothing() {
    let (_redis, m) = memory().await;
    let first = tagged(set("k", "a", None), 5, 1);
    let (w, base) = write_reserved(&m, 1, 1, first.clone(), 10).await;
    // The retry (as a WriteReserve or a plain write): the first result, no new reservation,
    // so a write-back inside the first block is still taken.
    assert_eq!(
        run(&m, 1, 2, reserving(first.clone(), 10)).await,
        Ok(MemoryReply::Duplicate(w))
    );
    assert_eq!(run(&m, 1, 3, first).await, Ok(MemoryReply::Duplicate(w)));
    assert!(wrote_back(&m, 1, 4, "k", base + 1, "local").await);
}

#[tokio::test]
async fn a_write_back_is_taken_only_inside_the_latest_reservation_and_above_the_version() {
    let (_redis, m) = memory().await;
    let op = set_with_ttl("k", "a", 60_000);
    let (v, _) = applied(&m, 1, 1, op).await;
    let (_, b) = read_reserved(&m, 1, 2, "k", 10).await;
    assert_eq!(b, v);
    assert!(
        !wrote_back(&m, 1, 3, "k", b, "base").await,
        "the base is not in the block"
    );
    assert!(
        !wrote_back(&m, 1, 4, "k", b + 11, "past").await,
        "past the limit"
    );
    assert!(wrote_back(&m, 1, 5, "k", b + 3, "three").await);
    let s = stored(&m, 1, 6, "k").await;
    assert_eq!(
        (s.version, s.value, s.ttl_left_ms),
        (b + 3, Some(Bytes::from("three")), None),
        "exactly that version, without a TTL"
    );
    // The same version again, or an older one: memory holds it or a newer one.
    assert!(!wrote_back(&m, 1, 7, "k", b + 3, "again").await);
    assert!(!wrote_back(&m, 1, 8, "k", b + 2, "older").await);
    assert!(
        wrote_back(&m, 1, 9, "k", b + 10, "ten").await,
        "the limit is in the block"
    );
    // A CompareAndSet sees the written-back version.
    let (v2, _) = applied(&m, 1, 10, set("k", "cas", Some(b + 10))).await;
    assert!(v2 > b + 10);
    // A newer reservation replaces the old one: the old block is refused.
    let (_, b2) = read_reserved(&m, 1, 11, "k", 10).await;
    assert_eq!(b2, v2);
    let (_, b3) = read_reserved(&m, 1, 12, "k", 10).await;
    assert!(!wrote_back(&m, 1, 13, "k", b2 + 1, "old block").await);
    assert!(wrote_back(&m, 1, 14, "k", b3 + 1, "new block").await);
    // Nothing refused changed anything.
    let s = stored(&m, 1, 15, "k").await;
    assert_eq!(
        (s.version, s.value),
        (b3 + 1, Some(Bytes::from("new block")))
    );
    // A key never reserved takes no write-back.
    assert!(!wrote_back(&m, 1, 16, "plain", 1, "x").await);
    assert_eq!(stored(&m, 1, 17, "plain").await.version, 0);
}

#[tokio::test]
async fn write_back_requests_of_an_older_epoch_are_refused_and_change_nothing() {
    let (_redis, m) = memory().await;
    let (_, b) = read_reserved(&m, 2, 1, "k", 10).await;
    let stale = run(&m, 1, 2, write_back("k", b + 1, "old")).await;
    assert!(
        matches!(&stale, Err(MemoryError::Unavailable(why)) if why.contains("stale epoch")),
        "{stale:?}"
    );
    let stale = run(
        &m,
        1,
        3,
        MemoryOp::ReadReserve {
            key: "k".into(),
            block: 10,
        },
    )
    .await;
    assert!(
        matches!(stale, Err(MemoryError::Unavailable(_))),
        "{stale:?}"
    );
    let stale = run(&m, 1, 4, reserving(set("k", "old", None), 10)).await;
    assert!(
        matches!(stale, Err(MemoryError::Unavailable(_))),
        "{stale:?}"
    );
    // The stale ReadReserve reserved nothing: the block is still the latest.
    assert!(wrote_back(&m, 2, 5, "k", b + 1, "current").await);
    // A newer epoch's write-back raises the fence.
    assert!(wrote_back(&m, 3, 6, "k", b + 2, "newer").await);
    assert!(run(&m, 2, 7, write_back("k", b + 3, "x")).await.is_err());
    let s = stored(&m, 3, 8, "k").await;
    assert_eq!((s.version, s.value), (b + 2, Some(Bytes::from("newer"))));
}

#[tokio::test]
async fn ambiguous_write_back_requests_are_resolved_by_their_id() {
    let (_redis, m) = memory().await;
    // A WriteBack that happened: its replay and its resolution answer its result.
    let (_, b) = read_reserved(&m, 1, 1, "k", 10).await;
    assert!(wrote_back(&m, 1, 2, "k", b + 1, "a").await);
    assert!(
        wrote_back(&m, 1, 2, "k", b + 1, "a").await,
        "a replay: the first result"
    );
    assert_eq!(
        m.settle(1, 2, || true).await,
        Some(Ok(WriteAnswer::WroteBack { applied: true }))
    );
    // One that had not arrived: cancelled, and refused when it arrives late.
    assert_eq!(
        m.settle(1, 3, || true).await,
        Some(Ok(WriteAnswer::Cancelled))
    );
    let late = run(&m, 1, 3, write_back("k", b + 2, "late")).await;
    assert!(matches!(late, Err(MemoryError::Unavailable(_))), "{late:?}");
    assert_eq!(stored(&m, 1, 4, "k").await.version, b + 1);
    // A WriteReserve that happened resolves with its base.
    let (w, base) = write_reserved(&m, 1, 5, set("j", "x", None), 10).await;
    assert_eq!(
        m.settle(1, 5, || true).await,
        Some(Ok(WriteAnswer::Reserved(w, base)))
    );
}

#[tokio::test]
async fn an_ambiguous_read_reserve_is_read_again_cancelled_or_moved() {
    let (_redis, m) = memory().await;
    let (v, _) = applied(&m, 1, 1, set("k", "a", None)).await;
    let (s, base) = read_reserved(&m, 1, 2, "k", 10).await;
    // It happened and nothing changed the key since: the same answer.
    assert_eq!(
        m.settle_read_reserve(1, 2, "k", || true).await,
        Some(Ok(ReadAnswer::Read(s.clone(), Some(base))))
    );
    // A replay of the id reads again and reserves nothing more.
    assert_eq!(
        run(
            &m,
            1,
            2,
            MemoryOp::ReadReserve {
                key: "k".into(),
                block: 10
            }
        )
        .await,
        Ok(MemoryReply::ReadReserved(s, base))
    );
    // One that had not arrived: cancelled, and when it arrives late it reserves nothing.
    assert_eq!(
        m.settle_read_reserve(1, 3, "k", || true).await,
        Some(Ok(ReadAnswer::Cancelled))
    );
    let late = run(
        &m,
        1,
        3,
        MemoryOp::ReadReserve {
            key: "k".into(),
            block: 10,
        },
    )
    .await;
    assert!(matches!(late, Err(MemoryError::Unavailable(_))), "{late:?}");
    let (_, next) = read_reserved(&m, 1, 4, "k", 10).await;
    assert_eq!(next, base + 10, "only the reservation of id 2 counted");
    // The key written past the reservation since: the reservation has no effect left, and the
    // request is answered as not done.
    // Reserved again since (the version unchanged): the first block takes no write-back any more,
    // so that request too is answered as not done.
    let _ = read_reserved(&m, 1, 5, "k", 10).await;
    assert_eq!(
        m.settle_read_reserve(1, 4, "k", || true).await,
        Some(Ok(ReadAnswer::Moved))
    );
    let (s5, base5) = read_reserved(&m, 1, 5, "k", 10).await;
    assert_eq!(
        m.settle_read_reserve(1, 5, "k", || true).await,
        Some(Ok(ReadAnswer::Read(s5, Some(base5))))
    );
    let (v2, _) = applied(&m, 2, 6, set("k", "b", None)).await;
    assert!(v2 > v);
    assert_eq!(
        m.settle_read_reserve(1, 5, "k", || true).await,
        Some(Ok(ReadAnswer::Moved))
    );
}

#[tokio::test]
async fn no_version_is_reused_after_the_value_expires_or_is_deleted() {
    let (_redis, m) = memory().await;
    let op = set_with_ttl("t", "v", 200);
    let (v, _) = applied(&m, 1, 1, op).await;
    let (_, base) = read_reserved(&m, 1, 2, "t", 10).await;
    assert_eq!(base, v);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Expired: absent, with its version, and the limit survived the expiry.
    let (s, base2) = read_reserved(&m, 1, 3, "t", 10).await;
    assert_eq!((s.version, s.value, base2), (v, None, v + 10));
    let (w, _) = applied(&m, 1, 4, set("t", "w", None)).await;
    assert!(w > v + 20);
    // Deleted: the tombstone keeps the limit too.
    let (_, b) = read_reserved(&m, 1, 5, "t", 10).await;
    let (d, _) = applied(&m, 1, 6, delete("t")).await;
    assert!(d > b + 10);
    assert!(!wrote_back(&m, 1, 7, "t", b + 1, "lost holder").await);
    let (s, b2) = read_reserved(&m, 1, 8, "t", 10).await;
    assert_eq!((s.version, s.value, b2), (d, None, d));
    assert!(wrote_back(&m, 1, 9, "t", d + 1, "back").await);
}

#[tokio::test]
async fn reservations_survive_a_redis_restart() {
    let (mut redis, m) = memory().await;
    let (v, _) = applied(&m, 1, 1, set("k", "a", None)).await;
    let (_, b) = read_reserved(&m, 1, 2, "k", 10).await;
    assert!(wrote_back(&m, 1, 3, "k", b + 1, "one").await);
    redis.stop().await.expect("stop");
    redis.start_again().await.expect("restart");
    assert!(m.wait_connected(Duration::from_secs(10)).await);
    // The reservation and the written-back value are back from the append-only file: the block
    // still takes write-backs, and an ordinary write still skips it.
    let s = eventually_stored(&m, 1, 4, "k").await;
    assert_eq!((s.version, s.value), (b + 1, Some(Bytes::from("one"))));
    assert!(wrote_back(&m, 1, 5, "k", b + 2, "two").await);
    let (w, _) = applied(&m, 1, 6, set("k", "after", None)).await;
    assert!(w > b + 10 && b >= v);
}

/// A read right after a reconnection: retried while the client still reports the connection
/// it just lost.
async fn eventually_stored(m: &RedisMemory, epoch: u64, id: MemOpId, key: &str) -> Stored {
    let started = tokio::time::Instant::now();
    loop {
        match run(m, epoch, id, read(key)).await {
            Ok(MemoryReply::Read(s)) => return s,
            other => {
                assert!(started.elapsed() < Duration::from_secs(10), "{other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn write_back_requests_whose_answers_are_lost_are_answered_with_the_truth() {
    let (redis, m) = memory().await;
    let (_, b) = read_reserved(&m, 1, 1, "k", 10).await;
    // Redis holds every script for three seconds, past the command timeout: the client gives
    // the connection up, so the outcome is unknown and the shell resolves it by its id.
    let pause = async || {
        redis
            .cli(&["CLIENT", "PAUSE", "3000", "WRITE"])
            .await
            .expect("pause")
    };
    pause().await;
    let answer = run(&m, 1, 2, write_back("k", b + 1, "a")).await;
    let s = eventually_stored(&m, 1, 3, "k").await;
    match answer {
        Ok(MemoryReply::WrittenBack { applied: true }) => assert_eq!(s.version, b + 1),
        Err(MemoryError::Unavailable(_)) => {
            assert_eq!(s.version, 0, "refused: no trace");
            // And it never lands later: the same version, asked again, is taken now.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(wrote_back(&m, 1, 4, "k", b + 1, "again").await);
        }
        other => panic!("{other:?}"),
    }
    pause().await;
    let op = MemoryOp::ReadReserve {
        key: "k".into(),
        block: 10,
    };
    let answer = run(&m, 1, 5, op).await;
    let (_, next) = read_reserved(&m, 1, 6, "k", 10).await;
    match answer {
        Ok(MemoryReply::ReadReserved(s, base)) => {
            assert_eq!((s.version, base, next), (b + 1, b + 10, b + 20));
        }
        Err(MemoryError::Unavailable(_)) => assert_eq!(next, b + 10, "refused: no trace"),
        other => panic!("{other:?}"),
    }
}
