//! Trace context (CONTRACT §11): a command's W3C `traceparent` is continued by the worker's
//! span, and carried on its API call, its events and its dead-letter copy; with
//! `telemetry.otlp_endpoint` set, that span is exported over OTLP.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use transfer_worker::tools::simulator::{RecordedRequest, Reply};

use crate::harness::{
    Fleet, FleetSpec, Harness, Received, agent_command, publish_confirmed, queue_command,
};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// `traceparent` split into (trace id, parent id, flags), checked for the version 00 shape.
fn parts(traceparent: &str) -> (String, String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    assert_eq!(fields[0], "00", "{traceparent}");
    assert_eq!(fields[1].len(), 32, "{traceparent}");
    assert_eq!(fields[2].len(), 16, "{traceparent}");
    (
        fields[1].to_owned(),
        fields[2].to_owned(),
        fields[3].to_owned(),
    )
}

fn header(properties: &BasicProperties, key: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => panic!("header {key}: {other:?}"),
    }
}

fn traced(traceparent: &str, tracestate: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
    headers.insert("traceparent".into(), text(traceparent));
    if let Some(state) = tracestate {
        headers.insert("tracestate".into(), text(state));
    }
    BasicProperties::default().with_headers(headers)
}

fn request_of(h: &Harness, session: &str) -> RecordedRequest {
    h.sim
        .requests()
        .into_iter()
        .find(|r| r.bot_session_id.as_deref() == Some(session))
        .unwrap_or_else(|| panic!("no API request for {session}"))
}

fn event_traceparent(e: &Received) -> String {
    header(&e.properties, "traceparent")
        .unwrap_or_else(|| panic!("{} carries no traceparent", e.name()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_s_trace_is_continued_on_its_api_call_events_and_dead_letter() {
    let mut h = Harness::start(|_, _| {}).await;
    let body = serde_json::to_vec(&agent_command("traced-ok", "s-traced-ok")).unwrap();
    h.publish_raw(&body, traced(INCOMING, Some("congo=t61rcWkgMzE")))
        .await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded");
    let (trace, parent, flags) = parts(&event_traceparent(&e));
    assert_eq!(trace, TRACE_ID, "the event continues the command's trace");
    assert_ne!(parent, PARENT_ID, "the event's parent is the worker's span");
    assert_eq!(flags, "01");
    assert_eq!(
        header(&e.properties, "tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );
    let request = request_of(&h, "s-traced-ok");
    let sent = request
        .traceparent
        .expect("the API call carries traceparent");
    assert_eq!(
        parts(&sent),
        (trace, parent, flags),
        "the API call and the event come from the same span"
    );

    // A failed command: its event and its dead-letter copy carry the trace too.
    h.sim.script([Reply::Status(400)]);
    let body = serde_json::to_vec(&queue_command("traced-failed", "s-traced-failed")).unwrap();
    h.publish_raw(&body, traced(INCOMING, None)).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.failed");
    let (trace, parent, _) = parts(&event_traceparent(&e));
    assert_eq!(trace, TRACE_ID);
    assert_ne!(parent, PARENT_ID);
    assert_eq!(header(&e.properties, "tracestate"), None);
    let dead = h.next_dead_letter().await;
    let copied = header(&dead.properties, "traceparent").expect("the copy carries traceparent");
    assert_eq!(parts(&copied), parts(&event_traceparent(&e)));
    let sent = request_of(&h, "s-traced-failed").traceparent.unwrap();
    assert_eq!(parts(&sent).0, TRACE_ID);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_without_a_trace_starts_its_own() {
    let mut h = Harness::start(|_, _| {}).await;
    let mut traces = Vec::new();
    for n in ["untraced-1", "untraced-2"] {
        h.publish(&agent_command(n, &format!("s-{n}"))).await;
        let e = h.next_event().await;
        assert_eq!(e.name(), "transfer.succeeded");
        let (trace, parent, flags) = parts(&event_traceparent(&e));
        assert_ne!(trace, "0".repeat(32));
        assert_eq!(flags, "01");
        let sent = request_of(&h, &format!("s-{n}")).traceparent.unwrap();
        assert_eq!(parts(&sent), (trace.clone(), parent, flags));
        traces.push(trace);
    }
    assert_ne!(traces[0], traces[1], "each command has its own trace");
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_traceparent_is_ignored() {
    let mut h = Harness::start(|_, _| {}).await;
    // Uppercase hex is not W3C's; neither is a trace id of zeros.
    let invalid = [
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    ];
    for (i, traceparent) in invalid.into_iter().enumerate() {
        let session = format!("s-invalid-trace-{i}");
        let body =
            serde_json::to_vec(&agent_command(&format!("invalid-trace-{i}"), &session)).unwrap();
        h.publish_raw(&body, traced(traceparent, Some("congo=t61rcWkgMzE")))
            .await;
        let e = h.next_event().await;
        assert_eq!(e.name(), "transfer.succeeded", "processed as usual");
        let (trace, _, _) = parts(&event_traceparent(&e));
        assert_ne!(trace, TRACE_ID);
        assert_ne!(trace, TRACE_ID.to_uppercase());
        assert_ne!(trace, "0".repeat(32));
        assert_eq!(
            header(&e.properties, "tracestate"),
            None,
            "no tracestate without its traceparent"
        );
        let sent = request_of(&h, &session).traceparent.unwrap();
        assert_eq!(parts(&sent).0, trace);
    }
    h.stop().await.unwrap();
}

/// Spans an in-test OTLP/HTTP collector received: (trace id, span id, parent span id, name).
type Spans = Arc<Mutex<Vec<(Vec<u8>, Vec<u8>, Vec<u8>, String)>>>;

async fn collect(State(spans): State<Spans>, body: Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
    let mut spans = spans.lock().unwrap();
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push((span.trace_id, span.span_id, span.parent_span_id, span.name));
            }
        }
    }
    ""
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_otlp_endpoint_the_command_s_span_is_exported_in_its_trace() {
    let spans: Spans = Arc::default();
    let collector = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let collector_addr = collector.local_addr().unwrap();
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(spans.clone());
    let server = tokio::spawn(async move { axum::serve(collector, app).await });

    let mut fleet = Fleet::start(FleetSpec {
        replicas: 1,
        env: vec![
            (
                "TRANSFER__TELEMETRY__OTLP_ENDPOINT".into(),
                format!("http://{collector_addr}"),
            ),
            ("TRANSFER__LOG__FORMAT".into(), "json".into()),
            (
                "TRANSFER__LOG__LEVEL".into(),
                "info,transfer_worker=debug".into(),
            ),
        ],
        ..FleetSpec::default()
    })
    .await;

    let body = serde_json::to_vec(&agent_command("exported", "s-exported")).unwrap();
    let queue = &fleet.settings.amqp.commands_queue;
    let message = [(body, traced(INCOMING, None))];
    publish_confirmed(&fleet.channel, "", queue, message).await;
    let e = fleet.events.next().await;
    assert_eq!(e.routing_key.as_str(), "transfer.succeeded");
    let sent = header(&e.properties, "traceparent").expect("traceparent");
    let (trace, parent, _) = parts(&sent);
    assert_eq!(trace, TRACE_ID);

    // Shutdown exports what is still buffered.
    let worker = &mut fleet.replicas[0];
    let status = worker.terminate(Duration::from_secs(30)).await;
    let logs = worker.log();
    assert!(status.success(), "{status}\n{logs}");

    let spans = spans.lock().unwrap().clone();
    let command = spans
        .iter()
        .find(|(_, _, _, name)| name == "command")
        .unwrap_or_else(|| panic!("no command span exported: {spans:?}\n{logs}"));
    assert_eq!(command.0, unhex(TRACE_ID), "exported in the incoming trace");
    assert_eq!(command.2, unhex(PARENT_ID), "under the caller's span");
    assert_eq!(
        command.1,
        unhex(&parent),
        "the exported span is the one the event names as its parent"
    );
    assert_eq!(
        fleet.sim.requests()[0].traceparent.as_deref(),
        Some(sent.as_str())
    );
    // The command's log lines carry its trace id.
    assert!(
        logs.lines()
            .any(|l| l.contains("\"command_id\":\"exported\"")
                && l.contains(&format!("\"trace_id\":\"{TRACE_ID}\""))),
        "{logs}"
    );
    server.abort();
}
