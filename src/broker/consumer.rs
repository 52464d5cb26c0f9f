//! A consumer on one queue, feeding a [`Handler`]: the whole life of its connection. Connect,
//! declare the topology, open a confirm-mode publisher, set the prefetch, consume; watch the
//! link; when it drops, reconnect with backoff and resume; on `shutdown.stop`, cancel, drain
//! what is in flight within `shutdown.grace`, and close. It knows nothing of what a delivery
//! means: that is the handler's business. Deliveries in flight when a connection drops are
//! redelivered by the broker to the next one.
//!
//! With partitions (a fleet sharing work, docs/contract.md §9) the same connection also
//! consumes the partition queues this replica owns, each on a channel of its own, fed to a
//! second handler. When ownership changes, a partition that goes is handed over in order (see
//! `release`: cancel, return what was not started, drain, close) and only then stops being
//! listed as consumed; a partition that comes is subscribed when the fleet says no other
//! replica consumes it.
//!
//! The consumer of the queue itself is in `registered`, a partition's reader and hand-over in
//! `partition`.
//!
//! RabbitMQ refuses a channel-wide (global) prefetch on quorum queues, so `amqp.prefetch`
//! bounds the commands in flight across partitions in two steps: each partition consumer's
//! prefetch is a share of it, and a replica-wide limit of `amqp.prefetch` permits, one held by
//! every delivery from its reader to its ack.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::holds::Holds;
use super::{BrokerError, CurrentLink, Publisher, timed};
use crate::backoff;
use crate::config::AmqpSettings;
use crate::ops::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How often the consumer checks that its connection is still up, in case the client does not
/// report a silent loss on the consumer stream.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// Time the broker gets to apply the last acks before the consuming channel closes at shutdown.
const ACK_SETTLE: Duration = Duration::from_millis(250);

mod partition;
mod registered;

use partition::{Reader, Subscription, read_partition, release};
use registered::{Registered, next};

/// What a consumer feeds its deliveries to.
pub trait Handler: Send + Sync + 'static {
    /// Takes one delivery of `source` (the queue it came from), with the publisher of the
    /// connection it came on (acks go to the delivery's own channel) and its [`InFlight`]
    /// mark, to be kept until the delivery is acked or returned. Returns at once; the work it
    /// starts, if any, is returned as a task that the consumer spawns, owns and waits for when
    /// it drains.
    fn accept(
        this: &Arc<Self>,
        delivery: Delivery,
        publisher: &Arc<Publisher>,
        in_flight: InFlight,
        source: &str,
    ) -> Option<impl Future<Output = ()> + Send + 'static>;

    /// A source (the consumer's queue, or a partition) is consumed, or is about to hand this
    /// consumer its first delivery: what the handler consumes beside it (an account's queue)
    /// starts or is looked at again. Called again for a source already open, it refreshes.
    fn open(_this: &Arc<Self>, _source: Source) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// A source is let go: the handler stops taking from beside it, lets what it started
    /// settle (within the grace), and closes what it opened for it.
    fn close(_this: &Arc<Self>, _queue: &str) -> impl Future<Output = ()> + Send + 'static {
        async {}
    }
}

/// A queue being consumed, and what a handler may use beside it.
#[derive(Clone)]
pub struct Source {
    /// The queue.
    pub queue: String,
    /// The connection it is consumed on.
    pub connection: Arc<Connection>,
    /// That connection's publisher.
    pub publisher: Arc<Publisher>,
    /// Tasks the consumer waits for when it drains.
    pub tracker: TaskTracker,
    /// Reports a loss the consumer must reconnect for.
    pub lost: mpsc::Sender<String>,
    /// `[amqp]`.
    pub amqp: AmqpSettings,
    /// `shutdown.grace`.
    pub grace: Duration,
}

/// Kept by a handler with a delivery until it is acked or returned: it tells a partition's
/// drain that the delivery is settled, and gives back its share of `amqp.prefetch`.
#[derive(Debug, Default)]
pub struct InFlight {
    _partition: Option<TaskTrackerToken>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl InFlight {
    /// Settled when dropped, as far as `settled` is concerned.
    pub fn tracked(settled: &TaskTracker) -> Self {
        Self {
            _partition: Some(settled.token()),
            _permit: None,
        }
    }
}

/// The partition queues a consumer also consumes, and who decides which.
pub struct Partitioned<P> {
    /// What partition deliveries are fed to.
    pub handler: Arc<P>,
    /// The partitions this replica owns, kept up to date by the fleet's membership.
    pub owned: watch::Receiver<BTreeSet<u16>>,
    /// `fleet.partitions`: how many partition queues to declare.
    pub count: u16,
    /// The partitions this replica really consumes (subscribed, or releasing and not yet let
    /// go), reported to the fleet: a new owner waits until the old one no longer lists one.
    pub consuming: Arc<watch::Sender<BTreeSet<u16>>>,
}

/// Where and how a consumer consumes.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// `[amqp]`: the broker, the topology it declares, prefetch, timeouts, reconnect delays.
    pub amqp: AmqpSettings,
    /// The queue consumed.
    pub queue: String,
    /// `shutdown.grace`: time for the tasks in flight to finish after `shutdown.stop`.
    pub grace: Duration,
    /// After the grace: time for work already on the wire to end and be confirmed.
    pub settle: Duration,
}

/// A consumer on one queue, and on the partitions it owns if it has any; nothing happens until
/// [`Consumer::run`].
pub struct Consumer<H, P = H> {
    settings: ConsumerSettings,
    handler: Arc<H>,
    partitions: Option<Partitioned<P>>,
    /// `amqp.prefetch` permits shared by the partition consumers.
    limit: Arc<Semaphore>,
    link: Arc<CurrentLink>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    tracker: TaskTracker,
    /// A connection was lost and not yet re-established (counts reconnects).
    lost: AtomicBool,
    /// One holder per queue across a fleet: registers only on queues it holds.
    holds: Option<Arc<dyn Holds>>,
    /// How often a queue another replica holds is asked for again.
    hold_retry: Duration,
}

enum Stop {
    /// Stopped while connected and drained: close this connection.
    Shutdown(Arc<Connection>),
    /// Stopped before a connection was up.
    Stopped,
    /// The connection went away.
    Lost(String),
}

impl<H: Handler> Consumer<H> {
    /// A consumer feeding `handler`, reporting its link on `link`.
    pub fn new(
        settings: ConsumerSettings,
        handler: Arc<H>,
        link: Arc<CurrentLink>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            limit: Arc::new(Semaphore::new(usize::from(settings.amqp.prefetch))),
            settings,
            handler,
            partitions: None,
            link,
            metrics,
            shutdown,
            tracker: TaskTracker::new(),
            lost: AtomicBool::new(false),
            holds: None,
            hold_retry: Duration::from_secs(1),
        }
    }

    /// Also consumes the partitions `partitions.owned` names, feeding them to its handler.
    pub fn with_partitions<P: Handler>(self, partitions: Partitioned<P>) -> Consumer<H, P> {
        Consumer {
            settings: self.settings,
            handler: self.handler,
            partitions: Some(partitions),
            limit: self.limit,
            link: self.link,
            metrics: self.metrics,
            shutdown: self.shutdown,
            tracker: self.tracker,
            lost: self.lost,
            holds: self.holds,
            hold_retry: self.hold_retry,
        }
    }
}

impl<H: Handler, P: Handler> Consumer<H, P> {
    /// Registers on its queue and on each partition only while it holds it (a fleet's
    /// consumer, docs/contract.md §9), asking again every `retry` for one another replica
    /// holds; stops consuming by itself at the holds' deadline.
    pub fn with_holds(mut self, holds: Arc<dyn Holds>, retry: Duration) -> Self {
        self.holds = Some(holds);
        self.hold_retry = retry;
        self
    }
}

impl<H: Handler, P: Handler> Consumer<H, P> {
    /// Consumes until `shutdown.stop`, reconnecting whenever the connection drops. Returns
    /// after in-flight work finished or was returned to the queue; errs only on a problem
    /// that reconnecting cannot fix.
    pub async fn run(&self) -> Result<(), BrokerError> {
        let amqp = &self.settings.amqp;
        let mut delays = reconnect_delays(amqp);
        loop {
            // `serve` watches the stop signal itself: once connected it must drain in-flight
            // work on its connection before returning, which dropping it would prevent.
            let attempt = self.serve().await;
            self.link.set_consuming(false);
            self.link.set_publisher(None);
            match attempt {
                Ok((Stop::Shutdown(connection), _)) => {
                    let _ = timed(
                        "connection.close",
                        amqp.operation_timeout,
                        connection.close(200, "shutdown".into()),
                    )
                    .await;
                    return Ok(());
                }
                Ok((Stop::Stopped, _)) => break,
                Ok((Stop::Lost(reason), served)) => {
                    tracing::warn!(%reason, "broker connection lost; reconnecting");
                    self.lost.store(true, Ordering::Relaxed);
                    if served {
                        delays = reconnect_delays(amqp);
                    }
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => tracing::warn!(error = %e, "cannot reach the broker; retrying"),
            }
            let wait = delays.next().unwrap_or(amqp.reconnect_max_delay);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.shutdown.cancelled() => break,
            }
        }
        // Stopped while disconnected: nothing can be published, so nothing can finish.
        self.shutdown.abandon();
        self.drain().await;
        Ok(())
    }

    /// One connection's life: connect, declare, consume until it ends. The flag says whether
    /// consuming began, so the backoff restarts from its first step after a healthy period.
    async fn serve(&self) -> Result<(Stop, bool), BrokerError> {
        let amqp = &self.settings.amqp;
        let queue = self.settings.queue.as_str();
        let t = amqp.operation_timeout;
        let setup = async {
            let name = format!("transfer-worker {}", std::process::id());
            let connection = super::connection::connect(amqp, &name).await?;
            let setup = timed("channel.open", t, connection.create_channel()).await?;
            super::topology::declare(&setup, amqp).await?;
            if let Some(partitions) = &self.partitions {
                super::topology::declare_partitions(&setup, amqp, partitions.count).await?;
            }
            let _ = timed("channel.close", t, setup.close(200, "declared".into())).await;
            let publisher = Arc::new(Publisher::open(&connection, amqp).await?);
            Ok::<_, BrokerError>((connection, publisher))
        };
        let (connection, publisher) = tokio::select! {
            r = setup => r?,
            () = self.shutdown.cancelled() => return Ok((Stop::Stopped, false)),
        };
        let connection = Arc::new(connection);
        // Without holds the queue is registered now, as part of the setup.
        let mut intake = match &self.holds {
            None => self.register(&connection).await?,
            Some(_) => None,
        };
        self.link.set_publisher(Some(publisher.clone()));
        self.link.set_consuming(true);
        if self.lost.swap(false, Ordering::Relaxed) {
            self.metrics.broker_reconnects.inc();
        }
        let mut owned = self.partitions.as_ref().map(|p| p.owned.clone());
        let mut wanted = BTreeSet::new();
        let mut subscriptions: HashMap<u16, Subscription> = HashMap::new();
        let mut releasing = JoinSet::new();
        let (lost_tx, mut lost_rx) = mpsc::channel::<String>(1);
        // What the handler consumes beside the queue is looked at now, and again right before
        // its first delivery: a standby becomes active only then.
        let source = self.source(queue, &connection, &publisher, &lost_tx);
        H::open(&self.handler, source.clone()).await;
        let mut activated = false;
        let mut deadline = self.holds.as_ref().map(|h| h.deadline());
        let mut retry = tokio::time::interval(self.hold_retry);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // With holds, the queue is registered once held; the partitions owned before this
        // connection came up are subscribed now (those held elsewhere once given up).
        let mut settled = None;
        if self.holds.is_some() {
            match self.register(&connection).await {
                Ok(registered) => intake = registered,
                Err(e) => settled = Some(e.to_string()),
            }
        }
        if let Some(owned) = &mut owned {
            wanted = owned.borrow_and_update().clone();
            if settled.is_none() {
                settled = self
                    .rebalance(
                        &connection,
                        &publisher,
                        &wanted,
                        &mut subscriptions,
                        &mut releasing,
                        &lost_tx,
                    )
                    .await
                    .err()
                    .map(|e| e.to_string());
            }
        }
        let mut liveness = tokio::time::interval(LIVENESS_CHECK);
        loop {
            let stop_by = deadline.as_mut().and_then(|d| *d.borrow_and_update());
            let waiting = self.holds.is_some()
                && (intake.is_none() || wanted.iter().any(|k| !subscriptions.contains_key(k)));
            let reason = tokio::select! {
                biased;
                Some(reason) = async { settled.take() }, if settled.is_some() => reason,
                () = self.shutdown.cancelled() => {
                    self.link.set_consuming(false);
                    // Every partition is handed over in order, as in a rebalance.
                    if let Some(partitions) = &self.partitions {
                        for (k, subscription) in subscriptions.drain() {
                            releasing.spawn(release(
                                k,
                                subscription,
                                t,
                                self.settings.grace,
                                partitions.consuming.clone(),
                                partitions.handler.clone(),
                                self.holds.clone(),
                            ));
                        }
                    }
                    // The next consumer may start at once, so what this one still holds is
                    // handled here rather than returned behind newer commands.
                    let handover = match intake.take() {
                        Some(intake) => Some(intake.stop(t, &self.handler, &publisher, &self.tracker, queue).await),
                        None => None,
                    };
                    // Drain while the consuming channels are open: the acks of in-flight work
                    // go to them, and closing them would hand it all back to the broker.
                    let limit = self.settings.grace + self.settings.settle;
                    tokio::join!(
                        self.drain(),
                        H::close(&self.handler, queue),
                        async {
                            if let Some(intake) = handover {
                                intake.close(t, limit, self.holds.as_deref(), queue).await;
                            }
                        },
                        async { while releasing.join_next().await.is_some() {} },
                    );
                    publisher.close(t).await;
                    return Ok((Stop::Shutdown(connection), true));
                }
                () = until(stop_by), if stop_by.is_some() => {
                    let now = Instant::now();
                    match deadline.as_mut().and_then(|d| *d.borrow_and_update()) {
                        Some(by) if by <= now => "the fleet has not kept this replica's holds for \
                            fleet.member_ttl less fleet.heartbeat; letting every queue go (running \
                            commands keep their claims)".to_owned(),
                        _ => continue,
                    }
                }
                changed = async { deadline.as_mut()?.changed().await.ok() }, if deadline.is_some() => {
                    if changed.is_none() {
                        deadline = None;
                    }
                    continue;
                }
                delivery = next(&mut intake), if intake.is_some() => match delivery {
                    Some(Ok(delivery)) => {
                        if !activated {
                            activated = true;
                            H::open(&self.handler, source.clone()).await;
                        }
                        let in_flight = intake.as_ref().map(|i| InFlight::tracked(&i.settled)).unwrap_or_default();
                        if let Some(task) = H::accept(&self.handler, delivery, &publisher, in_flight, queue) {
                            self.tracker.spawn(task);
                        }
                        continue;
                    }
                    Some(Err(e)) => e.to_string(),
                    // The queue was deleted, say: a fresh connection re-declares it.
                    None => "the broker cancelled the consumer".to_owned(),
                },
                Some(reason) = lost_rx.recv() => reason,
                changed = async { owned.as_mut()?.changed().await.ok() }, if owned.is_some() => {
                    if changed.is_none() {
                        // The membership stopped (shutdown): ownership changes no more.
                        owned = None;
                        continue;
                    }
                    wanted = owned.as_mut().map(|o| o.borrow_and_update().clone()).unwrap_or_default();
                    match self.rebalance(&connection, &publisher, &wanted, &mut subscriptions, &mut releasing, &lost_tx).await {
                        Ok(()) => continue,
                        Err(e) => e.to_string(),
                    }
                }
                _ = retry.tick(), if waiting => {
                    // Queues held by another replica (or not yet asked for) are asked for again.
                    let registered = match intake {
                        Some(_) => Ok(()),
                        None => self.register(&connection).await.map(|r| intake = r),
                    };
                    let subscribed = match registered {
                        Ok(()) => self.rebalance(&connection, &publisher, &wanted, &mut subscriptions, &mut releasing, &lost_tx).await,
                        Err(e) => Err(e),
                    };
                    match subscribed {
                        Ok(()) => continue,
                        Err(e) => e.to_string(),
                    }
                }
                _ = liveness.tick() => {
                    if !connection.status().connected() {
                        "connection closed".to_owned()
                    } else if intake.as_ref().is_some_and(|i| !i.channel.status().connected()) {
                        "consumer channel closed".to_owned()
                    } else if !publisher.is_connected() {
                        // The broker closes a channel on errors such as publishing to an exchange
                        // that was deleted. Without a publisher nothing can finish here.
                        "publisher channel closed".to_owned()
                    } else {
                        continue;
                    }
                }
            };
            for (k, subscription) in subscriptions.drain() {
                subscription.reader.abort();
                if let Some(partitions) = &self.partitions {
                    let queue = crate::contract::names::partition_queue(queue, k);
                    tokio::spawn(P::close(&partitions.handler, &queue));
                }
            }
            releasing.abort_all();
            tokio::spawn(H::close(&self.handler, queue));
            // With the connection, every partition is let go (the broker returns what was
            // unacked, in order: a lost consumer's messages come back before it is replaced).
            if let Some(partitions) = &self.partitions {
                partitions.consuming.send_replace(BTreeSet::new());
            }
            // Closing hands every unacked delivery back to the broker at once; the next
            // connection re-declares the topology and takes them again.
            let _ = timed(
                "connection.close",
                t,
                connection.close(200, reason.as_str().into()),
            )
            .await;
            // Every consuming channel went with the connection: the holds may go too.
            if let Some(holds) = &self.holds {
                holds.give_all().await;
            }
            return Ok((Stop::Lost(reason), true));
        }
    }

    /// Registers the consumer of the queue itself, holding it first when the consumer keeps
    /// holds: `None` while another replica holds it.
    async fn register(&self, connection: &Connection) -> Result<Option<Registered>, BrokerError> {
        let queue = self.settings.queue.as_str();
        if let Some(holds) = &self.holds
            && !holds.take(queue).await
        {
            return Ok(None);
        }
        let amqp = &self.settings.amqp;
        let t = amqp.operation_timeout;
        let channel = timed("channel.open", t, connection.create_channel()).await?;
        timed(
            "basic.qos",
            t,
            channel.basic_qos(amqp.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let tag = format!("transfer-worker-{}", uuid::Uuid::new_v4());
        let consumer = timed(
            "basic.consume",
            t,
            channel.basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        tracing::info!(queue, prefetch = amqp.prefetch, "consuming commands");
        Ok(Some(Registered {
            channel,
            tag,
            consumer,
            settled: TaskTracker::new(),
        }))
    }

    /// Makes the partitions consumed on this connection the ones in `want`: subscribes the new
    /// ones, and drains then closes the ones that went, in the background.
    async fn rebalance(
        &self,
        connection: &Arc<Connection>,
        publisher: &Arc<Publisher>,
        want: &BTreeSet<u16>,
        subscriptions: &mut HashMap<u16, Subscription>,
        releasing: &mut JoinSet<()>,
        lost: &mpsc::Sender<String>,
    ) -> Result<(), BrokerError> {
        let Some(partitions) = &self.partitions else {
            return Ok(());
        };
        let t = self.settings.amqp.operation_timeout;
        let gone: Vec<u16> = subscriptions
            .keys()
            .filter(|k| !want.contains(k))
            .copied()
            .collect();
        for k in gone {
            if let Some(subscription) = subscriptions.remove(&k) {
                releasing.spawn(release(
                    k,
                    subscription,
                    t,
                    self.settings.grace,
                    partitions.consuming.clone(),
                    partitions.handler.clone(),
                    self.holds.clone(),
                ));
            }
        }
        // Each partition consumer's prefetch is its share of `amqp.prefetch`. A consumer's
        // prefetch is fixed when it subscribes, so a kept partition whose share changed is
        // subscribed again (see `renew`).
        let share =
            u16::try_from(usize::from(self.settings.amqp.prefetch).div_ceil(want.len().max(1)))
                .unwrap_or(u16::MAX)
                .max(1);
        for &k in want {
            let renewed = match subscriptions.remove(&k) {
                Some(kept) if kept.share == share => {
                    subscriptions.insert(k, kept);
                    continue;
                }
                Some(kept) => Some(kept),
                None => None,
            };
            let old_share = renewed.as_ref().map(|r| r.share);
            // A new partition is subscribed only once held; a renewed one stays held.
            if renewed.is_none()
                && let Some(holds) = &self.holds
                && !holds
                    .take(&crate::contract::names::partition_queue(
                        &self.settings.queue,
                        k,
                    ))
                    .await
            {
                continue;
            }
            if let Some(old) = renewed {
                releasing.spawn(self.renew(old, t).await);
            }
            let subscription = self
                .subscribe(k, share, connection, publisher, lost)
                .await?;
            partitions.consuming.send_modify(|c| {
                c.insert(k);
            });
            match old_share {
                None => tracing::info!(partition = k, prefetch = share, "partition assigned"),
                Some(from) => tracing::debug!(
                    partition = k,
                    from,
                    to = share,
                    "partition prefetch changed"
                ),
            }
            subscriptions.insert(k, subscription);
        }
        Ok(())
    }

    /// Subscribes partition `k` on a channel of its own with prefetch `share`, and starts its
    /// reader.
    async fn subscribe(
        &self,
        k: u16,
        share: u16,
        connection: &Arc<Connection>,
        publisher: &Arc<Publisher>,
        lost: &mpsc::Sender<String>,
    ) -> Result<Subscription, BrokerError> {
        let Some(partitions) = &self.partitions else {
            unreachable!("only a consumer with partitions subscribes partitions");
        };
        let t = self.settings.amqp.operation_timeout;
        let queue = crate::contract::names::partition_queue(&self.settings.queue, k);
        let channel = timed("channel.open", t, connection.create_channel()).await?;
        timed(
            "basic.qos",
            t,
            channel.basic_qos(share, BasicQosOptions::default()),
        )
        .await?;
        let tag = format!("transfer-worker-{}", uuid::Uuid::new_v4());
        let consumer = timed(
            "basic.consume",
            t,
            channel.basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        // The partition's account queues, if any, are taken up with it.
        P::open(
            &partitions.handler,
            self.source(&queue, connection, publisher, lost),
        )
        .await;
        let stop = CancellationToken::new();
        let settled = TaskTracker::new();
        let reader = tokio::spawn(read_partition(Reader {
            partition: k,
            queue: queue.clone(),
            consumer,
            handler: partitions.handler.clone(),
            publisher: publisher.clone(),
            settled: settled.clone(),
            limit: self.limit.clone(),
            tracker: self.tracker.clone(),
            stop: stop.clone(),
            lost: lost.clone(),
        }));
        Ok(Subscription {
            queue: queue.clone(),
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
    /// partition in order. Returns what closes the old channel once that work is settled.
    async fn renew(
        &self,
        old: Subscription,
        t: Duration,
    ) -> impl Future<Output = ()> + Send + 'static + use<H, P> {
        let queue = old.queue.clone();
        let (channel, settled, left) = old.stop(t).await;
        if let (Ok(left), Some(partitions), Some(publisher)) =
            (left, &self.partitions, self.link.publisher())
        {
            for delivery in left {
                // Taken beyond the replica-wide limit for a moment, rather than out of order.
                let in_flight = InFlight {
                    _partition: Some(settled.token()),
                    _permit: None,
                };
                if let Some(task) =
                    P::accept(&partitions.handler, delivery, &publisher, in_flight, &queue)
                {
                    self.tracker.spawn(task);
                }
            }
        }
        settled.close();
        async move {
            settled.wait().await;
            tokio::time::sleep(ACK_SETTLE).await;
            let _ = timed("channel.close", t, channel.close(200, "renewed".into())).await;
        }
    }

    /// `queue` as a [`Source`] for the handler.
    fn source(
        &self,
        queue: &str,
        connection: &Arc<Connection>,
        publisher: &Arc<Publisher>,
        lost: &mpsc::Sender<String>,
    ) -> Source {
        Source {
            queue: queue.to_owned(),
            connection: connection.clone(),
            publisher: publisher.clone(),
            tracker: self.tracker.clone(),
            lost: lost.clone(),
            amqp: self.settings.amqp.clone(),
            grace: self.settings.grace,
        }
    }

    /// Waits for in-flight work within the grace period, then gives up the rest.
    async fn drain(&self) {
        self.tracker.close();
        let started = Instant::now();
        if tokio::time::timeout(self.settings.grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = self.tracker.len(),
                "shutdown grace ran out; returning unfinished commands to the queue"
            );
            self.shutdown.abandon();
            // Waits end at once; a call already on the wire may finish (abandoning it could
            // transfer the conversation twice), and its outcome still gets published.
            let _ = tokio::time::timeout(self.settings.settle, self.tracker.wait()).await;
        }
        tracing::info!(elapsed = ?started.elapsed(), "in-flight commands drained");
    }
}

/// Sleeps until `at`; forever when there is none.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn reconnect_delays(amqp: &AmqpSettings) -> impl Iterator<Item = Duration> + Send + use<> {
    backoff::delays(amqp.reconnect_initial_delay, amqp.reconnect_max_delay, None)
}
