//! The vendor's limit at the vendor's clock (CONTRACT §4): no `rate_window` at the API ever
//! holds more than `rate_limit` calls of an account, however late a booked call leaves. Each
//! test holds one call a second between its booked start and the wire (the `fault-injection`
//! feature), as a busy machine or a slow connection would, and checks every window at the
//! simulator's clock, with no slack.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use transfer_worker::agentassist::transfer::FAULT_LATE_DEPARTURE_ORG_ID;
use transfer_worker::tools::simulator::Simulator;

use crate::harness::{Fleet, FleetSpec, Harness, Received, agent_command, free_port, wait_for};

const LIMIT: u32 = 5;
const WINDOW: Duration = Duration::from_secs(2);

/// The most calls the simulator saw within any window, and where that window starts.
fn most_in_a_window(sim: &Simulator) -> (usize, Vec<Duration>) {
    let mut times: Vec<Instant> = sim.requests().iter().map(|r| r.received_at).collect();
    times.sort();
    let first = times.first().copied();
    let offsets = times
        .iter()
        .map(|t| t.duration_since(first.unwrap()))
        .collect();
    let most = (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .filter(|&&t| t - times[i] < WINDOW)
                .count()
        })
        .max()
        .unwrap_or(0);
    (most, offsets)
}

fn ended(event: &Received) -> bool {
    event.name() != "transfer.callback"
}

/// Every command succeeded, and no window at the simulator's clock held more than the limit.
fn assert_succeeded_within_the_limit(events: &[Received], sim: &Simulator) {
    assert!(
        events
            .iter()
            .filter(|e| ended(e))
            .all(|e| e.name() == "transfer.succeeded"),
        "{:?}",
        events.iter().map(|e| e.json.clone()).collect::<Vec<_>>()
    );
    let (most, offsets) = most_in_a_window(sim);
    assert!(
        most <= LIMIT as usize,
        "{most} calls within {WINDOW:?} at the API; arrivals: {offsets:?}"
    );
}

/// Four calls at once; a fifth booked at once too but held on its way; then five more, which
/// the account's booking alone would send a window after the first four: inside the window
/// of the late one.
fn commands(prefix: &str) -> (Vec<Value>, Value, Vec<Value>) {
    let command = |i: &str| agent_command(&format!("{prefix}-{i}"), &format!("s-{prefix}-{i}"));
    let early = (0..4).map(|i| command(&format!("early-{i}"))).collect();
    let mut late = command("late");
    late["orgId"] = json!(FAULT_LATE_DEPARTURE_ORG_ID);
    let after = (0..5).map(|i| command(&format!("after-{i}"))).collect();
    (early, late, after)
}

async fn calls_reach(sim: &Simulator, n: usize) {
    wait_for(
        "the first calls",
        Duration::from_secs(20),
        || format!("{:?}", sim.stats()),
        async || sim.requests().len() >= n,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_leaves_late_does_not_crowd_a_window_at_the_apis_clock() {
    let mut h = Harness::start(|s, _| {
        s.bots[0].rate_limit = LIMIT;
        s.bots[0].rate_window = WINDOW;
    })
    .await;
    let (early, late, after) = commands("alone");
    for c in &early {
        h.publish(c).await;
    }
    calls_reach(&h.sim, 4).await;
    h.publish(&late).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for c in &after {
        h.publish(c).await;
    }
    let events = h.events(10).await;
    assert_succeeded_within_the_limit(&events, &h.sim);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_fleet_a_call_that_leaves_late_does_not_crowd_a_window_at_the_apis_clock() {
    let mut fleet = Fleet::start(FleetSpec {
        rate_limit: LIMIT,
        rate_window: WINDOW,
        latency: Duration::from_millis(20),
        ..FleetSpec::partitioned(2, 4)
    })
    .await;
    let (early, late, after) = commands("fleet");
    fleet.publish_all(&early).await;
    calls_reach(&fleet.sim, 4).await;
    fleet.publish(&late).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.publish_all(&after).await;
    let events = fleet
        .events_until(Duration::from_secs(60), |e| {
            e.iter().filter(|e| ended(e)).count() >= 10
        })
        .await;
    assert_succeeded_within_the_limit(&events, &fleet.sim);
}

/// A call whose connection could not be made reached nobody: it takes nothing from the
/// account's arrivals (a call that may have reached the API counts until its request timeout
/// and a window after). Nothing listens where the bot's API is at first (connections are
/// refused); half a second later a forwarder to the simulator listens there. The retry leaves
/// as soon as the account's booked starts allow, not a request timeout later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_could_not_connect_takes_nothing_from_the_arrivals() {
    let sim_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let api_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut h = Harness::start(|s, sim| {
        sim.listen = sim_addr;
        s.bots[0].base_url = Some(format!("http://{api_addr}"));
        s.bots[0].rate_limit = 1;
        s.bots[0].rate_window = Duration::from_secs(3);
        s.agentassist.request_timeout = Duration::from_secs(20);
        s.retry.initial_delay = Duration::from_millis(100);
        s.retry.max_delay = Duration::from_millis(200);
        s.retry.max_attempts = 5;
    })
    .await;
    let published = Instant::now();
    h.publish(&agent_command("refused-first", "s-refused-first"))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listener = tokio::net::TcpListener::bind(api_addr).await.unwrap();
    let forwarder = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(sim_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    let event = h.next_event().await;
    let took = published.elapsed();
    forwarder.abort();
    assert_eq!(event.name(), "transfer.succeeded", "{}", event.json);
    assert_eq!(
        h.sim.requests().len(),
        1,
        "the refused attempt reached nobody"
    );
    // Booked starts a window and a guard apart: the retry's start is about 3.1 s after the
    // first. Counted as an arrival, the refused attempt would hold it 20 s + 3 s.
    assert!(
        took < Duration::from_secs(12),
        "the retry waited {took:?}: the refused attempt was counted as an arrival"
    );
    h.stop().await.unwrap();
}
