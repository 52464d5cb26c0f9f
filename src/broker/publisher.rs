//! Publishing with publisher confirms. A publish succeeds only when the broker acks it; a
//! nack, a closed channel or a confirm that does not come within `amqp.confirm_timeout` is an
//! error the caller must act on — never a log line.

use std::time::{Duration, SystemTime};

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use super::{BrokerError, Delivery, timed};
use crate::config::AmqpSettings;
use crate::contract::event::Event;
use crate::ops::trace_context;

/// Why a publish did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused the message.
    #[error("broker nacked the publish to {0}")]
    Nacked(String),
    /// The channel or connection failed.
    #[error("publish failed: {0}")]
    Amqp(#[from] lapin::Error),
    /// No confirm in time.
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
    /// The channel was not in confirm mode, so nothing says the broker has the message.
    #[error("publish to {0} was not confirmed: the channel is not in confirm mode")]
    NotConfirmed(String),
    /// The broker could route the message nowhere: the queue does not exist.
    #[error("the broker could not route the publish to {0}")]
    Unroutable(String),
}

/// Where a command's `reply_to` wants its outcome.
#[derive(Debug, Clone, Copy)]
pub struct Reply<'a> {
    /// Queue name (routing key on the default exchange).
    pub queue: &'a str,
    /// The command's `correlation_id`, or its command id.
    pub correlation_id: &'a str,
}

/// The original command, copied to the dead-letter exchange.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    /// The body as received.
    pub body: &'a [u8],
    /// The properties as received.
    pub properties: &'a BasicProperties,
}

/// A confirm-mode channel with the exchange names it publishes to.
#[derive(Debug)]
pub struct Publisher {
    channel: Channel,
    results_exchange: ShortString,
    dead_letter_exchange: ShortString,
    commands_queue: ShortString,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Opens a channel on `connection` and puts it in confirm mode.
    pub async fn open(connection: &Connection, amqp: &AmqpSettings) -> Result<Self, BrokerError> {
        let t = amqp.operation_timeout;
        let channel = timed("channel.open", t, connection.create_channel()).await?;
        timed(
            "confirm.select",
            t,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(Self::on_channel(channel, amqp))
    }

    /// A publisher on a channel already in confirm mode. On one that is not, every publish
    /// fails with [`PublishError::NotConfirmed`].
    pub fn on_channel(channel: Channel, amqp: &AmqpSettings) -> Self {
        Self {
            channel,
            results_exchange: amqp.results_exchange.as_str().into(),
            dead_letter_exchange: amqp.dead_letter_exchange.as_str().into(),
            commands_queue: amqp.commands_queue.as_str().into(),
            confirm_timeout: amqp.confirm_timeout,
        }
    }

    /// Closes the channel, so the connection can close cleanly after it.
    pub async fn close(&self, limit: Duration) {
        let _ = timed(
            "channel.close",
            limit,
            self.channel.close(200, "shutdown".into()),
        )
        .await;
    }

    /// Whether the channel is still open.
    pub fn is_connected(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes an event to the results exchange, and, when given, to the `reply_to` queue and
    /// the original command to the dead-letter exchange. All three are pipelined and confirmed
    /// together; `Ok` means the broker acked every one.
    pub async fn publish(
        &self,
        event: &Event,
        reply: Option<Reply<'_>>,
        dead_letter: Option<DeadLetter<'_>>,
    ) -> Result<(), PublishError> {
        let limit = self.confirm_timeout;
        tokio::time::timeout(limit, self.publish_confirmed(event, reply, dead_letter))
            .await
            .map_err(|_| PublishError::Timeout(limit))?
    }

    /// Publishes a command to the commands queue as an upstream system would: on the default
    /// exchange, mandatory, confirmed. A command no queue takes is
    /// [`PublishError::Unroutable`]. For tools; the worker itself only publishes events.
    pub async fn publish_command(
        &self,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let queue = self.commands_queue.clone();
        self.publish_to_queue(queue.as_str(), body, properties)
            .await
    }

    /// Publishes `delivery` as received (body and properties) to `queue` on the default
    /// exchange, mandatory and confirmed: a command routed on, or set aside.
    pub async fn forward(&self, queue: &str, delivery: &Delivery) -> Result<(), PublishError> {
        let properties = delivery.properties().clone();
        self.publish_to_queue(queue, delivery.body(), properties)
            .await
    }

    /// Publishes a message to `queue` on the default exchange, mandatory, confirmed: the
    /// intake's route to a partition. `Ok` only when the broker acked it into the queue.
    pub async fn publish_to_queue(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let limit = self.confirm_timeout;
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirmed = async {
            let confirm = self
                .channel
                .basic_publish("".into(), queue.into(), options, body, properties)
                .await?;
            match confirm.await? {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(queue.to_owned())),
                Confirmation::Nack(_) => Err(PublishError::Nacked(queue.to_owned())),
                Confirmation::NotRequested => Err(PublishError::NotConfirmed(queue.to_owned())),
            }
        };
        tokio::time::timeout(limit, confirmed)
            .await
            .map_err(|_| PublishError::Timeout(limit))?
    }

    async fn publish_confirmed(
        &self,
        event: &Event,
        reply: Option<Reply<'_>>,
        dead_letter: Option<DeadLetter<'_>>,
    ) -> Result<(), PublishError> {
        let properties = event_properties(event);
        let reply_properties = reply.map(|reply| {
            properties
                .clone()
                .with_correlation_id(reply.correlation_id.into())
        });
        let options = BasicPublishOptions::default();
        let mut confirms = Vec::with_capacity(3);
        confirms.push((
            self.results_exchange.as_str(),
            self.channel
                .basic_publish(
                    self.results_exchange.clone(),
                    event.kind.name().into(),
                    options,
                    &event.body,
                    properties,
                )
                .await?,
        ));
        if let (Some(reply), Some(properties)) = (reply, reply_properties) {
            confirms.push((
                reply.queue,
                self.channel
                    .basic_publish(
                        "".into(),
                        reply.queue.into(),
                        options,
                        &event.body,
                        properties,
                    )
                    .await?,
            ));
        }
        if let Some(dead) = dead_letter {
            let properties = dead_letter_properties(dead.properties, event);
            confirms.push((
                self.dead_letter_exchange.as_str(),
                self.channel
                    .basic_publish(
                        self.dead_letter_exchange.clone(),
                        self.commands_queue.clone(),
                        options,
                        dead.body,
                        properties,
                    )
                    .await?,
            ));
        }
        for (target, confirm) in confirms {
            match confirm.await? {
                Confirmation::Ack(_) => {}
                Confirmation::Nack(_) => return Err(PublishError::Nacked(target.to_owned())),
                // Only an ack means the broker has it; an unconfirmed publish is not one.
                Confirmation::NotRequested => {
                    return Err(PublishError::NotConfirmed(target.to_owned()));
                }
            }
        }
        Ok(())
    }
}

/// Longest `x-transfer-error`: headers share one frame with everything else the broker sends.
const MAX_ERROR_HEADER: usize = 1024;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The command's own properties and headers, as received, plus the headers that say why it
/// ended (`x-transfer-event`, `x-transfer-error`, `x-transfer-event-id`), made persistent;
/// within a command's processing, its `traceparent` is the worker's span for the command.
pub fn dead_letter_properties(received: &BasicProperties, event: &Event) -> BasicProperties {
    let mut headers = received.headers().clone().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
    headers.insert("x-transfer-event".into(), text(event.kind.name()));
    let error = event.error.as_deref().unwrap_or_default();
    headers.insert(
        "x-transfer-error".into(),
        text(cut(error, MAX_ERROR_HEADER)),
    );
    headers.insert("x-transfer-event-id".into(), text(&event.id.to_string()));
    // The copy comes from the worker's span for the command: a replay continues the trace
    // under it.
    trace_context::with_current(|trace| super::trace_headers::insert(trace, &mut headers));
    received.clone().with_headers(headers).with_delivery_mode(2)
}

fn event_properties(event: &Event) -> BasicProperties {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(event.id.to_string().into())
        .with_correlation_id(event.command_id.as_str().into())
        .with_type(event.kind.name().into())
        .with_timestamp(now)
        .with_app_id("transfer-worker".into());
    // Only an event published while its command is processed has a trace; the relay's
    // callback events, published later, carry none.
    match trace_context::with_current(|trace| {
        let mut headers = FieldTable::default();
        super::trace_headers::insert(trace, &mut headers);
        headers
    }) {
        Some(headers) => properties.with_headers(headers),
        None => properties,
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
    use proptest::prelude::*;

    use super::*;
    use crate::contract::Rejection;

    /// Any header value AMQP can carry, nested a little.
    fn amqp_value() -> impl Strategy<Value = AMQPValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            any::<f64>().prop_map(AMQPValue::Double),
            ".{0,64}".prop_map(|s| AMQPValue::LongString(LongString::from(s.as_bytes()))),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| AMQPValue::ByteArray(b.into())),
            Just(AMQPValue::Void),
        ];
        leaf.prop_recursive(2, 16, 4, |inner| {
            proptest::collection::vec(inner, 0..4)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v)))
        })
    }

    fn properties() -> impl Strategy<Value = BasicProperties> {
        (
            proptest::option::of(proptest::collection::btree_map(
                "[a-z-]{1,20}",
                amqp_value(),
                0..6,
            )),
            proptest::option::of(any::<u64>()),
            proptest::option::of(".{0,40}"),
        )
            .prop_map(|(headers, timestamp, message_id)| {
                let mut p = BasicProperties::default();
                if let Some(headers) = headers {
                    let mut table = FieldTable::default();
                    for (k, v) in headers {
                        table.insert(ShortString::from(k), v);
                    }
                    p = p.with_headers(table);
                }
                if let Some(t) = timestamp {
                    p = p.with_timestamp(t);
                }
                if let Some(id) = message_id {
                    p = p.with_message_id(ShortString::from(id));
                }
                p
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any properties a command arrives with become a dead-letter copy that keeps them,
        /// says why, and whose error header stays small.
        #[test]
        fn dead_letter_properties_keep_what_arrived(received in properties(), message in ".{0,3000}") {
            let rejection = Rejection {
                command_id: "c".into(),
                stream_id: None,
                bot_session_id: None,
                target: None,
                message,
            };
            let event = Event::rejected(&rejection, None);
            let out = dead_letter_properties(&received, &event);
            let headers = out.headers().as_ref().unwrap().inner();
            for (k, v) in received.headers().as_ref().map(|h| h.inner().clone()).unwrap_or_default() {
                if !k.as_str().starts_with("x-transfer-") {
                    prop_assert_eq!(headers.get(&k), Some(&v));
                }
            }
            match headers.get("x-transfer-error") {
                Some(AMQPValue::LongString(s)) => {
                    prop_assert!(s.as_bytes().len() <= MAX_ERROR_HEADER);
                    prop_assert!(std::str::from_utf8(s.as_bytes()).is_ok());
                }
                other => prop_assert!(false, "x-transfer-error: {other:?}"),
            }
            prop_assert_eq!(out.timestamp(), received.timestamp());
            prop_assert_eq!(out.message_id(), received.message_id());
            prop_assert_eq!(*out.delivery_mode(), Some(2));
        }
    }

    #[test]
    fn cut_keeps_characters_whole() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("abc", 10), "abc");
    }
}
