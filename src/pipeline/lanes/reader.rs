//! Taking commands back from an account queue: a consumer on a channel of its own, with the
//! account's cap as prefetch, takes each command only when one of the account's slots is free;
//! stopped, it returns what it received and did not take to the queue, in order.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use super::publish::marker_of;
use super::{Lane, SourceLanes, Taken, bucket, waiting_since};
use crate::broker::consumer::InFlight;
use crate::broker::{BrokerError, account_queue, timed};

/// How long a stopped reader waits for the broker to show its acks applied before its channel
/// closes anyway.
pub(super) const ACKS_APPLIED_WAIT: Duration = Duration::from_secs(3);

/// How often it looks meanwhile.
pub(super) const ACKS_APPLIED_LOOK: Duration = Duration::from_millis(50);

/// Time the broker gets to apply the last acks before a channel closes, where it cannot be
/// asked.
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
                        lane.queue.as_str().into(),
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
                // before it has been handed to a consumer. It needs no slot.
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
                .lane_head(&lane.queue, waiting_since(&delivery.properties));
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
    /// Returns the channel, to be closed once what it took has settled, and how many
    /// deliveries it received and did not take (they go back with the channel).
    pub(super) async fn stop(self, lane: &Lane, t: Duration) -> (Channel, usize) {
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
        (self.channel, left)
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
            lane.queue.as_str().into(),
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

impl SourceLanes {
    /// Waits until the broker shows every ack of the lane's stopped reader applied: a quorum
    /// queue keeps counting a cancelled consumer while it holds unacked messages, so no
    /// consumer left means nothing of this reader's goes back when its channel closes. An ack
    /// is applied asynchronously, and a channel closed before it was would return a command
    /// that was called and published, for the next holder to call again. Bounded by
    /// [`ACKS_APPLIED_WAIT`]; a count the broker cannot give answers 0 consumers at once.
    /// While the reader still holds deliveries it received and did not take (`left`, which go
    /// back with its channel), its consumer counts anyway: then only a pause is left.
    pub(super) async fn acks_applied(&self, lane: &Lane, left: usize) {
        if left > 0 {
            tokio::time::sleep(ACK_SETTLE).await;
            return;
        }
        let amqp = &self.source.amqp;
        let _ = tokio::time::timeout(ACKS_APPLIED_WAIT, async {
            loop {
                let counts = self
                    .on_queue(lane, async |c| {
                        account_queue::counts(&c, amqp, &lane.queue).await
                    })
                    .await;
                match counts {
                    Ok(Some(c)) if c.consumers > 0 => {}
                    Ok(_) => return,
                    Err(_) => {
                        tokio::time::sleep(ACK_SETTLE).await;
                        return;
                    }
                }
                tokio::time::sleep(ACKS_APPLIED_LOOK).await;
            }
        })
        .await;
    }
}
