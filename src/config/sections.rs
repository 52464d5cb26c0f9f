//! The sections of the settings, one type each, as the file and the environment spell them;
//! secrets are redacted whenever a section is shown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::redact::{redact, redact_opt, redact_url, redact_vec};
use super::tls::AmqpTlsSettings;

/// `[amqp]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AmqpSettings {
    /// Broker URL; its password is redacted when shown.
    pub url: String,
    /// The nodes of one cluster; when not empty, replaces `url` (docs/contract.md §10).
    #[serde(default)]
    pub urls: Vec<String>,
    /// Queue commands arrive on.
    pub commands_queue: String,
    /// Topic exchange for events.
    pub results_exchange: String,
    /// Fanout exchange for dead letters.
    pub dead_letter_exchange: String,
    /// Queue bound to the dead-letter exchange.
    pub dead_letter_queue: String,
    /// Most commands in flight.
    pub prefetch: u16,
    /// `x-delivery-limit` of the commands queue.
    pub delivery_limit: u32,
    /// Longest wait for a publisher confirm.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Longest wait for any other broker operation.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// First reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_initial_delay: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_delay: Duration,
    /// The broker's `consumer_timeout`: no delivery is held unacked for half of it
    /// (docs/contract.md §12).
    #[serde(with = "humantime_serde")]
    pub consumer_timeout: Duration,
    /// Trust and identity for `amqps://` URLs (docs/contract.md §13).
    #[serde(default)]
    pub tls: AmqpTlsSettings,
}

impl AmqpSettings {
    /// The broker's nodes: `urls`, or `url` alone when `urls` is empty.
    pub fn node_urls(&self) -> &[String] {
        if self.urls.is_empty() {
            std::slice::from_ref(&self.url)
        } else {
            &self.urls
        }
    }

    /// The nodes' URLs, passwords redacted, for messages.
    pub fn shown_nodes(&self) -> String {
        let shown: Vec<String> = self.node_urls().iter().map(|u| redact_url(u)).collect();
        shown.join(", ")
    }
}

/// `[agentassist]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AgentAssistSettings {
    /// API host, without a trailing path.
    pub base_url: String,
    /// Timeout of one call.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A CA (PEM) to trust besides the system's roots, e.g. a corporate proxy's; empty: none.
    #[serde(default)]
    pub ca_file: PathBuf,
}

/// One `[[bots]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BotSettings {
    /// Bot id (`st-…`).
    pub stream_id: String,
    /// Account id, sent as `accountid`; also the rate-limit key.
    pub account_id: String,
    /// JWT `appId`.
    pub client_id: String,
    /// JWT signing secret, inline.
    #[serde(default, serialize_with = "redact_opt")]
    pub client_secret: Option<SecretString>,
    /// JWT signing secret, from a file.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// JWT signing secret, from an environment variable.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// Calls per window, per account.
    #[serde(default = "default_rate_limit")]
    pub rate_limit: u32,
    /// The sliding window.
    #[serde(default = "default_rate_window", with = "humantime_serde")]
    pub rate_window: Duration,
    /// Token lifetime; `None` mints tokens without `iat`/`exp`.
    #[serde(default, with = "humantime_serde")]
    pub token_ttl: Option<Duration>,
    /// Unique `jti` per token.
    #[serde(default)]
    pub token_jti: bool,
    /// The account's commands in flight at most (docs/contract.md §12); `None`: half of
    /// `amqp.prefetch`.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// This bot's regional host (`https://de-platform.kore.ai`, say); `None`:
    /// `agentassist.base_url`. Each host has a circuit breaker of its own.
    #[serde(default)]
    pub base_url: Option<String>,
}

impl BotSettings {
    /// Where this bot's calls go: its own `base_url`, else the global one.
    pub fn base_url<'a>(&'a self, agentassist: &'a AgentAssistSettings) -> &'a str {
        self.base_url.as_deref().unwrap_or(&agentassist.base_url)
    }
}

fn default_rate_limit() -> u32 {
    60
}

fn default_rate_window() -> Duration {
    Duration::from_secs(60)
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RetrySettings {
    /// First backoff delay.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Longest backoff delay.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Calls per command, the first included.
    pub max_attempts: u32,
    /// Longest `Retry-After` honoured; a longer one is cut to this.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
}

/// `[commands]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CommandSettings {
    /// Deadline relative to the AMQP `timestamp`.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Bot for commands without `streamId` (empty: the only bot).
    pub default_stream_id: String,
    /// Outcomes remembered, at most.
    pub outcome_cache_capacity: u64,
    /// Bytes the remembered outcomes may take, at most (event bodies and bookkeeping).
    pub outcome_cache_max_bytes: u64,
    /// How long an outcome is remembered.
    #[serde(with = "humantime_serde")]
    pub outcome_cache_ttl: Duration,
    /// A command whose account cannot start it sooner than this is set aside in the account's
    /// queue instead of waiting in memory (docs/contract.md §12).
    #[serde(with = "humantime_serde")]
    pub aside_after: Duration,
}

/// `[callbacks]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CallbackSettings {
    /// Relay listener.
    pub listen: SocketAddr,
    /// Base of the relay URLs handed to the API.
    pub public_url: String,
    /// Signs relay tokens.
    #[serde(serialize_with = "redact")]
    pub secret: SecretString,
    /// Verify-only secrets during a rotation.
    #[serde(default, serialize_with = "redact_vec")]
    pub previous_secrets: Vec<SecretString>,
    /// How long a relay URL stays valid after it was handed to the API.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AdminSettings {
    /// Health, readiness and metrics listener.
    pub listen: SocketAddr,
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ShutdownSettings {
    /// Time for in-flight commands to finish after a signal.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

/// `[fleet]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FleetSettings {
    /// Redis shared by the replicas; empty: one worker alone (extra replicas are standbys).
    /// `rediss://` for TLS, user and password in the URL.
    pub redis_url: String,
    /// The CA (PEM) a `rediss://` server's certificate is checked against, instead of the
    /// system's roots; empty: the system's roots.
    #[serde(default)]
    pub redis_ca_file: PathBuf,
    /// This replica's name; empty: the host name and the process id.
    pub name: String,
    /// Partition queues `{commands_queue}.p{k}` the work is shared through; 0: none, the
    /// single active consumer of the commands queue runs every command itself.
    pub partitions: u16,
    /// How often a replica tells the fleet it is alive (and reads who else is).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A replica not heard from for this long is gone; its partitions move to the others.
    #[serde(with = "humantime_serde")]
    pub member_ttl: Duration,
    /// How long a replica's claim on a command lasts unless renewed; a replica that dies
    /// mid-call gives its commands up after this.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Longest wait for any one Redis call.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// Replicas of the Redis primary that must acknowledge a claim, a booked start and a hold
    /// before the fleet relies on it (Redis `WAIT`); 0: none, as with one server.
    #[serde(default)]
    pub redis_min_replicas: u16,
}

impl FleetSettings {
    /// Whether the replicas share state through Redis.
    pub fn enabled(&self) -> bool {
        !self.redis_url.trim().is_empty()
    }
}

/// `[breaker]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BreakerSettings {
    /// Whether the breaker is in front of the API at all.
    pub enabled: bool,
    /// Transient failures for this long, with no answer from the API in between, open it.
    #[serde(with = "humantime_serde")]
    pub open_after: Duration,
    /// While open, the API is probed this often.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogSettings {
    /// `auto`, `json` or `text`.
    pub format: LogFormat,
    /// EnvFilter directives.
    pub level: String,
}

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TelemetrySettings {
    /// OTLP/HTTP (protobuf) collector base URL, e.g. `http://collector:4318`; spans go to
    /// its `/v1/traces`. Empty: nothing is exported.
    pub otlp_endpoint: String,
    /// The `service.name` of exported spans.
    pub service_name: String,
    /// Longest wait for one export, and for the last spans at shutdown.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON unless stdout is a terminal.
    Auto,
    /// One JSON object a line.
    Json,
    /// Human-readable.
    Text,
}
