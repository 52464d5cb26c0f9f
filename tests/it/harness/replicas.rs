//! The replicas of a fleet: real `transfer-worker run` processes, each with its own admin port,
//! so a test can poll its `/readyz` and scrape its `/metrics`, kill it with SIGKILL and start it
//! again under the same name.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use transfer_worker::tools::simulator::SimTls;

use super::admin::{family_sum, readyz, scrape};
use super::names::{free_port, redis_url};
use super::process::{Process, binary};
use super::wait::wait_for;

/// How a fleet is run.
pub struct FleetSpec {
    pub replicas: usize,
    /// `fleet.redis_url`; `None`: no Redis, the replicas are hot standbys.
    pub redis_url: Option<String>,
    pub rate_limit: u32,
    pub rate_window: Duration,
    pub prefetch: u16,
    /// The simulator's latency for every call.
    pub latency: Duration,
    /// Further `TRANSFER__…` variables for every replica.
    pub env: Vec<(String, String)>,
    /// Bots of further accounts, beside the default bot (paced by `rate_limit`).
    pub more_bots: Vec<BotSpec>,
    /// The simulator serves HTTPS with this certificate.
    pub sim_tls: Option<SimTls>,
}

impl FleetSpec {
    /// `replicas` sharing `partitions` partitions through the shared Redis, with quick
    /// membership.
    pub fn partitioned(replicas: usize, partitions: u16) -> Self {
        Self {
            replicas,
            redis_url: Some(redis_url()),
            env: vec![
                ("TRANSFER__FLEET__PARTITIONS".into(), partitions.to_string()),
                ("TRANSFER__FLEET__HEARTBEAT".into(), "250ms".into()),
                // As quick as the rules allow with the fleet's 1 s AMQP heartbeats: 250 ms
                // + 3 × 1 s (docs/configuration.md, fleet timings).
                ("TRANSFER__FLEET__MEMBER_TTL".into(), "3250ms".into()),
                // A call on the wire when its replica dies may go out again after this.
                ("TRANSFER__FLEET__LEASE".into(), "3s".into()),
            ],
            ..Self::default()
        }
    }
}

/// A bot of an account of its own.
#[derive(Clone, Debug)]
pub struct BotSpec {
    pub stream_id: String,
    pub account_id: String,
    pub rate_limit: u32,
    pub rate_window: Duration,
    pub max_in_flight: Option<u32>,
}

impl Default for FleetSpec {
    fn default() -> Self {
        Self {
            replicas: 2,
            redis_url: None,
            rate_limit: 100_000,
            rate_window: Duration::from_secs(1),
            prefetch: 32,
            latency: Duration::ZERO,
            env: Vec::new(),
            more_bots: Vec::new(),
            sim_tls: None,
        }
    }
}

/// One `transfer-worker run` process of a fleet, with its admin listener.
pub struct Replica {
    pub admin: SocketAddr,
    process: Process,
    env: Vec<(String, String)>,
    config: PathBuf,
}

impl Replica {
    /// Replica `name`, run with `env` and the configuration file `config`; not started yet.
    pub(super) fn new(name: String, env: Vec<(String, String)>, config: PathBuf) -> Self {
        Self {
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
            process: Process::new(name),
            env,
            config,
        }
    }
}

impl Deref for Replica {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Replica {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

impl Replica {
    /// Starts the process. The admin port was free when it was picked, but any outgoing
    /// connection on the machine may take an ephemeral port in the meantime: a start that
    /// fails to bind it is retried on another port.
    pub(super) fn spawn(&mut self) {
        for _ in 0..5 {
            self.spawn_once();
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if self.last_log().contains("\"listening\"") {
                    return;
                }
                if !self.is_running() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.is_running() || !self.last_log().contains("Address already in use") {
                return;
            }
            self.forget();
            self.admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        }
    }

    fn spawn_once(&mut self) {
        let mut command = binary();
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().cloned())
            .env("TRANSFER__ADMIN__LISTEN", self.admin.to_string())
            .env("TRANSFER__FLEET__NAME", &self.process.name);
        self.process.spawn(command);
    }

    /// `GET /readyz`'s status; `None` when the admin listener does not answer.
    pub async fn readyz(&self) -> Option<StatusCode> {
        readyz(self.admin).await
    }

    /// Waits up to `limit` until `GET /readyz` answers `status`; panics with the log otherwise.
    pub async fn wait_readyz(&self, status: StatusCode, limit: Duration) {
        wait_for(
            &format!("{} /readyz {status}", self.name),
            limit,
            || self.log(),
            async || self.readyz().await == Some(status),
        )
        .await;
    }

    /// `GET /metrics`, as series; `None` when the admin listener does not answer.
    pub async fn try_metrics(&self) -> Option<BTreeMap<String, f64>> {
        scrape(self.admin).await
    }

    /// `GET /metrics`, as series; panics when it does not answer.
    pub async fn metrics(&self) -> BTreeMap<String, f64> {
        match self.try_metrics().await {
            Some(m) => m,
            None => panic!("{} serves no metrics:\n{}", self.name, self.log()),
        }
    }

    /// One series' value (0 when absent).
    pub async fn metric(&self, key: &str) -> f64 {
        self.metrics().await.get(key).copied().unwrap_or(0.0)
    }

    /// The sum of every series of a family (`name` or `name{…}`), 0 when absent.
    pub async fn metric_sum(&self, name: &str) -> f64 {
        family_sum(&self.metrics().await, name)
    }
}
