//! A fleet whose Redis fails over (CONTRACT §9, "Redis that fails over"): a primary, its
//! replicas and three sentinels, the primary killed with `kill -9` under load. The fleet
//! follows the new primary through the sentinels; with `fleet.redis_min_replicas = 1` no
//! claimed command is sent again and no window holds more than the limit, and while no replica
//! acknowledges, calls wait. The same failover with the setting at 0 shows what it prevents.
//! And a managed service's primary endpoint that moves, leaving a demoted node behind. (The
//! module's name is what `cargo test sentinel` finds.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use transfer_worker::tools::simulator::Simulator;

use crate::fleet_identity::feed;
use crate::harness::commands::{command_of, session_command};
use crate::harness::redis::{MovingEndpoint, RedisServer};
use crate::harness::sentinel::Sentinels;
use crate::harness::{Fleet, FleetSpec, tag};
use crate::partitions::each_ends_once;

fn spec(set: &Sentinels, min_replicas: u16, limit: u32, window: Duration) -> FleetSpec {
    let mut spec = FleetSpec {
        redis_url: Some(set.url()),
        rate_limit: limit,
        rate_window: window,
        latency: Duration::from_millis(30),
        prefetch: 16,
        ..FleetSpec::partitioned(3, 6)
    };
    spec.env.push((
        "TRANSFER__FLEET__REDIS_MIN_REPLICAS".into(),
        min_replicas.to_string(),
    ));
    spec
}

/// Windows of `limit + 1` calls that arrived within less than `window`, at the simulator's
/// clock: each is a window over the limit.
fn windows_over(sim: &Simulator, limit: u32, window: Duration) -> usize {
    let mut arrivals: Vec<Instant> = sim.requests().iter().map(|r| r.received_at).collect();
    arrivals.sort();
    let n = usize::try_from(limit).expect("a small limit") + 1;
    arrivals
        .windows(n)
        .filter(|w| w[n - 1] - w[0] < window)
        .count()
}

/// Commands the API accepted more than once.
fn accepted_twice(sim: &Simulator) -> Vec<String> {
    let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
    for r in sim.requests() {
        if (200..300).contains(&r.status) {
            *accepted.entry(command_of(&r)).or_default() += 1;
        }
    }
    accepted
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_follows_its_primary_through_a_failover_and_calls_each_command_once() {
    // One replica: what `WAIT 1` acknowledged, the replica the sentinels promote has. (With
    // two, they may promote the one that had not received it yet: docs/fleet.md.)
    let mut set = Sentinels::start(1).await;
    let (limit, window) = (30, Duration::from_secs(1));
    // The fleet waits out the promotion and the old primary's return as a replica (7 to 8 s
    // here), longer than member_ttl (3.25 s): every replica lets its holds go meanwhile, and
    // takes them back after, as production Sentinel (30 s to call a primary down) does at
    // every failover.
    let spec = spec(&set, 1, limit, window);
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(30)).await;
    let t = tag();
    let mut killed = None;
    let order = feed(
        &fleet,
        &format!("failover-{t}"),
        60,
        4,
        Duration::from_millis(1500),
        async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let old = set.kill_primary().await;
            let at = Instant::now();
            let promoted = set.wait_promoted(old, Duration::from_secs(30)).await;
            // Until a replica is back, nothing is acknowledged and calls wait.
            set.restart_as_replica(old, Duration::from_secs(30)).await;
            killed = Some((at, promoted, at.elapsed()));
        },
    )
    .await;
    let n = each_ends_once(&mut fleet, &order, Duration::from_secs(90)).await;
    let (killed_at, promoted, replica_back) = killed.expect("the primary was killed");
    let twice = accepted_twice(&fleet.sim);
    let over = windows_over(&fleet.sim, limit, window);
    // Resumed: the first call that arrived after the old primary was back as a replica.
    let resumed = fleet
        .sim
        .requests()
        .iter()
        .map(|r| r.received_at)
        .filter(|&a| a > killed_at + replica_back)
        .min()
        .map(|a| a - killed_at);
    let mut changes = Vec::new();
    for r in &fleet.replicas {
        changes.push(r.metric("transfer_redis_primary_changes_total").await);
    }
    assert!(twice.is_empty(), "accepted twice: {twice:?}");
    assert_eq!(over, 0, "windows over the limit of {limit} per {window:?}");
    assert!(
        changes.iter().all(|&c| c >= 1.0),
        "every replica follows the new primary: {changes:?}\n{}",
        fleet.log_lines("primary")
    );
    let resumed = resumed.expect("calls resumed on the new primary");
    // The bound: once a replica acknowledges again, a waiting call's next try (at most 2 s
    // apart) and the time to find and check the primary.
    assert!(
        resumed < replica_back + Duration::from_secs(5),
        "calls resumed {resumed:?} after the kill; the promotion took {promoted:?}, a replica \
         was back in sync after {replica_back:?}"
    );
    eprintln!(
        "the primary killed under load: promoted after {promoted:?}, a replica in sync again \
         after {replica_back:?}, calls resumed after {resumed:?}; {n} commands ended, each \
         called once, 0 windows over {limit} per {window:?}; primary changes per replica \
         {changes:?}"
    );
    fleet.stop_leaving_nothing().await;
}

/// What a failover takes with it: the replica's link is stalled (its copy falls behind), two
/// windows' worth of calls are asked for, the primary is killed, what the link held is lost
/// with it, and the lagging replica is promoted. Returns the windows over the limit, and the
/// calls that arrived while the replica lagged.
async fn failover_behind_a_lagging_replica(min_replicas: u16) -> (usize, usize) {
    let mut set = Sentinels::start_stallable().await;
    let (limit, window) = (5, Duration::from_secs(8));
    // No partitions: the active replica asks Redis for every start, and no intake paces the
    // account in its own memory on top (which would hide what Redis forgot).
    let spec = FleetSpec {
        replicas: 2,
        ..spec(&set, min_replicas, limit, window)
    };
    let mut spec = spec;
    for (k, v) in &mut spec.env {
        if k == "TRANSFER__FLEET__PARTITIONS" {
            *v = "0".into();
        }
    }
    let mut fleet = Fleet::start(spec).await;
    let t = tag();
    let link = set.link.take().expect("a stallable replica");
    link.stall();
    let mut order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let commands: Vec<_> = (0..2 * limit)
        .map(|s| {
            let session = format!("s-lag-{t}-{s:02}");
            let id = format!("lag-{t}-s{s:02}");
            order.entry(session.clone()).or_default().push(id.clone());
            session_command(&id, &session, false)
        })
        .collect();
    fleet.publish_all(&commands).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let while_lagging = fleet.sim.requests().len();
    if min_replicas > 0 {
        // The calls wait, and readiness says so, steadily: not back to 200 between two
        // unacknowledged writes.
        for r in &fleet.replicas {
            r.wait_readyz(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(5))
                .await;
        }
        let mut seen = Vec::new();
        for _ in 0..10 {
            for r in &fleet.replicas {
                seen.push(r.readyz().await);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            seen.iter()
                .all(|s| *s == Some(StatusCode::SERVICE_UNAVAILABLE)),
            "readiness while no replica acknowledges: {seen:?}"
        );
        let unacknowledged = fleet.replicas[0]
            .metric_sum("transfer_redis_unacknowledged_total")
            .await
            + fleet.replicas[1]
                .metric_sum("transfer_redis_unacknowledged_total")
                .await;
        assert!(unacknowledged > 0.0, "writes counted unacknowledged");
    }
    let old = set.kill_primary().await;
    link.cut();
    set.wait_promoted(old, Duration::from_secs(30)).await;
    if min_replicas > 0 {
        // No replica is left to acknowledge: the calls still wait…
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            fleet.sim.requests().len(),
            0,
            "a call started with no replica to acknowledge its start"
        );
        // … until the old primary is back as a replica.
        set.restart_as_replica(old, Duration::from_secs(30)).await;
    }
    each_ends_once(&mut fleet, &order, Duration::from_secs(90)).await;
    let twice = accepted_twice(&fleet.sim);
    assert!(twice.is_empty(), "accepted twice: {twice:?}");
    let over = windows_over(&fleet.sim, limit, window);
    let requests = fleet.sim.requests();
    let first = requests.iter().map(|r| r.received_at).min();
    let arrivals: Vec<String> = requests
        .iter()
        .map(|r| {
            format!(
                "{}@{:?}",
                r.status,
                r.received_at - first.unwrap_or(r.received_at)
            )
        })
        .collect();
    eprintln!(
        "min_replicas {min_replicas}: {while_lagging} calls while the replica lagged, \
         {over} windows over {limit} per {window:?}; arrivals {arrivals:?}"
    );
    fleet.stop_leaving_nothing().await;
    (over, while_lagging)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_min_replicas_no_window_goes_over_across_a_failover_and_calls_wait_for_a_replica() {
    let (over, while_lagging) = failover_behind_a_lagging_replica(1).await;
    assert_eq!(while_lagging, 0, "calls started while the replica lagged");
    assert_eq!(over, 0, "windows over the limit across the failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_min_replicas_a_failover_forgets_booked_starts() {
    // What the setting prevents: the starts booked on the primary while its replica lagged are
    // gone with it, and the promoted replica lets a second window's worth through at once.
    let (over, while_lagging) = failover_behind_a_lagging_replica(0).await;
    assert!(
        while_lagging > 0,
        "without acknowledgement calls go on while the replica lags"
    );
    assert!(
        over > 0,
        "a failover that lost booked starts left no window over the limit: the comparison \
         shows nothing"
    );
}

/// `redis-cli -p port args…` must answer OK.
async fn ok(port: u16, args: &[&str]) {
    let answer = crate::harness::sentinel::cli(port, args).await;
    assert_eq!(answer, ["OK"], "redis-cli -p {port} {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_primary_endpoint_that_moves_is_followed_past_a_demoted_node() {
    // A managed service's failover: the replica is promoted, the old primary demoted (it stays
    // up and answers writes with READONLY), and the endpoint's name moves. Connections made
    // before stay with the demoted node: the worker must connect again, not call it forever.
    let a = RedisServer::start().await;
    let b = RedisServer::start_with(vec![
        "--replicaof".into(),
        "127.0.0.1".into(),
        a.port.to_string(),
    ])
    .await;
    let endpoint = MovingEndpoint::start(a.port).await;
    // As the Kubernetes example runs it: each write waits for a replica, so none made on the
    // old primary in the moment between the two REPLICAOFs is relied on.
    let mut spec = FleetSpec {
        redis_url: Some(endpoint.url()),
        latency: Duration::from_millis(30),
        prefetch: 16,
        ..FleetSpec::partitioned(2, 4)
    };
    spec.env
        .push(("TRANSFER__FLEET__REDIS_MIN_REPLICAS".into(), "1".into()));
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(30)).await;
    let t = tag();
    let order = feed(
        &fleet,
        &format!("moved-{t}"),
        20,
        6,
        Duration::from_millis(500),
        async {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            ok(b.port, &["REPLICAOF", "NO", "ONE"]).await;
            ok(a.port, &["REPLICAOF", "127.0.0.1", &b.port.to_string()]).await;
            endpoint.point_to(b.port);
        },
    )
    .await;
    let n = each_ends_once(&mut fleet, &order, Duration::from_secs(60)).await;
    let twice = accepted_twice(&fleet.sim);
    assert!(twice.is_empty(), "accepted twice: {twice:?}");
    let (mut changes, mut errors) = (Vec::new(), Vec::new());
    for r in &fleet.replicas {
        changes.push(r.metric("transfer_redis_primary_changes_total").await);
        errors.push(r.metric_sum("transfer_redis_errors_total").await);
    }
    assert!(
        changes.iter().all(|&c| c >= 1.0),
        "every replica connected to the new primary: {changes:?}"
    );
    eprintln!(
        "the endpoint moved under load: {n} commands ended, each once; primary changes \
         {changes:?}, Redis calls failed {errors:?}"
    );
    fleet.stop_leaving_nothing().await;
}
