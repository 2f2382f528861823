//! Helpers shared by the SDK's cluster tests (each test file includes this as `mod common`).

#![allow(dead_code)] // each test binary uses its own subset

use std::time::Duration;

use sync_client::Client;
use sync_tests::{Cluster, Options};

/// Every node's address, as SDK endpoints.
pub fn endpoints(c: &Cluster) -> Vec<String> {
    c.ids()
        .iter()
        .map(|&id| c.address(id).to_string())
        .collect()
}

/// A client of the whole cluster, once it has a leader.
pub async fn client(c: &Cluster) -> anyhow::Result<Client> {
    c.wait_for_leader(Duration::from_secs(10)).await?;
    Ok(Client::connect(endpoints(c)).await?)
}

/// Cluster options for cache tests: a 1 s cache lease, which shortens the server's no-caching
/// grace after an election (one lease) from over 5 s to about 1 s.
pub fn short_cache_lease() -> Options {
    Options {
        extra_args: vec!["--cache-lease".into(), "1s".into()],
        ..Options::default()
    }
}
