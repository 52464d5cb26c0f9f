//! The consumer: takes deliveries off the commands queue, runs them per session, publishes
//! each outcome with confirms and only then acks (docs/contract.md §4). It owns the broker connection:
//! when the connection drops it reconnects with backoff, re-declares, and resumes; commands in
//! flight at that moment are redelivered by the broker and answered from the outcome cache.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{FutureExt, StreamExt};
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::agentassist::transfer::{Abandoned, Transfers};
use crate::broker::{self, BrokerError, CurrentLink, DeadLetter, Publisher, Reply, timed};
use crate::config::AmqpSettings;
use crate::ops::metrics::Metrics;
use crate::pipeline::command::{Command, Envelope, Parser, Rejection};
use crate::pipeline::event::{Event, EventKind, Subject};
use crate::pipeline::outcomes::Outcomes;
use crate::pipeline::sessions::SessionQueues;
use crate::shutdown::Shutdown;

/// Wait before returning a command whose outcome could not be published, so a broker that
/// refuses publishes is not hammered by redeliveries.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// How often the consumer checks that its connection is still up, in case the client does not
/// report a silent loss on the consumer stream.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// Everything the consumer needs.
pub struct WorkerParts {
    /// `[amqp]`.
    pub amqp: AmqpSettings,
    /// `shutdown.grace`.
    pub grace: Duration,
    /// After the grace: time for a call already on the wire to end and its outcome to be
    /// confirmed (request timeout + confirm timeout).
    pub settle: Duration,
    /// Reads deliveries.
    pub parser: Parser,
    /// Runs commands.
    pub transfers: Transfers,
    /// Remembers outcomes.
    pub outcomes: Outcomes,
    /// Counts.
    pub metrics: Arc<Metrics>,
    /// The shared link.
    pub broker: Arc<CurrentLink>,
    /// Stop signals.
    pub shutdown: Shutdown,
}

/// The consumer loop.
pub struct Worker {
    parts: WorkerParts,
    sessions: SessionQueues<Job>,
    tracker: TaskTracker,
    /// A connection was lost and not yet re-established (counts reconnects).
    lost: AtomicBool,
}

/// A delivery, read, waiting for or in its session's turn.
struct Job {
    delivery: Delivery,
    parsed: Result<Command, Box<Rejection>>,
    publisher: Arc<Publisher>,
}

impl Job {
    fn command_id(&self) -> &str {
        match &self.parsed {
            Ok(c) => &c.command_id,
            Err(r) => &r.command_id,
        }
    }

    fn subject(&self) -> Subject<'_> {
        match &self.parsed {
            Ok(c) => c.into(),
            Err(r) => r.as_ref().into(),
        }
    }

    /// Commands of one `botSessionId` run in order; a rejection without one runs on its own.
    fn session_key(&self) -> String {
        match &self.parsed {
            Ok(c) => c.bot_session_id.clone(),
            Err(r) => r
                .bot_session_id
                .clone()
                .unwrap_or_else(|| format!("\0{}", r.command_id)),
        }
    }
}

enum Stop {
    /// Stopped while connected and drained: close this connection.
    Shutdown(Connection),
    /// Stopped before a connection was up.
    Stopped,
    /// The connection went away.
    Lost(String),
}

impl Worker {
    /// A worker; nothing happens until [`Worker::run`].
    pub fn new(parts: WorkerParts) -> Arc<Self> {
        Arc::new(Self {
            parts,
            sessions: SessionQueues::default(),
            tracker: TaskTracker::new(),
            lost: AtomicBool::new(false),
        })
    }

    /// Consumes until `shutdown.stop`, reconnecting whenever the connection drops. Returns
    /// after in-flight commands finished or were returned to the queue; errs only on a problem
    /// that reconnecting cannot fix.
    pub async fn run(self: Arc<Self>) -> Result<(), BrokerError> {
        let p = &self.parts;
        let mut delays = reconnect_delays(&p.amqp);
        loop {
            // `serve` watches the stop signal itself: once connected it must drain in-flight
            // commands on its connection before returning, which dropping it would prevent.
            let attempt = self.clone().serve().await;
            p.broker.set_consuming(false);
            p.broker.set_publisher(None);
            match attempt {
                Ok((Stop::Shutdown(connection), _)) => {
                    let _ = timed(
                        "connection.close",
                        p.amqp.operation_timeout,
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
                        delays = reconnect_delays(&p.amqp);
                    }
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => tracing::warn!(error = %e, "cannot reach the broker; retrying"),
            }
            let wait = delays.next().unwrap_or(p.amqp.reconnect_max_delay);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = p.shutdown.stop.cancelled() => break,
            }
        }
        // Stopped while disconnected: nothing can be published, so nothing can finish.
        p.shutdown.abandon.cancel();
        self.drain().await;
        Ok(())
    }

    /// One connection's life: connect, declare, consume until it ends. The flag says whether
    /// consuming began, so the backoff restarts from its first step after a healthy period.
    async fn serve(self: Arc<Self>) -> Result<(Stop, bool), BrokerError> {
        let p = &self.parts;
        let t = p.amqp.operation_timeout;
        let tag = format!("transfer-worker-{}", uuid::Uuid::new_v4());
        let setup = async {
            let name = format!("transfer-worker {}", std::process::id());
            let connection = broker::connection::connect(&p.amqp, &name).await?;
            let setup = timed("channel.open", t, connection.create_channel()).await?;
            broker::topology::declare(&setup, &p.amqp).await?;
            let publisher = Arc::new(Publisher::open(&connection, &p.amqp).await?);
            let channel = timed("channel.open", t, connection.create_channel()).await?;
            timed(
                "basic.qos",
                t,
                channel.basic_qos(p.amqp.prefetch, BasicQosOptions::default()),
            )
            .await?;
            let consumer = timed(
                "basic.consume",
                t,
                channel.basic_consume(
                    p.amqp.commands_queue.as_str().into(),
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
            () = p.shutdown.stop.cancelled() => return Ok((Stop::Stopped, false)),
        };
        p.broker.set_publisher(Some(publisher.clone()));
        p.broker.set_consuming(true);
        if self.lost.swap(false, Ordering::Relaxed) {
            p.metrics.broker_reconnects.inc();
        }
        tracing::info!(
            queue = %p.amqp.commands_queue,
            prefetch = p.amqp.prefetch,
            "consuming commands"
        );
        let mut liveness = tokio::time::interval(LIVENESS_CHECK);
        loop {
            let reason = tokio::select! {
                biased;
                () = p.shutdown.stop.cancelled() => {
                    p.broker.set_consuming(false);
                    let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
                    if let Err(e) = timed("basic.cancel", t, cancel).await {
                        tracing::warn!(error = %e, "could not cancel the consumer");
                    }
                    // Drain while the consuming channel is open: the acks of in-flight commands
                    // go to it, and dropping it would hand them all back to the broker.
                    self.drain().await;
                    // Closed one by one before the connection, so none is torn down mid-close.
                    let _ = timed("channel.close", t, channel.close(200, "shutdown".into())).await;
                    publisher.close(t).await;
                    drop(consumer);
                    return Ok((Stop::Shutdown(connection), true));
                }
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        self.accept(delivery, &publisher);
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
            // Closing hands every unacked command back to the broker at once; the next
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

    /// Reads a delivery and hands it to its session.
    fn accept(self: &Arc<Self>, delivery: Delivery, publisher: &Arc<Publisher>) {
        let p = &self.parts;
        p.metrics.commands_received.inc();
        p.metrics.commands_in_flight.inc();
        let envelope = Envelope::from_properties(&delivery.properties);
        // Reading is the first thing input reaches: a bug there must cost one command, not
        // the consumer loop.
        let parsed = std::panic::catch_unwind(AssertUnwindSafe(|| {
            p.parser.parse(&delivery.data, &envelope)
        }))
        .unwrap_or_else(|panic| {
            p.metrics.command_panics.inc();
            let message = format!(
                "internal error while reading the command: {}",
                panic_message(&*panic)
            );
            tracing::error!(%message, "reading a command panicked");
            Err(Box::new(Rejection {
                command_id: crate::pipeline::command::body_hash(&delivery.data),
                stream_id: None,
                bot_session_id: None,
                target: None,
                message,
            }))
        });
        let job = Job {
            delivery,
            parsed,
            publisher: publisher.clone(),
        };
        let key = job.session_key();
        if let Some(job) = self.sessions.push(&key, job) {
            let worker = self.clone();
            self.tracker
                .spawn(async move { worker.run_session(key, job).await });
        }
    }

    async fn run_session(self: Arc<Self>, key: String, mut job: Job) {
        loop {
            self.process(job).await;
            match self.sessions.next(&key) {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    async fn process(&self, job: Job) {
        let span = match &job.parsed {
            Ok(c) => tracing::info_span!(
                "command",
                command_id = %c.command_id,
                stream_id = %c.bot.stream_id,
                bot_session_id = %c.bot_session_id,
            ),
            Err(r) => tracing::info_span!("command", command_id = %r.command_id),
        };
        let done = AssertUnwindSafe(self.process_in_span(&job).instrument(span.clone()))
            .catch_unwind()
            .await;
        if let Err(panic) = done {
            // Past the decision (which has its own guard): publishing or acking panicked. The
            // command goes back to the queue; its outcome, if decided, is remembered.
            self.parts.metrics.command_panics.inc();
            span.in_scope(|| {
                tracing::error!(
                    panic = panic_message(&*panic),
                    "processing a command panicked; returning it to the queue"
                );
            });
            self.requeue(&job, "internal error").instrument(span).await;
        }
        self.parts.metrics.commands_in_flight.dec();
    }

    /// The outcome of a command not already completed: rejected, or carried out. A panic inside
    /// (a bug) ends this command alone, as `transfer.failed` with `error.kind = "internal"`.
    async fn decide(&self, job: &Job) -> Result<Event, Abandoned> {
        let p = &self.parts;
        let decided = AssertUnwindSafe(async {
            match &job.parsed {
                Err(rejection) => {
                    let message_id = job
                        .delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.as_str());
                    Ok(Event::rejected(rejection, message_id))
                }
                // Boxed, like the publish: a session task then holds only the phase it is in,
                // not the largest of them, for every command in flight.
                Ok(command) => Box::pin(p.transfers.execute(command, &p.shutdown.abandon)).await,
            }
        })
        .catch_unwind()
        .await;
        decided.unwrap_or_else(|panic| {
            p.metrics.command_panics.inc();
            let panic = panic_message(&*panic);
            tracing::error!(%panic, "processing a command panicked; it ends as transfer.failed");
            Ok(Event::internal_failure(
                job.subject(),
                &format!("internal error in the worker: {panic}"),
            ))
        })
    }

    async fn process_in_span(&self, job: &Job) {
        let p = &self.parts;
        if !job.publisher.is_connected() {
            // Its connection is gone; the broker has already put it back on the queue.
            return;
        }
        if p.shutdown.abandon.is_cancelled() {
            return self.requeue(job, "shutting down").await;
        }
        let event = match p.outcomes.get(job.command_id()) {
            Some(event) => {
                p.metrics.commands_deduplicated.inc();
                tracing::info!(event = event.kind.name(), event_id = %event.id, "already completed; republishing its outcome");
                event
            }
            None => {
                let event = match self.decide(job).await {
                    Ok(event) => Arc::new(event),
                    Err(Abandoned) => return self.requeue(job, "shutdown grace ran out").await,
                };
                p.outcomes
                    .insert(job.command_id().to_owned(), event.clone());
                event
            }
        };
        let props = &job.delivery.properties;
        let reply = props.reply_to().as_ref().map(|queue| Reply {
            queue: queue.as_str(),
            correlation_id: props
                .correlation_id()
                .as_ref()
                .map_or(job.command_id(), |c| c.as_str()),
        });
        let dead_letter = event.kind.is_dead_letter().then(|| DeadLetter {
            body: &job.delivery.data,
            properties: props,
        });
        match Box::pin(job.publisher.publish(&event, reply, dead_letter)).await {
            Ok(()) => {
                p.metrics.published(event.kind);
                log_outcome(&event);
                let ack = job.delivery.acker.ack(BasicAckOptions::default());
                if let Err(e) = timed("basic.ack", p.amqp.operation_timeout, ack).await {
                    // The event is out; the redelivery will republish it with the same eventId.
                    tracing::warn!(error = %e, "could not ack after publishing");
                }
            }
            Err(e) if !job.publisher.is_connected() => {
                // The connection is gone and the broker has already returned the command; its
                // redelivery may wait behind this job in the session and is answered from
                // memory. Pausing or nacking here would only delay it.
                tracing::warn!(error = %e, "could not publish the outcome; the connection is gone and the broker returned the command");
            }
            Err(e) => {
                tracing::error!(error = %e, "could not publish the outcome; returning the command to the queue");
                tokio::time::sleep(REQUEUE_DELAY).await;
                self.requeue(job, "outcome not confirmed").await;
            }
        }
    }

    async fn requeue(&self, job: &Job, why: &str) {
        let p = &self.parts;
        p.metrics.commands_requeued.inc();
        tracing::info!(why, "returning the command to the queue");
        let nack = job.delivery.acker.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        });
        if let Err(e) = timed("basic.nack", p.amqp.operation_timeout, nack).await {
            tracing::warn!(error = %e, "could not return the command; the broker will when the channel closes");
        }
    }

    /// Waits for in-flight commands within the grace period, then gives up the rest.
    async fn drain(&self) {
        let p = &self.parts;
        self.tracker.close();
        let started = Instant::now();
        if tokio::time::timeout(p.grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = self.sessions.busy_sessions(),
                "shutdown grace ran out; returning unfinished commands to the queue"
            );
            p.shutdown.abandon.cancel();
            // Waits end at once; a call already on the wire may finish (abandoning it could
            // transfer the conversation twice), and its outcome still gets published.
            let _ = tokio::time::timeout(p.settle, self.tracker.wait()).await;
        }
        tracing::info!(elapsed = ?started.elapsed(), "in-flight commands drained");
    }
}

/// The text a panic carried, for the log and the event.
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

fn log_outcome(event: &Event) {
    let name = event.kind.name();
    match event.kind {
        EventKind::Succeeded | EventKind::Callback => {
            tracing::debug!(event = name, event_id = %event.id, "outcome published")
        }
        _ => tracing::info!(
            event = name,
            event_id = %event.id,
            error = event.error.as_deref().unwrap_or_default(),
            "outcome published"
        ),
    }
}

fn reconnect_delays(amqp: &AmqpSettings) -> impl Iterator<Item = Duration> + Send + use<> {
    ExponentialBuilder::default()
        .with_min_delay(amqp.reconnect_initial_delay)
        .with_max_delay(amqp.reconnect_max_delay)
        .with_jitter()
        .without_max_times()
        .build()
}
