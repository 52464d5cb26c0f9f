//! Fairness with many accounts (CONTRACT §12): what the broker carries for backlogs grows with
//! the accounts that have one, and goes once they have drained; taking up a source costs the
//! same with many bots configured as with few.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{BotSpec, Fleet, FleetSpec, account_queues_left, agent_command};
use crate::partitions::all_ended;

/// `n` accounts of their own, each `limit` calls per `window`.
fn paced_accounts(prefix: &str, n: usize, limit: u32, window: Duration) -> Vec<BotSpec> {
    (0..n)
        .map(|i| BotSpec {
            stream_id: format!("st-{prefix}-{i:04}"),
            account_id: format!("acc-{prefix}-{i:04}"),
            rate_limit: limit,
            rate_window: window,
            max_in_flight: None,
        })
        .collect()
}

/// A fleet of `replicas` with `partitions` partitions, balanced, with `accounts` configured
/// beside its own bots, and an API that answers in 20 ms.
async fn paced_fleet(accounts: &[BotSpec], replicas: usize, partitions: u16) -> Fleet {
    let spec = FleetSpec {
        more_bots: accounts.to_vec(),
        latency: Duration::from_millis(20),
        ..FleetSpec::partitioned(replicas, partitions)
    };
    Fleet::start_balanced(spec, Duration::from_secs(20)).await
}

/// The ids of `commands`.
fn ids_of(commands: &[Value]) -> Vec<String> {
    commands
        .iter()
        .map(|c| c["commandId"].as_str().unwrap().to_owned())
        .collect()
}

/// Command `i` of `bot`, in a session of its own.
fn command(bot: &BotSpec, i: usize) -> Value {
    let id = format!("{}-{i:03}", bot.account_id);
    let mut c = agent_command(&id, &format!("s-{id}"));
    c["streamId"] = json!(bot.stream_id);
    c
}

/// The account queues seen at the broker while sampling.
#[derive(Default)]
struct Seen {
    /// The most at once.
    peak: Vec<String>,
    /// Every one seen at all.
    all: std::collections::BTreeSet<String>,
}

/// Samples the account queues of `settings` at the broker until `stop`.
fn sample_account_queues(
    settings: transfer_worker::config::Settings,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let now = account_queues_left(&settings);
            seen.all.extend(now.iter().cloned());
            if now.len() > seen.peak.len() {
                seen.peak = now;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        seen
    })
}

/// Eight paced accounts burst at once into a fleet of two with six partitions: each account's
/// sessions spread over the partitions. What waits is set aside at the intake, in one queue
/// per account with a backlog, never one per account and partition; once every command has
/// ended, every one of them is retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_of_many_accounts_every_account_queue_is_retired() {
    let accounts = paced_accounts("burst", 8, 3, Duration::from_secs(2));
    let mut fleet = paced_fleet(&accounts, 2, 6).await;
    let (events, peak) = burst(&mut fleet, &accounts, "burst", 9).await;
    assert!(
        peak.len() <= accounts.len(),
        "{} account queues at once for {} accounts: {peak:?}",
        peak.len(),
        accounts.len()
    );
    assert!(
        events
            .iter()
            .filter(|e| e.name() != "transfer.callback")
            .all(|e| e.name() == "transfer.succeeded"),
        "every command succeeded"
    );
    let log = fleet.log_tails(200);
    assert!(
        log.contains("account backlog"),
        "the burst set commands aside, or this test shows nothing:\n{log}"
    );
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let left = account_queues_left(&fleet.settings);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "account queues left 30 s after the last command ended: {left:?}\n{}",
            fleet.log_tails(60)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A thousand bots configured, each its own account, and none with a backlog: a replica that
/// joins a fleet takes up its partitions without a look per configured bot (each source's list
/// of its account queues is read instead: docs/fairness.md, "Which account queues a source
/// has"), and a hundred commands of one bot then end promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taking_up_partitions_does_not_grow_with_the_bots_configured() {
    let bots = paced_accounts("many", 999, 60, Duration::from_secs(60));
    let mut fleet = Fleet::start_balanced(
        FleetSpec {
            more_bots: bots,
            ..FleetSpec::partitioned(1, 12)
        },
        Duration::from_secs(20),
    )
    .await;
    fleet.add_replica();
    fleet.wait_all_ready().await;
    let took = fleet.wait_balanced(&[0, 1], Duration::from_secs(20)).await;
    let commands: Vec<Value> = (0..100)
        .map(|i| agent_command(&format!("one-{i:03}"), &format!("s-one-{i:03}")))
        .collect();
    let ids = ids_of(&commands);
    let published = Instant::now();
    fleet.publish_all(&commands).await;
    // A coarse bound: a look per bot and partition takes minutes on a busy broker.
    fleet
        .events_until(Duration::from_secs(20), |e| all_ended(e, &ids))
        .await;
    eprintln!(
        "partitions shared {took:?} after the join; 100 commands ended {:?} after publishing",
        published.elapsed()
    );
    // Every source the two took up had its list, empty: not one account queue was looked for.
    for i in 0..2 {
        let metrics = fleet.replicas[i].try_metrics().await.expect("metrics");
        let looks = metrics.get("transfer_account_queue_looks_total").copied();
        assert_eq!(
            looks,
            Some(0.0),
            "replica {i} looked for account queues one by one\n{}",
            fleet.log_tails(20)
        );
    }
}

/// Whether `queue` is an account queue beside the commands queue of `settings`.
fn beside_the_intake(queue: &str, settings: &transfer_worker::config::Settings) -> bool {
    settings.bots.iter().any(|b| {
        crate::harness::is_account_queue(queue, &settings.amqp.commands_queue, &b.account_id)
    })
}

/// Bursts `per_account` commands of each of `accounts` (ids tagged `round`, each in a
/// session of its own) into `fleet` and waits for them to end: their events, and the most
/// account queues seen at once meanwhile.
async fn burst(
    fleet: &mut Fleet,
    accounts: &[BotSpec],
    round: &str,
    per_account: usize,
) -> (Vec<crate::harness::Received>, Vec<String>) {
    let commands: Vec<Value> = (0..per_account)
        .flat_map(|i| {
            accounts.iter().map(move |bot| {
                let mut c = command(bot, i);
                let id = format!("{round}-{}", c["commandId"].as_str().unwrap());
                c["commandId"] = json!(id);
                c["botSessionId"] = json!(format!("s-{id}"));
                c
            })
        })
        .collect();
    let ids = ids_of(&commands);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_account_queues(fleet.settings.clone(), stop.clone());
    fleet.publish_all(&commands).await;
    let events = fleet
        .events_until(Duration::from_secs(90), |e| all_ended(e, &ids))
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (events, sampler.join().unwrap().peak)
}

/// While a replica of an earlier version is a member of the fleet, the commands queue may pass
/// to it, and it would not read what the intake set aside there: the intake sets nothing aside
/// meanwhile (the partitions keep the accounts apart, as before), and does again once that
/// replica has left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_a_replica_of_an_earlier_version_the_intake_sets_nothing_aside() {
    use transfer_worker::fleet::membership::FAULT_EARLIER_VERSION_NAME;
    let accounts = paced_accounts("mixed", 2, 2, Duration::from_secs(2));
    let mut fleet = paced_fleet(&accounts, 1, 4).await;
    let earlier = fleet.add_replica_with(&format!("{FAULT_EARLIER_VERSION_NAME}-1"), &[]);
    fleet.wait_all_ready().await;
    fleet
        .wait_balanced(&[0, earlier], Duration::from_secs(20))
        .await;
    let (_, peak) = burst(&mut fleet, &accounts, "mixed", 10).await;
    assert!(
        !peak.is_empty(),
        "the burst set nothing aside, so this test shows nothing\n{}",
        fleet.log_tails(40)
    );
    let at_intake: Vec<&String> = peak
        .iter()
        .filter(|q| beside_the_intake(q, &fleet.settings))
        .collect();
    assert!(
        at_intake.is_empty(),
        "set aside at the intake beside a replica of an earlier version: {at_intake:?}"
    );

    fleet.replicas[earlier]
        .terminate(Duration::from_secs(30))
        .await;
    fleet.wait_balanced(&[0], Duration::from_secs(20)).await;
    let (_, peak) = burst(&mut fleet, &accounts, "alone", 10).await;
    assert!(
        peak.iter().any(|q| beside_the_intake(q, &fleet.settings)),
        "once every member admits, a burst is set aside at the intake: {peak:?}"
    );
}

/// The replica holding the commands queue gets SIGTERM while an account's commands wait at its
/// intake for their admission: nothing has been done for them, so they go back at once and the
/// commands queue changes hands without waiting for `shutdown.grace`. Another account's command
/// published just after ends within seconds, and every command ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intake_stopped_with_commands_waiting_for_admission_hands_over_at_once() {
    // The commands taken back for admission wait up to 15 s: longer than a hand-over may take.
    let slow = paced_accounts("slow", 1, 2, Duration::from_secs(15));
    let free = paced_accounts("free", 1, 60, Duration::from_secs(60));
    let mut spec = FleetSpec {
        more_bots: [slow.clone(), free.clone()].concat(),
        latency: Duration::from_millis(20),
        ..FleetSpec::partitioned(2, 4)
    };
    spec.env
        .push(("TRANSFER__SHUTDOWN__GRACE".into(), "30s".into()));
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(20)).await;
    let commands: Vec<Value> = (0..6).map(|i| command(&slow[0], i)).collect();
    let mut ids = ids_of(&commands);
    fleet.publish_all(&commands).await;
    let intake = fleet.the_intake().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.replicas[intake].sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = command(&free[0], 0);
    let other_id = other["commandId"].as_str().unwrap().to_owned();
    let published = Instant::now();
    fleet.publish(&other).await;
    let early = fleet
        .events_until(Duration::from_secs(60), |e| {
            all_ended(e, std::slice::from_ref(&other_id))
        })
        .await;
    let took = published.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "another account's command waited {took:?} for the commands queue to change hands\n{}",
        fleet.log_tails(40)
    );
    // The rest of the backlog ends too.
    ids.retain(|id| !all_ended(&early, [id]));
    fleet
        .events_until(Duration::from_secs(90), |e| all_ended(e, &ids))
        .await;
}

/// The replica holding the commands queue gets SIGTERM while several accounts have a backlog
/// set aside at its intake, a window of each already booked across the fleet. The replica that
/// takes the commands queue over admits from where the fleet's budgets stand: what it routes,
/// the partitions start at once, and no account queue is ever declared beside a partition.
/// (An intake that started from empty budgets admitted a second window's worth at once; the
/// partitions could start none of it within `aside_after` and set it aside in queues of their
/// own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intake_taken_over_admits_from_the_fleets_budgets() {
    let accounts = paced_accounts("over", 3, 3, Duration::from_secs(6));
    let mut fleet = paced_fleet(&accounts, 2, 4).await;
    let commands: Vec<Value> = (0..9)
        .flat_map(|i| accounts.iter().map(move |bot| command(bot, i)))
        .collect();
    let ids = ids_of(&commands);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_account_queues(fleet.settings.clone(), stop.clone());
    fleet.publish_all(&commands).await;
    let intake = fleet.the_intake().await;
    // The first window of each account is booked and the rest set aside at the intake.
    let until = Instant::now() + Duration::from_secs(10);
    while !account_queues_left(&fleet.settings)
        .iter()
        .any(|q| beside_the_intake(q, &fleet.settings))
    {
        assert!(
            Instant::now() < until,
            "nothing was set aside at the intake"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.replicas[intake].sigterm();
    let events = fleet
        .events_until(Duration::from_secs(90), |e| all_ended(e, &ids))
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = sampler.join().unwrap();
    assert!(
        events
            .iter()
            .filter(|e| e.name() != "transfer.callback")
            .all(|e| e.name() == "transfer.succeeded"),
        "every command succeeded"
    );
    let beside_partitions: Vec<&String> = seen
        .all
        .iter()
        .filter(|q| !beside_the_intake(q, &fleet.settings))
        .collect();
    assert!(
        beside_partitions.is_empty(),
        "account queues beside partitions after the intake changed hands: {beside_partitions:?}\n{}",
        fleet.log_tails(60)
    );
}

/// An account with a single slot has a command whose partition refuses it for a while (the
/// broker nacks every publish there, as at a queue's length limit): the intake lets the slot go
/// before it routes, so the account's later commands, in sessions of their own, go on and end
/// before the refused one does. (While the slot was kept through the retries, they waited for
/// it, set aside, and ended after it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_its_partition_refuses_holds_up_none_of_its_accounts_other_sessions() {
    use transfer_worker::pipeline::intake::FAULT_REFUSED_ROUTE_ORG_ID;
    let mut bot = paced_accounts("refused", 1, 60, Duration::from_secs(60));
    bot[0].max_in_flight = Some(1);
    let mut fleet = paced_fleet(&bot, 1, 2).await;
    let mut refused = command(&bot[0], 0);
    refused["orgId"] = json!(FAULT_REFUSED_ROUTE_ORG_ID);
    let refused_id = refused["commandId"].as_str().unwrap().to_owned();
    fleet.publish(&refused).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let others: Vec<Value> = (1..4).map(|i| command(&bot[0], i)).collect();
    fleet.publish_all(&others).await;
    let ids = ids_of(&others);
    let events = fleet
        .events_until(Duration::from_secs(30), |e| all_ended(e, &ids))
        .await;
    assert!(
        !all_ended(&events, [&refused_id]),
        "the refused command ended before the account's other sessions did: they waited for its slot\n{}",
        fleet.log_tails(40)
    );
    fleet
        .events_until(Duration::from_secs(30), |e| all_ended(e, [&refused_id]))
        .await;
}
