//! Several replicas as one worker (docs/contract.md §9): the state they share through Redis.
//!
//! - *Pacing*: one sliding log per account ([`Fleet::reserve`], `lua/reserve.lua`), timed by
//!   Redis's clock, and a shared pause after a 429 ([`Fleet::pause`]); the last gate before a
//!   call leaves, the account's arrivals ([`gate`]), keeps the limit at the vendor's clock.
//! - *Once-only*: before calling the API a replica claims the command for a lease
//!   ([`Fleet::claim`], renewed by [`Fleet::keep_claim`] while it runs); the terminal event is
//!   recorded for the fleet ([`Fleet::record`]). A command completed anywhere is answered from
//!   the record; one claimed by a live replica is waited for; only a call that was on the wire
//!   when its replica died may go out again, after the lease ([`Claim::TakenOver`], counted).
//! - *Fail closed*: every Redis call has a timeout. While Redis does not answer, no API call
//!   starts (the callers wait, see [`Fleet::until_answered`]), readiness is 503
//!   ([`Fleet::is_healthy`]), and nothing is acked or lost.
//!
//! - *Work sharing*: replicas heartbeat into Redis ([`membership`]); from the live members
//!   each computes the same owner for every partition queue ([`ownership`]).
//! - *One holder at a time*: a replica registers a consumer on a partition, or on the commands
//!   queue as intake, only while it holds that queue ([`holds`]).
//!
//! Every key starts with the fleet's name (its `amqp.commands_queue`) and a colon. Per command
//! in the steady state: four round trips (the claim with the first start, the gate, the
//! answer's time, the record). This
//! file holds the client,
//! its timeouts, health and waiting; [`claims`] the once-only, [`pacing`] the shared budget.

pub mod claims;
pub mod gate;
pub mod holds;
pub mod membership;
pub mod ownership;
pub mod pacing;
mod scripts;
mod stored;

pub use claims::Claim;
pub use pacing::{Booked, Booking, Reservation, StartRequest};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::config::FleetSettings;
use crate::ops::metrics::Metrics;
use crate::shutdown::Shutdown;

/// What went wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// `fleet.redis_url` cannot be used.
    #[error("fleet.redis_url is not usable: {0}")]
    Url(redis::RedisError),
    /// `fleet.redis_ca_file` cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::config::ConfigError),
    /// Redis refused or failed the call: unreachable, its certificate did not verify, or the
    /// command failed.
    #[error("Redis {op} at {at} failed: {source}")]
    Redis {
        /// The fleet operation.
        op: &'static str,
        /// The server, as `scheme://host:port`.
        at: Arc<str>,
        /// The client's error.
        source: redis::RedisError,
    },
    /// No answer within `fleet.redis_timeout`.
    #[error("Redis {op} at {at} timed out")]
    Timeout {
        /// The fleet operation.
        op: &'static str,
        /// The server, as `scheme://host:port`.
        at: Arc<str>,
    },
    /// Another live process has this replica's `fleet.name`: two replicas must not share one.
    #[error(
        "fleet.name {name:?} is in use by another live replica ({holder}); each replica needs a \
         name of its own (leave fleet.name empty for the host name and process id)"
    )]
    NameInUse {
        /// This replica's `fleet.name`.
        name: String,
        /// The other process, as `name/instance`.
        holder: String,
    },
    /// Redis answered something the scripts never return.
    #[error("Redis {op} answered unexpectedly: {what}")]
    Unexpected {
        /// The fleet operation.
        op: &'static str,
        /// What came back.
        what: String,
    },
}

/// The shared state of one fleet, as one replica sees it.
pub struct Fleet {
    redis: ConnectionManager,
    /// The server, for errors.
    endpoint: Arc<str>,
    prefix: String,
    /// This replica's name (`fleet.name`, or the host name and process id): one live process
    /// at a time has it ([`membership`]).
    name: String,
    /// This replica, as a claimant: its name and a per-process id, so a restarted replica
    /// with the same name (a container's pid is often 1) is not taken for its predecessor.
    /// What it claims, holds and lists in the membership carries this id, never the name alone.
    claimant: String,
    lease: Duration,
    timeout: Duration,
    outcome_ttl: Duration,
    partitions: u16,
    heartbeat: Duration,
    member_ttl: Duration,
    healthy: AtomicBool,
    metrics: Arc<Metrics>,
    holds: holds::HoldState,
    /// The other process found with this replica's name while it ran, if one was: it stepped
    /// down ([`Fleet::keep_membership`]).
    displaced_by: std::sync::OnceLock<String>,
    /// The fleet's epoch as this replica last saw it (`lua/heartbeat.lua`); empty before its
    /// first heartbeat.
    epoch: std::sync::Mutex<String>,
    /// Every live member admits at the intake ([`Fleet::everyone_admits`]); false until the
    /// first heartbeat says so.
    everyone_admits: AtomicBool,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("prefix", &self.prefix)
            .field("claimant", &self.claimant)
            .field("healthy", &self.is_healthy())
            .finish_non_exhaustive()
    }
}

/// Waits while Redis does not answer: from a tenth of a second up to two.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The client for `fleet.redis_url`. For `rediss://`, the server's certificate is verified
/// (against `fleet.redis_ca_file` when set, else the system's roots) and its name against the
/// URL's host; a failure is an error naming the server, never plain text instead.
fn client(settings: &FleetSettings) -> Result<redis::Client, FleetError> {
    let url = settings.redis_url.as_str();
    match crate::config::tls::certificates("fleet.redis_ca_file", &settings.redis_ca_file)? {
        Some(ca) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca),
            },
        ),
        None => redis::Client::open(url),
    }
    .map_err(FleetError::Url)
}

/// How the server is named in errors: scheme, host and port, never the credentials.
fn endpoint(client: &redis::Client) -> Arc<str> {
    use redis::ConnectionAddr;
    match client.get_connection_info().addr() {
        ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}"),
        ConnectionAddr::Unix(path) => format!("unix://{}", path.display()),
        other => other.to_string(),
    }
    .into()
}

impl Fleet {
    /// The fleet named `name` (the commands queue). Connects lazily: a replica starts, unready,
    /// while Redis is down, and becomes ready when it answers.
    pub fn new(
        settings: &FleetSettings,
        name: &str,
        outcome_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, FleetError> {
        let client = client(settings)?;
        let endpoint = endpoint(&client);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.redis_timeout))
            .set_response_timeout(Some(settings.redis_timeout))
            .set_max_delay(RETRY_MAX)
            .set_number_of_retries(2);
        let redis =
            ConnectionManager::new_lazy_with_config(client, config).map_err(FleetError::Url)?;
        let replica = match settings.name.trim() {
            "" => default_name(),
            name => name.to_owned(),
        };
        Ok(Self {
            redis,
            endpoint,
            prefix: format!("{name}:"),
            claimant: format!("{replica}/{}", uuid::Uuid::new_v4().simple()),
            name: replica,
            lease: settings.lease,
            timeout: settings.redis_timeout,
            outcome_ttl,
            partitions: settings.partitions,
            heartbeat: settings.heartbeat,
            member_ttl: settings.member_ttl,
            healthy: AtomicBool::new(false),
            metrics,
            holds: holds::HoldState::default(),
            displaced_by: std::sync::OnceLock::new(),
            epoch: std::sync::Mutex::default(),
            everyone_admits: AtomicBool::new(false),
        })
    }

    /// Whether Redis answered the last call: what readiness reports.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// This replica as a claimant.
    pub fn claimant(&self) -> &str {
        &self.claimant
    }

    /// This replica's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn key(&self, kind: &str, id: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + kind.len() + 1 + id.len());
        key.push_str(&self.prefix);
        key.push_str(kind);
        key.push(':');
        key.push_str(id);
        key
    }

    /// `fleet.redis_timeout`: how long any Redis call may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one script invocation under the timeout, counting it.
    pub(crate) async fn invoke<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, FleetError> {
        let mut redis = self.redis.clone();
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, invocation.invoke_async(&mut redis)).await;
        let result = match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(FleetError::Redis {
                op,
                at: self.endpoint.clone(),
                source,
            }),
            Err(_) => Err(FleetError::Timeout {
                op,
                at: self.endpoint.clone(),
            }),
        };
        self.observe(op, started, result.is_err());
        result
    }

    fn observe(&self, op: &'static str, started: Instant, failed: bool) {
        self.metrics
            .redis_call(op, started.elapsed().as_secs_f64(), failed);
        let was = self.healthy.swap(!failed, Ordering::AcqRel);
        if was && failed {
            tracing::warn!(
                op,
                "Redis does not answer; no API call starts until it does"
            );
        } else if !was && !failed {
            tracing::info!(op, "Redis answers");
        }
    }

    /// Checks that Redis answers, so readiness recovers without traffic.
    pub async fn ping(&self) -> Result<(), FleetError> {
        let mut redis = self.redis.clone();
        let started = Instant::now();
        let result = tokio::time::timeout(
            self.timeout,
            redis::cmd("PING").query_async::<String>(&mut redis),
        )
        .await;
        let result = match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(FleetError::Redis {
                op: "ping",
                at: self.endpoint.clone(),
                source,
            }),
            Err(_) => Err(FleetError::Timeout {
                op: "ping",
                at: self.endpoint.clone(),
            }),
        };
        self.observe("ping", started, result.is_err());
        result
    }

    /// Pings every second until `stop`: readiness follows Redis even when no command runs.
    pub async fn watch_health(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let _ = self.ping().await;
        }
    }

    /// Repeats `op` until Redis answers it, waiting longer each time (up to 2 s), or until
    /// the shutdown abandons it: while Redis is away, nothing that needs it goes ahead.
    pub async fn until_answered<T, F, Fut>(&self, shutdown: &Shutdown, mut op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, FleetError>>,
    {
        let mut waits = backoff::delays(RETRY_MIN, RETRY_MAX, None);
        loop {
            if shutdown.is_abandoned() {
                return None;
            }
            let wait = waits.next().unwrap_or(RETRY_MAX);
            match op().await {
                Ok(value) => return Some(value),
                Err(e) => tracing::debug!(error = %e, ?wait, "Redis call failed; waiting"),
            }
            shutdown.sleep(wait).await.ok()?;
        }
    }
}

fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".to_owned());
    format!("{host}-{}", std::process::id())
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;

impl crate::ops::admin::Readiness for Fleet {
    fn ready(&self) -> Result<(), &'static str> {
        if self.is_healthy() {
            Ok(())
        } else {
            Err("the fleet's Redis does not answer")
        }
    }
}
