//! The partitions consumed on one connection, kept equal to the ones this replica owns:
//! a partition that comes is subscribed (once held, with holds) with its share of
//! `amqp.prefetch`; one that goes is handed over in order in the background (see
//! [`super::partition::release`]); one whose share changed is renewed without letting it go.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::partition::{Reader, Subscription, read_partition, release};
use super::serve::Connected;
use super::{ACK_SETTLE, Consumer, Handler, InFlight, Source};
use crate::broker::{BrokerError, timed};
use crate::contract::names::partition_queue;

/// The partitions of one connection.
pub(super) struct Owned {
    /// Ownership as the fleet's membership decides it; `None` without partitions, or once
    /// the membership stopped.
    pub(super) watch: Option<watch::Receiver<BTreeSet<u16>>>,
    /// The partitions owned, as last seen.
    pub(super) wanted: BTreeSet<u16>,
    /// The partitions consumed here.
    pub(super) subscriptions: HashMap<u16, Subscription>,
    /// Hand-overs under way: a partition's (its number) or a renewed consumer's (`None`).
    pub(super) releasing: JoinSet<Option<u16>>,
    /// The partitions being handed over: none is taken up again before its hand-over ended,
    /// or that hand-over's end would give up the new tenure's hold.
    handing_over: BTreeSet<u16>,
}

impl Owned {
    pub(super) fn new(watch: Option<watch::Receiver<BTreeSet<u16>>>) -> Self {
        Self {
            watch,
            wanted: BTreeSet::new(),
            subscriptions: HashMap::new(),
            releasing: JoinSet::new(),
            handing_over: BTreeSet::new(),
        }
    }

    /// Partition `k`'s hand-over ended.
    pub(super) fn released(&mut self, k: u16) {
        self.handing_over.remove(&k);
    }

    /// Whether a partition owned is not consumed yet (held elsewhere, say).
    pub(super) fn waiting(&self) -> bool {
        self.wanted
            .iter()
            .any(|k| !self.subscriptions.contains_key(k))
    }
}

/// Each partition consumer's prefetch: its share of `prefetch` among `partitions`.
fn share(prefetch: u16, partitions: usize) -> u16 {
    u16::try_from(usize::from(prefetch).div_ceil(partitions.max(1)))
        .unwrap_or(u16::MAX)
        .max(1)
}

impl<H: Handler, P: Handler> Consumer<H, P> {
    /// Makes the partitions consumed on this connection the ones owned: subscribes the new
    /// ones, and drains then closes the ones that went, in the background.
    pub(super) async fn rebalance(&self, link: &mut Connected) -> Result<(), BrokerError> {
        if self.partitions.is_none() {
            return Ok(());
        }
        let gone: Vec<u16> = (link.owned.subscriptions.keys())
            .filter(|k| !link.owned.wanted.contains(k))
            .copied()
            .collect();
        for k in gone {
            self.release(&mut link.owned, k);
        }
        // A consumer's prefetch is fixed when it subscribes, so a kept partition whose share
        // changed is subscribed again (see `renew`).
        let share = share(self.settings.amqp.prefetch, link.owned.wanted.len());
        for k in link.owned.wanted.clone() {
            self.take_up_partition(link, k, share).await?;
        }
        Ok(())
    }

    /// Consumes partition `k` with prefetch `share`, if it is not already so.
    async fn take_up_partition(
        &self,
        link: &mut Connected,
        k: u16,
        share: u16,
    ) -> Result<(), BrokerError> {
        let Some(partitions) = &self.partitions else {
            return Ok(());
        };
        let subscriptions = &mut link.owned.subscriptions;
        let renewed = match subscriptions.remove(&k) {
            Some(kept) if kept.share == share => {
                subscriptions.insert(k, kept);
                return Ok(());
            }
            kept => kept,
        };
        if renewed.is_none() && link.owned.handing_over.contains(&k) {
            // Asked for again once its hand-over ended.
            return Ok(());
        }
        let old_share = renewed.as_ref().map(|r| r.share);
        // A new partition is subscribed only once held; a renewed one stays held.
        if renewed.is_none()
            && let Some(holds) = &self.holds
            && !holds.take(&partition_queue(&self.settings.queue, k)).await
        {
            return Ok(());
        }
        let mut kept = None;
        if let Some(old) = renewed {
            let t = self.settings.amqp.operation_timeout;
            kept = Some(old.source.clone());
            let renewing = match self.renew(old, t).await {
                Ok(renewing) => renewing,
                Err(e) => {
                    // The connection goes; what was taken up beside the partition goes first.
                    if let Some(kept) = &kept {
                        self.closing.spawn(P::close(&partitions.handler, kept));
                    }
                    return Err(e);
                }
            };
            link.owned.releasing.spawn(async move {
                renewing.await;
                None
            });
        }
        let subscription = self.subscribe(k, share, link, kept).await?;
        partitions.consuming.send_modify(|c| {
            c.insert(k);
        });
        match old_share {
            None => tracing::info!(partition = k, prefetch = share, "partition assigned"),
            Some(from) => {
                tracing::debug!(
                    partition = k,
                    from,
                    to = share,
                    "partition prefetch changed"
                )
            }
        }
        link.owned.subscriptions.insert(k, subscription);
        Ok(())
    }

    /// Hands partition `k` over in the background, in order.
    fn release(&self, owned: &mut Owned, k: u16) {
        let (Some(partitions), Some(subscription)) =
            (&self.partitions, owned.subscriptions.remove(&k))
        else {
            return;
        };
        owned.handing_over.insert(k);
        let releasing = release(
            k,
            subscription,
            self.settings.amqp.operation_timeout,
            self.settings.grace,
            partitions.consuming.clone(),
            partitions.handler.clone(),
            self.holds.clone(),
        );
        owned.releasing.spawn(async move {
            releasing.await;
            Some(k)
        });
    }

    /// Hands every partition over, as in a rebalance (at shutdown).
    pub(super) fn release_all(&self, owned: &mut Owned) {
        let all: Vec<u16> = owned.subscriptions.keys().copied().collect();
        for k in all {
            self.release(owned, k);
        }
    }

    /// Subscribes partition `k` on a channel of its own with prefetch `share`, and starts its
    /// reader; `kept` is the partition's tenure when its consumer is renewed.
    async fn subscribe(
        &self,
        k: u16,
        share: u16,
        link: &Connected,
        kept: Option<Source>,
    ) -> Result<Subscription, BrokerError> {
        let Some(partitions) = &self.partitions else {
            unreachable!("only a consumer with partitions subscribes partitions");
        };
        let t = self.settings.amqp.operation_timeout;
        let queue = partition_queue(&self.settings.queue, k);
        let channel = timed("channel.open", t, link.connection.create_channel()).await?;
        let qos = channel.basic_qos(share, BasicQosOptions::default());
        timed("basic.qos", t, qos).await?;
        let tag = format!("transfer-worker-{}", uuid::Uuid::new_v4());
        let consume = channel.basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let consumer = timed("basic.consume", t, consume).await?;
        // The partition's account queues, if any, are taken up with it.
        let source = match kept {
            Some(kept) => kept,
            None => self.source(&queue, &link.connection, &link.publisher, &link.links),
        };
        P::open(&partitions.handler, source.clone()).await;
        let stop = CancellationToken::new();
        let settled = TaskTracker::new();
        let reader = tokio::spawn(read_partition(Reader {
            partition: k,
            queue: queue.clone(),
            consumer,
            handler: partitions.handler.clone(),
            publisher: link.publisher.clone(),
            settled: settled.clone(),
            limit: self.limit.clone(),
            tracker: self.tracker.clone(),
            stop: stop.clone(),
            lost: link.lost.clone(),
            timeout: self.settings.amqp.operation_timeout,
        }));
        Ok(Subscription {
            queue,
            source,
            channel,
            tag,
            share,
            stop,
            reader,
            settled,
        })
    }

    /// Retires a kept partition's consumer so that it can be subscribed again with another
    /// prefetch, without letting the partition go: the old consumer is cancelled and what it
    /// had received is handed to the handler here and now, before the new consumer (which the
    /// broker activates at the cancel) delivers anything, so the handler still sees the
    /// partition in order. Returns what closes the old channel once that work is settled; or,
    /// when the cancel failed, why the connection must go: the old consumer may still be
    /// active, and a new one would be handed later commands of a session before the old one's
    /// come back (the connection's end returns them all, in order).
    async fn renew(
        &self,
        old: Subscription,
        t: Duration,
    ) -> Result<impl Future<Output = ()> + Send + 'static + use<H, P>, BrokerError> {
        let queue = old.queue.clone();
        let (channel, settled, left) = old.stop(t).await;
        let left = left?;
        if let (Some(partitions), Some(publisher)) = (&self.partitions, self.link.publisher()) {
            for delivery in left {
                // Taken beyond the replica-wide limit for a moment, rather than out of order.
                let in_flight = InFlight {
                    _partition: Some(settled.token()),
                    _permit: None,
                };
                let delivery = crate::broker::Delivery::new(delivery, t);
                if let Some(task) =
                    P::accept(&partitions.handler, delivery, &publisher, in_flight, &queue)
                {
                    self.tracker.spawn(task);
                }
            }
        }
        settled.close();
        Ok(async move {
            settled.wait().await;
            tokio::time::sleep(ACK_SETTLE).await;
            let _ = timed("channel.close", t, channel.close(200, "renewed".into())).await;
        })
    }
}
