//! Taking commands back from an account queue: a consumer on a channel of its own, with the
//! account's cap as prefetch, takes each command only when one of the account's slots is free;
//! stopped, it returns what it received and did not take to the queue, in order.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use super::{Lane, SourceLanes, Taken, bucket};
use crate::broker::account_queue::{
    Deliveries, QueueReader, ReaderChannel, marker_of, waiting_since,
};
use crate::broker::consumer::InFlight;
use crate::broker::{BrokerError, Delivery};

impl SourceLanes {
    /// Starts consuming the lane's account queue on a channel of its own, with the account's
    /// cap as prefetch.
    pub(super) async fn read(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
    ) -> Result<LaneReader, BrokerError> {
        let t = self.source.amqp.operation_timeout;
        let (reader, deliveries) = self
            .on_queue(lane, async |connection| {
                let prefetch = u16::try_from(lane.account.cap()).unwrap_or(u16::MAX);
                let channel = ReaderChannel::open(&connection, prefetch, t).await?;
                channel.consume(&lane.queue()).await
            })
            .await?;
        let stop = self.stop.child_token();
        let task = tokio::spawn(self.clone().take(lane.clone(), deliveries, stop.clone()));
        Ok(LaneReader { reader, stop, task })
    }

    /// Takes the account queue's commands in order, each when one of the account's slots is
    /// free, until stopped; then gives the consumer back with what it has not taken.
    async fn take(
        self: Arc<Self>,
        lane: Arc<Lane>,
        mut deliveries: Deliveries,
        stop: CancellationToken,
    ) -> Option<Held> {
        loop {
            let delivery = tokio::select! {
                biased;
                () = stop.cancelled() => return Some(Held { deliveries, held: None }),
                delivery = deliveries.next() => delivery,
            };
            // None: the consumer was cancelled or failed.
            let delivery = delivery?;
            if let Some(id) = marker_of(&delivery) {
                // A marker, this holder's or one an earlier holder left: everything published
                // before it has been handed to a consumer. It needs no slot. (Counted in if
                // the queue was found holding it; this holder's own are not, and the count
                // stops at zero.)
                let _ = lane
                    .in_queue
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(1))
                    });
                if delivery.ack().await.is_ok() {
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
                () = stop.cancelled() => return Some(Held { deliveries, held: Some(delivery) }),
                slot = lane.account.slot() => slot,
            };
            lane.holding.store(false, Ordering::Relaxed);
            let Some(pipeline) = self.pipeline.upgrade() else {
                return Some(Held {
                    deliveries,
                    held: Some(delivery),
                });
            };
            lane.account
                .lane_head(&lane.queue(), waiting_since(&delivery));
            lane.taken.fetch_add(1, Ordering::Relaxed);
            let session = session_of(delivery.body());
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
    reader: QueueReader,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Option<Held>>,
}

/// A stopped reader's deliveries, and the one it held while waiting for a slot.
struct Held {
    deliveries: Deliveries,
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
    pub(super) async fn stop(self, lane: &Lane) -> ReaderChannel {
        self.stop.cancel();
        let (held, deliveries) = match (self.task.await).ok().flatten() {
            Some(Held { deliveries, held }) => (usize::from(held.is_some()), Some(deliveries)),
            None => (0, None),
        };
        let had_deliveries = deliveries.is_some();
        let (channel, cancelled) = self.reader.cancel(deliveries).await;
        let left = match cancelled {
            Some(after) if had_deliveries => held.saturating_add(after),
            _ => 0,
        };
        lane.in_queue.fetch_add(left, Ordering::Relaxed);
        lane.holding.store(false, Ordering::Relaxed);
        channel
    }

    /// The channel of a reader that ended by itself (its consumer was cancelled or failed).
    pub(super) fn into_channel(self) -> ReaderChannel {
        self.reader.into_channel()
    }
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
