//! What happens to one command: read at the edge ([`command`]), ordered by session
//! ([`sessions`]), answered from memory when already completed ([`outcomes`]), carried out and
//! turned into its event ([`handle`](mod@handle), [`event`]); then the event is published with confirms
//! and only then is the command acked (docs/contract.md §4).
//!
//! [`Pipeline`] is what a [`crate::broker::consumer::Consumer`] feeds: it reads each delivery,
//! queues it behind its session, and runs each session's commands one after another.

pub mod command;
pub mod event;
pub mod handle;
pub mod intake;
pub mod outcomes;
pub mod sessions;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tracing::Instrument;

use crate::broker::consumer::{Handler, InFlight};
use crate::broker::{DeadLetter, Publisher, Reply, timed};
use crate::ops::trace_context::{self, CommandTrace};
use command::{Envelope, Parser, Rejection};
use event::{Event, EventKind};
use handle::{Handled, Parsed, Stages, handle, panic_message};
use sessions::SessionQueues;

/// Wait before returning a command whose outcome could not be published, so a broker that
/// refuses publishes is not hammered by redeliveries.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// Deliveries in, events out, acks after.
pub struct Pipeline {
    parser: Parser,
    stages: Stages,
    sessions: SessionQueues<Job>,
    /// `amqp.operation_timeout`, for acks and nacks.
    operation_timeout: Duration,
}

/// A delivery, read, waiting for or in its session's turn.
struct Job {
    delivery: Delivery,
    parsed: Parsed,
    publisher: Arc<Publisher>,
    /// Released with the job, after its ack or return.
    _in_flight: InFlight,
}

impl Handler for Pipeline {
    fn accept(
        this: &Arc<Self>,
        delivery: Delivery,
        publisher: &Arc<Publisher>,
        in_flight: InFlight,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let job = this.read(delivery, publisher, in_flight);
        let key = job.parsed.session_key();
        let job = this.sessions.push(&key, job)?;
        Some(this.clone().run_session(key, job))
    }
}

impl Pipeline {
    /// A pipeline reading with `parser` and deciding with `stages`.
    pub fn new(parser: Parser, stages: Stages, operation_timeout: Duration) -> Self {
        Self {
            parser,
            stages,
            sessions: SessionQueues::default(),
            operation_timeout,
        }
    }

    /// Reads a delivery once, at the edge.
    fn read(&self, delivery: Delivery, publisher: &Arc<Publisher>, in_flight: InFlight) -> Job {
        let metrics = &self.stages.metrics;
        metrics.commands_received.inc();
        metrics.commands_in_flight.inc();
        let envelope = Envelope::from_properties(&delivery.properties);
        // Reading is the first thing input reaches: a bug there must cost one command, not
        // the consumer loop.
        let command = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.parser.parse(&delivery.data, &envelope)
        }))
        .unwrap_or_else(|panic| {
            metrics.command_panics.inc();
            let message = format!(
                "internal error while reading the command: {}",
                panic_message(&*panic)
            );
            tracing::error!(%message, "reading a command panicked");
            Err(Box::new(Rejection {
                command_id: command::body_hash(&delivery.data),
                stream_id: None,
                bot_session_id: None,
                target: None,
                message,
            }))
        });
        Job {
            delivery,
            parsed: Parsed { envelope, command },
            publisher: publisher.clone(),
            _in_flight: in_flight,
        }
    }

    async fn run_session(self: Arc<Self>, key: String, job: Job) {
        self.sessions
            .run_in_order(&key, job, |job| self.run_one(job))
            .await;
    }

    async fn run_one(&self, job: Job) {
        let incoming = &job.parsed.envelope.trace;
        let preset = CommandTrace::preset(incoming);
        // `None` records nothing until the trace id is known.
        let trace_id = preset.map(|id| trace_context::hex(&id));
        let trace_id = trace_id.as_deref();
        let span = match &job.parsed.command {
            Ok(c) => tracing::info_span!(
                "command",
                command_id = %c.command_id,
                stream_id = %c.bot.stream_id,
                bot_session_id = %c.bot_session_id,
                trace_id,
            ),
            Err(r) => tracing::info_span!("command", command_id = %r.command_id, trace_id),
        };
        let trace = CommandTrace::start(&span, incoming, preset);
        if preset != Some(trace.trace_id) {
            span.record("trace_id", trace.trace_id_hex());
        }
        let processing = trace_context::scope(trace, self.process(&job));
        let done = AssertUnwindSafe(processing.instrument(span.clone()))
            .catch_unwind()
            .await;
        if let Err(panic) = done {
            // Past the decision (which has its own guard): publishing or acking panicked. The
            // command goes back to the queue; its outcome, if decided, is remembered.
            self.stages.metrics.command_panics.inc();
            span.in_scope(|| {
                tracing::error!(
                    panic = panic_message(&*panic),
                    "processing a command panicked; returning it to the queue"
                );
            });
            self.requeue(&job, "internal error").instrument(span).await;
        }
        self.stages.metrics.commands_in_flight.dec();
    }

    async fn process(&self, job: &Job) {
        if !job.publisher.is_connected() {
            // Its connection is gone; the broker has already put it back on the queue.
            return;
        }
        let event = match handle(&self.stages, &job.parsed).await {
            Handled::Decided(event) | Handled::Remembered(event) => event,
            Handled::Requeue(why) => return self.requeue(job, why).await,
        };
        let command_id = job.parsed.command_id();
        let props = &job.delivery.properties;
        let reply = props.reply_to().as_ref().map(|queue| Reply {
            queue: queue.as_str(),
            correlation_id: props
                .correlation_id()
                .as_ref()
                .map_or(command_id, |c| c.as_str()),
        });
        let dead_letter = event.kind.is_dead_letter().then(|| DeadLetter {
            body: &job.delivery.data,
            properties: props,
        });
        match Box::pin(job.publisher.publish(&event, reply, dead_letter)).await {
            Ok(()) => {
                self.stages.metrics.published(event.kind);
                log_outcome(&event);
                let ack = job.delivery.acker.ack(BasicAckOptions::default());
                if let Err(e) = timed("basic.ack", self.operation_timeout, ack).await {
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
        self.stages.metrics.commands_requeued.inc();
        tracing::info!(why, "returning the command to the queue");
        let nack = job.delivery.acker.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        });
        if let Err(e) = timed("basic.nack", self.operation_timeout, nack).await {
            tracing::warn!(error = %e, "could not return the command; the broker will when the channel closes");
        }
    }
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
