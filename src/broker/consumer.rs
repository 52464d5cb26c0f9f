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

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lapin::Connection;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::account_links::AccountLinks;
use super::holds::Holds;
use super::{BrokerError, CurrentLink, Delivery, Publisher, timed};
use crate::backoff;
use crate::config::AmqpSettings;
use crate::ops::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How often the consumer checks that its connection is still up, in case the client does not
/// report a silent loss on the consumer stream.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// Time the broker gets to apply the last acks before the consuming channel closes at shutdown.
pub(crate) const ACK_SETTLE: Duration = Duration::from_millis(250);

mod owned;
mod partition;
mod registered;
mod serve;
mod standby;

pub use standby::holder_queue;

use registered::Registered;

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
    /// settle (within the grace), and closes what it opened for it, before the consumer gives
    /// the source up. Only what was opened for this tenure of the source (`source.tenure`) is
    /// closed: a newer one is never undone by an older one ending.
    fn close(_this: &Arc<Self>, _source: &Source) -> impl Future<Output = ()> + Send + 'static {
        async {}
    }
}

/// A queue being consumed, and what a handler may use beside it.
#[derive(Clone)]
pub struct Source {
    /// The queue.
    pub queue: String,
    /// This tenure of the queue: unique in the process, new each time the queue is taken up.
    pub tenure: u64,
    /// The connection it is consumed on.
    pub connection: Arc<Connection>,
    /// That connection's publisher.
    pub publisher: Arc<Publisher>,
    /// The connections its account queues are used on (closed before `connection` goes).
    pub links: Arc<AccountLinks>,
    /// Tasks the consumer waits for when it drains.
    pub tracker: TaskTracker,
    /// `[amqp]`.
    pub amqp: AmqpSettings,
    /// How long work taken beside the queue gets to settle when the queue is let go:
    /// `shutdown.grace`, and after it the time a call already on the wire gets to end and be
    /// confirmed (as the queue's own deliveries get).
    pub grace: Duration,
    /// The fleet's holds, with holds: nothing is done beside the queue while they lapsed.
    pub holds: Option<Arc<dyn Holds>>,
}

impl Source {
    /// Whether this replica may act on the queue's behalf now: always without holds (the
    /// broker's own hold goes with the connection), else while its holds are valid.
    pub fn held(&self) -> bool {
        self.holds.as_ref().is_none_or(|h| h.valid())
    }
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
    /// The closing of what a handler opened beside a source let go with a lost connection:
    /// it goes on in the background, and the drain waits for it.
    closing: TaskTracker,
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
            closing: TaskTracker::new(),
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
            closing: self.closing,
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
                    super::connection::close(&connection, amqp, "shutdown").await;
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

    /// `queue` as a [`Source`] for the handler.
    fn source(
        &self,
        queue: &str,
        connection: &Arc<Connection>,
        publisher: &Arc<Publisher>,
        links: &Arc<AccountLinks>,
    ) -> Source {
        static TENURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Source {
            queue: queue.to_owned(),
            tenure: TENURES.fetch_add(1, Ordering::Relaxed),
            connection: connection.clone(),
            publisher: publisher.clone(),
            links: links.clone(),
            tracker: self.tracker.clone(),
            amqp: self.settings.amqp.clone(),
            grace: self.settings.grace.saturating_add(self.settings.settle),
            holds: self.holds.clone(),
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
        // What was let go with a lost connection ends its closing, within the same bound as
        // the drain (the grace, then the time calls on the wire get): never a second one.
        self.closing.close();
        let bound = self.settings.grace.saturating_add(self.settings.settle);
        let left = bound.saturating_sub(started.elapsed());
        let _ = tokio::time::timeout(left, self.closing.wait()).await;
        tracing::info!(elapsed = ?started.elapsed(), "in-flight commands drained");
    }
}

fn reconnect_delays(amqp: &AmqpSettings) -> impl Iterator<Item = Duration> + Send + use<> {
    backoff::delays(amqp.reconnect_initial_delay, amqp.reconnect_max_delay, None)
}
