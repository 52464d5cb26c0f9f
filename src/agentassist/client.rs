//! The AgentAssist `assign-conversation` call (agentassist-api.md): one HTTP request, its
//! answer classified as success, a transient error or a permanent one.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::agentassist::bots::Bot;
use crate::agentassist::jwt::Token;
use crate::contract::{Command, Target};
use crate::fairness::departure::Ended;
use crate::json;
use crate::ops::trace_context;

/// Error bodies kept in events are cut at this size.
const MAX_ERROR_BODY: usize = 8 * 1024;

/// At most this much of a response is read. A longer success body is kept as a string of its
/// first 64 KiB, and the event says `responseTruncated`.
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// What kind of failure an [`ApiError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The API answered with a non-2xx status.
    HttpStatus,
    /// No complete answer within `agentassist.request_timeout`.
    Timeout,
    /// The connection could not be made or broke.
    Connection,
    /// The server's certificate did not verify (unknown issuer, expired, another host's):
    /// named `connection` in events, and never retried, since only an operator can fix it
    /// (docs/contract.md §13).
    Certificate,
    /// Anything else about sending the request.
    Request,
}

impl ErrorKind {
    /// Its name in events: `http_status`, `timeout`, `connection`, `request`.
    pub fn name(self) -> &'static str {
        match self {
            Self::HttpStatus => "http_status",
            Self::Timeout => "timeout",
            Self::Connection | Self::Certificate => "connection",
            Self::Request => "request",
        }
    }
}

/// A failed call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// The HTTP status, if one came back.
    pub status: Option<u16>,
    /// What happened, for an operator to read; events carry it as `error.message`.
    pub message: String,
    /// The response body (JSON, or a string), if any.
    pub body: Option<Value>,
    /// The server's `Retry-After`.
    pub retry_after: Option<Duration>,
    /// Nothing reached the server: the connection, or its TLS handshake, could not be made.
    pub unsent: bool,
}

impl ApiError {
    /// A failure with no HTTP answer behind it.
    pub fn without_status(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            status: None,
            message: message.into(),
            body: None,
            retry_after: None,
            unsent: false,
        }
    }

    /// Connect errors, timeouts, 408, 429 and 5xx — and a body that says the rate limit was
    /// exceeded, since the vendor does not document which status it uses for that.
    pub fn is_transient(&self) -> bool {
        match self.status {
            None => matches!(self.kind, ErrorKind::Timeout | ErrorKind::Connection),
            Some(408 | 429) => true,
            Some(s) if s >= 500 => true,
            Some(_) => self.says_rate_limited(),
        }
    }

    /// A 429, or a body that says so.
    pub fn is_rate_limited(&self) -> bool {
        self.status == Some(429) || self.says_rate_limited()
    }

    /// The token was refused.
    pub fn is_unauthorized(&self) -> bool {
        self.status == Some(401)
    }

    fn says_rate_limited(&self) -> bool {
        let text = match &self.body {
            Some(Value::String(s)) => s.to_ascii_lowercase(),
            Some(v) => v.to_string().to_ascii_lowercase(),
            None => return false,
        };
        text.contains("rate limit") || text.contains("too many requests")
    }
}

/// A 2xx answer.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// The HTTP status (2xx).
    pub status: u16,
    /// The body as received: the JSON itself if it parses (kept verbatim, never re-encoded),
    /// else a JSON string of the text.
    pub body: Box<RawValue>,
    /// The body was longer than [`MAX_RESPONSE_BODY`] and is cut.
    pub truncated: bool,
}

/// The body the API expects, serialized once per command and reused by every attempt.
pub fn request_body(command: &Command, callback_url: &str) -> Bytes {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        callback_url: &'a str,
        org_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        a_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        transferred_type: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        queue_id: Option<&'a str>,
        bot_session_id: &'a str,
    }
    let (a_id, transferred_type, queue_id) = match &command.target {
        // No transferredType is documented for agent transfers, so none is sent.
        Target::Agent(a) => (Some(a.as_str()), None, None),
        Target::Queue(q) => (None, Some("QUEUE"), Some(q.as_str())),
    };
    let body = Body {
        callback_url,
        org_id: &command.org_id,
        a_id,
        transferred_type,
        queue_id,
        bot_session_id: &command.bot_session_id,
    };
    serde_json::to_vec(&body)
        .expect("request body serializes")
        .into()
}

/// Makes calls; one per process, its connection pool shared by every command.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct ClientError(#[from] reqwest::Error);

impl ApiClient {
    /// A client with this per-request timeout, keeping up to `pool` idle connections (one
    /// per concurrent command), trusting `extra_roots` (PEM, `agentassist.ca_file`) besides
    /// the system's roots.
    ///
    /// Certificates are always verified, names included; a call whose certificate does not
    /// verify fails with the reason (docs/contract.md §13). `HTTPS_PROXY`, `HTTP_PROXY` and
    /// `NO_PROXY` from the environment are honoured: an `https://` API is reached through a
    /// CONNECT tunnel, so the proxy sees neither the token nor the body.
    pub fn new(
        timeout: Duration,
        pool: usize,
        extra_roots: Option<&[u8]>,
    ) -> Result<Self, ClientError> {
        let roots = match extra_roots {
            Some(pem) => reqwest::Certificate::from_pem_bundle(pem)?,
            None => Vec::new(),
        };
        let http = reqwest::Client::builder()
            .tls_certs_merge(roots)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(pool)
            // A redirect would carry the token to another host; the API documents none.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("transfer-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http })
    }

    /// One call. The request timeout bounds it from connect to the last byte.
    pub async fn assign(
        &self,
        bot: &Bot,
        token: &Token,
        body: Bytes,
    ) -> Result<ApiResponse, ApiError> {
        let mut request = self
            .http
            .post(bot.assign_url.clone())
            .header("auth", token.expose())
            .header("accountid", &bot.account_id)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        // The command's trace (docs/contract.md §11); the API's own spans, if any, continue it.
        if let Some((parent, state)) =
            trace_context::with_current(|t| (t.traceparent().to_owned(), t.state.clone()))
        {
            request = request.header(trace_context::TRACEPARENT, parent);
            if let Some(state) = state {
                request = request.header(trace_context::TRACESTATE, state);
            }
        }
        let mut response = request.body(body).send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // Read no more than the cap, however much the server sends: a response is kept in the
        // event and the outcome cache, and an endless one must not exhaust memory.
        let mut bytes = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
            let room = MAX_RESPONSE_BODY.saturating_sub(bytes.len());
            if chunk.len() > room {
                bytes.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            bytes.extend_from_slice(&chunk);
        }
        classify(status, retry_after.as_deref(), &bytes, truncated)
    }
    /// A request that cannot transfer anything, to learn whether the API answers at all (the
    /// circuit breaker's probe): `bot`'s assign-conversation route, signed and with its
    /// `accountid` as every call, and the body `{}` (no target, no session), which an API
    /// that is up refuses with 400. Only whether and how it answers matters, so the body is
    /// not read. Bounded by the request timeout like every call.
    pub async fn probe(&self, bot: &Bot, token: &Token) -> Result<ApiResponse, ApiError> {
        let response = self
            .http
            .post(bot.assign_url.clone())
            .header("auth", token.expose())
            .header("accountid", &bot.account_id)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body("{}")
            .send()
            .await
            .map_err(transport_error)?;
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        classify(
            response.status().as_u16(),
            retry_after.as_deref(),
            &[],
            false,
        )
    }
}

/// What an answer means: a 2xx is a success carrying its body; anything else an error
/// carrying its status, `Retry-After` and (cut) body. `truncated` says the body was cut at
/// [`MAX_RESPONSE_BODY`]. Total: any status, header and body gives an answer.
pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    truncated: bool,
) -> Result<ApiResponse, ApiError> {
    if (200..300).contains(&status) {
        return Ok(ApiResponse {
            status,
            body: json::raw_or_string(body, !truncated),
            truncated,
        });
    }
    let cut = &body[..body.len().min(MAX_ERROR_BODY)];
    Err(ApiError {
        kind: ErrorKind::HttpStatus,
        status: Some(status),
        message: format!("AgentAssist answered HTTP {status}"),
        body: (!body.is_empty()).then(|| json::value_or_string(cut)),
        retry_after: retry_after.and_then(parse_retry_after),
        unsent: false,
    })
}

fn transport_error(e: reqwest::Error) -> ApiError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if untrusted(&e) {
        ErrorKind::Certificate
    } else if e.is_connect() || e.is_request() || e.is_body() || e.is_decode() {
        ErrorKind::Connection
    } else {
        ErrorKind::Request
    };
    // The full chain says why (refused, reset, DNS); the top level alone rarely does.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    ApiError {
        kind,
        status: None,
        message,
        body: None,
        retry_after: None,
        unsent: e.is_connect(),
    }
}

/// Whether the TLS handshake failed on the server's certificate, somewhere in the chain. The
/// TLS error travels inside I/O errors, possibly nested, whose `source` skips it.
fn untrusted(e: &reqwest::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(error) = next {
        if matches!(
            error.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidCertificate(_))
        ) {
            return true;
        }
        next = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    false
}

/// `Retry-After` is either delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// How a call ended, as the account's last gate counts it: an answer of any status says the
/// API saw it; a connection (or TLS handshake) that could not be made sent nothing; anything
/// else (a failure or a timeout with no answer) counts until its bound.
pub fn how_ended(result: &Result<ApiResponse, ApiError>) -> Ended {
    match result {
        Ok(_) => Ended::Answered,
        Err(e) if e.status.is_some() => Ended::Answered,
        Err(e) if e.unsent => Ended::Unsent,
        Err(_) => Ended::Unanswered,
    }
}
#[cfg(test)]
mod tests;
