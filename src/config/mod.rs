//! Settings: what the operator writes, loaded in layers and checked once.
//!
//! `config/default.toml` (compiled in, so the binary runs from anywhere) → `--config FILE` →
//! environment `TRANSFER__SECTION__KEY`. [`Settings::load`] returns settings that are valid as
//! a whole, with every secret resolved, or a [`ConfigError`] that says which key is wrong.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

mod fleet_timings;
mod production;
mod redact;
pub mod redis_url;
mod sections;
pub mod tls;
mod unknown_keys;
mod validate;

pub use production::MIN_CALLBACK_SECRET_BYTES;
pub use redact::redact_url;
pub use sections::{
    AdminSettings, AgentAssistSettings, AmqpSettings, BotSettings, BreakerSettings,
    CallbackSettings, CommandSettings, FleetSettings, LogFormat, LogSettings, RetrySettings,
    ShutdownSettings, TelemetrySettings,
};
pub use tls::{AmqpTlsFiles, AmqpTlsSettings};
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

/// Durations longer than this are refused: none of them makes sense past a year, and keeping
/// them bounded keeps every deadline computed from them far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

impl Settings {
    /// How many sources one replica may hold account-queue lanes of: every partition and
    /// the commands queue (its intake) in a fleet that shares work, else the commands queue
    /// alone.
    pub fn lane_sources(&self) -> u32 {
        if self.fleet.enabled() && self.fleet.partitions > 0 {
            u32::from(self.fleet.partitions) + 1
        } else {
            1
        }
    }

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
}

#[cfg(test)]
mod tests;
