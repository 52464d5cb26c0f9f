//! The bots a worker acts for: each bot's identity, its credentials, and the rate budget of
//! its account (shared by every bot of that account).

use std::collections::HashMap;
use std::sync::Arc;

use crate::agentassist::jwt::TokenSource;
use crate::agentassist::pacer::Pacer;
use crate::config::Settings;

/// One configured bot.
#[derive(Debug)]
pub struct Bot {
    /// Bot id, the path segment of the API call.
    pub stream_id: String,
    /// Sent as `accountid`.
    pub account_id: String,
    /// JWTs for this bot's app.
    pub tokens: TokenSource,
    /// The account's budget.
    pub pacer: Arc<Pacer>,
    /// `{base_url}/agentassist/api/v1/public/{stream_id}/assign-conversation`, parsed once.
    pub assign_url: reqwest::Url,
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
    /// Builds the registry from validated settings.
    pub fn from_settings(settings: &Settings) -> Self {
        let mut pacers: HashMap<&str, Arc<Pacer>> = HashMap::new();
        let mut by_stream = HashMap::new();
        for b in &settings.bots {
            let pacer = pacers
                .entry(b.account_id.as_str())
                .or_insert_with(|| Arc::new(Pacer::new(b.rate_limit, b.rate_window)))
                .clone();
            let secret = b
                .client_secret
                .clone()
                .expect("validated settings carry every bot's secret");
            let assign_url = assign_url(&settings.agentassist.base_url, &b.stream_id);
            let bot = Bot {
                assign_url,
                stream_id: b.stream_id.clone(),
                account_id: b.account_id.clone(),
                tokens: TokenSource::new(b.client_id.clone(), &secret, b.token_ttl, b.token_jti),
                pacer,
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

    /// The bot for commands without `streamId`.
    pub fn default_bot(&self) -> Option<Arc<Bot>> {
        self.default.clone()
    }
}
