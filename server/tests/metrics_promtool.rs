//! The scrape output is valid Prometheus exposition: every metric syncd declares appears on
//! `GET /metrics` once it has a sample, and `promtool check metrics` (Prometheus's own linter:
//! syntax, types, `_total` on counters, units, help text) accepts the whole body.
//!
//! Needs `promtool`, from Debian's `prometheus` package:
//! `apt-get install -y --no-install-recommends prometheus`. Without it this test fails rather
//! than skips, so CI cannot pass without having checked.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use syncd::metrics::record::{self, Proposal};
use syncd::metrics::{self, HealthReport, names};
use syncd::raft::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sends `GET path` over a fresh connection and returns (status, content type, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut raw))
        .await
        .expect("response within 10s")
        .expect("read response");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .expect("a complete HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// Records at least one sample of every metric in `names::ALL`, through the same helpers the
/// runtime uses, including every labelled family.
fn record_one_of_everything() {
    record::role(Role::Leader);
    record::term(3);
    record::leader_changed();
    record::commit_index(42);
    record::applied_index(41);
    record::proposals(Proposal::Ok, 10);
    record::proposals(Proposal::Rejected, 1);
    record::proposals(Proposal::Dropped, 1);
    record::log_size(120, 64 * 1024);
    record::snapshot_taken(Duration::from_millis(30));
    record::wal_fsync(Duration::from_micros(180));
    record::wal_batch(17);
    for peer in [2, 3] {
        record::peer_lag(peer, 5);
        record::peer_rtt(peer, Duration::from_micros(400));
        record::peer_reachable(peer, peer == 2);
    }
    record::node_info(1);
    record::lock_table(3, 2);
    record::lock_event(sync_proto::sync::v1::LockEventType::Acquired as i32);
    record::lock_event(sync_proto::sync::v1::LockEventType::Deadlock as i32);
    record::lock_wait(Duration::from_millis(12));
    record::queue_topics(2);
    record::queue_messages("published", 10);
    record::queue_messages("acked", 9);
    record::cache_memory("raft", "write", "ok", Duration::from_millis(3));
    record::cache_memory("redis", "read", "refused", Duration::from_micros(300));
    record::cache_dirty_lines(2);
    record::cache_local_writes(5);
    record::cache_write_back(record::WriteBackOutcome::Written, Duration::from_millis(4));
    record::cache_write_back(
        record::WriteBackOutcome::NotHolder,
        Duration::from_millis(9),
    );
    record::cache_write_back_losses("dirty_dropped", 1);
    record::cache_write_back_losses("given_up", 1);
    // The gRPC families are recorded by the middleware; record one request by hand.
    ::metrics::counter!(
        names::GRPC_SERVER_REQUESTS,
        "service" => "sync.v1.LockService",
        "method" => "Acquire",
        "code" => "OK",
    )
    .increment(1);
    ::metrics::histogram!(
        names::GRPC_SERVER_REQUEST_DURATION,
        "service" => "sync.v1.LockService",
        "method" => "Acquire",
    )
    .record(Duration::from_millis(2));
}

/// Runs `promtool check metrics` with `body` on stdin; returns (success, combined output).
fn promtool_check(body: &str) -> (bool, String) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot run promtool ({e}); it comes from Debian's `prometheus` package: \
             apt-get update && apt-get install -y --no-install-recommends prometheus"
        ),
    };
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(body.as_bytes())
        .expect("write metrics to promtool");
    let output = child.wait_with_output().expect("wait for promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn scrape_output_has_every_metric_and_passes_promtool() {
    let handle = metrics::install_recorder().expect("install the recorder");
    metrics::describe_all();
    record_one_of_everything();

    let healthy = Arc::new(AtomicBool::new(true));
    let health = {
        let healthy = Arc::clone(&healthy);
        move || {
            if healthy.load(Ordering::SeqCst) {
                HealthReport::healthy("leader=1")
            } else {
                HealthReport::unhealthy("no quorum")
            }
        }
    };
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(metrics::serve(listener, handle, health, async {
        let _ = stop_rx.await;
    }));

    let (status, content_type, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    for name in names::ALL {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics:\n{body}"
        );
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "{name} has no help text"
        );
    }
    assert!(
        body.contains(r#"syncd_raft_role{role="leader"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"syncd_raft_role{role="follower"} 0"#),
        "{body}"
    );
    assert!(
        body.contains(r#"syncd_raft_proposals_total{result="dropped"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"syncd_peer_reachable{peer="3"} 0"#),
        "{body}"
    );
    assert!(body.contains(r#"syncd_node_info{node_id="1"} 1"#), "{body}");
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        body.contains(&format!("syncd_build_info{{version=\"{version}\"}} 1")),
        "{body}"
    );
    for histogram in [
        names::SNAPSHOT_DURATION,
        names::WAL_FSYNC_DURATION,
        names::WAL_BATCH_ENTRIES,
        names::PEER_RTT,
        names::GRPC_SERVER_REQUEST_DURATION,
    ] {
        assert!(
            body.contains(&format!("# TYPE {histogram} histogram")),
            "{histogram} is not rendered as a histogram:\n{body}"
        );
    }

    let (ok, report) = promtool_check(&body);
    assert!(
        ok,
        "promtool check metrics rejected /metrics:\n{report}\n--- body ---\n{body}"
    );
    assert!(
        report.trim().is_empty(),
        "promtool reported problems:\n{report}"
    );

    let (status, _, body) = get(addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\nleader=1\n"));
    healthy.store(false, Ordering::SeqCst);
    let (status, _, body) = get(addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (503, "no quorum\n"));
    assert_eq!(get(addr, "/nope").await.0, 404);

    stop_tx.send(()).expect("server still running");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops on shutdown")
        .expect("server task");
}
