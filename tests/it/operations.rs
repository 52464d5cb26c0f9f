//! Operations (CONTRACT §6): health, readiness, metrics, and shutdown on SIGTERM.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::Value;
use transfer_worker::broker::topology;
use transfer_worker::config::Settings;
use transfer_worker::tools::simulator::{self, Reply, Simulator, SimulatorConfig};

use crate::harness::{
    Cleanup, Harness, agent_command, passive, queue_command, test_channel, test_settings,
};
use crate::init_logs;
use crate::proxy::Proxy;

/// `GET http://{addr}{path}`: status, content type and body.
async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String, String) {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("the admin listener answers");
    let status = response.status();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

/// The samples of a text exposition, by series as printed (`name{labels}`).
pub fn series(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("sample: {l}"));
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("sample value: {l}"));
            (key.to_owned(), value)
        })
        .collect()
}

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

async fn wait_for(what: &str, limit: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let until = Instant::now() + limit;
    while !ok().await {
        assert!(Instant::now() < until, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_broker_connection_while_healthz_stays_up() {
    init_logs();
    let proxy = Proxy::start().await;
    let url = proxy.amqp_url();
    let h = Harness::start(|s, _| s.amqp.url = url).await;
    let admin = h.admin_addr;
    assert_eq!(get(admin, "/healthz").await.0, StatusCode::OK);
    assert_eq!(get(admin, "/readyz").await.0, StatusCode::OK);

    proxy.cut();
    wait_for(
        "/readyz 503 after the cut",
        Duration::from_secs(5),
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

/// A config file with the default bot, unthrottled.
fn config_file(settings: &Settings) -> tempfile::NamedTempFile {
    let bot = &settings.bots[0];
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        file,
        "[[bots]]\nstream_id = {}\naccount_id = {}\nclient_id = {}\nclient_secret = {}\n\
         rate_limit = 100000\nrate_window = \"1s\"\n",
        toml_string(&bot.stream_id),
        toml_string(&bot.account_id),
        toml_string(&bot.client_id),
        toml_string(bot.client_secret.as_ref().unwrap().expose_secret()),
    )
    .unwrap();
    file.flush().unwrap();
    file
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Publishes `burst.commands` commands to a `transfer-worker run` child, signals it, waits
/// for it to exit 0, and collects what became of every command.
async fn sigterm_during(burst: Burst) -> Outcome {
    init_logs();
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
        bots: simulator::bots_from_settings(&settings),
        latency: burst.latency,
        callbacks: false,
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator starts");
    let (_conn, channel) = test_channel().await;
    topology::declare(&channel, amqp).await.expect("topology");
    let events = crate::harness::events_queue(&channel, &amqp.results_exchange).await;

    let config = config_file(&settings);
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_transfer-worker"))
        .arg("run")
        .arg("--config")
        .arg(config.path())
        .env_remove("TRANSFER_CONFIG")
        .envs(crate::harness::worker_env(amqp, &sim.base_url()))
        .env("TRANSFER__AMQP__PREFETCH", burst.prefetch.to_string())
        .env("TRANSFER__SHUTDOWN__GRACE", burst.grace)
        .env("TRANSFER__LOG__LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let read_log = || std::fs::read_to_string(log.path()).unwrap_or_default();

    crate::harness::wait_consumed(&amqp.commands_queue, &mut child, &read_log).await;

    // Published back to back, confirmed together.
    let mut confirms = Vec::with_capacity(burst.commands);
    for i in 0..burst.commands {
        let body = serde_json::to_vec(&burst_command(i, burst.sessions)).unwrap();
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    amqp.commands_queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }
    match burst.signal {
        Signal::After(wait) => tokio::time::sleep(wait).await,
        Signal::Delivered { ready, then } => {
            let until = Instant::now() + Duration::from_secs(10);
            while passive(&channel, &amqp.commands_queue)
                .await
                .message_count()
                > ready
            {
                assert!(Instant::now() < until, "commands not delivered in time");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(then).await;
        }
    }

    // Signal only while a call is on the wire, so the test knows it cut something.
    let until = Instant::now() + Duration::from_secs(10);
    let before_signal = loop {
        let now = Instant::now();
        if sim.in_flight() > 0 {
            break now;
        }
        assert!(
            Instant::now() < until,
            "no call on the wire to signal during"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let signalled = Instant::now();
    crate::harness::sigterm(&child);
    let after_signal = Instant::now();
    let status = match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(status) => status.unwrap(),
        Err(_) => panic!("no exit within 30 s of SIGTERM:\n{}", read_log()),
    };
    let stopping = signalled.elapsed();
    assert!(
        status.success(),
        "exit status {status} after SIGTERM:\n{}",
        read_log()
    );

    // Every event the worker published is already in our queue: it exited.
    let mut terminal = HashMap::new();
    while let Some(m) = channel
        .basic_get(events.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let v: Value = serde_json::from_slice(&m.delivery.data).unwrap();
        let name = v["event"].as_str().unwrap().to_owned();
        assert_ne!(name, "transfer.callback");
        terminal.insert(v["commandId"].as_str().unwrap().to_owned(), name);
    }
    // Unacked commands are back once the broker has closed the worker's channels.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let waiting = passive(&channel, &amqp.commands_queue)
            .await
            .message_count() as usize;
        if terminal.len() + waiting >= burst.commands || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A single-active-consumer queue refuses basic.get: read it with a consumer of our own
    // until it has nothing more to give.
    let mut remaining = Vec::new();
    for delivery in crate::harness::take_all(&channel, &amqp.commands_queue).await {
        let v: Value = serde_json::from_slice(&delivery.data).unwrap();
        remaining.push((
            v["commandId"].as_str().unwrap().to_owned(),
            delivery.redelivered,
        ));
    }
    // A call cut off at exit is in the log from its arrival; wait for its answer all the same.
    let until = Instant::now() + Duration::from_secs(15);
    while sim.in_flight() > 0 {
        assert!(Instant::now() < until, "the simulator never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let requests = sim.requests();
    let cut_off = requests
        .iter()
        .filter(|r| {
            r.received_at < before_signal && r.answered_at.is_some_and(|a| a > after_signal)
        })
        .count();
    let api_calls = requests
        .iter()
        .map(|r| {
            let agent = r.body["aId"].as_str().expect("an agent transfer");
            agent.trim_start_matches("a-").to_owned()
        })
        .collect();
    sim.shutdown().await;
    Outcome {
        terminal,
        remaining,
        api_calls,
        cut_off,
        stopping,
        log: read_log(),
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
