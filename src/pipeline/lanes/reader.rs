//! Taking commands back from an account queue: a consumer on a channel of its own, with the
//! account's cap as prefetch, takes each command only when one of the account's slots is free;
//! stopped, it returns what it received and did not take to the queue, in order.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio_util::sync::CancellationToken;

use super::publish::{MARKER, marker_of};
use super::{Lane, SourceLanes, Taken, bucket, waiting_since};
use crate::broker::consumer::InFlight;
use crate::broker::{BrokerError, timed};

/// Time the broker gets to apply the last acks before a channel closes, where that cannot be
/// confirmed.
pub(super) const ACK_SETTLE: Duration = Duration::from_millis(250);

impl SourceLanes {
    /// Starts consuming the lane's account queue on a channel of its own, with the account's
    /// cap as prefetch.
    pub(super) async fn read(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
    ) -> Result<LaneReader, BrokerError> {
        let t = self.source.amqp.operation_timeout;
        let tag = format!("transfer-worker-{}", uuid::Uuid::new_v4());
        let (channel, consumer) = self
            .on_queue(lane, async |connection| {
                let channel = timed("channel.open", t, connection.create_channel()).await?;
                let prefetch = u16::try_from(lane.account.cap()).unwrap_or(u16::MAX);
                let qos = channel.basic_qos(prefetch, BasicQosOptions::default());
                timed("basic.qos", t, qos).await?;
                #[cfg(feature = "fault-injection")]
                fault_bad_queue(&channel, lane, &tag).await;
                let consumer = timed(
                    "basic.consume",
                    t,
                    channel.basic_consume(
                        lane.queue().as_ref().into(),
                        tag.as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    ),
                )
                .await?;
                Ok((channel, consumer))
            })
            .await?;
        let stop = self.stop.child_token();
        let task = tokio::spawn(self.clone().take(lane.clone(), consumer, stop.clone()));
        Ok(LaneReader {
            channel,
            tag,
            stop,
            task,
        })
    }

    /// Takes the account queue's commands in order, each when one of the account's slots is
    /// free, until stopped; then gives the consumer back with what it has not taken.
    async fn take(
        self: Arc<Self>,
        lane: Arc<Lane>,
        mut consumer: lapin::Consumer,
        stop: CancellationToken,
    ) -> Option<Held> {
        loop {
            let delivery = tokio::select! {
                biased;
                () = stop.cancelled() => return Some(Held { consumer, held: None }),
                delivery = consumer.next() => delivery,
            };
            let Some(Ok(delivery)) = delivery else {
                return None;
            };
            if let Some(id) = marker_of(&delivery.properties) {
                // A marker, this holder's or one an earlier holder left: everything published
                // before it has been handed to a consumer. It needs no slot. (Counted in if
                // the queue was found holding it; this holder's own are not, and the count
                // stops at zero.)
                let _ = lane
                    .in_queue
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(1))
                    });
                let ack = delivery.acker.ack(BasicAckOptions::default());
                if timed("basic.ack", self.source.amqp.operation_timeout, ack)
                    .await
                    .is_ok()
                {
                    lane.last_marker.send_replace(Some(id));
                }
                continue;
            }
            let _ = lane
                .in_queue
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
            // Received and not yet taken: the lane is not empty while it waits for its slot.
            lane.holding.store(true, Ordering::Relaxed);
            let slot = tokio::select! {
                biased;
                () = stop.cancelled() => return Some(Held { consumer, held: Some(delivery) }),
                slot = lane.account.slot() => slot,
            };
            lane.holding.store(false, Ordering::Relaxed);
            let Some(pipeline) = self.pipeline.upgrade() else {
                return Some(Held {
                    consumer,
                    held: Some(delivery),
                });
            };
            lane.account
                .lane_head(&lane.queue(), waiting_since(&delivery.properties));
            lane.taken.fetch_add(1, Ordering::Relaxed);
            let session = session_of(&delivery.data);
            let taken = Taken {
                lane: Arc::downgrade(&lane),
                bucket: bucket(&session),
                returned: false,
            };
            let in_flight = InFlight::tracked(&self.settled);
            if let Some(task) =
                pipeline.accept_aside(delivery, &self.source.publisher, in_flight, slot, taken)
            {
                self.source.tracker.spawn(task);
            }
        }
    }
}

/// A running reader of an account queue.
pub(super) struct LaneReader {
    channel: Channel,
    tag: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Option<Held>>,
}

/// A stopped reader's consumer, and the delivery it held while waiting for a slot.
struct Held {
    consumer: lapin::Consumer,
    held: Option<Delivery>,
}

impl LaneReader {
    /// Resolves when the reader ended by itself (its consumer was cancelled or failed);
    /// never without one.
    pub(super) async fn ended(reader: &mut Option<Self>) {
        match reader {
            Some(r) if !r.task.is_finished() => {
                // Polled by reference; the handle stays for `stop`.
                let _ = (&mut r.task).await;
            }
            Some(_) => {}
            None => std::future::pending().await,
        }
    }

    /// Whether the reader ended by itself (its consumer was cancelled or failed).
    pub(super) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops taking and cancels the consumer. What it had received and not taken stays
    /// unacked and goes back to the account queue when the channel closes, in the order it was
    /// delivered, after older commands still in hand (rejected now, it would go ahead of them).
    /// Returns the channel, to be closed once what it took has settled.
    pub(super) async fn stop(self, lane: &Lane, t: Duration) -> Channel {
        self.stop.cancel();
        let held = (self.task.await).ok().flatten();
        let cancel = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default());
        let mut left = 0usize;
        if timed("basic.cancel", t, cancel).await.is_ok()
            && let Some(Held { mut consumer, held }) = held
        {
            left = usize::from(held.is_some());
            while let Ok(Some(Ok(_))) = tokio::time::timeout(t, consumer.next()).await {
                left = left.saturating_add(1);
            }
        }
        lane.in_queue.fetch_add(left, Ordering::Relaxed);
        lane.holding.store(false, Ordering::Relaxed);
        self.channel
    }

    /// The channel of a reader that ended by itself (its consumer was cancelled or failed).
    pub(super) fn into_channel(self) -> Channel {
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

/// A first consumer under the tag the reader is about to use: RabbitMQ answers the second with
/// a connection-level error (530, reuse of a consumer tag), as it answers a consume of a
/// quorum queue it cannot serve.
#[cfg(feature = "fault-injection")]
async fn fault_bad_queue(channel: &Channel, lane: &Lane, tag: &str) {
    static FAILED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if lane.account.id != FAULT_BAD_QUEUE_ACCOUNT
        || FAILED
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < FAULT_BAD_QUEUE_TIMES).then_some(n + 1)
            })
            .is_err()
    {
        return;
    }
    let _ = channel
        .basic_consume(
            lane.queue().as_ref().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
}

/// The session a command set aside belongs to, as the pipeline keys it (it was read once
/// already, so it is JSON with a `botSessionId`; anything else keys nothing).
fn session_of(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Session {
        #[serde(rename = "botSessionId")]
        bot_session_id: String,
    }
    serde_json::from_slice::<Session>(body)
        .map(|s| s.bot_session_id)
        .unwrap_or_default()
}

/// Returns once the broker has applied every ack sent on `channel` (a stopped reader's):
/// a marker is published on that same channel, in confirm mode, into `queue`. The broker
/// applies a channel's acks and publishes to a quorum queue in the order it received them,
/// and confirms the marker only once it is applied, so the acks before it are too. A channel
/// closed before its acks were applied would return commands that were called and published,
/// for the next holder to call again. Where the marker cannot be confirmed (the queue or the
/// channel gone), a pause instead. The marker is acked by whoever reads it.
pub(super) async fn acks_applied(channel: &Channel, queue: &str, t: Duration) {
    let confirmed = async {
        let select = channel.confirm_select(ConfirmSelectOptions::default());
        timed("confirm.select", t, select).await?;
        let mut headers = FieldTable::default();
        let id = uuid::Uuid::new_v4().simple().to_string();
        headers.insert(MARKER.into(), AMQPValue::LongString(id.as_str().into()));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
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
