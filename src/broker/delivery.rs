//! A message taken from a queue, as the rest of the worker sees it: its body, what its AMQP
//! properties say, and the operations that settle it, each bounded by the operation timeout
//! it was received with. Nothing outside `broker` holds lapin's delivery.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicNackOptions};

use super::publisher::DeadLetter;
use super::{BrokerError, timed};
use crate::ops::trace_context::Incoming;

/// A delivery and its settle operations.
#[derive(Debug)]
pub struct Delivery {
    inner: lapin::message::Delivery,
    /// `amqp.operation_timeout`: the bound of an ack or a nack.
    timeout: Duration,
}

impl Delivery {
    /// `inner`, settled within `timeout`.
    pub fn new(inner: lapin::message::Delivery, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    /// The body as received.
    pub fn body(&self) -> &[u8] {
        &self.inner.data
    }

    /// The properties as received, for what the broker publishes from them.
    pub(crate) fn properties(&self) -> &BasicProperties {
        &self.inner.properties
    }

    /// AMQP `message_id`.
    pub fn message_id(&self) -> Option<&str> {
        self.properties().message_id().as_ref().map(|s| s.as_str())
    }

    /// AMQP `timestamp`, seconds since the epoch.
    pub fn timestamp(&self) -> Option<u64> {
        *self.properties().timestamp()
    }

    /// AMQP `reply_to`.
    pub fn reply_to(&self) -> Option<&str> {
        self.properties().reply_to().as_ref().map(|s| s.as_str())
    }

    /// AMQP `correlation_id`.
    pub fn correlation_id(&self) -> Option<&str> {
        self.properties()
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// Whether a header of this name is present, whatever its value.
    pub fn has_header(&self, name: &str) -> bool {
        self.properties()
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key(name))
    }

    /// The W3C trace context its headers carry.
    pub fn trace(&self) -> Incoming {
        super::trace_headers::incoming(self.properties().headers().as_ref())
    }

    /// The delivery as the dead-letter exchange gets it: body and properties as received.
    pub fn dead_letter(&self) -> DeadLetter<'_> {
        DeadLetter {
            body: self.body(),
            properties: self.properties(),
        }
    }

    /// Whether it can still be settled: its channel has not closed. Once it has, the broker
    /// has returned the message to its queue, for the queue's next consumer.
    pub fn settleable(&self) -> bool {
        !self.inner.acker.poisoned()
    }

    /// Acks it: the broker forgets the message. `Ok(false)`: nothing was sent, its channel
    /// having closed or it being settled already.
    pub async fn ack(&self) -> Result<bool, BrokerError> {
        let ack = self.inner.acker.ack(BasicAckOptions::default());
        timed("basic.ack", self.timeout, ack).await
    }

    /// Returns it to its queue (a nack with requeue); `Ok(false)` as for [`Delivery::ack`].
    pub async fn requeue(&self) -> Result<bool, BrokerError> {
        let nack = self.inner.acker.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        });
        timed("basic.nack", self.timeout, nack).await
    }
}
