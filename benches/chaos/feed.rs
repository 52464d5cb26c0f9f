//! What the soak publishes and what it sees end: the steady sessions, the bursts, the terminal
//! events, and the history the checks read.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::amqp::{self, Names};
use crate::fleet::Stopped;
use crate::rig::{Account, BURST, FREE, PACED, node_url};
use crate::{Rng, lock};

/// Sessions of each steady account, and commands a second for each.
pub const PACED_SESSIONS: usize = 8;
pub const FREE_SESSIONS: usize = 32;
const PACED_RATE: f64 = 2.0;
const FREE_RATE: f64 = 20.0;
/// The bursting account's sessions; a burst picks some of them.
pub const BURST_SESSIONS: usize = 24;
/// Commands in a burst, sessions it spreads over, and the time between bursts.
pub const BURST_SIZE: (u64, u64) = (12, 24);
pub const BURST_SPREAD: (u64, u64) = (6, 12);
pub const BURST_EVERY_MS: (u64, u64) = (10_000, 20_000);

/// A command as published: its account, and when the broker confirmed it.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub account: &'static str,
    pub at: Instant,
}

/// One fault as applied.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub start: Instant,
    pub end: Instant,
    pub name: &'static str,
    /// As printed: time, name, detail.
    pub line: String,
}

/// One deletion of account queues by the operator.
#[derive(Debug, Clone)]
pub struct Deletion {
    /// When the first `queue.delete` was sent, and when the last was answered.
    pub sent: Instant,
    pub done: Instant,
    /// The queues deleted, each with the broker's count of the messages it held then: the
    /// ready ones only. Those its holder's reader had received went with the queue too: one
    /// that was running still ends, one the reader held while it waited for a slot does not.
    pub queues: Vec<(String, u32)>,
}

impl Deletion {
    /// The most commands this deletion can have taken with it: the ready ones the broker
    /// counted, and, per queue, what its reader may have held unacked and not started (its
    /// prefetch, the burst account's cap).
    pub fn messages(&self) -> u64 {
        let held = crate::rig::BURST.max_in_flight.map_or(0, u64::from);
        (self.queues.iter())
            .map(|(_, n)| u64::from(*n).saturating_add(held))
            .sum()
    }
}

/// What the soak saw.
#[derive(Default)]
pub struct History {
    /// Per session, the commands in publish order (confirmed).
    pub sessions: BTreeMap<String, Vec<String>>,
    /// Every command confirmed by the broker.
    pub commands: HashMap<String, Sent>,
    /// Bursts published, and their commands.
    pub bursts: (u32, usize),
    /// Terminal event names by command.
    pub ended: HashMap<String, Vec<String>>,
    /// When each command's first terminal event came.
    pub ended_at: HashMap<String, Instant>,
    /// When a replica stopped without a word, its calls on the wire in doubt: killed (SIGKILL,
    /// also after a SIGTERM it did not obey in time) or frozen (SIGSTOP).
    pub abrupt: Vec<Instant>,
    /// When Redis was down: killed, until started again (empty).
    pub redis_down: Vec<(Instant, Instant)>,
    /// The operator's deletions of account queues.
    pub deletions: Vec<Deletion>,
    /// Replicas asked to stop (SIGTERM) during the faults, and how they ended.
    pub stopped: Vec<Stopped>,
    /// The same, at the end of the soak.
    pub stopped_at_end: Vec<Stopped>,
    /// Faults applied, by name, and in order.
    pub faults: BTreeMap<&'static str, u32>,
    pub log: Vec<FaultRecord>,
}

fn command(id: &str, session: &str, stream: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "commandId": id,
        "streamId": stream,
        "botSessionId": session,
        "orgId": "o-chaos",
        "aId": format!("a-{id}"),
    }))
    .unwrap_or_default()
}

/// Publishes steady sessions of the paced and the free account, and bursts of the bursting
/// one (timed and spread by `rng`), to node 2 until `stop`, recording what was confirmed.
pub async fn feed(
    names: Names,
    history: Arc<Mutex<History>>,
    mut stop: watch::Receiver<bool>,
    mut rng: Rng,
) -> anyhow::Result<()> {
    let connection = amqp::connect(&node_url(2), "chaos feed").await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let (mut paced_due, mut free_due) = (0.0f64, 0.0f64);
    let mut n = 0u64;
    let started = Instant::now();
    let mut next_burst = started + rng.millis(2000, 6000);
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let t = started.elapsed().as_secs_f64();
        let mut batch: Vec<(&Account, String)> = Vec::new();
        while paced_due <= t * PACED_RATE {
            let s = (paced_due as usize) % PACED_SESSIONS;
            batch.push((&PACED, format!("{}-paced-{s:02}", names.prefix)));
            paced_due += 1.0;
        }
        while free_due <= t * FREE_RATE {
            let s = (free_due as usize) % FREE_SESSIONS;
            batch.push((&FREE, format!("{}-free-{s:02}", names.prefix)));
            free_due += 1.0;
        }
        if Instant::now() >= next_burst {
            let size = BURST_SIZE.0 + rng.below(BURST_SIZE.1 - BURST_SIZE.0 + 1);
            let spread = BURST_SPREAD.0 + rng.below(BURST_SPREAD.1 - BURST_SPREAD.0 + 1);
            let mut sessions: Vec<usize> = (0..BURST_SESSIONS).collect();
            rng.shuffle(&mut sessions);
            sessions.truncate(usize::try_from(spread)?);
            for i in 0..usize::try_from(size)? {
                let s = sessions[i % sessions.len()];
                batch.push((&BURST, format!("{}-burst-{s:02}", names.prefix)));
            }
            let mut h = lock(&history);
            h.bursts.0 += 1;
            h.bursts.1 += usize::try_from(size)?;
            drop(h);
            next_burst = Instant::now() + rng.millis(BURST_EVERY_MS.0, BURST_EVERY_MS.1);
        }
        for (account, session) in batch {
            n += 1;
            let id = format!("{}-c{n:06}", names.prefix);
            let confirm = channel
                .basic_publish(
                    "".into(),
                    names.commands.as_str().into(),
                    BasicPublishOptions::default(),
                    &command(&id, &session, account.stream),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            let confirmed = tokio::time::timeout(Duration::from_secs(30), confirm)
                .await
                .context("a publish was not confirmed in 30 s")??;
            if !confirmed.is_ack() {
                bail!("the broker refused command {id}");
            }
            let at = Instant::now();
            let mut h = lock(&history);
            h.sessions.entry(session).or_default().push(id.clone());
            h.commands.insert(
                id,
                Sent {
                    account: account.id,
                    at,
                },
            );
        }
    }
    let _ = connection.close(200, "fed".into()).await;
    Ok(())
}

/// Records every terminal event, from a quorum queue on node 2 bound to the results.
pub async fn watch_events(
    names: &Names,
    history: Arc<Mutex<History>>,
) -> anyhow::Result<Connection> {
    let connection = amqp::connect(&node_url(2), "chaos events").await?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            names.results.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let queue = format!("{}.chaos-events", names.prefix);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            names.results.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "chaos".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            if let Ok(event) = serde_json::from_slice::<Value>(&delivery.data) {
                let name = event["event"].as_str().unwrap_or_default().to_owned();
                let id = event["commandId"].as_str().unwrap_or_default().to_owned();
                if name != "transfer.callback" && !id.is_empty() {
                    let mut h = lock(&history);
                    h.ended_at.entry(id.clone()).or_insert_with(Instant::now);
                    h.ended.entry(id).or_default().push(name);
                }
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
    });
    Ok(connection)
}
