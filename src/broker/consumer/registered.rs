//! The consumer of the queue itself (the commands queue): registered, stopped with what it
//! still holds handed to the handler in order, and closed before its hold is given up.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use tokio_util::task::TaskTracker;

use super::{ACK_SETTLE, Handler, InFlight};
use crate::broker::holds::Holds;
use crate::broker::{Publisher, timed};

/// The consumer of the queue itself, once registered.
pub(super) struct Registered {
    pub(super) channel: Channel,
    /// Its consumer tag, to cancel it.
    pub(super) tag: String,
    pub(super) consumer: lapin::Consumer,
    /// One token per delivery handed over and not yet settled.
    pub(super) settled: TaskTracker,
}

/// The next delivery of the queue's own consumer; never, while it has none.
pub(super) async fn next(
    intake: &mut Option<Registered>,
) -> Option<Result<Delivery, lapin::Error>> {
    match intake {
        Some(intake) => intake.consumer.next().await,
        None => std::future::pending().await,
    }
}

impl Registered {
    /// Cancels the consumer and hands what it still holds to the handler, in order.
    pub(super) async fn stop<H: Handler>(
        mut self,
        t: Duration,
        handler: &Arc<H>,
        publisher: &Arc<Publisher>,
        tracker: &TaskTracker,
        queue: &str,
    ) -> Self {
        let cancel = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default());
        match timed("basic.cancel", t, cancel).await {
            Ok(()) => {
                while let Ok(Some(Ok(delivery))) =
                    tokio::time::timeout(t, self.consumer.next()).await
                {
                    let in_flight = InFlight::tracked(&self.settled);
                    let delivery = crate::broker::Delivery::new(delivery, t);
                    if let Some(task) = H::accept(handler, delivery, publisher, in_flight, queue) {
                        tracker.spawn(task);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not cancel the consumer"),
        }
        self
    }

    /// Waits (up to `limit`) until what it delivered is settled, closes its channel, and only
    /// then gives its hold up.
    pub(super) async fn close(
        self,
        t: Duration,
        limit: Duration,
        holds: Option<&dyn Holds>,
        queue: &str,
    ) {
        self.settled.close();
        if tokio::time::timeout(limit, self.settled.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                queue,
                unsettled = self.settled.len(),
                "closing the consumer with commands unsettled; the broker returns them"
            );
        }
        // A quorum queue may drop acks that reach it right before their channel closes and
        // return those messages as if never acked (rabbitmq-server #10327): work that ended
        // would run again. A moment for the broker to apply the last acks prevents it.
        tokio::time::sleep(ACK_SETTLE).await;
        let _ = timed(
            "channel.close",
            t,
            self.channel.close(200, "shutdown".into()),
        )
        .await;
        drop(self.consumer);
        if let Some(holds) = holds {
            holds.give(queue).await;
        }
    }
}
