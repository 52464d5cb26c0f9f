//! Fairness with many accounts (CONTRACT §12): what the broker carries for backlogs grows with
//! the accounts that have one, and goes once they have drained; taking up a source costs the
//! same with many bots configured as with few.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use transfer_worker::contract::names::account_queue;

use crate::harness::{BotSpec, Fleet, FleetSpec, agent_command};
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

/// The account queues of `accounts` that exist beside any of the fleet's sources.
async fn account_queues_left(fleet: &Fleet, accounts: &[BotSpec]) -> Vec<String> {
    let mut sources = fleet.partition_queues();
    sources.push(fleet.settings.amqp.commands_queue.clone());
    let mut left = Vec::new();
    for source in &sources {
        for bot in accounts {
            let queue = account_queue(source, &bot.account_id);
            if fleet.queue_counts(&queue).await.is_some() {
                left.push(queue);
            }
        }
    }
    left
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
        let left = account_queues_left(&fleet, &accounts).await;
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
