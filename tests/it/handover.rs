//! Nothing is lost through a hand-over (docs/contract.md §9 "One holder at a time", §12
//! "Nothing is lost on the way"): whatever a source's holder set aside into an account queue,
//! or took back from one, is its own until it has returned and settled it, whoever starts
//! beside it or after it.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::process::env;
use crate::harness::{
    BotSpec, Fleet, FleetSpec, Received, account_queues, command_of, redis_url, session_command,
    wait_for,
};

/// The paced account: one call every 4 s, at most 3 in flight, so a few commands in a few
/// sessions are enough to set some aside, and the holder's reader takes them all back: the
/// account queue's ready count is 0 while the holder still has every one of them.
const PACED_STREAM: &str = "st-00000000-0000-4000-8000-0000000000c7";
const PACED: &str = "acc-paced";

fn paced_bot() -> BotSpec {
    BotSpec {
        stream_id: PACED_STREAM.into(),
        account_id: PACED.into(),
        rate_limit: 1,
        rate_window: Duration::from_secs(4),
        max_in_flight: Some(3),
    }
}

/// `n` commands of the paced account, each in a session of its own.
fn paced_commands(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mut c =
                session_command(&format!("{prefix}-{i}"), &format!("s-{prefix}-{i}"), false);
            c["streamId"] = json!(PACED_STREAM);
            c
        })
        .collect()
}

/// Waits until every one of `ids` has ended with one event (each once at least), within
/// `limit`.
async fn all_end(fleet: &mut Fleet, ids: &BTreeSet<String>, limit: Duration) -> Vec<Received> {
    let events = fleet
        .events_until(limit, |seen| {
            let ended: BTreeSet<&str> = seen.iter().map(Received::command_id).collect();
            ids.iter().all(|id| ended.contains(id.as_str()))
        })
        .await;
    assert!(
        events.iter().all(|e| e.name() == "transfer.succeeded"),
        "{:?}",
        events
            .iter()
            .map(|e| (e.command_id(), &e.json["event"], &e.json["error"]))
            .collect::<Vec<_>>()
    );
    events
}

/// Waits until no account queue of the fleet's sources is left.
async fn no_account_queue_left(fleet: &Fleet) {
    let queues = account_queues(&fleet.settings);
    wait_for(
        "every account queue retired",
        Duration::from_secs(30),
        || fleet.log_tails(40),
        async || {
            for queue in &queues {
                if fleet.queue_counts(queue).await.is_some() {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// One replica of `spec` (no more) with the paced bot, and `n` of its commands published,
/// some of them set aside into its account queue and taken back one by one.
async fn one_replica_with_a_backlog(spec: FleetSpec, prefix: &str, n: usize) -> Fleet {
    let fleet = Fleet::start(FleetSpec {
        replicas: 1,
        more_bots: vec![paced_bot()],
        ..spec
    })
    .await;
    fleet.publish_all(&paced_commands(prefix, n)).await;
    wait_for(
        "commands set aside",
        Duration::from_secs(10),
        || fleet.log_tails(40),
        async || {
            fleet
                .log_lines("account backlog:")
                .contains("account backlog")
        },
    )
    .await;
    fleet
}

/// One replica of `spec` (no more) with `n` commands of the paced account, some of them set
/// aside; a second replica starts beside it, and `overlap` later the first gets SIGTERM. Every
/// command ends, and no account queue is left.
async fn second_replica_then_sigterm(spec: FleetSpec, prefix: &str, n: usize, overlap: Duration) {
    let mut fleet = one_replica_with_a_backlog(spec, prefix, n).await;
    let ids: BTreeSet<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    fleet.add_replica();
    tokio::time::sleep(overlap).await;
    let status = fleet.replicas[0].terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", fleet.replicas[0].log());
    all_end(&mut fleet, &ids, Duration::from_secs(60)).await;
    no_account_queue_left(&fleet).await;
    fleet.stop_leaving_nothing().await;
}

#[tokio::test]
async fn a_hot_standby_beside_the_active_worker_loses_nothing() {
    // The standby starts beside the active worker, then the active one is stopped.
    second_replica_then_sigterm(FleetSpec::default(), "sb", 4, Duration::from_secs(4)).await;
}

#[tokio::test]
async fn two_hand_overs_in_a_row_with_a_delivery_limit_of_one_lose_nothing() {
    // With a delivery limit of 1, commands the holders' readers had received go back at each
    // hand-over and are delivered again. RabbitMQ 3.13 counts those returns, 4.0 every
    // delivery: an account queue with the commands queue's limit would dead-letter them, with
    // no outcome (3.10 counts neither, and passes either way).
    let spec = FleetSpec {
        env: env(&[("TRANSFER__AMQP__DELIVERY_LIMIT", "1")]),
        ..FleetSpec::default()
    };
    let mut fleet = one_replica_with_a_backlog(spec, "dl", 6).await;
    // Two hand-overs while the backlog waits (6 commands at one every 4 s): each holder's
    // reader has received what waits, and each gives it back.
    for stopped in 0..2 {
        fleet.add_replica();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let status = fleet.replicas[stopped]
            .terminate(Duration::from_secs(30))
            .await;
        assert!(status.success(), "{}", fleet.replicas[stopped].log());
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let ids: BTreeSet<String> = (0..6).map(|i| format!("dl-{i}")).collect();
    all_end(&mut fleet, &ids, Duration::from_secs(60)).await;
    no_account_queue_left(&fleet).await;
    fleet.stop_leaving_nothing().await;
}

#[tokio::test]
async fn a_rolling_update_with_a_new_replica_first_loses_nothing() {
    // The new pod first, under a name of its own. It joins, and the old one hands it half the
    // partitions while their lanes still wait for the account's budget, longer than the grace;
    // once the new one has taken them up, the old one goes.
    let spec = FleetSpec::partitioned(1, 6);
    second_replica_then_sigterm(spec, "ru", 9, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn an_account_queue_deleted_behind_the_workers_back_is_declared_again() {
    let mut fleet = Fleet::start(FleetSpec {
        replicas: 1,
        more_bots: vec![paced_bot()],
        ..FleetSpec::default()
    })
    .await;
    let queue =
        transfer_worker::contract::names::account_queue(&fleet.settings.amqp.commands_queue, PACED);
    fleet.publish_all(&paced_commands("od", 4)).await;
    wait_for(
        "the account queue declared",
        Duration::from_secs(10),
        || fleet.log_tails(40),
        async || fleet.queue_counts(&queue).await.is_some(),
    )
    .await;
    // The next command set aside waits 2 s before its publish; meanwhile an operator deletes
    // the queue, with what it holds (those commands are gone by their hand). The publish
    // comes back unroutable.
    let mut slow = paced_commands("od-slow", 1).remove(0);
    slow["orgId"] = json!(transfer_worker::pipeline::lanes::FAULT_SLOW_ASIDE_ORG_ID);
    fleet.publish(&slow).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    fleet
        .channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .expect("delete the account queue");
    // The worker notices, declares the queue again, and what it set aside ends.
    let later = paced_commands("od-later", 2);
    fleet.publish_all(&later).await;
    let ids: BTreeSet<String> = ["od-slow-0", "od-later-0", "od-later-1"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    all_end(&mut fleet, &ids, Duration::from_secs(40)).await;
    no_account_queue_left(&fleet).await;
    fleet.stop_leaving_nothing().await;
}

#[tokio::test]
async fn a_partition_taken_back_while_its_hand_over_drains_keeps_its_hold() {
    // Calls take 12 s and the grace is 10 s: a partition handed over drains for 10 s.
    let mut spec = FleetSpec::partitioned(1, 2);
    spec.latency = Duration::from_secs(12);
    spec.env.extend(env(&[
        ("TRANSFER__SHUTDOWN__GRACE", "10s"),
        ("TRANSFER__AGENTASSIST__REQUEST_TIMEOUT", "30s"),
    ]));
    let mut fleet = Fleet::start(spec).await;
    let commands: Vec<Value> = (0..8)
        .map(|i| session_command(&format!("rt-{i}"), &format!("s-rt-{i}"), false))
        .collect();
    fleet.publish_all(&commands).await;
    wait_for(
        "calls on the wire in both partitions",
        Duration::from_secs(10),
        || fleet.log_tails(20),
        async || fleet.sim.requests().len() >= 8,
    )
    .await;
    // A second replica joins, so the first hands one partition over (draining); the second
    // dies at once, so the partition comes back to the first while its hand-over drains.
    let joined = fleet.add_replica();
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.replicas[joined].kill().await;
    let ids: BTreeSet<String> = (0..8).map(|i| format!("rt-{i}")).collect();
    all_end(&mut fleet, &ids, Duration::from_secs(60)).await;
    // Past the hand-over's end the first replica consumes both partitions, and holds both.
    let cq = fleet.settings.amqp.commands_queue.clone();
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    wait_for(
        "both partitions consumed by the first replica",
        Duration::from_secs(30),
        || fleet.log_tails(30),
        async || fleet.owned(0).await == Some(2.0),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for k in 0..2 {
        let queue = format!("{cq}.p{k}");
        let holder: Option<String> = redis::cmd("GET")
            .arg(format!("{cq}:hold:{queue}"))
            .query_async(&mut redis)
            .await
            .expect("GET");
        assert!(
            holder.is_some_and(|h| h.starts_with(&fleet.replicas[0].name)),
            "{queue} is consumed without its hold\n{}",
            fleet.log_tails(40)
        );
    }
    fleet.stop_leaving_nothing().await;
}

#[tokio::test]
async fn an_account_queue_that_fails_every_consume_stalls_only_itself() {
    use transfer_worker::pipeline::lanes::{FAULT_BAD_QUEUE_ACCOUNT, FAULT_BAD_QUEUE_TIMES};
    // The first readers of this account's queue make the broker close their connection.
    const BAD_STREAM: &str = "st-00000000-0000-4000-8000-0000000000c8";
    let mut fleet = Fleet::start(FleetSpec {
        replicas: 1,
        more_bots: vec![BotSpec {
            stream_id: BAD_STREAM.into(),
            account_id: FAULT_BAD_QUEUE_ACCOUNT.into(),
            ..paced_bot()
        }],
        ..FleetSpec::default()
    })
    .await;
    let bad: Vec<Value> = (0..5)
        .map(|i| {
            let mut c = session_command(&format!("bq-{i}"), &format!("s-bq-{i}"), false);
            c["streamId"] = json!(BAD_STREAM);
            c
        })
        .collect();
    fleet.publish_all(&bad).await;
    wait_for(
        "the account queue failing",
        Duration::from_secs(20),
        || fleet.log_tails(40),
        async || {
            fleet
                .log_lines("cannot consume an account queue")
                .contains(FAULT_BAD_QUEUE_ACCOUNT)
        },
    )
    .await;
    // Every other account's commands flow meanwhile.
    let default_stream = fleet.settings.bots[0].stream_id.clone();
    let others: Vec<Value> = (0..20)
        .map(|i| {
            let mut c = session_command(&format!("ok-{i}"), &format!("s-ok-{i}"), false);
            c["streamId"] = json!(default_stream);
            c
        })
        .collect();
    fleet.publish_all(&others).await;
    let ids: BTreeSet<String> = (0..20)
        .map(|i| format!("ok-{i}"))
        .chain((0..5).map(|i| format!("bq-{i}")))
        .collect();
    all_end(&mut fleet, &ids, Duration::from_secs(90)).await;
    let r = &fleet.replicas[0];
    let failures = r
        .metric(&format!(
            "transfer_account_queue_failures_total{{account=\"{FAULT_BAD_QUEUE_ACCOUNT}\"}}"
        ))
        .await;
    assert!(
        failures >= f64::from(FAULT_BAD_QUEUE_TIMES),
        "{failures} failures counted\n{}",
        r.log()
    );
    // The replica's own connection (intake, holder token, publisher) never went.
    assert_eq!(
        r.metric("transfer_broker_reconnects_total").await,
        0.0,
        "{}",
        r.log()
    );
    assert!(
        fleet
            .log_lines("used on a connection of its own")
            .contains(FAULT_BAD_QUEUE_ACCOUNT),
        "{}",
        r.log()
    );
    no_account_queue_left(&fleet).await;
    fleet.stop_leaving_nothing().await;
}

#[tokio::test]
async fn a_call_on_the_wire_at_the_grace_ends_here_and_is_not_called_again_by_the_standby() {
    // Calls take 3 s and the grace is 1 s: the holder is stopped while a command it took back
    // from the account queue is on the wire. It waits for the answer, as for the queue's own
    // commands, and acks it there; the standby never sees it again.
    let spec = FleetSpec {
        latency: Duration::from_secs(3),
        env: env(&[("TRANSFER__SHUTDOWN__GRACE", "1s")]),
        ..FleetSpec::default()
    };
    let mut fleet = one_replica_with_a_backlog(spec, "wg", 4).await;
    fleet.add_replica();
    // The second call is of a command taken back from the account queue.
    wait_for(
        "a command taken back on the wire",
        Duration::from_secs(20),
        || fleet.log_tails(40),
        async || fleet.sim.requests().len() >= 2,
    )
    .await;
    let status = fleet.replicas[0].terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", fleet.replicas[0].log());
    let ids: BTreeSet<String> = (0..4).map(|i| format!("wg-{i}")).collect();
    all_end(&mut fleet, &ids, Duration::from_secs(60)).await;
    let mut calls: Vec<String> = fleet.sim.requests().iter().map(command_of).collect();
    calls.sort();
    let mut once = calls.clone();
    once.dedup();
    let arrivals: Vec<(String, Duration)> = {
        let requests = fleet.sim.requests();
        let t0 = requests[0].received_at;
        requests
            .iter()
            .map(|r| (command_of(r), r.received_at.duration_since(t0)))
            .collect()
    };
    assert_eq!(
        calls,
        once,
        "called twice: {arrivals:?}\n{}",
        fleet.log_tails(200)
    );
    no_account_queue_left(&fleet).await;
    fleet.stop_leaving_nothing().await;
}
