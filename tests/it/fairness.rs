//! Fairness between accounts (docs/contract.md §12): one account's backlog never holds
//! another's commands, the backlogged account still gets exactly its budget, and one account
//! whose calls are slow cannot take every slot.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use transfer_worker::config::Settings;
use transfer_worker::tools::simulator::{self, RecordedRequest, SimulatorConfig};

use crate::harness::process::config_file;
use crate::harness::redis::RedisKeys;
use crate::harness::{
    BotSpec, Cleanup, Fleet, FleetSpec, Harness, Received, account_queues_at_broker,
    account_queues_left, agent_command, binary, command_of, left_in, output, publish_confirmed,
    redis_url, session_command, succeeded, test_channel_at, test_settings,
};

/// The quiet account's bot.
const QUIET_STREAM: &str = "st-00000000-0000-4000-8000-0000000000b1";
const NOISY: &str = "acc-noisy";
const QUIET: &str = "acc-quiet";

/// How long a quiet command may take from publish to its event (docs/contract.md §12).
const QUIET_BOUND: Duration = Duration::from_secs(2);

/// Two accounts: the default bot's, paced at `limit` per `window`, and a quiet one with budget
/// to spare; the API answers in 100 ms.
fn two_accounts(s: &mut Settings, sim: &mut SimulatorConfig, limit: u32, window: Duration) {
    s.bots[0].account_id = NOISY.into();
    s.bots[0].rate_limit = limit;
    s.bots[0].rate_window = window;
    let mut quiet = s.bots[0].clone();
    quiet.stream_id = QUIET_STREAM.into();
    quiet.account_id = QUIET.into();
    quiet.rate_limit = 10_000;
    quiet.rate_window = Duration::from_secs(1);
    s.bots.push(quiet);
    sim.bots = simulator::bots_from_settings(s);
    sim.latency = Duration::from_millis(100);
}

/// A worker for [`two_accounts`], with a prefetch of 64 and the noisy account's cap.
async fn two_account_worker(
    base: Settings,
    limit: u32,
    window: Duration,
    cap: Option<u32>,
) -> Harness {
    Harness::start_with(base, |s, sim| {
        two_accounts(s, sim, limit, window);
        s.bots[0].max_in_flight = cap;
        s.amqp.prefetch = 64;
    })
    .await
}

/// Publishes `n` commands of the noisy account (the default bot), `{prefix}-{i}` each in a
/// session of its own.
async fn backlog(h: &Harness, prefix: &str, n: usize) {
    let noisy = &h.settings.bots[0].stream_id;
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        h.publish(&command(noisy, &id, &format!("s-{id}"))).await;
    }
}

fn command(stream: &str, id: &str, session: &str) -> Value {
    let mut c = agent_command(id, session);
    c["streamId"] = json!(stream);
    c
}

/// The calls the simulator saw for `account`, in arrival order.
fn calls_of(requests: &[RecordedRequest], account: &str) -> Vec<RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.account_id.as_deref() == Some(account))
        .cloned()
        .collect()
}

/// Asserts that no `window` holds more than `limit` of `calls` (by arrival), and, while the
/// account had a backlog, that every window held `limit`: call n + limit came no later than
/// `window` plus `slack` after call n.
fn assert_exact_budget(calls: &[RecordedRequest], limit: usize, window: Duration, slack: Duration) {
    assert!(
        calls.len() > limit,
        "too few calls to judge: {}",
        calls.len()
    );
    for pair in calls.windows(limit + 1) {
        let (first, last) = (pair[0].received_at, pair[limit].received_at);
        let apart = last.duration_since(first);
        assert!(
            apart >= window,
            "{} calls within {apart:?}: over the budget of {limit} per {window:?}",
            limit + 1
        );
        assert!(
            apart <= window + slack,
            "calls {} and {} were {apart:?} apart: the account lost budget while it had a backlog",
            pair[0].seq,
            pair[limit].seq
        );
    }
}

/// One worker or a fleet, as these tests drive it.
trait Rig {
    async fn send(&self, command: &Value);
    async fn event(&mut self) -> Received;
}

impl Rig for Harness {
    async fn send(&self, command: &Value) {
        self.publish(command).await;
    }
    async fn event(&mut self) -> Received {
        self.events.next().await
    }
}

impl Rig for Fleet {
    async fn send(&self, command: &Value) {
        self.publish(command).await;
    }
    async fn event(&mut self) -> Received {
        self.events.next().await
    }
}

/// Publishes the quiet account's commands one by one and returns how long each took to its
/// event; events of other accounts arriving meanwhile are collected in `others`.
async fn quiet_latencies(rig: &mut impl Rig, n: usize, others: &mut Vec<String>) -> Vec<Duration> {
    let mut published = HashMap::new();
    for i in 0..n {
        let id = format!("quiet-{i}");
        rig.send(&command(QUIET_STREAM, &id, &format!("s-quiet-{i}")))
            .await;
        published.insert(id, Instant::now());
    }
    let mut took = Vec::new();
    let until = Instant::now() + Duration::from_secs(30);
    while took.len() < n {
        assert!(
            Instant::now() < until,
            "the quiet account's commands did not all end within 30 s: {took:?}"
        );
        let event = rig.event().await;
        if let Some(at) = published.remove(event.command_id()) {
            assert_eq!(event.name(), "transfer.succeeded", "{}", event.json);
            took.push(at.elapsed());
        } else {
            others.push(event.command_id().to_owned());
        }
    }
    took
}

#[tokio::test]
async fn a_backlog_of_one_account_does_not_hold_another() {
    let mut h = two_account_worker(test_settings(), 5, Duration::from_secs(3), None).await;
    backlog(&h, "noisy", 300).await;
    let mut noisy_done = Vec::new();
    let took = quiet_latencies(&mut h, 5, &mut noisy_done).await;
    assert!(
        took.iter().all(|t| *t < QUIET_BOUND),
        "the quiet account waited behind the noisy one's backlog: {took:?}"
    );
    // The noisy account keeps to its pace meanwhile.
    let noisy_calls = calls_of(&h.sim.requests(), NOISY);
    assert!(!noisy_calls.is_empty());
    for pair in noisy_calls.windows(6) {
        assert!(pair[5].received_at.duration_since(pair[0].received_at) >= Duration::from_secs(3));
    }
    // `transfer-worker status` shows where the backlog waits.
    let shown = status_of(&h.settings).await;
    let queues = account_queues_at_broker(&h.settings.amqp.commands_queue, NOISY);
    let [queue] = queues.as_slice() else {
        panic!("the noisy account has one queue: {queues:?}");
    };
    let line = shown
        .lines()
        .find(|l| l.starts_with(NOISY))
        .unwrap_or_else(|| panic!("no line for {NOISY}:\n{shown}"));
    let waiting: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(waiting > 200, "{shown}");
    assert!(line.contains(queue.as_str()), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with(QUIET) && l.ends_with(" -")),
        "{shown}"
    );
    // Nothing is lost or doubled: each noisy command ended, or waits in the commands queue or
    // in its account's queue, exactly once.
    h.stop_app().await.expect("the app stops cleanly");
    noisy_done.extend(h.drain_events().await);
    let mut queues = vec![h.settings.amqp.commands_queue.clone()];
    queues.extend(account_queues_at_broker(
        &h.settings.amqp.commands_queue,
        NOISY,
    ));
    let waiting = left_in(&queues).await;
    assert_each_once(noisy_done, waiting, 300);
}

/// Asserts that each of `all` (every noisy command) either ended or is among `left`, exactly
/// once.
fn assert_each_once(ended: Vec<String>, left: Vec<String>, all: usize) {
    let mut ids: Vec<String> = ended.into_iter().chain(left).collect();
    ids.sort();
    let before = ids.len();
    ids.dedup();
    assert_eq!(
        before,
        ids.len(),
        "a command both ended and still waits, or waits twice"
    );
    assert_eq!(ids.len(), all, "a command was lost");
}

#[tokio::test]
async fn in_a_fleet_a_backlog_of_one_account_does_not_hold_another() {
    let mut fleet =
        two_account_fleet(5, Duration::from_secs(3), 64, Duration::from_millis(100)).await;
    let noisy_account = fleet.settings.bots[0].account_id.clone();
    let noisy = fleet.settings.bots[0].stream_id.clone();
    let commands: Vec<Value> = (0..300)
        .map(|i| command(&noisy, &format!("noisy-{i}"), &format!("s-noisy-{i}")))
        .collect();
    fleet.publish_all(&commands).await;
    let mut ended = Vec::new();
    let took = quiet_latencies(&mut fleet, 5, &mut ended).await;
    assert!(
        took.iter().all(|t| *t < QUIET_BOUND),
        "the quiet account waited behind the noisy one's backlog: {took:?}\n{}",
        fleet.log_tails(30)
    );
    // The noisy account keeps to its pace fleet-wide.
    let noisy_calls = calls_of(&fleet.sim.requests(), &noisy_account);
    assert!(!noisy_calls.is_empty());
    for pair in noisy_calls.windows(6) {
        assert!(pair[5].received_at.duration_since(pair[0].received_at) >= Duration::from_secs(3));
    }
    for r in &mut fleet.replicas {
        let status = r.terminate(Duration::from_secs(20)).await;
        assert!(status.success(), "{} exited with {status}", r.name);
    }
    let rest = fleet.events.drain(Duration::from_secs(1)).await;
    ended.extend(rest.iter().map(|e| e.command_id().to_owned()));
    ended.retain(|id| id.starts_with("noisy-"));
    let mut queues = vec![fleet.settings.amqp.commands_queue.clone()];
    queues.extend(fleet.partition_queues());
    queues.extend(account_queues_left(&fleet.settings));
    assert_each_once(ended, left_in(&queues).await, 300);
}

/// Quiet commands published every `every` for `during`, each checked to end within
/// [`QUIET_BOUND`]; events of other accounts are collected in `others`.
async fn steady_quiet(
    rig: &mut impl Rig,
    every: Duration,
    during: Duration,
    others: &mut Vec<String>,
) -> Vec<Duration> {
    let started = Instant::now();
    let mut published: HashMap<String, Instant> = HashMap::new();
    let mut took = Vec::new();
    let mut next = Instant::now();
    let mut i = 0;
    while started.elapsed() < during || !published.is_empty() {
        if started.elapsed() < during && Instant::now() >= next {
            let id = format!("steady-{i}");
            rig.send(&command(QUIET_STREAM, &id, &format!("s-steady-{i}")))
                .await;
            published.insert(id, Instant::now());
            i += 1;
            next += every;
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(5));
        let event = tokio::time::timeout(wait, rig.event()).await;
        if let Ok(event) = event {
            match published.remove(event.command_id()) {
                Some(at) => took.push(at.elapsed()),
                None => others.push(event.command_id().to_owned()),
            }
        }
        assert!(
            started.elapsed() < during + Duration::from_secs(30),
            "{} quiet commands never ended",
            published.len()
        );
    }
    took
}

#[tokio::test]
async fn a_backlogged_account_gets_exactly_its_budget_while_others_flow() {
    let window = Duration::from_secs(2);
    let mut h = two_account_worker(test_settings(), 5, window, None).await;
    // More than the prefetch: without fairness the quiet account would find no room.
    backlog(&h, "noisy", 200).await;
    let mut ended = Vec::new();
    let took = steady_quiet(
        &mut h,
        Duration::from_millis(200),
        Duration::from_secs(12),
        &mut ended,
    )
    .await;
    assert!(
        took.iter().all(|t| *t < QUIET_BOUND),
        "a quiet command waited: {took:?}"
    );
    let noisy_calls = calls_of(&h.sim.requests(), NOISY);
    // Twelve seconds of a 5-per-2-s budget: about 30 calls, every window full, none over.
    assert_exact_budget(&noisy_calls, 5, window, Duration::from_millis(400));
    assert!(
        noisy_calls.len() >= 25,
        "{} noisy calls in 12 s",
        noisy_calls.len()
    );
}

#[tokio::test]
async fn a_slow_account_cannot_take_every_slot() {
    let cap = 4;
    let mut h =
        two_account_worker(test_settings(), 10_000, Duration::from_secs(1), Some(cap)).await;
    h.sim
        .set_latency(&h.settings.bots[0].stream_id, Duration::from_secs(2));
    backlog(&h, "slow", 100).await;
    let mut ended = Vec::new();
    let took = quiet_latencies(&mut h, 5, &mut ended).await;
    assert!(
        took.iter().all(|t| *t < QUIET_BOUND),
        "the quiet account waited behind the slow one: {took:?}"
    );
    // Let the slow account run a while, then look at its calls in flight over time.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let calls = calls_of(&h.sim.requests(), NOISY);
    let most = most_at_once(&calls);
    assert!(
        most <= cap as usize,
        "{most} calls of the slow account at once, cap {cap}"
    );
    assert_eq!(most, cap as usize, "the slow account never used its cap");
}

/// The most calls of `calls` that were in flight at one time (an unanswered one counts to
/// now).
fn most_at_once(calls: &[RecordedRequest]) -> usize {
    let mut edges: Vec<(Instant, i32)> = Vec::new();
    for c in calls {
        edges.push((c.received_at, 1));
        edges.push((c.answered_at.unwrap_or_else(Instant::now), -1));
    }
    // An answer before an arrival at the same instant.
    edges.sort_by_key(|&(at, delta)| (at, delta));
    let mut now = 0i32;
    let mut most = 0i32;
    for (_, delta) in edges {
        now += delta;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

/// Node 4 of `scripts/rabbitmq-cluster`: a broker alone with a 10 s `consumer_timeout`.
fn short_timeout_broker() -> String {
    std::env::var("TEST_SHORT_TIMEOUT_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5684/%2f".into())
}

/// That broker enforces its timeout: a consumer that holds a delivery for 15 s loses its
/// channel. Without this, the test below would prove nothing.
async fn assert_the_broker_enforces_its_consumer_timeout(url: &str) {
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    let (_conn, channel) = test_channel_at(url).await;
    let queue = format!("tw-test-timeout-{}", uuid::Uuid::new_v4().simple());
    let _cleanup = Cleanup::at(url.to_owned(), vec![queue.clone()], vec![]);
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.as_str().into(), durable, args)
        .await
        .unwrap();
    let held = [(b"held", lapin::BasicProperties::default())];
    publish_confirmed(&channel, "", &queue, held).await;
    let held_on = test_channel_at(url).await;
    let mut consumer = held_on
        .1
        .basic_consume(
            queue.as_str().into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    use futures_util::StreamExt;
    let _held = consumer
        .next()
        .await
        .expect("a delivery")
        .expect("delivered");
    let until = Instant::now() + Duration::from_secs(20);
    while held_on.1.status().connected() {
        assert!(
            Instant::now() < until,
            "the broker at {url} did not enforce a short consumer_timeout; is scripts/rabbitmq-cluster up?"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn no_delivery_is_held_for_half_the_consumer_timeout_while_a_backlog_waits() {
    held_under_half_the_consumer_timeout(None).await;
}

#[tokio::test]
async fn in_a_fleet_no_delivery_is_held_for_half_the_consumer_timeout_across_partitions() {
    // One replica owns all 4 partitions: the backlog's sessions spread over them, and each
    // partition's lane has a reader that prefetches; all of them wait for the same slots.
    held_under_half_the_consumer_timeout(Some(4)).await;
}

/// A backlog of one account on a broker with a 10 s `consumer_timeout`, alone or as the one
/// replica of a fleet of `partitions`: the broker never closes a channel for a delivery held
/// too long, and another account flows throughout.
async fn held_under_half_the_consumer_timeout(partitions: Option<u16>) {
    let url = short_timeout_broker();
    assert_the_broker_enforces_its_consumer_timeout(&url).await;
    let mut base = test_settings();
    base.amqp.url = url;
    // The broker's 10 s; the worker keeps every delivery under 5 s.
    base.amqp.consumer_timeout = Duration::from_secs(10);
    let _keys = partitions.map(|p| {
        base.fleet.redis_url = redis_url();
        base.fleet.partitions = p;
        RedisKeys::new(&base.fleet.redis_url, &base.amqp.commands_queue)
    });
    let window = Duration::from_secs(3);
    let mut h = two_account_worker(base, 5, window, None).await;
    // 60 commands at 5 per 3 s take 36 s: today's prefetch alone would hold most of them for
    // longer than the broker allows.
    backlog(&h, "noisy", 60).await;
    let mut ended = Vec::new();
    let took = steady_quiet(
        &mut h,
        Duration::from_millis(500),
        Duration::from_secs(25),
        &mut ended,
    )
    .await;
    assert!(took.iter().all(|t| *t < QUIET_BOUND), "{took:?}");
    assert_eq!(
        h.metrics.broker_reconnects.get(),
        0,
        "the broker closed a channel: a delivery was held past its consumer_timeout"
    );
    assert_eq!(h.metrics.commands_requeued.get(), 0);
    // Meanwhile the noisy account used its budget, every window.
    let calls = calls_of(&h.sim.requests(), NOISY);
    assert_exact_budget(&calls, 5, window, Duration::from_millis(400));
}

#[tokio::test]
async fn a_replica_killed_in_the_middle_of_a_backlog_loses_nothing_and_keeps_sessions_in_order() {
    let mut fleet =
        two_account_fleet(20, Duration::from_secs(1), 32, Duration::from_millis(50)).await;
    let noisy_account = fleet.settings.bots[0].account_id.clone();
    let noisy = fleet.settings.bots[0].stream_id.clone();
    // 40 sessions of 5 commands, interleaved: 10 s of the noisy account's budget.
    let (sessions, per_session) = (40, 5);
    let commands: Vec<Value> = (0..per_session)
        .flat_map(|n| {
            let noisy = &noisy;
            (0..sessions).map(move |s| {
                let mut c = session_command(&format!("k-{s}-{n}"), &format!("s-k-{s}"), false);
                c["streamId"] = json!(noisy);
                c
            })
        })
        .collect();
    fleet.publish_all(&commands).await;
    // The backlog waits beside the commands queue: the replica holding it is the one to kill.
    let intake = fleet.the_intake().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.replicas[intake].kill().await;
    let events = fleet
        .events_until(Duration::from_secs(90), |seen| {
            let mut ids: Vec<&str> = seen.iter().map(Received::command_id).collect();
            ids.sort_unstable();
            ids.dedup();
            ids.len() >= sessions * per_session
        })
        .await;
    assert!(events.iter().all(|e| e.name() == "transfer.succeeded"));
    // The kill left account queues behind, and the commands queue's new holder took them up.
    let found = fleet.log_lines("account queue found");
    assert!(
        found.matches("account queue found").count() > 0,
        "no account queue was taken over from the killed replica:\n{found}"
    );
    let calls = calls_of(&fleet.sim.requests(), &noisy_account);
    // Per session, the first call of each command, in arrival order.
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    for call in &calls {
        let seen = order
            .entry(call.bot_session_id.clone().unwrap_or_default())
            .or_default();
        let id = command_of(call);
        if !seen.contains(&id) {
            seen.push(id);
        }
    }
    assert_eq!(order.len(), sessions);
    for (session, seen) in &order {
        let s = &session["s-k-".len()..];
        let published: Vec<String> = (0..per_session).map(|n| format!("k-{s}-{n}")).collect();
        assert_eq!(seen, &published, "session {session} out of order");
    }
    // Called again only if in doubt at the kill: at most the prefetch of the killed replica.
    let twice = calls.len() - sessions * per_session;
    assert!(twice <= 32, "{twice} commands called twice");
    // The budget held fleet-wide throughout (less the scheduling jitter of three busy
    // processes on a small machine, which can send one call late after its booked start).
    for pair in calls.windows(21) {
        let apart = pair[20].received_at.duration_since(pair[0].received_at);
        assert!(
            apart >= Duration::from_millis(900),
            "21 calls within {apart:?}"
        );
    }
}

/// What `transfer-worker status` prints for these settings' queues and bots.
async fn status_of(settings: &Settings) -> String {
    let file = config_file(&settings.bots);
    let mut command = binary();
    command
        .args(["status", "--config"])
        .arg(file.path())
        .env("TRANSFER__AMQP__URL", &settings.amqp.url)
        .env(
            "TRANSFER__AMQP__COMMANDS_QUEUE",
            &settings.amqp.commands_queue,
        );
    succeeded(&output(command, Duration::from_secs(60)).await)
}

/// Three replicas sharing 8 partitions through Redis, ready and balanced: the noisy account
/// (the default bot) at `limit` per `window`, and the quiet one with budget to spare.
async fn two_account_fleet(
    limit: u32,
    window: Duration,
    prefetch: u16,
    latency: Duration,
) -> Fleet {
    Fleet::start_balanced(
        FleetSpec {
            rate_limit: limit,
            rate_window: window,
            prefetch,
            latency,
            more_bots: vec![BotSpec {
                stream_id: QUIET_STREAM.into(),
                account_id: QUIET.into(),
                rate_limit: 10_000,
                rate_window: Duration::from_secs(1),
                max_in_flight: None,
            }],
            ..FleetSpec::partitioned(3, 8)
        },
        Duration::from_secs(20),
    )
    .await
}
