//! The Redis memory scripts against a real `redis-server` (the Debian package; each test starts
//! its own on a free port): the memory contract of `syncd::cache::memory`, one rule per test.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sync_tests::redis::RedisServer;
use syncd::cache::Stored;
use syncd::cache::memory::{MemOpId, MemoryError, MemoryOp, MemoryReply, MemoryRequest};
use syncd::cache::message::{Mutation, Write, WriteResult, WriteTag};
use syncd::node::cache::redis_memory::{RedisMemory, WriteAnswer};

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
            mutation: Mutation::Set {
                value: Bytes::from(value.to_string()),
                ttl_ms: None,
            },
            expect,
            tag: None,
        },
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
    let op = MemoryOp::Write {
        key: "t".into(),
        write: Write {
            mutation: Mutation::Set {
                value: Bytes::from("v"),
                ttl_ms: Some(300),
            },
            expect: None,
            tag: None,
        },
    };
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
            Some(Err(MemoryError::Unavailable(why))) => break why,
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
