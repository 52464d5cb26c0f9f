//! Events: what the worker says happened (docs/contract.md §3). Each is serialized once, when it is
//! decided, and kept as bytes so a redelivered command republishes the very same event.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use uuid::Uuid;

use sha2::{Digest, Sha256};

use crate::contract::{Command, Rejection, Target};

/// The event names, which are also the routing keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The API answered 2xx.
    Succeeded,
    /// A permanent error, or the retry budget ran out.
    Failed,
    /// The command was invalid; the API was never called.
    Rejected,
    /// The deadline passed first.
    Expired,
    /// AgentAssist posted to the relay URL.
    Callback,
}

impl EventKind {
    /// The event name and routing key.
    pub fn name(self) -> &'static str {
        match self {
            Self::Succeeded => "transfer.succeeded",
            Self::Failed => "transfer.failed",
            Self::Rejected => "transfer.rejected",
            Self::Expired => "transfer.expired",
            Self::Callback => "transfer.callback",
        }
    }

    /// The kind named `name`, as [`EventKind::name`] spells it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// Whether the command ended without success, so a copy goes to the dead-letter exchange.
    pub fn is_dead_letter(self) -> bool {
        matches!(self, Self::Failed | Self::Rejected | Self::Expired)
    }

    /// Every kind, for metrics.
    pub const ALL: [EventKind; 5] = [
        Self::Succeeded,
        Self::Failed,
        Self::Rejected,
        Self::Expired,
        Self::Callback,
    ];
}

/// A decided, serialized event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Which event.
    pub kind: EventKind,
    /// Its id (`message_id`); consumers dedupe by it.
    pub id: Uuid,
    /// The command it is about (`correlation_id`).
    pub command_id: String,
    /// The JSON body, exactly sized: events are kept in the outcome cache.
    pub body: Box<[u8]>,
    /// Why the command ended without success (`x-transfer-error`), for dead letters.
    pub error: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Wire<'a, D: Serialize> {
    event: &'static str,
    event_id: Uuid,
    command_id: &'a str,
    stream_id: Option<&'a str>,
    bot_session_id: Option<&'a str>,
    target: Option<&'a Target>,
    occurred_at: String,
    attempts: u32,
    #[serde(flatten)]
    detail: D,
}

/// Ids every event carries.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// Command id.
    pub command_id: &'a str,
    /// Bot id.
    pub stream_id: Option<&'a str>,
    /// Session id.
    pub bot_session_id: Option<&'a str>,
    /// Target.
    pub target: Option<&'a Target>,
}

impl<'a> From<&'a Command> for Subject<'a> {
    fn from(c: &'a Command) -> Self {
        Self {
            command_id: &c.command_id,
            stream_id: Some(&c.stream_id),
            bot_session_id: Some(&c.bot_session_id),
            target: Some(&c.target),
        }
    }
}

impl<'a> From<&'a Rejection> for Subject<'a> {
    fn from(r: &'a Rejection) -> Self {
        Self {
            command_id: &r.command_id,
            stream_id: r.stream_id.as_deref(),
            bot_session_id: r.bot_session_id.as_deref(),
            target: r.target.as_ref(),
        }
    }
}

/// RFC 3339, UTC, milliseconds: `2026-11-25T10:00:00.123Z`. Total: an instant outside years
/// 0000–9999 (a deadline from a timestamp at the end of time, say) is shown at that range's
/// end.
pub fn rfc3339_ms(at: SystemTime) -> String {
    let t = match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => time::Duration::try_from(after)
            .ok()
            .and_then(|d| OffsetDateTime::UNIX_EPOCH.checked_add(d))
            .unwrap_or(LATEST),
        Err(before) => time::Duration::try_from(before.duration())
            .ok()
            .and_then(|d| OffsetDateTime::UNIX_EPOCH.checked_sub(d))
            .unwrap_or(EARLIEST),
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

const LATEST: OffsetDateTime = time::macros::datetime!(9999-12-31 23:59:59.999 UTC);
const EARLIEST: OffsetDateTime = time::macros::datetime!(0000-01-01 00:00:00 UTC);

/// The `eventId` of a callback: a UUID v5 in the namespace
/// `UUIDv5(NAMESPACE_URL, "urn:transfer-worker:callback")`, named `{token}:{sha256 hex of body}`.
/// The same callback posted twice gets the same id, so consumers dedupe it like any event.
pub fn callback_event_id(token: &str, body: &[u8]) -> Uuid {
    let namespace = Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:transfer-worker:callback");
    let digest = Sha256::digest(body);
    let mut name = String::with_capacity(token.len() + 1 + 64);
    name.push_str(token);
    name.push(':');
    for byte in digest {
        name.push_str(&format!("{byte:02x}"));
    }
    Uuid::new_v5(&namespace, name.as_bytes())
}

/// An event with this id; every event but a callback gets a fresh one (`Uuid::new_v4`).
fn build<D: Serialize>(
    id: Uuid,
    kind: EventKind,
    subject: Subject<'_>,
    attempts: u32,
    detail: D,
    error: Option<String>,
) -> Event {
    let wire = Wire {
        event: kind.name(),
        event_id: id,
        command_id: subject.command_id,
        stream_id: subject.stream_id,
        bot_session_id: subject.bot_session_id,
        target: subject.target,
        occurred_at: rfc3339_ms(SystemTime::now()),
        attempts,
        detail,
    };
    Event {
        kind,
        id,
        command_id: subject.command_id.to_owned(),
        body: serde_json::to_vec(&wire)
            .expect("events serialize")
            .into_boxed_slice(),
        error,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Succeeded<'a> {
    response: &'a RawValue,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    response_truncated: bool,
    duration_ms: u64,
}

#[derive(Serialize)]
struct Failed<'a> {
    error: ErrorDetail<'a>,
    retryable: bool,
}

/// The `error` of a `transfer.failed` event: the event's own wire shape, whatever the HTTP
/// client's error type looks like.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ErrorDetail<'a> {
    /// `http_status`, `timeout`, `connection`, `request`, or `internal` for a fault inside
    /// the worker.
    pub kind: &'static str,
    /// The HTTP status, if one came back.
    pub status: Option<u16>,
    /// For people.
    pub message: &'a str,
    /// The response body (JSON, or a string), if any.
    pub body: Option<&'a Value>,
}

#[derive(Serialize)]
struct InvalidCommand<'a> {
    kind: &'static str,
    message: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Rejected<'a> {
    error: InvalidCommand<'a>,
    message_id: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Expired {
    expires_at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Callback<'a> {
    received_at: String,
    content_type: Option<&'a str>,
    payload: &'a Value,
}

impl Event {
    /// `transfer.succeeded`: `response` is the body as received (JSON, or a JSON string of
    /// it), `truncated` says it was cut.
    pub fn succeeded(
        command: &Command,
        attempts: u32,
        response: &RawValue,
        truncated: bool,
        duration_ms: u64,
    ) -> Self {
        let detail = Succeeded {
            response,
            response_truncated: truncated,
            duration_ms,
        };
        build(
            Uuid::new_v4(),
            EventKind::Succeeded,
            command.into(),
            attempts,
            detail,
            None,
        )
    }

    /// `transfer.failed`.
    pub fn failed(
        command: &Command,
        attempts: u32,
        error: ErrorDetail<'_>,
        retryable: bool,
    ) -> Self {
        let why = error.message.to_owned();
        let detail = Failed { error, retryable };
        build(
            Uuid::new_v4(),
            EventKind::Failed,
            command.into(),
            attempts,
            detail,
            Some(why),
        )
    }

    /// `transfer.failed` for a fault inside the worker (a panic): `error.kind` is
    /// `internal`, not retryable, and `attempts` is 0 because the count was lost with the fault.
    pub fn internal_failure(subject: Subject<'_>, message: &str) -> Self {
        let error = ErrorDetail {
            kind: "internal",
            status: None,
            message,
            body: None,
        };
        let detail = Failed {
            error,
            retryable: false,
        };
        let why = message.to_owned();
        build(
            Uuid::new_v4(),
            EventKind::Failed,
            subject,
            0,
            detail,
            Some(why),
        )
    }

    /// `transfer.rejected`.
    pub fn rejected(rejection: &Rejection, message_id: Option<&str>) -> Self {
        let detail = Rejected {
            error: InvalidCommand {
                kind: "invalid_command",
                message: &rejection.message,
            },
            message_id,
        };
        let why = rejection.message.clone();
        build(
            Uuid::new_v4(),
            EventKind::Rejected,
            rejection.into(),
            0,
            detail,
            Some(why),
        )
    }

    /// `transfer.expired`.
    pub fn expired(command: &Command, attempts: u32, deadline: SystemTime) -> Self {
        let expires_at = rfc3339_ms(deadline);
        let why = format!("deadline {expires_at} passed before the transfer could be made");
        let detail = Expired { expires_at };
        build(
            Uuid::new_v4(),
            EventKind::Expired,
            command.into(),
            attempts,
            detail,
            Some(why),
        )
    }

    /// `transfer.callback`, its id derived from the relay token and the body
    /// ([`callback_event_id`]).
    pub fn callback(
        subject: Subject<'_>,
        id: Uuid,
        received_at: SystemTime,
        content_type: Option<&str>,
        payload: &Value,
    ) -> Self {
        let detail = Callback {
            received_at: rfc3339_ms(received_at),
            content_type,
            payload,
        };
        build(id, EventKind::Callback, subject, 0, detail, None)
    }
}

#[cfg(test)]
mod tests;
