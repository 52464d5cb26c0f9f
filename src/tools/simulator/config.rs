//! How the simulator behaves: its bots, its rates, and the replies a test can script.

use super::*;

/// A bot the simulator knows: which stream id it answers for and the credentials it checks.
#[derive(Clone, Debug)]
pub struct SimBot {
    /// The `{streamId}` in the URL (`st-…`).
    pub stream_id: String,
    /// The value the `accountid` header must carry.
    pub account_id: String,
    /// The JWT app's client id, expected in the token's `appId` claim.
    pub client_id: String,
    /// The HS256 key tokens must be signed with; `Debug` shows it redacted.
    pub client_secret: secrecy::SecretString,
}

/// How the simulator behaves. Rates are fractions in `0.0..=1.0` of valid requests; the three
/// error rates are drawn from one roll, so they must not add up to more than 1.
#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    /// Where to listen; port 0 picks a free port (see [`Simulator::addr`]).
    pub listen: SocketAddr,
    /// The bots requests may address; any other stream id is a 404.
    pub bots: Vec<SimBot>,
    /// Added before answering every API call, to exercise client timeouts and concurrency.
    pub latency: Duration,
    /// Fraction of valid requests answered 503 (transient).
    pub fail_rate: f64,
    /// Fraction of valid requests answered 429 with `Retry-After`.
    pub rate_limited_rate: f64,
    /// `Retry-After` of drawn 429s, sent in whole seconds rounded up.
    pub retry_after: Duration,
    /// Fraction of valid requests answered 400 (permanent).
    pub reject_rate: f64,
    /// Post a callback for every accepted transfer that named a `callbackUrl`.
    pub callbacks: bool,
    /// How long after accepting a transfer its callback is posted.
    pub callback_delay: Duration,
    /// Fraction of accepted transfers whose callback reports the transfer as failed.
    pub callback_fail_rate: f64,
    /// What the front of the API does during a simulated outage.
    pub edge: Edge,
    /// Serve HTTPS with this certificate instead of plain HTTP.
    pub tls: Option<SimTls>,
}

/// The simulator's certificate, for serving HTTPS like the real API.
#[derive(Clone)]
pub struct SimTls {
    /// Certificate chain, PEM, leaf first.
    pub cert_pem: Vec<u8>,
    /// Its private key, PEM.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for SimTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimTls { .. }")
    }
}

/// The front door of the API, as seen during an outage of the service behind it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Edge {
    /// Every request reaches the service: an outage answers each with its status.
    #[default]
    RoutesFirst,
    /// The edge checks the token and account before it routes: a request it refuses is
    /// answered 401 even while the service behind it is down.
    AuthenticatesFirst,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8089)),
            bots: Vec::new(),
            latency: Duration::ZERO,
            fail_rate: 0.0,
            rate_limited_rate: 0.0,
            retry_after: Duration::from_secs(1),
            reject_rate: 0.0,
            callbacks: true,
            callback_delay: Duration::from_millis(200),
            callback_fail_rate: 0.0,
            edge: Edge::RoutesFirst,
            tls: None,
        }
    }
}

/// A scripted answer for the next valid request, taking precedence over the rates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Accept the transfer (200 with the vendor's sample body, callback if configured).
    Accept,
    /// Answer this status with an errors body. A 2xx instead counts as an acceptance, with
    /// the success body, because a success carrying an errors body would test nothing real.
    Status(u16),
    /// 429 with `Retry-After` set to this, in whole seconds rounded up.
    RateLimited {
        /// The wait the client is asked to honour.
        retry_after: Duration,
    },
    /// Never answer (for an hour, or until shutdown): for testing client timeouts.
    Hang,
    /// Answer exactly this, unchecked: any status, header values and body, as a misbehaving
    /// server might (a `Retry-After` at the end of time, a body of megabytes). No callback.
    Raw {
        /// The status; one that is not a valid HTTP status is answered as 500.
        status: u16,
        /// Headers, as name and value; pairs that are not valid HTTP are skipped.
        headers: Vec<(String, String)>,
        /// The body.
        body: Vec<u8>,
    },
}

pub(super) fn validate(config: &SimulatorConfig) -> Result<(), SimulatorError> {
    let rates = [
        ("fail_rate", config.fail_rate),
        ("rate_limited_rate", config.rate_limited_rate),
        ("reject_rate", config.reject_rate),
        ("callback_fail_rate", config.callback_fail_rate),
    ];
    for (name, rate) in rates {
        if !(0.0..=1.0).contains(&rate) {
            return Err(SimulatorError::Config(format!(
                "{name} must be between 0 and 1, not {rate}"
            )));
        }
    }
    let errors = config.fail_rate + config.rate_limited_rate + config.reject_rate;
    // A little tolerance, so 0.7 + 0.2 + 0.1 is not refused for rounding.
    if errors > 1.0 + 1e-9 {
        return Err(SimulatorError::Config(format!(
            "fail_rate + rate_limited_rate + reject_rate must not exceed 1, not {errors}"
        )));
    }
    Ok(())
}

/// The configured bots, as the simulator checks them: the same credentials the worker signs
/// with, so `simulate` and `run` agree out of the box.
pub fn bots_from_settings(settings: &crate::config::Settings) -> Vec<SimBot> {
    settings
        .bots
        .iter()
        .filter_map(|b| {
            Some(SimBot {
                stream_id: b.stream_id.clone(),
                account_id: b.account_id.clone(),
                client_id: b.client_id.clone(),
                client_secret: b.client_secret.clone()?,
            })
        })
        .collect()
}
