//! What one dead letter says, read from its body and properties alone: the command's id (the
//! key the worker dedupes by), why it ended, and how old it is. Two kinds arrive: the
//! worker's copies of failed, rejected and expired commands (headers `x-transfer-event`,
//! `x-transfer-error`), and poison messages the broker dead-lettered past the commands queue's
//! delivery limit (header `x-death`).

use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use crate::pipeline::parser::body_hash;

/// Where a dead letter's id comes from: the worker's own rule (docs/contract.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// The body's `commandId`.
    CommandId,
    /// The AMQP `message_id`: the body is JSON without a `commandId`.
    MessageId,
    /// The AMQP `message_id`: the body is not a JSON object.
    MessageIdNotJson,
    /// A hash of the body: no `commandId`, no `message_id`.
    BodyHash,
    /// A hash of the body, which is not a JSON object, and no `message_id`.
    BodyHashNotJson,
}

impl IdSource {
    /// A note for the listing, when the id is not a `commandId`.
    pub fn note(self) -> Option<&'static str> {
        match self {
            Self::CommandId => None,
            Self::MessageId => Some("no commandId; message_id"),
            Self::MessageIdNotJson => Some("not JSON; message_id"),
            Self::BodyHash => Some("no commandId; body hash"),
            Self::BodyHashNotJson => Some("not JSON; body hash"),
        }
    }
}

/// One message of the dead-letter queue, described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Letter {
    /// The id the worker gave the command, in its events: what `replay --command-id` takes.
    pub command_id: String,
    /// Where [`Letter::command_id`] comes from.
    pub id_source: IdSource,
    /// The terminal event (`transfer.failed`, …), `poison` past the delivery limit, or the
    /// broker's dead-letter reason.
    pub event: String,
    /// Why, as the worker or the broker put it; empty if neither said.
    pub error: String,
    /// Since the command's AMQP `timestamp`, else since the broker dead-lettered it.
    pub age: Option<Duration>,
}

impl Letter {
    /// Reads a dead letter as of `now`. Never fails: whatever a message carries, it is listed.
    pub fn read(body: &[u8], properties: &BasicProperties, now: SystemTime) -> Self {
        let (command_id, id_source) = command_key(body, properties);
        let headers = properties.headers().as_ref();
        let death = headers.and_then(first_death);
        let event = match (headers.and_then(|h| text(h, "x-transfer-event")), &death) {
            (Some(event), _) => event,
            (None, Some(death)) if death.reason.as_deref() == Some("delivery_limit") => {
                "poison".to_owned()
            }
            (None, Some(death)) => death
                .reason
                .clone()
                .unwrap_or_else(|| "dead-lettered".to_owned()),
            (None, None) => "unknown".to_owned(),
        };
        let error = match (headers.and_then(|h| text(h, "x-transfer-error")), &death) {
            (Some(error), _) => error,
            (None, Some(death)) => death.describe(),
            (None, None) => String::new(),
        };
        let since = properties
            .timestamp()
            .map(|secs| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
            .or_else(|| death.as_ref().map(|d| d.time))
            .flatten();
        Self {
            command_id,
            id_source,
            event,
            error,
            // A time in the future (a clock apart, or a header set by hand) has no age.
            age: since.and_then(|since| now.duration_since(since).ok()),
        }
    }
}

/// The key the worker dedupes a command by: its `commandId`, else its `message_id`, else a
/// hash of its body — the same rule as `pipeline::parser`, so the ids match its events.
fn command_key(body: &[u8], properties: &BasicProperties) -> (String, IdSource) {
    let parsed = serde_json::from_slice::<serde_json::Value>(body).ok();
    let json = parsed.as_ref().is_some_and(serde_json::Value::is_object);
    if let Some(id) = parsed
        .as_ref()
        .and_then(|v| v.get("commandId"))
        .and_then(serde_json::Value::as_str)
        .filter(|id| !id.is_empty())
    {
        return (id.to_owned(), IdSource::CommandId);
    }
    if let Some(id) = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
        .filter(|id| !id.is_empty())
    {
        let source = if json {
            IdSource::MessageId
        } else {
            IdSource::MessageIdNotJson
        };
        return (id.to_owned(), source);
    }
    let source = if json {
        IdSource::BodyHash
    } else {
        IdSource::BodyHashNotJson
    };
    (body_hash(body), source)
}

/// The first (oldest) entry of the broker's `x-death` header.
struct Death {
    reason: Option<String>,
    queue: Option<String>,
    count: Option<i64>,
    time: Option<SystemTime>,
}

impl Death {
    fn describe(&self) -> String {
        let queue = self.queue.as_deref().unwrap_or("its queue");
        let mut text = match self.reason.as_deref() {
            Some("delivery_limit") => format!("redelivered past the delivery limit of {queue}"),
            Some(reason) => format!("dead-lettered by the broker from {queue} ({reason})"),
            None => format!("dead-lettered by the broker from {queue}"),
        };
        if let Some(count) = self.count.filter(|&n| n > 1) {
            text.push_str(&format!(", {count} times"));
        }
        text
    }
}

fn first_death(headers: &FieldTable) -> Option<Death> {
    // The broker keeps the most recent death first; the first one is last.
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(death) = deaths.as_slice().last()? else {
        return None;
    };
    let time = match death.inner().get("time") {
        Some(AMQPValue::Timestamp(secs)) => {
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(*secs))
        }
        _ => None,
    };
    let count = match death.inner().get("count") {
        Some(AMQPValue::LongLongInt(n)) => Some(*n),
        Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
        _ => None,
    };
    Some(Death {
        reason: text(death, "reason"),
        queue: text(death, "queue"),
        count,
        time,
    })
}

/// A header's value as text, if it is a string.
fn text(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A duration as people read an age: its two largest units, e.g. `3m 12s`, `2days 4h`.
pub fn human_age(age: Duration) -> String {
    let whole = Duration::from_secs(age.as_secs());
    let text = humantime::format_duration(whole).to_string();
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use lapin::types::{FieldArray, LongString};

    use super::*;

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes()))
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_worker_copy_names_its_command_event_error_and_age() {
        let mut headers = FieldTable::default();
        headers.insert("x-transfer-event".into(), long("transfer.failed"));
        headers.insert(
            "x-transfer-error".into(),
            long("AgentAssist answered HTTP 400"),
        );
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_timestamp(1_000);
        let letter = Letter::read(br#"{"commandId":"c-1"}"#, &properties, at(1_192));
        assert_eq!(
            letter,
            Letter {
                command_id: "c-1".into(),
                id_source: IdSource::CommandId,
                event: "transfer.failed".into(),
                error: "AgentAssist answered HTTP 400".into(),
                age: Some(Duration::from_secs(192)),
            }
        );
        assert_eq!(human_age(letter.age.unwrap()), "3m 12s");
    }

    #[test]
    fn a_broker_dead_letter_is_poison_aged_from_its_death() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), long("delivery_limit"));
        death.insert("queue".into(), long("transfer.commands"));
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("time".into(), AMQPValue::Timestamp(500));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_message_id("m-1".into());
        let letter = Letter::read(b"\xff not json", &properties, at(560));
        assert_eq!(letter.command_id, "m-1");
        assert_eq!(letter.id_source, IdSource::MessageIdNotJson);
        assert_eq!(letter.event, "poison");
        assert_eq!(
            letter.error,
            "redelivered past the delivery limit of transfer.commands"
        );
        assert_eq!(letter.age, Some(Duration::from_secs(60)));
    }

    #[test]
    fn ids_follow_the_workers_rule_and_odd_times_have_no_age() {
        let body = br#"{"orgId":"o"}"#;
        let letter = Letter::read(
            body,
            &BasicProperties::default().with_timestamp(u64::MAX),
            at(10),
        );
        assert_eq!(letter.command_id, body_hash(body));
        assert_eq!(letter.id_source, IdSource::BodyHash);
        assert_eq!(letter.event, "unknown");
        assert_eq!(letter.age, None, "a timestamp at the end of time");
        let future = Letter::read(body, &BasicProperties::default().with_timestamp(20), at(10));
        assert_eq!(future.age, None);
        let empty_id = Letter::read(
            br#"{"commandId":""}"#,
            &BasicProperties::default().with_message_id("m-2".into()),
            at(0),
        );
        assert_eq!(empty_id.command_id, "m-2");
        assert_eq!(empty_id.id_source, IdSource::MessageId);
    }
}
