//! Operations (CONTRACT §6): health, readiness, metrics, and shutdown on SIGTERM.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use reqwest::StatusCode;
use serde_json::Value;
use transfer_worker::tools::simulator::Reply;

use crate::harness::admin::{get, series};
use crate::harness::{
    Fleet, FleetSpec, Harness, agent_command, passive, queue_command, sim, take_all, wait_for,
};

/// Every label value of a series key.
fn label_values(key: &str) -> Vec<&str> {
    let Some((_, labels)) = key.split_once('{') else {
        return Vec::new();
    };
    labels
        .trim_end_matches('}')
        .split("\",")
        .filter_map(|pair| pair.split_once("=\""))
        .map(|(_, v)| v.trim_end_matches('"'))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_broker_connection_while_healthz_stays_up() {
    let (proxy, h) = Harness::start_behind_proxy(|_, _| {}).await;
    let admin = h.admin_addr;
    assert_eq!(get(admin, "/healthz").await.0, StatusCode::OK);
    assert_eq!(get(admin, "/readyz").await.0, StatusCode::OK);

    proxy.cut();
    wait_for(
        "/readyz 503 after the cut",
        Duration::from_secs(5),
        String::new,
        async || {
            assert_eq!(get(admin, "/healthz").await.0, StatusCode::OK);
            get(admin, "/readyz").await.0 == StatusCode::SERVICE_UNAVAILABLE
        },
    )
    .await;
    // It stays down while the broker is away, and the process stays alive.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            get(admin, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get(admin, "/healthz").await.0, StatusCode::OK);
    }

    // Only the worker's link was cut: the broker itself, seen directly, stayed up.
    assert!(h.conn.status().connected());
    proxy.restore();
    wait_for(
        "/readyz 200 after the restore",
        Duration::from_secs(5),
        String::new,
        async || {
            assert_eq!(get(admin, "/healthz").await.0, StatusCode::OK);
            get(admin, "/readyz").await.0 == StatusCode::OK
        },
    )
    .await;
    assert!(h.metrics.broker_reconnects.get() >= 1);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_commands_sent() {
    let mut h = Harness::start(|_, _| {}).await;
    let account = h.settings.bots[0].account_id.clone();
    // Scripted replies go to valid requests in arrival order: the refused one goes alone first.
    h.sim.script([Reply::Status(400)]);
    h.publish(&queue_command("metrics-refused", "sess-metrics-refused"))
        .await;
    assert_eq!(h.next_event().await.name(), "transfer.failed");
    for i in 0..5 {
        h.publish(&agent_command(
            &format!("metrics-ok-{i}"),
            &format!("sess-metrics-ok-{i}"),
        ))
        .await;
    }
    // No orgId: rejected, the API never called.
    h.publish_raw(
        br#"{"commandId":"metrics-bad","botSessionId":"sess-metrics-bad","aId":"a-1"}"#,
        BasicProperties::default(),
    )
    .await;
    let mut names: Vec<String> = h
        .events(6)
        .await
        .iter()
        .map(|e| e.name().to_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "transfer.rejected",
            "transfer.succeeded",
            "transfer.succeeded",
            "transfer.succeeded",
            "transfer.succeeded",
            "transfer.succeeded"
        ]
    );

    let expected: BTreeMap<String, f64> = [
        ("transfer_commands_received_total".to_owned(), 7.0),
        (
            r#"transfer_events_published_total{event="transfer.succeeded"}"#.to_owned(),
            5.0,
        ),
        (
            r#"transfer_events_published_total{event="transfer.failed"}"#.to_owned(),
            1.0,
        ),
        (
            r#"transfer_events_published_total{event="transfer.rejected"}"#.to_owned(),
            1.0,
        ),
        (
            r#"transfer_events_published_total{event="transfer.expired"}"#.to_owned(),
            0.0,
        ),
        (
            r#"transfer_events_published_total{event="transfer.callback"}"#.to_owned(),
            0.0,
        ),
        (
            format!(r#"transfer_api_calls_total{{status="2xx",account="{account}"}}"#),
            5.0,
        ),
        (
            format!(r#"transfer_api_calls_total{{status="4xx",account="{account}"}}"#),
            1.0,
        ),
        (
            format!(r#"transfer_api_call_duration_seconds_count{{account="{account}"}}"#),
            6.0,
        ),
        (
            format!(
                r#"transfer_api_call_duration_seconds_bucket{{le="+Inf",account="{account}"}}"#
            ),
            6.0,
        ),
        ("transfer_commands_in_flight".to_owned(), 0.0),
        ("transfer_commands_deduplicated_total".to_owned(), 0.0),
        ("transfer_commands_requeued_total".to_owned(), 0.0),
        ("transfer_broker_reconnects_total".to_owned(), 0.0),
    ]
    .into_iter()
    .collect();
    // The last event can reach us a moment before its counters move and its command is acked.
    let until = Instant::now() + Duration::from_secs(5);
    let (content_type, text) = loop {
        let (status, content_type, text) = get(h.admin_addr, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        let got = series(&text);
        if expected.iter().all(|(k, v)| got.get(k) == Some(v)) || Instant::now() > until {
            break (content_type, text);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let got = series(&text);
    for (key, value) in &expected {
        assert_eq!(got.get(key), Some(value), "{key} in\n{text}");
    }
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    // No other status class, no retries.
    let calls: Vec<&String> = got
        .keys()
        .filter(|k| k.starts_with("transfer_api_calls_total"))
        .collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        got.iter()
            .filter(|(k, _)| k.starts_with("transfer_api_retries_total"))
            .all(|(_, v)| *v == 0.0)
    );
    assert!(
        got[&format!(r#"transfer_api_call_duration_seconds_sum{{account="{account}"}}"#)] > 0.0
    );
    // Labels stay bounded: no session or command id in any of them.
    for key in got.keys() {
        for value in label_values(key) {
            assert!(
                !value.contains("sess-metrics") && !value.contains("metrics-"),
                "unbounded label value {value:?} in {key}"
            );
        }
    }
    assert!(!text.contains("sess-metrics"), "{text}");
    // The library's own view agrees with the endpoint.
    assert_eq!(h.metrics.commands_received.get(), 7);
    h.stop().await.unwrap();
}

// ----------------------------------------------------------------------------------------
// SIGTERM against the real binary.

/// When the test sends SIGTERM.
#[derive(Clone, Copy)]
enum Signal {
    /// This long after the last command was confirmed.
    After(Duration),
    /// This long after at most `ready` commands are left waiting for delivery.
    Delivered { ready: u32, then: Duration },
}

struct Burst {
    commands: usize,
    sessions: usize,
    latency: Duration,
    prefetch: u16,
    grace: &'static str,
    signal: Signal,
}

/// What the run left behind.
struct Outcome {
    /// Terminal events by commandId.
    terminal: HashMap<String, String>,
    /// Command ids still in the commands queue, with their redelivered flag.
    remaining: Vec<(String, bool)>,
    /// The command of every request the API took (each command has its own agent), read once
    /// the simulator had answered all of them.
    api_calls: Vec<String>,
    /// Requests that arrived before SIGTERM and were answered after it.
    cut_off: usize,
    /// SIGTERM to exit.
    stopping: Duration,
    log: String,
}

fn command_id(i: usize) -> String {
    format!("term-{i:04}")
}

fn session_of(i: usize, sessions: usize) -> String {
    format!("0123456789abcdef{:08}", i % sessions)
}

/// Command `i` of a burst, with its own agent so the API's log names the command.
fn burst_command(i: usize, sessions: usize) -> Value {
    let mut c = agent_command(&command_id(i), &session_of(i, sessions));
    c["aId"] = format!("a-{}", command_id(i)).into();
    c
}

/// Publishes `burst.commands` commands to one `transfer-worker run` replica, signals it, waits
/// for it to exit 0, and collects what became of every command.
async fn sigterm_during(burst: Burst) -> Outcome {
    let mut fleet = Fleet::start(FleetSpec {
        replicas: 1,
        latency: burst.latency,
        prefetch: burst.prefetch,
        env: vec![("TRANSFER__SHUTDOWN__GRACE".into(), burst.grace.into())],
        ..FleetSpec::default()
    })
    .await;
    let queue = fleet.settings.amqp.commands_queue.clone();
    let commands: Vec<Value> = (0..burst.commands)
        .map(|i| burst_command(i, burst.sessions))
        .collect();
    fleet.publish_all(&commands).await;
    match burst.signal {
        Signal::After(wait) => tokio::time::sleep(wait).await,
        Signal::Delivered { ready, then } => {
            let until = Instant::now() + Duration::from_secs(10);
            while passive(&fleet.channel, &queue).await.message_count() > ready {
                assert!(Instant::now() < until, "commands not delivered in time");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(then).await;
        }
    }

    // Signal only while a call is on the wire, so the test knows it cut something.
    let before_signal = sim::call_on_the_wire(&fleet.sim).await;
    let worker = &mut fleet.replicas[0];
    let signalled = Instant::now();
    worker.sigterm();
    let after_signal = Instant::now();
    let status = worker.exit_status(Duration::from_secs(30)).await;
    let stopping = signalled.elapsed();
    let log = worker.log();
    assert!(
        status.success(),
        "exit status {status} after SIGTERM:\n{log}"
    );

    // Every event the worker published is on its way to us: it exited.
    let mut terminal = HashMap::new();
    for e in fleet.events.drain(Duration::from_secs(1)).await {
        assert_ne!(e.name(), "transfer.callback");
        terminal.insert(e.command_id().to_owned(), e.name().to_owned());
    }
    // Unacked commands are back once the broker has closed the worker's channels.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let waiting = passive(&fleet.channel, &queue).await.message_count() as usize;
        if terminal.len() + waiting >= burst.commands || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A single-active-consumer queue refuses basic.get: read it with a consumer of our own
    // until it has nothing more to give.
    let mut remaining = Vec::new();
    for delivery in take_all(&fleet.channel, &queue).await {
        let v: Value = serde_json::from_slice(&delivery.data).unwrap();
        remaining.push((
            v["commandId"].as_str().unwrap().to_owned(),
            delivery.redelivered,
        ));
    }
    // A call cut off at exit is in the log from its arrival; wait for its answer all the same.
    sim::all_answered(&fleet.sim, Duration::from_secs(15)).await;
    let requests = fleet.sim.requests();
    let cut_off = sim::straddling(&requests, before_signal, after_signal);
    let api_calls = requests
        .iter()
        .map(|r| {
            let agent = r.body["aId"].as_str().expect("an agent transfer");
            agent.trim_start_matches("a-").to_owned()
        })
        .collect();
    Outcome {
        terminal,
        remaining,
        api_calls,
        cut_off,
        stopping,
        log,
    }
}

/// Every command has a terminal event or is back in the queue, and not both; work was in flight
/// at the signal; and every API call is accounted for: calls = terminal events + calls in doubt
/// (a command called but back in the queue, which the next worker would call again), with none
/// in doubt, since a call on the wire is seen through to its event.
fn assert_nothing_lost_nor_doubled(o: &Outcome, commands: usize) {
    assert!(o.cut_off >= 1, "no call was on the wire at SIGTERM");
    let mut called: HashSet<&str> = HashSet::new();
    for id in &o.api_calls {
        assert!(
            called.insert(id),
            "{id} was sent to the API twice\n{}",
            o.log
        );
    }
    let in_doubt: Vec<&str> = called
        .iter()
        .copied()
        .filter(|id| !o.terminal.contains_key(*id))
        .collect();
    let uncalled_ends = o
        .terminal
        .keys()
        .filter(|id| !called.contains(id.as_str()))
        .count();
    assert_eq!(uncalled_ends, 0, "terminal events without an API call");
    assert_eq!(
        o.api_calls.len(),
        o.terminal.len() + in_doubt.len(),
        "API calls = terminal events + calls in doubt"
    );
    assert!(
        in_doubt.is_empty(),
        "{} API calls without a terminal event, their commands back in the queue: {in_doubt:?}\n{}",
        in_doubt.len(),
        o.log
    );
    let waiting: HashSet<&str> = o.remaining.iter().map(|(id, _)| id.as_str()).collect();
    let missing: Vec<String> = (0..commands)
        .map(command_id)
        .filter(|id| !o.terminal.contains_key(id) && !waiting.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {commands} commands lost ({} ended, {} in the queue): {missing:?}\n{}",
        missing.len(),
        o.terminal.len(),
        o.remaining.len(),
        o.log
    );
    assert!(
        o.terminal.values().all(|e| e == "transfer.succeeded"),
        "{:?}",
        o.terminal
    );
    // A command is acked once its terminal event is confirmed: one that ended is not also back
    // in the queue, to be sent to the API again by the next worker.
    let both: Vec<&str> = o
        .remaining
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| o.terminal.contains_key(*id))
        .collect();
    assert!(
        both.is_empty(),
        "{} of {commands} commands ended and were returned to the queue all the same: \
         {both:?}\n{}",
        both.len(),
        o.log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_exits_0_and_loses_no_command() {
    let n = 300;
    let o = sigterm_during(Burst {
        commands: n,
        sessions: n,
        latency: Duration::from_millis(100),
        prefetch: 32,
        grace: "10s",
        // 300 commands at 32 × 100 ms take about a second: this is mid-burst.
        signal: Signal::After(Duration::from_millis(300)),
    })
    .await;
    assert_nothing_lost_nor_doubled(&o, n);
    assert!(
        !o.terminal.is_empty() && !o.remaining.is_empty(),
        "signalled mid-burst: {} ended, {} left",
        o.terminal.len(),
        o.remaining.len()
    );
    assert!(o.terminal.len() + o.remaining.len() >= n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_short_grace_returns_unfinished_commands_to_the_queue() {
    let n = 100;
    let o = sigterm_during(Burst {
        commands: n,
        sessions: 10,
        latency: Duration::from_secs(2),
        prefetch: 50,
        grace: "200ms",
        // Fifty taken: ten calls under way, forty waiting behind them in their sessions.
        signal: Signal::Delivered {
            ready: 50,
            then: Duration::from_millis(200),
        },
    })
    .await;
    assert_nothing_lost_nor_doubled(&o, n);
    let returned = o.remaining.iter().filter(|(_, again)| *again).count();
    assert!(
        returned >= 1,
        "commands taken but unfinished went back to the queue ({} ended, {} left, none \
         redelivered)\n{}",
        o.terminal.len(),
        o.remaining.len(),
        o.log
    );
    eprintln!(
        "short grace: exited {:?} after SIGTERM; {} ended, {} back in the queue ({returned} \
         returned)",
        o.stopping,
        o.terminal.len(),
        o.remaining.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_commands_waiting_behind_their_session_within_the_grace() {
    let n = 40;
    let o = sigterm_during(Burst {
        commands: n,
        sessions: 10,
        latency: Duration::from_millis(100),
        prefetch: 64,
        grace: "10s",
        // Every command taken: ten calls under way, thirty waiting behind them (0.4 s of
        // work in all, well within the grace).
        signal: Signal::Delivered {
            ready: 0,
            then: Duration::from_millis(20),
        },
    })
    .await;
    assert_nothing_lost_nor_doubled(&o, n);
    assert!(
        o.remaining.is_empty(),
        "{} commands in flight were returned instead of finished within the grace \
         ({} ended): {:?}\n{}",
        o.remaining.len(),
        o.terminal.len(),
        o.remaining,
        o.log
    );
    assert_eq!(o.terminal.len(), n);
    assert_eq!(o.api_calls.len(), n, "one call per command");
}
