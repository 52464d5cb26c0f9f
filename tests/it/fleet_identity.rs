//! Who a replica is in a fleet (CONTRACT §9): `fleet.name` names one live process. A second
//! process started under a name a live replica has (a copied environment variable, a template
//! that sets a fixed name) refuses to start, naming the other; a replica killed and started
//! again at once under its name is not taken for a second one: it waits for its predecessor's
//! membership to lapse, then joins.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{Fleet, FleetSpec, session_command, tag};
use crate::partitions::each_ends_once;
use crate::rolling::session_faults;

/// `rounds` rounds of one command for each of `sessions` sessions, `every` apart, published
/// while `during` runs; returns each session's commands in publish order.
pub async fn feed<F: Future<Output = ()>>(
    fleet: &Fleet,
    prefix: &str,
    sessions: usize,
    rounds: usize,
    every: Duration,
    during: F,
) -> BTreeMap<String, Vec<String>> {
    let mut order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let publishing = async {
        for round in 0..rounds {
            let commands: Vec<Value> = (0..sessions)
                .map(|s| {
                    let session = format!("s-{prefix}-{s:02}");
                    let id = format!("{prefix}-s{s:02}-c{round:02}");
                    order.entry(session.clone()).or_default().push(id.clone());
                    session_command(&id, &session, round % 2 == 1)
                })
                .collect();
            fleet.publish_all(&commands).await;
            tokio::time::sleep(every).await;
        }
    };
    tokio::join!(publishing, during);
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_under_a_name_a_live_one_has_refuses_to_start_and_every_command_ends() {
    let spec = FleetSpec {
        latency: Duration::from_millis(30),
        prefetch: 16,
        ..FleetSpec::partitioned(2, 8)
    };
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(30)).await;
    let name = fleet.replicas[0].name.clone();
    let t = tag();

    // The copy starts while commands keep coming.
    let twin = fleet.add_replica_named(&name);
    let started = Instant::now();
    let order = feed(
        &fleet,
        &format!("twin-{t}"),
        24,
        30,
        Duration::from_millis(200),
        async {},
    )
    .await;
    let status = fleet.replicas[twin]
        .exit_status(Duration::from_secs(20))
        .await;
    let log = fleet.replicas[twin].log();
    assert!(
        !status.success(),
        "a second replica named {name} exited {status}:\n{log}"
    );
    assert!(
        log.contains("fleet.name") && log.contains(&format!("{name}/")),
        "the refusal names neither fleet.name nor the other replica:\n{log}"
    );

    let n = each_ends_once(&mut fleet, &order, Duration::from_secs(60)).await;
    let faults = session_faults(&fleet, &order);
    assert!(faults.is_empty(), "sessions broken: {faults:#?}");
    // The first replica still has its name, and shares the work as before.
    let live = [0, 1];
    fleet.wait_balanced(&live, Duration::from_secs(10)).await;
    eprintln!(
        "a second replica named {name} refused to start ({status}, within {:?} of its start) \
         while {n} commands were published, which all ended, each once: {}",
        started.elapsed(),
        log.lines()
            .rfind(|l| l.contains("in use"))
            .unwrap_or_default()
    );
    fleet.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_and_started_again_at_once_under_its_name_joins_once_its_predecessor_lapses()
 {
    let spec = FleetSpec {
        latency: Duration::from_millis(30),
        ..FleetSpec::partitioned(2, 8)
    };
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(30)).await;
    let t = tag();
    fleet.replicas[1].kill().await;
    let killed = Instant::now();
    // Started again at once: its predecessor is still listed, under the same name.
    fleet.restart(1).await;
    let ready = killed.elapsed();
    let order = feed(
        &fleet,
        &format!("again-{t}"),
        16,
        10,
        Duration::from_millis(200),
        async {},
    )
    .await;
    let balanced = fleet.wait_balanced(&[0, 1], Duration::from_secs(20)).await;
    each_ends_once(&mut fleet, &order, Duration::from_secs(60)).await;
    assert_eq!(
        fleet.replicas[1].readyz().await,
        Some(StatusCode::OK),
        "{}",
        fleet.replicas[1].log()
    );
    eprintln!(
        "a replica killed and started again at once: ready {ready:?} after the kill, the \
         partitions balanced {balanced:?} after that"
    );
    fleet.stop_leaving_nothing().await;
}

/// A replica whose fleet membership panics (fault injection, after its second heartbeat)
/// keeps no holds from then on: it stops as at SIGTERM, hands its queues over, and exits
/// non-zero naming the service, rather than running on without a membership. Every command
/// published meanwhile ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_membership_panics_stops_and_exits_non_zero_naming_it() {
    use transfer_worker::fleet::membership::FAULT_MEMBERSHIP_PANIC_NAME;
    let mut fleet = Fleet::start(FleetSpec::partitioned(1, 4)).await;
    fleet.wait_all_ready().await;
    let broken = fleet.add_replica_with(&format!("{FAULT_MEMBERSHIP_PANIC_NAME}-1"), &[]);
    let status = fleet.replicas[broken]
        .exit_status(Duration::from_secs(30))
        .await;
    let log = fleet.replicas[broken].log();
    assert!(
        !status.success(),
        "a replica whose membership panicked exited 0\n{log}"
    );
    assert!(
        log.contains("fleet membership"),
        "the exit does not name the service that panicked\n{log}"
    );
    let ids: Vec<String> = (0..8).map(|i| format!("after-panic-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        fleet
            .publish(&session_command(id, &format!("s-after-panic-{i}"), false))
            .await;
    }
    fleet
        .events_until(Duration::from_secs(30), |e| {
            crate::partitions::all_ended(e, &ids)
        })
        .await;
}
