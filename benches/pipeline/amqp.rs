//! The bench's side of the broker: connecting, per-run names and their cleanup, waiting for a
//! consumer, publishing commands with a window of outstanding confirms, collecting events.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind, PublisherConfirm,
};
use serde::Deserialize;

use crate::procs::ChildGuard;

/// Every single broker operation (connect, declare, publish, one confirm) must end within this.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one broker operation under [`OP_TIMEOUT`].
pub async fn timed<T>(
    what: &str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(result) => result.with_context(|| format!("broker {what} failed")),
        Err(_) => bail!("broker {what} timed out after {OP_TIMEOUT:?}"),
    }
}

/// Connects, with an error that says plainly when the broker is not there.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    timed("connect", Connection::connect(url, properties))
        .await
        .with_context(|| {
            format!(
                "cannot connect to RabbitMQ at {} — is the broker running? \
                 (`rabbitmq-diagnostics ping`)",
                redact(url)
            )
        })
}

/// The URL with its password hidden.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The broker objects of one run, unique per run.
#[derive(Debug, Clone)]
pub struct Names {
    /// `bench-<8 hex>`, also the commandId prefix.
    pub prefix: String,
    /// Commands queue (quorum).
    pub commands: String,
    /// Results topic exchange.
    pub results: String,
    /// Dead-letter fanout exchange.
    pub dead_letter: String,
    /// Dead-letter queue.
    pub dead_queue: String,
    /// Partition queues `<commands>.p0` … the workers declare (fleet mode with partitions).
    pub partitions: u16,
    /// Accounts whose queues the workers may declare beside the commands queue and each
    /// partition (`<source>.account.<account>#<tag>`, listed in `<source>.lanes`).
    pub accounts: Vec<String>,
}

impl Names {
    /// Fresh names.
    pub fn new() -> Self {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("bench-{}", &hex[..8]);
        Self {
            commands: format!("{prefix}.commands"),
            results: format!("{prefix}.results"),
            dead_letter: format!("{prefix}.dead-letter"),
            dead_queue: format!("{prefix}.commands.dead"),
            prefix,
            partitions: 0,
            // The pipeline bench's account; the other benches name theirs.
            accounts: vec!["bench-account".to_owned()],
        }
    }

    /// The same names, for these accounts.
    #[allow(dead_code)]
    pub fn with_accounts(self, accounts: &[&str]) -> Self {
        Self {
            accounts: accounts.iter().map(|a| (*a).to_owned()).collect(),
            ..self
        }
    }

    /// Every account queue the workers may have declared: those the sources list, and each
    /// account's under the name earlier versions gave it.
    pub async fn account_queues(&self, connection: &Connection) -> Vec<String> {
        let mut queues = Vec::new();
        for source in std::iter::once(self.commands.clone()).chain(self.partition_queues()) {
            let listed = transfer_worker::broker::lane_registry::peek(
                connection,
                &source,
                Duration::from_secs(10),
            )
            .await;
            if let Ok(Some(entries)) = listed {
                queues.extend(entries.into_iter().map(|e| e.queue));
            }
            queues.extend(
                self.accounts
                    .iter()
                    .map(|a| transfer_worker::contract::names::account_queue_of_old(&source, a)),
            );
        }
        queues
    }

    /// The lists of account queues beside the commands queue and each partition.
    pub fn lane_registries(&self) -> Vec<String> {
        std::iter::once(self.commands.clone())
            .chain(self.partition_queues())
            .map(|s| transfer_worker::contract::names::lane_registry(&s))
            .collect()
    }

    /// The same names, with `partitions` partition queues.
    pub fn with_partitions(self, partitions: u16) -> Self {
        Self { partitions, ..self }
    }

    /// `<commands>.p0` … `<commands>.p<partitions − 1>`.
    pub fn partition_queues(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.partitions).map(|k| format!("{}.p{k}", self.commands))
    }
}

/// The names used so far; whatever is still registered is deleted from the broker by
/// [`Registry::delete_all`], after every run, on error and on interrupt.
#[derive(Debug, Clone, Default)]
pub struct Registry(Arc<Mutex<Vec<Names>>>);

impl Registry {
    /// Remembers `names` before anything is declared under them.
    pub fn register(&self, names: &Names) {
        self.0.lock().expect("registry lock").push(names.clone());
    }

    /// Deletes every registered queue and exchange (absent ones are fine) on a connection of
    /// its own, so a broken run connection does not stop the cleanup.
    pub async fn delete_all(&self, url: &str) -> anyhow::Result<()> {
        if self.0.lock().expect("registry lock").is_empty() {
            return Ok(());
        }
        // Taken only once connected: a cleanup that cannot connect may be tried again.
        let connection = connect(url, "transfer-worker bench cleanup").await?;
        let all: Vec<Names> = std::mem::take(&mut *self.0.lock().expect("registry lock"));
        for names in &all {
            let queues = [
                names.commands.clone(),
                names.dead_queue.clone(),
                transfer_worker::broker::consumer::holder_queue(&names.commands),
            ];
            let accounts = names.account_queues(&connection).await;
            for queue in queues
                .into_iter()
                .chain(names.partition_queues())
                .chain(accounts)
                .chain(names.lane_registries())
            {
                // A failed delete closes the channel, so each operation gets its own.
                let channel = timed("channel.open", connection.create_channel()).await?;
                let options = QueueDeleteOptions::default();
                let _ = timed(
                    "queue.delete",
                    channel.queue_delete(queue.as_str().into(), options),
                )
                .await;
            }
            for exchange in [&names.results, &names.dead_letter] {
                let channel = timed("channel.open", connection.create_channel()).await?;
                let options = ExchangeDeleteOptions::default();
                let delete = channel.exchange_delete(exchange.as_str().into(), options);
                let _ = timed("exchange.delete", delete).await;
            }
        }
        let _ = timed("connection.close", connection.close(200, "done".into())).await;
        Ok(())
    }
}

/// Declares what the relay reference needs (the worker declares its own): a quorum commands
/// queue and a topic results exchange, as the worker would.
pub async fn declare_relay_topology(connection: &Connection, names: &Names) -> anyhow::Result<()> {
    let channel = timed("channel.open", connection.create_channel()).await?;
    let durable = lapin::options::ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let declare = channel.exchange_declare(
        names.results.as_str().into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    );
    timed("exchange.declare", declare).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum".as_bytes())),
    );
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let declare = channel.queue_declare(names.commands.as_str().into(), options, args);
    timed("queue.declare", declare).await?;
    let _ = timed("channel.close", channel.close(200, "declared".into())).await;
    Ok(())
}

/// Messages and consumers of a queue (passive declare), or `None` if it does not exist.
pub async fn queue_state(
    connection: &Connection,
    queue: &str,
) -> anyhow::Result<Option<(u32, u32)>> {
    let channel = timed("channel.open", connection.create_channel()).await?;
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declare = channel.queue_declare(queue.into(), options, FieldTable::default());
    match tokio::time::timeout(OP_TIMEOUT, declare).await {
        Ok(Ok(q)) => {
            let _ = timed("channel.close", channel.close(200, "checked".into())).await;
            Ok(Some((q.message_count(), q.consumer_count())))
        }
        // NOT_FOUND closes the channel; nothing else to do.
        Ok(Err(_)) => Ok(None),
        Err(_) => bail!("broker queue.declare (passive) timed out after {OP_TIMEOUT:?}"),
    }
}

/// Polls until `queue` has a consumer: the child declared it and is consuming.
pub async fn wait_for_consumer(
    connection: &Connection,
    queue: &str,
    child: &mut ChildGuard,
    limit: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        child.check_alive()?;
        if let Some((_, consumers)) = queue_state(connection, queue).await?
            && consumers >= 1
        {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!("nothing consumed {queue} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A private exclusive queue bound to `exchange` with `#`, consumed without acks. Keep the
/// channel alive as long as the consumer.
pub async fn bind_sink(
    connection: &Connection,
    exchange: &str,
) -> anyhow::Result<(Channel, Consumer)> {
    let channel = timed("channel.open", connection.create_channel()).await?;
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let declare = channel.queue_declare("".into(), options, FieldTable::default());
    let queue = timed("queue.declare", declare).await?;
    let bind = channel.queue_bind(
        queue.name().clone(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    );
    timed("queue.bind", bind).await?;
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let consume = channel.basic_consume(
        queue.name().clone(),
        "".into(),
        options,
        FieldTable::default(),
    );
    let consumer = timed("basic.consume", consume).await?;
    Ok((channel, consumer))
}

/// Publishes `bodies` to `queue` through the default exchange, persistent, with confirms,
/// keeping up to `window` unconfirmed. Returns when each publish started.
pub async fn publish_all(
    connection: &Connection,
    queue: &str,
    bodies: &[Vec<u8>],
    window: usize,
) -> anyhow::Result<Vec<Instant>> {
    let channel = timed("channel.open", connection.create_channel()).await?;
    let select = channel.confirm_select(ConfirmSelectOptions::default());
    timed("confirm.select", select).await?;
    let mut started = Vec::with_capacity(bodies.len());
    let mut pending: VecDeque<PublisherConfirm> = VecDeque::with_capacity(window);
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    for body in bodies {
        if pending.len() >= window.max(1) {
            let oldest = pending.pop_front().expect("window is not empty");
            confirmed(oldest).await?;
        }
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(timestamp);
        started.push(Instant::now());
        let publish = channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        );
        pending.push_back(timed("basic.publish", publish).await?);
    }
    for confirm in pending {
        confirmed(confirm).await?;
    }
    let _ = timed("channel.close", channel.close(200, "published".into())).await;
    Ok(started)
}

async fn confirmed(confirm: PublisherConfirm) -> anyhow::Result<()> {
    match timed("publisher confirm", confirm).await? {
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(_) => bail!("the broker nacked a command"),
    }
}

/// The fields of an event the bench looks at; the relay's "events" are the commands
/// themselves, which have only `commandId`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventView {
    command_id: Option<String>,
    attempts: Option<u64>,
    retryable: Option<bool>,
}

/// The first terminal event seen for a command.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Routing key (= event name).
    pub event: String,
    /// `attempts`, when the body has it.
    pub attempts: Option<u64>,
    /// `retryable`, when the body has it.
    pub retryable: Option<bool>,
}

/// Everything that arrived on the sink.
#[derive(Debug)]
pub struct Tally {
    /// Arrival of the first event per command index.
    pub arrivals: Vec<Option<Instant>>,
    /// Events per command index.
    pub counts: Vec<u32>,
    /// First event per command index.
    pub seen: Vec<Option<Seen>>,
    /// Events whose commandId is not one of this run's.
    pub foreign: u64,
    /// Distinct commands with an event.
    pub unique: usize,
    /// When the last missing command got its event.
    pub complete_at: Option<Instant>,
    /// When the latest command got its first event.
    pub last_new_at: Option<Instant>,
    /// Why collection stopped early, if it did.
    pub stopped: Option<String>,
}

/// How long to keep collecting.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// Give up when no event arrives for this long.
    pub idle: Duration,
    /// Keep listening this long after the last missing event, to catch duplicates.
    pub linger: Duration,
    /// Give up after this long in any case.
    pub total: Duration,
}

impl Tally {
    fn new(n: usize) -> Self {
        Self {
            arrivals: vec![None; n],
            counts: vec![0; n],
            seen: vec![None; n],
            foreign: 0,
            unique: 0,
            complete_at: None,
            last_new_at: None,
            stopped: None,
        }
    }

    fn record(&mut self, prefix: &str, routing_key: &str, body: &[u8], at: Instant) {
        let view: Option<EventView> = serde_json::from_slice(body).ok();
        let index = view
            .as_ref()
            .and_then(|v| v.command_id.as_deref())
            .and_then(|id| {
                id.strip_prefix(prefix)?
                    .strip_prefix('-')?
                    .parse::<usize>()
                    .ok()
            })
            .filter(|&i| i < self.counts.len());
        let Some(i) = index else {
            self.foreign += 1;
            return;
        };
        self.counts[i] += 1;
        if self.counts[i] > 1 {
            return;
        }
        let view = view.expect("index implies a parsed body");
        self.arrivals[i] = Some(at);
        self.seen[i] = Some(Seen {
            event: routing_key.to_owned(),
            attempts: view.attempts,
            retryable: view.retryable,
        });
        self.unique += 1;
        self.last_new_at = Some(at);
        if self.unique == self.counts.len() {
            self.complete_at = Some(at);
        }
    }
}

/// Collects events until all `n` commands have one (plus `linger`), or patience runs out.
pub async fn collect(mut consumer: Consumer, prefix: &str, n: usize, patience: Patience) -> Tally {
    let mut tally = Tally::new(n);
    let started = Instant::now();
    loop {
        let wait = match tally.complete_at {
            Some(done) => patience.linger.saturating_sub(done.elapsed()),
            None => patience.idle,
        }
        .min(patience.total.saturating_sub(started.elapsed()));
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                let now = Instant::now();
                tally.record(prefix, delivery.routing_key.as_str(), &delivery.data, now);
            }
            Ok(Some(Err(e))) => {
                tally.stopped = Some(format!("the event consumer failed: {e}"));
                break;
            }
            Ok(None) => {
                tally.stopped = Some("the broker cancelled the event consumer".into());
                break;
            }
            Err(_) => {
                if tally.complete_at.is_none() {
                    tally.stopped = Some(format!(
                        "gave up waiting: {} of {n} commands had an event",
                        tally.unique
                    ));
                }
                break;
            }
        }
    }
    tally
}
