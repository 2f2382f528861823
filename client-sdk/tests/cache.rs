//! The SDK's cache calls against a real 3-node cluster: set, get (a miss, then a hit), delete,
//! and compare-and-set winning and losing.

use std::time::Duration;

use anyhow::ensure;
use sync_client::api;
use sync_tests::{Options, scenario};

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_get_delete_and_compare_and_set() {
    scenario(3, Options::default(), Duration::from_secs(60), async |c| {
        let client = common::client(c).await?;
        ensure!(
            client.cache_get("k1").await?.is_none(),
            "a fresh key has a value"
        );
        let v1 = client.cache_set("k1", "v1", None).await?;
        let read = client
            .cache_get("k1")
            .await?
            .ok_or_else(|| anyhow::anyhow!("k1 missing"))?;
        ensure!(read.value == "v1" && read.version == v1, "read {read:?}");
        // Reads on the same node come to be served from its line (once its lease is granted).
        let mut hit = false;
        for _ in 0..40 {
            let again = client
                .cache_get("k1")
                .await?
                .ok_or_else(|| anyhow::anyhow!("k1 missing"))?;
            ensure!(again.version == v1 && again.value == "v1", "read {again:?}");
            if again.hit {
                hit = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(hit, "40 reads of an unchanged key on one node, none a hit");
        // Compare-and-set: the right version wins, a stale one loses.
        let v2 = client.cache_compare_and_set("k1", v1, "v2").await?;
        ensure!(
            v2.is_some_and(|v| v > v1),
            "CAS on the current version failed: {v2:?}"
        );
        ensure!(
            client
                .cache_compare_and_set("k1", v1, "v3")
                .await?
                .is_none()
        );
        let read = client
            .cache_get("k1")
            .await?
            .ok_or_else(|| anyhow::anyhow!("k1 missing"))?;
        ensure!(read.value == "v2", "read {read:?}");
        ensure!(client.cache_delete("k1").await?);
        ensure!(
            client.cache_get("k1").await?.is_none(),
            "a deleted key has a value"
        );
        Ok(())
    })
    .await;
}

/// `NodeCache::set_unretried` sends no request header, so a write-back cluster's node holding
/// the key Modified answers it from its line (Stats count local writes, State shows the line
/// dirty), while tagged writes (`NodeCache::set`) never are; a read on another node recalls the
/// line and sees the last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unretried_set_is_answered_locally_in_write_back_mode_and_a_tagged_one_never_is() {
    let options = Options {
        extra_args: vec![
            "--cache-write-mode=write-back".into(),
            "--cache-flush-interval=30s".into(),
        ],
        ..Options::default()
    };
    scenario(3, options, Duration::from_secs(90), async |c| {
        let leader = c.wait_for_leader(Duration::from_secs(10)).await?;
        let client = common::client(c).await?;
        let mut others = c.ids().into_iter().filter(|&id| id != leader.id);
        let (writer, reader) = (
            others.next().expect("a follower"),
            others.next().expect("two"),
        );
        let on_writer = client.cache_on(Some(writer)).await?;
        let on_reader = client.cache_on(Some(reader)).await?;
        // A write that reaches a new directory before the node holds a lease grants no line:
        // write until the writer's line is Modified.
        let mut version = 0;
        for attempt in 0..40 {
            version = on_writer
                .set("wb", format!("tagged {attempt}"), None)
                .await?;
            let state = on_writer.state("wb").await?;
            if state.version == version && state.state() == api::MesiState::Modified {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let before = on_writer.stats().await?;
        // A tagged write on the Modified line still goes through memory.
        let tagged = on_writer.set("wb", "tagged again", None).await?;
        ensure!(tagged > version, "v{tagged} after v{version}");
        let after_tagged = on_writer.stats().await?;
        ensure!(
            after_tagged.local_writes == before.local_writes,
            "a tagged write was served locally: {before:?} -> {after_tagged:?}"
        );
        // Unretried writes are answered by the line.
        let mut last = tagged;
        for i in 0..5 {
            let v = on_writer.set_unretried("wb", format!("local {i}")).await?;
            ensure!(v > last, "local write {i}: v{v} after v{last}");
            last = v;
        }
        let after = on_writer.stats().await?;
        ensure!(
            after.local_writes == after_tagged.local_writes + 5,
            "five unretried writes on a Modified line, not all local: {after_tagged:?} -> {after:?}"
        );
        let state = on_writer.state("wb").await?;
        ensure!(state.dirty && state.version == last, "{state:?}");
        // A read on another node recalls the dirty line and sees the last local write.
        let read = on_reader.get("wb").await?;
        ensure!(
            read.found && read.value == "local 4" && read.version == last,
            "the reader got {read:?}, not v{last}"
        );
        Ok(())
    })
    .await;
}
