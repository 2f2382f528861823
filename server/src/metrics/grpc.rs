//! gRPC server metrics middleware: counts and times every request by service, method and
//! final status code.
//!
//! A gRPC status arrives in one of two places:
//! - **response headers**, for a trailers-only response: what tonic sends when a handler
//!   returns `Err(Status)` before any message, or for an unknown method;
//! - **the body's trailers**, after the messages, for every response that got as far as
//!   sending them (all successful unary calls, streams).
//!
//! [`GrpcMetrics`] looks at the headers when the inner service answers; if there is no
//! `grpc-status` there, it wraps the body in [`MetricsBody`], which watches the frames go by
//! and records when it sees the trailers. A body that ends without a `grpc-status` counts as
//! `OK` (what a gRPC client concludes too); one dropped before its end (the client went away
//! or the connection broke) counts as `CANCELLED`. The duration runs from the request's
//! arrival to the moment the status is known, so for a stream it is the stream's life.
//!
//! Labels come from the request path `/package.Service/Method`. A client can send any path,
//! so requests that end `UNIMPLEMENTED` (unknown service or method, in practice) are recorded
//! under `service="unknown", method="unknown"`: the label sets stay bounded by the methods the
//! server really has.
//!
//! Use it per service (works with tonic as is):
//! `Server::builder().add_service(GrpcMetrics::new(LockServiceServer::new(svc)))`,
//! or for the whole router with `Server::builder().layer(GrpcMetricsLayer::new())`, which needs
//! `GrpcMetricsLayer` to implement `tower_layer::Layer` (see [`GrpcMetricsLayer`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use hyper::body::{Body, Frame, SizeHint};
use hyper::{HeaderMap, Request, Response};
use metrics::{counter, histogram};
use tonic::Code;
use tonic::codegen::Service;
use tonic::server::NamedService;

use super::names;

/// Label value for the service and method of requests that cannot be attributed to a real one.
const UNKNOWN: &str = "unknown";

/// Wraps services in [`GrpcMetrics`].
///
/// tonic does not re-export `tower_layer::Layer`, so using this with `Server::builder().layer(..)`
/// takes the `tower-layer` crate (0.3, the one tonic uses) and this impl:
///
/// ```ignore
/// impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
///     type Service = GrpcMetrics<S>;
///     fn layer(&self, inner: S) -> GrpcMetrics<S> {
///         GrpcMetricsLayer::layer(self, inner)
///     }
/// }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl GrpcMetricsLayer {
    /// A new layer.
    pub fn new() -> Self {
        GrpcMetricsLayer
    }

    /// Wraps `inner` (the shape of `tower_layer::Layer::layer`).
    pub fn layer<S>(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics::new(inner)
    }
}

/// Lets `Server::builder().layer(GrpcMetricsLayer::new())` wrap the whole gRPC router.
impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics::new(inner)
    }
}

/// A service that records `syncd_grpc_server_requests_total` and
/// `syncd_grpc_server_request_duration_seconds` for every request it passes to `S`.
///
/// Generic over the inner service and both body types; it keeps the inner service's name
/// ([`NamedService`]) so a wrapped tonic service can be given to `add_service` directly.
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    /// The wrapped service.
    inner: S,
}

impl<S> GrpcMetrics<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        GrpcMetrics { inner }
    }

    /// The wrapped service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: NamedService> NamedService for GrpcMetrics<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcMetrics<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let call = Call::start(req.uri().path());
        ResponseFuture {
            inner: Box::pin(self.inner.call(req)),
            call,
        }
    }
}

/// The future of a [`GrpcMetrics`] call: the inner future, and the call's bookkeeping until
/// the response says where its status will be.
pub struct ResponseFuture<F> {
    /// The inner service's response future (boxed, so this future needs no pin projection).
    inner: Pin<Box<F>>,
    /// Records the call once its status is known (or as cancelled if this future is dropped).
    call: Call,
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<MetricsBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let result = ready!(this.inner.as_mut().poll(cx));
        let mut call = std::mem::take(&mut this.call);
        Poll::Ready(match result {
            Ok(response) => {
                if let Some(code) = status_in(response.headers()) {
                    // Trailers-only response: the status is final already.
                    call.finish(code);
                } else if response.body().is_end_stream() {
                    // Nothing will follow; the body may never be polled (tonic replaces an
                    // ended body with an empty one), so record now rather than as a cancel.
                    call.finish(Code::Ok);
                }
                Ok(response.map(|body| MetricsBody {
                    inner: Box::pin(body),
                    call,
                }))
            }
            Err(e) => {
                // Not a gRPC answer at all; the transport will fail the stream.
                call.finish(Code::Unknown);
                Err(e)
            }
        })
    }
}

/// A response body that records its call when the `grpc-status` trailer goes by.
pub struct MetricsBody<B> {
    /// The response body (boxed, so this body needs no pin projection).
    inner: Pin<Box<B>>,
    /// Pending unless the status was already known from the headers.
    call: Call,
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if this.call.is_pending() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        this.call.finish(status_in(trailers).unwrap_or(Code::Ok));
                    } else if this.inner.is_end_stream() {
                        // The last data frame, and no trailers will follow.
                        this.call.finish(Code::Ok);
                    }
                }
                // The transport resets the stream; a client sees an internal error.
                Some(Err(_)) => this.call.finish(Code::Internal),
                None => this.call.finish(Code::Ok),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` in `headers` (response headers or trailers), if any. Values that are not
/// a known code read as `UNKNOWN`, as tonic's client does.
fn status_in(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

/// The canonical name of a gRPC status code, as in the gRPC spec and other servers' metrics
/// (`OK`, `NOT_FOUND`, `UNAVAILABLE`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `(service, method)` from a gRPC path `/package.Service/Method`, or `None` if the path does
/// not have that shape.
fn split_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let valid = !service.is_empty() && !method.is_empty() && !method.contains('/');
    valid.then_some((service, method))
}

/// One request's bookkeeping: recorded exactly once, by [`Call::finish`] or, if that never
/// happens, as `CANCELLED` when dropped.
#[derive(Debug, Default)]
struct Call(Option<CallInfo>);

/// What a pending call needs in order to be recorded.
#[derive(Debug)]
struct CallInfo {
    /// The `service` label: `package.Service` from the path, or `unknown`.
    service: String,
    /// The `method` label: `Method` from the path, or `unknown`.
    method: String,
    /// When the request reached the middleware; the duration is measured from here.
    start: Instant,
}

impl Call {
    fn start(path: &str) -> Self {
        let (service, method) = split_path(path).unwrap_or((UNKNOWN, UNKNOWN));
        Call(Some(CallInfo {
            service: service.to_owned(),
            method: method.to_owned(),
            start: Instant::now(),
        }))
    }

    fn is_pending(&self) -> bool {
        self.0.is_some()
    }

    /// Records the call with `code`, unless it was recorded already.
    fn finish(&mut self, code: Code) {
        let Some(CallInfo {
            mut service,
            mut method,
            start,
        }) = self.0.take()
        else {
            return;
        };
        if code == Code::Unimplemented {
            UNKNOWN.clone_into(&mut service);
            UNKNOWN.clone_into(&mut method);
        }
        counter!(
            names::GRPC_SERVER_REQUESTS,
            "service" => service.clone(),
            "method" => method.clone(),
            "code" => code_name(code),
        )
        .increment(1);
        histogram!(
            names::GRPC_SERVER_REQUEST_DURATION,
            "service" => service,
            "method" => method,
        )
        .record(start.elapsed());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::{Ready, ready};
    use std::time::Duration;

    use bytes::Bytes;
    use futures::stream;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use hyper::header::HeaderValue;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;
    use crate::metrics::install_recorder;
    use crate::metrics::testutil::sample;

    fn requests(service: &str, method: &str, code: &str) -> f64 {
        let handle = install_recorder().expect("install");
        let labels = [("service", service), ("method", method), ("code", code)];
        sample(&handle.render(), names::GRPC_SERVER_REQUESTS, &labels).unwrap_or(0.0)
    }

    fn timed(service: &str, method: &str) -> f64 {
        let handle = install_recorder().expect("install");
        let name = format!("{}_count", names::GRPC_SERVER_REQUEST_DURATION);
        let labels = [("service", service), ("method", method)];
        sample(&handle.render(), &name, &labels).unwrap_or(0.0)
    }

    /// A service that answers every request with a clone of one canned response.
    struct Canned<B>(fn() -> Response<B>);

    impl<B> Clone for Canned<B> {
        fn clone(&self) -> Self {
            Canned(self.0)
        }
    }

    impl<B> Service<Request<()>> for Canned<B> {
        type Response = Response<B>;
        type Error = Infallible;
        type Future = Ready<Result<Response<B>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            ready(Ok((self.0)()))
        }
    }

    type Frames = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    fn body(frames: Vec<Frame<Bytes>>) -> Frames {
        StreamBody::new(stream::iter(frames.into_iter().map(Ok).collect::<Vec<_>>()))
    }

    fn trailers(code: &'static str) -> Frame<Bytes> {
        let mut map = HeaderMap::new();
        map.insert("grpc-status", HeaderValue::from_static(code));
        Frame::trailers(map)
    }

    async fn call<B: Body>(svc: Canned<B>, path: &str) -> Response<MetricsBody<B>> {
        let request = Request::builder().uri(path).body(()).expect("request");
        let mut svc = GrpcMetrics::new(svc);
        svc.call(request).await.expect("infallible")
    }

    #[tokio::test]
    async fn the_status_in_the_trailers_is_recorded_when_the_body_ends() {
        let svc = Canned(|| Response::new(body(vec![Frame::data("x".into()), trailers("14")])));
        let response = call(svc, "/test.Trailers/Unavailable").await;
        assert_eq!(requests("test.Trailers", "Unavailable", "UNAVAILABLE"), 0.0);
        response.into_body().collect().await.expect("body");
        assert_eq!(requests("test.Trailers", "Unavailable", "UNAVAILABLE"), 1.0);
        assert_eq!(timed("test.Trailers", "Unavailable"), 1.0);
    }

    #[tokio::test]
    async fn the_status_in_the_headers_is_recorded_at_once() {
        let svc = Canned(|| {
            let mut response = Response::new(Empty::<Bytes>::new());
            response
                .headers_mut()
                .insert("grpc-status", HeaderValue::from_static("5"));
            response
        });
        let response = call(svc, "/test.Headers/NotFound").await;
        assert_eq!(requests("test.Headers", "NotFound", "NOT_FOUND"), 1.0);
        // Neither polling nor dropping the body records it again.
        response.into_body().collect().await.expect("body");
        assert_eq!(requests("test.Headers", "NotFound", "NOT_FOUND"), 1.0);
        assert_eq!(requests("test.Headers", "NotFound", "CANCELLED"), 0.0);
    }

    #[tokio::test]
    async fn a_body_that_ends_without_a_status_counts_as_ok() {
        let svc = Canned(|| Response::new(body(vec![Frame::data("x".into())])));
        let response = call(svc, "/test.NoStatus/Ends").await;
        response.into_body().collect().await.expect("body");
        assert_eq!(requests("test.NoStatus", "Ends", "OK"), 1.0);
    }

    #[tokio::test]
    async fn an_empty_body_without_a_status_counts_as_ok_before_it_is_polled() {
        let svc = Canned(|| Response::new(Empty::<Bytes>::new()));
        let response = call(svc, "/test.NoStatus/Empty").await;
        drop(response);
        assert_eq!(requests("test.NoStatus", "Empty", "OK"), 1.0);
        assert_eq!(requests("test.NoStatus", "Empty", "CANCELLED"), 0.0);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_status_counts_as_cancelled() {
        let svc = Canned(|| Response::new(body(vec![Frame::data("x".into()), trailers("0")])));
        let mut body = call(svc, "/test.Dropped/Midway").await.into_body();
        let first = body.frame().await.expect("a frame").expect("infallible");
        assert!(first.is_data());
        drop(body);
        assert_eq!(requests("test.Dropped", "Midway", "CANCELLED"), 1.0);
        assert_eq!(requests("test.Dropped", "Midway", "OK"), 0.0);
    }

    #[tokio::test]
    async fn unimplemented_requests_do_not_create_series_per_path() {
        let svc = Canned(|| {
            let mut response = Response::new(Empty::<Bytes>::new());
            response
                .headers_mut()
                .insert("grpc-status", HeaderValue::from_static("12"));
            response
        });
        let before = requests(UNKNOWN, UNKNOWN, "UNIMPLEMENTED");
        drop(call(svc.clone(), "/made.Up/Path1").await);
        drop(call(svc, "/not-a-grpc-path").await);
        assert_eq!(requests(UNKNOWN, UNKNOWN, "UNIMPLEMENTED"), before + 2.0);
        assert_eq!(requests("made.Up", "Path1", "UNIMPLEMENTED"), 0.0);
    }

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/sync.v1.LockService/Acquire"),
            Some(("sync.v1.LockService", "Acquire"))
        );
        assert_eq!(split_path("/a/b/c"), None);
        assert_eq!(split_path("/a/"), None);
        assert_eq!(split_path("//b"), None);
        assert_eq!(split_path("/a"), None);
        assert_eq!(split_path("a/b"), None);
        assert_eq!(split_path(""), None);
    }

    #[test]
    fn code_names_are_canonical() {
        let names: Vec<&str> = (0..=16).map(|i| code_name(Code::from_i32(i))).collect();
        assert_eq!(
            names,
            [
                "OK",
                "CANCELLED",
                "UNKNOWN",
                "INVALID_ARGUMENT",
                "DEADLINE_EXCEEDED",
                "NOT_FOUND",
                "ALREADY_EXISTS",
                "PERMISSION_DENIED",
                "RESOURCE_EXHAUSTED",
                "FAILED_PRECONDITION",
                "ABORTED",
                "OUT_OF_RANGE",
                "UNIMPLEMENTED",
                "INTERNAL",
                "UNAVAILABLE",
                "DATA_LOSS",
                "UNAUTHENTICATED",
            ]
        );
        assert_eq!(status_in(&HeaderMap::new()), None);
        let mut bogus = HeaderMap::new();
        bogus.insert("grpc-status", HeaderValue::from_static("99"));
        assert_eq!(status_in(&bogus), Some(Code::Unknown));
    }

    /// The real thing: tonic's health service behind the middleware, over a loopback socket.
    #[tokio::test]
    async fn a_tonic_service_is_counted_by_status_code() {
        const SERVICE: &str = "grpc.health.v1.Health";
        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(GrpcMetrics::new(health))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                }),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut client = HealthClient::new(channel);

        let ok_before = requests(SERVICE, "Check", "OK");
        let not_found_before = requests(SERVICE, "Check", "NOT_FOUND");
        let timed_before = timed(SERVICE, "Check");

        // The overall server status "" is registered: a normal response, status in trailers.
        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("check ''");
        // An unknown service: tonic answers trailers-only, status in the headers.
        let err = client
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .expect_err("unknown service");
        assert_eq!(err.code(), Code::NotFound);

        // The server records when it has sent the trailers, which may be just after the
        // client has them.
        let deadline = Instant::now() + Duration::from_secs(5);
        while requests(SERVICE, "Check", "OK") < ok_before + 1.0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(requests(SERVICE, "Check", "OK"), ok_before + 1.0);
        assert_eq!(
            requests(SERVICE, "Check", "NOT_FOUND"),
            not_found_before + 1.0
        );
        assert_eq!(timed(SERVICE, "Check"), timed_before + 2.0);

        // A server stream the client abandons: counted as cancelled once the server notices.
        let cancelled_before = requests(SERVICE, "Watch", "CANCELLED");
        let mut watch = client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("watch")
            .into_inner();
        watch
            .message()
            .await
            .expect("first status")
            .expect("a message");
        drop(watch);
        let deadline = Instant::now() + Duration::from_secs(5);
        while requests(SERVICE, "Watch", "CANCELLED") < cancelled_before + 1.0
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            requests(SERVICE, "Watch", "CANCELLED"),
            cancelled_before + 1.0
        );

        stop_tx.send(()).expect("server running");
        server.await.expect("server task").expect("server");
    }
}
