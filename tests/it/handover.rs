//! Nothing is lost through a hand-over (docs/contract.md §9 "One holder at a time", §12
//! "Nothing is lost on the way"): whatever a source's holder set aside into an account queue,
//! or took back from one, is its own until it has returned and settled it, whoever starts
//! beside it or after it.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::process::env;
use crate::harness::{
    BotSpec, Fleet, FleetSpec, Harness, Received, account_queues_at_broker, account_queues_left,
    agent_command, command_of, redis_url, session_command, sim, test_channel, wait_for,
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
    wait_for(
        "every account queue retired",
        Duration::from_secs(30),
        || fleet.log_tails(40),
        async || account_queues_left(&fleet.settings).is_empty(),
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
    let source = fleet.settings.amqp.commands_queue.clone();
    fleet.publish_all(&paced_commands("od", 4)).await;
    let mut queue = String::new();
    wait_for(
        "the account queue declared",
        Duration::from_secs(10),
        || fleet.log_tails(40),
        async || match account_queues_at_broker(&source, PACED).pop() {
            Some(q) => {
                queue = q;
                true
            }
            None => false,
        },
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
    use transfer_worker::broker::account_queue::{FAULT_BAD_QUEUE_ACCOUNT, FAULT_BAD_QUEUE_TIMES};
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

/// Takes every message of `source`'s list of account queues on `channel`, unacked, as a look
/// from outside does (`transfer-worker status`); returns how many.
async fn hold_list(channel: &lapin::Channel, source: &str) -> usize {
    let list = transfer_worker::contract::names::lane_registry(source);
    let mut held = 0;
    while channel
        .basic_get(
            list.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .expect("basic.get on the list")
        .is_some()
    {
        held += 1;
    }
    held
}

#[tokio::test]
async fn a_list_held_by_a_look_from_outside_is_waited_for_at_take_up() {
    // A backlog in the paced account's queue, a standby beside the active worker.
    let mut fleet = one_replica_with_a_backlog(FleetSpec::default(), "lk", 6).await;
    let ids: BTreeSet<String> = (0..6).map(|i| format!("lk-{i}")).collect();
    fleet.add_replica();
    fleet.wait_all_ready().await;
    // Someone looks at the list from outside just as the standby takes the source over: the
    // queue is empty for a moment, which is not "no list".
    let (conn, looking) = test_channel().await;
    let source = fleet.settings.amqp.commands_queue.clone();
    assert!(hold_list(&looking, &source).await >= 1, "the list was held");
    fleet.replicas[0].kill().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    looking.close(200, "looked".into()).await.expect("close");
    drop(conn);
    all_end(&mut fleet, &ids, Duration::from_secs(60)).await;
    no_account_queue_left(&fleet).await;
    fleet.stop_leaving_nothing().await;
}

#[tokio::test]
async fn a_list_that_cannot_be_read_stalls_its_partition_only_and_sigterm_still_works() {
    let mut fleet =
        Fleet::start_balanced(FleetSpec::partitioned(1, 2), Duration::from_secs(20)).await;
    let cq = fleet.settings.amqp.commands_queue.clone();
    // Both partitions' lists become a queue only the test's own connection may read (what a
    // list without a quorum leader looks like to a reader: every basic.get fails).
    let (conn, locking) = test_channel().await;
    for k in 0..2 {
        let list = transfer_worker::contract::names::lane_registry(&format!("{cq}.p{k}"));
        locking
            .queue_delete(list.as_str().into(), Default::default())
            .await
            .expect("delete the list");
        let exclusive = lapin::options::QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        locking
            .queue_declare(list.as_str().into(), exclusive, Default::default())
            .await
            .expect("an exclusive list");
    }
    // A second replica joins and takes one partition over; it cannot read that partition's
    // list, so the partition's commands wait, and the first replica's partition goes on.
    let joined = fleet.add_replica();
    fleet.wait_balanced(&[0, 1], Duration::from_secs(20)).await;
    let sessions: Vec<String> = (0..40).map(|i| format!("s-ul-{i}")).collect();
    let commands: Vec<Value> = sessions
        .iter()
        .enumerate()
        .map(|(i, s)| session_command(&format!("ul-{i}"), s, false))
        .collect();
    fleet.publish_all(&commands).await;
    let first = fleet
        .events_until(Duration::from_secs(20), |seen| !seen.is_empty())
        .await;
    assert!(
        !first.is_empty(),
        "the other partition's commands end meanwhile"
    );
    // SIGTERM: the replica whose take-up waits for its list still stops within its grace.
    let status = fleet.replicas[joined]
        .terminate(Duration::from_secs(20))
        .await;
    assert!(status.success(), "{}", fleet.replicas[joined].log());
    // The lists come back (gone with the test's connection: taken for a source without one),
    // and every command ends.
    drop(locking);
    let _ = conn.close(200, "done".into()).await;
    let ids: BTreeSet<String> = (0..40).map(|i| format!("ul-{i}")).collect();
    let mut seen: BTreeSet<String> = first.iter().map(|e| e.command_id().to_owned()).collect();
    let rest = fleet
        .events_until(Duration::from_secs(60), |more| {
            ids.iter()
                .all(|id| seen.contains(id) || more.iter().any(|e| e.command_id() == id.as_str()))
        })
        .await;
    seen.extend(rest.iter().map(|e| e.command_id().to_owned()));
    assert!(ids.is_subset(&seen));
    fleet.stop_leaving_nothing().await;
}

#[tokio::test]
async fn an_account_queue_an_earlier_version_left_is_taken_up() {
    // A commands queue an earlier version used, without a list of its account queues, and the
    // paced account's queue under the name of then, holding three commands.
    let settings = crate::harness::test_settings();
    let amqp = &settings.amqp;
    let (conn, channel) = test_channel().await;
    transfer_worker::broker::topology::declare(&channel, amqp)
        .await
        .expect("topology");
    let old = transfer_worker::contract::names::account_queue_of_old(&amqp.commands_queue, PACED);
    transfer_worker::broker::account_queue::declare(&conn, amqp, &old)
        .await
        .expect("the old account queue");
    crate::harness::publish_commands(&channel, &old, &paced_commands("old", 3)).await;
    let mut fleet = Fleet::launch_undeclared(
        FleetSpec {
            replicas: 1,
            more_bots: vec![paced_bot()],
            ..FleetSpec::default()
        },
        settings,
    )
    .await;
    fleet.wait_all_ready().await;
    let ids: BTreeSet<String> = (0..3).map(|i| format!("old-{i}")).collect();
    all_end(&mut fleet, &ids, Duration::from_secs(40)).await;
    assert!(
        fleet
            .log_lines("no list of account queues")
            .contains("no list"),
        "{}",
        fleet.log_tails(20)
    );
    no_account_queue_left(&fleet).await;
    let _ = conn.close(200, "done".into()).await;
    fleet.stop_leaving_nothing().await;
}

/// A reconnect is a hand-over too: the source's next tenure is handed again what the last one
/// held. A command taken in and waiting for its account's only slot when the connection drops
/// finds, once its wait runs out, its redelivered copy and its session's next command queued
/// behind it by the new tenure. It is not set aside (its delivery went back with the
/// connection), and it does not take them along into the old tenure's lanes, which nobody
/// reads any more: both end, once each, in their session's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_waiting_for_a_slot_through_a_reconnect_takes_no_later_tenures_command_along() {
    /// How long a command taken in waits for a slot before it would be set aside.
    const WAIT: Duration = Duration::from_secs(8);
    let (proxy, mut h) = Harness::start_behind_proxy(|s, sim| {
        s.bots[0].max_in_flight = Some(1);
        s.commands.aside_after = WAIT;
        s.agentassist.request_timeout = Duration::from_secs(20);
        sim.latency = Duration::from_secs(12);
    })
    .await;
    // Each to an agent of its own, to tell the calls apart.
    let command = |id: &str, session: &str| {
        let mut c = agent_command(id, session);
        c["aId"] = json!(format!("a-{id}"));
        c
    };
    // The slot's holder: its call takes 12 s.
    h.publish(&command("sweep-first", "s-sweep-first")).await;
    sim::call_on_the_wire(&h.sim).await;
    // Taken in (the account is not congested yet), it waits for the slot for up to 8 s.
    h.publish(&command("sweep-1", "s-sweep")).await;
    let waiting_since = std::time::Instant::now();
    let (what, limit) = ("the second command in hand", Duration::from_secs(5));
    let in_hand = async || h.metrics.commands_in_flight.get() == 2;
    wait_for(what, limit, String::new, in_hand).await;
    proxy.cut();
    let (what, limit) = ("the cut noticed", Duration::from_secs(5));
    wait_for(what, limit, String::new, async || !h.broker.is_ready()).await;
    proxy.restore();
    // The next tenure is handed both commands again, while the old ones are still in memory.
    let (what, limit) = ("both redelivered", Duration::from_secs(10));
    let in_hand = async || h.metrics.commands_in_flight.get() >= 4;
    wait_for(what, limit, String::new, in_hand).await;
    // Queued behind the redelivered copy of `sweep-1`, before the old wait runs out (else
    // nothing would be behind it when it does, and the test would prove nothing).
    h.publish(&command("sweep-2", "s-sweep")).await;
    let (what, limit) = ("the next command in hand", Duration::from_secs(5));
    let in_hand = async || h.metrics.commands_in_flight.get() >= 5;
    wait_for(what, limit, String::new, in_hand).await;
    assert!(
        waiting_since.elapsed() < WAIT - Duration::from_secs(1),
        "the interleaving was not forced: the reconnect took {:?}",
        waiting_since.elapsed()
    );
    let mut ended: Vec<Received> = Vec::new();
    let all = ["sweep-first", "sweep-1", "sweep-2"];
    while let Some(e) = h.events.within(Duration::from_secs(40)).await {
        ended.push(e);
        let ids: BTreeSet<&str> = ended.iter().map(Received::command_id).collect();
        if all.iter().all(|id| ids.contains(id)) {
            break;
        }
    }
    let seen: Vec<(&str, &str)> = ended.iter().map(|e| (e.command_id(), e.name())).collect();
    for id in all {
        let outcomes = seen.iter().filter(|(c, _)| *c == id).count();
        assert!(outcomes >= 1, "{id} never ended (lost): {seen:?}");
        assert!(
            seen.iter()
                .all(|(c, name)| *c != id || *name == "transfer.succeeded"),
            "{seen:?}"
        );
    }
    sim::all_answered(&h.sim, Duration::from_secs(10)).await;
    let calls = sim::calls_by_session(&h.sim);
    let order: Vec<&str> = calls["s-sweep"]
        .iter()
        .map(|r| r.body["aId"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        order,
        ["a-sweep-1", "a-sweep-2"],
        "each called once, in order"
    );
    h.stop_leaving_nothing().await;
}

/// SIGTERM while a session's first command waits for its account's only slot and the next one
/// waits behind it: the first may no longer be set aside (its lanes are let go), and it is not
/// dropped alone either, which would let the second be called here while the first went back
/// to the queue: both go back together with their channel, in order, and the standby calls
/// them in that order.
#[tokio::test]
async fn a_command_waiting_for_a_slot_at_sigterm_goes_back_with_the_rest_of_its_session() {
    const STREAM: &str = "st-00000000-0000-4000-8000-0000000000d1";
    let mut fleet = Fleet::start(FleetSpec {
        replicas: 2,
        latency: Duration::from_secs(6),
        more_bots: vec![BotSpec {
            stream_id: STREAM.into(),
            account_id: "acc-one-slot".into(),
            rate_limit: 100,
            rate_window: Duration::from_secs(1),
            max_in_flight: Some(1),
        }],
        env: env(&[
            ("TRANSFER__COMMANDS__ASIDE_AFTER", "3s"),
            ("TRANSFER__AGENTASSIST__REQUEST_TIMEOUT", "10s"),
            ("TRANSFER__SHUTDOWN__GRACE", "20s"),
        ]),
        ..FleetSpec::default()
    })
    .await;
    let command = |id: &str, session: &str| {
        let mut c = session_command(id, session, false);
        c["streamId"] = json!(STREAM);
        c
    };
    // The slot's holder: its call takes 6 s.
    fleet.publish(&command("slot-0", "s-slot-holder")).await;
    sim::call_on_the_wire(&fleet.sim).await;
    fleet.publish(&command("slot-1", "s-slot")).await;
    fleet.publish(&command("slot-2", "s-slot")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // `slot-1` waits for the slot (up to 3 s), `slot-2` behind it.
    let status = fleet.replicas[0].terminate(Duration::from_secs(40)).await;
    assert!(status.success(), "{}", fleet.replicas[0].log());
    let ids: BTreeSet<String> = ["slot-0", "slot-1", "slot-2"].map(String::from).into();
    all_end(&mut fleet, &ids, Duration::from_secs(60)).await;
    sim::all_answered(&fleet.sim, Duration::from_secs(10)).await;
    let calls = sim::calls_by_session(&fleet.sim);
    let order: Vec<String> = calls["s-slot"].iter().map(command_of).collect();
    assert_eq!(order, ["slot-1", "slot-2"], "each called once, in order");
    fleet.stop_leaving_nothing().await;
}
