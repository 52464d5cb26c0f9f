//! A holder frozen past `fleet.member_ttl` (CONTRACT §9, "One holder at a time"): SIGSTOP, as a
//! VM or GC pause does, with commands in flight and more waiting behind them. Its holds expire
//! while its AMQP connection lives on, and another replica takes its partitions over. When it
//! wakes it starts no call: its holds are gone, so the commands it still has go back, and the
//! holder calls them. Nothing is lost.
//!
//! The frozen replica calls a simulator of its own, so every call it makes is told apart.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use transfer_worker::tools::simulator::{Simulator, SimulatorConfig};

use crate::harness::sim::{self, call_on_the_wire};
use crate::harness::{Fleet, FleetSpec, amqp_url, command_of, redis_url, session_command, tag};
use crate::partitions::{all_ended, terminal_by_command};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_frozen_past_member_ttl_calls_nothing_after_it_wakes_and_loses_nothing() {
    // One account paced at 8 calls a second, and nothing set aside: commands of the frozen
    // replica wait for their starts in it, and their waits end while it is frozen.
    let spec = FleetSpec {
        latency: Duration::from_millis(50),
        prefetch: 16,
        rate_limit: 8,
        rate_window: Duration::from_secs(1),
        ..FleetSpec::partitioned(1, 4)
    };
    // Its calls take 1 s: commands on the wire when it freezes, others waiting for a start.
    let (mut fleet, f, slow, name) =
        with_a_replica_to_freeze(spec, Duration::from_millis(1000)).await;

    // Sessions over every partition, two commands each, one after another.
    let t = tag();
    let mut order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut commands: Vec<Value> = Vec::new();
    for c in 0..2 {
        for s in 0..24 {
            let session = format!("s-frozen-{t}-{s:02}");
            let id = format!("frozen-{t}-s{s:02}-c{c}");
            order.entry(session.clone()).or_default().push(id.clone());
            commands.push(session_command(&id, &session, false));
        }
    }
    let n = commands.len();
    fleet.publish_all(&commands).await;
    call_on_the_wire(&slow).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Frozen past member_ttl: the broker closes its connection, the other replica takes its
    // partitions over and runs what it had.
    fleet.replicas[f].freeze();
    let frozen = Instant::now();
    let took_over = fleet.wait_balanced(&[0], Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(5500).saturating_sub(frozen.elapsed())).await;
    // From when it wakes until it holds a queue again, it may call nothing.
    let holds = held_again(&fleet, &name);
    fleet.replicas[f].thaw();
    let woke = Instant::now();

    let events = fleet
        .events_until(Duration::from_secs(60), |e| {
            all_ended(e, order.values().flatten())
        })
        .await;
    fleet.assert_no_event(Duration::from_secs(1)).await;
    let ended = terminal_by_command(&events);
    assert_eq!(ended.len(), n, "a command has no outcome");

    let mine = slow.requests();
    let before: Vec<String> = mine
        .iter()
        .filter(|r| r.received_at < frozen)
        .map(command_of)
        .collect();
    let retaken = holds.await.expect("the hold watcher");
    let after: Vec<String> = mine
        .iter()
        .filter(|r| r.received_at >= woke && retaken.is_none_or(|at| r.received_at < at))
        .map(command_of)
        .collect();
    assert!(
        after.is_empty(),
        "the replica frozen past member_ttl called the API after it woke ({:?} before it held \
         a queue again), for {after:?}\n{}",
        retaken.map(|at| at - woke),
        fleet.replicas[f].log()
    );
    // Outcomes told twice are one event; only a call on the wire at the freeze is in doubt.
    for (id, mine) in &ended {
        let ids: Vec<&Value> = mine.iter().map(|e| &e.json["eventId"]).collect();
        assert!(
            ids.iter().all(|e| *e == ids[0]) || before.contains(id),
            "{id} ended differently twice: {:?}",
            mine.iter().map(|e| &e.json).collect::<Vec<_>>()
        );
    }
    // The scenario happened: commands of the frozen replica woke wanting to call.
    let sent_back = fleet.replicas[f].log().matches("holds lapsed").count();
    assert!(
        sent_back > 0,
        "no command of the frozen replica woke wanting to call: the test saw nothing\n{}",
        fleet.replicas[f].log()
    );
    let later: Vec<String> = mine
        .iter()
        .filter(|r| r.received_at >= woke)
        .map(|r| format!("{} +{:?}", command_of(r), r.received_at - woke))
        .collect();
    eprintln!(
        "frozen {:?}, the other took its partitions {took_over:?} in; {} calls before the \
         freeze, none from waking until it held a queue again {:?} later ({later:?} after that), \
         {sent_back} commands sent back instead; {n} commands ended",
        woke - frozen,
        before.len(),
        retaken.map(|at| at - woke),
    );
    fleet.stop_leaving_nothing().await;
}

/// A fleet of `spec`, balanced, and a second replica that will be frozen, on a simulator of
/// its own answering in `latency` (so that every call it makes is told apart): the fleet, the
/// replica's index, its simulator and its name. Nothing is set aside, and the fleet timings are
/// as the rules ask (docs/configuration.md): `member_ttl` less the heartbeat (3 s, from
/// `partitioned`) at least three AMQP heartbeats (1 s), so the broker has closed a frozen
/// replica's connection before its holds can expire.
async fn with_a_replica_to_freeze(
    mut spec: FleetSpec,
    latency: Duration,
) -> (Fleet, usize, Simulator, String) {
    spec.env
        .push(("TRANSFER__COMMANDS__ASIDE_AFTER".into(), "60s".into()));
    spec.env.push((
        "TRANSFER__AMQP__URL".into(),
        format!("{}?heartbeat=1", amqp_url()),
    ));
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(30)).await;
    let own = sim::start(SimulatorConfig {
        latency,
        ..sim::config(&fleet.settings)
    })
    .await;
    let name = format!("frozen-{}", tag());
    let f = fleet.add_replica_with(
        &name,
        &[("TRANSFER__AGENTASSIST__BASE_URL".to_owned(), own.base_url())],
    );
    fleet.replicas[f]
        .wait_readyz(StatusCode::OK, Duration::from_secs(30))
        .await;
    fleet.wait_balanced(&[0, f], Duration::from_secs(30)).await;
    (fleet, f, own, name)
}

/// Watches, every 2 ms for up to 30 s, the holds of the fleet's queues (the commands queue and
/// the partitions) in Redis; resolves to when replica `name` first holds one, if it does.
fn held_again(fleet: &Fleet, name: &str) -> tokio::task::JoinHandle<Option<Instant>> {
    let commands = fleet.settings.amqp.commands_queue.clone();
    let keys: Vec<String> = std::iter::once(commands.clone())
        .chain(fleet.partition_queues())
        .map(|queue| format!("{commands}:hold:{queue}"))
        .collect();
    let mine = format!("{name}/");
    tokio::spawn(async move {
        let client = redis::Client::open(redis_url()).expect("the Redis URL");
        let mut redis = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis answers");
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            let looked = Instant::now();
            let holders: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut redis)
                .await
                .expect("MGET");
            if holders.iter().flatten().any(|h| h.starts_with(&mine)) {
                return Some(looked);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        None
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_frozen_between_its_last_look_and_the_wire_sends_nothing_after_it_wakes() {
    // Every command is held 1 s between its booked start (and every look at whose it is) and
    // the wire, as a busy machine holds it: the freeze comes in that second.
    let spec = FleetSpec {
        latency: Duration::from_millis(50),
        prefetch: 16,
        ..FleetSpec::partitioned(1, 4)
    };
    let (mut fleet, f, own, name) = with_a_replica_to_freeze(spec, Duration::from_millis(50)).await;

    let t = tag();
    let ids: Vec<String> = (0..24).map(|s| format!("held-{t}-{s:02}")).collect();
    let commands: Vec<Value> = ids
        .iter()
        .map(|id| {
            let mut c = session_command(id, &format!("s-{id}"), false);
            c["orgId"] = serde_json::json!(
                transfer_worker::agentassist::transfer::FAULT_LATE_DEPARTURE_ORG_ID
            );
            c
        })
        .collect();
    fleet.publish_all(&commands).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    fleet.replicas[f].freeze();
    let frozen = Instant::now();
    fleet.wait_balanced(&[0], Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(5500).saturating_sub(frozen.elapsed())).await;
    let holds = held_again(&fleet, &name);
    fleet.replicas[f].thaw();
    let woke = Instant::now();

    let events = fleet
        .events_until(Duration::from_secs(60), |e| all_ended(e, &ids))
        .await;
    assert_eq!(terminal_by_command(&events).len(), ids.len());
    let retaken = holds.await.expect("the hold watcher");
    let after: Vec<String> = own
        .requests()
        .iter()
        .filter(|r| r.received_at >= woke && retaken.is_none_or(|at| r.received_at < at))
        .map(command_of)
        .collect();
    assert!(
        after.is_empty(),
        "the replica frozen on the way to the wire sent {after:?} after it woke\n{}",
        fleet.replicas[f].log()
    );
    // The scenario happened: calls of the frozen replica woke on their way to the wire.
    let held = fleet.replicas[f].log().matches("holds lapsed").count();
    assert!(
        held > 0,
        "no call of the frozen replica woke on its way: the test saw nothing\n{}",
        fleet.replicas[f].log()
    );
    fleet.stop_leaving_nothing().await;
}
