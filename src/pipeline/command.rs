//! Transfer commands: the raw delivery becomes a typed, valid [`Command`] once, at the edge,
//! or a [`Rejection`] that says what is wrong (docs/contract.md §2). Nothing past this module sees raw
//! JSON or an invalid command.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::agentassist::bots::{Bot, Bots};
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

impl Envelope {
    /// What a delivery's AMQP properties say about the command.
    pub fn from_properties(properties: &lapin::BasicProperties) -> Self {
        Self {
            message_id: properties.message_id().as_ref().map(|s| s.to_string()),
            timestamp: *properties.timestamp(),
        }
    }
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
        let r = parse(r#"{"commandId":"c8","botSessionId":"s","aId":"a","orgId":5}"#).unwrap_err();
        assert_eq!(r.command_id, "c8");
        assert_eq!(r.bot_session_id.as_deref(), Some("s"));
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

    /// Property tests at the edge where deliveries enter: whatever arrives, the parser answers
    /// with a command or a rejection that says why, and never panics.
    mod props {
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        use super::*;

        /// Timestamps at and near their limits, and anything in between.
        fn timestamp() -> impl Strategy<Value = Option<u64>> {
            proptest::option::of(prop_oneof![
                Just(0u64),
                Just(u64::MAX),
                Just(u64::MAX - 1),
                Just(i64::MAX as u64),
                Just((i64::MAX as u64) + 1),
                Just(253_402_300_799u64), // 9999-12-31T23:59:59Z
                any::<u64>(),
            ])
        }

        fn envelope() -> impl Strategy<Value = Envelope> {
            (proptest::option::of(".{0,80}"), timestamp()).prop_map(|(message_id, timestamp)| {
                Envelope {
                    message_id,
                    timestamp,
                }
            })
        }

        /// Any JSON value, nested a little.
        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,40}".prop_map(Value::from),
                Just(Value::from("")),
                Just(Value::from("QUEUE")),
                Just(Value::from("AGENT")),
                Just(Value::from("9999-12-31T23:59:59.999999999Z")),
                Just(Value::from("0000-01-01T00:00:00Z")),
                Just(Value::from("2026-02-30T00:00:00+23:59")),
            ];
            leaf.prop_recursive(2, 12, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    proptest::collection::btree_map(".{0,8}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Objects made of the command's own fields (and a stray one), each with any value:
        /// close enough to a command to reach every branch of the parser.
        fn command_like() -> impl Strategy<Value = Value> {
            const KEYS: [&str; 10] = [
                "commandId",
                "streamId",
                "orgId",
                "botSessionId",
                "aId",
                "transferredType",
                "queueId",
                "callbackUrl",
                "expiresAt",
                "stray",
            ];
            proptest::collection::vec((proptest::sample::select(&KEYS[..]), json()), 0..10)
                .prop_map(|pairs| {
                    let mut map = Map::new();
                    for (k, v) in pairs {
                        map.insert(k.to_owned(), v);
                    }
                    Value::Object(map)
                })
        }

        fn check(result: &Result<Command, Box<Rejection>>) -> Result<(), TestCaseError> {
            match result {
                Ok(c) => {
                    prop_assert!(!c.command_id.is_empty());
                    prop_assert!(!c.org_id.trim().is_empty());
                    prop_assert!(!c.bot_session_id.trim().is_empty());
                    match &c.target {
                        Target::Agent(id) | Target::Queue(id) => {
                            prop_assert!(!id.trim().is_empty())
                        }
                    }
                }
                Err(r) => {
                    prop_assert!(!r.command_id.is_empty());
                    prop_assert!(!r.message.is_empty());
                    // Quoted input is cut, so a message fits an event and a header.
                    prop_assert!(r.message.len() < 1024, "{} bytes", r.message.len());
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn any_bytes_with_any_envelope(
                body in proptest::collection::vec(any::<u8>(), 0..512),
                env in envelope(),
            ) {
                check(&parser().parse(&body, &env))?;
            }

            #[test]
            fn any_command_like_object_with_any_envelope(v in command_like(), env in envelope()) {
                let body = serde_json::to_vec(&v).unwrap();
                let result = parser().parse(&body, &env);
                check(&result)?;
                // A valid command's deadline is the earlier of the two, each computed without
                // overflow.
                if let (Ok(c), Some(ts)) = (&result, env.timestamp) {
                    let by_age = SystemTime::UNIX_EPOCH
                        .checked_add(Duration::from_secs(ts))
                        .and_then(|t| t.checked_add(Duration::from_secs(300)));
                    if let (Some(by_age), Some(deadline)) = (by_age, c.deadline) {
                        prop_assert!(deadline <= by_age);
                    }
                }
            }

            #[test]
            fn every_envelope_of_a_valid_command_parses(env in envelope()) {
                let body = br#"{"orgId":"o","botSessionId":"s","aId":"a"}"#;
                let c = parser().parse(body, &env).unwrap();
                if let Some(id) = env.message_id.as_deref().filter(|id| !id.is_empty()) {
                    prop_assert_eq!(&c.command_id, id);
                }
            }
        }

        /// Found while writing the properties above, kept as plain regressions.
        #[test]
        fn regressions() {
            let p = parser();
            let body = br#"{"orgId":"o","botSessionId":"s","aId":"a"}"#;
            for ts in [u64::MAX, (i64::MAX as u64) + 1] {
                let c = p
                    .parse(
                        body,
                        &Envelope {
                            message_id: None,
                            timestamp: Some(ts),
                        },
                    )
                    .unwrap();
                assert_eq!(c.deadline, None, "a timestamp at {ts} is no deadline");
            }
            let huge = format!(
                r#"{{"orgId":"o","botSessionId":"s","aId":"a","streamId":"{}"}}"#,
                "x".repeat(40_000)
            );
            let r = p.parse(huge.as_bytes(), &Envelope::default()).unwrap_err();
            assert!(r.message.len() < 200, "{}", r.message);
            assert!(r.message.contains("40000 bytes"), "{}", r.message);
        }
    }
}
