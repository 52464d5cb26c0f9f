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

/// Command `i` of `bot`, in a session of its own.
fn command(bot: &BotSpec, i: usize) -> Value {
    let id = format!("{}-{i:03}", bot.account_id);
    let mut c = agent_command(&id, &format!("s-{id}"));
    c["streamId"] = json!(bot.stream_id);
    c
}

/// Eight paced accounts burst at once into a fleet of two with six partitions: each account's
/// sessions spread over the partitions, so several account queues open beside each. Once every
/// command has ended, every one of them is retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_of_many_accounts_every_account_queue_is_retired() {
    let accounts = paced_accounts("burst", 8, 3, Duration::from_secs(2));
    let mut fleet = Fleet::start_balanced(
        FleetSpec {
            more_bots: accounts.clone(),
            latency: Duration::from_millis(20),
            ..FleetSpec::partitioned(2, 6)
        },
        Duration::from_secs(20),
    )
    .await;
    let commands: Vec<Value> = (0..9)
        .flat_map(|i| accounts.iter().map(move |bot| command(bot, i)))
        .collect();
    let ids: Vec<String> = commands
        .iter()
        .map(|c| c["commandId"].as_str().unwrap().to_owned())
        .collect();
    fleet.publish_all(&commands).await;
    let events = fleet
        .events_until(Duration::from_secs(90), |e| all_ended(e, &ids))
        .await;
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
    let ids: Vec<String> = commands
        .iter()
        .map(|c| c["commandId"].as_str().unwrap().to_owned())
        .collect();
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
