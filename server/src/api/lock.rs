//! `sync.v1.Lock`: sessions, locks, fencing-token checks and the lock table, over the
//! replicated lock table (`state::locks`).
//!
//! This file only translates: requests become [`ipb::LockCommand`]s proposed through Raft (or
//! reads of the applied table), and [`ipb::LockResult`]s become responses or statuses. The one
//! piece of logic is waiting: an Acquire that queues is answered when this node applies the
//! end of its wait (a [`LockNotice::WaitEnded`]); if the caller goes away first, a CancelWait is
//! proposed so the request leaves the queue.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use sync_proto::internal::v1 as ipb;
use sync_proto::sync::v1 as api;
use sync_proto::sync::v1::lock_client::LockClient;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use super::kv::{propose_within, request_id};
use super::{
    DEFAULT_DEADLINE, Forwarder, Route, client_deadline, deadline_of, forward_request, read_route,
    read_state, route,
};
use crate::node::NodeHandle;
use crate::state::Notice;
use crate::state::locks::{self, Mode, Notice as LockNotice};

use ipb::LockErrorCode as Code;
use ipb::lock_command::Op;
use ipb::lock_result::Result as R;

/// Trailer naming why a call failed, where the status code alone is ambiguous (`deadlock` on
/// ABORTED).
pub const ERROR_REASON: &str = "x-sync-error-reason";

/// Deadline of one renewal from a KeepAlive stream (which carries no per-message deadline):
/// short, so that a hung leader is noticed well within a short TTL and the client reopens the
/// stream elsewhere.
const STREAM_RENEW_DEADLINE: Duration = Duration::from_secs(2);

/// Page size when a list request gives none.
const DEFAULT_PAGE: usize = 1_000;
/// Largest page.
const MAX_PAGE: usize = 10_000;
/// How long after its wait should have ended a waiting call gives up on hearing the outcome
/// (the leader's clock task ends the wait within its poll interval plus a commit).
const WAIT_SLACK: Duration = Duration::from_secs(3);
/// How often a waiting call checks that its wait still exists, in case it missed the notice
/// (a lagging subscriber, a snapshot installed underneath it).
const WAIT_CHECK: Duration = Duration::from_secs(1);

/// The Lock service of one node.
pub struct LockService {
    /// The node.
    pub node: NodeHandle,
    /// Connections for forwarding.
    pub forwarder: Arc<Forwarder>,
}

/// The gRPC status for a refused lock command.
pub fn status_of_lock_error(e: &ipb::LockError) -> Status {
    let message = e.message.clone();
    match Code::try_from(e.code).unwrap_or(Code::Unspecified) {
        Code::InvalidArgument => Status::invalid_argument(message),
        Code::NotFound => Status::not_found(message),
        Code::FailedPrecondition => Status::failed_precondition(message),
        Code::Aborted => {
            // ABORTED also means "request too old to de-duplicate" and "watcher fell behind";
            // a machine-readable reason lets clients tell a deadlock apart.
            let mut md = MetadataMap::new();
            md.insert(
                ERROR_REASON,
                tonic::metadata::MetadataValue::from_static("deadlock"),
            );
            Status::with_metadata(tonic::Code::Aborted, message, md)
        }
        Code::DeadlineExceeded => Status::deadline_exceeded(message),
        Code::ResourceExhausted => Status::resource_exhausted(message),
        Code::Cancelled => Status::cancelled(message),
        Code::Unspecified => Status::internal(message),
    }
}

fn owner(session_id: u64, client_id: &str) -> Result<ipb::LockOwner, Status> {
    use ipb::lock_owner::Owner;
    match (session_id, client_id.is_empty()) {
        (0, false) => {
            if client_id.len() > locks::MAX_CLIENT_NAME_BYTES {
                return Err(Status::invalid_argument(format!(
                    "client_id is {} bytes; the limit is {}",
                    client_id.len(),
                    locks::MAX_CLIENT_NAME_BYTES
                )));
            }
            Ok(ipb::LockOwner {
                owner: Some(Owner::ClientId(client_id.to_string())),
            })
        }
        (id, true) if id != 0 => Ok(ipb::LockOwner {
            owner: Some(Owner::SessionId(id)),
        }),
        _ => Err(Status::invalid_argument(
            "set exactly one of session_id (an explicit session) and client_id (the client's \
             implicit session)",
        )),
    }
}

fn page_size(asked: u32) -> usize {
    match asked as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

impl LockService {
    /// A leader-only lock command (as the queue service's `write`): checks the request and
    /// builds the command (`command`), forwards the call to the leader or proposes it here,
    /// and translates the result (`answer`; anything else is a refusal).
    async fn write<Req, Resp, Fut>(
        &self,
        request: Request<Req>,
        command: impl FnOnce(&Req) -> Result<(Op, Option<api::RequestHeader>), Status>,
        forward: impl FnOnce(LockClient<tonic::transport::Channel>, Request<Req>) -> Fut,
        answer: impl FnOnce(R) -> Option<Resp>,
    ) -> Result<Response<Resp>, Status>
    where
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let deadline = deadline_of(request.metadata());
        let target = route(&self.node, request.metadata())?;
        let req = request.into_inner();
        let (op, header) = command(&req)?;
        if let Route::Forward(addr) = target {
            return forward(self.client(&addr)?, forward_request(req, deadline)).await;
        }
        let result = self.run(op, header, deadline).await?;
        match result.result.clone().and_then(answer) {
            Some(resp) => Ok(Response::new(resp)),
            None => Err(refused(result)),
        }
    }

    /// Proposes a lock command on this node (the leader) and returns its result.
    async fn run(
        &self,
        op: Op,
        header: Option<api::RequestHeader>,
        deadline: Duration,
    ) -> Result<ipb::LockResult, Status> {
        let cmd = ipb::command::Op::Lock(ipb::LockCommand { op: Some(op) });
        let (_, r) = propose_within(&self.node, cmd, request_id(header), deadline).await?;
        match r.result {
            Some(ipb::command_result::Result::Lock(l)) => Ok(l),
            Some(ipb::command_result::Result::Rejected(why)) => Err(Status::invalid_argument(why)),
            other => Err(Status::internal(format!("lock command produced {other:?}"))),
        }
    }

    fn client(&self, addr: &str) -> Result<LockClient<tonic::transport::Channel>, Status> {
        Ok(LockClient::new(self.forwarder.channel(addr)?))
    }

    /// Waits for the end of the wait `waiter_id` (see the module docs).
    async fn await_wait(
        &self,
        mut notices: broadcast::Receiver<Notice>,
        waiter_id: u64,
        budget: Duration,
    ) -> Result<api::AcquireResponse, Status> {
        let mut guard = CancelOnDrop {
            node: self.node.clone(),
            waiter_id,
            armed: true,
        };
        let end = Instant::now() + budget;
        let mut check = tokio::time::interval(WAIT_CHECK);
        check.tick().await;
        loop {
            tokio::select! {
                n = notices.recv() => match n {
                    Ok(Notice::Lock(LockNotice::WaitEnded { waiter_id: w, result, .. })) if w == waiter_id => {
                        guard.armed = false;
                        return acquire_answer(result);
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if let Some(answer) = self.settled(&mut notices, waiter_id, &mut guard).await? {
                            return answer;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(Status::unavailable("the node is shutting down; retry the Acquire with the same request header"));
                    }
                },
                _ = check.tick() => {
                    if let Some(answer) = self.settled(&mut notices, waiter_id, &mut guard).await? {
                        return answer;
                    }
                }
                _ = tokio::time::sleep_until(end) => {
                    return Err(Status::deadline_exceeded(
                        "the wait did not end in time; it was withdrawn",
                    ));
                }
            }
        }
    }

    /// If the wait no longer exists, its outcome: from a notice still queued, or (if the notice
    /// was missed) an UNAVAILABLE asking for a retry, which the de-duplication table answers
    /// with the outcome.
    async fn settled(
        &self,
        notices: &mut broadcast::Receiver<Notice>,
        waiter_id: u64,
        guard: &mut CancelOnDrop,
    ) -> Result<Option<Result<api::AcquireResponse, Status>>, Status> {
        let waiting = read_state(&self.node, false, DEFAULT_DEADLINE, move |s| {
            s.locks().is_waiting(waiter_id)
        })
        .await?;
        if waiting {
            return Ok(None);
        }
        guard.armed = false;
        // The read ran after the apply that ended the wait, so its notice, if this subscriber
        // did not miss it, is already queued.
        loop {
            match notices.try_recv() {
                Ok(Notice::Lock(LockNotice::WaitEnded {
                    waiter_id: w,
                    result,
                    ..
                })) if w == waiter_id => return Ok(Some(acquire_answer(result))),
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        Ok(Some(Err(Status::unavailable(
            "the wait ended while this node was catching up; retry the Acquire with the same \
             request header to learn its outcome",
        ))))
    }
}

/// Withdraws a wait whose caller went away (dropped future) or gave up.
struct CancelOnDrop {
    node: NodeHandle,
    waiter_id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let node = self.node.clone();
        let waiter_id = self.waiter_id;
        tokio::spawn(async move {
            let op = ipb::command::Op::Lock(ipb::LockCommand {
                op: Some(Op::CancelWait(ipb::CancelWait { waiter_id })),
            });
            if let Err(e) = node.propose(op, None).await {
                tracing::debug!(waiter_id, error = %e, "could not withdraw an abandoned wait; it ends at its deadline");
            }
        });
    }
}

/// An Acquire's final answer from its result.
fn acquire_answer(r: ipb::LockResult) -> Result<api::AcquireResponse, Status> {
    match r.result {
        Some(R::Acquired(a)) => Ok(a),
        Some(R::Error(e)) => Err(status_of_lock_error(&e)),
        other => Err(Status::internal(format!(
            "unexpected Acquire outcome {other:?}"
        ))),
    }
}

fn refused(r: ipb::LockResult) -> Status {
    match r.result {
        Some(R::Error(e)) => status_of_lock_error(&e),
        other => Status::internal(format!("unexpected lock result {other:?}")),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<api::LockEvent, Status>> + Send>>;
type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<api::KeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl api::lock_server::Lock for LockService {
    async fn create_session(
        &self,
        request: Request<api::CreateSessionRequest>,
    ) -> Result<Response<api::CreateSessionResponse>, Status> {
        self.write(
            request,
            |req| {
                locks::validate_ttl(req.ttl_ms).map_err(Status::invalid_argument)?;
                let op = Op::CreateSession(ipb::CreateSession {
                    ttl_ms: req.ttl_ms,
                    client_name: req.client_name.clone(),
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.create_session(r).await },
            |r| match r {
                R::SessionOpened(s) => Some(api::CreateSessionResponse {
                    session_id: s.session_id,
                    ttl_ms: s.ttl_ms,
                }),
                _ => None,
            },
        )
        .await
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        request: Request<Streaming<api::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let node = self.node.clone();
        let forwarder = self.forwarder.clone();
        let service = LockService { node, forwarder };
        let stream = async_stream::try_stream! {
            while let Some(req) = inbound.message().await? {
                let answer = service.renew(req.session_id, &MetadataMap::new(), STREAM_RENEW_DEADLINE).await;
                match answer {
                    Ok(ttl_ms) => yield api::KeepAliveResponse { session_id: req.session_id, ttl_ms },
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        yield api::KeepAliveResponse { session_id: req.session_id, ttl_ms: 0 }
                    }
                    Err(s) => Err(s)?,
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn keep_alive_once(
        &self,
        request: Request<api::KeepAliveRequest>,
    ) -> Result<Response<api::KeepAliveResponse>, Status> {
        let session_id = request.get_ref().session_id;
        let deadline = deadline_of(request.metadata());
        let ttl_ms = self.renew(session_id, request.metadata(), deadline).await?;
        Ok(Response::new(api::KeepAliveResponse { session_id, ttl_ms }))
    }

    async fn revoke_session(
        &self,
        request: Request<api::RevokeSessionRequest>,
    ) -> Result<Response<api::RevokeSessionResponse>, Status> {
        self.write(
            request,
            |req| {
                let op = Op::RevokeSession(ipb::RevokeSession {
                    session_id: req.session_id,
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.revoke_session(r).await },
            |r| match r {
                R::Revoked(r) => Some(api::RevokeSessionResponse {
                    released_locks: r.released_locks,
                }),
                _ => None,
            },
        )
        .await
    }

    async fn list_sessions(
        &self,
        request: Request<api::ListSessionsRequest>,
    ) -> Result<Response<api::ListSessionsResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = read_route(
            &self.node,
            request.get_ref().consistency(),
            request.metadata(),
        )?;
        let req = request.into_inner();
        let after: u64 = match req.page_token.as_str() {
            "" => 0,
            t => t.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "page_token {t:?} is not one this server issued; pass the previous page's \
                     next_page_token or nothing"
                ))
            })?,
        };
        if let Some(Route::Forward(addr)) = target {
            return self
                .client(&addr)?
                .list_sessions(forward_request(req, deadline))
                .await;
        }
        let limit = page_size(req.page_size);
        let (sessions, more, index) =
            read_state(&self.node, target.is_some(), deadline, move |s| {
                let (list, more) = s.locks().list_sessions(after, limit, s.now_ms());
                (list, more, s.applied_index())
            })
            .await?;
        let next_page_token = match (more, sessions.last()) {
            (true, Some(last)) => last.session_id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(api::ListSessionsResponse {
            sessions,
            next_page_token,
            index,
        }))
    }

    async fn acquire(
        &self,
        request: Request<api::AcquireRequest>,
    ) -> Result<Response<api::AcquireResponse>, Status> {
        let md = request.metadata().clone();
        let target = route(&self.node, &md)?;
        let req = request.into_inner();
        locks::validate_name(&req.name).map_err(Status::invalid_argument)?;
        if Mode::from_wire(req.mode).is_none() {
            return Err(Status::invalid_argument(format!(
                "unknown lock mode {}; use LOCK_MODE_SHARED or LOCK_MODE_EXCLUSIVE",
                req.mode
            )));
        }
        if req.lock_delay_ms > locks::MAX_LOCK_DELAY_MS {
            return Err(Status::invalid_argument(format!(
                "lock_delay_ms {} is above the limit of {}",
                req.lock_delay_ms,
                locks::MAX_LOCK_DELAY_MS
            )));
        }
        let owner = owner(req.session_id, &req.client_id)?;
        // The wait ends at the client's wait or its deadline, whichever comes first, keeping
        // time to answer.
        let client = client_deadline(&md);
        let mut wait = Duration::from_millis(req.wait_timeout_ms);
        if let Some(d) = client {
            wait = wait.min(d.saturating_sub((d / 5).min(Duration::from_millis(200))));
        }
        if let Route::Forward(addr) = target {
            let budget = client.unwrap_or(wait + WAIT_SLACK + DEFAULT_DEADLINE);
            return self
                .client(&addr)?
                .acquire(forward_request(req, budget))
                .await;
        }
        let propose_deadline = client.unwrap_or(DEFAULT_DEADLINE);
        // Subscribe before proposing, so that the end of the wait cannot be missed.
        let notices = self.node.notices();
        let op = Op::Acquire(ipb::AcquireLock {
            name: req.name,
            owner: Some(owner),
            mode: req.mode,
            wait_ms: wait.as_millis() as u64,
            lock_delay_ms: req.lock_delay_ms,
        });
        let result = self.run(op, req.header, propose_deadline).await?;
        match result.result {
            Some(R::Queued(q)) => {
                let budget = client.unwrap_or(wait + WAIT_SLACK);
                let started = Instant::now();
                let answer = self.await_wait(notices, q.waiter_id, budget).await;
                crate::metrics::record::lock_wait(started.elapsed());
                answer.map(Response::new)
            }
            other => acquire_answer(ipb::LockResult { result: other }).map(Response::new),
        }
    }

    async fn release(
        &self,
        request: Request<api::ReleaseRequest>,
    ) -> Result<Response<api::ReleaseResponse>, Status> {
        self.write(
            request,
            |req| {
                locks::validate_name(&req.name).map_err(Status::invalid_argument)?;
                let op = Op::Release(ipb::ReleaseLock {
                    name: req.name.clone(),
                    owner: Some(owner(req.session_id, &req.client_id)?),
                });
                Ok((op, req.header))
            },
            |mut c, r| async move { c.release(r).await },
            |r| match r {
                R::Released(released) => Some(api::ReleaseResponse { released }),
                _ => None,
            },
        )
        .await
    }

    async fn validate_token(
        &self,
        request: Request<api::ValidateTokenRequest>,
    ) -> Result<Response<api::ValidateTokenResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = read_route(
            &self.node,
            request.get_ref().consistency(),
            request.metadata(),
        )?;
        let req = request.into_inner();
        locks::validate_name(&req.name).map_err(Status::invalid_argument)?;
        if let Some(Route::Forward(addr)) = target {
            return self
                .client(&addr)?
                .validate_token(forward_request(req, deadline))
                .await;
        }
        let (name, token) = (req.name, req.token);
        let (valid, holders) = read_state(&self.node, target.is_some(), deadline, move |s| {
            (
                s.locks().token_valid(&name, token),
                s.locks().holders_of(&name),
            )
        })
        .await?;
        Ok(Response::new(api::ValidateTokenResponse { valid, holders }))
    }

    async fn get_lock(
        &self,
        request: Request<api::GetLockRequest>,
    ) -> Result<Response<api::GetLockResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = read_route(
            &self.node,
            request.get_ref().consistency(),
            request.metadata(),
        )?;
        let req = request.into_inner();
        locks::validate_name(&req.name).map_err(Status::invalid_argument)?;
        if let Some(Route::Forward(addr)) = target {
            return self
                .client(&addr)?
                .get_lock(forward_request(req, deadline))
                .await;
        }
        let name = req.name;
        let (lock, index) = read_state(&self.node, target.is_some(), deadline, move |s| {
            (s.locks().lock_info(&name), s.applied_index())
        })
        .await?;
        Ok(Response::new(api::GetLockResponse {
            lock: Some(lock),
            index,
        }))
    }

    async fn list_locks(
        &self,
        request: Request<api::ListLocksRequest>,
    ) -> Result<Response<api::ListLocksResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let target = read_route(
            &self.node,
            request.get_ref().consistency(),
            request.metadata(),
        )?;
        let req = request.into_inner();
        if let Some(Route::Forward(addr)) = target {
            return self
                .client(&addr)?
                .list_locks(forward_request(req, deadline))
                .await;
        }
        let limit = page_size(req.page_size);
        let (prefix, after) = (req.prefix, req.page_token);
        let (locks, more, index) = read_state(&self.node, target.is_some(), deadline, move |s| {
            let (list, more) = s.locks().list_locks(&prefix, &after, limit);
            (list, more, s.applied_index())
        })
        .await?;
        let next_page_token = match (more, locks.last()) {
            (true, Some(last)) => last.name.clone(),
            _ => String::new(),
        };
        Ok(Response::new(api::ListLocksResponse {
            locks,
            next_page_token,
            index,
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<api::LockWatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let prefix = request.into_inner().prefix;
        let mut notices = self.node.notices();
        let stream = async_stream::try_stream! {
            loop {
                match notices.recv().await {
                    Ok(Notice::Lock(LockNotice::Event(e))) if e.name.starts_with(&prefix) => yield e,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        Err(Status::aborted(format!(
                            "this watcher fell {n} events behind and was ended; call ListLocks \
                             and watch again"
                        )))?;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        Err(Status::unavailable("the node is shutting down; watch another node"))?;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

impl LockService {
    /// Renews a session (forwarding to the leader if need be); returns its TTL.
    async fn renew(
        &self,
        session_id: u64,
        md: &MetadataMap,
        deadline: Duration,
    ) -> Result<u64, Status> {
        let req = api::KeepAliveRequest { session_id };
        if let Route::Forward(addr) = route(&self.node, md)? {
            return self
                .client(&addr)?
                .keep_alive_once(forward_request(req, deadline))
                .await
                .map(|r| r.into_inner().ttl_ms);
        }
        // Renewing twice is harmless, so a keep-alive needs no de-duplication id.
        match self
            .run(
                Op::KeepAlive(ipb::KeepAliveSession { session_id }),
                None,
                deadline,
            )
            .await?
        {
            ipb::LockResult {
                result: Some(R::KeptAliveTtlMs(ttl)),
            } => Ok(ttl),
            other => Err(refused(other)),
        }
    }
}
