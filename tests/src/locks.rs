//! Lock clients for cluster tests: a session user that retries every call, unchanged (same
//! `RequestHeader`), on whichever node answers, as a real client library must; and a history of
//! holds that a checker searches for overlaps.
//!
//! The history is recorded from the client's side: a hold starts when the client has the grant
//! in hand and ends when it sends the release. The cluster's real hold contains that interval
//! (it starts before the answer and ends after the release is applied), so two recorded
//! intervals that overlap prove two real holds overlapped: the checker has no false positives.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sync_proto::sync::v1 as api;
use tokio::time::Instant;
use tonic::{Code, Request, Status};

use crate::Clients;

/// How long one call may take before the user tries the next node.
const CALL_GRACE: Duration = Duration::from_secs(5);

/// A session and the calls made with it.
pub struct LockUser {
    /// Every node's clients.
    clients: Clients,
    /// The de-duplication client id (random, nonzero).
    client_id: u64,
    /// The next request sequence.
    sequence: AtomicU64,
    /// The session.
    pub session: u64,
    /// Which node to try first (rotates on failure).
    next_node: AtomicU64,
}

/// Retryable: the node is down, not the leader, or the connection broke.
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) || (s.code() == Code::DeadlineExceeded && s.message().contains("client-side"))
        || (s.code() == Code::DeadlineExceeded && s.message().contains("not committed"))
        || (s.code() == Code::DeadlineExceeded && s.message().contains("confirm its leadership"))
}

impl LockUser {
    /// Opens a session (retrying until `within`).
    pub async fn open(
        clients: &Clients,
        name: &str,
        ttl: Duration,
        within: Duration,
    ) -> Result<LockUser, Status> {
        let mut user = LockUser {
            clients: clients.clone(),
            client_id: rand::random::<u64>() | 1,
            sequence: AtomicU64::new(1),
            session: 0,
            next_node: AtomicU64::new(rand::random::<u64>()),
        };
        let header = user.header();
        let request = api::CreateSessionRequest {
            header: Some(header),
            ttl_ms: ttl.as_millis() as u64,
            client_name: name.to_string(),
        };
        let r = user
            .retry(within, Duration::from_secs(3), move |mut c, t| {
                let mut req = Request::new(request.clone());
                req.set_timeout(t);
                async move { c.create_session(req).await }
            })
            .await?;
        user.session = r.session_id;
        Ok(user)
    }

    fn header(&self) -> api::RequestHeader {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        api::RequestHeader {
            client_id: self.client_id,
            sequence,
            lowest_unacked: sequence,
        }
    }

    /// Sends a call to one node after another until one answers with something final or
    /// `within` passes.
    async fn retry<T, F, Fut>(
        &self,
        within: Duration,
        per_call: Duration,
        send: F,
    ) -> Result<T, Status>
    where
        F: Fn(api::lock_client::LockClient<tonic::transport::Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let end = Instant::now() + within;
        let mut last = Status::unavailable("no node tried");
        while Instant::now() < end {
            let ids = self.clients.ids();
            let pick = self.next_node.load(Ordering::Relaxed) as usize % ids.len().max(1);
            let Some(node) = ids.get(pick).and_then(|id| self.clients.get(*id)) else {
                return Err(Status::unavailable("no nodes"));
            };
            let answer =
                tokio::time::timeout(per_call + CALL_GRACE, send(node.lock(), per_call)).await;
            match answer {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) if !retryable(&s) => return Err(s),
                Ok(Err(s)) => last = s,
                Err(_) => last = Status::deadline_exceeded("client-side timeout"),
            }
            self.next_node.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last)
    }

    /// Acquires `name`, waiting up to `wait` on the server; retried unchanged across nodes.
    pub async fn acquire(
        &self,
        name: &str,
        mode: api::LockMode,
        wait: Duration,
        within: Duration,
    ) -> Result<api::AcquireResponse, Status> {
        let request = api::AcquireRequest {
            header: Some(self.header()),
            name: name.to_string(),
            session_id: self.session,
            mode: mode as i32,
            wait_timeout_ms: wait.as_millis() as u64,
            ..Default::default()
        };
        self.retry(within, wait + Duration::from_secs(3), move |mut c, t| {
            let mut req = Request::new(request.clone());
            req.set_timeout(t);
            async move { c.acquire(req).await }
        })
        .await
    }

    /// Releases `name`; retried unchanged across nodes.
    pub async fn release(&self, name: &str, within: Duration) -> Result<bool, Status> {
        let request = api::ReleaseRequest {
            header: Some(self.header()),
            name: name.to_string(),
            session_id: self.session,
            ..Default::default()
        };
        self.retry(within, Duration::from_secs(3), move |mut c, t| {
            let mut req = Request::new(request.clone());
            req.set_timeout(t);
            async move { c.release(req).await }
        })
        .await
        .map(|r| r.released)
    }

    /// Renews the session once; returns its TTL.
    pub async fn keep_alive(&self, within: Duration) -> Result<u64, Status> {
        let session_id = self.session;
        self.retry(within, Duration::from_secs(2), move |mut c, t| {
            let mut req = Request::new(api::KeepAliveRequest { session_id });
            req.set_timeout(t);
            async move { c.keep_alive_once(req).await }
        })
        .await
        .map(|r| r.ttl_ms)
    }

    /// Keeps the session alive in the background every `every` until dropped.
    pub fn keep_alive_in_background(self: &Arc<Self>, every: Duration) -> KeepAliveTask {
        let user = self.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let _ = user.keep_alive(every).await;
            }
        });
        KeepAliveTask(task)
    }
}

/// Stops a background keep-alive when dropped.
pub struct KeepAliveTask(tokio::task::JoinHandle<()>);

impl Drop for KeepAliveTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One hold as a client saw it.
#[derive(Clone, Debug)]
pub struct HoldRecord {
    /// The lock.
    pub lock: String,
    /// The holding session.
    pub session: u64,
    /// The mode.
    pub exclusive: bool,
    /// The fencing token.
    pub token: u64,
    /// When the client had the grant.
    pub start: Instant,
    /// When the client sent the release.
    pub end: Instant,
}

/// Holds recorded by many clients.
#[derive(Clone, Default)]
pub struct History(Arc<Mutex<Vec<HoldRecord>>>);

impl History {
    /// Records a hold.
    pub fn record(&self, hold: HoldRecord) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(hold);
    }

    /// Every hold, in start order.
    pub fn holds(&self) -> Vec<HoldRecord> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort_by_key(|h| h.start);
        v
    }

    /// Checks that no EXCLUSIVE hold overlapped any other hold of the same lock, and that
    /// tokens increase with grant order where that order is known (one of the two holds is
    /// exclusive). Returns how many holds were checked.
    pub fn check(&self) -> anyhow::Result<usize> {
        let holds = self.holds();
        let mut by_lock: BTreeMap<&str, Vec<&HoldRecord>> = BTreeMap::new();
        for h in &holds {
            by_lock.entry(h.lock.as_str()).or_default().push(h);
        }
        for (lock, hs) in &by_lock {
            for (i, a) in hs.iter().enumerate() {
                for b in &hs[i + 1..] {
                    if b.start >= a.end {
                        // If either is exclusive their real holds are disjoint, and each
                        // contains its recorded interval, so a's real hold came first and its
                        // token must be lower. (Two shared holds may really have overlapped:
                        // a grant's answer can reach its client late.)
                        if !(a.exclusive || b.exclusive) {
                            continue;
                        }
                        anyhow::ensure!(
                            b.token > a.token,
                            "lock {lock}: token {} granted after token {} was released",
                            b.token,
                            a.token
                        );
                        continue;
                    }
                    anyhow::ensure!(
                        !(a.exclusive || b.exclusive),
                        "lock {lock}: session {} (token {}, exclusive {}) and session {} \
                         (token {}, exclusive {}) held it at the same time",
                        a.session,
                        a.token,
                        a.exclusive,
                        b.session,
                        b.token,
                        b.exclusive
                    );
                }
            }
        }
        Ok(holds.len())
    }
}
