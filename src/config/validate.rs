//! Checking settings once, section by section: each section checks its own keys, and
//! [`Settings::validate`] adds the rules that span sections.

use std::collections::HashMap;
use std::time::Duration;

use secrecy::ExposeSecret;

use super::{
    AgentAssistSettings, AmqpSettings, BotSettings, BreakerSettings, CallbackSettings,
    CommandSettings, ConfigError, FleetSettings, MAX_DURATION, RetrySettings, Settings,
    TelemetrySettings, invalid,
};

impl Settings {
    /// The whole: every section, then what spans sections.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.amqp.validate()?;
        self.agentassist.validate()?;
        validate_bots(&self.bots)?;
        self.commands.validate(&self.bots)?;
        self.account_queues_have_names()?;
        self.retry.validate()?;
        self.callbacks.validate()?;
        self.fleet.validate()?;
        self.fleet_outlasts_the_brokers_detection()?;
        self.breaker.validate()?;
        self.telemetry.validate()?;
        self.durations_are_bounded()
    }

    /// Every account queue (`<commands_queue>[.p<k>].account.<account_id>#<tag>`) has a name
    /// the broker accepts: at most 255 bytes.
    fn account_queues_have_names(&self) -> Result<(), ConfigError> {
        for (i, bot) in self.bots.iter().enumerate() {
            // As `contract::names::account_queue` spells it, with its tag of 8.
            let longest = format!(
                "{}.p{}.account.{}#{}",
                self.amqp.commands_queue,
                MAX_PARTITIONS,
                bot.account_id,
                "0".repeat(8)
            );
            if longest.len() > 255 {
                return Err(invalid(
                    format!("bots[{i}].account_id"),
                    "too long: the account's queue name would pass the broker's 255 bytes",
                ));
            }
        }
        Ok(())
    }

    /// No duration past [`MAX_DURATION`], so deadlines computed from them cannot overflow.
    fn durations_are_bounded(&self) -> Result<(), ConfigError> {
        let amqp = &self.amqp;
        let mut durations = vec![
            ("amqp.confirm_timeout", amqp.confirm_timeout),
            ("amqp.operation_timeout", amqp.operation_timeout),
            ("amqp.reconnect_initial_delay", amqp.reconnect_initial_delay),
            ("amqp.reconnect_max_delay", amqp.reconnect_max_delay),
            ("amqp.consumer_timeout", amqp.consumer_timeout),
            ("commands.aside_after", self.commands.aside_after),
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
            ("fleet.lease", self.fleet.lease),
            ("fleet.redis_timeout", self.fleet.redis_timeout),
            ("fleet.heartbeat", self.fleet.heartbeat),
            ("fleet.member_ttl", self.fleet.member_ttl),
            ("breaker.open_after", self.breaker.open_after),
            ("breaker.probe_interval", self.breaker.probe_interval),
        ];
        for bot in &self.bots {
            durations.push(("bots[].rate_window", bot.rate_window));
            durations.extend(bot.token_ttl.map(|ttl| ("bots[].token_ttl", ttl)));
        }
        match durations.into_iter().find(|(_, d)| *d > MAX_DURATION) {
            Some((key, _)) => Err(invalid(key, "must not exceed 366 days")),
            None => Ok(()),
        }
    }
}

impl AmqpSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let parse = |key: String, url: &str| {
            <lapin::uri::AMQPUri as std::str::FromStr>::from_str(url)
                .map_err(|reason| invalid(key, reason))
        };
        let mut nodes = Vec::new();
        if self.urls.is_empty() {
            nodes.push((
                "amqp.url".to_owned(),
                parse("amqp.url".to_owned(), &self.url)?,
            ));
        }
        for (i, url) in self.urls.iter().enumerate() {
            let key = format!("amqp.urls[{i}]");
            nodes.push((key.clone(), parse(key, url)?));
        }
        self.tls.read()?;
        for (key, uri) in &nodes {
            self.tls_agrees_with(key, uri)?;
        }
        if self.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1"));
        }
        if self.consumer_timeout < Duration::from_secs(4) {
            return Err(invalid("amqp.consumer_timeout", "must be at least 4s"));
        }
        for (key, name) in [
            ("amqp.commands_queue", &self.commands_queue),
            ("amqp.results_exchange", &self.results_exchange),
            ("amqp.dead_letter_exchange", &self.dead_letter_exchange),
            ("amqp.dead_letter_queue", &self.dead_letter_queue),
        ] {
            if name.is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        Ok(())
    }
}

impl AmqpSettings {
    /// Each broker node's URL with the key that names it: `amqp.url`, or `amqp.urls[i]`.
    pub(super) fn node_keys(&self) -> impl Iterator<Item = (String, &str)> {
        let url = self
            .urls
            .is_empty()
            .then(|| ("amqp.url".to_owned(), self.url.as_str()));
        let urls =
            (self.urls.iter().enumerate()).map(|(i, u)| (format!("amqp.urls[{i}]"), u.as_str()));
        url.into_iter().chain(urls)
    }

    /// TLS files with a plain-text URL would silently go unused, and the EXTERNAL mechanism
    /// without a client certificate cannot log in: both are refused (docs/contract.md §13).
    fn tls_agrees_with(&self, key: &str, uri: &lapin::uri::AMQPUri) -> Result<(), ConfigError> {
        let secure = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
        if self.tls.is_set() && !secure {
            return Err(invalid(
                key,
                "is amqp:// (plain text) but [amqp.tls] names files: use amqps://",
            ));
        }
        let external = uri.query.auth_mechanism == Some(lapin::uri::SASLMechanism::External);
        if external && !self.tls.has_identity() {
            return Err(invalid(
                "amqp.tls.cert_file",
                format!("{key} asks for auth_mechanism=external, which needs a client certificate"),
            ));
        }
        Ok(())
    }
}

impl AgentAssistSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        reqwest::Url::parse(&self.base_url)
            .map_err(|e| invalid("agentassist.base_url", e.to_string()))?;
        super::tls::certificates("agentassist.ca_file", &self.ca_file)?;
        if self.request_timeout.is_zero() {
            return Err(invalid("agentassist.request_timeout", "must be positive"));
        }
        Ok(())
    }
}

/// Every bot on its own, stream ids unique, and bots of one account agreeing on its budget.
fn validate_bots(bots: &[BotSettings]) -> Result<(), ConfigError> {
    if bots.is_empty() {
        return Err(invalid("bots", "configure at least one [[bots]] entry"));
    }
    let mut streams = HashMap::with_capacity(bots.len());
    let mut budgets: HashMap<&str, (u32, Duration, Option<u32>)> =
        HashMap::with_capacity(bots.len());
    for (i, bot) in bots.iter().enumerate() {
        bot.validate(i)?;
        if streams.insert(bot.stream_id.as_str(), i).is_some() {
            return Err(invalid(format!("bots[{i}].stream_id"), "appears twice"));
        }
        // Bots of one account share one budget, so they must agree on what it is.
        let budget = (bot.rate_limit, bot.rate_window, bot.max_in_flight);
        if *budgets.entry(bot.account_id.as_str()).or_insert(budget) != budget {
            return Err(invalid(
                "bots.rate_limit",
                format!(
                    "bots of account {} disagree on rate_limit/rate_window/max_in_flight",
                    bot.account_id
                ),
            ));
        }
    }
    Ok(())
}

impl BotSettings {
    /// The `i`-th `[[bots]]` entry on its own.
    fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("bots[{i}].{k}");
        for (k, v) in [
            ("stream_id", &self.stream_id),
            ("account_id", &self.account_id),
            ("client_id", &self.client_id),
        ] {
            if v.trim().is_empty() {
                return Err(invalid(key(k), "must not be empty"));
            }
        }
        match &self.client_secret {
            Some(s) if !s.expose_secret().is_empty() => {}
            _ => {
                return Err(invalid(
                    key("client_secret"),
                    "set client_secret, client_secret_file or client_secret_env",
                ));
            }
        }
        if self.rate_limit == 0 {
            return Err(invalid(key("rate_limit"), "must be at least 1"));
        }
        if self.rate_window.is_zero() {
            return Err(invalid(key("rate_window"), "must be positive"));
        }
        if self.max_in_flight == Some(0) {
            return Err(invalid(key("max_in_flight"), "must be at least 1"));
        }
        if let Some(url) = &self.base_url {
            let parsed =
                reqwest::Url::parse(url).map_err(|e| invalid(key("base_url"), e.to_string()))?;
            if parsed.host_str().is_none() {
                return Err(invalid(key("base_url"), "names no host"));
            }
        }
        Ok(())
    }
}

impl CommandSettings {
    fn validate(&self, bots: &[BotSettings]) -> Result<(), ConfigError> {
        let default = &self.default_stream_id;
        if !default.is_empty() && !bots.iter().any(|b| &b.stream_id == default) {
            return Err(invalid(
                "commands.default_stream_id",
                format!("{default} is not a configured bot"),
            ));
        }
        if self.outcome_cache_max_bytes == 0 {
            return Err(invalid(
                "commands.outcome_cache_max_bytes",
                "must be at least 1",
            ));
        }
        if self.aside_after < Duration::from_millis(10) {
            return Err(invalid("commands.aside_after", "must be at least 10ms"));
        }
        if self.outcome_cache_capacity == 0 {
            return Err(invalid(
                "commands.outcome_cache_capacity",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl RetrySettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        if self.initial_delay > self.max_delay {
            return Err(invalid("retry.initial_delay", "exceeds retry.max_delay"));
        }
        if self.max_retry_after.is_zero() {
            return Err(invalid("retry.max_retry_after", "must be positive"));
        }
        Ok(())
    }
}

impl CallbackSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.token_ttl.is_zero() {
            return Err(invalid("callbacks.token_ttl", "must be positive"));
        }
        if !self.public_url.is_empty() {
            reqwest::Url::parse(&self.public_url)
                .map_err(|e| invalid("callbacks.public_url", e.to_string()))?;
        }
        if self.secret.expose_secret().len() < 16 {
            return Err(invalid(
                "callbacks.secret",
                "must be at least 16 bytes long",
            ));
        }
        Ok(())
    }
}

/// Most replicas a write may wait for: more than any Redis deployment runs.
const MAX_MIN_REPLICAS: u16 = 16;

/// Most partition queues: each is a quorum queue with its own Raft group on every node.
const MAX_PARTITIONS: u16 = 1024;

impl FleetSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled() {
            super::redis_url::parse(&self.redis_url).map_err(|e| invalid("fleet.redis_url", e))?;
        }
        if super::tls::certificates("fleet.redis_ca_file", &self.redis_ca_file)?.is_some()
            && !self.redis_url.starts_with("rediss://")
            && !self.redis_url.starts_with("rediss+sentinel://")
        {
            return Err(invalid(
                "fleet.redis_ca_file",
                "is set but fleet.redis_url is not rediss:// (or rediss+sentinel://): the CA \
                 would go unused",
            ));
        }
        if self.redis_min_replicas > MAX_MIN_REPLICAS {
            return Err(invalid(
                "fleet.redis_min_replicas",
                format!("must be at most {MAX_MIN_REPLICAS}"),
            ));
        }
        if self.partitions > MAX_PARTITIONS {
            return Err(invalid(
                "fleet.partitions",
                format!("must be at most {MAX_PARTITIONS}"),
            ));
        }
        if self.heartbeat < Duration::from_millis(100) {
            return Err(invalid("fleet.heartbeat", "must be at least 100ms"));
        }
        if self.lease < Duration::from_secs(1) {
            return Err(invalid("fleet.lease", "must be at least 1s"));
        }
        if self.redis_timeout.is_zero() {
            return Err(invalid("fleet.redis_timeout", "must be positive"));
        }
        if self.redis_timeout >= self.lease {
            return Err(invalid(
                "fleet.redis_timeout",
                "must be shorter than fleet.lease, or a renewal could come too late",
            ));
        }
        self.one_failed_heartbeat_is_survived()
    }
}

/// A duration as the configuration writes it: `4s`, `1s 500ms`.
pub(super) fn shown(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl BreakerSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.open_after.is_zero() {
            return Err(invalid("breaker.open_after", "must be positive"));
        }
        // Probing more often than this would only add load on an API that is already down.
        if self.probe_interval < Duration::from_millis(100) {
            return Err(invalid("breaker.probe_interval", "must be at least 100ms"));
        }
        Ok(())
    }
}

impl TelemetrySettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.otlp_endpoint.is_empty() {
            let url = reqwest::Url::parse(&self.otlp_endpoint)
                .map_err(|e| invalid("telemetry.otlp_endpoint", format!("not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(invalid(
                    "telemetry.otlp_endpoint",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if self.service_name.trim().is_empty() {
            return Err(invalid("telemetry.service_name", "must not be empty"));
        }
        if self.export_timeout.is_zero() || self.export_timeout > Duration::from_secs(60) {
            return Err(invalid(
                "telemetry.export_timeout",
                "must be between 1ms and 60s",
            ));
        }
        Ok(())
    }
}
