//! The one reader of a worker's events: a private queue bound to every routing key of a results
//! exchange, consumed without acks and read with a timeout.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::QueueBindOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer};
use serde_json::Value;
use transfer_worker::broker::topology;

use super::broker::private_queue;

/// Longest wait for one expected event.
pub const EVENT_WAIT: Duration = Duration::from_secs(20);

/// An event as a consumer of the results exchange sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub json: Value,
    pub routing_key: String,
    pub properties: BasicProperties,
}

impl Received {
    pub fn name(&self) -> &str {
        self.json["event"].as_str().unwrap_or_default()
    }

    pub fn command_id(&self) -> &str {
        self.json["commandId"].as_str().unwrap_or_default()
    }

    /// Asserts the AMQP properties every event carries (CONTRACT §3): JSON, persistent, its
    /// `eventId` as message id, its command's id as correlation id, its name as type, and the
    /// worker as app id.
    pub fn assert_properties(&self) {
        let p = &self.properties;
        let name = self.name();
        let text = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
        assert_eq!(
            text(p.content_type()).as_deref(),
            Some("application/json"),
            "{name}"
        );
        assert_eq!(*p.delivery_mode(), Some(2), "{name} is persistent");
        assert_eq!(
            text(p.message_id()).as_deref(),
            self.json["eventId"].as_str()
        );
        assert_eq!(text(p.correlation_id()).as_deref(), Some(self.command_id()));
        assert_eq!(text(p.kind()).as_deref(), Some(name));
        assert_eq!(text(p.app_id()).as_deref(), Some("transfer-worker"));
    }
}

impl From<Delivery> for Received {
    fn from(delivery: Delivery) -> Self {
        Self {
            json: serde_json::from_slice(&delivery.data).expect("events are JSON"),
            routing_key: delivery.routing_key.to_string(),
            properties: delivery.properties,
        }
    }
}

/// The events of one results exchange, from the moment [`Events::bind`] returns.
pub struct Events {
    channel: Channel,
    consumer: Consumer,
}

impl Events {
    /// Binds a private queue on `channel` to every event of `exchange`, and consumes it.
    pub async fn bind(channel: &Channel, exchange: &str) -> Self {
        let queue = private_queue(channel).await;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the events queue");
        let consumer = topology::watch(channel, queue.into(), Duration::from_secs(10))
            .await
            .expect("consume the events");
        Self {
            channel: channel.clone(),
            consumer,
        }
    }

    /// The next event within `limit`, or `None`; a consumer that ends is a failure.
    pub async fn within(&mut self, limit: Duration) -> Option<Received> {
        let next = tokio::time::timeout(limit, self.consumer.next())
            .await
            .ok()?;
        Some(
            next.expect("events consumer open")
                .expect("delivery")
                .into(),
        )
    }

    /// The next event, within [`EVENT_WAIT`].
    pub async fn next(&mut self) -> Received {
        self.within(EVENT_WAIT).await.expect("an event in time")
    }

    /// The next `n` events.
    pub async fn take(&mut self, n: usize) -> Vec<Received> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }

    /// The events still to come, until none comes for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Received> {
        let mut out = Vec::new();
        while let Some(e) = self.within(quiet).await {
            out.push(e);
        }
        out
    }

    /// Asserts that no event arrives within `wait`, on a consumer that is still open: a closed
    /// or failed consumer is not silence.
    pub async fn assert_none(&mut self, wait: Duration) {
        match tokio::time::timeout(wait, self.consumer.next()).await {
            Err(_) => {}
            Ok(Some(Ok(d))) => panic!("unexpected event: {}", String::from_utf8_lossy(&d.data)),
            Ok(Some(Err(e))) => {
                panic!("the events consumer failed, so silence proves nothing: {e}")
            }
            Ok(None) => panic!("the events consumer closed, so silence proves nothing"),
        }
        assert!(
            self.channel.status().connected(),
            "the events channel closed, so silence proves nothing"
        );
    }
}

/// The keys of a JSON object, sorted.
pub fn sorted_keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .expect("an object")
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    keys
}
