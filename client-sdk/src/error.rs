//! Typed errors: one variant per thing a caller may want to handle differently, each with a
//! message that says what happened and, where there is one, what to do.
//!
//! A gRPC status becomes an [`Error`] once (in `Error::from_status`), using the call it answered
//! to tell apart what the same code means for different calls (ABORTED is a deadlock for an
//! Acquire; FAILED_PRECONDITION is "not held" for a Release). Failures that never reached a
//! server become [`Error::Unavailable`], naming every member tried and the transport cause in
//! words ("connection refused").

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::io;

use tonic::{Code, Status};

use crate::locks::Holder;

/// What the SDK's calls return.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The hint given when no member of the cluster answers.
pub const START_HINT: &str = "is the cluster running? try `syncctl dev up`";

/// Everything that can go wrong in a call to the cluster.
///
/// The variants follow the gRPC status codes, with the lock service's meanings named
/// ([`Deadlock`](Error::Deadlock), [`NotHeld`](Error::NotHeld),
/// [`SessionExpired`](Error::SessionExpired), [`NotAcquired`](Error::NotAcquired)), plus the
/// failures that never reached a server ([`Unavailable`](Error::Unavailable),
/// [`InvalidEndpoint`](Error::InvalidEndpoint)).
///
/// ```
/// use sync_client::Error;
///
/// let err = Error::Unavailable {
///     tried: vec!["127.0.0.1:7001".into(), "127.0.0.1:7002".into()],
///     reason: "connection refused".into(),
/// };
/// assert_eq!(
///     err.to_string(),
///     "no member reachable at 127.0.0.1:7001, 127.0.0.1:7002: connection refused; \
///      is the cluster running? try `syncctl dev up`"
/// );
/// assert!(err.is_retryable());
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No member could be reached within the call's deadline (every attempt failed to connect or
    /// the connection broke), or every member answered UNAVAILABLE without naming a leader.
    #[error("no member reachable at {}: {reason}; {START_HINT}", tried.join(", "))]
    Unavailable {
        /// The member addresses the client tried, in the order first tried.
        tried: Vec<String>,
        /// Why, in words: "connection refused", "timed out after 2s", or the distinct reasons
        /// joined by " / ".
        reason: String,
    },
    /// Members answered UNAVAILABLE until the deadline: usually no leader is elected (an
    /// election is under way, or there is no quorum), or the serving node was shutting down.
    /// Retried inside the deadline before it is returned.
    #[error("unavailable: {message}")]
    ServerUnavailable {
        /// The last answer's message, which says why.
        message: String,
    },
    /// DEADLINE_EXCEEDED, or the client's own deadline passed: for an Acquire, the wait for the
    /// lock ended without a grant; otherwise the call did not finish in time (it may still take
    /// effect, once).
    #[error("timed out: {message}")]
    Timeout {
        /// What timed out.
        message: String,
    },
    /// A try-lock (an Acquire without waiting) found the lock held in a conflicting mode.
    #[error("lock `{name}` is held{}", holders_suffix(holders))]
    NotAcquired {
        /// The lock's name.
        name: String,
        /// Its holders when the request was refused.
        holders: Vec<Holder>,
    },
    /// ABORTED on an Acquire: the request would have closed a cycle in the waits-for graph and
    /// was chosen as the victim. The session keeps the holds it had; release one of them (or
    /// retry later) to let the others proceed.
    #[error("{message}")]
    Deadlock {
        /// The server's description of the cycle, e.g. "deadlock: cli-1 (session 7) waits for
        /// res-B held by cli-2 (session 9), which waits for res-A held by cli-1 (session 7)".
        message: String,
    },
    /// FAILED_PRECONDITION on a Release: the session does not hold the lock.
    #[error("not held: {message}")]
    NotHeld {
        /// The server's message.
        message: String,
    },
    /// NOT_FOUND for a session: it does not exist, or it expired or was revoked, so every lock
    /// it held is gone. Open a new session.
    #[error("session expired or unknown: {message}")]
    SessionExpired {
        /// The server's message.
        message: String,
    },
    /// NOT_FOUND for anything other than a session.
    #[error("not found: {message}")]
    NotFound {
        /// The server's message.
        message: String,
    },
    /// INVALID_ARGUMENT: the request is malformed (a bad lock name, a TTL out of bounds, ...).
    /// Retrying it unchanged fails the same way.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// The server's message, naming the bad field and the allowed range.
        message: String,
    },
    /// RESOURCE_EXHAUSTED: a configured limit (sessions, locks per session, waiters per lock)
    /// is reached.
    #[error("resource exhausted: {message}")]
    ResourceExhausted {
        /// The server's message, naming the limit.
        message: String,
    },
    /// FAILED_PRECONDITION other than [`NotHeld`](Error::NotHeld): the call does not apply to
    /// the current state (e.g. the session already has an Acquire of this lock waiting).
    #[error("failed precondition: {message}")]
    FailedPrecondition {
        /// The server's message.
        message: String,
    },
    /// ABORTED other than a deadlock (e.g. a retry whose answer was already delivered and
    /// discarded, or a lock watcher that fell behind).
    #[error("aborted: {message}")]
    Aborted {
        /// The server's message.
        message: String,
    },
    /// ALREADY_EXISTS.
    #[error("already exists: {message}")]
    AlreadyExists {
        /// The server's message.
        message: String,
    },
    /// PERMISSION_DENIED.
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// The server's message.
        message: String,
    },
    /// UNAUTHENTICATED: the auth token is missing or wrong (see
    /// [`ClientBuilder::auth_token`](crate::ClientBuilder::auth_token)).
    #[error("unauthenticated: {message}; check the auth token")]
    Unauthenticated {
        /// The server's message.
        message: String,
    },
    /// CANCELLED: the call was cancelled (usually by the server shutting down).
    #[error("cancelled: {message}")]
    Cancelled {
        /// The server's message.
        message: String,
    },
    /// OUT_OF_RANGE.
    #[error("out of range: {message}")]
    OutOfRange {
        /// The server's message.
        message: String,
    },
    /// UNIMPLEMENTED: the server does not offer this call (an older syncd, or not a syncd).
    #[error("not implemented by the server: {message}; is it a syncd node of this version?")]
    Unimplemented {
        /// The server's message.
        message: String,
    },
    /// INTERNAL or DATA_LOSS: a server bug or a damaged node. Report it with the server's log.
    #[error("server error ({code}): {message}")]
    Internal {
        /// The gRPC code (INTERNAL or DATA_LOSS).
        code: Code,
        /// The server's message.
        message: String,
    },
    /// UNKNOWN, or an answer that is not gRPC at all (a wrong port).
    #[error("unknown error: {message}")]
    Unknown {
        /// The server's (or transport's) message.
        message: String,
    },
    /// An endpoint that is not `host:port`.
    #[error("bad endpoint `{endpoint}`: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS settings cannot be used: a file that cannot be read, PEM that is not a
    /// certificate or a key ([`TlsOptions`](crate::TlsOptions)), or an `https://` endpoint
    /// without TLS settings.
    #[error("TLS: {reason}")]
    Tls {
        /// What is wrong, naming the file or the part.
        reason: String,
    },
    /// The server answered with a message the SDK cannot use (a required field missing).
    #[error("unexpected answer from the server: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
}

fn holders_suffix(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return String::new();
    }
    let mut text = String::from(" by ");
    for (i, h) in holders.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        let _ = write!(text, "session {}", h.session_id);
        if !h.client_name.is_empty() {
            let _ = write!(text, " ({})", h.client_name);
        }
        let _ = write!(text, " {}", h.mode);
    }
    text
}

/// Which call a status answered: decides what an ambiguous code means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallKind {
    /// Calls about a session (NOT_FOUND means the session is gone).
    Session,
    /// Acquire (ABORTED is a deadlock; NOT_FOUND the session).
    Acquire,
    /// Release (FAILED_PRECONDITION is "not held"; NOT_FOUND the session).
    Release,
    /// Everything else.
    Other,
}

impl Error {
    /// The error for a status the server (or the transport) returned to a call of `kind`.
    pub(crate) fn from_status(status: &Status, kind: CallKind) -> Error {
        if let Some(reason) = transport_reason(status) {
            return Error::Unknown { message: reason };
        }
        let message = status.message().trim().to_owned();
        match status.code() {
            Code::Ok => Error::Protocol {
                message: "an error with status OK".to_owned(),
            },
            Code::Cancelled => Error::Cancelled { message },
            Code::Unknown => Error::Unknown {
                message: not_grpc_hint(message),
            },
            Code::InvalidArgument => Error::InvalidArgument { message },
            Code::DeadlineExceeded => Error::Timeout { message },
            Code::NotFound if kind != CallKind::Other => Error::SessionExpired { message },
            Code::NotFound => Error::NotFound { message },
            Code::AlreadyExists => Error::AlreadyExists { message },
            Code::PermissionDenied => Error::PermissionDenied { message },
            Code::ResourceExhausted => Error::ResourceExhausted { message },
            Code::FailedPrecondition if kind == CallKind::Release => Error::NotHeld { message },
            Code::FailedPrecondition => Error::FailedPrecondition { message },
            Code::Aborted
                if kind == CallKind::Acquire
                    && status
                        .metadata()
                        .get("x-sync-error-reason")
                        .is_some_and(|v| v.as_bytes() == b"deadlock") =>
            {
                Error::Deadlock { message }
            }
            Code::Aborted => Error::Aborted { message },
            Code::OutOfRange => Error::OutOfRange { message },
            Code::Unimplemented => Error::Unimplemented { message },
            Code::Internal | Code::DataLoss => Error::Internal {
                code: status.code(),
                message: not_grpc_hint(message),
            },
            Code::Unavailable => Error::ServerUnavailable { message },
            Code::Unauthenticated => Error::Unauthenticated { message },
        }
    }

    /// The gRPC code this error stands for, if it came from one.
    ///
    /// ```
    /// use sync_client::Error;
    /// let err = Error::Deadlock { message: "deadlock: ...".into() };
    /// assert_eq!(err.code(), Some(tonic::Code::Aborted));
    /// ```
    pub fn code(&self) -> Option<Code> {
        Some(match self {
            Error::Unavailable { .. } | Error::ServerUnavailable { .. } => Code::Unavailable,
            Error::Timeout { .. } => Code::DeadlineExceeded,
            Error::NotAcquired { .. } => return None,
            Error::Deadlock { .. } | Error::Aborted { .. } => Code::Aborted,
            Error::NotHeld { .. } | Error::FailedPrecondition { .. } => Code::FailedPrecondition,
            Error::SessionExpired { .. } | Error::NotFound { .. } => Code::NotFound,
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::ResourceExhausted { .. } => Code::ResourceExhausted,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::Unauthenticated { .. } => Code::Unauthenticated,
            Error::Cancelled { .. } => Code::Cancelled,
            Error::OutOfRange { .. } => Code::OutOfRange,
            Error::Unimplemented { .. } => Code::Unimplemented,
            Error::Internal { code, .. } => *code,
            Error::Unknown { .. } => Code::Unknown,
            Error::InvalidEndpoint { .. } | Error::Tls { .. } | Error::Protocol { .. } => {
                return None;
            }
        })
    }

    /// True if the same call may succeed later: the cluster was unreachable or leaderless.
    /// (The client already retried inside the call's deadline before returning it.)
    ///
    /// ```
    /// use sync_client::Error;
    ///
    /// let no_leader = Error::ServerUnavailable { message: "no leader".into() };
    /// assert!(no_leader.is_retryable());
    /// let bad = Error::InvalidArgument { message: "name too long".into() };
    /// assert!(!bad.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. } | Error::ServerUnavailable { .. }
        )
    }

    /// True if a lock was not obtained because somebody else holds it: a refused try-lock
    /// ([`NotAcquired`](Error::NotAcquired)) or a wait that timed out
    /// ([`Timeout`](Error::Timeout)).
    ///
    /// ```
    /// use sync_client::Error;
    ///
    /// let busy = Error::NotAcquired { name: "k".into(), holders: vec![] };
    /// assert!(busy.is_not_acquired());
    /// assert_eq!(busy.to_string(), "lock `k` is held");
    /// ```
    pub fn is_not_acquired(&self) -> bool {
        matches!(self, Error::NotAcquired { .. } | Error::Timeout { .. })
    }
}

/// The cause of a status that never reached a server (a connection that could not be opened or
/// broke), in words; `None` if a server answered.
pub(crate) fn transport_reason(status: &Status) -> Option<String> {
    StdError::source(status).map(describe_cause)
}

/// Why a connection could not be opened or broke, from an error's chain of causes, in words:
/// the first I/O error, else the innermost message (the most specific one), with h2's messages
/// for a peer that is not a gRPC server replaced by [`NOT_GRPC`].
pub fn describe_cause(err: &(dyn StdError + 'static)) -> String {
    io_reason(err).unwrap_or_else(|| not_grpc_hint(innermost(err)))
}

/// [`describe_cause`] for a connection opened over TLS. A client that presents no certificate to
/// a node started with `--client-cert-auth` completes its side of a TLS 1.3 handshake, and only
/// then does the server refuse it: it sends a `CertificateRequired` alert and closes. Whether the
/// client reads the alert or first trips over the closed socket (a broken pipe while it writes
/// the HTTP/2 preface, a reset, an end of stream) is a race, so a closed connection on a TLS
/// connection without a client certificate is named for its likely cause. The same race hides
/// the alert for a certificate the server does not accept (one of another CA).
///
/// ```
/// use std::io;
/// let closed = io::Error::from(io::ErrorKind::BrokenPipe);
/// let text = sync_client::error::describe_tls_cause(&closed, false);
/// assert!(text.contains("requires a client certificate"), "{text}");
/// // With a certificate presented, the server may not accept it.
/// let text = sync_client::error::describe_tls_cause(&closed, true);
/// assert!(text.contains("did not accept the client certificate"), "{text}");
/// // A refused connection is no TLS matter.
/// let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
/// assert_eq!(sync_client::error::describe_tls_cause(&refused, false), "connection refused");
/// ```
pub fn describe_tls_cause(err: &(dyn StdError + 'static), presents_certificate: bool) -> String {
    let reason = describe_cause(err);
    if reason.starts_with("TLS: ") || !is_closed_connection(err) {
        return reason;
    }
    let closed = io_reason(err).unwrap_or_else(|| innermost(err));
    if presents_certificate {
        // The same race with a certificate the server does not accept (another CA's).
        format!(
            "TLS: the server closed the connection; right after the handshake, that means it \
             did not accept the client certificate (is it signed by the CA the server trusts?) \
             ({closed})"
        )
    } else {
        format!(
            "TLS: the server closed the connection after the handshake; it probably \
             {CERTIFICATE_REQUIRED} ({closed})"
        )
    }
}

/// What a node started with `--client-cert-auth` asks of a client that presented no certificate.
const CERTIFICATE_REQUIRED: &str = "requires a client certificate signed by its CA (syncctl \
                                    --cert/--cert-key, TlsOptions::identity_files)";

/// Whether a chain of causes says the peer closed the connection: a broken pipe, a reset, an
/// aborted connection, an unexpected end of stream, or hyper's "connection closed".
fn is_closed_connection(err: &(dyn StdError + 'static)) -> bool {
    if let Some(io) = first_io_error(err) {
        return matches!(
            io.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
        );
    }
    let text = innermost(err);
    text.contains("connection closed") || text.contains("channel closed")
}

/// The first I/O error in a chain of causes.
fn first_io_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a io::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

/// The deepest cause in a chain of errors, in words: the most specific one.
pub(crate) fn innermost(err: &(dyn StdError + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// The first I/O error in a chain of causes, in words: "connection refused", "connection reset",
/// "timed out", or the error's own text without the "(os error N)" suffix.
///
/// ```
/// use std::io;
/// let err = io::Error::from(io::ErrorKind::ConnectionRefused);
/// assert_eq!(sync_client::error::io_reason(&err).as_deref(), Some("connection refused"));
/// ```
pub fn io_reason(err: &(dyn StdError + 'static)) -> Option<String> {
    first_io_error(err).map(describe_io)
}

fn describe_io(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        io::ErrorKind::ConnectionAborted => "connection aborted".to_owned(),
        io::ErrorKind::TimedOut => "timed out".to_owned(),
        // What an HTTP/1.1-only server (a metrics port) does to an HTTP/2 connection.
        io::ErrorKind::BrokenPipe => closed_by_server(),
        io::ErrorKind::AddrNotAvailable => "address not available".to_owned(),
        io::ErrorKind::HostUnreachable => "host unreachable".to_owned(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".to_owned(),
        // rustls reports handshake failures as invalid data.
        io::ErrorKind::InvalidData => tls_reason(&err.to_string()),
        _ => {
            // "failed to lookup address information: Name or service not known (os error -2)"
            let text = err.to_string();
            match text.find(" (os error") {
                Some(at) => text[..at].to_owned(),
                None => text,
            }
        }
    }
}

/// A failed TLS handshake in words that say what to change. rustls names the problem (an alert
/// from the server, or what was wrong with its certificate); the common ones get advice.
fn tls_reason(rustls: &str) -> String {
    let required;
    let advice = if rustls.contains("CertificateRequired") {
        required = format!("the server {CERTIFICATE_REQUIRED}");
        &required
    } else if rustls.contains("fatal alert: UnknownCA")
        || rustls.contains("fatal alert: BadCertificate")
        || rustls.contains("fatal alert: CertificateUnknown")
    {
        "the server refused the client certificate: it is not signed by the CA the server trusts"
    } else if rustls.contains("invalid peer certificate") {
        "the server's certificate cannot be verified with the given CA, or does not name the \
         address connected to (check --cacert, or TlsOptions::domain_name)"
    } else if rustls.contains("corrupt message") || rustls.contains("InvalidContentType") {
        "the server does not speak TLS (drop --cacert, or use the server's TLS port)"
    } else {
        "handshake failed"
    };
    format!("TLS: {advice} ({rustls})")
}

/// What an endpoint that answers HTTP but not gRPC is, and the usual reasons.
pub const NOT_GRPC: &str = "not a gRPC server, or one that requires TLS (wrong port? syncd \
                            serves gRPC on --listen, metrics on --metrics-listen; a node started \
                            with --cert-file needs --cacert or ClientBuilder::tls)";

/// Whether a call's message is what tonic and h2 report when the peer is not a gRPC server:
/// - an HTTP/1.1 server (a metrics port) answers the HTTP/2 preface with a protocol error or an
///   HTTP status without `grpc-status`;
/// - a TLS server answers a plaintext preface with a TLS alert record (`15 03 03 00 02 …`), which
///   h2 reads as a frame header announcing a 1.3 MB frame: "frame with invalid size".
pub fn is_not_grpc(message: &str) -> bool {
    message.contains("h2 protocol error")
        || message.starts_with("grpc-status header missing")
        || message.contains("frame with invalid size")
}

/// Replaces the messages tonic produces for a non-gRPC peer with [`NOT_GRPC`].
fn not_grpc_hint(message: String) -> String {
    if is_not_grpc(&message) {
        NOT_GRPC.to_owned()
    } else if message == "connection closed" {
        // hyper's words for an end of stream before any answer; whether a TLS server's alert
        // or its close reaches a plaintext client first is a race (see `describe_tls_cause`).
        closed_by_server()
    } else {
        message
    }
}

/// A server that closed the connection before answering anything: what an HTTP/1.1-only
/// server (a metrics port) does to an HTTP/2 connection, and what a TLS server does to a
/// plaintext one.
fn closed_by_server() -> String {
    format!("the server closed the connection; {NOT_GRPC}")
}

/// Joins the distinct reasons of failed attempts, in first-seen order.
pub(crate) fn joined_reasons<'a>(reasons: impl IntoIterator<Item = &'a str>) -> String {
    let mut distinct: Vec<&str> = Vec::new();
    for r in reasons {
        if !distinct.contains(&r) {
            distinct.push(r);
        }
    }
    if distinct.is_empty() {
        "no endpoints given".to_owned()
    } else {
        distinct.join(" / ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locks::LockMode;

    #[test]
    fn the_same_code_means_different_things_for_different_calls() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(
            "x-sync-error-reason",
            tonic::metadata::MetadataValue::from_static("deadlock"),
        );
        let deadlock = Status::with_metadata(Code::Aborted, "deadlock: a waits for b", md);
        assert!(matches!(
            Error::from_status(&deadlock, CallKind::Acquire),
            Error::Deadlock { .. }
        ));
        // Without the reason, ABORTED on an Acquire is something else (a request id too old).
        let aborted = Status::aborted("request expired");
        assert!(matches!(
            Error::from_status(&aborted, CallKind::Acquire),
            Error::Aborted { .. }
        ));
        assert!(matches!(
            Error::from_status(&aborted, CallKind::Other),
            Error::Aborted { .. }
        ));
        let precondition = Status::failed_precondition("session 3 does not hold lock `x`");
        assert!(matches!(
            Error::from_status(&precondition, CallKind::Release),
            Error::NotHeld { .. }
        ));
        assert!(matches!(
            Error::from_status(&precondition, CallKind::Acquire),
            Error::FailedPrecondition { .. }
        ));
        let not_found = Status::not_found("session 3 does not exist");
        assert!(matches!(
            Error::from_status(&not_found, CallKind::Session),
            Error::SessionExpired { .. }
        ));
        assert!(matches!(
            Error::from_status(&not_found, CallKind::Other),
            Error::NotFound { .. }
        ));
    }

    #[test]
    fn every_code_maps_back_to_itself() {
        for code in [
            Code::Cancelled,
            Code::Unknown,
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
            Code::Unauthenticated,
        ] {
            let err = Error::from_status(&Status::new(code, "m"), CallKind::Other);
            assert_eq!(err.code(), Some(code), "{err:?}");
            assert!(err.to_string().contains('m'), "{err}");
        }
    }

    #[test]
    fn a_refused_try_lock_names_the_holders() {
        let err = Error::NotAcquired {
            name: "res-A".into(),
            holders: vec![Holder {
                session_id: 7,
                client_name: "cli-1".into(),
                mode: LockMode::Exclusive,
                token: 12,
                acquired_unix_ms: 0,
                lock_delay_ms: 0,
            }],
        };
        assert_eq!(
            err.to_string(),
            "lock `res-A` is held by session 7 (cli-1) exclusive"
        );
        assert!(err.is_not_acquired());
    }

    #[test]
    fn a_server_that_is_not_grpc_is_named_as_such() {
        let status = Status::unknown("grpc-status header missing, mapped from HTTP status 404");
        assert!(
            Error::from_status(&status, CallKind::Other)
                .to_string()
                .contains("not a gRPC server")
        );
    }

    #[test]
    fn distinct_reasons_are_stated_once() {
        assert_eq!(
            joined_reasons(["connection refused", "timed out", "connection refused"]),
            "connection refused / timed out"
        );
    }
}
