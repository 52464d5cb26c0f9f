//! The intake of a fleet that shares work (docs/contract.md §9): the handler of the commands
//! queue on the replica that holds it (single active consumer). Each command is read once at
//! the edge; one that cannot be read is rejected here, through the [`Pipeline`], as a worker
//! alone would. Every other goes, body and properties unchanged, to the partition queue of its
//! `botSessionId` ([`ownership::partition_of`]), and is acked only after the broker confirmed
//! it there.
//!
//! Order: commands of one session are routed one after another (each confirmed before the
//! next is published), so a session's commands reach their partition in arrival order even
//! when a publish fails and is retried. Different sessions are routed concurrently.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Shutdown;
use futures_util::future::Either;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;

use super::Pipeline;
use super::sessions::SessionQueues;
use crate::backoff;
use crate::broker::consumer::{Handler, InFlight};
use crate::broker::{Publisher, timed};
use crate::fleet::ownership;
use crate::ops::metrics::Metrics;
use crate::pipeline::command::{Envelope, Parser};

/// First and longest wait before routing a command again after the broker refused it.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Routes commands to their partitions.
pub struct Intake {
    parser: Parser,
    pipeline: Arc<Pipeline>,
    /// The partition queues, by index.
    queues: Vec<String>,
    /// Boxed, as the pipeline's jobs are: a route waiting behind its session costs a pointer
    /// in the queue, and moves into the task that publishes it without a copy.
    sessions: SessionQueues<Box<Route>>,
    operation_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Cancelled when the shutdown grace ran out: stop retrying, the broker returns the rest.
    shutdown: Shutdown,
}

/// A command on its way to its partition.
struct Route {
    delivery: Delivery,
    partition: u16,
    publisher: Arc<Publisher>,
    _in_flight: InFlight,
}

impl Handler for Intake {
    fn accept(
        this: &Arc<Self>,
        delivery: Delivery,
        publisher: &Arc<Publisher>,
        in_flight: InFlight,
        source: &str,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let envelope = Envelope::from_properties(&delivery.properties);
        // A bug while reading costs one command, never the intake: the pipeline reads it again
        // and rejects it.
        let session = std::panic::catch_unwind(AssertUnwindSafe(|| {
            this.parser
                .parse(&delivery.data, &envelope)
                .ok()
                .map(|valid| valid.command.bot_session_id)
        }))
        .ok()
        .flatten();
        let Some(session) = session else {
            return Pipeline::accept(&this.pipeline, delivery, publisher, in_flight, source)
                .map(Either::Left);
        };
        let partition = ownership::partition_of(&session, this.partition_count());
        let route = Box::new(Route {
            delivery,
            partition,
            publisher: publisher.clone(),
            _in_flight: in_flight,
        });
        let route = this.sessions.push(&session, route)?;
        Some(Either::Right(this.clone().run_session(session, route)))
    }
}

impl Intake {
    /// An intake reading with `parser`, routing to the partitions of `commands_queue`, and
    /// rejecting through `pipeline`.
    pub fn new(
        parser: Parser,
        pipeline: Arc<Pipeline>,
        commands_queue: &str,
        partitions: u16,
        operation_timeout: Duration,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            parser,
            pipeline,
            queues: (0..partitions)
                .map(|k| crate::contract::names::partition_queue(commands_queue, k))
                .collect(),
            sessions: SessionQueues::default(),
            operation_timeout,
            metrics,
            shutdown,
        }
    }

    fn partition_count(&self) -> u16 {
        u16::try_from(self.queues.len()).unwrap_or(u16::MAX)
    }

    async fn run_session(self: Arc<Self>, session: String, route: Box<Route>) {
        self.sessions
            .run_in_order(&session, route, |route| self.route(route))
            .await;
    }

    /// Publishes the command to its partition until the broker confirms it, then acks it. If
    /// the connection goes, the broker returns the command (and those behind it) by itself.
    async fn route(&self, route: Box<Route>) {
        let Some(queue) = self.queues.get(usize::from(route.partition)) else {
            return;
        };
        let mut waits = backoff::delays(RETRY_MIN, RETRY_MAX, None);
        loop {
            if !route.publisher.is_connected() || self.shutdown.is_abandoned() {
                return;
            }
            let publish = route.publisher.publish_to_queue(
                queue,
                &route.delivery.data,
                route.delivery.properties.clone(),
            );
            match publish.await {
                Ok(()) => break,
                Err(e) if !route.publisher.is_connected() => {
                    tracing::warn!(error = %e, queue, "could not route a command; the connection is gone and the broker returned it");
                    return;
                }
                Err(e) => {
                    // Never nacked back: the session's next command would overtake it.
                    let wait = waits.next().unwrap_or(RETRY_MAX);
                    tracing::error!(error = %e, queue, ?wait, "could not route a command; trying again");
                    if self.shutdown.sleep(wait).await.is_err() {
                        return;
                    }
                }
            }
        }
        self.metrics.fleet_routed.inc();
        let ack = route.delivery.acker.ack(BasicAckOptions::default());
        if let Err(e) = timed("basic.ack", self.operation_timeout, ack).await {
            // Routed twice at worst; the partition's consumer answers the copy from memory.
            tracing::warn!(error = %e, "could not ack a routed command");
        }
    }
}
