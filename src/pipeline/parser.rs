//! Transfer commands: the raw delivery becomes a typed, valid [`Command`] once, at the edge,
//! or a [`Rejection`] that says what is wrong (docs/contract.md §2). Nothing past this module sees raw
//! JSON or an invalid command.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::agentassist::bots::{Bot, Bots};
use crate::broker::Delivery;
use crate::config::MAX_COMMAND_BYTES;
use crate::contract::{Command, REPLAY_MARK, Rejection, Target};
use crate::ops::trace_context::Incoming;

/// A valid command and the configured bot it names: what the edge hands on.
#[derive(Debug, Clone)]
pub struct Valid {
    /// The command.
    pub command: Command,
    /// Its bot (`command.stream_id`): credentials, account, URL.
    pub bot: Arc<Bot>,
}

/// What the edge knows about a delivery besides its body.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// AMQP `timestamp`, seconds since the epoch.
    pub timestamp: Option<u64>,
    /// The message came back from the dead-letter queue (`dead-letters replay`): it carries
    /// the `x-transfer-event` header the worker put on its dead-letter copy. Such a command is
    /// processed again unless it completed (see `pipeline::decision`).
    pub replayed: bool,
    /// The W3C trace context of the headers; an invalid one is ignored, never a rejection.
    pub trace: Incoming,
}

impl Envelope {
    /// What a delivery's AMQP properties say about the command.
    pub fn of(delivery: &Delivery) -> Self {
        Self {
            message_id: delivery.message_id().map(str::to_owned),
            timestamp: delivery.timestamp(),
            replayed: delivery.has_header(REPLAY_MARK),
            trace: delivery.trace(),
        }
    }
}

/// The rules a command is read with.
#[derive(Debug, Clone)]
pub struct Parser {
    bots: Bots,
    max_age: Duration,
}

impl Parser {
    /// The bots it reads commands for.
    pub fn bots(&self) -> &Bots {
        &self.bots
    }

    /// A parser for these bots, with this `commands.max_age`.
    pub fn new(bots: Bots, max_age: Duration) -> Self {
        Self { bots, max_age }
    }

    /// Reads one delivery.
    pub fn parse(&self, body: &[u8], envelope: &Envelope) -> Result<Valid, Box<Rejection>> {
        let mut draft = Draft {
            command_id: None,
            envelope,
            body,
            stream_id: None,
            bot_session_id: None,
            target: None,
        };
        match self.read(body, envelope, &mut draft) {
            Ok(command) => Ok(command),
            Err(message) => Err(Box::new(draft.reject(message))),
        }
    }

    fn read(
        &self,
        body: &[u8],
        envelope: &Envelope,
        draft: &mut Draft<'_>,
    ) -> Result<Valid, String> {
        if body.len() > MAX_COMMAND_BYTES {
            return Err(format!(
                "body is {} bytes; the limit is {MAX_COMMAND_BYTES}",
                body.len()
            ));
        }
        let text = std::str::from_utf8(body).map_err(|e| {
            format!(
                "body is not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            )
        })?;
        // Fast path: a well-formed command deserializes straight into borrowed fields. Anything
        // else takes the slow path through a JSON value, which names exactly what is wrong.
        let value;
        let fields = match serde_json::from_str::<Fields<'_>>(text) {
            Ok(fields) => fields,
            Err(_) => {
                value = serde_json::from_str::<Value>(text)
                    .map_err(|e| format!("body is not valid JSON: {e}"))?;
                let Value::Object(map) = &value else {
                    return Err("body must be a JSON object".into());
                };
                // Keep the ids for the rejection even if another field is what is wrong.
                let id = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_owned);
                draft.command_id = id("commandId");
                draft.bot_session_id = id("botSessionId");
                Fields::from_map(map)?
            }
        };
        draft.command_id = fields.command_id.as_deref().map(str::to_owned);
        draft.bot_session_id = fields.bot_session_id.as_deref().map(str::to_owned);
        let bot = match fields.stream_id.as_deref() {
            Some(id) => self.bots.get(id).ok_or_else(|| {
                format!("unknown streamId {}: no such bot is configured", quoted(id))
            })?,
            None => self.bots.default_bot().ok_or_else(|| {
                "missing streamId, and this worker serves several bots without a default".to_owned()
            })?,
        };
        draft.stream_id = Some(bot.stream_id.clone());
        let target = fields.target()?;
        draft.target = Some(target.clone());
        let org_id = required(&fields.org_id, "orgId")?;
        let bot_session_id = required(&fields.bot_session_id, "botSessionId")?;
        let callback_url = fields.callback_url.as_deref().map(str::to_owned);
        let expires_at =
            match fields.expires_at.as_deref() {
                Some(text) => Some(OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
                    format!("expiresAt {} is not an RFC 3339 time: {e}", quoted(text))
                })?),
                None => None,
            };
        // Checked: a timestamp near the end of time is no deadline, not an overflow.
        let by_age = envelope.timestamp.and_then(|secs| {
            SystemTime::UNIX_EPOCH
                .checked_add(Duration::from_secs(secs))?
                .checked_add(self.max_age)
        });
        let deadline = [expires_at.and_then(system_time), by_age]
            .into_iter()
            .flatten()
            .min();
        let command = Command {
            command_id: draft.command_id(),
            stream_id: bot.stream_id.clone(),
            org_id,
            bot_session_id,
            target,
            callback_url,
            deadline,
        };
        Ok(Valid { command, bot })
    }
}

/// The instant an RFC 3339 time names, if this platform's clock can represent it.
fn system_time(at: OffsetDateTime) -> Option<SystemTime> {
    let since_epoch = at - OffsetDateTime::UNIX_EPOCH;
    let magnitude = Duration::try_from(since_epoch.abs()).ok()?;
    if since_epoch.is_negative() {
        SystemTime::UNIX_EPOCH.checked_sub(magnitude)
    } else {
        SystemTime::UNIX_EPOCH.checked_add(magnitude)
    }
}

/// Ids gathered while reading, so a rejection carries whatever could be read.
struct Draft<'a> {
    command_id: Option<String>,
    envelope: &'a Envelope,
    body: &'a [u8],
    stream_id: Option<String>,
    bot_session_id: Option<String>,
    target: Option<Target>,
}

impl Draft<'_> {
    fn command_id(&self) -> String {
        self.command_id
            .clone()
            .filter(|id| !id.is_empty())
            .or_else(|| self.envelope.message_id.clone().filter(|id| !id.is_empty()))
            .unwrap_or_else(|| body_hash(self.body))
    }

    fn reject(self, message: String) -> Rejection {
        Rejection {
            command_id: self.command_id(),
            stream_id: self.stream_id,
            bot_session_id: self.bot_session_id,
            target: self.target,
            message,
        }
    }
}

/// The idempotency key of a command that names none: the same body always gets the same key.
pub fn body_hash(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let mut key = String::with_capacity(7 + 64);
    key.push_str("sha256:");
    for byte in digest {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

/// The fields a command is read from; strings borrow from the body unless escaped.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Fields<'a> {
    #[serde(borrow)]
    command_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    stream_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    org_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    bot_session_id: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "aId")]
    a_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    transferred_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    queue_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    callback_url: Option<Cow<'a, str>>,
    #[serde(borrow)]
    expires_at: Option<Cow<'a, str>>,
}

impl<'a> Fields<'a> {
    /// The slow path: each field checked on its own, so the error names the field.
    fn from_map(map: &'a Map<String, Value>) -> Result<Self, String> {
        let get = |key: &str| -> Result<Option<Cow<'a, str>>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(Cow::Borrowed(s.as_str()))),
                Some(other) => Err(format!("{key} must be a string, not {}", kind_of(other))),
            }
        };
        Ok(Self {
            command_id: get("commandId")?,
            bot_session_id: get("botSessionId")?,
            stream_id: get("streamId")?,
            a_id: get("aId")?,
            transferred_type: get("transferredType")?,
            queue_id: get("queueId")?,
            org_id: get("orgId")?,
            callback_url: get("callbackUrl")?,
            expires_at: get("expiresAt")?,
        })
    }

    fn target(&self) -> Result<Target, String> {
        let non_empty = |key: &str, v: &str| {
            if v.trim().is_empty() {
                Err(format!("{key} must not be empty"))
            } else {
                Ok(v.to_owned())
            }
        };
        let agent = self.a_id.as_deref();
        let queue = self.queue_id.as_deref();
        match (self.transferred_type.as_deref(), agent, queue) {
            (Some(other), _, _) if other != "AGENT" && other != "QUEUE" => Err(format!(
                "transferredType {} is not supported: use \"AGENT\" (with aId) or \"QUEUE\" (with queueId)",
                quoted(other)
            )),
            (_, Some(_), Some(_)) => {
                Err("two targets: give either aId (agent) or queueId (queue), not both".into())
            }
            (None | Some("AGENT"), Some(a), None) => Ok(Target::Agent(non_empty("aId", a)?)),
            (Some("QUEUE"), None, Some(q)) => Ok(Target::Queue(non_empty("queueId", q)?)),
            (Some("QUEUE"), Some(_), None) => {
                Err("transferredType \"QUEUE\" needs queueId, not aId".into())
            }
            (Some("AGENT"), None, Some(_)) => {
                Err("transferredType \"AGENT\" needs aId, not queueId".into())
            }
            (None, None, Some(_)) => Err("queueId given without transferredType \"QUEUE\"".into()),
            _ => Err("no target: give aId for an agent transfer, or transferredType \"QUEUE\" with queueId".into()),
        }
    }
}

fn required(field: &Option<Cow<'_, str>>, key: &str) -> Result<String, String> {
    match field.as_deref() {
        Some(s) if !s.trim().is_empty() => Ok(s.to_owned()),
        Some(_) => Err(format!("{key} must not be empty")),
        None => Err(format!("missing required field {key}")),
    }
}

/// A value from the command, quoted for an error message and cut to a readable length: the
/// message travels in an event and in a dead-letter header, which must stay small.
fn quoted(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
        None => format!("{value:?}"),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
