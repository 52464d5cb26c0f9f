//! The broker-only reference, run as a child process (`--relay-child QUEUE EXCHANGE PREFETCH`):
//! the worker's consume → publish-with-confirm → ack loop with no HTTP call and no parsing.
//! One task per delivery, as in the worker, so confirms are awaited concurrently.

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer};

use crate::amqp::{OP_TIMEOUT, connect, timed};

/// A reference gives up when no delivery comes for this long (the bench stops it much sooner).
const IDLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// A reference worker's link to the broker: its connection (kept open while the other two
/// live), a confirm-mode publisher, and a consumer of `queue` with `prefetch`.
pub struct Link {
    _connection: Connection,
    pub publisher: Channel,
    consumer: Consumer,
}

impl Link {
    /// Connects as `name` and consumes `queue` as `tag`.
    pub async fn open(
        url: &str,
        name: &str,
        tag: &str,
        queue: &str,
        prefetch: u16,
    ) -> anyhow::Result<Self> {
        let connection = connect(url, name).await?;
        let publisher = timed("channel.open", connection.create_channel()).await?;
        let select = publisher.confirm_select(ConfirmSelectOptions::default());
        timed("confirm.select", select).await?;
        let channel = timed("channel.open", connection.create_channel()).await?;
        timed(
            "basic.qos",
            channel.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        let consume = channel.basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let consumer = timed("basic.consume", consume).await?;
        Ok(Self {
            _connection: connection,
            publisher,
            consumer,
        })
    }

    /// The next delivery; an error when none comes for [`IDLE_LIMIT`], or the consumer ends.
    pub async fn next(&mut self) -> anyhow::Result<Delivery> {
        let next = tokio::time::timeout(IDLE_LIMIT, self.consumer.next()).await;
        let Ok(Some(delivery)) = next else {
            anyhow::bail!("no delivery for {IDLE_LIMIT:?}, or the broker cancelled the consumer");
        };
        Ok(delivery?)
    }
}

/// Relays until the connection or the consumer ends (the bench stops it with SIGTERM).
pub async fn run(url: &str, queue: &str, exchange: &str, prefetch: u16) -> anyhow::Result<()> {
    let name = "transfer-worker bench relay";
    let mut link = Link::open(url, name, "bench-relay", queue, prefetch).await?;
    let exchange: ShortString = exchange.into();
    loop {
        let delivery = link.next().await?;
        let publisher = link.publisher.clone();
        let exchange = exchange.clone();
        tokio::spawn(async move { relay_one(&publisher, exchange, delivery).await });
    }
}

/// Publishes the body as `transfer.succeeded`, waits for its confirm, then acks (or returns
/// the message to the queue when the publish failed).
async fn relay_one(publisher: &Channel, exchange: ShortString, delivery: Delivery) {
    let routing_key = "transfer.succeeded";
    publish_then_settle(
        "relay",
        publisher,
        exchange,
        routing_key,
        &delivery.data,
        &delivery,
    )
    .await;
}

/// Publishes `body` persistently with `routing_key`, waits for its confirm, then acks
/// `delivery`, or returns it to the queue when the publish failed: the end of every delivery of
/// the relay and of the floor. `who` names the process in what it reports.
pub async fn publish_then_settle(
    who: &str,
    publisher: &Channel,
    exchange: ShortString,
    routing_key: &str,
    body: &[u8],
    delivery: &Delivery,
) {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    let published = tokio::time::timeout(OP_TIMEOUT, async {
        publisher
            .basic_publish(
                exchange,
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?
            .await
    })
    .await;
    let settle = async {
        match published {
            Ok(Ok(Confirmation::Ack(_) | Confirmation::NotRequested)) => {
                delivery.acker.ack(BasicAckOptions::default()).await
            }
            _ => {
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                delivery.acker.nack(requeue).await
            }
        }
    };
    match tokio::time::timeout(OP_TIMEOUT, settle).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => eprintln!("{who}: the delivery was already settled"),
        Ok(Err(e)) => eprintln!("{who}: could not ack or nack: {e}"),
        Err(_) => eprintln!("{who}: ack or nack timed out"),
    }
}
