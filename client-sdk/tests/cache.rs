//! The SDK's cache calls against a real 3-node cluster: set, get (a miss, then a hit), delete,
//! and compare-and-set winning and losing.

use std::time::Duration;

use anyhow::ensure;
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
