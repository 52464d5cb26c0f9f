//! A consumer on one queue, feeding a [`Handler`]: the whole life of its connection. Connect,
//! declare the topology, open a confirm-mode publisher, set the prefetch, consume; watch the
//! link; when it drops, reconnect with backoff and resume; on `shutdown.stop`, cancel, drain
//! what is in flight within `shutdown.grace`, and close. It knows nothing of what a delivery
//! means: that is the handler's business. Deliveries in flight when a connection drops are
//! redelivered by the broker to the next one.
//!
//! Each consumer owns its connection and its tasks, so several can run side by side, one per
//! queue.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::task::TaskTracker;

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

/// What a consumer feeds its deliveries to.
pub trait Handler: Send + Sync + 'static {
    /// Takes one delivery, with the publisher of the connection it came on (acks go to the
    /// delivery's own channel). Returns at once; the work it starts, if any, is returned as a
    /// task that the consumer spawns, owns and waits for when it drains.
    fn accept(
        this: &Arc<Self>,
        delivery: Delivery,
        publisher: &Arc<Publisher>,
    ) -> Option<impl Future<Output = ()> + Send + 'static>;
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

/// A consumer on one queue; nothing happens until [`Consumer::run`].
pub struct Consumer<H> {
    settings: ConsumerSettings,
    handler: Arc<H>,
    link: Arc<CurrentLink>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    tracker: TaskTracker,
    /// A connection was lost and not yet re-established (counts reconnects).
    lost: AtomicBool,
}

enum Stop {
    /// Stopped while connected and drained: close this connection.
    Shutdown(Connection),
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
            settings,
            handler,
            link,
            metrics,
            shutdown,
            tracker: TaskTracker::new(),
            lost: AtomicBool::new(false),
        }
    }

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
                () = self.shutdown.stop.cancelled() => break,
            }
        }
        // Stopped while disconnected: nothing can be published, so nothing can finish.
        self.shutdown.abandon.cancel();
        self.drain().await;
        Ok(())
    }

    /// One connection's life: connect, declare, consume until it ends. The flag says whether
    /// consuming began, so the backoff restarts from its first step after a healthy period.
    async fn serve(&self) -> Result<(Stop, bool), BrokerError> {
        let amqp = &self.settings.amqp;
        let queue = self.settings.queue.as_str();
        let t = amqp.operation_timeout;
        let tag = format!("transfer-worker-{}", uuid::Uuid::new_v4());
        let setup = async {
            let name = format!("transfer-worker {}", std::process::id());
            let connection = super::connection::connect(amqp, &name).await?;
            let setup = timed("channel.open", t, connection.create_channel()).await?;
            super::topology::declare(&setup, amqp).await?;
            let publisher = Arc::new(Publisher::open(&connection, amqp).await?);
            let channel = timed("channel.open", t, connection.create_channel()).await?;
            timed(
                "basic.qos",
                t,
                channel.basic_qos(amqp.prefetch, BasicQosOptions::default()),
            )
            .await?;
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
            Ok::<_, BrokerError>((connection, publisher, channel, consumer))
        };
        let (connection, publisher, channel, mut consumer) = tokio::select! {
            r = setup => r?,
            () = self.shutdown.stop.cancelled() => return Ok((Stop::Stopped, false)),
        };
        self.link.set_publisher(Some(publisher.clone()));
        self.link.set_consuming(true);
        if self.lost.swap(false, Ordering::Relaxed) {
            self.metrics.broker_reconnects.inc();
        }
        tracing::info!(queue, prefetch = amqp.prefetch, "consuming commands");
        let mut liveness = tokio::time::interval(LIVENESS_CHECK);
        loop {
            let reason = tokio::select! {
                biased;
                () = self.shutdown.stop.cancelled() => {
                    self.link.set_consuming(false);
                    let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
                    if let Err(e) = timed("basic.cancel", t, cancel).await {
                        tracing::warn!(error = %e, "could not cancel the consumer");
                    }
                    // Drain while the consuming channel is open: the acks of in-flight work
                    // go to it, and dropping it would hand it all back to the broker.
                    self.drain().await;
                    // A quorum queue may drop acks that reach it right before their channel
                    // closes and return those messages as if never acked (rabbitmq-server
                    // #10327): work that ended would run again. A moment for the broker to apply
                    // the last acks prevents it.
                    tokio::time::sleep(ACK_SETTLE).await;
                    // Closed one by one before the connection, so none is torn down mid-close.
                    let _ = timed("channel.close", t, channel.close(200, "shutdown".into())).await;
                    publisher.close(t).await;
                    drop(consumer);
                    return Ok((Stop::Shutdown(connection), true));
                }
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        if let Some(task) = H::accept(&self.handler, delivery, &publisher) {
                            self.tracker.spawn(task);
                        }
                        continue;
                    }
                    Some(Err(e)) => e.to_string(),
                    // The queue was deleted, say: a fresh connection re-declares it.
                    None => "the broker cancelled the consumer".to_owned(),
                },
                _ = liveness.tick() => {
                    if !connection.status().connected() {
                        "connection closed".to_owned()
                    } else if !channel.status().connected() {
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
            // Closing hands every unacked delivery back to the broker at once; the next
            // connection re-declares the topology and takes them again.
            let _ = timed(
                "connection.close",
                t,
                connection.close(200, reason.as_str().into()),
            )
            .await;
            return Ok((Stop::Lost(reason), true));
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
            self.shutdown.abandon.cancel();
            // Waits end at once; a call already on the wire may finish (abandoning it could
            // transfer the conversation twice), and its outcome still gets published.
            let _ = tokio::time::timeout(self.settings.settle, self.tracker.wait()).await;
        }
        tracing::info!(elapsed = ?started.elapsed(), "in-flight commands drained");
    }
}

fn reconnect_delays(amqp: &AmqpSettings) -> impl Iterator<Item = Duration> + Send + use<> {
    backoff::delays(amqp.reconnect_initial_delay, amqp.reconnect_max_delay, None)
}
