//! The bots a worker acts for: each bot's identity, its credentials, and the rate budget of
//! its account (shared by every bot of that account).

use std::collections::HashMap;
use std::sync::Arc;

use crate::agentassist::jwt::TokenSource;
use crate::config::Settings;
use crate::fairness::account::{Account, AccountMetrics, effective_cap};
use crate::ops::metrics::Metrics;

/// One configured bot.
#[derive(Debug)]
pub struct Bot {
    /// Bot id, the path segment of the API call.
    pub stream_id: String,
    /// Sent as `accountid`.
    pub account_id: String,
    /// JWTs for this bot's app.
    pub tokens: TokenSource,
    /// Its account: budget, slots, congestion (shared by the account's bots).
    pub account: Arc<Account>,
    /// `{base_url}/agentassist/api/v1/public/{stream_id}/assign-conversation`, parsed once.
    pub assign_url: reqwest::Url,
    /// The API host it calls (scheme, host and port of its `base_url`): its circuit
    /// breaker's key.
    pub host: String,
}

/// The host of a validated `base_url`: scheme, host and port.
pub fn host_of(base_url: &str) -> String {
    reqwest::Url::parse(base_url)
        .expect("validated settings carry a valid base_url")
        .origin()
        .ascii_serialization()
}

/// `{base_url}/agentassist/api/v1/public/{stream_id}/assign-conversation`, from a validated
/// `base_url`.
pub fn assign_url(base_url: &str, stream_id: &str) -> reqwest::Url {
    reqwest::Url::parse(&format!(
        "{}/agentassist/api/v1/public/{stream_id}/assign-conversation",
        base_url.trim_end_matches('/'),
    ))
    .expect("validated settings carry a valid base_url")
}

/// The bots by stream id, and the one used when a command names none.
#[derive(Debug, Clone)]
pub struct Bots {
    by_stream: Arc<HashMap<String, Arc<Bot>>>,
    default: Option<Arc<Bot>>,
}

impl Bots {
    /// Builds the registry from validated settings: one [`Account`] per account id, its
    /// series in `metrics`.
    pub fn new(settings: &Settings, metrics: &Metrics) -> Self {
        Self::build(settings, metrics, AccountMetrics::of)
    }

    /// The same bots, with accounts of their own for a fleet's intake: there each account's
    /// budget admits its commands to the partitions at the pace its calls can start, and
    /// sets the rest aside beside the commands queue (docs/fairness.md).
    pub fn at_intake(settings: &Settings, metrics: &Metrics) -> Self {
        Self::build(settings, metrics, AccountMetrics::at_intake)
    }

    fn build(
        settings: &Settings,
        metrics: &Metrics,
        series: fn(&Metrics, &str) -> AccountMetrics,
    ) -> Self {
        let mut accounts: HashMap<&str, Arc<Account>> = HashMap::new();
        let mut by_stream = HashMap::new();
        for b in &settings.bots {
            let account = accounts
                .entry(b.account_id.as_str())
                .or_insert_with(|| {
                    let cap = effective_cap(
                        settings.max_in_flight(b),
                        b.rate_limit,
                        b.rate_window,
                        settings.amqp.consumer_timeout,
                        settings.lane_sources(),
                    );
                    Arc::new(Account::new(
                        &b.account_id,
                        b.rate_limit,
                        b.rate_window,
                        settings.agentassist.request_timeout,
                        cap,
                        settings.commands.aside_after,
                        series(metrics, &b.account_id),
                    ))
                })
                .clone();
            let secret = b
                .client_secret
                .clone()
                .expect("validated settings carry every bot's secret");
            let base_url = b.base_url(&settings.agentassist);
            let bot = Bot {
                assign_url: assign_url(base_url, &b.stream_id),
                host: host_of(base_url),
                stream_id: b.stream_id.clone(),
                account_id: b.account_id.clone(),
                tokens: TokenSource::new(b.client_id.clone(), &secret, b.token_ttl, b.token_jti),
                account,
            };
            by_stream.insert(b.stream_id.clone(), Arc::new(bot));
        }
        let default = match settings.commands.default_stream_id.as_str() {
            "" if by_stream.len() == 1 => by_stream.values().next().cloned(),
            "" => None,
            id => by_stream.get(id).cloned(),
        };
        Self {
            by_stream: Arc::new(by_stream),
            default,
        }
    }

    /// The bot with this stream id.
    pub fn get(&self, stream_id: &str) -> Option<Arc<Bot>> {
        self.by_stream.get(stream_id).cloned()
    }

    /// Every account, once each.
    pub fn accounts(&self) -> Vec<Arc<Account>> {
        let mut accounts: Vec<Arc<Account>> = Vec::new();
        for bot in self.by_stream.values() {
            if !accounts.iter().any(|a| a.id == bot.account.id) {
                accounts.push(bot.account.clone());
            }
        }
        accounts.sort_by(|a, b| a.id.cmp(&b.id));
        accounts
    }

    /// Every bot, in the order of the settings' `[[bots]]`.
    pub fn in_order<'a>(&'a self, settings: &'a Settings) -> impl Iterator<Item = Arc<Bot>> + 'a {
        settings.bots.iter().filter_map(|b| self.get(&b.stream_id))
    }

    /// The bot for commands without `streamId`.
    pub fn default_bot(&self) -> Option<Arc<Bot>> {
        self.default.clone()
    }
}
