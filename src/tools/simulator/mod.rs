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
//! - [`Simulator::start_outage`] and [`Simulator::end_outage`] make the API fail as a whole,
//!   for tests of the worker's circuit breaker.
//! - [`serve_until`] is the same server for the `simulate` command line.
//!
//! Routes: `POST /agentassist/api/v1/public/{streamId}/assign-conversation`,
//! `GET /simulator/stats` (the [`SimulatorStats`] as JSON, for a benchmark in another process),
//! `GET /simulator/arrivals` (when each recorded request arrived, in ms since the first, by
//! `accountid` header: `{"acme": [0, 2, 1000, …]}`, so a benchmark can check pacing) and
//! `GET /healthz`.

mod callback;
mod check;
mod config;
mod routes;
mod state;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
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
use axum_server::tls_rustls::RustlsConfig;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use check::Checker;
use config::validate;
pub use config::{Edge, Reply, SimBot, SimTls, SimulatorConfig, bots_from_settings};
use routes::{assign_conversation, stats_route};
use state::{Counters, Log, Shared};

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
    /// The W3C `traceparent` header, if present and readable.
    pub traceparent: Option<String>,
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
    /// The certificate or key of `tls` cannot be served.
    #[error("cannot serve HTTPS with the given certificate and key")]
    Tls(#[source] std::io::Error),
    /// The server stopped with an I/O error.
    #[error("simulator server failed")]
    Server(#[source] std::io::Error),
    /// The server task panicked or was cancelled.
    #[error("simulator server task ended abnormally")]
    ServerTask(#[source] tokio::task::JoinError),
}

/// Serves `app` over TLS on `listener` until `stop`, then drains like the plain server.
async fn serve_tls(
    listener: TcpListener,
    app: Router,
    tls: SimTls,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, SimulatorError> {
    let config = RustlsConfig::from_pem(tls.cert_pem, tls.key_pem)
        .await
        .map_err(SimulatorError::Tls)?;
    let listener = listener.into_std().map_err(SimulatorError::Server)?;
    let server = axum_server::from_tcp_rustls(listener, config).map_err(SimulatorError::Server)?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        stopped(&mut stop).await;
        stopper.graceful_shutdown(Some(SERVER_DRAIN));
    });
    Ok(tokio::spawn(
        server.handle(handle).serve(app.into_make_service()),
    ))
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
            outage: std::sync::atomic::AtomicU16::new(0),
            latency_of: Mutex::new(HashMap::new()),
        });

        let app = Router::new()
            .route(ASSIGN_ROUTE, post(assign_conversation))
            .route("/simulator/stats", get(stats_route))
            .route("/simulator/arrivals", get(routes::arrivals_route))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(Arc::clone(&shared));
        let server = match shared.config.tls.clone() {
            None => {
                let mut server_stop = stop_rx;
                tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stopped(&mut server_stop).await })
                        .await
                })
            }
            Some(tls) => serve_tls(listener, app, tls, stop_rx).await?,
        };

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

    /// `http://{addr}`, or `https://localhost:{port}` when serving HTTPS (certificates name
    /// hosts): what a client's AgentAssist base URL should be set to.
    pub fn base_url(&self) -> String {
        if self.shared.config.tls.is_some() {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// Queues exact replies: each valid request takes the next one, in order, before the
    /// rates are consulted. Invalid requests are answered by the checks and take none.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.shared.script).extend(replies);
    }

    /// Starts an outage: until [`end_outage`](Simulator::end_outage), every request to the API
    /// route, valid or not, is recorded and answered `status` at once (a 5xx, as a gateway in
    /// front of a failed API would), and nothing is transferred. Scripted replies wait.
    pub fn start_outage(&self, status: u16) {
        self.shared.outage.store(status, Ordering::Relaxed);
    }

    /// Calls for `stream_id` take `latency` from now on, instead of the configured one: one
    /// slow bot (account) beside fast ones.
    pub fn set_latency(&self, stream_id: &str, latency: Duration) {
        lock(&self.shared.latency_of).insert(stream_id.to_owned(), latency);
    }

    /// Ends the outage: requests are checked and answered as before.
    pub fn end_outage(&self) {
        self.shared.outage.store(0, Ordering::Relaxed);
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
