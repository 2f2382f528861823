//! Taking locks: [`LockRequest`] (mode, wait, lock-delay) and the [`LockGuard`] it yields.
//!
//! An Acquire waits on the server, up to the request's timeout, in FIFO order. Its retries
//! carry the same RequestHeader, so a retry after a leader change joins the original wait at its
//! place in the queue instead of queuing again, and a grant is never made twice.

use std::time::Duration;

use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::lock_client::LockClient;

use crate::client::{CallSpec, Target};
use crate::error::{CallKind, Error, Result};
use crate::locks::{Holder, LockMode};
use crate::session::Session;

/// A request for a lock, from [`Session::lock`]. Exclusive by default; waits up to the client's
/// deadline unless [`timeout`](LockRequest::timeout) says otherwise.
///
/// ```no_run
/// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
/// use std::time::Duration;
/// let guard = session
///     .lock("reports/daily")
///     .shared()
///     .timeout(Duration::from_secs(5))
///     .lock_delay(Duration::from_secs(2))
///     .acquire()
///     .await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a lock request does nothing until `acquire` or `try_acquire` is awaited"]
pub struct LockRequest {
    session: Session,
    name: String,
    mode: LockMode,
    wait: Option<Duration>,
    lock_delay: Duration,
}

impl LockRequest {
    pub(crate) fn new(session: Session, name: String) -> LockRequest {
        LockRequest {
            session,
            name,
            mode: LockMode::Exclusive,
            wait: None,
            lock_delay: Duration::ZERO,
        }
    }

    /// Ask for the lock EXCLUSIVE (one holder, nobody else). The default.
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// let guard = session.lock("k").exclusive().acquire().await?;
    /// # Ok(()) }
    /// ```
    pub fn exclusive(self) -> Self {
        self.mode(LockMode::Exclusive)
    }

    /// Ask for the lock SHARED (any number of shared holders, no exclusive one).
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// let guard = session.lock("k").shared().acquire().await?;
    /// # Ok(()) }
    /// ```
    pub fn shared(self) -> Self {
        self.mode(LockMode::Shared)
    }

    /// Ask for the lock in `mode`.
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// use sync_client::LockMode;
    /// let guard = session.lock("k").mode(LockMode::Shared).acquire().await?;
    /// # Ok(()) }
    /// ```
    pub fn mode(mut self, mode: LockMode) -> Self {
        self.mode = mode;
        self
    }

    /// Wait at most this long for the grant (server-side, in FIFO order). Default: the
    /// client's deadline ([`ClientBuilder::deadline`](crate::ClientBuilder::deadline), 15 s).
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// use std::time::Duration;
    /// match session.lock("k").timeout(Duration::from_millis(500)).acquire().await {
    ///     Ok(guard) => guard.release().await?,
    ///     Err(e) if e.is_not_acquired() => println!("busy: {e}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn timeout(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Chubby's lock-delay: if this hold ends because the session is lost (not through a
    /// release), nobody gets the lock for this long, so requests the lost holder still has in
    /// flight drain first. At most 60 s. Default: none.
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// use std::time::Duration;
    /// let guard = session.lock("k").lock_delay(Duration::from_secs(5)).acquire().await?;
    /// # Ok(()) }
    /// ```
    pub fn lock_delay(mut self, delay: Duration) -> Self {
        self.lock_delay = delay;
        self
    }

    /// Acquires the lock, waiting up to the timeout.
    ///
    /// Acquiring a lock the session already holds in the same mode returns a guard with the
    /// same token (dropping either guard releases the one hold); in the other mode it converts
    /// the hold (see [`LockGuard::upgrade`]).
    ///
    /// Errors: [`Error::Timeout`] (not granted in time; the wait is withdrawn),
    /// [`Error::Deadlock`] (the wait would close a cycle; the session keeps its other holds),
    /// [`Error::SessionExpired`], [`Error::InvalidArgument`] (bad name), and the usual
    /// unavailability errors.
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// use std::time::Duration;
    /// use sync_client::Error;
    ///
    /// match session.lock("ledger").timeout(Duration::from_secs(2)).acquire().await {
    ///     Ok(guard) => println!("holding ledger with token {}", guard.token()),
    ///     Err(Error::Timeout { .. }) => println!("busy; try later"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn acquire(self) -> Result<LockGuard> {
        let wait = self
            .wait
            .unwrap_or(self.session.client().inner.config.deadline);
        let (token, mode) =
            acquire(&self.session, &self.name, self.mode, wait, self.lock_delay).await?;
        Ok(LockGuard {
            session: self.session,
            name: self.name,
            mode,
            token,
            wait,
            released: false,
        })
    }

    /// Tries once, without waiting.
    ///
    /// Errors: [`Error::NotAcquired`] (with the current holders) if the lock is held in a
    /// conflicting mode or others wait for it; otherwise as [`acquire`](LockRequest::acquire).
    ///
    /// ```no_run
    /// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
    /// use sync_client::Error;
    ///
    /// match session.lock("ledger").try_acquire().await {
    ///     Ok(guard) => println!("got it: token {}", guard.token()),
    ///     Err(Error::NotAcquired { holders, .. }) => println!("held by {holders:?}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_acquire(self) -> Result<LockGuard> {
        self.timeout(Duration::ZERO).acquire().await
    }
}

/// One Acquire call; returns the token and mode granted.
async fn acquire(
    session: &Session,
    name: &str,
    mode: LockMode,
    wait: Duration,
    lock_delay: Duration,
) -> Result<(u64, LockMode)> {
    let client = session.client();
    let ticket = client.ticket();
    let request = api::AcquireRequest {
        header: ticket.header(),
        name: name.to_owned(),
        session_id: session.id(),
        client_id: String::new(),
        mode: mode.to_wire(),
        wait_timeout_ms: millis(wait),
        lock_delay_ms: millis(lock_delay),
    };
    let spec = CallSpec {
        kind: CallKind::Acquire,
        target: Target::Leader,
        repeatable: true,
        wait,
    };
    let answer = client
        .unary(spec, request, |ch, r| async move {
            LockClient::new(ch).acquire(r).await
        })
        .await?;
    if !answer.granted {
        return Err(Error::NotAcquired {
            name: name.to_owned(),
            holders: answer.holders.into_iter().map(Holder::from).collect(),
        });
    }
    let granted = LockMode::from_wire(answer.mode).unwrap_or(mode);
    Ok((answer.token, granted))
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// A held lock. Releases it when dropped (in the background, best effort: if that fails the
/// lock is released when the session ends); call [`release`](LockGuard::release) to release it
/// and learn the outcome.
///
/// Pass [`token`](LockGuard::token) to every resource the lock protects; the resource rejects
/// tokens lower than one it has seen, or checks them with
/// [`Client::validate_token`](crate::Client::validate_token). The token changes on every
/// conversion ([`upgrade`](LockGuard::upgrade), [`downgrade`](LockGuard::downgrade)).
///
/// ```no_run
/// # async fn demo(session: sync_client::Session) -> sync_client::Result<()> {
/// let mut guard = session.lock("catalog").shared().acquire().await?;
/// // ... read ...
/// guard.upgrade().await?; // now exclusive, with a new token
/// // ... write with guard.token() ...
/// guard.downgrade().await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    session: Session,
    name: String,
    mode: LockMode,
    token: u64,
    /// How long a conversion may wait (the acquiring request's timeout).
    wait: Duration,
    /// True once released or detached: nothing to do on drop.
    released: bool,
}

impl LockGuard {
    /// The fencing token of the current hold: unique, and strictly increasing per lock name.
    ///
    /// ```no_run
    /// # async fn demo(guard: sync_client::LockGuard) -> sync_client::Result<()> {
    /// // Send the token with every write to the protected resource.
    /// println!("writing with fencing token {}", guard.token());
    /// # Ok(()) }
    /// ```
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The mode held.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The session holding the lock.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Converts a SHARED hold to EXCLUSIVE, waiting (ahead of every other waiter) until this
    /// session is the only holder, at most the acquiring request's timeout. A new token is
    /// drawn. On failure the SHARED hold is kept.
    ///
    /// Errors: [`Error::Deadlock`] if another holder is upgrading too (one of the two is
    /// refused; release and retry), [`Error::Timeout`], [`Error::SessionExpired`].
    ///
    /// ```no_run
    /// # async fn demo(mut guard: sync_client::LockGuard) -> sync_client::Result<()> {
    /// guard.upgrade().await?; // now EXCLUSIVE
    /// guard.downgrade().await?; // SHARED again
    /// # Ok(()) }
    /// ```
    pub async fn upgrade(&mut self) -> Result<()> {
        self.convert(LockMode::Exclusive).await
    }

    /// Converts an EXCLUSIVE hold to SHARED, at once, with a new token; compatible waiters are
    /// granted too.
    pub async fn downgrade(&mut self) -> Result<()> {
        self.convert(LockMode::Shared).await
    }

    async fn convert(&mut self, mode: LockMode) -> Result<()> {
        let (token, granted) =
            acquire(&self.session, &self.name, mode, self.wait, Duration::ZERO).await?;
        self.token = token;
        self.mode = granted;
        Ok(())
    }

    /// Releases the lock now.
    ///
    /// Errors: [`Error::NotHeld`] if the session no longer holds it (it was released through
    /// another guard of the same hold); [`Error::SessionExpired`] if the session is gone, and
    /// its locks with it.
    ///
    /// ```no_run
    /// # async fn demo(guard: sync_client::LockGuard) -> sync_client::Result<()> {
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        self.session.release(&self.name).await
    }

    /// Keeps the lock held and forgets the guard: nothing is released on drop. The hold ends
    /// with a release by name ([`Session::release`]) or with the session. Returns the token.
    pub fn detach(mut self) -> u64 {
        self.released = true;
        self.token
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released || self.session.is_lost() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let session = self.session.clone();
        let name = std::mem::take(&mut self.name);
        runtime.spawn(async move {
            if let Err(e) = session.release(&name).await {
                tracing::debug!(lock = %name, session = session.id(), error = %e, "releasing a dropped guard failed");
            }
        });
    }
}
