//! Turning failures into one line a person can act on.
//!
//! gRPC and transport errors arrive as nested chains ("transport error" → "tcp connect error" →
//! "Connection refused (os error 111)"), and `tonic::Status` prints its metadata map. syncctl
//! shows only the cause that explains the failure: "connection refused", "timed out after 5s",
//! "unavailable: no leader".

use std::error::Error as StdError;
use std::time::Duration;

use tonic::{Code, Status};

pub use sync_client::error::{
    NOT_GRPC, START_HINT, describe_cause, describe_tls_cause, is_not_grpc,
};

/// `cache set --if-version` found the key at another version: nothing was written. Its own type
/// so that `main` can give it exit code 3, as the lock's "not acquired": the call worked, the
/// condition did not hold.
#[derive(Debug)]
pub struct CasMismatch {
    pub key: String,
    /// The version asked for (0: "does not exist").
    pub expected: u64,
    /// The key's version now (0: it does not exist).
    pub current: u64,
}

impl std::fmt::Display for CasMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = match self.current {
            0 => "does not exist".to_owned(),
            v => format!("is at version {v}"),
        };
        let wanted = match self.expected {
            0 => "not to exist".to_owned(),
            v => format!("version {v}"),
        };
        write!(
            f,
            "`{}` {now}, --if-version wanted {wanted}; nothing written (read it with `syncctl \
             cache get {}`)",
            self.key, self.key
        )
    }
}

impl StdError for CasMismatch {}

/// Renders an error and its causes on one line: "context: cause: root cause".
pub fn one_line(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Why a gRPC call failed: the root transport cause if the call never reached a server,
/// otherwise the status code and the server's message.
pub fn describe_status(status: &Status) -> String {
    if let Some(source) = StdError::source(status) {
        return describe_cause(source);
    }
    let message = status.message();
    // Something listens there, but it is not a gRPC server (a metrics port, or a TLS port
    // spoken to in plaintext).
    if is_not_grpc(message) {
        return NOT_GRPC.to_owned();
    }
    if status.code() == Code::Unimplemented && message.starts_with("unknown service sync.") {
        return format!("not a syncd node ({message})");
    }
    let code = code_name(status.code());
    let message = status.message().trim();
    if message.is_empty() {
        code.to_owned()
    } else {
        format!("{code}: {message}")
    }
}

/// "timed out after 5s".
pub fn timed_out(after: Duration) -> String {
    format!("timed out after {}", humantime::format_duration(after))
}

/// The gRPC status code as the lower-case words of its name.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use std::io;

    #[test]
    fn chains_are_joined_on_one_line() {
        let err = Err::<(), _>(anyhow::anyhow!("first\nsecond"))
            .context("outer")
            .unwrap_err();
        assert_eq!(one_line(&err), "outer: first second");
    }

    #[test]
    fn a_server_status_shows_code_and_message() {
        let status = Status::unavailable("no leader elected yet\n");
        assert_eq!(
            describe_status(&status),
            "unavailable: no leader elected yet"
        );
        assert_eq!(describe_status(&Status::internal("")), "internal error");
    }

    #[test]
    fn a_transport_failure_shows_its_io_cause() {
        #[derive(Debug)]
        struct Wrapper(io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("transport error")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let refused = Wrapper(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(describe_cause(&refused), "connection refused");
        let closed = Wrapper(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(describe_cause(&closed).contains("not a gRPC server"));
        let status = Status::from_error(Box::new(Wrapper(io::Error::other(
            "failed to lookup address information (os error -2)",
        ))));
        assert_eq!(
            describe_status(&status),
            "failed to lookup address information"
        );
    }

    #[test]
    fn a_server_that_is_not_grpc_is_named_as_such() {
        let status = Status::internal("h2 protocol error: http2 error");
        assert!(describe_status(&status).starts_with("not a gRPC server"));
        let status =
            Status::unknown("grpc-status header missing, mapped from HTTP status code 404");
        assert!(describe_status(&status).starts_with("not a gRPC server"));
    }

    #[test]
    fn a_cas_mismatch_names_both_versions() {
        let m = CasMismatch {
            key: "k1".into(),
            expected: 7,
            current: 9,
        };
        assert_eq!(
            m.to_string(),
            "`k1` is at version 9, --if-version wanted version 7; nothing written (read it with \
             `syncctl cache get k1`)"
        );
        let m = CasMismatch {
            key: "k1".into(),
            expected: 0,
            current: 3,
        };
        assert!(m.to_string().contains("wanted not to exist"), "{m}");
    }

    #[test]
    fn timeouts_name_the_deadline() {
        assert_eq!(
            timed_out(Duration::from_millis(1500)),
            "timed out after 1s 500ms"
        );
    }
}
