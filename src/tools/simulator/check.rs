//! Checks an assign-conversation request as strictly as the real API is documented, in the
//! documented order (bot, token, account, content type, body), turning it into a typed
//! [`Transfer`] or a [`Rejection`] that says what is wrong.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use axum::http::{HeaderMap, StatusCode, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use secrecy::ExposeSecret;
use serde_json::{Map, Value};

use super::{SimBot, lock};

/// How many `(appId, jti)` pairs are remembered for replay detection. Tokens without `exp` could
/// be replayed forever, so the log is a bounded window rather than complete: enough for any
/// test or benchmark, and a long run cannot grow it without limit.
const REPLAY_WINDOW: usize = 100_000;

/// Who a valid request transfers the conversation to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Agent(String),
    Queue(String),
}

/// A request that passed every check.
#[derive(Clone, Debug)]
pub(super) struct Transfer {
    pub(super) org_id: String,
    pub(super) bot_session_id: String,
    pub(super) callback_url: Option<String>,
    pub(super) target: Target,
}

/// Why a request was refused, answered as `{"errors":[{"msg", "code"}]}`.
#[derive(Clone, Debug)]
pub(super) struct Rejection {
    pub(super) status: StatusCode,
    pub(super) msg: String,
}

impl Rejection {
    pub(super) fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self {
            status,
            msg: msg.into(),
        }
    }

    fn unauthorized(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, msg)
    }

    fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, msg)
    }
}

struct Bot {
    account_id: String,
    client_id: String,
    // Built once: the secret is only exposed here, never kept around as text.
    key: DecodingKey,
}

/// The configured bots plus the replay log: everything needed to judge a request.
pub(super) struct Checker {
    bots: HashMap<String, Bot>,
    validation: Validation,
    replays: Mutex<ReplayLog>,
}

impl Checker {
    /// Fails on a stream id configured twice, since which secret applies would be a guess.
    pub(super) fn new(bots: &[SimBot]) -> Result<Self, String> {
        let mut map = HashMap::with_capacity(bots.len());
        for bot in bots {
            let entry = Bot {
                account_id: bot.account_id.clone(),
                client_id: bot.client_id.clone(),
                key: DecodingKey::from_secret(bot.client_secret.expose_secret().as_bytes()),
            };
            if map.insert(bot.stream_id.clone(), entry).is_some() {
                return Err(format!("bot {} is configured twice", bot.stream_id));
            }
        }

        let mut validation = Validation::new(Algorithm::HS256);
        // The vendor's sample token carries only `appId`: no claim is required, but `exp` and
        // `nbf` are enforced when present, with no leeway because the clocks are the same.
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 0;
        // An audience is not part of this API; a token carrying one is not wrong for it.
        validation.validate_aud = false;

        Ok(Self {
            bots: map,
            validation,
            replays: Mutex::new(ReplayLog::default()),
        })
    }

    /// Runs every check in the documented order; the first failure wins.
    pub(super) fn check(
        &self,
        stream_id: &str,
        headers: &HeaderMap,
        body: &Value,
    ) -> Result<Transfer, Rejection> {
        let bot = self
            .bots
            .get(stream_id)
            .ok_or_else(|| Rejection::new(StatusCode::NOT_FOUND, "bot not found"))?;
        self.check_token(bot, headers)?;
        check_account(bot, headers)?;
        check_content_type(headers)?;
        parse_body(body)
    }

    fn check_token(&self, bot: &Bot, headers: &HeaderMap) -> Result<(), Rejection> {
        let token = match headers.get("auth") {
            Some(value) => value
                .to_str()
                .map_err(|_| Rejection::unauthorized("auth header is not valid text"))?,
            None if headers.contains_key(header::AUTHORIZATION) => {
                return Err(Rejection::unauthorized(
                    "missing auth header: this API reads the JWT from the auth header, \
                     not from Authorization",
                ));
            }
            None => return Err(Rejection::unauthorized("missing auth header")),
        };
        if token
            .get(..7)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("bearer "))
        {
            return Err(Rejection::unauthorized(
                "auth header must hold the bare JWT, without a Bearer prefix",
            ));
        }

        let claims = decode::<Map<String, Value>>(token.trim(), &bot.key, &self.validation)
            .map_err(|e| {
                Rejection::unauthorized(format!("error verifying the jwt: {}", describe(e.kind())))
            })?
            .claims;

        match claims.get("appId") {
            Some(Value::String(app_id)) if *app_id == bot.client_id => {}
            Some(_) => {
                return Err(Rejection::unauthorized(
                    "the jwt's appId is not this bot's client id",
                ));
            }
            None => return Err(Rejection::unauthorized("the jwt has no appId claim")),
        }

        if let Some(jti) = claims.get("jti") {
            let jti = match jti {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if !lock(&self.replays).first_use(&bot.client_id, jti) {
                return Err(Rejection::unauthorized(
                    "error verifying the jwt: possibly a replay",
                ));
            }
        }
        Ok(())
    }
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::InvalidSignature => "invalid signature".into(),
        ErrorKind::ExpiredSignature => "token expired".into(),
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)".into(),
        ErrorKind::InvalidAlgorithm => "algorithm not allowed (HS256 expected)".into(),
        ErrorKind::InvalidClaimFormat(claim) => format!("malformed {claim} claim"),
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            "malformed token".into()
        }
        ErrorKind::Json(_) => "token payload is not a JSON object".into(),
        other => format!("{other:?}"),
    }
}

fn check_account(bot: &Bot, headers: &HeaderMap) -> Result<(), Rejection> {
    match headers.get("accountid").map(|v| v.to_str()) {
        None => Err(Rejection::unauthorized("missing accountid header")),
        Some(Ok(account)) if account == bot.account_id => Ok(()),
        Some(_) => Err(Rejection::unauthorized(
            "accountid header does not match the bot's account",
        )),
    }
}

fn check_content_type(headers: &HeaderMap) -> Result<(), Rejection> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if is_json {
        Ok(())
    } else {
        Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        ))
    }
}

fn parse_body(body: &Value) -> Result<Transfer, Rejection> {
    let Value::Object(fields) = body else {
        return Err(Rejection::bad_request("body is not a JSON object"));
    };
    let org_id = required(fields, "orgId")?;
    let bot_session_id = required(fields, "botSessionId")?;
    let callback_url = match fields.get("callbackUrl") {
        None => None,
        Some(Value::String(url)) => Some(url.clone()),
        Some(_) => return Err(Rejection::bad_request("callbackUrl must be a string")),
    };

    let has_agent = fields.contains_key("aId");
    let has_queue = fields.contains_key("queueId");
    let target = match fields.get("transferredType") {
        None => match (has_agent, has_queue) {
            (true, true) => return Err(both_targets()),
            (true, false) => Target::Agent(required(fields, "aId")?),
            (false, true) => {
                return Err(Rejection::bad_request(
                    "queueId given without \"transferredType\":\"QUEUE\"",
                ));
            }
            (false, false) => {
                return Err(Rejection::bad_request(
                    "no target: give aId for an agent, or transferredType QUEUE and queueId \
                     for a queue",
                ));
            }
        },
        Some(Value::String(kind)) if kind == "AGENT" => {
            if has_queue {
                return Err(both_targets());
            }
            if !has_agent {
                return Err(Rejection::bad_request("transferredType AGENT needs aId"));
            }
            Target::Agent(required(fields, "aId")?)
        }
        Some(Value::String(kind)) if kind == "QUEUE" => {
            if has_agent {
                return Err(both_targets());
            }
            if !has_queue {
                return Err(Rejection::bad_request(
                    "transferredType QUEUE needs queueId",
                ));
            }
            Target::Queue(required(fields, "queueId")?)
        }
        Some(other) => {
            return Err(Rejection::bad_request(format!(
                "transferredType must be \"AGENT\" or \"QUEUE\", not {other}"
            )));
        }
    };

    Ok(Transfer {
        org_id,
        bot_session_id,
        callback_url,
        target,
    })
}

fn both_targets() -> Rejection {
    Rejection::bad_request("both aId and queueId given: exactly one target is allowed")
}

fn required(fields: &Map<String, Value>, name: &str) -> Result<String, Rejection> {
    match fields.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(Rejection::bad_request(format!(
            "{name} must be a non-empty string"
        ))),
        None => Err(Rejection::bad_request(format!("{name} is required"))),
    }
}

/// Remembers recently used `(appId, jti)` pairs, oldest forgotten first.
#[derive(Default)]
struct ReplayLog {
    seen: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
}

impl ReplayLog {
    /// True the first time a pair is seen; false for a replay.
    fn first_use(&mut self, app_id: &str, jti: String) -> bool {
        let key = (app_id.to_owned(), jti);
        if !self.seen.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > REPLAY_WINDOW
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        true
    }
}
