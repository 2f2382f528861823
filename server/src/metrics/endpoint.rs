//! The metrics and health HTTP endpoint.
//!
//! A plain HTTP/1.1 server (the exporter's own listener is disabled to avoid its TLS
//! dependencies) answering:
//! - `GET /metrics`: the Prometheus text exposition format, version 0.0.4;
//! - `GET /healthz`: `200 ok` or `503` with a one-line reason, from a caller-supplied check;
//! - anything else: 404 (405 for another method on a known path).
//!
//! It is reachable by anything that can reach the port, so it bounds what a client can hold:
//! at most [`Limits::max_connections`] connections at once (further ones wait in the kernel's
//! accept backlog), a deadline for each request's headers, a small header buffer, and a maximum
//! connection lifetime after which the connection is closed gracefully and then forcibly.
//! Responses are rendered in memory, so a slow reader costs one buffer until its lifetime ends.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{debug, warn};

/// `Content-Type` of the Prometheus text format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What `/healthz` reports, produced by the caller's check on every request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthReport {
    /// Whether the node can serve: `/healthz` answers 200 if so, 503 if not.
    pub healthy: bool,
    /// Why: shown after `ok` when healthy, as the reason when not. Newlines are flattened so
    /// the reason stays one line for probes that log it.
    pub detail: String,
}

impl HealthReport {
    /// A healthy report with the given detail (may be empty).
    pub fn healthy(detail: impl Into<String>) -> Self {
        HealthReport {
            healthy: true,
            detail: detail.into(),
        }
    }

    /// An unhealthy report with the given reason.
    pub fn unhealthy(reason: impl Into<String>) -> Self {
        HealthReport {
            healthy: false,
            detail: reason.into(),
        }
    }
}

/// The bounds the server holds clients to. Fixed in production ([`Limits::DEFAULT`]); tests
/// shrink them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Connections served at once. Prometheus needs one per scraper; 64 leaves room for
    /// probes and humans while capping the memory and tasks a flood of clients can claim.
    pub(crate) max_connections: usize,
    /// Time a client gets to send a request's headers, including the first one; stops a
    /// client from holding a slot by connecting and staying silent.
    pub(crate) header_read_timeout: Duration,
    /// Longest a connection lives. Keep-alive scrapers simply reconnect; a client that
    /// trickles its reads cannot keep a slot longer than this (plus the grace below).
    pub(crate) connection_lifetime: Duration,
    /// After the lifetime ends or the server shuts down, how long an in-flight response may
    /// take to finish before the connection is dropped.
    pub(crate) shutdown_grace: Duration,
    /// How often to fold recorded histogram samples into buckets even if nobody scrapes, so
    /// memory stays bounded between scrapes.
    pub(crate) upkeep_interval: Duration,
}

impl Limits {
    pub(crate) const DEFAULT: Limits = Limits {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(5),
        connection_lifetime: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(5),
        upkeep_interval: Duration::from_secs(5),
    };
}

/// What every connection task shares.
struct Shared {
    /// Renders `/metrics`.
    handle: PrometheusHandle,
    /// Answers `/healthz`.
    health: Box<dyn Fn() -> HealthReport + Send + Sync>,
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` completes, then closes open
/// connections gracefully (each gets a few seconds to finish its response) and returns.
///
/// Also runs the recorder's upkeep every few seconds. Accept errors (such as running out of
/// file descriptors) are logged and retried after a short pause, never fatal.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: impl Fn() -> HealthReport + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    serve_with_limits(listener, handle, health, shutdown, Limits::DEFAULT).await;
}

pub(crate) async fn serve_with_limits(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: impl Fn() -> HealthReport + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) {
    let shared = Arc::new(Shared {
        handle: handle.clone(),
        health: Box::new(health),
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Dropped or set to true when the server stops; connection tasks watch it.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut upkeep = tokio::time::interval(limits.upkeep_interval);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A slot is taken before accepting, so an accepted socket always has one.
    let mut slot: Option<OwnedSemaphorePermit> = None;

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = upkeep.tick() => handle.run_upkeep(),
            acquired = Arc::clone(&slots).acquire_owned(), if slot.is_none() => match acquired {
                Ok(permit) => slot = Some(permit),
                Err(_closed) => break, // never closed; nothing left to serve with if it were
            },
            accepted = listener.accept(), if slot.is_some() => match accepted {
                Ok((stream, peer)) => {
                    debug!(%peer, "metrics connection");
                    tokio::spawn(connection(
                        stream,
                        Arc::clone(&shared),
                        slot.take(),
                        stop_rx.clone(),
                        limits,
                    ));
                }
                Err(e) => {
                    // Usually EMFILE/ENFILE: back off instead of spinning on the error.
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    drop(listener);
    drop(slot);
    let _ = stop_tx.send(true);
    // Wait for the connections to wind down: each needs at most the grace period from now.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(limits.shutdown_grace, slots.acquire_many(all)).await;
    if drained.is_err() {
        debug!("metrics endpoint: connections still closing at shutdown");
    }
}

/// Serves one connection until the client closes it, its lifetime ends or the server stops.
async fn connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    _slot: Option<OwnedSemaphorePermit>,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
) {
    let service = service_fn(move |req| {
        let response = respond(&shared, &req);
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(16 * 1024);
    let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));

    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                debug!(error = %e, "metrics connection ended with an error");
            }
            return;
        }
        () = tokio::time::sleep(limits.connection_lifetime) => {}
        // An error means the server is gone: stop as well.
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
    conn.as_mut().graceful_shutdown();
    match tokio::time::timeout(limits.shutdown_grace, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "metrics connection ended with an error"),
        Err(_) => debug!("metrics connection dropped after its grace period"),
    }
}

/// Answers one request.
fn respond<B>(shared: &Shared, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path != "/metrics" && path != "/healthz" {
        return plain(StatusCode::NOT_FOUND, "not found\n".into());
    }
    if req.method() != Method::GET {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is allowed\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    if path == "/metrics" {
        let mut response = plain(StatusCode::OK, shared.handle.render());
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
        return response;
    }
    let report = (shared.health)();
    let detail = one_line(&report.detail);
    if report.healthy {
        let body = if detail.is_empty() {
            "ok\n".to_owned()
        } else {
            format!("ok\n{detail}\n")
        };
        plain(StatusCode::OK, body)
    } else {
        let reason = if detail.is_empty() {
            "unhealthy"
        } else {
            detail.as_str()
        };
        plain(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
    }
}

/// `text` with line breaks replaced by spaces and surrounding whitespace trimmed.
fn one_line(text: &str) -> String {
    text.trim().replace(['\r', '\n'], " ")
}

/// A `text/plain` response that caches must not keep (health and metrics are live values).
fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    use super::*;
    use crate::metrics::testutil::{http_get, http_request};
    use crate::metrics::{install_recorder, names, record};

    /// Starts the endpoint on a free loopback port with the given limits and health flag.
    async fn start(
        limits: Limits,
        healthy: Arc<AtomicBool>,
    ) -> (
        std::net::SocketAddr,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let handle = install_recorder().expect("install recorder");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let health = move || {
            if healthy.load(Ordering::SeqCst) {
                HealthReport::healthy("leader=1 term=3")
            } else {
                HealthReport::unhealthy("no leader\nfor 12s")
            }
        };
        let server = tokio::spawn(serve_with_limits(
            listener,
            handle,
            health,
            async {
                let _ = stop_rx.await;
            },
            limits,
        ));
        (addr, stop_tx, server)
    }

    #[tokio::test]
    async fn metrics_healthz_and_unknown_paths() {
        let healthy = Arc::new(AtomicBool::new(true));
        let (addr, stop, server) = start(Limits::DEFAULT, Arc::clone(&healthy)).await;
        record::term(7);

        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains(&format!("{} 7", names::RAFT_TERM)), "{body}");

        assert_eq!(
            http_get(addr, "/healthz").await,
            (200, "ok\nleader=1 term=3\n".into())
        );
        healthy.store(false, Ordering::SeqCst);
        assert_eq!(
            http_get(addr, "/healthz").await,
            (503, "no leader for 12s\n".into())
        );

        assert_eq!(http_get(addr, "/").await.0, 404);
        assert_eq!(http_get(addr, "/metrics/extra").await.0, 404);
        assert_eq!(http_request(addr, "POST", "/metrics").await.0, 405);

        stop.send(()).expect("server running");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server stops after shutdown")
            .expect("server task");
    }

    #[tokio::test]
    async fn metrics_content_type_is_prometheus_text() {
        let (addr, _stop, _server) = start(Limits::DEFAULT, Arc::new(AtomicBool::new(true))).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.expect("read");
        let head = raw
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_silent_client_is_disconnected() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(200),
            ..Limits::DEFAULT
        };
        let (addr, _stop, _server) = start(limits, Arc::new(AtomicBool::new(true))).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut buf = Vec::new();
        // The server closes the connection (possibly after a 408) well before the test's own
        // deadline.
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
            .await
            .expect("server closed a connection that sent no request")
            .expect("read");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_slot() {
        let limits = Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_millis(500),
            ..Limits::DEFAULT
        };
        let (addr, _stop, _server) = start(limits, Arc::new(AtomicBool::new(true))).await;
        // Hold the only slot with a connection that sends nothing.
        let mut hog = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = tokio::time::Instant::now();
        let (status, _) = http_get(addr, "/healthz").await;
        assert_eq!(status, 200);
        // The second request was served only after the silent one timed out.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        let mut buf = Vec::new();
        let _ = hog.read_to_end(&mut buf).await;
    }

    #[tokio::test]
    async fn long_connections_are_closed_at_the_end_of_their_lifetime() {
        let limits = Limits {
            connection_lifetime: Duration::from_millis(200),
            shutdown_grace: Duration::from_millis(200),
            ..Limits::DEFAULT
        };
        let (addr, _stop, _server) = start(limits, Arc::new(AtomicBool::new(true))).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // A keep-alive request, then idle: the server must close the connection by itself.
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
            .await
            .expect("server closed the connection")
            .expect("read");
        assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    }
}
