//! The lock table as the SDK shows it: modes, holders, waiters, sessions and lock events, and
//! the calls that read it (GetLock, ListLocks, ListSessions, ValidateToken, Watch).
//!
//! Taking locks is in `guard.rs` ([`LockRequest`](crate::LockRequest),
//! [`LockGuard`](crate::LockGuard)); sessions in `session.rs`.

use std::fmt;
use std::str::FromStr;

use futures::{Stream, StreamExt};
use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::lock_client::LockClient;

use crate::client::{CallSpec, Client, Target};
use crate::error::{CallKind, Error, Result, transport_reason};

/// How a lock is held.
///
/// ```
/// use sync_client::LockMode;
/// assert_eq!("shared".parse::<LockMode>().unwrap(), LockMode::Shared);
/// assert_eq!(LockMode::Exclusive.to_string(), "exclusive");
/// assert!("both".parse::<LockMode>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum LockMode {
    /// Any number of sessions may hold the lock at once (readers).
    Shared,
    /// One session holds the lock, and nobody else in any mode (writer).
    Exclusive,
}

impl LockMode {
    /// The mode on the wire.
    pub(crate) fn to_wire(self) -> i32 {
        match self {
            LockMode::Shared => api::LockMode::Shared as i32,
            LockMode::Exclusive => api::LockMode::Exclusive as i32,
        }
    }

    /// The mode from the wire; `None` for UNSPECIFIED (a free lock, nothing held).
    pub(crate) fn from_wire(mode: i32) -> Option<LockMode> {
        match api::LockMode::try_from(mode) {
            Ok(api::LockMode::Shared) => Some(LockMode::Shared),
            Ok(api::LockMode::Exclusive) => Some(LockMode::Exclusive),
            _ => None,
        }
    }

    /// The mode a holder or waiter reports (the server always sets one; EXCLUSIVE is what
    /// UNSPECIFIED means in a request).
    fn of_entry(mode: i32) -> LockMode {
        LockMode::from_wire(mode).unwrap_or(LockMode::Exclusive)
    }
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::Shared => "shared",
            LockMode::Exclusive => "exclusive",
        })
    }
}

impl FromStr for LockMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "shared" | "s" | "read" => Ok(LockMode::Shared),
            "exclusive" | "x" | "write" => Ok(LockMode::Exclusive),
            other => Err(format!(
                "unknown lock mode `{other}`; use shared or exclusive"
            )),
        }
    }
}

/// One holder of a lock.
///
/// ```
/// use sync_client::{Holder, LockMode};
///
/// let h = Holder {
///     session_id: 7,
///     client_name: "billing-3".into(),
///     mode: LockMode::Exclusive,
///     token: 42,
///     acquired_unix_ms: 0,
///     lock_delay_ms: 0,
/// };
/// assert_eq!(h.mode, LockMode::Exclusive);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Holder {
    /// The holding session.
    pub session_id: u64,
    /// That session's client name.
    pub client_name: String,
    /// The mode held.
    pub mode: LockMode,
    /// The fencing token of the grant (or of the last conversion).
    pub token: u64,
    /// When the grant happened, by the leader's clock (Unix milliseconds).
    pub acquired_unix_ms: u64,
    /// The lock-delay that applies if this hold is lost, in milliseconds.
    pub lock_delay_ms: u64,
}

impl From<api::LockHolder> for Holder {
    fn from(h: api::LockHolder) -> Self {
        Holder {
            session_id: h.session_id,
            client_name: h.client_name,
            mode: LockMode::of_entry(h.mode),
            token: h.token,
            acquired_unix_ms: h.acquired_unix_ms,
            lock_delay_ms: h.lock_delay_ms,
        }
    }
}

/// One request waiting for a lock.
///
/// ```no_run
/// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
/// let state = client.get_lock("jobs/nightly").await?;
/// for w in &state.waiters {
///     println!("session {} ({}) waits for {}{}", w.session_id, w.client_name, w.mode,
///         if w.upgrade { " (upgrade)" } else { "" });
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Waiter {
    /// The waiting session.
    pub session_id: u64,
    /// That session's client name.
    pub client_name: String,
    /// The mode asked for.
    pub mode: LockMode,
    /// When it started waiting, by the leader's clock (Unix milliseconds).
    pub since_unix_ms: u64,
    /// True for an upgrade: the session holds the lock SHARED and wants it EXCLUSIVE.
    pub upgrade: bool,
}

impl From<api::LockWaiter> for Waiter {
    fn from(w: api::LockWaiter) -> Self {
        Waiter {
            session_id: w.session_id,
            client_name: w.client_name,
            mode: LockMode::of_entry(w.mode),
            since_unix_ms: w.since_unix_ms,
            upgrade: w.upgrade,
        }
    }
}

/// The state of one lock.
///
/// ```no_run
/// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
/// let state = client.get_lock("jobs/nightly").await?;
/// match state.mode {
///     None => println!("{} is free", state.name),
///     Some(mode) => println!("{} held {mode} by {} session(s)", state.name, state.holders.len()),
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LockState {
    /// The lock's name.
    pub name: String,
    /// The mode it is held in; `None` when free.
    pub mode: Option<LockMode>,
    /// Its holders, in grant order.
    pub holders: Vec<Holder>,
    /// Its waiters, in the order they will be served (FIFO, an upgrade first).
    pub waiters: Vec<Waiter>,
    /// While a lock-delay is in force, when it ends (leader's clock, Unix ms); 0 otherwise.
    pub lock_delay_until_unix_ms: u64,
}

impl LockState {
    /// True if nobody holds the lock.
    ///
    /// ```
    /// use sync_client::LockState;
    ///
    /// let free = LockState {
    ///     name: "k".into(),
    ///     mode: None,
    ///     holders: vec![],
    ///     waiters: vec![],
    ///     lock_delay_until_unix_ms: 0,
    /// };
    /// assert!(free.is_free());
    /// ```
    pub fn is_free(&self) -> bool {
        self.holders.is_empty()
    }
}

impl From<api::LockInfo> for LockState {
    fn from(l: api::LockInfo) -> Self {
        LockState {
            name: l.name,
            mode: LockMode::from_wire(l.mode),
            holders: l.holders.into_iter().map(Holder::from).collect(),
            waiters: l.waiters.into_iter().map(Waiter::from).collect(),
            lock_delay_until_unix_ms: l.lock_delay_until_unix_ms,
        }
    }
}

/// An open session, as ListSessions reports it.
///
/// ```no_run
/// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
/// for s in client.list_sessions().await? {
///     println!("session {} ({}): {} locks, {} ms left", s.session_id, s.client_name,
///         s.held_locks, s.remaining_ms);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SessionInfo {
    /// The session id.
    pub session_id: u64,
    /// The client's name for itself (for an implicit session, its client_id string).
    pub client_name: String,
    /// True for the implicit session of a string client_id (see lock.proto).
    pub implicit: bool,
    /// How long it lives without a keep-alive, in milliseconds.
    pub ttl_ms: u64,
    /// Milliseconds left before it expires, as the answering node knows it.
    pub remaining_ms: u64,
    /// When it was created (leader's clock, Unix ms).
    pub created_unix_ms: u64,
    /// How many locks it holds.
    pub held_locks: u32,
}

impl From<api::Session> for SessionInfo {
    fn from(s: api::Session) -> Self {
        SessionInfo {
            session_id: s.session_id,
            client_name: s.client_name,
            implicit: s.implicit,
            ttl_ms: s.ttl_ms,
            remaining_ms: s.remaining_ms,
            created_unix_ms: s.created_unix_ms,
            held_locks: s.held_locks,
        }
    }
}

/// What a [`LockEvent`] reports.
///
/// ```
/// use sync_client::LockEventKind;
/// assert_eq!(LockEventKind::Acquired.to_string(), "acquired");
/// assert_eq!(LockEventKind::Deadlock.to_string(), "deadlock");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum LockEventKind {
    /// A session was granted the lock.
    Acquired,
    /// A holder changed mode (upgrade or downgrade) and received a new token.
    Converted,
    /// A holder released the lock.
    Released,
    /// A holder lost the lock because its session expired.
    Expired,
    /// A holder lost the lock because its session was revoked.
    Revoked,
    /// A request was refused as a deadlock victim; `cycle` describes the deadlock.
    Deadlock,
}

impl fmt::Display for LockEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockEventKind::Acquired => "acquired",
            LockEventKind::Converted => "converted",
            LockEventKind::Released => "released",
            LockEventKind::Expired => "expired",
            LockEventKind::Revoked => "revoked",
            LockEventKind::Deadlock => "deadlock",
        })
    }
}

/// One edge of a waits-for cycle: a session waiting for a lock held by the next edge's session.
///
/// ```
/// use sync_client::WaitEdge;
/// let edge = WaitEdge { session_id: 7, client_name: "cli-1".into(), lock_name: "res-B".into() };
/// println!("session {} ({}) waits for {}", edge.session_id, edge.client_name, edge.lock_name);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct WaitEdge {
    /// The waiting session.
    pub session_id: u64,
    /// That session's client name.
    pub client_name: String,
    /// The lock it waits for.
    pub lock_name: String,
}

/// One change to the lock table, from [`Client::watch_locks`].
///
/// ```no_run
/// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
/// use futures::StreamExt;
/// let mut events = Box::pin(client.watch_locks("jobs/").await?);
/// while let Some(e) = events.next().await {
///     let e = e?;
///     println!("{} {} (session {}, token {})", e.kind, e.name, e.session_id, e.token);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LockEvent {
    /// What happened.
    pub kind: LockEventKind,
    /// The lock's name.
    pub name: String,
    /// The session concerned: the new holder, the former holder, or the deadlock victim.
    pub session_id: u64,
    /// That session's client name.
    pub client_name: String,
    /// The mode granted, held, or (for a deadlock) asked for.
    pub mode: Option<LockMode>,
    /// The fencing token granted or of the hold that ended; 0 for a deadlock.
    pub token: u64,
    /// The log index of the entry that caused the event.
    pub index: u64,
    /// When it happened (leader's clock, Unix ms).
    pub time_unix_ms: u64,
    /// For a deadlock: the cycle, starting with the victim.
    pub cycle: Vec<WaitEdge>,
}

impl TryFrom<api::LockEvent> for LockEvent {
    type Error = Error;

    fn try_from(e: api::LockEvent) -> Result<Self> {
        use api::LockEventType as T;
        let kind = match T::try_from(e.r#type) {
            Ok(T::Acquired) => LockEventKind::Acquired,
            Ok(T::Converted) => LockEventKind::Converted,
            Ok(T::Released) => LockEventKind::Released,
            Ok(T::Expired) => LockEventKind::Expired,
            Ok(T::Revoked) => LockEventKind::Revoked,
            Ok(T::Deadlock) => LockEventKind::Deadlock,
            Ok(T::Unspecified) | Err(_) => {
                return Err(Error::Protocol {
                    message: format!("lock event of unknown type {}", e.r#type),
                });
            }
        };
        Ok(LockEvent {
            kind,
            name: e.name,
            session_id: e.session_id,
            client_name: e.client_name,
            mode: LockMode::from_wire(e.mode),
            token: e.token,
            index: e.index,
            time_unix_ms: e.time_unix_ms,
            cycle: e
                .cycle
                .into_iter()
                .map(|c| WaitEdge {
                    session_id: c.session_id,
                    client_name: c.client_name,
                    lock_name: c.lock_name,
                })
                .collect(),
        })
    }
}

impl Client {
    fn consistency(&self) -> i32 {
        if self.inner.config.stale_reads {
            api::Consistency::Stale as i32
        } else {
            api::Consistency::Linearizable as i32
        }
    }

    /// One lock: its holders and waiters. A lock nobody holds or awaits is reported free (no
    /// holders), never as an error.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// let lock = client.get_lock("reports/daily").await?;
    /// for h in &lock.holders {
    ///     println!("held {} by session {} ({}), token {}", h.mode, h.session_id, h.client_name, h.token);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get_lock(&self, name: &str) -> Result<LockState> {
        let request = api::GetLockRequest {
            name: name.to_owned(),
            consistency: self.consistency(),
        };
        let answer = self
            .unary(CallSpec::read(self), request, |ch, r| async move {
                LockClient::new(ch).get_lock(r).await
            })
            .await?;
        let lock = answer.lock.ok_or_else(|| Error::Protocol {
            message: "GetLock answered without a lock".to_owned(),
        })?;
        Ok(LockState::from(lock))
    }

    /// Every held or awaited lock whose name starts with `prefix` (all with `""`), in name
    /// order. Fetches every page.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// for lock in client.list_locks("jobs/").await? {
    ///     println!("{}: {} holder(s), {} waiter(s)", lock.name, lock.holders.len(), lock.waiters.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_locks(&self, prefix: &str) -> Result<Vec<LockState>> {
        all_pages(async |page_token| {
            let request = api::ListLocksRequest {
                prefix: prefix.to_owned(),
                consistency: self.consistency(),
                page_size: 0,
                page_token,
            };
            let page = self
                .unary(CallSpec::read(self), request, |ch, r| async move {
                    LockClient::new(ch).list_locks(r).await
                })
                .await?;
            let locks = page.locks.into_iter().map(LockState::from).collect();
            Ok((locks, page.next_page_token))
        })
        .await
    }

    /// Every open session, explicit and implicit, in id order. Fetches every page.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// for s in client.list_sessions().await? {
    ///     println!("session {} ({}) holds {} lock(s)", s.session_id, s.client_name, s.held_locks);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>> {
        all_pages(async |page_token| {
            let request = api::ListSessionsRequest {
                consistency: self.consistency(),
                page_size: 0,
                page_token,
            };
            let page = self
                .unary(CallSpec::read(self), request, |ch, r| async move {
                    LockClient::new(ch).list_sessions(r).await
                })
                .await?;
            let sessions = page.sessions.into_iter().map(SessionInfo::from).collect();
            Ok((sessions, page.next_page_token))
        })
        .await
    }

    /// True if `token` is the fencing token of a current holder of lock `name` (Chubby's
    /// CheckSequencer). A resource guarded by the lock calls this before acting on a request
    /// that carries a token, and refuses it when the answer is false: the sender lost the lock.
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client, token: u64) -> sync_client::Result<()> {
    /// if !client.validate_token("ledger", token).await? {
    ///     eprintln!("stale writer (token {token}); refusing its write");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn validate_token(&self, name: &str, token: u64) -> Result<bool> {
        let request = api::ValidateTokenRequest {
            name: name.to_owned(),
            token,
            consistency: self.consistency(),
        };
        let answer = self
            .unary(CallSpec::read(self), request, |ch, r| async move {
                LockClient::new(ch).validate_token(r).await
            })
            .await?;
        Ok(answer.valid)
    }

    /// A stream of lock events for the locks whose names start with `prefix`, in log order,
    /// from the moment it opens (no past events). To follow the whole table, open the watch,
    /// then call [`list_locks`](Client::list_locks) and skip events whose `index` is not above
    /// what the list reflects.
    ///
    /// The stream ends with an error if the node serving it goes away or the watcher falls too
    /// far behind ([`Error::Aborted`]); watch again then (events in between are not replayed).
    ///
    /// ```no_run
    /// # async fn demo(client: sync_client::Client) -> sync_client::Result<()> {
    /// use futures::StreamExt;
    ///
    /// let mut events = std::pin::pin!(client.watch_locks("jobs/").await?);
    /// while let Some(event) = events.next().await {
    ///     let e = event?;
    ///     println!("{} {} by session {} (token {})", e.kind, e.name, e.session_id, e.token);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn watch_locks(
        &self,
        prefix: &str,
    ) -> Result<impl Stream<Item = Result<LockEvent>> + Send + 'static> {
        let (address, channel) = self.stream_channel(Target::Any).await?;
        let request = self.request(
            api::LockWatchRequest {
                prefix: prefix.to_owned(),
            },
            None,
        );
        let stream = match LockClient::new(channel).watch(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(stream_error(&address, &status)),
        };
        Ok(stream.map(move |item| match item {
            Ok(event) => LockEvent::try_from(event),
            Err(status) => Err(stream_error(&address, &status)),
        }))
    }
}

/// Every item of a paged list: `fetch(page_token)` returns one page and the next page's token
/// (empty after the last page).
async fn all_pages<T>(
    mut fetch: impl AsyncFnMut(String) -> Result<(Vec<T>, String)>,
) -> Result<Vec<T>> {
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = fetch(token.clone()).await?;
        items.extend(page);
        // A token that does not move would loop forever; treat it as the end.
        if next.is_empty() || next == token {
            return Ok(items);
        }
        token = next;
    }
}

/// The error ending a stream from `address`.
pub(crate) fn stream_error(address: &str, status: &tonic::Status) -> Error {
    match transport_reason(status) {
        Some(reason) => Error::Unavailable {
            tried: vec![address.to_owned()],
            reason,
        },
        None => Error::from_status(status, CallKind::Other),
    }
}
