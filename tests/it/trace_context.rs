//! Trace context (CONTRACT §11): a command's W3C `traceparent` is continued by the worker's
//! span, and carried on its API call, its events and its dead-letter copy; with
//! `telemetry.otlp_endpoint` set, that span is exported over OTLP.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use transfer_worker::broker::topology;
use transfer_worker::tools::simulator::{RecordedRequest, Reply, Simulator, SimulatorConfig};

use crate::cli::binary;
use crate::harness::{
    Cleanup, Harness, Received, agent_command, amqp_url, events_queue, queue_command, sigterm,
    test_channel, test_settings, wait_consumed, worker_env,
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

async fn publish(channel: &Channel, queue: &str, body: &[u8], properties: BasicProperties) {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap();
    confirm.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_otlp_endpoint_the_command_s_span_is_exported_in_its_trace() {
    let settings = test_settings();
    let amqp = &settings.amqp;
    let _cleanup = Cleanup::new(
        vec![amqp.commands_queue.clone(), amqp.dead_letter_queue.clone()],
        vec![
            amqp.results_exchange.clone(),
            amqp.dead_letter_exchange.clone(),
        ],
    );
    let sim = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        bots: transfer_worker::tools::simulator::bots_from_settings(&settings),
        callbacks: false,
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator starts");
    let spans: Spans = Arc::default();
    let collector = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let collector_addr = collector.local_addr().unwrap();
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(spans.clone());
    let server = tokio::spawn(async move { axum::serve(collector, app).await });

    let (_conn, channel) = test_channel().await;
    let mut direct = amqp.clone();
    direct.url = amqp_url();
    topology::declare(&channel, &direct)
        .await
        .expect("topology");
    let events = events_queue(&channel, &amqp.results_exchange).await;
    let mut consumer = channel
        .basic_consume(
            events.as_str().into(),
            "trace-events".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    let log = tempfile::NamedTempFile::new().unwrap();
    let mut worker = binary()
        .arg("run")
        .envs(worker_env(amqp, &sim.base_url()))
        .env(
            "TRANSFER__TELEMETRY__OTLP_ENDPOINT",
            format!("http://{collector_addr}"),
        )
        .env("TRANSFER__LOG__FORMAT", "json")
        .env("TRANSFER__LOG__LEVEL", "info,transfer_worker=debug")
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("the worker starts");
    let read_log = || std::fs::read_to_string(log.path()).unwrap_or_default();
    wait_consumed(&amqp.commands_queue, &mut worker, &read_log).await;

    let body = serde_json::to_vec(&agent_command("exported", "s-exported")).unwrap();
    publish(
        &channel,
        &amqp.commands_queue,
        &body,
        traced(INCOMING, None),
    )
    .await;
    let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("an event in time")
        .expect("consumer open")
        .expect("delivery");
    assert_eq!(delivery.routing_key.as_str(), "transfer.succeeded");
    let sent = header(&delivery.properties, "traceparent").expect("traceparent");
    let (trace, parent, _) = parts(&sent);
    assert_eq!(trace, TRACE_ID);

    // Shutdown exports what is still buffered.
    sigterm(&worker);
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker exits in time")
        .unwrap();
    assert!(status.success(), "{status}\n{}", read_log());

    let spans = spans.lock().unwrap().clone();
    let command = spans
        .iter()
        .find(|(_, _, _, name)| name == "command")
        .unwrap_or_else(|| panic!("no command span exported: {spans:?}\n{}", read_log()));
    assert_eq!(command.0, unhex(TRACE_ID), "exported in the incoming trace");
    assert_eq!(command.2, unhex(PARENT_ID), "under the caller's span");
    assert_eq!(
        command.1,
        unhex(&parent),
        "the exported span is the one the event names as its parent"
    );
    assert_eq!(
        sim.requests()[0].traceparent.as_deref(),
        Some(sent.as_str())
    );
    // The command's log lines carry its trace id.
    let logs = read_log();
    assert!(
        logs.lines()
            .any(|l| l.contains("\"command_id\":\"exported\"")
                && l.contains(&format!("\"trace_id\":\"{TRACE_ID}\""))),
        "{logs}"
    );
    server.abort();
    sim.shutdown().await;
}
