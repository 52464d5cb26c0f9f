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
//! answer's time, the record).
//!
//! - *Redis in production*: the primary is found, and found again after a failover, through
//!   Sentinel or a managed primary endpoint (`link`); with `fleet.redis_min_replicas` the writes
//!   a failover must not lose count once replicas acknowledged them (`calls`).
//!
//! This file holds the client's settings, health and waiting; `calls` runs each call on the
//! primary; [`claims`] the once-only, [`pacing`] the shared budget.

mod calls;
pub mod claims;
pub mod gate;
pub mod holds;
mod link;
pub mod membership;
pub mod ownership;
pub mod pacing;
mod scripts;
mod stored;

pub use claims::Claim;
pub use pacing::{Booked, Booking, Reservation, StartRequest};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
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
    /// `fleet.redis_url` cannot be read.
    #[error("fleet.redis_url is not usable: {0}")]
    Address(String),
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
    /// The node answers as a replica: it is never written to.
    #[error("Redis at {at} is a {role}, not the primary; waiting for the primary")]
    NotPrimary {
        /// The server, as `scheme://host:port`.
        at: Arc<str>,
        /// What the node says it is.
        role: String,
    },
    /// The node runs Redis Cluster.
    #[error(
        "Redis at {at} runs in cluster mode; the fleet needs one primary holding all its keys \
         (one server, a Sentinel set as redis+sentinel://, or a managed service's primary \
         endpoint), not a Redis Cluster"
    )]
    ClusterMode {
        /// The server, as `scheme://host:port`.
        at: Arc<str>,
    },
    /// The primary applied a write, but fewer than `fleet.redis_min_replicas` replicas
    /// acknowledged it in time.
    #[error(
        "Redis {op} at {at}: {acked} of the {wanted} replicas fleet.redis_min_replicas asks \
         for acknowledged the write in time"
    )]
    Unacknowledged {
        /// The fleet operation.
        op: &'static str,
        /// The server, as `scheme://host:port`.
        at: Arc<str>,
        /// Replicas that acknowledged.
        acked: i64,
        /// `fleet.redis_min_replicas`.
        wanted: u16,
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
    /// The way to the primary, followed across failovers.
    link: link::Link,
    /// `fleet.redis_min_replicas`: replicas that acknowledge a claim, a booked start and a
    /// hold before the fleet relies on it.
    min_replicas: u16,
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
    /// The last call failed because replicas did not acknowledge it.
    unacknowledged: AtomicBool,
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
        let address =
            crate::config::redis_url::parse(&settings.redis_url).map_err(FleetError::Address)?;
        let ca = crate::config::tls::certificates("fleet.redis_ca_file", &settings.redis_ca_file)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.redis_timeout))
            .set_response_timeout(Some(settings.redis_timeout))
            .set_max_delay(RETRY_MAX)
            .set_number_of_retries(2);
        let link = link::Link::new(
            &address,
            ca,
            settings.redis_timeout,
            config,
            metrics.clone(),
        )
        .map_err(FleetError::Url)?;
        let replica = match settings.name.trim() {
            "" => default_name(),
            name => name.to_owned(),
        };
        Ok(Self {
            link,
            min_replicas: settings.redis_min_replicas,
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
            unacknowledged: AtomicBool::new(false),
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
        if self.unacknowledged.load(Ordering::Acquire) {
            Err(
                "the fleet's Redis replicas do not acknowledge its writes (fleet.redis_min_replicas)",
            )
        } else if self.is_healthy() {
            Ok(())
        } else {
            Err("the fleet's Redis does not answer")
        }
    }
}
