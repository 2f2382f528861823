//! Log lines carry the node's current Raft term, so an operator reading any line knows which
//! term it happened in (the node id comes from the `node` span the binary enters at start).
//!
//! The term is kept in a process-wide atomic, set by the driver whenever it publishes status;
//! [`WithTerm`] wraps any event formatter and adds it: `term=N ` at the start of a text line, a
//! `"term":N` first field in a JSON object. (A process hosts one node; with several Raft groups
//! per node this becomes the main group's term.)

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

static TERM: AtomicU64 = AtomicU64::new(0);

/// Records the node's current term for log lines.
pub fn set_term(term: u64) {
    TERM.store(term, Ordering::Relaxed);
}

/// The term log lines carry.
pub fn term() -> u64 {
    TERM.load(Ordering::Relaxed)
}

/// An event formatter that adds the current term to what `inner` writes.
pub struct WithTerm<F> {
    inner: F,
    json: bool,
}

impl<F> WithTerm<F> {
    /// Wraps a text formatter.
    pub fn text(inner: F) -> Self {
        WithTerm { inner, json: false }
    }

    /// Wraps a JSON formatter.
    pub fn json(inner: F) -> Self {
        WithTerm { inner, json: true }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithTerm<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let term = term();
        match line.strip_prefix('{') {
            Some(rest) if self.json => write!(writer, "{{\"term\":{term},{rest}"),
            _ => write!(writer, "term={term} {line}"),
        }
    }
}
