//! Transfer commands: the raw delivery becomes a typed, valid [`Command`] once, at the edge,
//! or a [`Rejection`] that says what is wrong (CONTRACT §2). Nothing past this module sees raw
//! JSON or an invalid command.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::bots::{Bot, Bots};
use crate::config::MAX_COMMAND_BYTES;

/// Where a transfer goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "id", rename_all = "lowercase")]
pub enum Target {
    /// A specific agent (`aId`).
    Agent(String),
    /// A queue (`queueId`).
    Queue(String),
}

/// A valid transfer command.
#[derive(Debug, Clone)]
pub struct Command {
    /// Idempotency key.
    pub command_id: String,
    /// The bot acting.
    pub bot: Arc<Bot>,
    /// Passed to the API.
    pub org_id: String,
    /// Passed to the API; the ordering key.
    pub bot_session_id: String,
    /// Agent or queue.
    pub target: Target,
    /// Given by the command: sent as is, and nothing is relayed.
    pub callback_url: Option<String>,
    /// No attempt starts after this.
    pub deadline: Option<SystemTime>,
}

/// A delivery that is not a valid command, with every id that could still be read.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// Always known: from the body, the AMQP `message_id`, or a hash of the body.
    pub command_id: String,
    /// If it could be read and names a known bot.
    pub stream_id: Option<String>,
    /// If it could be read.
    pub bot_session_id: Option<String>,
    /// If exactly one target could be read.
    pub target: Option<Target>,
    /// What is wrong, for people.
    pub message: String,
}

/// What the edge knows about a delivery besides its body.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// AMQP `timestamp`, seconds since the epoch.
    pub timestamp: Option<u64>,
}

/// The rules a command is read with.
pub struct Parser {
    bots: Bots,
    max_age: Duration,
}

impl Parser {
    /// A parser for these bots, with this `commands.max_age`.
    pub fn new(bots: Bots, max_age: Duration) -> Self {
        Self { bots, max_age }
    }

    /// Reads one delivery.
    pub fn parse(&self, body: &[u8], envelope: &Envelope) -> Result<Command, Box<Rejection>> {
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
    ) -> Result<Command, String> {
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
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("body is not valid JSON: {e}"))?;
        let Value::Object(fields) = value else {
            return Err("body must be a JSON object".into());
        };
        draft.command_id = optional_str(&fields, "commandId")?;
        draft.bot_session_id = optional_str(&fields, "botSessionId")?;
        let stream_field = optional_str(&fields, "streamId")?;
        let bot = match &stream_field {
            Some(id) => self
                .bots
                .get(id)
                .ok_or_else(|| format!("unknown streamId {id:?}: no such bot is configured"))?,
            None => self.bots.default_bot().ok_or_else(|| {
                "missing streamId, and this worker serves several bots without a default".to_owned()
            })?,
        };
        draft.stream_id = Some(bot.stream_id.clone());
        let target = read_target(&fields)?;
        draft.target = Some(target.clone());
        let org_id = required_str(&fields, "orgId")?;
        let bot_session_id = required_str(&fields, "botSessionId")?;
        let callback_url = optional_str(&fields, "callbackUrl")?;
        let expires_at = match optional_str(&fields, "expiresAt")? {
            Some(text) => Some(
                OffsetDateTime::parse(&text, &Rfc3339)
                    .map_err(|e| format!("expiresAt {text:?} is not an RFC 3339 time: {e}"))?,
            ),
            None => None,
        };
        let by_age = envelope
            .timestamp
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + self.max_age);
        let deadline = [expires_at.map(SystemTime::from), by_age]
            .into_iter()
            .flatten()
            .min();
        Ok(Command {
            command_id: draft.command_id(),
            bot,
            org_id,
            bot_session_id,
            target,
            callback_url,
            deadline,
        })
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

fn optional_str(fields: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("{key} must be a string, not {}", kind_of(other))),
    }
}

fn required_str(fields: &Map<String, Value>, key: &str) -> Result<String, String> {
    match optional_str(fields, key)? {
        Some(s) if !s.trim().is_empty() => Ok(s),
        Some(_) => Err(format!("{key} must not be empty")),
        None => Err(format!("missing required field {key}")),
    }
}

fn read_target(fields: &Map<String, Value>) -> Result<Target, String> {
    let agent = optional_str(fields, "aId")?;
    let queue = optional_str(fields, "queueId")?;
    let kind = optional_str(fields, "transferredType")?;
    let non_empty = |key: &str, v: String| {
        if v.trim().is_empty() {
            Err(format!("{key} must not be empty"))
        } else {
            Ok(v)
        }
    };
    match (kind.as_deref(), agent, queue) {
        (Some(other), _, _) if other != "AGENT" && other != "QUEUE" => Err(format!(
            "transferredType {other:?} is not supported: use \"AGENT\" (with aId) or \"QUEUE\" (with queueId)"
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
        _ => Err(
            "no target: give aId for an agent transfer, or transferredType \"QUEUE\" with queueId"
                .into(),
        ),
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
mod tests {
    use super::*;
    use crate::config::Settings;

    fn parser() -> Parser {
        let settings = Settings::load_with_env(None, Some(Default::default())).unwrap();
        Parser::new(Bots::from_settings(&settings), Duration::from_secs(300))
    }

    fn parse(body: &str) -> Result<Command, Box<Rejection>> {
        parser().parse(body.as_bytes(), &Envelope::default())
    }

    #[test]
    fn agent_and_queue_commands_parse() {
        let c =
            parse(r#"{"orgId":"o-1","botSessionId":"s1","aId":"a-1","commandId":"c1"}"#).unwrap();
        assert_eq!(c.target, Target::Agent("a-1".into()));
        assert_eq!(c.command_id, "c1");
        let c = parse(
            r#"{"orgId":"o-1","botSessionId":"s1","transferredType":"QUEUE","queueId":"qu-1"}"#,
        )
        .unwrap();
        assert_eq!(c.target, Target::Queue("qu-1".into()));
        assert!(c.command_id.starts_with("sha256:"));
        let c =
            parse(r#"{"orgId":"o","botSessionId":"s","transferredType":"AGENT","aId":"a","x":1}"#)
                .unwrap();
        assert_eq!(c.target, Target::Agent("a".into()));
    }

    #[test]
    fn command_id_falls_back_to_message_id_then_hash() {
        let p = parser();
        let body = br#"{"orgId":"o","botSessionId":"s","aId":"a"}"#;
        let env = Envelope {
            message_id: Some("m-9".into()),
            timestamp: None,
        };
        assert_eq!(p.parse(body, &env).unwrap().command_id, "m-9");
        let a = p.parse(body, &Envelope::default()).unwrap().command_id;
        let b = p.parse(body, &Envelope::default()).unwrap().command_id;
        assert_eq!(a, b);
        assert_eq!(a.len(), 7 + 64);
    }

    #[test]
    fn each_bad_input_is_rejected_with_its_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"\xff\xfe", "not UTF-8"),
            (b"{nope", "not valid JSON"),
            (b"[1]", "JSON object"),
            (br#"{"botSessionId":"s","aId":"a"}"#, "orgId"),
            (br#"{"orgId":"o","aId":"a"}"#, "botSessionId"),
            (br#"{"orgId":"o","botSessionId":"s"}"#, "no target"),
            (br#"{"orgId":"o","botSessionId":"s","aId":"a","transferredType":"QUEUE","queueId":"q"}"#, "two targets"),
            (br#"{"orgId":"o","botSessionId":"s","aId":"a","streamId":"st-nope"}"#, "unknown streamId"),
            (br#"{"orgId":"o","botSessionId":"s","transferredType":"BOT","queueId":"q"}"#, "transferredType"),
            (br#"{"orgId":5,"botSessionId":"s","aId":"a"}"#, "orgId must be a string"),
            (br#"{"orgId":"o","botSessionId":"s","aId":"a","expiresAt":"tomorrow"}"#, "expiresAt"),
        ];
        for (body, needle) in cases {
            let r = parser().parse(body, &Envelope::default()).unwrap_err();
            assert!(
                r.message.contains(needle),
                "{:?}: {}",
                String::from_utf8_lossy(body),
                r.message
            );
        }
        let big = format!(
            r#"{{"orgId":"o","botSessionId":"s","aId":"a","pad":"{}"}}"#,
            "x".repeat(MAX_COMMAND_BYTES)
        );
        assert!(parse(&big).unwrap_err().message.contains("limit"));
    }

    #[test]
    fn rejections_keep_the_ids_that_could_be_read() {
        let r = parse(r#"{"commandId":"c7","botSessionId":"s","aId":"a"}"#).unwrap_err();
        assert_eq!(r.command_id, "c7");
        assert_eq!(r.bot_session_id.as_deref(), Some("s"));
        assert_eq!(r.target, Some(Target::Agent("a".into())));
        assert!(r.stream_id.is_some());
        let r = parse("garbage").unwrap_err();
        assert!(r.bot_session_id.is_none() && r.stream_id.is_none() && r.target.is_none());
    }

    #[test]
    fn deadline_is_the_earlier_of_expires_at_and_timestamp_plus_max_age() {
        let p = parser();
        let body =
            br#"{"orgId":"o","botSessionId":"s","aId":"a","expiresAt":"2030-01-01T00:00:00Z"}"#;
        let c = p
            .parse(
                body,
                &Envelope {
                    message_id: None,
                    timestamp: Some(1_000),
                },
            )
            .unwrap();
        assert_eq!(
            c.deadline,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_300))
        );
        let c = p.parse(body, &Envelope::default()).unwrap();
        assert_eq!(
            c.deadline,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000))
        );
    }
}
