//! `transfer-worker status`: each configured account as the broker sees it (docs/fairness.md):
//! its budget and slots, and its account queues beside the commands queue and each partition,
//! with what waits in them. Works for a worker alone and for a fleet; it reads the broker only.

use std::fmt;

use crate::broker::{BrokerError, connection};
use crate::config::Settings;
use crate::fairness::account::effective_cap;
use crate::tools::fleet_status::{QueueState, queue_state};

/// One account.
#[derive(Debug, Clone)]
pub struct AccountState {
    /// The account id.
    pub id: String,
    /// `rate_limit` per `rate_window`.
    pub budget: (u32, std::time::Duration),
    /// Its slots per worker, as applied.
    pub slots: usize,
    /// Its account queues that exist, with their depth and consumers.
    pub queues: Vec<QueueState>,
}

impl AccountState {
    /// Commands waiting in its account queues.
    pub fn waiting(&self) -> u64 {
        self.queues
            .iter()
            .map(|q| u64::from(q.depth.unwrap_or(0)))
            .sum()
    }
}

/// What `transfer-worker status` prints.
#[derive(Debug, Clone)]
pub struct Status {
    /// The commands queue, and its depth.
    pub commands: QueueState,
    /// Every configured account.
    pub accounts: Vec<AccountState>,
}

/// Reads every account queue the sources list, from the broker.
pub async fn status(settings: &Settings) -> Result<Status, BrokerError> {
    let amqp = &settings.amqp;
    let connection = connection::connect(amqp, "transfer-worker status").await?;
    let result = async {
        let commands =
            queue_state(&connection, &amqp.commands_queue, amqp.operation_timeout).await?;
        let partitions = if settings.fleet.enabled() {
            settings.fleet.partitions
        } else {
            0
        };
        let mut sources = vec![amqp.commands_queue.clone()];
        sources.extend(
            (0..partitions)
                .map(|k| crate::contract::names::partition_queue(&amqp.commands_queue, k)),
        );
        // Each source's list of its account queues (or, where an earlier version left none,
        // each account's queue under the name of then).
        let mut listed: Vec<crate::broker::lane_registry::Entry> = Vec::new();
        for source in &sources {
            match crate::broker::lane_registry::peek(&connection, source, amqp.operation_timeout)
                .await?
            {
                Some(entries) => listed.extend(entries),
                None => listed.extend(settings.bots.iter().map(|bot| {
                    crate::broker::lane_registry::Entry {
                        account: bot.account_id.clone(),
                        queue: crate::contract::names::account_queue_of_old(
                            source,
                            &bot.account_id,
                        ),
                    }
                })),
            }
        }
        let mut accounts: Vec<AccountState> = Vec::new();
        for bot in &settings.bots {
            if accounts.iter().any(|a| a.id == bot.account_id) {
                continue;
            }
            let mut queues = Vec::new();
            for entry in listed.iter().filter(|e| e.account == bot.account_id) {
                let state = queue_state(&connection, &entry.queue, amqp.operation_timeout).await?;
                if state.depth.is_some() {
                    queues.push(state);
                }
            }
            accounts.push(AccountState {
                id: bot.account_id.clone(),
                budget: (bot.rate_limit, bot.rate_window),
                slots: effective_cap(
                    settings.max_in_flight(bot),
                    bot.rate_limit,
                    bot.rate_window,
                    amqp.consumer_timeout,
                    settings.lane_sources(),
                ),
                queues,
            });
        }
        Ok::<_, BrokerError>(Status { commands, accounts })
    }
    .await;
    connection::close(&connection, amqp, "done").await;
    result
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let depth = self
            .commands
            .depth
            .map_or("missing".to_owned(), |d| d.to_string());
        writeln!(
            f,
            "commands queue {}: {depth} waiting, {} consumer(s)",
            self.commands.name, self.commands.consumers
        )?;
        writeln!(f)?;
        let width = self
            .accounts
            .iter()
            .map(|a| a.id.len())
            .chain(["ACCOUNT".len()])
            .max()
            .unwrap_or(0);
        writeln!(
            f,
            "{:<width$}  {:>14}  {:>5}  {:>7}  QUEUES",
            "ACCOUNT", "BUDGET", "SLOTS", "WAITING"
        )?;
        for a in &self.accounts {
            let budget = format!("{}/{}", a.budget.0, humantime::format_duration(a.budget.1));
            let queues = if a.queues.is_empty() {
                "-".to_owned()
            } else {
                a.queues
                    .iter()
                    .map(|q| format!("{} ({})", q.name, q.depth.unwrap_or(0)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            writeln!(
                f,
                "{:<width$}  {budget:>14}  {:>5}  {:>7}  {queues}",
                a.id,
                a.slots,
                a.waiting()
            )?;
        }
        Ok(())
    }
}
