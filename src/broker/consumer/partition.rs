//! One partition consumed on a connection: its reader (each delivery with a permit of the
//! replica-wide limit), and its hand-over in order when it goes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ACK_SETTLE, Handler, InFlight, Source};
use crate::broker::holds::Holds;
use crate::broker::{BrokerError, Publisher, timed};

/// One partition consumed on this connection.
pub(super) struct Subscription {
    /// Its queue.
    pub(super) queue: String,
    /// Its tenure, as the handler saw it opened.
    pub(super) source: Source,
    pub(super) channel: Channel,
    /// Its consumer tag, to cancel it.
    pub(super) tag: String,
    /// Its prefetch: its share of `amqp.prefetch`.
    pub(super) share: u16,
    /// Stops the reader.
    pub(super) stop: CancellationToken,
    /// Gives the consumer back when stopped, with what it had not handed over yet.
    pub(super) reader: tokio::task::JoinHandle<Option<Stopped>>,
    /// One token per delivery handed over and not yet settled.
    pub(super) settled: TaskTracker,
}

/// Hands a partition over, in order. RabbitMQ (3.10 and later) activates the next
/// single-active consumer as soon as the current one is cancelled — a graceful channel close
/// included — and returns the cancelled one's unacked messages only afterwards, behind newer
/// ones. So the next owner does not subscribe until this replica no longer lists the partition
/// (see `fleet::membership`), and this replica lets go in this order:
///
/// 1. the reader stops handing deliveries over; the consumer is cancelled (no more come);
/// 2. what the client had received but not handed over is kept unacked;
/// 3. the partition's lanes are let go (their channels closed, see `SourceLanes::close`);
/// 4. the commands handed over finish and are acked, within `shutdown.grace`;
/// 5. the channel closes: the broker returns everything still unacked in the order it was
///    delivered, ahead of the queue's other messages, so the next owner starts with them;
/// 6. the hold is given up, and the partition is no longer listed.
///
/// Commands that take longer than the grace (a long outage, Redis away) go back to the queue
/// with the channel while they still run here. That is safe: each holds its fleet claim, so the
/// new owner waits for it instead of calling again and is answered from its recorded outcome.
pub(super) async fn release<P: Handler>(
    partition: u16,
    subscription: Subscription,
    t: Duration,
    grace: Duration,
    consuming: Arc<watch::Sender<BTreeSet<u16>>>,
    handler: Arc<P>,
    holds: Option<Arc<dyn Holds>>,
) {
    let started = Instant::now();
    let queue = subscription.queue.clone();
    let source = subscription.source.clone();
    let (channel, settled, left) = subscription.stop(t).await;
    // What was received and not handed over stays unacked: it goes back with the channel, in
    // the order it was delivered, together with whatever is still unsettled. Rejected now, it
    // would go back ahead of older commands of its session that are still in hand here.
    let returned = match left {
        Ok(left) => left.len(),
        Err(e) => {
            tracing::warn!(partition, error = %e, "could not cancel a released partition's consumer; closing its channel");
            0
        }
    };
    settled.close();
    // What was set aside for the partition's accounts goes with it, after what it started:
    // every lane's channel is closed before the partition's own, and the hold goes last.
    P::close(&handler, &source).await;
    if tokio::time::timeout(grace, settled.wait()).await.is_err() {
        tracing::warn!(
            partition,
            unsettled = settled.len(),
            "partition not drained within shutdown.grace; handing it over with commands still running (their claims keep them once-only)"
        );
    }
    tokio::time::sleep(ACK_SETTLE).await;
    let _ = timed(
        "channel.close",
        t,
        channel.close(200, "partition released".into()),
    )
    .await;
    // Only now may another replica register there.
    if let Some(holds) = &holds {
        holds.give(&queue).await;
    }
    consuming.send_modify(|c| {
        c.remove(&partition);
    });
    tracing::info!(partition, returned, drained = ?started.elapsed(), "partition released");
}

impl Subscription {
    /// Stops the reader and cancels the consumer: no more deliveries come. Returns the channel,
    /// the tracker of what was handed over, and, in order, what was received but not handed
    /// over (after cancel-ok the stream ends once it has yielded what it still holds).
    pub(super) async fn stop(
        self,
        t: Duration,
    ) -> (Channel, TaskTracker, Result<Vec<Delivery>, BrokerError>) {
        self.stop.cancel();
        let stopped = self.reader.await.ok().flatten();
        let cancel = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default());
        let left = match timed("basic.cancel", t, cancel).await {
            Err(e) => Err(e),
            Ok(()) => {
                let mut left = Vec::new();
                if let Some(Stopped { mut consumer, held }) = stopped {
                    left.extend(held);
                    while let Ok(Some(Ok(delivery))) =
                        tokio::time::timeout(t, consumer.next()).await
                    {
                        left.push(delivery);
                    }
                }
                Ok(left)
            }
        };
        (self.channel, self.settled, left)
    }
}

/// A stopped reader's consumer, and the delivery it held while waiting for a permit.
pub(super) struct Stopped {
    consumer: lapin::Consumer,
    held: Option<Delivery>,
}

/// What a partition's reader needs.
pub(super) struct Reader<P> {
    pub(super) partition: u16,
    pub(super) queue: String,
    pub(super) consumer: lapin::Consumer,
    pub(super) handler: Arc<P>,
    pub(super) publisher: Arc<Publisher>,
    pub(super) settled: TaskTracker,
    pub(super) limit: Arc<Semaphore>,
    pub(super) tracker: TaskTracker,
    pub(super) stop: CancellationToken,
    pub(super) lost: mpsc::Sender<String>,
    /// `amqp.operation_timeout`: what its deliveries are settled within.
    pub(super) timeout: Duration,
}

/// Takes a partition's deliveries in order, each with a permit of the replica-wide limit, until
/// stopped; then gives the consumer back, with what it has not taken yet.
pub(super) async fn read_partition<P: Handler>(mut r: Reader<P>) -> Option<Stopped> {
    loop {
        // The delivery first, then its permit: an idle partition holds none.
        let delivery = tokio::select! {
            biased;
            () = r.stop.cancelled() => return Some(Stopped { consumer: r.consumer, held: None }),
            delivery = r.consumer.next() => delivery,
        };
        let reason = match delivery {
            Some(Ok(delivery)) => {
                let permit = tokio::select! {
                    biased;
                    // Not handed over: it goes first, back to the queue when the partition is
                    // released, or to the handler when it is renewed.
                    () = r.stop.cancelled() => {
                        return Some(Stopped { consumer: r.consumer, held: Some(delivery) });
                    }
                    permit = r.limit.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return Some(Stopped { consumer: r.consumer, held: Some(delivery) }),
                    },
                };
                let in_flight = InFlight {
                    _partition: Some(r.settled.token()),
                    _permit: Some(permit),
                };
                let delivery = crate::broker::Delivery::new(delivery, r.timeout);
                if let Some(task) =
                    P::accept(&r.handler, delivery, &r.publisher, in_flight, &r.queue)
                {
                    r.tracker.spawn(task);
                }
                continue;
            }
            Some(Err(e)) => format!("partition {}: {e}", r.partition),
            None => format!(
                "the broker cancelled the consumer of partition {}",
                r.partition
            ),
        };
        if !r.stop.is_cancelled() {
            let _ = r.lost.try_send(reason);
        }
        return None;
    }
}
