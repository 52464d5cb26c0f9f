use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn reads_the_example_of_the_w3c_text() {
    let p = TraceParent::parse(VALID.as_bytes()).unwrap();
    assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&p.parent_id), "00f067aa0ba902b7");
    assert_eq!(p.flags, 1);
    assert_eq!(p.to_string(), VALID);
}

#[test]
fn refuses_what_the_w3c_text_refuses() {
    let bad = [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        // Taken by opentelemetry_sdk's propagator, not by the W3C text.
        " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-1-2-01",
    ];
    for header in bad {
        assert!(TraceParent::parse(header.as_bytes()).is_err(), "{header:?}");
    }
}

#[test]
fn reads_the_first_four_fields_of_a_later_version() {
    let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
    let p = TraceParent::parse(later.as_bytes()).unwrap();
    assert_eq!(p.to_string(), VALID);
    let exact = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    assert!(TraceParent::parse(exact.as_bytes()).is_ok());
}

/// Reads the headers `pairs`, text each.
fn read(pairs: &[(&str, &[u8])]) -> Incoming {
    let headers: HashMap<&str, &[u8]> = pairs.iter().copied().collect();
    Incoming::from_headers(|name| headers.get(name).map(|v| HeaderValue::Text(v)))
}

fn text(s: &str) -> &[u8] {
    s.as_bytes()
}

#[test]
fn headers_give_the_parent_and_its_state() {
    let incoming = read(&[
        (TRACEPARENT, text(VALID)),
        (TRACESTATE, text("congo=t61rcWkgMzE")),
    ]);
    assert_eq!(incoming.parent, TraceParent::parse(VALID.as_bytes()).ok());
    assert_eq!(incoming.state.as_deref(), Some("congo=t61rcWkgMzE"));

    // No valid parent: the state means nothing either.
    let junk = read(&[
        (TRACEPARENT, text("junk")),
        (TRACESTATE, text("congo=t61rcWkgMzE")),
    ]);
    assert_eq!(junk, Incoming::default());
    assert_eq!(read(&[]), Incoming::default());
    // A value that is not text is no traceparent.
    let other = Incoming::from_headers(|name| (name == TRACEPARENT).then_some(HeaderValue::Other));
    assert_eq!(other, Incoming::default());

    // Carried on as received, byte for byte, even when it is no list a parser would re-encode.
    let incoming = read(&[
        (TRACEPARENT, text(VALID)),
        (TRACESTATE, text("a=1, b=2,,Bad Key=3")),
    ]);
    assert_eq!(incoming.state.as_deref(), Some("a=1, b=2,,Bad Key=3"));

    let long = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE);
    let incoming = read(&[(TRACEPARENT, text(VALID)), (TRACESTATE, text(&long))]);
    assert!(incoming.parent.is_some());
    assert_eq!(incoming.state, None);
}

#[test]
fn without_a_layer_the_worker_makes_its_own_span() {
    let parent = TraceParent::parse(VALID.as_bytes()).unwrap();
    let incoming = Incoming {
        parent: Some(parent),
        state: Some("k=v".into()),
    };
    let trace = CommandTrace::start(
        &tracing::Span::none(),
        &incoming,
        CommandTrace::preset(&incoming),
    );
    assert_eq!(trace.trace_id, parent.trace_id);
    assert_ne!(trace.span_id, parent.parent_id);
    assert_ne!(trace.span_id, [0; 8]);
    let out = TraceParent::parse(trace.traceparent().as_bytes()).unwrap();
    assert_eq!(out.trace_id, parent.trace_id);
    assert_eq!(out.parent_id, trace.span_id);
    assert_eq!(out.flags, 1);

    let fresh = CommandTrace::start(&tracing::Span::none(), &Incoming::default(), None);
    let other = CommandTrace::start(&tracing::Span::none(), &Incoming::default(), None);
    assert_ne!(fresh.trace_id, other.trace_id);
    assert_ne!(fresh.trace_id, [0; 16]);
    assert_eq!(fresh.trace_id_hex().len(), 32);
}

/// A well-formed header with any ids and flags.
fn well_formed() -> impl Strategy<Value = (u8, [u8; 16], [u8; 8], u8, String)> {
    (
        0u8..0xff,
        any::<[u8; 16]>(),
        any::<[u8; 8]>(),
        any::<u8>(),
        "(-[ -~]{0,20})?",
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes: the parser answers, and what it accepts has the version 00 shape once
    /// written back (no zero ids, and the same ids).
    #[test]
    fn any_bytes_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(p) = TraceParent::parse(&bytes) {
            prop_assert_ne!(p.trace_id, [0; 16]);
            prop_assert_ne!(p.parent_id, [0; 8]);
            let again = TraceParent::parse(p.to_string().as_bytes());
            prop_assert_eq!(again, Ok(p));
            let written = p.to_string();
            prop_assert_eq!(&bytes[3..35], &written.as_bytes()[3..35]);
        }
    }

    /// Every well-formed header is read exactly as written; a later version's extra fields
    /// are skipped; version 00 takes none.
    #[test]
    fn well_formed_headers_are_read((version, trace, parent, flags, tail) in well_formed()) {
        let header = format!("{version:02x}-{}-{}-{flags:02x}{tail}", hex(&trace), hex(&parent));
        let result = TraceParent::parse(header.as_bytes());
        let zero = trace == [0; 16] || parent == [0; 8];
        if zero || (version == 0 && !tail.is_empty()) {
            prop_assert!(result.is_err());
        } else {
            prop_assert_eq!(result, Ok(TraceParent { trace_id: trace, parent_id: parent, flags }));
        }
    }

    /// Any header values never fail the read of a command.
    #[test]
    fn any_header_values_are_read(parent in proptest::collection::vec(any::<u8>(), 0..80),
                                  state in proptest::collection::vec(any::<u8>(), 0..600)) {
        let incoming = read(&[(TRACEPARENT, &parent), (TRACESTATE, &state)]);
        prop_assert_eq!(incoming.parent, TraceParent::parse(&parent).ok());
        if let Some(s) = incoming.state {
            prop_assert!(s.len() <= MAX_TRACESTATE);
            prop_assert_eq!(s.as_bytes(), &state[..]);
        }
    }
}
