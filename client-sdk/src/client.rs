//! The client: configuration, routing of each call to the node that should serve it, and the
//! retry loop every call goes through.
//!
//! # How a call is sent
//!
//! [`Client::unary`] runs one logical call as a series of attempts inside an overall deadline:
//!
//! 1. Pick a node: for a call that must run on the leader, the leader the client believes in;
//!    if it knows none, it asks every member for `Cluster.Status` first ([`Router::discover`]),
//!    and if still none is known it sends to any member, which forwards or says who leads.
//! 2. Send the attempt with a per-attempt timeout (also sent to the server as `grpc-timeout`).
//! 3. On failure, decide:
//!    - the node named another leader in `x-sync-leader-addr` (UNAVAILABLE, or
//!      FAILED_PRECONDITION with `x-sync-leader-id`): retry there at once;
//!    - the connection failed or broke, or the node answered UNAVAILABLE: forget the leader,
//!      back off, retry (discovering again);
//!    - DEADLINE_EXCEEDED: retry only if the call is safe to repeat (it is read-only or carries a
//!      RequestHeader), and, for an Acquire, only while its wait has not run out;
//!    - anything else is the answer: map it to an [`Error`].
//!
//! Every attempt of a mutating call carries the same `RequestHeader` (see `header.rs`), so the
//! cluster applies it once however many attempts reach it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::error::{CallKind, Error, Result, joined_reasons, transport_reason};
use crate::header::{Sequencer, Ticket};
use crate::routing::{LEADER_ID, Router, leader_hint};
use crate::tls::TlsOptions;

/// Extra time the client waits beyond an attempt's gRPC deadline before giving up on it by
/// itself, so that the server's DEADLINE_EXCEEDED (with its message) normally arrives first.
const CLIENT_GRACE: Duration = Duration::from_millis(250);

/// When and how often a failed call is tried again.
///
/// Retries happen only for failures that a retry can fix (unreachable node, no leader, a
/// not-leader answer, a timeout of a call that is safe to repeat) and only inside the call's
/// overall deadline ([`ClientBuilder::deadline`]). The pause before retry `n` is
/// `initial_backoff * 2^(n-1)`, at most `max_backoff`, with ±25 % jitter; following a node's
/// hint to another leader is retried at once.
///
/// ```
/// use std::time::Duration;
/// use sync_client::RetryPolicy;
///
/// let patient = RetryPolicy {
///     max_attempts: 20,
///     initial_backoff: Duration::from_millis(20),
///     max_backoff: Duration::from_secs(2),
/// };
/// assert!(patient.max_attempts > RetryPolicy::default().max_attempts);
/// assert_eq!(RetryPolicy::none().max_attempts, 1);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included (at least 1).
    pub max_attempts: u32,
    /// The pause before the first retry.
    pub initial_backoff: Duration,
    /// The longest pause between two attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 10 attempts, backing off from 50 ms to at most 1 s: rides out a leader election (about
    /// one election timeout, 1 s by default) with room to spare.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// One attempt per call, no retries.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The pause before retry number `retry` (1-based), with jitter.
    fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)));
        let base = exp.min(self.max_backoff);
        base.mul_f64(0.75 + rand::random::<f64>() * 0.5)
    }
}

/// Client settings; see [`ClientBuilder`].
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) deadline: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) auth: Option<AsciiMetadataValue>,
    pub(crate) client_name: String,
    pub(crate) stale_reads: bool,
    /// TLS towards every member, when the cluster serves it.
    pub(crate) tls: Option<TlsOptions>,
}

/// Builds a [`Client`] with settings other than the defaults.
///
/// ```no_run
/// # async fn demo() -> sync_client::Result<()> {
/// use std::time::Duration;
/// use sync_client::{Client, RetryPolicy};
///
/// let client = Client::builder(["10.0.0.5:7001", "10.0.0.6:7001", "10.0.0.7:7001"])
///     .connect_timeout(Duration::from_secs(1))
///     .request_timeout(Duration::from_secs(2))
///     .deadline(Duration::from_secs(10))
///     .retry(RetryPolicy { max_attempts: 5, ..RetryPolicy::default() })
///     .client_name("billing-worker-3")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
///
/// For a cluster that serves TLS (`syncd --cert-file ...`), give the CA with
/// [`tls`](ClientBuilder::tls); see [`TlsOptions`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    config: Config,
    auth_error: Option<String>,
}

impl ClientBuilder {
    /// How long opening a connection to one member may take. Default 2 s.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.config.connect_timeout = d;
        self
    }

    /// How long one attempt of a call may take (sent to the server as the gRPC deadline). An
    /// Acquire gets its wait timeout on top. Default 5 s.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.config.request_timeout = d;
        self
    }

    /// How long one call may take in all, retries included. An Acquire gets its wait timeout
    /// on top. Default 15 s.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.config.deadline = d;
        self
    }

    /// The retry policy. Default: [`RetryPolicy::default`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// A bearer token sent as `authorization: Bearer TOKEN` on every call. (syncd does not
    /// check it yet; it is for a proxy in front of the cluster.)
    pub fn auth_token(mut self, token: impl AsRef<str>) -> Self {
        match MetadataValue::try_from(format!("Bearer {}", token.as_ref())) {
            Ok(v) => self.config.auth = Some(v),
            Err(_) => self.auth_error = Some("the auth token is not printable ASCII".to_owned()),
        }
        self
    }

    /// The name sessions opened by this client carry: shown to others in lock holders and
    /// waiters, and in `syncctl session list`. At most 256 bytes. Default: empty.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.config.client_name = name.into();
        self
    }

    /// Serve reads (GetLock, ListLocks, ListSessions, ValidateToken) from any member's replica
    /// (CONSISTENCY_STALE) instead of linearizably through the leader. Faster and available
    /// without a leader, but may miss the latest writes. Default: false.
    pub fn stale_reads(mut self, stale: bool) -> Self {
        self.config.stale_reads = stale;
        self
    }

    /// Speak TLS to every member: verify their certificates against the CA in `options`, and
    /// present a client certificate if it has one. Without this the client speaks plaintext,
    /// and `https://` endpoints are refused. The PEM material is checked by
    /// [`connect`](ClientBuilder::connect), which fails with [`Error::Tls`] if it is unusable.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use sync_client::{Client, TlsOptions};
    ///
    /// let ca = std::fs::read("certs/ca.pem")?;
    /// let client = Client::builder(["https://127.0.0.1:7001"])
    ///     .tls(TlsOptions::from_ca_pem(ca).domain_name("syncd.internal"))
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn tls(mut self, options: TlsOptions) -> Self {
        self.config.tls = Some(options);
        self
    }

    /// Connects: asks every endpoint at once for the cluster's members and leader. Fails with
    /// [`Error::Unavailable`] if none answers within the connect timeout; succeeds without a
    /// leader (calls then wait for one, inside their deadline).
    pub async fn connect(self) -> Result<Client> {
        if let Some(reason) = self.auth_error {
            return Err(Error::InvalidEndpoint {
                endpoint: "auth token".to_owned(),
                reason,
            });
        }
        let client = Client {
            inner: Arc::new(Inner {
                router: Router::new(
                    &self.endpoints,
                    self.config.connect_timeout,
                    self.config
                        .tls
                        .as_ref()
                        .map(TlsOptions::build)
                        .transpose()?,
                )?,
                sequencer: Sequencer::new(),
                config: self.config,
                retries: AtomicU64::new(0),
            }),
        };
        client.first_contact().await?;
        Ok(client)
    }
}

/// A connection to a syncd cluster. Cheap to clone: clones share connections, the view of the
/// cluster, and the de-duplication identity (one `client_id`, one sequence counter).
///
/// Every call is routed to the node that should serve it and retried on retryable failures
/// inside its deadline; see the crate documentation.
///
/// ```no_run
/// # async fn demo() -> sync_client::Result<()> {
/// use sync_client::Client;
///
/// let client = Client::connect(["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]).await?;
/// println!("leader: {:?}, members: {:?}", client.leader(), client.members());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) router: Router,
    sequencer: Arc<Sequencer>,
    pub(crate) config: Config,
    /// Attempts beyond the first, over the client's life (for observability and tests).
    retries: AtomicU64,
}

/// Which node a call must reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The leader (mutations, linearizable reads).
    Leader,
    /// Any member (stale reads, watches).
    Any,
    /// The member with this node id, and no other: calls whose answer depends on the node
    /// that serves it (a cache line's state, a node-local snapshot). Never redirected to the
    /// leader; retried on the same node while it cannot be reached.
    Node(u64),
}

/// How to send and retry one logical call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallSpec {
    /// What the answer's codes mean.
    pub(crate) kind: CallKind,
    /// Where it goes.
    pub(crate) target: Target,
    /// True if repeating it is harmless: it is read-only, or carries a RequestHeader.
    pub(crate) repeatable: bool,
    /// Time the server may legitimately spend waiting (an Acquire's wait), added to the
    /// per-attempt timeout and to the deadline; after it has passed, a DEADLINE_EXCEEDED is
    /// the answer, not a reason to retry.
    pub(crate) wait: Duration,
}

impl CallSpec {
    /// A read: repeatable, to the leader unless reads are stale.
    pub(crate) fn read(client: &Client) -> CallSpec {
        CallSpec {
            kind: CallKind::Other,
            target: if client.inner.config.stale_reads {
                Target::Any
            } else {
                Target::Leader
            },
            repeatable: true,
            wait: Duration::ZERO,
        }
    }

    /// A mutation on the leader carrying a RequestHeader.
    pub(crate) fn write(kind: CallKind) -> CallSpec {
        CallSpec {
            kind,
            target: Target::Leader,
            repeatable: true,
            wait: Duration::ZERO,
        }
    }
}

/// What to do after a failed attempt.
enum Next {
    /// Retry at once on the node the answer named.
    Redirect,
    /// Back off, then retry; the server's answer, if one came, is kept for the final error.
    Retry(Option<Error>),
    /// Stop: this is the answer.
    Fail(Error),
}

impl Client {
    /// Connects with the default settings; see [`ClientBuilder::connect`].
    ///
    /// `endpoints` are `host:port` (or `http://host:port`) addresses of some members; the others
    /// are learned from the cluster.
    pub async fn connect<I, S>(endpoints: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Client::builder(endpoints).connect().await
    }

    /// A builder to change timeouts, retries, the auth token or the client name before
    /// connecting.
    pub fn builder<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        ClientBuilder {
            endpoints: endpoints
                .into_iter()
                .map(|e| e.as_ref().to_owned())
                .collect(),
            config: Config {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(5),
                deadline: Duration::from_secs(15),
                retry: RetryPolicy::default(),
                auth: None,
                client_name: String::new(),
                stale_reads: false,
                tls: None,
            },
            auth_error: None,
        }
    }

    /// The leader's address as this client last learned it, if any.
    pub fn leader(&self) -> Option<String> {
        self.inner.router.leader()
    }

    /// The member addresses this client knows: the endpoints given, and those the cluster
    /// reported.
    pub fn members(&self) -> Vec<String> {
        self.inner.router.members()
    }

    /// This client's de-duplication id (`RequestHeader.client_id`): random, nonzero, shared by
    /// its clones.
    pub fn client_id(&self) -> u64 {
        self.inner.sequencer.client_id()
    }

    /// How many attempts this client (and its clones) made beyond the first attempt of each
    /// call: redirects to the leader and retries after failures.
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// The name given with [`ClientBuilder::client_name`].
    pub fn client_name(&self) -> &str {
        &self.inner.config.client_name
    }

    /// A header for a new mutating call.
    pub(crate) fn ticket(&self) -> Ticket {
        self.inner.sequencer.ticket()
    }

    /// Asks every endpoint once, at the same time. Fails at once if none answers: retrying
    /// does not start a cluster, and a person at a terminal wants to know now.
    async fn first_contact(&self) -> Result<()> {
        let config = &self.inner.config;
        let found = self
            .inner
            .router
            .discover(config.connect_timeout.min(config.request_timeout))
            .await;
        if found.answered > 0 {
            Ok(())
        } else {
            Err(unreachable(&found.failures))
        }
    }

    /// The node the next attempt goes to; `Err(failures)` if none could be reached.
    async fn pick(
        &self,
        target: Target,
        avoid: Option<&str>,
        remaining: Duration,
    ) -> Result<String, Vec<(String, String)>> {
        let router = &self.inner.router;
        if let Target::Node(id) = target {
            return router.address_of(id).ok_or_else(|| {
                vec![(
                    format!("node {id}"),
                    "not a member of the cluster".to_owned(),
                )]
            });
        }
        if let Some(leader) = router.leader() {
            return Ok(leader);
        }
        if target == Target::Any {
            return Ok(router.next_member(avoid));
        }
        let probe = self.inner.config.connect_timeout.min(remaining);
        let found = router.discover(probe).await;
        if let Some(leader) = router.leader() {
            return Ok(leader);
        }
        if found.answered == 0 {
            return Err(found.failures);
        }
        // Members answer but none knows a leader: any of them will say so, or forward once
        // one is elected.
        Ok(router.next_member(avoid))
    }

    /// A channel to a member for a streaming call, chosen like the first attempt of a unary
    /// call of `target`.
    pub(crate) async fn stream_channel(&self, target: Target) -> Result<(String, Channel)> {
        let remaining = self.inner.config.deadline;
        let address = self
            .pick(target, None, remaining)
            .await
            .map_err(|failures| unreachable(&failures))?;
        let channel = self.inner.router.channel(&address)?;
        Ok((address, channel))
    }

    /// A request with the per-attempt timeout and the auth token.
    pub(crate) fn request<T>(&self, message: T, timeout: Option<Duration>) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(t) = timeout {
            request.set_timeout(t);
        }
        if let Some(auth) = &self.inner.config.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }

    /// Runs one logical unary call: `send` performs one attempt on a channel. See the module
    /// documentation for the retry rules.
    pub(crate) async fn unary<Req, Resp, F, Fut>(
        &self,
        spec: CallSpec,
        message: Req,
        send: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let config = &self.inner.config;
        let start = Instant::now();
        let deadline = start + config.deadline + spec.wait;
        let wait_ends = start + spec.wait;
        // Members that could not be reached, with why: the error if no server ever answers.
        let mut unreachable_at: Vec<(String, String)> = Vec::new();
        // The last retryable answer a server gave (no leader, a timeout): the error otherwise.
        let mut last: Option<Error> = None;
        let mut previous: Option<String> = None;
        let mut backoffs = 0;
        let attempts = config.retry.max_attempts.max(1);
        for attempt in 1..=attempts {
            if attempt > 1 {
                self.inner.retries.fetch_add(1, Ordering::Relaxed);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let next = match self.pick(spec.target, previous.as_deref(), remaining).await {
                Err(failures) => {
                    note_failures(&mut unreachable_at, failures);
                    Next::Retry(None)
                }
                Ok(address) => {
                    let channel = self.inner.router.channel(&address)?;
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let timeout = (config.request_timeout + spec.wait).min(remaining);
                    let request = self.request(message.clone(), Some(timeout));
                    let outcome =
                        tokio::time::timeout(timeout + CLIENT_GRACE, send(channel, request)).await;
                    let next = match outcome {
                        Ok(Ok(response)) => return Ok(response.into_inner()),
                        Ok(Err(status)) => {
                            self.judge(&spec, &address, &status, wait_ends, &mut unreachable_at)
                        }
                        Err(_) => {
                            // No answer at all, not even the server's DEADLINE_EXCEEDED: a hung
                            // or cut-off node. Try another.
                            self.inner.router.forget_leader(&address);
                            let err = Error::Timeout {
                                message: format!(
                                    "{address} did not answer within {}",
                                    humanize(timeout)
                                ),
                            };
                            if spec.repeatable && spec.wait.is_zero() {
                                Next::Retry(Some(err))
                            } else {
                                Next::Fail(err)
                            }
                        }
                    };
                    previous = Some(address);
                    next
                }
            };
            match next {
                Next::Fail(err) => return Err(err),
                Next::Redirect => {}
                Next::Retry(answer) => {
                    if answer.is_some() {
                        last = answer;
                    }
                    backoffs += 1;
                    let pause = config.retry.backoff(backoffs);
                    if attempt == attempts || Instant::now() + pause >= deadline {
                        break;
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }
        Err(match last {
            Some(answer) => answer,
            None if !unreachable_at.is_empty() => unreachable(&unreachable_at),
            None => Error::Timeout {
                message: format!(
                    "no answer within {} ({} attempts)",
                    humanize(config.deadline + spec.wait),
                    attempts
                ),
            },
        })
    }

    /// Decides what a failed attempt on `address` means (see the module documentation).
    fn judge(
        &self,
        spec: &CallSpec,
        address: &str,
        status: &Status,
        wait_ends: Instant,
        unreachable_at: &mut Vec<(String, String)>,
    ) -> Next {
        let router = &self.inner.router;
        if let Some(reason) = transport_reason(status) {
            router.forget_leader(address);
            note_failures(unreachable_at, vec![(address.to_owned(), reason)]);
            return if spec.repeatable {
                Next::Retry(None)
            } else {
                Next::Fail(unreachable(unreachable_at))
            };
        }
        // A call aimed at one node is about that node: another leader is no better.
        let hint = leader_hint(status).filter(|_| !matches!(spec.target, Target::Node(_)));
        match status.code() {
            Code::Unavailable | Code::FailedPrecondition
                if hint.is_some() && hint.as_deref() != Some(address) =>
            {
                if status.code() == Code::Unavailable || status.metadata().get(LEADER_ID).is_some()
                {
                    if let Some(leader) = hint {
                        router.set_leader(&leader);
                    }
                    return Next::Redirect;
                }
                Next::Fail(Error::from_status(status, spec.kind))
            }
            Code::Unavailable => {
                router.forget_leader(address);
                Next::Retry(Some(Error::from_status(status, spec.kind)))
            }
            // A server-side deadline before an Acquire's wait ran out (a commit that did not
            // make it, e.g. no quorum) or of any other repeatable call: try again.
            Code::DeadlineExceeded
                if spec.repeatable && (spec.wait.is_zero() || Instant::now() < wait_ends) =>
            {
                router.forget_leader(address);
                Next::Retry(Some(Error::from_status(status, spec.kind)))
            }
            _ => Next::Fail(Error::from_status(status, spec.kind)),
        }
    }
}

/// Adds failures, keeping the first reason per address and the order of first failure.
fn note_failures(into: &mut Vec<(String, String)>, failures: Vec<(String, String)>) {
    for (address, reason) in failures {
        match into.iter_mut().find(|(a, _)| *a == address) {
            Some(entry) => entry.1 = reason,
            None => into.push((address, reason)),
        }
    }
}

/// [`Error::Unavailable`] from the members that could not be reached.
pub(crate) fn unreachable(failures: &[(String, String)]) -> Error {
    Error::Unavailable {
        tried: failures.iter().map(|(a, _)| a.clone()).collect(),
        reason: joined_reasons(failures.iter().map(|(_, r)| r.as_str())),
    }
}

/// "1.5s", "250ms".
pub(crate) fn humanize(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        for (retry, base) in [(1, 100), (2, 200), (3, 350), (9, 350)] {
            let d = p.backoff(retry).as_millis() as u64;
            assert!(d >= base * 3 / 4 && d <= base * 5 / 4, "retry {retry}: {d}");
        }
    }

    #[test]
    fn failures_keep_their_first_order_and_latest_reason() {
        let mut f = Vec::new();
        note_failures(&mut f, vec![("a:1".into(), "refused".into())]);
        note_failures(
            &mut f,
            vec![
                ("b:1".into(), "refused".into()),
                ("a:1".into(), "reset".into()),
            ],
        );
        assert_eq!(
            unreachable(&f).to_string(),
            "no member reachable at a:1, b:1: reset / refused; is the cluster running? try \
             `syncctl dev up`"
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(humanize(Duration::from_millis(250)), "250ms");
        assert_eq!(humanize(Duration::from_secs(2)), "2s");
        assert_eq!(humanize(Duration::from_millis(1500)), "1.5s");
    }
}
