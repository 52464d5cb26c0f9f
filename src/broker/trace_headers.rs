//! The W3C trace context on AMQP messages: read from a delivery's headers at the edge, and
//! written into what is published for a command ([`crate::ops::trace_context`] knows the
//! context; this knows how AMQP carries it).

use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::ops::trace_context::{CommandTrace, HeaderValue, Incoming};

/// What a delivery's headers say about its trace.
pub fn incoming(headers: Option<&FieldTable>) -> Incoming {
    let Some(headers) = headers.map(FieldTable::inner) else {
        return Incoming::default();
    };
    Incoming::from_headers(|name| headers.get(name).map(value))
}

/// Adds the command's trace headers to `headers`, replacing any.
pub fn insert(trace: &CommandTrace, headers: &mut FieldTable) {
    for (name, text) in trace.headers() {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(text)));
    }
}

/// A header's value: text in any of the forms AMQP has for it.
fn value(value: &AMQPValue) -> HeaderValue<'_> {
    match value {
        AMQPValue::LongString(s) => HeaderValue::Text(s.as_bytes()),
        AMQPValue::ShortString(s) => HeaderValue::Text(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => HeaderValue::Text(b.as_slice()),
        _ => HeaderValue::Other,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::ops::trace_context::{TRACEPARENT, TRACESTATE, TraceParent};

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in pairs {
            table.insert((*k).into(), v.clone());
        }
        table
    }

    /// Text in each of AMQP's forms is read; a number is not text; what is written reads
    /// back.
    #[test]
    fn each_text_form_reads_and_what_is_written_reads_back() {
        let forms = [
            AMQPValue::LongString(LongString::from(VALID)),
            AMQPValue::ShortString(VALID.into()),
            AMQPValue::ByteArray(VALID.as_bytes().to_vec().into()),
        ];
        for form in forms {
            let read = incoming(Some(&table(&[(TRACEPARENT, form.clone())])));
            assert_eq!(
                read.parent,
                TraceParent::parse(VALID.as_bytes()).ok(),
                "{form:?}"
            );
        }
        let number = table(&[(TRACEPARENT, AMQPValue::LongLongInt(7))]);
        assert_eq!(incoming(Some(&number)), Incoming::default());
        assert_eq!(incoming(None), Incoming::default());

        let parent = TraceParent::parse(VALID.as_bytes()).unwrap();
        let trace = CommandTrace::new(parent.trace_id, [7; 8], 1, Some("k=v".into()));
        let mut headers = FieldTable::default();
        insert(&trace, &mut headers);
        let back = incoming(Some(&headers));
        assert_eq!(back.parent.map(|p| p.trace_id), Some(parent.trace_id));
        assert_eq!(back.state.as_deref(), Some("k=v"));
        assert!(headers.inner().contains_key(TRACESTATE));
    }

    proptest! {
        /// Any header values never fail the read of a command.
        #[test]
        fn any_header_values_are_read(parent in proptest::collection::vec(any::<u8>(), 0..80),
                                      state in proptest::collection::vec(any::<u8>(), 0..600)) {
            let h = table(&[
                (TRACEPARENT, AMQPValue::ByteArray(parent.clone().into())),
                (TRACESTATE, AMQPValue::LongString(LongString::from(state.clone()))),
            ]);
            let read = incoming(Some(&h));
            prop_assert_eq!(read.parent, TraceParent::parse(&parent).ok());
        }
    }
}
