//! The test's own view of a broker: confirm-mode channels, publishing with confirms, reading and
//! counting queues, and the cleanup of what a test declared.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use transfer_worker::broker::topology;
use transfer_worker::config::{AmqpSettings, Settings};

use super::events::EVENT_WAIT;
use super::names::{amqp_url, test_settings, worker_queues};

/// Opens a confirm-mode channel on the test broker.
pub async fn test_channel() -> (Connection, Channel) {
    test_channel_at(&amqp_url()).await
}

/// Like [`test_channel`], on the broker at `url`.
pub async fn test_channel_at(url: &str) -> (Connection, Channel) {
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect in time")
    .unwrap_or_else(|e| panic!("no broker answers at {url}: {e}"));
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, channel)
}

/// A confirm-mode channel on the broker at `url`, with the topology of `amqp` declared there.
pub async fn declared_at(url: &str, amqp: &AmqpSettings) -> (Connection, Channel) {
    let (conn, channel) = test_channel_at(url).await;
    let mut direct = amqp.clone();
    direct.url = url.to_owned();
    // As a worker does at connect: a new commands queue gets its list of account queues.
    let publisher = transfer_worker::broker::Publisher::open(&conn, &direct)
        .await
        .expect("publisher");
    transfer_worker::broker::lane_registry::prepare(
        &conn,
        &direct,
        &publisher,
        std::slice::from_ref(&direct.commands_queue),
    )
    .await
    .expect("list of account queues");
    topology::declare(&channel, &direct)
        .await
        .expect("topology");
    (conn, channel)
}

/// Like [`declared_at`], on the test broker.
pub async fn declared(amqp: &AmqpSettings) -> (Connection, Channel) {
    declared_at(&amqp_url(), amqp).await
}

/// Settings with this test's own names ([`test_settings`]), and the cleanup of everything a
/// worker may declare under them.
pub fn own_topology() -> (Settings, Cleanup) {
    let settings = test_settings();
    let cleanup = Cleanup::topology(&settings);
    (settings, cleanup)
}

/// A server-named queue for this connection only.
pub async fn private_queue(channel: &Channel) -> String {
    topology::private_queue(channel, Duration::from_secs(10))
        .await
        .expect("private queue")
        .to_string()
}

/// Publishes `messages` (body, properties) to `exchange` with `routing_key`, back to back, and
/// asserts that the broker confirmed every one.
pub async fn publish_confirmed<B: AsRef<[u8]>>(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    messages: impl IntoIterator<Item = (B, BasicProperties)>,
) {
    let mut confirms = Vec::new();
    for (body, properties) in messages {
        confirms.push(
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body.as_ref(),
                    properties,
                )
                .await
                .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }
}

/// Publishes JSON commands to `queue`, persistent, confirmed together.
pub async fn publish_commands(channel: &Channel, queue: &str, commands: &[Value]) {
    let persistent = BasicProperties::default().with_delivery_mode(2);
    let messages: Vec<_> = commands
        .iter()
        .map(|c| (serde_json::to_vec(c).unwrap(), persistent.clone()))
        .collect();
    publish_confirmed(channel, "", queue, messages).await;
}

/// Takes every message of `queue` off it (no acks), until none comes for half a second.
pub async fn take_all(channel: &Channel, queue: &str) -> Vec<Delivery> {
    let tag = format!("take-all-{}", uuid::Uuid::new_v4().simple());
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            options,
            FieldTable::default(),
        )
        .await
        .expect("consume the queue");
    let mut taken = Vec::new();
    while let Ok(next) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
        match next {
            Some(Ok(delivery)) => taken.push(delivery),
            other => panic!("the queue's consumer ended: {other:?}"),
        }
    }
    channel
        .basic_cancel(tag.as_str().into(), Default::default())
        .await
        .expect("cancel");
    taken
}

/// A queue's counts, without declaring it (it must exist).
pub async fn passive(channel: &Channel, queue: &str) -> lapin::Queue {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .unwrap()
}

/// A queue's ready messages and consumers, or `None` when it does not exist. Each look is on a
/// channel of its own: a passive declare of a missing queue closes its channel.
pub async fn queue_counts(conn: &Connection, queue: &str) -> Option<(u32, u32)> {
    let channel = conn.create_channel().await.expect("a channel");
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = tokio::time::timeout(
        Duration::from_secs(5),
        channel.queue_declare(queue.into(), options, FieldTable::default()),
    )
    .await
    .expect("queue.declare in time");
    let counts = declared
        .ok()
        .map(|q| (q.message_count(), q.consumer_count()));
    if channel.status().connected() {
        let _ = channel.close(200, "looked".into()).await;
    }
    counts
}

/// The commandIds of what is left in `queues` (taken off them), once nothing consumes
/// them; a queue that does not exist holds nothing.
pub async fn left_in(queues: &[String]) -> Vec<String> {
    let (conn, channel) = test_channel().await;
    let mut ids = Vec::new();
    for queue in queues {
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match queue_counts(&conn, queue).await {
                Some((_, 0)) => {
                    // A lane's markers are no commands.
                    let marker = |d: &&lapin::message::Delivery| {
                        d.properties.headers().as_ref().is_some_and(|h| {
                            h.inner()
                                .contains_key(transfer_worker::broker::account_queue::MARKER)
                        })
                    };
                    let taken = take_all(&channel, queue).await;
                    ids.extend(taken.iter().filter(|d| !marker(d)).map(|d| {
                        let json: Value = serde_json::from_slice(&d.data).unwrap_or_default();
                        json["commandId"].as_str().unwrap_or_default().to_owned()
                    }));
                    break;
                }
                Some(_) => {
                    assert!(
                        tokio::time::Instant::now() < until,
                        "{queue} is still consumed"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None => break,
            }
        }
    }
    ids
}

/// A private queue for `reply_to`, read by polling.
pub struct ReplyQueue {
    pub name: ShortString,
}

impl ReplyQueue {
    pub async fn declare(channel: &Channel) -> Self {
        Self {
            name: private_queue(channel).await.into(),
        }
    }

    /// The next message, waiting up to [`EVENT_WAIT`].
    pub async fn next(&self, channel: &Channel) -> Delivery {
        let until = tokio::time::Instant::now() + EVENT_WAIT;
        loop {
            let options = BasicGetOptions { no_ack: true };
            if let Some(m) = channel.basic_get(self.name.clone(), options).await.unwrap() {
                return m.delivery;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "nothing arrived on {}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Deletes a test's queues and exchanges when dropped, panicking test or not.
pub struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
    url: String,
}

impl Cleanup {
    /// A guard for queues and exchanges a test declares itself.
    pub fn new(queues: Vec<String>, exchanges: Vec<String>) -> Self {
        Self::at(amqp_url(), queues, exchanges)
    }

    /// Like [`Cleanup::new`], on the broker at `url`.
    pub fn at(url: String, queues: Vec<String>, exchanges: Vec<String>) -> Self {
        Self {
            queues,
            exchanges,
            url,
        }
    }

    /// Everything a worker with `settings` may declare on the test broker.
    pub fn topology(settings: &Settings) -> Self {
        Self::topology_at(amqp_url(), settings)
    }

    /// Like [`Cleanup::topology`], on the broker at `url`.
    pub fn topology_at(url: String, settings: &Settings) -> Self {
        let amqp = &settings.amqp;
        let exchanges = vec![
            amqp.results_exchange.clone(),
            amqp.dead_letter_exchange.clone(),
        ];
        Self::at(url, worker_queues(settings), exchanges)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        let url = std::mem::take(&mut self.url);
        // Drop cannot await; a thread with its own runtime can, whatever runtime we are in.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(delete(&url, &queues, &exchanges));
        })
        .join();
    }
}

async fn delete(url: &str, queues: &[String], exchanges: &[String]) {
    let limit = Duration::from_secs(5);
    let Ok(Ok(conn)) = tokio::time::timeout(
        limit,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    // The account queues the sources list (their names are drawn afresh each time).
    let mut listed = Vec::new();
    for list in queues.iter().filter(|q| q.ends_with(".lanes")) {
        let source = list.trim_end_matches(".lanes");
        let peek = transfer_worker::broker::lane_registry::peek(&conn, source, limit);
        if let Ok(Ok(Some(entries))) = tokio::time::timeout(limit, peek).await {
            listed.extend(entries.into_iter().map(|e| e.queue));
        }
    }
    for q in queues.iter().chain(&listed) {
        let deleting = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default());
        let _ = tokio::time::timeout(limit, deleting).await;
    }
    for e in exchanges {
        let deleting = ch.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default());
        let _ = tokio::time::timeout(limit, deleting).await;
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

/// Every queue on the test broker, as its own CLI lists them (nothing of the worker's
/// bookkeeping).
pub fn broker_queue_names() -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "name", "-q", "--no-table-headers"])
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl list_queues: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|q| q.trim().to_owned())
        .filter(|q| !q.is_empty())
        .collect()
}

/// Whether `queue` is an account queue of `account` beside `source`:
/// `<source>.account.<account>#<tag>`, or the name earlier versions gave it.
pub fn is_account_queue(queue: &str, source: &str, account: &str) -> bool {
    let old = transfer_worker::contract::names::account_queue_of_old(source, account);
    queue == old
        || queue
            .strip_prefix(old.as_str())
            .and_then(|rest| rest.strip_prefix('#'))
            .is_some_and(|tag| tag.len() == 8)
}

/// The account queues of `account` beside `source` on the test broker.
pub fn account_queues_at_broker(source: &str, account: &str) -> Vec<String> {
    broker_queue_names()
        .into_iter()
        .filter(|q| is_account_queue(q, source, account))
        .collect()
}
