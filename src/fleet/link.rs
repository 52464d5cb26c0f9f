//! The fleet's way to its Redis primary, followed across failovers.
//!
//! The primary is found when first needed and again whenever it may have moved: a write
//! answered `READONLY` (the node was demoted: a managed endpoint or Sentinel failed it over),
//! and, with Sentinel, a primary that stops answering. Sentinel is asked through the redis
//! crate's own client, which checks with `ROLE` that the node it names is a primary; a plain
//! URL (a managed primary endpoint, one DNS name that moves) is connected to again and checked
//! the same way. A node that calls itself a replica is never written to, and a Redis Cluster
//! node is refused: the fleet's scripts need one primary holding every key.
//!
//! Writes that must outlive a failover (`fleet.redis_min_replicas`) run on a connection of
//! their own, since `WAIT` blocks its connection and only counts that connection's writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, ErrorKind, ServerErrorKind, TlsMode};

use super::FleetError;
use crate::config::redis_url::{Address, SentinelSet};

/// Connections for acknowledged writes kept for the next ones.
const SPARE: usize = 32;

/// The primary as last found.
#[derive(Clone)]
pub(crate) struct Primary {
    /// Bumped at every finding, so a fault seen on an old primary does not drop a new one.
    generation: u64,
    client: redis::Client,
    /// The connection every other call shares.
    pub shared: ConnectionManager,
    /// The server, as `scheme://host:port`, for errors.
    pub at: Arc<str>,
}

impl Primary {
    /// `source`, from a call of `op` to this primary.
    pub fn error(&self, op: &'static str, source: redis::RedisError) -> FleetError {
        FleetError::Redis {
            op,
            at: self.at.clone(),
            source,
        }
    }
}

enum Finder {
    Server(redis::Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// The way to the primary; see the module's docs.
pub(crate) struct Link {
    finder: Finder,
    /// What the fleet's settings name, for errors before a primary is found.
    named: Arc<str>,
    timeout: Duration,
    config: ConnectionManagerConfig,
    primary: Mutex<Option<Primary>>,
    finding: tokio::sync::Mutex<u64>,
    spare: Mutex<Vec<(u64, MultiplexedConnection)>>,
    sentinel: bool,
    metrics: Arc<crate::ops::metrics::Metrics>,
    /// Where the primary was last found.
    last: Mutex<Option<Arc<str>>>,
    /// The last primary refused a write as demoted: the next one found is a new one, at the
    /// same address or not (a managed endpoint's name does not change).
    demoted: AtomicBool,
}

impl Link {
    /// The link for `address`; finds nothing yet.
    pub fn new(
        address: &Address,
        ca: Option<Vec<u8>>,
        timeout: Duration,
        config: ConnectionManagerConfig,
        metrics: Arc<crate::ops::metrics::Metrics>,
    ) -> Result<Self, redis::RedisError> {
        let certificates = |ca: &Option<Vec<u8>>| redis::TlsCertificates {
            client_tls: None,
            root_cert: ca.clone(),
        };
        let (finder, named) = match address {
            Address::Server(url) => {
                let client = match &ca {
                    Some(_) => redis::Client::build_with_tls(url.as_str(), certificates(&ca))?,
                    None => redis::Client::open(url.as_str())?,
                };
                let named = super::endpoint(&client);
                (Finder::Server(client), named)
            }
            Address::Sentinel(set) => (
                Finder::Sentinel(tokio::sync::Mutex::new(sentinel_client(
                    set,
                    ca.is_some().then(|| certificates(&ca)),
                )?)),
                set.shown().into(),
            ),
        };
        Ok(Self {
            sentinel: matches!(finder, Finder::Sentinel(_)),
            finder,
            named,
            timeout,
            config,
            primary: Mutex::new(None),
            finding: tokio::sync::Mutex::new(0),
            spare: Mutex::default(),
            metrics,
            last: Mutex::default(),
            demoted: AtomicBool::new(false),
        })
    }

    /// The server or Sentinel set the settings name.
    pub fn named(&self) -> Arc<str> {
        self.named.clone()
    }

    /// The primary, found first if it is not known (or no longer).
    pub async fn primary(&self, op: &'static str) -> Result<Primary, FleetError> {
        if let Some(primary) = lock(&self.primary).clone() {
            return Ok(primary);
        }
        let mut generation = self.finding.lock().await;
        if let Some(primary) = lock(&self.primary).clone() {
            return Ok(primary);
        }
        let fail = |source| FleetError::Redis {
            op,
            at: self.named.clone(),
            source,
        };
        let client = match &self.finder {
            Finder::Server(client) => client.clone(),
            Finder::Sentinel(sentinel) => sentinel
                .lock()
                .await
                .async_get_client()
                .await
                .map_err(fail)?,
        };
        let at = super::endpoint(&client);
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&self.dedicated_config())
            .await
            .map_err(|source| FleetError::Redis {
                op,
                at: at.clone(),
                source,
            })?;
        check_primary(&mut connection, op, &at).await?;
        *generation += 1;
        let primary = Primary {
            generation: *generation,
            shared: ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone())
                .map_err(|source| FleetError::Redis {
                    op,
                    at: at.clone(),
                    source,
                })?,
            client,
            at,
        };
        let before = lock(&self.last).replace(primary.at.clone());
        let demoted = self.demoted.swap(false, Ordering::AcqRel);
        if before.is_some_and(|b| b != primary.at || demoted) {
            self.metrics.redis_primary_changes.inc();
            tracing::warn!(primary = %primary.at, "the fleet's Redis primary moved; writing to the new one from now on");
        }
        *lock(&self.primary) = Some(primary.clone());
        let mut spare = lock(&self.spare);
        spare.clear();
        spare.push((primary.generation, connection));
        Ok(primary)
    }

    /// How often a primary was found (0: not yet, or not since the last was given up).
    fn generation(&self) -> u64 {
        lock(&self.primary).as_ref().map_or(0, |p| p.generation)
    }

    /// A call to `primary` failed with `error` (`None`: it timed out). A write refused as
    /// `READONLY` means the node was demoted: the primary is looked for again at the next
    /// call. With Sentinel, so does a primary that stopped answering.
    pub fn failed(&self, primary: &Primary, error: Option<&redis::RedisError>) {
        let moved = match error {
            Some(e) if demoted(e) => {
                self.demoted.store(true, Ordering::Release);
                true
            }
            Some(e) => {
                self.sentinel
                    && (e.is_io_error()
                        || e.is_connection_dropped()
                        || e.is_connection_refusal()
                        || e.is_timeout())
            }
            None => self.sentinel,
        };
        if !moved {
            return;
        }
        let mut current = lock(&self.primary);
        if current
            .as_ref()
            .is_some_and(|p| p.generation == primary.generation)
        {
            tracing::info!(primary = %primary.at, error = ?error.map(ToString::to_string), "the fleet's Redis primary may have moved; looking for it again");
            *current = None;
        }
    }

    /// Fewer replicas than asked acknowledged a write to `primary`. With Sentinel that may be
    /// a primary cut off from its replicas (and from most sentinels) that still answers: the
    /// sentinels are asked again at the next call, so the fleet moves on once they promote
    /// another. (A managed endpoint's name is asked again by the connection itself.)
    pub fn unacknowledged(&self, primary: &Primary) {
        if self.sentinel {
            let mut current = lock(&self.primary);
            if current
                .as_ref()
                .is_some_and(|p| p.generation == primary.generation)
            {
                *current = None;
            }
        }
    }

    /// A connection of its own to `primary`, for a write and its `WAIT`.
    pub async fn dedicated(
        &self,
        primary: &Primary,
    ) -> Result<MultiplexedConnection, redis::RedisError> {
        let spare = {
            let mut spare = lock(&self.spare);
            spare.retain(|(g, _)| *g == primary.generation);
            spare.pop()
        };
        match spare {
            Some((_, connection)) => Ok(connection),
            None => {
                primary
                    .client
                    .get_multiplexed_async_connection_with_config(&self.dedicated_config())
                    .await
            }
        }
    }

    /// Keeps a dedicated connection whose write went well for the next one.
    pub fn give_back(&self, primary: &Primary, connection: MultiplexedConnection) {
        let mut spare = lock(&self.spare);
        if spare.len() < SPARE && self.generation() == primary.generation {
            spare.push((primary.generation, connection));
        }
    }

    fn dedicated_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
    }
}

/// Whether `e` says the node no longer takes writes: `READONLY` (also inside a script's error,
/// as older servers report it), or `NOREPLICAS` from a primary whose `min-replicas-to-write`
/// finds it cut off.
fn demoted(e: &redis::RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || e.code() == Some("NOREPLICAS")
        || e.to_string().contains("READONLY")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sentinel_client(
    set: &SentinelSet,
    certificates: Option<redis::TlsCertificates>,
) -> Result<SentinelClient, redis::RedisError> {
    let mut builder =
        SentinelClientBuilder::new(set.addresses(), &set.master, SentinelServerType::Master)?
            .set_client_to_redis_db(set.db);
    if set.tls {
        builder = builder
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(certificates) = certificates {
            builder = builder
                .set_client_to_redis_certificates(certificates.clone())
                .set_client_to_sentinel_certificates(certificates);
        }
    }
    if let Some(user) = &set.username {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = &set.password {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(user) = &set.sentinel_username {
        builder = builder.set_client_to_sentinel_username(user);
    }
    if let Some(password) = &set.sentinel_password {
        builder = builder.set_client_to_sentinel_password(password);
    }
    builder.build()
}

/// Refuses a node that is not a primary, or that runs in cluster mode.
async fn check_primary(
    connection: &mut MultiplexedConnection,
    op: &'static str,
    at: &Arc<str>,
) -> Result<(), FleetError> {
    let fail = |source| FleetError::Redis {
        op,
        at: at.clone(),
        source,
    };
    // A user whose ACL leaves out INFO or ROLE (both are "dangerous" to Redis's ACL) is taken
    // at its word: a cluster node answers the scripts with MOVED, a demoted one with READONLY.
    match redis::cmd("INFO")
        .arg("cluster")
        .query_async::<String>(connection)
        .await
    {
        Ok(info) if info.lines().any(|l| l.trim() == "cluster_enabled:1") => {
            return Err(FleetError::ClusterMode { at: at.clone() });
        }
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::Server(_)) => {
            tracing::debug!(error = %e, "INFO refused; not asking whether the node runs a cluster");
        }
        Err(e) => return Err(fail(e)),
    }
    let role: redis::Value = match redis::cmd("ROLE").query_async(connection).await {
        Ok(role) => role,
        Err(e) if matches!(e.kind(), ErrorKind::Server(_)) => {
            tracing::debug!(error = %e, "ROLE refused; taking the node for the primary");
            return Ok(());
        }
        Err(e) => return Err(fail(e)),
    };
    let role = match &role {
        redis::Value::Array(items) => items.first().and_then(|r| match r {
            redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
            redis::Value::SimpleString(s) => Some(s.as_str()),
            _ => None,
        }),
        _ => None,
    };
    match role {
        Some("master") => Ok(()),
        other => Err(FleetError::NotPrimary {
            at: at.clone(),
            role: other.unwrap_or("unknown").to_owned(),
        }),
    }
}
