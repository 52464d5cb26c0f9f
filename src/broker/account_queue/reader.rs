//! Reading an account queue: a consumer on a channel of its own, with the account's cap as
//! prefetch. The pipeline decides when to take each delivery (`pipeline::lanes`); this owns
//! the channel, the consume, the cancel and the close.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

use super::stamps::marker_headers;
use crate::broker::consumer::ACK_SETTLE;
use crate::broker::{BrokerError, Delivery, timed};

/// The channel an account queue is read on, kept open while what was taken on it is in hand
/// (acks go to the channel a delivery came on).
#[derive(Debug)]
pub struct ReaderChannel {
    channel: Channel,
    /// `amqp.operation_timeout`.
    timeout: Duration,
}

/// A consumer of an account queue.
#[derive(Debug)]
pub struct QueueReader {
    channel: ReaderChannel,
    tag: String,
}

/// What a [`QueueReader`] delivers, in order.
pub struct Deliveries {
    consumer: lapin::Consumer,
    timeout: Duration,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries").finish_non_exhaustive()
    }
}

impl ReaderChannel {
    /// Opens a channel on `connection` that takes at most `prefetch` unacked deliveries.
    pub async fn open(
        connection: &Connection,
        prefetch: u16,
        timeout: Duration,
    ) -> Result<Self, BrokerError> {
        let t = timeout;
        let channel = timed("channel.open", t, connection.create_channel()).await?;
        let qos = channel.basic_qos(prefetch, BasicQosOptions::default());
        timed("basic.qos", t, qos).await?;
        Ok(Self { channel, timeout })
    }

    /// Starts consuming `queue` under a new consumer tag.
    pub async fn consume(self, queue: &str) -> Result<(QueueReader, Deliveries), BrokerError> {
        let tag = format!("transfer-worker-{}", uuid::Uuid::new_v4());
        #[cfg(feature = "fault-injection")]
        if take_bad_queue_fault(queue) {
            // A first consumer under the tag the reader is about to use: RabbitMQ answers the
            // second with a connection-level error (530, reuse of a consumer tag), as it
            // answers a consume of a quorum queue it cannot serve.
            let _ = self
                .channel
                .basic_consume(
                    queue.into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await;
        }
        let consume = self.channel.basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let consumer = timed("basic.consume", self.timeout, consume).await?;
        let timeout = self.timeout;
        let reader = QueueReader { channel: self, tag };
        Ok((reader, Deliveries { consumer, timeout }))
    }

    /// Whether the channel is still open.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Returns once the broker has applied every ack sent on this channel: a marker is
    /// published on it, in confirm mode, into `queue`. The broker applies a channel's acks and
    /// publishes to a quorum queue in the order it received them, and confirms the marker only
    /// once it is applied, so the acks before it are too. A channel closed before its acks
    /// were applied would return commands that were called and published, for the next holder
    /// to call again. Where the marker cannot be confirmed (the queue or the channel gone), a
    /// pause instead (the consumer's `ACK_SETTLE`). The marker is acked by whoever reads it.
    pub async fn acks_applied(&self, queue: &str) {
        let (channel, t) = (&self.channel, self.timeout);
        let confirmed = async {
            let select = channel.confirm_select(ConfirmSelectOptions::default());
            timed("confirm.select", t, select).await?;
            let id = uuid::Uuid::new_v4().simple().to_string();
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(marker_headers(&id));
            let publish = channel.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"",
                props,
            );
            let confirm = timed("basic.publish", t, publish).await?;
            timed("publisher confirm", t, confirm).await
        };
        match confirmed.await {
            Ok(c) if c.is_ack() => {}
            _ => tokio::time::sleep(ACK_SETTLE).await,
        }
    }

    /// Closes the channel, if still open: what was delivered on it and not acked goes back
    /// to its queue, in the order it was delivered.
    pub async fn close(self, why: &'static str) {
        if self.is_open() {
            let close = self.channel.close(200, why.into());
            let _ = timed("channel.close", self.timeout, close).await;
        }
    }
}

impl Deliveries {
    /// The next delivery; `None` once the consumer was cancelled or failed.
    pub async fn next(&mut self) -> Option<Delivery> {
        match self.consumer.next().await {
            Some(Ok(delivery)) => Some(Delivery::new(delivery, self.timeout)),
            _ => None,
        }
    }
}

impl QueueReader {
    /// Cancels the consumer. `Some(n)` once the broker confirmed it: `n` deliveries came in
    /// after the last one taken from `deliveries` and before the cancel took effect (they stay
    /// unacked and go back to the queue when the channel closes). `None` if the cancel could
    /// not be confirmed. Returns the channel, to be closed once what it took has settled.
    pub async fn cancel(self, deliveries: Option<Deliveries>) -> (ReaderChannel, Option<usize>) {
        let t = self.channel.timeout;
        let cancel = self
            .channel
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default());
        if timed("basic.cancel", t, cancel).await.is_err() {
            return (self.channel, None);
        }
        let mut left = 0usize;
        if let Some(mut deliveries) = deliveries {
            while let Ok(Some(Ok(_))) = tokio::time::timeout(t, deliveries.consumer.next()).await {
                left = left.saturating_add(1);
            }
        }
        (self.channel, Some(left))
    }

    /// The channel of a reader whose consumer ended by itself (cancelled or failed).
    pub fn into_channel(self) -> ReaderChannel {
        self.channel
    }
}

/// With the `fault-injection` feature, the first [`FAULT_BAD_QUEUE_TIMES`] readers of this
/// account's queues in a process make the broker close their connection: a queue that fails
/// every consume, for a while.
#[cfg(feature = "fault-injection")]
pub const FAULT_BAD_QUEUE_ACCOUNT: &str = "acc-fault-injection-bad-queue";

/// How many readers of [`FAULT_BAD_QUEUE_ACCOUNT`]'s queues fail.
#[cfg(feature = "fault-injection")]
pub const FAULT_BAD_QUEUE_TIMES: u32 = 4;

/// Whether this consume of `queue` is one that fails.
#[cfg(feature = "fault-injection")]
fn take_bad_queue_fault(queue: &str) -> bool {
    use std::sync::atomic::{AtomicU32, Ordering};
    static FAILED: AtomicU32 = AtomicU32::new(0);
    queue.contains(&format!(".account.{FAULT_BAD_QUEUE_ACCOUNT}"))
        && FAILED
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < FAULT_BAD_QUEUE_TIMES).then_some(n + 1)
            })
            .is_ok()
}
