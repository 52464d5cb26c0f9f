//! Settings: what the operator writes, loaded in layers and checked once.
//!
//! `config/default.toml` (compiled in, so the binary runs from anywhere) → `--config FILE` →
//! environment `TRANSFER__SECTION__KEY`. [`Settings::load`] returns settings that are valid as
//! a whole, with every secret resolved, or a [`ConfigError`] that says which key is wrong.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The defaults, with every key documented.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

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
}

/// `[amqp]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AmqpSettings {
    /// Broker URL; its password is redacted when shown.
    pub url: String,
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

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogSettings {
    /// `auto`, `json` or `text`.
    pub format: LogFormat,
    /// EnvFilter directives.
    pub level: String,
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

/// Every key of the merged layers must be a setting: a typo such as `max_attemps` would
/// otherwise be dropped in silence and its default applied. Names the first unknown key and
/// the layer it came from.
fn reject_unknown_keys(
    merged: config::Config,
    file: Option<&Path>,
    env: Option<&std::collections::HashMap<String, String>>,
) -> Result<(), ConfigError> {
    let tree: serde_json::Value = merged.try_deserialize()?;
    let mut unknown = Vec::new();
    // Types were checked by the typed load before; only the ignored paths matter here.
    let _: Result<Settings, _> =
        serde_ignored::deserialize(tree, |path| unknown.push(path.to_string()));
    let Some(key) = unknown.into_iter().next() else {
        return Ok(());
    };
    // The variable that set the key, or a key below it (an unknown section).
    let var = format!("TRANSFER__{}", key.replace('.', "__").to_uppercase());
    let sets_key = |name: &str| {
        name.strip_prefix(var.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("__"))
    };
    let from_env = match env {
        Some(env) => env.keys().find(|name| sets_key(name)).cloned(),
        None => std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .find(|name| sets_key(name)),
    };
    let origin = match (from_env, file.filter(|f| file_has_key(f, &key))) {
        (Some(name), _) => format!("from environment variable {name}"),
        (None, Some(f)) => format!("in {}", f.display()),
        (None, None) => "in the built-in defaults".to_owned(),
    };
    Err(ConfigError::UnknownKey { key, origin })
}

/// Whether the TOML file sets this dotted key (array entries by index).
fn file_has_key(file: &Path, key: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    let Ok(mut at) = text.parse::<toml::Table>().map(toml::Value::Table) else {
        return false;
    };
    for part in key.split('.') {
        let next = match &at {
            toml::Value::Table(t) => t
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(part))
                .map(|(_, v)| v),
            toml::Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        match next {
            Some(v) => at = v.clone(),
            None => return false,
        }
    }
    true
}

/// Durations longer than this are refused: none of them makes sense past a year, and keeping
/// them bounded keeps every deadline computed from them far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

impl Settings {
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

    fn validate(&self) -> Result<(), ConfigError> {
        let amqp = &self.amqp;
        <lapin::uri::AMQPUri as std::str::FromStr>::from_str(&amqp.url)
            .map_err(|reason| invalid("amqp.url", reason))?;
        if amqp.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1"));
        }
        for (key, name) in [
            ("amqp.commands_queue", &amqp.commands_queue),
            ("amqp.results_exchange", &amqp.results_exchange),
            ("amqp.dead_letter_exchange", &amqp.dead_letter_exchange),
            ("amqp.dead_letter_queue", &amqp.dead_letter_queue),
        ] {
            if name.is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        reqwest::Url::parse(&self.agentassist.base_url)
            .map_err(|e| invalid("agentassist.base_url", e.to_string()))?;
        if self.agentassist.request_timeout.is_zero() {
            return Err(invalid("agentassist.request_timeout", "must be positive"));
        }
        if self.bots.is_empty() {
            return Err(invalid("bots", "configure at least one [[bots]] entry"));
        }
        let mut seen = HashSet::new();
        for (i, bot) in self.bots.iter().enumerate() {
            let key = |k: &str| format!("bots[{i}].{k}");
            for (k, v) in [
                ("stream_id", &bot.stream_id),
                ("account_id", &bot.account_id),
                ("client_id", &bot.client_id),
            ] {
                if v.trim().is_empty() {
                    return Err(invalid(key(k), "must not be empty"));
                }
            }
            if !seen.insert(bot.stream_id.as_str()) {
                return Err(invalid(key("stream_id"), "appears twice"));
            }
            match &bot.client_secret {
                Some(s) if !s.expose_secret().is_empty() => {}
                _ => {
                    return Err(invalid(
                        key("client_secret"),
                        "set client_secret, client_secret_file or client_secret_env",
                    ));
                }
            }
            if bot.rate_limit == 0 {
                return Err(invalid(key("rate_limit"), "must be at least 1"));
            }
            if bot.rate_window.is_zero() {
                return Err(invalid(key("rate_window"), "must be positive"));
            }
        }
        // Bots of one account share one budget, so they must agree on what it is.
        for a in &self.bots {
            for b in &self.bots {
                if a.account_id == b.account_id
                    && (a.rate_limit, a.rate_window) != (b.rate_limit, b.rate_window)
                {
                    return Err(invalid(
                        "bots.rate_limit",
                        format!(
                            "bots of account {} disagree on rate_limit/rate_window",
                            a.account_id
                        ),
                    ));
                }
            }
        }
        let default = &self.commands.default_stream_id;
        if !default.is_empty() && !self.bots.iter().any(|b| &b.stream_id == default) {
            return Err(invalid(
                "commands.default_stream_id",
                format!("{default} is not a configured bot"),
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        if self.retry.initial_delay > self.retry.max_delay {
            return Err(invalid("retry.initial_delay", "exceeds retry.max_delay"));
        }
        if self.retry.max_retry_after.is_zero() {
            return Err(invalid("retry.max_retry_after", "must be positive"));
        }
        let mut durations = vec![
            ("amqp.confirm_timeout", amqp.confirm_timeout),
            ("amqp.operation_timeout", amqp.operation_timeout),
            ("amqp.reconnect_initial_delay", amqp.reconnect_initial_delay),
            ("amqp.reconnect_max_delay", amqp.reconnect_max_delay),
            (
                "agentassist.request_timeout",
                self.agentassist.request_timeout,
            ),
            ("retry.initial_delay", self.retry.initial_delay),
            ("retry.max_delay", self.retry.max_delay),
            ("retry.max_retry_after", self.retry.max_retry_after),
            ("commands.max_age", self.commands.max_age),
            (
                "commands.outcome_cache_ttl",
                self.commands.outcome_cache_ttl,
            ),
            ("callbacks.token_ttl", self.callbacks.token_ttl),
            ("shutdown.grace", self.shutdown.grace),
        ];
        for bot in &self.bots {
            durations.push(("bots[].rate_window", bot.rate_window));
            durations.extend(bot.token_ttl.map(|ttl| ("bots[].token_ttl", ttl)));
        }
        for (key, d) in durations {
            if d > MAX_DURATION {
                return Err(invalid(key, "must not exceed 366 days"));
            }
        }
        if self.callbacks.token_ttl.is_zero() {
            return Err(invalid("callbacks.token_ttl", "must be positive"));
        }
        if self.commands.outcome_cache_max_bytes == 0 {
            return Err(invalid(
                "commands.outcome_cache_max_bytes",
                "must be at least 1",
            ));
        }
        if self.commands.outcome_cache_capacity == 0 {
            return Err(invalid(
                "commands.outcome_cache_capacity",
                "must be at least 1",
            ));
        }
        if !self.callbacks.public_url.is_empty() {
            reqwest::Url::parse(&self.callbacks.public_url)
                .map_err(|e| invalid("callbacks.public_url", e.to_string()))?;
        }
        if self.callbacks.secret.expose_secret().len() < 16 {
            return Err(invalid(
                "callbacks.secret",
                "must be at least 16 bytes long",
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets and the broker password redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.amqp.url = redact_url(&shown.amqp.url);
        toml::to_string(&shown).expect("settings serialize to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_match_the_contract() {
        let s = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
        assert_eq!(s.amqp.commands_queue, "transfer.commands");
        assert_eq!(s.amqp.results_exchange, "transfer.results");
        assert_eq!(s.amqp.dead_letter_exchange, "transfer.dead-letter");
        assert_eq!(s.amqp.dead_letter_queue, "transfer.commands.dead");
        assert_eq!(s.amqp.prefetch, 256);
        assert_eq!(s.bots[0].rate_limit, 60);
        assert_eq!(s.bots[0].rate_window, Duration::from_secs(60));
        assert_eq!(s.retry.max_attempts, 8);
        assert_eq!(s.retry.initial_delay, Duration::from_millis(200));
        assert_eq!(s.commands.max_age, Duration::from_secs(300));
        assert_eq!(s.shutdown.grace, Duration::from_secs(30));
        assert_eq!(s.admin.listen.to_string(), "127.0.0.1:9090");
    }

    #[test]
    fn environment_overrides_file_values() {
        let s = Settings::load_with_env(
            None,
            Some(env(&[
                ("TRANSFER__AMQP__URL", "amqp://u:p@broker:5672/%2f"),
                ("TRANSFER__AMQP__PREFETCH", "7"),
                ("TRANSFER__RETRY__MAX_DELAY", "3s"),
            ])),
        )
        .unwrap();
        assert_eq!(s.amqp.url, "amqp://u:p@broker:5672/%2f");
        assert_eq!(s.amqp.prefetch, 7);
        assert_eq!(s.retry.max_delay, Duration::from_secs(3));
    }

    #[test]
    fn file_layer_overrides_defaults() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut f,
            b"[amqp]\nprefetch = 9\n[[bots]]\nstream_id='st-x'\naccount_id='a'\nclient_id='c'\nclient_secret='s'\n",
        )
        .unwrap();
        let s = Settings::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap();
        assert_eq!(s.amqp.prefetch, 9);
        assert_eq!(s.bots.len(), 1);
        assert_eq!(s.bots[0].stream_id, "st-x");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = Settings::load_with_env(None, Some(env(&[("TRANSFER__AMQP__PREFETCH", "0")])))
            .unwrap_err();
        assert!(err.to_string().contains("amqp.prefetch"), "{err}");
        let err =
            Settings::load_with_env(None, Some(env(&[("TRANSFER__CALLBACKS__SECRET", "short")])))
                .unwrap_err();
        assert!(err.to_string().contains("callbacks.secret"), "{err}");
    }

    #[test]
    fn redacted_output_hides_every_secret() {
        let s = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
        let shown = s.to_redacted_toml();
        assert!(!shown.contains("demo-secret-change-me"), "{shown}");
        assert!(!shown.contains("demo-callback-secret-change-me"), "{shown}");
        assert!(!shown.contains("guest:guest"), "{shown}");
        assert!(
            shown.contains("amqp://guest:[redacted]@127.0.0.1:5672/%2f"),
            "{shown}"
        );
        assert!(!format!("{s:?}").contains("demo-secret-change-me"));
    }

    #[test]
    fn an_unknown_key_in_a_file_is_an_error_naming_key_and_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, b"[retry]\nmax_attemps = 2\n").unwrap();
        let err = Settings::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{text}");
        assert!(text.contains("retry.max_attemps"), "{text}");
        assert!(text.contains(&f.path().display().to_string()), "{text}");
    }

    #[test]
    fn an_unknown_key_in_the_environment_is_an_error_naming_the_variable() {
        let err =
            Settings::load_with_env(None, Some(env(&[("TRANSFER__RETRY__MAX_ATTEMPS", "2")])))
                .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("retry.max_attemps"), "{text}");
        assert!(text.contains("TRANSFER__RETRY__MAX_ATTEMPS"), "{text}");
        let err =
            Settings::load_with_env(None, Some(env(&[("TRANSFER__NOPE__X", "1")]))).unwrap_err();
        assert!(
            err.to_string()
                .contains("nope (from environment variable TRANSFER__NOPE__X)"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_in_a_bot_or_a_whole_section_are_errors_too() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut f,
            b"[[bots]]\nstream_id='st-x'\naccount_id='a'\nclient_id='c'\nclient_secret='s'\nrate_limt=5\n",
        )
        .unwrap();
        let err = Settings::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
        assert!(err.to_string().contains("bots.0.rate_limt"), "{err}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, b"[amqps]\nurl = 'x'\n").unwrap();
        let err = Settings::load_with_env(Some(f.path()), Some(HashMap::new())).unwrap_err();
        assert!(err.to_string().contains("amqps"), "{err}");
    }

    #[test]
    fn durations_past_a_year_are_refused() {
        let err = Settings::load_with_env(
            None,
            Some(env(&[("TRANSFER__RETRY__MAX_RETRY_AFTER", "400days")])),
        )
        .unwrap_err();
        assert!(err.to_string().contains("retry.max_retry_after"), "{err}");
    }
}
