//! The fleet (CONTRACT §9): several real `transfer-worker run` processes on one queue set.
//! Without Redis the commands queue's single active consumer makes extra replicas hot
//! standbys; with Redis the replicas share one rate budget per account and one memory of
//! outcomes, and fail closed while Redis is away.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::redis::RedisServer;
use crate::harness::{
    Fleet, FleetSpec, Received, agent_command, redis_url, test_channel, test_settings, wait_for,
};

/// Command `i` of a test, each in its own session and with its own agent, so the simulator's
/// log names the command.
fn command(prefix: &str, i: usize) -> Value {
    let id = format!("{prefix}-{i:03}");
    let mut c = agent_command(&id, &format!("s-{id}"));
    c["aId"] = format!("a-{id}").into();
    c
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// The command each API request was for, in arrival order.
fn called(fleet: &Fleet) -> Vec<String> {
    fleet
        .sim
        .requests()
        .iter()
        .map(|r| {
            r.body["aId"]
                .as_str()
                .expect("an agent transfer")
                .trim_start_matches("a-")
                .to_owned()
        })
        .collect()
}

/// Whether every one of `ids` has a terminal event among `events`.
fn all_ended(events: &[Received], ids: &[String]) -> bool {
    let ended: HashSet<&str> = events
        .iter()
        .filter(|e| e.name() != "transfer.callback")
        .map(|e| e.command_id())
        .collect();
    ids.iter().all(|id| ended.contains(id.as_str()))
}

/// Terminal events by command.
fn by_command(events: &[Received]) -> BTreeMap<String, Vec<&Received>> {
    let mut out: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for e in events {
        out.entry(e.command_id().to_owned()).or_default().push(e);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_standby_takes_over_when_the_active_replica_dies() {
    let mut fleet = Fleet::start(FleetSpec {
        replicas: 2,
        latency: Duration::from_millis(100),
        prefetch: 4,
        ..FleetSpec::default()
    })
    .await;
    // 60 commands, 4 at a time at 100 ms each: about 1.5 s of work for one replica.
    let n = 60;
    let wanted = ids("standby", n);
    let commands: Vec<Value> = (0..n).map(|i| command("standby", i)).collect();
    fleet.publish_all(&commands).await;

    // Exactly one replica takes commands.
    let active = fleet.the_active_one().await;
    let standby = 1 - active;
    // Killed mid-burst, while calls are on the wire and commands still wait.
    wait_for(
        "some calls made, one on the wire",
        Duration::from_secs(20),
        || fleet.log_tails(40),
        async || fleet.sim.stats().calls >= 8 && fleet.sim.in_flight() > 0,
    )
    .await;
    assert_eq!(
        fleet.replicas[standby]
            .metric("transfer_commands_received_total")
            .await,
        0.0,
        "the standby received commands while the active replica lived"
    );
    fleet.replicas[active].kill().await;
    let calls_at_kill = fleet.sim.stats().calls as usize;
    assert!(
        calls_at_kill < n,
        "the burst was over before the kill ({calls_at_kill} calls)"
    );

    let events = fleet
        .events_until(Duration::from_secs(40), |e| all_ended(e, &wanted))
        .await;
    assert!(
        events.iter().all(|e| e.name() == "transfer.succeeded"),
        "{:?}",
        events.iter().map(|e| e.json.clone()).collect::<Vec<_>>()
    );
    let took_over = fleet.replicas[standby]
        .metric("transfer_commands_received_total")
        .await;
    assert!(took_over >= 1.0, "the standby never took over");
    // Every command was called; a call on the wire at the kill may have gone out again (no
    // shared memory without Redis), nothing else.
    let calls = called(&fleet);
    let distinct: HashSet<&String> = calls.iter().collect();
    assert_eq!(distinct.len(), n, "every command was called");
    assert!(
        calls.len() <= n + 4,
        "more calls again than the dead replica had in flight (prefetch 4): {}",
        calls.len()
    );
    eprintln!(
        "hot standby: {calls_at_kill} calls before the kill, {} calls in all for {n} commands; \
         the standby received {took_over} commands",
        calls.len()
    );

    // The killed replica, started again, is a standby: the queue stays with the one consuming.
    fleet.restart(active).await;
    let more = ids("standby-after", 5);
    let commands: Vec<Value> = (0..5).map(|i| command("standby-after", i)).collect();
    fleet.publish_all(&commands).await;
    let events = fleet
        .events_until(Duration::from_secs(20), |e| all_ended(e, &more))
        .await;
    assert!(events.iter().all(|e| e.name() == "transfer.succeeded"));
    assert_eq!(
        fleet.replicas[active]
            .metric("transfer_commands_received_total")
            .await,
        0.0,
        "the restarted replica took commands from the active one"
    );
    fleet.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_queue_declared_without_single_active_consumer_stops_the_worker_with_a_clear_error()
 {
    let settings = test_settings();
    let amqp = settings.amqp.clone();
    // The commands queue as an older version declared it: quorum, dead-lettering, a delivery
    // limit, and no single active consumer.
    let (_conn, channel) = test_channel().await;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum".as_bytes())),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(amqp.dead_letter_exchange.as_bytes())),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(amqp.delivery_limit as i32),
    );
    let mut fleet = Fleet::launch_undeclared(
        FleetSpec {
            replicas: 0,
            ..FleetSpec::default()
        },
        settings,
    )
    .await;
    channel
        .queue_declare(
            amqp.commands_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("the old queue declared");
    fleet.add_replica();
    let status = fleet.replicas[0].exit_status(Duration::from_secs(30)).await;
    let log = fleet.replicas[0].log();
    assert!(!status.success(), "exited {status}:\n{log}");
    assert!(
        log.contains(&amqp.commands_queue),
        "names the queue:\n{log}"
    );
    assert!(
        log.contains("x-single-active-consumer"),
        "names the argument:\n{log}"
    );
    // Nothing was consumed, and the queue is as it was.
    assert_eq!(fleet.consumers().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_never_exceed_the_accounts_rate_window() {
    let limit = 5;
    let window = Duration::from_secs(3);
    let mut fleet = Fleet::start(FleetSpec {
        replicas: 3,
        redis_url: Some(redis_url()),
        rate_limit: limit,
        rate_window: Duration::from_secs(3),
        latency: Duration::from_millis(50),
        // A call on the wire at the kill may go out again once its lease has passed.
        env: vec![("TRANSFER__FLEET__LEASE".into(), "3s".into())],
        ..FleetSpec::default()
    })
    .await;
    let n = 15;
    let wanted = ids("paced", n);
    let commands: Vec<Value> = (0..n).map(|i| command("paced", i)).collect();
    let published = Instant::now();
    fleet.publish_all(&commands).await;

    // The replica that made the first calls dies within the first window.
    wait_for(
        "the first calls",
        Duration::from_secs(20),
        || fleet.log_tails(40),
        async || fleet.sim.stats().calls >= 3,
    )
    .await;
    // With partitions several replicas call at once, each through the shared budget; one of
    // those that received commands dies.
    let first = fleet.active().await[0];
    fleet.replicas[first].kill().await;
    let killed = Instant::now();
    let calls_at_kill = fleet.sim.stats().calls;

    let events = fleet
        .events_until(Duration::from_secs(60), |e| all_ended(e, &wanted))
        .await;
    let took_over = fleet.active().await;
    assert!(
        !took_over.is_empty() && !took_over.contains(&first),
        "another replica took over: {took_over:?}"
    );
    assert!(
        events.iter().all(|e| e.name() == "transfer.succeeded"),
        "{:?}",
        events.iter().map(|e| e.json.clone()).collect::<Vec<_>>()
    );

    let requests = fleet.sim.requests();
    let mut times: Vec<Instant> = requests.iter().map(|r| r.received_at).collect();
    times.sort();
    let first_call = times[0];
    assert!(
        killed - first_call < window,
        "the kill came {:?} after the first call: not mid-window",
        killed - first_call
    );
    // The simulator sees each call's arrival a little after its slot (scheduling on a loaded
    // machine): slack for that, far less than a window.
    let slack = Duration::from_millis(150);
    let narrowed = window - slack;
    let offsets: Vec<u128> = times
        .iter()
        .map(|t| (*t - first_call).as_millis())
        .collect();
    for (i, t) in times.iter().enumerate() {
        let within = times[i..].iter().filter(|u| **u - *t < narrowed).count();
        assert!(
            within <= limit as usize,
            "{within} calls within {narrowed:?} from call {i}; arrivals (ms): {offsets:?}\n{}",
            fleet.log_tails(40)
        );
    }
    // The dead replica held no more of the budget than it used: starts beyond the horizon
    // (a third of the lease) are never booked, so the calls after the first window are not
    // pushed back by bookings nobody will use (with every start booked ahead, the sixth call
    // came three windows after the first).
    assert!(
        times[limit as usize] - first_call < 2 * window,
        "the budget was held by the dead replica: arrivals (ms) {offsets:?}"
    );
    // 15 calls at 5 per 3 s need at least two full windows after the first call.
    assert!(
        *times.last().unwrap() - first_call >= 2 * window - slack,
        "the calls were not paced: arrivals (ms) {offsets:?}"
    );
    let calls = called(&fleet);
    let distinct: HashSet<&String> = calls.iter().collect();
    assert_eq!(distinct.len(), n, "every command was called");
    let mut rounds = 0.0;
    for i in took_over {
        rounds += fleet.replicas[i]
            .metric_sum("transfer_redis_round_trips_total")
            .await;
    }
    assert!(rounds > 0.0, "the replicas that took over never used Redis");
    eprintln!(
        "fleet pacing: {calls_at_kill} calls before the kill at {:?}, {} calls in all \
         (arrivals, ms: {offsets:?}), {:?} from publish to the last event",
        killed - first_call,
        calls.len(),
        published.elapsed(),
    );
    fleet.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_command_republished_after_its_replica_died_is_answered_from_the_fleet_record()
{
    let mut fleet = Fleet::start(FleetSpec {
        replicas: 3,
        redis_url: Some(redis_url()),
        ..FleetSpec::default()
    })
    .await;
    let c = command("once", 0);
    let id = c["commandId"].as_str().unwrap().to_owned();
    fleet.publish(&c).await;
    let first = fleet
        .events_until(Duration::from_secs(20), |e| !e.is_empty())
        .await;
    assert_eq!(first[0].name(), "transfer.succeeded", "{}", first[0].json);
    let event_id = first[0].json["eventId"].as_str().unwrap().to_owned();

    // The replica that completed it dies, once it has acked it (nothing left in flight).
    let completed_by = fleet.the_active_one().await;
    let r = &fleet.replicas[completed_by];
    wait_for(
        "the command acked",
        Duration::from_secs(10),
        || r.log(),
        async || r.metric("transfer_commands_in_flight").await == 0.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.replicas[completed_by].kill().await;

    // Published again six times, as upstream retries do.
    fleet.publish_all(&vec![c.clone(); 6]).await;
    let again = fleet
        .events_until(Duration::from_secs(30), |e| e.len() >= 6)
        .await;
    fleet.assert_no_event(Duration::from_secs(1)).await;
    let all: Vec<&Received> = first.iter().chain(again.iter()).collect();
    assert_eq!(all.len(), 7);
    for e in &all {
        assert_eq!(e.command_id(), id, "{}", e.json);
        assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
        assert_eq!(
            e.json["eventId"].as_str(),
            Some(event_id.as_str()),
            "one eventId for every answer: {}",
            e.json
        );
    }
    assert_eq!(
        fleet.sim.stats().calls,
        1,
        "the API saw the command once: {:?}",
        called(&fleet)
    );
    // Answered by the others, from the fleet's record.
    let mut received = 0.0;
    for (i, r) in fleet.replicas.iter().enumerate() {
        if i != completed_by {
            received += r.metric("transfer_commands_received_total").await;
        }
    }
    assert_eq!(received, 6.0, "the other replicas received the six copies");
    fleet.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_no_call_starts_readiness_fails_and_everything_completes_when_it_returns() {
    let mut redis = RedisServer::start().await;
    let mut fleet = Fleet::start(FleetSpec {
        replicas: 2,
        redis_url: Some(redis.url()),
        latency: Duration::from_millis(50),
        ..FleetSpec::default()
    })
    .await;
    // A first command finds the active replica, with Redis up.
    fleet.publish(&command("warm", 0)).await;
    let warm = fleet
        .events_until(Duration::from_secs(20), |e| !e.is_empty())
        .await;
    assert_eq!(warm[0].name(), "transfer.succeeded", "{}", warm[0].json);
    let active = fleet.the_active_one().await;
    assert_eq!(fleet.sim.stats().calls, 1);

    redis.kill().await;
    let n = 5;
    let wanted = ids("held", n);
    let commands: Vec<Value> = (0..n).map(|i| command("held", i)).collect();
    fleet.publish_all(&commands).await;
    let down = Instant::now();
    fleet.replicas[active]
        .wait_readyz(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(5))
        .await;
    let unready_after = down.elapsed();
    let mut standby_statuses = Vec::new();
    for r in &fleet.replicas {
        standby_statuses.push((r.name.clone(), r.readyz().await));
    }
    // Fail closed: nothing ends, no call starts.
    fleet.assert_no_event(Duration::from_secs(2)).await;
    assert_eq!(
        fleet.sim.stats().calls,
        1,
        "an API call started with Redis down: {:?}",
        called(&fleet)
    );
    for r in &fleet.replicas {
        assert_eq!(
            r.readyz().await,
            Some(StatusCode::SERVICE_UNAVAILABLE),
            "{} is ready with Redis down\n{}",
            r.name,
            r.log()
        );
    }

    redis.restart().await;
    let back = Instant::now();
    let events = fleet
        .events_until(Duration::from_secs(30), |e| all_ended(e, &wanted))
        .await;
    let resumed_after = back.elapsed();
    fleet.assert_no_event(Duration::from_secs(1)).await;
    let ended = by_command(&events);
    for id in &wanted {
        let mine = &ended[id];
        assert_eq!(mine.len(), 1, "one terminal event for {id}: {mine:?}");
        assert_eq!(mine[0].name(), "transfer.succeeded", "{}", mine[0].json);
    }
    let mut per_command: HashMap<String, usize> = HashMap::new();
    for c in called(&fleet) {
        *per_command.entry(c).or_default() += 1;
    }
    for id in &wanted {
        assert_eq!(per_command.get(id), Some(&1), "one API call for {id}");
    }
    assert_eq!(fleet.sim.stats().calls as usize, n + 1);
    for r in &fleet.replicas {
        r.wait_readyz(StatusCode::OK, Duration::from_secs(10)).await;
    }
    let mut errors = 0.0;
    for r in &fleet.replicas {
        errors += r.metric_sum("transfer_redis_errors_total").await;
    }
    assert!(errors > 0.0, "the outage is in no replica's Redis errors");
    eprintln!(
        "redis outage: /readyz 503 after {unready_after:?} ({standby_statuses:?}); held commands \
         ended {resumed_after:?} after Redis returned; {errors} Redis errors counted"
    );
    fleet.stop_leaving_nothing().await;
}
