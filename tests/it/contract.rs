//! Contract sections pinned here: the topology the worker declares itself (§1), the AMQP
//! properties and dead-letter copies of failed, rejected and expired commands (§3), a broker
//! nack and the delivery limit, bots sharing an account's budget, the prefetch bound (§4), and
//! the configuration layers (§7).

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ExchangeKind};
use serde_json::json;
use transfer_worker::config::Settings;
use transfer_worker::tools::simulator::{self, Reply};

use crate::harness::admin::series;
use crate::harness::{
    Cleanup, Harness, agent_command, publish_confirmed, sim, test_channel, wait_for,
};

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

fn header<'a>(p: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref().and_then(|h| h.inner().get(key))
}

fn header_text(p: &BasicProperties, key: &str) -> String {
    match header(p, key) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {key}: {other:?}"),
    }
}

/// Queue arguments, as declared.
type Args<'a> = Vec<(&'a str, AMQPValue)>;

fn table(args: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in args {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// Declares queue `name` on a fresh channel: the broker accepts it only when it is equivalent to
/// the queue that exists (a 406 otherwise, which closes that channel).
async fn declare_queue(
    conn: &Connection,
    name: &str,
    args: &[(&str, AMQPValue)],
    durable: bool,
    passive: bool,
) -> Result<(), String> {
    let ch = conn.create_channel().await.unwrap();
    let options = QueueDeclareOptions {
        durable,
        passive,
        ..Default::default()
    };
    let declared = tokio::time::timeout(
        Duration::from_secs(5),
        ch.queue_declare(name.into(), options, table(args)),
    )
    .await
    .expect("queue.declare in time");
    let _ = ch.close(200, "checked".into()).await;
    declared.map(drop).map_err(|e| e.to_string())
}

/// The commands queue as declared, allowing `x-single-active-consumer=true` beside `args`
/// (it arrives with the fleet, and this test says nothing about it either way).
async fn declare_commands(
    conn: &Connection,
    name: &str,
    args: &[(&str, AMQPValue)],
    durable: bool,
) -> Result<(), String> {
    let plain = declare_queue(conn, name, args, durable, false).await;
    if plain.is_ok() {
        return plain;
    }
    let mut with_sac = args.to_vec();
    with_sac.push(("x-single-active-consumer", AMQPValue::Boolean(true)));
    declare_queue(conn, name, &with_sac, durable, false)
        .await
        .map_err(|e| format!("{} / {e}", plain.unwrap_err()))
}

async fn declare_exchange(
    conn: &Connection,
    name: &str,
    kind: ExchangeKind,
    durable: bool,
    passive: bool,
) -> Result<(), String> {
    let ch = conn.create_channel().await.unwrap();
    let options = ExchangeDeclareOptions {
        durable,
        passive,
        ..Default::default()
    };
    let declared = tokio::time::timeout(
        Duration::from_secs(5),
        ch.exchange_declare(name.into(), kind, options, FieldTable::default()),
    )
    .await
    .expect("exchange.declare in time");
    let _ = ch.close(200, "checked".into()).await;
    declared.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_declares_the_topology_of_section_1_itself() {
    let limit = 3;
    let mut h = Harness::start_undeclared(|s, _| s.amqp.delivery_limit = limit).await;
    let amqp = h.settings.amqp.clone();
    let (conn, channel) = test_channel().await;

    // Everything exists, declared by the worker alone (nothing was declared before it ran).
    for queue in [&amqp.commands_queue, &amqp.dead_letter_queue] {
        declare_queue(&conn, queue, &[], false, true)
            .await
            .unwrap_or_else(|e| panic!("{queue} not declared: {e}"));
    }
    for exchange in [&amqp.results_exchange, &amqp.dead_letter_exchange] {
        declare_exchange(&conn, exchange, ExchangeKind::Topic, false, true)
            .await
            .unwrap_or_else(|e| panic!("{exchange} not declared: {e}"));
    }

    // The commands queue: durable quorum, dead-lettering to the dead-letter exchange, with the
    // configured delivery limit. The broker accepts a declaration only if it is equivalent.
    let commands = [
        ("x-queue-type", text("quorum")),
        ("x-dead-letter-exchange", text(&amqp.dead_letter_exchange)),
        ("x-delivery-limit", AMQPValue::LongInt(limit as i32)),
    ];
    declare_commands(&conn, &amqp.commands_queue, &commands, true)
        .await
        .expect("the commands queue is a durable quorum queue with the contract's arguments");
    // The same check refuses anything else, so its success above means something.
    let variants: [(&str, Args, bool); 5] = [
        (
            "classic",
            vec![commands[1].clone(), commands[2].clone()],
            true,
        ),
        (
            "no dead-letter exchange",
            vec![commands[0].clone(), commands[2].clone()],
            true,
        ),
        (
            "another dead-letter exchange",
            vec![
                commands[0].clone(),
                ("x-dead-letter-exchange", text("elsewhere")),
                commands[2].clone(),
            ],
            true,
        ),
        (
            "another delivery limit",
            vec![
                commands[0].clone(),
                commands[1].clone(),
                ("x-delivery-limit", AMQPValue::LongInt(limit as i32 + 1)),
            ],
            true,
        ),
        ("not durable", commands.to_vec(), false),
    ];
    for (case, args, durable) in &variants {
        assert!(
            declare_commands(&conn, &amqp.commands_queue, args, *durable)
                .await
                .is_err(),
            "the commands queue is not {case}"
        );
    }

    // The dead-letter queue: durable quorum.
    let quorum = [("x-queue-type", text("quorum"))];
    declare_queue(&conn, &amqp.dead_letter_queue, &quorum, true, false)
        .await
        .expect("the dead-letter queue is a durable quorum queue");
    assert!(
        declare_queue(
            &conn,
            &amqp.dead_letter_queue,
            &[("x-queue-type", text("classic"))],
            true,
            false
        )
        .await
        .is_err()
    );

    // The exchanges: results topic, dead-letter fanout, both durable.
    let kinds = [
        (
            &amqp.results_exchange,
            ExchangeKind::Topic,
            ExchangeKind::Fanout,
        ),
        (
            &amqp.dead_letter_exchange,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
        ),
    ];
    for (name, kind, other) in kinds {
        declare_exchange(&conn, name, kind.clone(), true, false)
            .await
            .unwrap_or_else(|e| panic!("{name} is a durable {kind:?} exchange: {e}"));
        assert!(
            declare_exchange(&conn, name, other.clone(), true, false)
                .await
                .is_err(),
            "{name} is not {other:?}"
        );
        assert!(
            declare_exchange(&conn, name, kind.clone(), false, false)
                .await
                .is_err(),
            "{name} is durable"
        );
    }

    // The dead-letter queue is bound to the dead-letter exchange, whatever the routing key.
    let bound = [(b"bound?", BasicProperties::default())];
    publish_confirmed(&channel, &amqp.dead_letter_exchange, "any.key", bound).await;
    assert_eq!(h.next_dead_letter().await.data, b"bound?");
    h.stop_leaving_nothing().await;
}

/// Declares a queue bound to the results exchange that refuses every message, so the broker
/// nacks every event the worker publishes.
async fn block_results(h: &Harness) -> (String, Cleanup) {
    let blocker = format!("{}.blocker", h.settings.amqp.commands_queue);
    let cleanup = Cleanup::new(vec![blocker.clone()], vec![]);
    let args = [
        ("x-max-length", AMQPValue::LongInt(0)),
        ("x-overflow", text("reject-publish")),
    ];
    h.channel
        .queue_declare(
            blocker.as_str().into(),
            QueueDeclareOptions::default(),
            table(&args),
        )
        .await
        .unwrap();
    h.channel
        .queue_bind(
            blocker.as_str().into(),
            h.settings.amqp.results_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (blocker, cleanup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_outcome_is_never_confirmed_is_dead_lettered_after_the_delivery_limit() {
    let limit = 3;
    let mut h = Harness::start_undeclared(|s, _| s.amqp.delivery_limit = limit).await;
    let (_blocker, _cleanup) = block_results(&h).await;
    let body = serde_json::to_vec(&agent_command("poison", "s-poison")).unwrap();
    h.publish_raw(
        &body,
        BasicProperties::default().with_message_id("m-poison".into()),
    )
    .await;
    // Every event is nacked, so the worker returns the command each time; the broker counts
    // the returns and, past the limit, dead-letters the command itself.
    let dead = h.next_dead_letter().await;
    assert_eq!(dead.data, body, "the command as published");
    assert!(
        header(&dead.properties, "x-transfer-event").is_none(),
        "dead-lettered by the broker, not copied by the worker"
    );
    let Some(AMQPValue::FieldArray(deaths)) = header(&dead.properties, "x-death") else {
        panic!("no x-death: {:?}", dead.properties.headers());
    };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
        panic!("x-death: {deaths:?}");
    };
    assert_eq!(
        death.inner().get("reason"),
        Some(&text("delivery_limit")),
        "{death:?}"
    );
    assert_eq!(
        death.inner().get("queue"),
        Some(&text(&h.settings.amqp.commands_queue))
    );
    // The first delivery called the API; every return after it was answered from memory.
    assert_eq!(h.sim.requests().len(), 1, "the API was called once");
    let deliveries = h.metrics.commands_received.get();
    assert_eq!(
        deliveries,
        u64::from(limit) + 1,
        "the first delivery and {limit} returns"
    );
    assert_eq!(h.metrics.commands_requeued.get(), deliveries);
    assert_eq!(h.metrics.commands_deduplicated.get(), u64::from(limit));
    h.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_nack_returns_the_command_which_ends_once_its_event_is_confirmed() {
    let h = Harness::start(|s, _| s.amqp.delivery_limit = 1_000_000).await;
    let (blocker, _cleanup) = block_results(&h).await;
    h.publish(&agent_command("nacked", "s-nacked")).await;
    let back = async || h.metrics.commands_requeued.get() >= 2;
    wait_for(
        "the command back",
        Duration::from_secs(10),
        String::new,
        back,
    )
    .await;
    // Not acked: the command comes back, again and again, while the broker refuses its event.
    assert!(h.metrics.commands_received.get() >= 2);
    h.channel
        .queue_delete(blocker.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // Once the event is confirmed the command ends, answered from memory.
    let confirmed = || {
        series(&h.metrics.encode())
            .get(r#"transfer_events_published_total{event="transfer.succeeded"}"#)
            .copied()
            .unwrap_or(0.0)
    };
    let limit = Duration::from_secs(10);
    wait_for("the event confirmed", limit, String::new, async || {
        confirmed() >= 1.0
    })
    .await;
    assert_eq!(h.sim.requests().len(), 1, "the API was called once");
    assert!(h.metrics.commands_deduplicated.get() >= 1);
    h.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_that_does_not_come_in_time_returns_the_command_which_ends_from_memory() {
    let (proxy, mut h) = Harness::start_behind_proxy(|s, sim| {
        s.amqp.confirm_timeout = Duration::from_millis(500);
        sim.latency = Duration::from_millis(500);
    })
    .await;
    h.publish(&agent_command("unconfirmed", "s-unconfirmed"))
        .await;
    sim::call_on_the_wire(&h.sim).await;
    // The broker will get the event, but its confirm is held back past the timeout.
    proxy.stall();
    let returned = async || h.metrics.commands_requeued.get() > 0;
    let what = "the unconfirmed command returned";
    wait_for(what, Duration::from_secs(10), String::new, returned).await;
    assert!(
        h.broker.is_ready(),
        "a late confirm is not a lost connection"
    );
    proxy.resume();
    // The event went out once before the timeout and once more from memory: one eventId.
    let first = h.next_event().await;
    let second = h.next_event().await;
    assert_eq!(first.command_id(), "unconfirmed");
    assert_eq!(second.command_id(), "unconfirmed");
    assert_eq!(first.json["eventId"], second.json["eventId"]);
    assert_eq!(h.sim.requests().len(), 1, "the API was called once");
    assert_eq!(h.metrics.commands_deduplicated.get(), 1);
    assert_eq!(h.metrics.commands_requeued.get(), 1);
    h.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rejected_and_expired_events_carry_the_contracts_properties_and_dead_letters() {
    let mut h = Harness::start(|_, _| {}).await;
    h.sim.script([Reply::Status(400)]);
    let mut expired = agent_command("props-expired", "s-props-expired");
    expired["expiresAt"] = json!("2020-01-01T00:00:00Z");
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "transfer.failed",
            serde_json::to_vec(&agent_command("props-failed", "s-props-failed")).unwrap(),
            "props-failed",
        ),
        (
            "transfer.rejected",
            br#"{"commandId":"props-rejected","botSessionId":"s-props-rejected","aId":"a-1"}"#
                .to_vec(),
            "props-rejected",
        ),
        (
            "transfer.expired",
            serde_json::to_vec(&expired).unwrap(),
            "props-expired",
        ),
    ];
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (name, body, id) in &cases {
        let mut headers = FieldTable::default();
        headers.insert("x-upstream".into(), text(&format!("from-{id}")));
        let sent = BasicProperties::default()
            .with_message_id(format!("msg-{id}").into())
            .with_correlation_id(format!("corr-{id}").into())
            .with_app_id("upstream-app".into())
            .with_content_type("application/json".into())
            .with_priority(3)
            .with_timestamp(now)
            .with_headers(headers);
        h.publish_raw(body, sent).await;

        let e = h.next_event().await;
        assert_eq!(e.routing_key, *name);
        assert_eq!(e.name(), *name);
        assert_eq!(e.command_id(), *id);
        let event_id = e.json["eventId"].as_str().unwrap();
        e.assert_properties();
        assert!(
            e.properties.timestamp().unwrap().abs_diff(now) < 60,
            "{name}"
        );

        // The dead-letter copy: the command as received, body and properties, plus why.
        let dead = h.next_dead_letter().await;
        assert_eq!(&dead.data, body, "{name}: the body as received");
        let d = &dead.properties;
        assert_eq!(header_text(d, "x-transfer-event"), *name);
        assert_eq!(header_text(d, "x-transfer-event-id"), event_id);
        assert!(!header_text(d, "x-transfer-error").is_empty());
        assert_eq!(header_text(d, "x-upstream"), format!("from-{id}"));
        assert_eq!(
            d.message_id().as_ref().map(|s| s.as_str()),
            Some(format!("msg-{id}").as_str())
        );
        assert_eq!(
            d.correlation_id().as_ref().map(|s| s.as_str()),
            Some(format!("corr-{id}").as_str())
        );
        assert_eq!(
            d.app_id().as_ref().map(|s| s.as_str()),
            Some("upstream-app")
        );
        assert_eq!(*d.priority(), Some(3));
        assert_eq!(*d.timestamp(), Some(now));
    }
    h.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bots_sharing_an_account_share_its_budget() {
    let limit = 3;
    let window = Duration::from_secs(1);
    let mut second_stream = String::new();
    let mut h = Harness::start(|s, sim| {
        s.bots[0].rate_limit = limit;
        s.bots[0].rate_window = window;
        let mut second = s.bots[0].clone();
        second.stream_id = "st-00000000-0000-4000-8000-0000000000b2".into();
        second.client_id = "cs-00000000-0000-4000-8000-0000000000b2".into();
        second_stream = second.stream_id.clone();
        s.bots.push(second);
        sim.bots = simulator::bots_from_settings(s);
    })
    .await;
    let first_stream = h.settings.bots[0].stream_id.clone();
    assert_eq!(h.settings.bots[0].account_id, h.settings.bots[1].account_id);
    // Either bot alone stays within the limit (5 calls at 3 a window); together they would not.
    for i in 0..10 {
        let mut c = agent_command(&format!("shared-{i}"), &format!("s-shared-{i}"));
        c["streamId"] = json!(if i % 2 == 0 {
            &first_stream
        } else {
            &second_stream
        });
        h.publish(&c).await;
    }
    let events = h.events(10).await;
    assert!(
        events.iter().all(|e| e.name() == "transfer.succeeded"),
        "{:?}",
        events.iter().map(|e| &e.json).collect::<Vec<_>>()
    );
    let requests = h.sim.requests();
    let mut per_stream: HashMap<&str, usize> = HashMap::new();
    for r in &requests {
        *per_stream.entry(r.stream_id.as_str()).or_default() += 1;
    }
    assert_eq!(per_stream.len(), 2, "both bots called: {per_stream:?}");
    let mut times: Vec<Instant> = requests.iter().map(|r| r.received_at).collect();
    times.sort();
    assert_eq!(times.len(), 10);
    // Slack for the scheduling delay between a call's start and its arrival, as in the pacing
    // test of transfers.rs.
    let narrowed = window - Duration::from_millis(150);
    for (i, t) in times.iter().enumerate() {
        let within = times[i..].iter().filter(|u| **u - *t < narrowed).count();
        assert!(
            within <= limit as usize,
            "{within} calls of one account within {narrowed:?} from call {i}"
        );
    }
    h.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_calls_are_in_flight_than_the_prefetch() {
    let prefetch = 4;
    let mut h = Harness::start(|s, sim| {
        s.amqp.prefetch = prefetch;
        sim.latency = Duration::from_millis(200);
    })
    .await;
    let n = 24;
    for i in 0..n {
        h.publish(&agent_command(&format!("pf-{i}"), &format!("s-pf-{i}")))
            .await;
    }
    let events = h.events(n).await;
    assert!(events.iter().all(|e| e.name() == "transfer.succeeded"));
    let most = h.sim.max_in_flight();
    assert!(
        most <= usize::from(prefetch),
        "{most} calls in flight at once with prefetch {prefetch}"
    );
    // Sessions did run concurrently, so the bound above was tested, not idle.
    assert!(most >= 2, "at most {most} call in flight");
    assert_eq!(h.sim.requests().len(), n);
    h.stop_leaving_nothing().await;
}

#[test]
fn environment_overrides_file_values() {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        file,
        "[amqp]\nprefetch = 7\ncommands_queue = \"from-file\"\n\n[retry]\nmax_attempts = 3\n"
    )
    .unwrap();
    file.flush().unwrap();
    let from_file = Settings::load_with_env(Some(file.path()), Some(HashMap::new())).unwrap();
    assert_eq!(from_file.amqp.prefetch, 7, "the file over the defaults");
    assert_eq!(from_file.amqp.commands_queue, "from-file");
    let env = HashMap::from([
        ("TRANSFER__AMQP__PREFETCH".to_owned(), "9".to_owned()),
        ("TRANSFER__RETRY__INITIAL_DELAY".to_owned(), "1s".to_owned()),
    ]);
    let both = Settings::load_with_env(Some(file.path()), Some(env)).unwrap();
    assert_eq!(both.amqp.prefetch, 9, "the environment over the file");
    assert_eq!(both.retry.initial_delay, Duration::from_secs(1));
    // What the environment does not name keeps the file's value.
    assert_eq!(both.amqp.commands_queue, "from-file");
    assert_eq!(both.retry.max_attempts, 3);
}

#[test]
fn a_bot_secret_can_come_from_a_file() {
    let mut secret = tempfile::NamedTempFile::new().unwrap();
    writeln!(secret, "from-a-file-0123456789").unwrap();
    secret.flush().unwrap();
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        file,
        "[[bots]]\nstream_id = \"st-file\"\naccount_id = \"acc\"\nclient_id = \"cs-file\"\n\
         client_secret_file = {}\n",
        toml::Value::String(secret.path().display().to_string())
    )
    .unwrap();
    file.flush().unwrap();
    let s = Settings::load_with_env(Some(file.path()), Some(HashMap::new())).unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(
        s.bots[0].client_secret.as_ref().unwrap().expose_secret(),
        "from-a-file-0123456789",
        "read from the file, trailing newline trimmed"
    );
}
