//! A terminal event as the fleet records it in Redis, and back: `{"k": event name, "i":
//! eventId, "e": why (or null), "b": the event's JSON}`. The body is kept verbatim, so a
//! replica that answers from the record publishes the very same event.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::contract::event::{Event, EventKind};

#[derive(Serialize)]
struct Out<'a> {
    k: &'static str,
    i: uuid::Uuid,
    e: Option<&'a str>,
    b: &'a RawValue,
}

#[derive(Deserialize)]
struct In<'a> {
    k: &'a str,
    i: uuid::Uuid,
    e: Option<String>,
    #[serde(borrow)]
    b: &'a RawValue,
}

/// The record of `event`.
pub fn encode(event: &Event) -> Vec<u8> {
    // An event's body is JSON by construction.
    let body: &RawValue = serde_json::from_slice(&event.body).expect("an event body is JSON");
    serde_json::to_vec(&Out {
        k: event.kind.name(),
        i: event.id,
        e: event.error.as_deref(),
        b: body,
    })
    .expect("a record serializes")
}

/// The event recorded for `command_id`, if the record reads back.
pub fn decode(command_id: &str, record: &[u8]) -> Option<Event> {
    let record: In<'_> = serde_json::from_slice(record).ok()?;
    Some(Event {
        kind: EventKind::from_name(record.k)?,
        id: record.i,
        command_id: command_id.to_owned(),
        body: record.b.get().as_bytes().into(),
        error: record.e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Rejection;

    #[test]
    fn a_recorded_event_reads_back_the_same() {
        let rejection = Rejection {
            command_id: "c-1".into(),
            stream_id: None,
            bot_session_id: Some("s".into()),
            target: None,
            message: "missing required field orgId".into(),
        };
        let event = Event::rejected(&rejection, Some("m-1"));
        let back = decode("c-1", &encode(&event)).unwrap();
        assert_eq!(back.kind, event.kind);
        assert_eq!(back.id, event.id);
        assert_eq!(back.body, event.body);
        assert_eq!(back.error, event.error);
        assert_eq!(back.command_id, "c-1");
        assert!(decode("c-1", b"not a record").is_none());
    }
}
