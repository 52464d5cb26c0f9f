//! A stand-in for Kore.ai AgentAssist's `assign-conversation` API, served in-process.
//!
//! It checks requests as strictly as the real API is documented (the vendor's
//! "Transfer Conversation To a Specific Agent or Queue" page), answers with the vendor's sample shapes, can be told to fail,
//! rate-limit, reject or hang (by rates, or by a script of exact replies for tests), and posts
//! callbacks to the `callbackUrl` of accepted transfers.
//!
//! - [`Simulator`] is the handle tests use: start on port 0, script replies, inspect
//!   [`requests`](Simulator::requests) (each recorded when it arrives and again when it is
//!   answered), [`in_flight`](Simulator::in_flight) and [`stats`](Simulator::stats), then shut
//!   down.
//! - [`serve_until`] is the same server for the `simulate` command line.
//!
//! Routes: `POST /agentassist/api/v1/public/{streamId}/assign-conversation`,
//! `GET /simulator/stats` (the [`SimulatorStats`] as JSON, for a benchmark in another process)
//! and `GET /healthz`.

mod callback;
mod check;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use callback::Callback;
use check::{Checker, Rejection, Target, Transfer};

/// The route of the one API call simulated, as axum spells it.
const ASSIGN_ROUTE: &str = "/agentassist/api/v1/public/{stream_id}/assign-conversation";
/// Older requests are forgotten past this many, so a long benchmark run stays bounded.
const MAX_RECORDED: usize = 100_000;
/// Far more than any valid request; the cap only guards memory.
const MAX_BODY: usize = 1024 * 1024;
/// A client that stalls mid-body must not hold a connection forever.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// "Never" for a test: longer than any client timeout worth testing.
const HANG_FOR: Duration = Duration::from_secs(3600);
/// How long shutdown waits for open connections before cutting them.
const SERVER_DRAIN: Duration = Duration::from_secs(10);
/// One last callback attempt may take a full attempt timeout; a little slack on top.
const CALLBACK_DRAIN: Duration = Duration::from_secs(15);

/// A bot the simulator knows: which stream id it answers for and the credentials it checks.
#[derive(Clone, Debug)]
pub struct SimBot {
    /// The `{streamId}` in the URL (`st-…`).
    pub stream_id: String,
    /// The value the `accountid` header must carry.
    pub account_id: String,
    /// The JWT app's client id, expected in the token's `appId` claim.
    pub client_id: String,
    /// The HS256 key tokens must be signed with; `Debug` shows it redacted.
    pub client_secret: secrecy::SecretString,
}

/// How the simulator behaves. Rates are fractions in `0.0..=1.0` of valid requests; the three
/// error rates are drawn from one roll, so they must not add up to more than 1.
#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    /// Where to listen; port 0 picks a free port (see [`Simulator::addr`]).
    pub listen: SocketAddr,
    /// The bots requests may address; any other stream id is a 404.
    pub bots: Vec<SimBot>,
    /// Added before answering every API call, to exercise client timeouts and concurrency.
    pub latency: Duration,
    /// Fraction of valid requests answered 503 (transient).
    pub fail_rate: f64,
    /// Fraction of valid requests answered 429 with `Retry-After`.
    pub rate_limited_rate: f64,
    /// `Retry-After` of drawn 429s, sent in whole seconds rounded up.
    pub retry_after: Duration,
    /// Fraction of valid requests answered 400 (permanent).
    pub reject_rate: f64,
    /// Post a callback for every accepted transfer that named a `callbackUrl`.
    pub callbacks: bool,
    /// How long after accepting a transfer its callback is posted.
    pub callback_delay: Duration,
    /// Fraction of accepted transfers whose callback reports the transfer as failed.
    pub callback_fail_rate: f64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8089)),
            bots: Vec::new(),
            latency: Duration::ZERO,
            fail_rate: 0.0,
            rate_limited_rate: 0.0,
            retry_after: Duration::from_secs(1),
            reject_rate: 0.0,
            callbacks: true,
            callback_delay: Duration::from_millis(200),
            callback_fail_rate: 0.0,
        }
    }
}

/// A scripted answer for the next valid request, taking precedence over the rates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Accept the transfer (200 with the vendor's sample body, callback if configured).
    Accept,
    /// Answer this status with an errors body. A 2xx instead counts as an acceptance, with
    /// the success body, because a success carrying an errors body would test nothing real.
    Status(u16),
    /// 429 with `Retry-After` set to this, in whole seconds rounded up.
    RateLimited {
        /// The wait the client is asked to honour.
        retry_after: Duration,
    },
    /// Never answer (for an hour, or until shutdown): for testing client timeouts.
    Hang,
    /// Answer exactly this, unchecked: any status, header values and body, as a misbehaving
    /// server might (a `Retry-After` at the end of time, a body of megabytes). No callback.
    Raw {
        /// The status; one that is not a valid HTTP status is answered as 500.
        status: u16,
        /// Headers, as name and value; pairs that are not valid HTTP are skipped.
        headers: Vec<(String, String)>,
        /// The body.
        body: Vec<u8>,
    },
}

/// One request that reached the assign-conversation route, valid or not. It is recorded when
/// it arrives and completed when it is answered, so a request cut off mid-latency is seen too.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Arrival number, from 0: the order in which requests reached the route.
    pub seq: u64,
    /// The `{streamId}` from the URL.
    pub stream_id: String,
    /// The `accountid` header, if present and readable.
    pub account_id: Option<String>,
    /// The body as JSON; `Null` when it was not JSON.
    pub body: serde_json::Value,
    /// The `auth` header (the JWT), if present and readable.
    pub auth: Option<String>,
    /// The status answered; 0 while unanswered, and for a [`Reply::Hang`], which never answers.
    pub status: u16,
    /// When the request arrived.
    pub received_at: Instant,
    /// When its answer was decided; `None` while in flight, and for a hang.
    pub answered_at: Option<Instant>,
    /// The body's `botSessionId` when it is a string, so tests can find their request.
    pub bot_session_id: Option<String>,
}

/// Counters since start. Also served as JSON (camelCase) by `GET /simulator/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulatorStats {
    /// Every request that reached the assign-conversation route, counted when it arrives.
    pub calls: u64,
    /// Those answered 2xx.
    pub accepted: u64,
    /// Answers by status code; hung requests are not in it, having no status.
    pub by_status: BTreeMap<u16, u64>,
    /// Callbacks the receiver answered with a 2xx.
    pub callbacks_delivered: u64,
    /// Callback attempts that failed (connection error, timeout or non-2xx), retried or not.
    pub callbacks_failed_attempts: u64,
}

/// What can go wrong starting or running the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    /// The listen address could not be bound (in use, not local, no permission).
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot work (a rate out of range, a bot configured twice).
    #[error("invalid simulator configuration: {0}")]
    Config(String),
    /// The HTTP client for callbacks could not be built.
    #[error("cannot build the callback HTTP client")]
    HttpClient(#[source] reqwest::Error),
    /// The server stopped with an I/O error.
    #[error("simulator server failed")]
    Server(#[source] std::io::Error),
    /// The server task panicked or was cancelled.
    #[error("simulator server task ended abnormally")]
    ServerTask(#[source] tokio::task::JoinError),
}

/// A running simulator. Dropping it also stops the server, but only
/// [`shutdown`](Simulator::shutdown) waits for it and its callbacks to finish.
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    // Every task holds a receiver: sending `true`, or dropping this, tells them to stop.
    stop: watch::Sender<bool>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Simulator {
    /// Binds `config.listen` and starts serving on a spawned task.
    ///
    /// # Errors
    /// [`SimulatorError::Config`] for rates out of range or a bot configured twice,
    /// [`SimulatorError::Bind`] when the address cannot be listened on.
    pub async fn start(config: SimulatorConfig) -> Result<Simulator, SimulatorError> {
        validate(&config)?;
        let checker = Checker::new(&config.bots).map_err(SimulatorError::Config)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(callback::ATTEMPT_TIMEOUT)
            .build()
            .map_err(SimulatorError::HttpClient)?;

        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| SimulatorError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| SimulatorError::Bind {
                addr: config.listen,
                source,
            })?;

        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            checker,
            script: Mutex::new(VecDeque::new()),
            requests: Mutex::new(Log::default()),
            counters: Counters::default(),
            http,
            inflight: Mutex::new(JoinSet::new()),
            callbacks: Mutex::new(JoinSet::new()),
            stop: stop_rx.clone(),
        });

        let app = Router::new()
            .route(ASSIGN_ROUTE, post(assign_conversation))
            .route("/simulator/stats", get(stats_route))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(Arc::clone(&shared));
        let mut server_stop = stop_rx;
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped(&mut server_stop).await })
                .await
        });

        tracing::info!(%addr, bots = shared.config.bots.len(), "AgentAssist simulator listening");
        Ok(Simulator {
            addr,
            shared,
            stop,
            server: Some(server),
        })
    }

    /// The address actually bound (the real port when `listen` had port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}`: what a client's AgentAssist base URL should be set to.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues exact replies: each valid request takes the next one, in order, before the
    /// rates are consulted. Invalid requests are answered by the checks and take none.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.shared.script).extend(replies);
    }

    /// Requests that reached the API route, oldest first (the last 100 000 at most), answered
    /// or not yet.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests)
            .entries
            .iter()
            .cloned()
            .collect()
    }

    /// Requests that arrived and are not answered yet (a hang counts until it is released).
    pub fn in_flight(&self) -> usize {
        lock(&self.shared.requests).in_flight
    }

    /// The most requests ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        lock(&self.shared.requests).max_in_flight
    }

    /// The counters so far.
    pub fn stats(&self) -> SimulatorStats {
        self.shared.stats()
    }

    /// Stops accepting connections, lets open requests end (hung ones are released), sends
    /// callbacks still waiting out their delay, abandons those already retrying, and waits
    /// for all of it (bounded: stragglers are aborted).
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(SERVER_DRAIN, &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => tracing::warn!(%error, "simulator server failed"),
                Ok(Err(error)) => tracing::warn!(%error, "simulator server task failed"),
                Err(_) => {
                    tracing::warn!("simulator connections still open after the grace period");
                    server.abort();
                }
            }
        }
        // Requests first: an accepted one may still spawn its callback.
        drain(&self.shared.inflight, SERVER_DRAIN).await;
        drain(&self.shared.callbacks, CALLBACK_DRAIN).await;
        tracing::info!(addr = %self.addr, "AgentAssist simulator stopped");
    }
}

/// Runs a simulator until `shutdown` completes, then stops it gracefully; for the command line.
///
/// # Errors
/// Those of [`Simulator::start`], or [`SimulatorError::Server`] /
/// [`SimulatorError::ServerTask`] when the server stops on its own.
pub async fn serve_until(
    config: SimulatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SimulatorError> {
    let mut simulator = Simulator::start(config).await?;
    let Some(mut server) = simulator.server.take() else {
        return Ok(());
    };
    let ended = tokio::select! {
        () = shutdown => None,
        result = &mut server => Some(result),
    };
    match ended {
        None => {
            simulator.server = Some(server);
            simulator.shutdown().await;
            Ok(())
        }
        Some(result) => {
            simulator.shutdown().await;
            match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(SimulatorError::Server(error)),
                Err(error) => Err(SimulatorError::ServerTask(error)),
            }
        }
    }
}

fn validate(config: &SimulatorConfig) -> Result<(), SimulatorError> {
    let rates = [
        ("fail_rate", config.fail_rate),
        ("rate_limited_rate", config.rate_limited_rate),
        ("reject_rate", config.reject_rate),
        ("callback_fail_rate", config.callback_fail_rate),
    ];
    for (name, rate) in rates {
        if !(0.0..=1.0).contains(&rate) {
            return Err(SimulatorError::Config(format!(
                "{name} must be between 0 and 1, not {rate}"
            )));
        }
    }
    let errors = config.fail_rate + config.rate_limited_rate + config.reject_rate;
    // A little tolerance, so 0.7 + 0.2 + 0.1 is not refused for rounding.
    if errors > 1.0 + 1e-9 {
        return Err(SimulatorError::Config(format!(
            "fail_rate + rate_limited_rate + reject_rate must not exceed 1, not {errors}"
        )));
    }
    Ok(())
}

/// State every handler and task sees.
struct Shared {
    config: SimulatorConfig,
    checker: Checker,
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Log>,
    counters: Counters,
    /// One client for all callbacks, so connections to a relay are reused.
    http: reqwest::Client,
    /// Valid requests are answered from their own task, so a client that gives up (times
    /// out) does not cancel the transfer: as with the real API, it may still be carried out.
    inflight: Mutex<JoinSet<()>>,
    callbacks: Mutex<JoinSet<()>>,
    stop: watch::Receiver<bool>,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    accepted: AtomicU64,
    // Updated together with `calls` and `accepted` under this lock, so a snapshot adds up.
    by_status: Mutex<BTreeMap<u16, u64>>,
    callbacks_delivered: AtomicU64,
    callbacks_failed_attempts: AtomicU64,
}

/// The request log, with the count of requests in flight kept beside it.
#[derive(Default)]
struct Log {
    entries: VecDeque<RecordedRequest>,
    next_seq: u64,
    in_flight: usize,
    max_in_flight: usize,
}

impl Log {
    fn get_mut(&mut self, seq: u64) -> Option<&mut RecordedRequest> {
        let first = self.entries.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.entries.get_mut(index)
    }
}

impl Shared {
    /// Records a request as it arrives; returns its arrival number.
    fn arrive(&self, mut request: RecordedRequest) -> u64 {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let mut log = lock(&self.requests);
        let seq = log.next_seq;
        log.next_seq += 1;
        request.seq = seq;
        if log.entries.len() >= MAX_RECORDED {
            log.entries.pop_front();
        }
        log.entries.push_back(request);
        log.in_flight += 1;
        log.max_in_flight = log.max_in_flight.max(log.in_flight);
        seq
    }

    /// Records the answer to request `seq`: its status, and when.
    fn answered(&self, seq: u64, status: u16) {
        {
            let mut by_status = lock(&self.counters.by_status);
            if (200..300).contains(&status) {
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            *by_status.entry(status).or_default() += 1;
        }
        let mut log = lock(&self.requests);
        if let Some(entry) = log.get_mut(seq) {
            entry.status = status;
            entry.answered_at = Some(Instant::now());
        }
        log.in_flight = log.in_flight.saturating_sub(1);
    }

    /// A hung request released without an answer.
    fn released(&self) {
        let mut log = lock(&self.requests);
        log.in_flight = log.in_flight.saturating_sub(1);
    }

    fn stats(&self) -> SimulatorStats {
        let by_status = lock(&self.counters.by_status);
        SimulatorStats {
            calls: self.counters.calls.load(Ordering::Relaxed),
            accepted: self.counters.accepted.load(Ordering::Relaxed),
            by_status: by_status.clone(),
            callbacks_delivered: self.counters.callbacks_delivered.load(Ordering::Relaxed),
            callbacks_failed_attempts: self
                .counters
                .callbacks_failed_attempts
                .load(Ordering::Relaxed),
        }
    }

    /// The scripted reply if any, else one roll against the rates.
    fn next_reply(&self) -> Reply {
        if let Some(reply) = lock(&self.script).pop_front() {
            return reply;
        }
        let config = &self.config;
        let roll = fastrand::f64();
        if roll < config.fail_rate {
            Reply::Status(503)
        } else if roll < config.fail_rate + config.rate_limited_rate {
            Reply::RateLimited {
                retry_after: config.retry_after,
            }
        } else if roll < config.fail_rate + config.rate_limited_rate + config.reject_rate {
            Reply::Status(400)
        } else {
            Reply::Accept
        }
    }
}

async fn stats_route(State(shared): State<Arc<Shared>>) -> Json<SimulatorStats> {
    Json(shared.stats())
}

async fn assign_conversation(
    State(shared): State<Arc<Shared>>,
    Path(stream_id): Path<String>,
    request: Request,
) -> Response {
    let received_at = Instant::now();
    let (parts, body) = request.into_parts();
    let mut recorded = RecordedRequest {
        seq: 0,
        auth: parts
            .headers
            .get("auth")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        answered_at: None,
        account_id: parts
            .headers
            .get("accountid")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        stream_id,
        body: Value::Null,
        status: 0,
        received_at,
        bot_session_id: None,
    };

    let bytes = match read_body(body).await {
        Ok(bytes) => bytes,
        Err(rejection) => {
            let seq = shared.arrive(recorded);
            return reject(&shared, seq, rejection).await;
        }
    };
    recorded.body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    recorded.bot_session_id = recorded
        .body
        .get("botSessionId")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let checked = shared
        .checker
        .check(&recorded.stream_id, &parts.headers, &recorded.body);
    let seq = shared.arrive(recorded);
    let transfer = match checked {
        Ok(transfer) => transfer,
        Err(rejection) => return reject(&shared, seq, rejection).await,
    };

    let (answer_tx, answer_rx) = oneshot::channel();
    let task_shared = Arc::clone(&shared);
    spawn_tracked(&shared.inflight, async move {
        if let Some(response) = answer(task_shared, transfer, seq).await {
            // The client may have gone; the transfer stands regardless.
            let _ = answer_tx.send(response);
        }
    });
    // No timeout here on purpose: the task is bounded by `latency`, or hangs by design.
    answer_rx
        .await
        .unwrap_or_else(|_| error_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))
}

async fn read_body(body: Body) -> Result<Vec<u8>, Rejection> {
    let read = async {
        let mut stream = body.into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| {
                Rejection::new(StatusCode::BAD_REQUEST, "could not read the request body")
            })?;
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(Rejection::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body over 1 MiB",
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                "timed out reading the request body",
            ))
        })
}

/// Answers an invalid request (already recorded as arrived) after the configured latency.
async fn reject(shared: &Shared, seq: u64, rejection: Rejection) -> Response {
    tracing::debug!(
        status = rejection.status.as_u16(),
        reason = %rejection.msg,
        "request refused"
    );
    let mut stop = shared.stop.clone();
    tokio::select! {
        () = tokio::time::sleep(shared.config.latency) => {}
        () = stopped(&mut stop) => {}
    }
    shared.answered(seq, rejection.status.as_u16());
    error_response(rejection.status, &rejection.msg)
}

/// Decides and records the answer to a valid request; `None` for a hang.
async fn answer(shared: Arc<Shared>, transfer: Transfer, seq: u64) -> Option<Response> {
    let mut stop = shared.stop.clone();
    let interrupted = tokio::select! {
        () = tokio::time::sleep(shared.config.latency) => false,
        () = stopped(&mut stop) => true,
    };
    if interrupted {
        shared.answered(seq, StatusCode::SERVICE_UNAVAILABLE.as_u16());
        return Some(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down",
        ));
    }

    let response = match shared.next_reply() {
        Reply::Accept => accept(&shared, &transfer, StatusCode::OK),
        Reply::Status(code) => match StatusCode::from_u16(code) {
            Ok(status) if status.is_success() => accept(&shared, &transfer, status),
            Ok(status) if code >= 300 => error_response(status, &message_for(status)),
            // 1xx cannot end an exchange; say so rather than confuse the client.
            _ => error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("simulator: cannot answer scripted status {code}"),
            ),
        },
        Reply::RateLimited { retry_after } => {
            let mut response = error_response(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(whole_seconds(retry_after)),
            );
            response
        }
        Reply::Raw {
            status,
            headers,
            body,
        } => {
            let status = StatusCode::from_u16(status)
                .ok()
                .filter(|s| !s.is_informational())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, body).into_response();
            for (name, value) in headers {
                if let (Ok(name), Ok(value)) = (
                    header::HeaderName::try_from(name),
                    HeaderValue::try_from(value),
                ) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        Reply::Hang => {
            tokio::select! {
                () = tokio::time::sleep(HANG_FOR) => {}
                () = stopped(&mut stop) => {}
            }
            shared.released();
            return None;
        }
    };
    shared.answered(seq, response.status().as_u16());
    Some(response)
}

fn accept(shared: &Arc<Shared>, transfer: &Transfer, status: StatusCode) -> Response {
    let now = epoch_millis();
    let mut body = json!({
        "sessionId": transfer.bot_session_id,
        "status": "transferred",
        "requestCompletedAt": now,
    });
    if let Value::Object(fields) = &mut body {
        match &transfer.target {
            Target::Agent(id) => fields.insert("agentId".into(), id.clone().into()),
            Target::Queue(id) => fields.insert("queueId".into(), id.clone().into()),
        };
    }

    if shared.config.callbacks
        && let Some(url) = &transfer.callback_url
    {
        let failed = fastrand::f64() < shared.config.callback_fail_rate;
        let callback = Callback::new(url.clone(), transfer, failed, now);
        spawn_tracked(
            &shared.callbacks,
            callback::deliver(
                Arc::clone(shared),
                callback,
                shared.config.callback_delay,
                shared.stop.clone(),
            ),
        );
    }
    (status, Json(body)).into_response()
}

fn error_response(status: StatusCode, msg: &str) -> Response {
    let body = json!({ "errors": [{ "msg": msg, "code": status.as_u16() }] });
    (status, Json(body)).into_response()
}

fn message_for(status: StatusCode) -> String {
    match status {
        StatusCode::SERVICE_UNAVAILABLE => "service unavailable".into(),
        StatusCode::TOO_MANY_REQUESTS => "rate limit exceeded".into(),
        StatusCode::BAD_REQUEST => "transfer rejected".into(),
        other => other
            .canonical_reason()
            .map_or_else(|| format!("error {}", other.as_u16()), str::to_lowercase),
    }
}

/// `Retry-After` only carries whole seconds; rounding down would invite an early retry.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

fn epoch_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Completes once stop is signalled, or once the [`Simulator`] is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Spawns onto a set that [`Simulator::shutdown`] drains, reaping finished tasks on the way so
/// the set does not grow over a long run.
fn spawn_tracked<F>(set: &Mutex<JoinSet<()>>, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut set = lock(set);
    while let Some(finished) = set.try_join_next() {
        log_panic(finished);
    }
    set.spawn(task);
}

async fn drain(set: &Mutex<JoinSet<()>>, grace: Duration) {
    let mut tasks = std::mem::take(&mut *lock(set));
    let all_done = async {
        while let Some(finished) = tasks.join_next().await {
            log_panic(finished);
        }
    };
    if tokio::time::timeout(grace, all_done).await.is_err() {
        tracing::warn!(left = tasks.len(), "simulator tasks aborted at shutdown");
        tasks.shutdown().await;
    }
}

fn log_panic(finished: Result<(), tokio::task::JoinError>) {
    if let Err(error) = finished
        && error.is_panic()
    {
        tracing::error!(%error, "simulator task panicked");
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain data; the data is
/// still the best there is, and the simulator must keep answering.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The configured bots, as the simulator checks them: the same credentials the worker signs
/// with, so `simulate` and `run` agree out of the box.
pub fn bots_from_settings(settings: &crate::config::Settings) -> Vec<SimBot> {
    settings
        .bots
        .iter()
        .filter_map(|b| {
            Some(SimBot {
                stream_id: b.stream_id.clone(),
                account_id: b.account_id.clone(),
                client_id: b.client_id.clone(),
                client_secret: b.client_secret.clone()?,
            })
        })
        .collect()
}
