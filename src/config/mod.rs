//! Settings: what the operator writes, loaded in layers and checked once.
//!
//! `config/default.toml` (compiled in, so the binary runs from anywhere) → `--config FILE` →
//! environment `TRANSFER__SECTION__KEY`. [`Settings::load`] returns settings that are valid as
//! a whole, with every secret resolved, or a [`ConfigError`] that says which key is wrong.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

mod unknown_keys;
mod validate;

use unknown_keys::reject_unknown_keys;

/// The defaults, with every key documented.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Largest command body accepted (docs/contract.md §2).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// What can be wrong with the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a key has the wrong type.
    #[error("cannot load configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A secret file could not be read.
    #[error("cannot read secret file {path}: {source}")]
    SecretFile {
        /// The file named in the configuration.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// A key no setting has: a typo, or a setting that does not exist in this version.
    #[error(
        "unknown configuration key {key} ({origin}); check its spelling against config/default.toml"
    )]
    UnknownKey {
        /// The key, as a dotted path (`retry.max_attemps`).
        key: String,
        /// Where it came from: the file, or the environment variable.
        origin: String,
    },
    /// A value is present but unusable.
    #[error("invalid configuration: {key}: {reason}")]
    Invalid {
        /// The offending key, as written in the file.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// All settings of the worker, the simulator and the demo.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Settings {
    /// Broker and topology names.
    pub amqp: AmqpSettings,
    /// The AgentAssist API.
    pub agentassist: AgentAssistSettings,
    /// The bots this worker acts for.
    pub bots: Vec<BotSettings>,
    /// Retry policy for transient API failures.
    pub retry: RetrySettings,
    /// How commands are read and remembered.
    pub commands: CommandSettings,
    /// The callback relay.
    pub callbacks: CallbackSettings,
    /// The operator endpoints.
    pub admin: AdminSettings,
    /// Graceful shutdown.
    pub shutdown: ShutdownSettings,
    /// Logging.
    pub log: LogSettings,
    /// Several replicas as one worker (docs/contract.md §9).
    pub fleet: FleetSettings,
    /// The circuit breaker in front of the API (docs/contract.md §11).
    pub breaker: BreakerSettings,
    /// Spans exported over OTLP (docs/contract.md §11).
    pub telemetry: TelemetrySettings,
}

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
    pub redis_url: String,
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

const REDACTED: &str = "[redacted]";

fn redact<S: serde::Serializer>(_: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(REDACTED)
}

fn redact_opt<S: serde::Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str(REDACTED),
        None => s.serialize_none(),
    }
}

fn redact_vec<S: serde::Serializer>(v: &[SecretString], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for _ in v {
        seq.serialize_element(REDACTED)?;
    }
    seq.end()
}

/// The URL with its password replaced, for logs and `transfer-worker config`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:{REDACTED}{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Durations longer than this are refused: none of them makes sense past a year, and keeping
/// them bounded keeps every deadline computed from them far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

impl Settings {
    /// `bot.max_in_flight`, or its default: the most calls its budget lets start at once
    /// (`rate_limit`, a window's burst), or, if more, as many as the budget keeps on the wire
    /// when each takes the whole `agentassist.request_timeout`. A healthy account never waits
    /// for a slot; a slow one cannot take more than its budget could use (60 at the vendor's
    /// 60 a minute).
    pub fn max_in_flight(&self, bot: &BotSettings) -> u32 {
        bot.max_in_flight.unwrap_or_else(|| {
            let window = bot.rate_window.as_millis().max(1);
            let on_the_wire = u128::from(bot.rate_limit)
                .saturating_mul(self.agentassist.request_timeout.as_millis())
                .div_ceil(window);
            u32::try_from(on_the_wire)
                .unwrap_or(u32::MAX)
                .max(bot.rate_limit)
                .max(1)
        })
    }

    /// Loads the layers from the process environment and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, None)
    }

    /// Like [`Settings::load`], with an explicit environment (tests pass a map instead of
    /// mutating the process environment).
    pub fn load_with_env(
        file: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        let environment = config::Environment::with_prefix("TRANSFER")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("callbacks.previous_secrets")
            .with_list_parse_key("amqp.urls")
            .source(env.clone());
        let merged = builder.add_source(environment).build()?;
        let settings: Settings = merged.clone().try_deserialize()?;
        reject_unknown_keys(merged, file, env.as_ref())?;
        settings.resolved()
    }

    /// Reads secrets from files and the environment, then checks the whole.
    fn resolved(mut self) -> Result<Self, ConfigError> {
        for (i, bot) in self.bots.iter_mut().enumerate() {
            if let Some(path) = &bot.client_secret_file {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                        path: path.clone(),
                        source,
                    })?;
                bot.client_secret = Some(SecretString::from(text.trim_end().to_owned()));
            } else if let Some(var) = &bot.client_secret_env {
                let value = std::env::var(var).map_err(|_| {
                    invalid(
                        format!("bots[{i}].client_secret_env"),
                        format!("environment variable {var} is not set"),
                    )
                })?;
                bot.client_secret = Some(SecretString::from(value));
            }
        }
        self.validate()?;
        Ok(self)
    }

    /// The effective configuration as TOML, secrets and the broker password redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.amqp.url = redact_url(&shown.amqp.url);
        shown.amqp.urls = shown.amqp.urls.iter().map(|u| redact_url(u)).collect();
        shown.fleet.redis_url = redact_url(&shown.fleet.redis_url);
        toml::to_string(&shown).expect("settings serialize to TOML")
    }
}

#[cfg(test)]
mod tests;
