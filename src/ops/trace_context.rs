//! W3C trace context (docs/contract.md §11): a command's `traceparent` and `tracestate`
//! headers are read once, at the edge ([`Incoming::from_headers`], given how to look a header
//! up: the broker knows how its messages carry them); the worker's span for the
//! command continues that trace, or starts one ([`CommandTrace::start`]); the command's API
//! call and everything published for it carry the worker's `traceparent`
//! ([`CommandTrace::traceparent`]).
//!
//! The ids come from OpenTelemetry when spans are exported (`telemetry.otlp_endpoint`, see
//! [`super::telemetry`]): the exported span and the propagated `traceparent` are then the same
//! span. Without an exporter there is no OpenTelemetry layer at all, and the worker makes the
//! span id itself (8 random bytes): the headers still link the command, its API call and its
//! events, at the cost of a few random numbers per command.
//!
//! The context travels with the command's task ([`scope`], [`with_current`]), as the current
//! span does, so the API client and the publisher need no extra argument; whatever runs
//! outside a command (the callback relay, the breaker's probe) sends no `traceparent`.
//!
//! The headers are read here rather than by `opentelemetry_sdk`'s `TraceContextPropagator`,
//! which reads them otherwise (it trims spaces, takes a trailing dash after version 00 and ids
//! of any length, `00-1-2-01`; it re-encodes `tracestate`, dropping a list it cannot parse and
//! keeping one over [`MAX_TRACESTATE`]) and builds a `Context` for every command, spans
//! exported or not: 2 allocations without a `tracestate`, 17 with one of two entries, against
//! 0 and 1 here.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

/// The header that carries the trace and the parent span.
pub const TRACEPARENT: &str = "traceparent";

/// The header that carries vendors' trace state.
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` carried on: the length the W3C text asks every vendor to propagate
/// (32 entries). A longer one is dropped rather than cut into an invalid list.
pub const MAX_TRACESTATE: usize = 512;

/// The only flag of version 00: the caller may have recorded its span.
const SAMPLED: u8 = 0x01;

/// Why a `traceparent` was not taken. Never a rejection of the command: the worker then
/// starts a new trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceContextError {
    /// Not of the shape `version-traceid-parentid-flags`.
    #[error("traceparent is malformed: {0}")]
    Malformed(&'static str),
    /// Version `ff`, which the W3C text forbids.
    #[error("traceparent has the forbidden version ff")]
    ForbiddenVersion,
    /// A trace id or parent id of zeros only.
    #[error("traceparent has an all-zero {0}")]
    ZeroId(&'static str),
    /// Not text, or longer than [`MAX_TRACESTATE`].
    #[error("tracestate is not printable ASCII of at most {MAX_TRACESTATE} bytes")]
    BadState,
}

/// A parsed `traceparent`: the caller's trace and span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace, never all zeros.
    pub trace_id: [u8; 16],
    /// The caller's span, never all zeros.
    pub parent_id: [u8; 8],
    /// `trace-flags`.
    pub flags: u8,
}

impl TraceParent {
    /// Reads a `traceparent` header strictly: lowercase hex, exact lengths, no zero ids.
    /// Version 00 must be exactly 55 bytes; a later version may be longer, and only its first
    /// four fields are read, as the W3C text requires of a version 00 reader.
    pub fn parse(header: &[u8]) -> Result<Self, TraceContextError> {
        const LEN: usize = 55;
        if header.len() < LEN {
            return Err(TraceContextError::Malformed("shorter than 55 bytes"));
        }
        let version = hex_byte(&header[0..2]).ok_or(TraceContextError::Malformed("version"))?;
        if version == 0xff {
            return Err(TraceContextError::ForbiddenVersion);
        }
        if version == 0 && header.len() != LEN {
            return Err(TraceContextError::Malformed(
                "version 00 is exactly 55 bytes",
            ));
        }
        if header.len() > LEN && header[LEN] != b'-' {
            return Err(TraceContextError::Malformed("no dash after the flags"));
        }
        if header[2] != b'-' || header[35] != b'-' || header[52] != b'-' {
            return Err(TraceContextError::Malformed("dashes"));
        }
        let mut trace_id = [0; 16];
        hex_into(&header[3..35], &mut trace_id).ok_or(TraceContextError::Malformed("trace-id"))?;
        let mut parent_id = [0; 8];
        hex_into(&header[36..52], &mut parent_id)
            .ok_or(TraceContextError::Malformed("parent-id"))?;
        let flags = hex_byte(&header[53..55]).ok_or(TraceContextError::Malformed("flags"))?;
        if trace_id == [0; 16] {
            return Err(TraceContextError::ZeroId("trace-id"));
        }
        if parent_id == [0; 8] {
            return Err(TraceContextError::ZeroId("parent-id"));
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }
}

/// What a command's headers say about its trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incoming {
    /// A valid `traceparent`, if the command had one.
    pub parent: Option<TraceParent>,
    /// `tracestate`, as received, when there is a valid `traceparent` (the W3C text ties them).
    pub state: Option<String>,
}

/// A header's value, as a message carries it: text, or something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderValue<'a> {
    /// Its bytes.
    Text(&'a [u8]),
    /// Not text (a number, a table): no trace header can be one.
    Other,
}

impl<'a> HeaderValue<'a> {
    fn text(self) -> Option<&'a [u8]> {
        match self {
            Self::Text(bytes) => Some(bytes),
            Self::Other => None,
        }
    }
}

impl Incoming {
    /// Reads a command's trace headers, each looked up by name with `get`. An invalid
    /// `traceparent` or `tracestate` is ignored, with a debug log line.
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<HeaderValue<'a>>) -> Self {
        let parent = match get(TRACEPARENT).map(HeaderValue::text) {
            None => None,
            Some(bytes) => match bytes.ok_or(TraceContextError::Malformed("not text")) {
                Ok(bytes) => TraceParent::parse(bytes)
                    .inspect_err(|e| tracing::debug!(error = %e, "ignoring the traceparent"))
                    .ok(),
                Err(e) => {
                    tracing::debug!(error = %e, "ignoring the traceparent");
                    None
                }
            },
        };
        let state = parent
            .and_then(|_| get(TRACESTATE))
            .and_then(|value| match state(value) {
                Ok(state) => Some(state),
                Err(e) => {
                    tracing::debug!(error = %e, "ignoring the tracestate");
                    None
                }
            });
        Self { parent, state }
    }
}

/// The worker's span for one command: the trace it belongs to and its own span id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTrace {
    /// The incoming trace, or a new one.
    pub trace_id: [u8; 16],
    /// The worker's span for the command.
    pub span_id: [u8; 8],
    /// `trace-flags` sent on.
    pub flags: u8,
    /// `tracestate`, as received.
    pub state: Option<String>,
    /// The `traceparent` header, written once.
    header: String,
}

impl CommandTrace {
    /// The worker's span `span_id` in trace `trace_id`.
    pub fn new(trace_id: [u8; 16], span_id: [u8; 8], flags: u8, state: Option<String>) -> Self {
        let mut header = String::with_capacity(55);
        header.push_str("00-");
        push_hex(&mut header, &trace_id);
        header.push('-');
        push_hex(&mut header, &span_id);
        header.push('-');
        push_hex(&mut header, &[flags]);
        Self {
            trace_id,
            span_id,
            flags,
            state,
            header,
        }
    }

    /// The trace a command's span will be in, when it is known before the span exists: the
    /// incoming one, or, when spans are not exported, a new one. `None` when OpenTelemetry
    /// will start the trace. Given to the span at its creation, the trace id costs the logs
    /// nothing more; recorded later it would make them rewrite the span's fields.
    pub fn preset(incoming: &Incoming) -> Option<[u8; 16]> {
        match incoming.parent {
            Some(p) => Some(p.trace_id),
            None if EXPORTING.load(Ordering::Relaxed) => None,
            None => Some(random_nonzero_u128().to_be_bytes()),
        }
    }

    /// Continues `incoming` (or starts a trace) in `span`, the worker's span for the command.
    /// When an OpenTelemetry layer records `span`, it is given the incoming parent and its
    /// ids are the ones returned; otherwise the span id is made here, in the trace `preset`
    /// (from [`CommandTrace::preset`]) or a new one.
    pub fn start(span: &tracing::Span, incoming: &Incoming, preset: Option<[u8; 16]>) -> Self {
        if let Some(own) = otel::start(span, incoming) {
            return own;
        }
        let trace_id = preset.unwrap_or_else(|| random_nonzero_u128().to_be_bytes());
        let flags = incoming.parent.map_or(SAMPLED, |p| p.flags & SAMPLED);
        Self::new(
            trace_id,
            random_nonzero_u64().to_be_bytes(),
            flags,
            incoming.state.clone(),
        )
    }

    /// The trace id, 32 lowercase hex digits (the `trace_id` of the command's log lines).
    pub fn trace_id_hex(&self) -> &str {
        &self.header[3..35]
    }

    /// The `traceparent` the command's API call and messages carry: version 00, this trace,
    /// the worker's span as the parent.
    pub fn traceparent(&self) -> &str {
        &self.header
    }

    /// The headers the command's messages carry, by name: `traceparent`, and `tracestate`
    /// when one came.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        std::iter::once((TRACEPARENT, self.header.as_str()))
            .chain(self.state.as_deref().map(|state| (TRACESTATE, state)))
    }
}

/// Whether spans are exported: then OpenTelemetry makes new traces' ids.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Says that an OpenTelemetry layer exports spans from now on (see [`super::telemetry`]).
pub fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

tokio::task_local! {
    static CURRENT: CommandTrace;
}

/// Runs `future` (a command's processing) with `trace` as the current trace context.
pub fn scope<F: Future>(trace: CommandTrace, future: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(trace, future)
}

/// Calls `f` with the current command's trace context; `None` outside a command.
pub fn with_current<R>(f: impl FnOnce(&CommandTrace) -> R) -> Option<R> {
    CURRENT.try_with(f).ok()
}

/// The span ids when an OpenTelemetry layer is installed.
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{CommandTrace, Incoming};

    /// `None` when no OpenTelemetry layer records `span` (no exporter, or the span is
    /// filtered out).
    pub(super) fn start(span: &tracing::Span, incoming: &Incoming) -> Option<CommandTrace> {
        // Always set, so a command without a trace is a root, whatever span is current.
        let parent_cx = match incoming.parent {
            None => opentelemetry::Context::new(),
            Some(parent) => {
                let remote = SpanContext::new(
                    TraceId::from_bytes(parent.trace_id),
                    SpanId::from_bytes(parent.parent_id),
                    TraceFlags::new(parent.flags),
                    true,
                    incoming
                        .state
                        .as_deref()
                        .and_then(|s| s.parse::<TraceState>().ok())
                        .unwrap_or_default(),
                );
                opentelemetry::Context::new().with_remote_span_context(remote)
            }
        };
        // Fails only without the layer, which the context below then also says.
        let _ = span.set_parent(parent_cx);
        let cx = span.context();
        let own = cx.span().span_context().clone();
        own.is_valid().then(|| {
            CommandTrace::new(
                own.trace_id().to_bytes(),
                own.span_id().to_bytes(),
                own.trace_flags().to_u8(),
                incoming.state.clone(),
            )
        })
    }
}

fn state(value: HeaderValue<'_>) -> Result<String, TraceContextError> {
    let bytes = value.text().ok_or(TraceContextError::BadState)?;
    if bytes.len() > MAX_TRACESTATE || !bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(TraceContextError::BadState);
    }
    // Printable ASCII is UTF-8.
    String::from_utf8(bytes.to_vec()).map_err(|_| TraceContextError::BadState)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    Some(hex_digit(two[0])? << 4 | hex_digit(two[1])?)
}

fn hex_into(text: &[u8], out: &mut [u8]) -> Option<()> {
    for (pair, byte) in text.chunks_exact(2).zip(out.iter_mut()) {
        *byte = hex_byte(pair)?;
    }
    Some(())
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// `bytes` in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

fn random_nonzero_u128() -> u128 {
    loop {
        let n = fastrand::u128(..);
        if n != 0 {
            return n;
        }
    }
}

fn random_nonzero_u64() -> u64 {
    loop {
        let n = fastrand::u64(..);
        if n != 0 {
            return n;
        }
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

#[cfg(test)]
mod tests;
