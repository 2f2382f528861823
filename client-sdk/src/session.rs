//! Sessions: the leases that hold locks, and the background task that keeps them alive.
//!
//! A [`Session`] opened with [`Client::session`] renews itself over one `Lock/KeepAlive` stream,
//! sending a renewal every TTL/3 and waiting for each answer. If the stream breaks (the serving
//! node died or lost leadership) the task reopens it on the leader, discovering it again, until
//! the session's TTL has passed since the last renewal the cluster confirmed. The session is then
//! *lost*, as it is when a renewal is answered with TTL 0 (the cluster no longer knows it): every
//! lock it held is gone, and [`Session::lost`] completes. The TTL is counted from when the last
//! confirmed renewal was *sent*, so the client declares the loss no later than the cluster can
//! expire the session.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::lock_client::LockClient;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout_at};
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{CallSpec, Client, Target};
use crate::error::{CallKind, Error, Result};
use crate::guard::LockRequest;
use crate::routing::leader_hint;

/// A session (lease) on the cluster: the owner of locks. Cheap to clone; clones share the
/// session, and [`LockGuard`](crate::LockGuard)s hold a clone.
///
/// When the last clone of a session opened with [`Client::session`] is dropped, its keep-alive
/// stops and the session is revoked in the background (its locks are released at once rather
/// than at expiry). Use [`detach`](Session::detach) to leave it open instead.
///
/// ```no_run
/// # async fn demo() -> sync_client::Result<()> {
/// use std::time::Duration;
/// use sync_client::Client;
///
/// let client = Client::connect(["127.0.0.1:7001"]).await?;
/// let session = client.session(Duration::from_secs(10)).await?;
/// let guard = session.lock("reports/daily").exclusive().acquire().await?;
/// tokio::select! {
///     _ = session.lost() => eprintln!("session lost: stop touching the resource"),
///     _ = tokio::time::sleep(Duration::from_secs(1)) => println!("work done with token {}", guard.token()),
/// }
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Session {
    pub(crate) inner: Arc<SessionInner>,
}

#[derive(Debug)]
pub(crate) struct SessionInner {
    pub(crate) client: Client,
    /// The session id.
    id: u64,
    /// The TTL the cluster granted.
    ttl: Duration,
    /// Becomes true once the session is lost (or revoked through this handle).
    lost: watch::Receiver<bool>,
    /// The sending side of `lost`, shared with the keep-alive task.
    lost_tx: Arc<watch::Sender<bool>>,
    /// The keep-alive task, if this handle keeps the session alive.
    keep_alive: Mutex<Option<JoinHandle<()>>>,
    /// True if dropping the last handle revokes the session (opened here and not detached).
    owned: AtomicBool,
}

/// Opens a session with settings; from [`Client::session_builder`].
///
/// ```no_run
/// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
/// use std::time::Duration;
///
/// let session = client
///     .session_builder()
///     .ttl(Duration::from_secs(30))
///     .client_name("nightly-report")
///     .create()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SessionBuilder {
    client: Client,
    ttl: Duration,
    client_name: Option<String>,
    keep_alive: bool,
}

impl SessionBuilder {
    /// How long the session lives without a keep-alive: 1 s to 10 min. Default: the server's
    /// default (10 s).
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// use std::time::Duration;
    /// let session = client.session_builder().ttl(Duration::from_secs(60)).create().await?;
    /// # Ok(()) }
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The name shown in lock holders and waiters. Default: the client's
    /// [`client_name`](crate::ClientBuilder::client_name).
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = Some(name.into());
        self
    }

    /// Whether a background task keeps the session alive (default true). Without it the
    /// session expires after its TTL unless renewed with [`Session::keep_alive_once`], and
    /// [`Session::lost`] never completes.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// // A session another process will keep alive (by id, with `attach_session`).
    /// let id = client.session_builder().keep_alive(false).create().await?.detach();
    /// # Ok(()) }
    /// ```
    pub fn keep_alive(mut self, on: bool) -> Self {
        self.keep_alive = on;
        self
    }

    /// Opens the session.
    ///
    /// Errors: [`Error::InvalidArgument`] for a TTL out of bounds or a name over 256 bytes,
    /// [`Error::ResourceExhausted`] at the server's session limit, and the usual
    /// unavailability errors.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let session = client.session_builder().create().await?;
    /// # Ok(()) }
    /// ```
    pub async fn create(self) -> Result<Session> {
        let client = self.client;
        let ticket = client.ticket();
        let request = api::CreateSessionRequest {
            header: ticket.header(),
            ttl_ms: self.ttl.as_millis().try_into().unwrap_or(u64::MAX),
            client_name: self
                .client_name
                .unwrap_or_else(|| client.client_name().to_owned()),
        };
        // The cluster starts the TTL when it applies the call, after this.
        let sent = Instant::now();
        let answer = client
            .unary(
                CallSpec::write(CallKind::Session),
                request,
                |ch, r| async move { LockClient::new(ch).create_session(r).await },
            )
            .await?;
        drop(ticket);
        let ttl = Duration::from_millis(answer.ttl_ms);
        let renewed_at = self.keep_alive.then_some(sent);
        Ok(Session::new(
            client,
            answer.session_id,
            ttl,
            renewed_at,
            true,
        ))
    }
}

impl Client {
    /// Opens a session with `ttl` (1 s to 10 min) that keeps itself alive in the background.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let session = client.session(std::time::Duration::from_secs(10)).await?;
    /// println!("session {} (ttl {:?})", session.id(), session.ttl());
    /// # Ok(()) }
    /// ```
    pub async fn session(&self, ttl: Duration) -> Result<Session> {
        self.session_builder().ttl(ttl).create().await
    }

    /// A builder for a session with a client name, or without keep-alive.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let session = client.session_builder().client_name("worker-1").create().await?;
    /// # Ok(()) }
    /// ```
    pub fn session_builder(&self) -> SessionBuilder {
        SessionBuilder {
            client: self.clone(),
            ttl: Duration::ZERO,
            client_name: None,
            keep_alive: true,
        }
    }

    /// A handle on an existing session, by id (for example one opened by another process and
    /// passed along). Renews it once to check that it exists and to learn its TTL. The handle
    /// does not keep the session alive, and dropping it does not revoke it.
    ///
    /// Errors: [`Error::SessionExpired`] if the session does not exist or has expired.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let session = client.attach_session(42).await?;
    /// println!("attached to session {} (ttl {:?})", session.id(), session.ttl());
    /// # Ok(()) }
    /// ```
    pub async fn attach_session(&self, session_id: u64) -> Result<Session> {
        let ttl = self.keep_alive_once(session_id).await?;
        Ok(Session::new(self.clone(), session_id, ttl, None, false))
    }

    /// Renews session `session_id` once, for a full TTL; returns the TTL.
    ///
    /// Errors: [`Error::SessionExpired`] if the session does not exist or has expired.
    pub async fn keep_alive_once(&self, session_id: u64) -> Result<Duration> {
        let request = api::KeepAliveRequest { session_id };
        // Renewing twice is harmless: repeatable without a RequestHeader.
        let answer = self
            .unary(
                CallSpec::write(CallKind::Session),
                request,
                |ch, r| async move { LockClient::new(ch).keep_alive_once(r).await },
            )
            .await?;
        Ok(Duration::from_millis(answer.ttl_ms))
    }

    /// Ends session `session_id` now: its locks are released and its waits fail. Returns the
    /// names of the locks it held.
    ///
    /// Errors: [`Error::SessionExpired`] if the session does not exist or has expired.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let released = client.revoke_session(42).await?;
    /// println!("released {released:?}");
    /// # Ok(()) }
    /// ```
    pub async fn revoke_session(&self, session_id: u64) -> Result<Vec<String>> {
        let ticket = self.ticket();
        let request = api::RevokeSessionRequest {
            header: ticket.header(),
            session_id,
        };
        let answer = self
            .unary(
                CallSpec::write(CallKind::Session),
                request,
                |ch, r| async move { LockClient::new(ch).revoke_session(r).await },
            )
            .await?;
        Ok(answer.released_locks)
    }
}

impl Session {
    /// A handle on session `id`: kept alive from `renewed_at` (when it was last renewed) if
    /// given, and revoked when the last clone is dropped if `owned`.
    fn new(
        client: Client,
        id: u64,
        ttl: Duration,
        renewed_at: Option<Instant>,
        owned: bool,
    ) -> Session {
        let (lost_tx, lost) = watch::channel(false);
        let lost_tx = Arc::new(lost_tx);
        let keep_alive = renewed_at.map(|at| {
            tokio::spawn(keep_alive(
                client.clone(),
                id,
                ttl,
                Arc::clone(&lost_tx),
                at,
            ))
        });
        Session {
            inner: Arc::new(SessionInner {
                owned: AtomicBool::new(owned),
                client,
                id,
                ttl,
                lost,
                lost_tx,
                keep_alive: Mutex::new(keep_alive),
            }),
        }
    }

    /// The session id.
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// println!("session {} with a ttl of {:?}", session.id(), session.ttl());
    /// # Ok(()) }
    /// ```
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The TTL the cluster granted.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The client the session belongs to.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Starts a lock request owned by this session: set the mode and the wait, then
    /// [`acquire`](LockRequest::acquire) or [`try_acquire`](LockRequest::try_acquire).
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// use std::time::Duration;
    /// let guard = session
    ///     .lock("inventory")
    ///     .shared()
    ///     .timeout(Duration::from_secs(5))
    ///     .acquire()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn lock(&self, name: impl Into<String>) -> LockRequest {
        LockRequest::new(self.clone(), name.into())
    }

    /// Completes when the session is lost: a renewal was answered "unknown session" (it
    /// expired, or was revoked by someone), or its TTL passed without a confirmed renewal (the
    /// cluster was unreachable). From then on it holds no lock. Also completes after
    /// [`revoke`](Session::revoke). Never completes for a session without keep-alive.
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// tokio::select! {
    ///     _ = session.lost() => eprintln!("session {} lost: stop using its locks", session.id()),
    ///     _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn lost(&self) {
        let mut lost = self.inner.lost.clone();
        // An error means the sender is gone, which happens only with the session itself.
        let _ = lost.wait_for(|l| *l).await;
    }

    /// True once the session is lost (see [`lost`](Session::lost)).
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// if session.is_lost() {
    ///     return Ok(());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn is_lost(&self) -> bool {
        *self.inner.lost.borrow()
    }

    /// A receiver that turns `true` when the session is lost, for `select!` loops that keep
    /// their own state.
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// let mut lost = session.lost_signal();
    /// lost.wait_for(|&gone| gone).await.ok();
    /// # Ok(()) }
    /// ```
    pub fn lost_signal(&self) -> watch::Receiver<bool> {
        self.inner.lost.clone()
    }

    /// Renews the session once, now (the background task does this by itself); returns the
    /// TTL.
    pub async fn keep_alive_once(&self) -> Result<Duration> {
        self.inner.client.keep_alive_once(self.inner.id).await
    }

    /// Releases this session's hold on lock `name`, without a guard (e.g. a lock acquired by
    /// another process in this session, or a detached guard).
    ///
    /// Errors: [`Error::NotHeld`] if the session does not hold it; [`Error::SessionExpired`]
    /// if the session is gone (and its locks with it).
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// let guard = session.lock("k").acquire().await?;
    /// guard.detach();
    /// session.release("k").await?;
    /// # Ok(()) }
    /// ```
    pub async fn release(&self, name: &str) -> Result<()> {
        let client = &self.inner.client;
        let ticket = client.ticket();
        let request = api::ReleaseRequest {
            header: ticket.header(),
            name: name.to_owned(),
            session_id: self.inner.id,
            client_id: String::new(),
        };
        let answer = client
            .unary(
                CallSpec::write(CallKind::Release),
                request,
                |ch, r| async move { LockClient::new(ch).release(r).await },
            )
            .await?;
        if answer.released {
            Ok(())
        } else {
            // Servers following lock.proto's first wording answer OK with `released` false.
            Err(Error::NotHeld {
                message: format!("session {} does not hold lock `{name}`", self.inner.id),
            })
        }
    }

    /// Ends the session now: every lock it holds is released, every wait fails. Returns the
    /// names of the locks it held. [`lost`](Session::lost) completes afterwards.
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// let released = session.revoke().await?;
    /// # Ok(()) }
    /// ```
    pub async fn revoke(&self) -> Result<Vec<String>> {
        self.inner.stop_keep_alive();
        self.inner.owned.store(false, Ordering::Relaxed);
        let result = self.inner.client.revoke_session(self.inner.id).await;
        self.inner.lost_tx.send_replace(true);
        result
    }

    /// Stops keeping the session alive and leaves it open: it expires after its TTL unless
    /// someone renews it (e.g. `syncctl session keepalive ID`). Returns its id.
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// // Hand the session (and its locks) to another process, which attaches by id.
    /// let id = session.detach();
    /// # Ok(()) }
    /// ```
    pub fn detach(self) -> u64 {
        self.inner.stop_keep_alive();
        self.inner.owned.store(false, Ordering::Relaxed);
        self.inner.id
    }
}

impl SessionInner {
    fn stop_keep_alive(&self) {
        let task = self
            .keep_alive
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        self.stop_keep_alive();
        if !self.owned.load(Ordering::Relaxed) || *self.lost.borrow() {
            return;
        }
        // Best effort: without a runtime (dropped outside one) the session simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let id = self.id;
            runtime.spawn(async move {
                if let Err(e) = client.revoke_session(id).await {
                    tracing::debug!(session = id, error = %e, "revoking a dropped session failed; it will expire");
                }
            });
        }
    }
}

/// How a keep-alive stream ended.
enum StreamEnd {
    /// The cluster answered TTL 0: the session is gone.
    Expired,
    /// The stream broke or stopped answering; reopen it.
    Broken(String),
}

/// Keeps session `id` alive until it is lost or the task is aborted (see the module docs).
async fn keep_alive(
    client: Client,
    id: u64,
    ttl: Duration,
    lost: Arc<watch::Sender<bool>>,
    mut renewed_at: Instant,
) {
    let retry = client.inner.config.retry.clone();
    let mut failures = 0u32;
    loop {
        match keep_alive_stream(&client, id, ttl, &mut renewed_at).await {
            StreamEnd::Expired => {
                tracing::warn!(
                    session = id,
                    "the cluster no longer knows the session: lost"
                );
                break;
            }
            StreamEnd::Broken(reason) => {
                tracing::debug!(session = id, %reason, "keep-alive stream broke; reopening");
            }
        }
        let expires = renewed_at + ttl;
        if Instant::now() >= expires {
            tracing::warn!(session = id, "no renewal confirmed within the TTL: lost");
            break;
        }
        failures += 1;
        let pause = (retry.initial_backoff * failures).min(retry.max_backoff);
        sleep(pause.min(expires.saturating_duration_since(Instant::now()))).await;
    }
    lost.send_replace(true);
}

/// One keep-alive stream: renews every TTL/3 until the stream fails or the session is gone.
/// `renewed_at` is moved to the sending time of each confirmed renewal.
async fn keep_alive_stream(
    client: &Client,
    id: u64,
    ttl: Duration,
    renewed_at: &mut Instant,
) -> StreamEnd {
    let period = ttl / 3;
    let request_timeout = client.inner.config.request_timeout;
    let expires = *renewed_at + ttl;
    let (address, channel) = match timeout_at(expires, client.stream_channel(Target::Leader)).await
    {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return StreamEnd::Broken(e.to_string()),
        Err(_) => return StreamEnd::Broken("no member reachable".to_owned()),
    };
    let router = &client.inner.router;
    let (tx, rx) = mpsc::channel(1);
    let request = client.request(ReceiverStream::new(rx), None);
    let mut lock = LockClient::new(channel);
    let opened = timeout_at(Instant::now() + request_timeout, lock.keep_alive(request));
    // Queue the first renewal before waiting for the stream to open: tonic sends the request
    // headers with the first message.
    let mut sent = Instant::now();
    if tx
        .send(api::KeepAliveRequest { session_id: id })
        .await
        .is_err()
    {
        return StreamEnd::Broken("stream closed".to_owned());
    }
    let mut responses = match opened.await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => {
            router.forget_leader(&address);
            return StreamEnd::Broken(status.message().to_owned());
        }
        Err(_) => {
            router.forget_leader(&address);
            return StreamEnd::Broken(format!("{address} did not open the stream"));
        }
    };
    loop {
        let limit = (sent + request_timeout).min(*renewed_at + ttl);
        match timeout_at(limit, responses.message()).await {
            Ok(Ok(Some(r))) if r.ttl_ms == 0 => return StreamEnd::Expired,
            Ok(Ok(Some(_))) => *renewed_at = sent,
            Ok(Ok(None)) => {
                router.forget_leader(&address);
                return StreamEnd::Broken(format!("{address} ended the stream"));
            }
            Ok(Err(status)) => {
                match leader_hint(&status) {
                    Some(leader) if leader != address => router.set_leader(&leader),
                    _ => router.forget_leader(&address),
                }
                return StreamEnd::Broken(status.message().to_owned());
            }
            Err(_) => {
                router.forget_leader(&address);
                return StreamEnd::Broken(format!("{address} did not answer a renewal"));
            }
        }
        sleep_until(sent + period).await;
        sent = Instant::now();
        if tx
            .send(api::KeepAliveRequest { session_id: id })
            .await
            .is_err()
        {
            return StreamEnd::Broken("stream closed".to_owned());
        }
    }
}
