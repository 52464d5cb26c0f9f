//! A fleet's Redis that loses its data (CONTRACT §9): flushed, or restarted without
//! persistence, under load. Every replica's membership and holds are gone at once; the first
//! to heartbeat again must not see itself alone and take every hold, or the others find theirs
//! taken and drop their connections, and the whole fleet churns. What it costs instead: at most
//! a rebalance; no replica drops its broker connection, every command ends once.

use std::time::{Duration, Instant};

use crate::fleet_identity::feed;
use crate::harness::redis::RedisServer;
use crate::harness::{Fleet, FleetSpec, tag};
use crate::partitions::each_ends_once;
use crate::rolling::session_faults;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_loses_its_data_drops_no_broker_connection_and_every_command_ends_once() {
    let mut redis = RedisServer::start().await;
    let spec = FleetSpec {
        redis_url: Some(redis.url()),
        latency: Duration::from_millis(50),
        prefetch: 16,
        ..FleetSpec::partitioned(3, 12)
    };
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(30)).await;
    let t = tag();
    let began = Instant::now();
    let mut lost_at = Vec::new();
    let order = feed(
        &fleet,
        &format!("wipe-{t}"),
        24,
        50,
        Duration::from_millis(200),
        async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            redis.flush_all().await;
            lost_at.push(("FLUSHALL", began.elapsed()));
            tokio::time::sleep(Duration::from_secs(4)).await;
            redis.kill().await;
            redis.restart().await;
            lost_at.push(("restarted empty", began.elapsed()));
        },
    )
    .await;
    let n = each_ends_once(&mut fleet, &order, Duration::from_secs(60)).await;

    let mut reconnects = Vec::new();
    let mut rebalances = Vec::new();
    for r in &fleet.replicas {
        reconnects.push(r.metric("transfer_broker_reconnects_total").await);
        rebalances.push(r.metric("transfer_fleet_rebalances_total").await);
    }
    let lost = fleet.log_lines("holds lost");
    let lost_lines = lost.lines().filter(|l| l.contains("holds lost")).count();
    assert!(
        reconnects.iter().all(|&r| r == 0.0) && lost_lines == 0,
        "Redis losing its data made replicas drop their broker connections: reconnects \
         {reconnects:?}, {lost_lines} holds lost\n{lost}\n{}",
        fleet.log_lines("partition")
    );
    let faults = session_faults(&fleet, &order);
    assert!(faults.is_empty(), "sessions broken: {faults:#?}");
    fleet
        .wait_balanced(&[0, 1, 2], Duration::from_secs(10))
        .await;
    eprintln!(
        "Redis lost its data twice ({lost_at:?} into the load): {n} commands ended, each once, \
         in order; broker reconnects {reconnects:?}, rebalances {rebalances:?} (their start \
         included)"
    );
    fleet.stop_leaving_nothing().await;
}
