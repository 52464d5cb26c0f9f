//! What happens to one command: read at the edge ([`parser`]), ordered by session
//! ([`sessions`]), answered from memory when already completed ([`outcomes`]), carried out and
//! turned into its event ([`decision`], [`crate::contract::event`]); then the event is
//! published with confirms and only then is the command acked (docs/contract.md §4).
//!
//! [`Pipeline`] is what a [`crate::broker::consumer::Consumer`] feeds (`feed.rs`): it reads
//! each delivery, queues it behind its session, and runs each session's commands one after
//! another. At a fleet's intake the same pipeline admits and routes instead ([`intake`]).

pub mod decision;
mod feed;
pub mod first_start;
pub mod intake;
mod job;
pub mod lanes;
pub mod ledger;
pub mod outcomes;
pub mod parser;
pub mod sessions;

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use tracing::Instrument;

use crate::broker::consumer::InFlight;
use crate::broker::{Delivery, Publisher, Reply};
use crate::contract::{Event, EventKind, Rejection};
use crate::fairness::account::{Account, Slot};
use crate::ops::trace_context::{self, CommandTrace};
use decision::{Decider, Decision, Parsed, panic_message};
use job::{Job, Origin};
use lanes::{SourceLanes, Taken};
use parser::{Envelope, Parser};
use sessions::SessionQueues;

/// Wait before returning a command whose outcome could not be published, so a broker that
/// refuses publishes is not hammered by redeliveries.
const REQUEUE_DELAY: Duration = Duration::from_secs(1);

/// Deliveries in, events out, acks after.
pub struct Pipeline {
    parser: Parser,
    decider: Decider,
    /// Boxed: a job is most of a KiB, and it moves from the session's queue to the task that
    /// runs it; a pointer keeps it out of every future that holds it.
    sessions: SessionQueues<Box<Job>>,
    /// Every account, for the lanes of each source.
    accounts: Vec<Arc<Account>>,
    /// The lanes of each source consumed (docs/fairness.md).
    lanes: Mutex<HashMap<String, Arc<SourceLanes>>>,
    /// At a fleet's intake: valid commands are admitted and routed to their partitions, not
    /// carried out here.
    router: Option<intake::Router>,
}

impl Pipeline {
    /// A pipeline reading with `parser` and deciding with `decider`.
    pub fn new(parser: Parser, decider: Decider) -> Self {
        Self {
            accounts: parser.bots().accounts(),
            parser,
            decider,
            sessions: SessionQueues::default(),
            lanes: Mutex::new(HashMap::new()),
            router: None,
        }
    }

    /// The intake of a fleet that shares work: reads with `parser` (whose accounts are the
    /// intake's own, [`crate::agentassist::bots::Bots::at_intake`]), rejects with `decider`,
    /// and routes the rest with `router` ([`intake`]).
    pub fn intake(parser: Parser, decider: Decider, router: intake::Router) -> Self {
        Self {
            router: Some(router),
            ..Self::new(parser, decider)
        }
    }

    fn lanes_of(&self, source: &str) -> Option<Arc<SourceLanes>> {
        self.lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(source)
            .cloned()
    }

    /// Queues a job behind its session; the job to run now, if the session was idle. A job
    /// queued behind others gives its slot back until its turn.
    fn queue_up(&self, mut job: Box<Job>) -> Option<Box<Job>> {
        let slot = job.slot.take();
        // Jobs from the source are pinned; those taken back from an account queue are not.
        let pinned = job.pinned();
        let mut job = self
            .sessions
            .push_marked(&job.parsed.session_key(), job, pinned)?;
        job.slot = slot;
        Some(job)
    }

    /// Takes a command back from its account's queue, with the slot it will run in.
    fn accept_aside(
        self: &Arc<Self>,
        delivery: Delivery,
        publisher: &Arc<Publisher>,
        in_flight: InFlight,
        slot: Slot,
        taken: Taken,
    ) -> Option<impl Future<Output = ()> + Send + 'static + use<>> {
        // Counted as received once, when it first came from its source.
        let mut job = self.read(delivery, publisher, in_flight, false);
        job.slot = Some(slot);
        job.origin = Origin::Lane(taken);
        self.queue_up(job).map(|job| self.clone().run_session(job))
    }

    /// Reads a delivery once, at the edge; `received` counts it as a command received (one
    /// taken back from its account queue was counted when it first came).
    fn read(
        &self,
        delivery: Delivery,
        publisher: &Arc<Publisher>,
        in_flight: InFlight,
        received: bool,
    ) -> Box<Job> {
        let metrics = &self.decider.metrics;
        let envelope = Envelope::of(&delivery);
        // Reading is the first thing input reaches: a bug there must cost one command, not
        // the consumer loop.
        let command = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.parser.parse(delivery.body(), &envelope)
        }))
        .unwrap_or_else(|panic| {
            metrics.command_panics.inc();
            let message = format!(
                "internal error while reading the command: {}",
                panic_message(&*panic)
            );
            tracing::error!(%message, "reading a command panicked");
            Err(Box::new(Rejection {
                command_id: parser::body_hash(delivery.body()),
                stream_id: None,
                bot_session_id: None,
                target: None,
                message,
            }))
        });
        // At a fleet's intake a command is counted where it is carried out; one that cannot
        // be read ends here.
        let counted = self.router.is_none() || command.is_err();
        if counted {
            if received {
                metrics.commands_received.inc();
            }
            metrics.commands_in_flight.inc();
        }
        Box::new(Job {
            counted,
            delivery,
            parsed: Parsed { envelope, command },
            publisher: publisher.clone(),
            _in_flight: in_flight,
            waiting: None,
            slot: None,
            origin: Origin::Source,
        })
    }

    /// Runs a session's jobs one after another until it is idle. A job its account cannot
    /// start soon is set aside with the jobs waiting behind it, if its lane allows; else it
    /// runs here after all. One whose delivery went back meanwhile is let go.
    async fn run_session(self: Arc<Self>, mut job: Box<Job>) {
        let key = job.parsed.session_key();
        loop {
            let pinned = job.pinned();
            if self.run_one(&mut job).await {
                let lanes = job.may_go_aside().cloned();
                let lanes = lanes.expect("only a job that may go aside is set aside");
                if !job.ours() {
                    // It waited through the end of its source's tenure (a lost connection, a
                    // hold given up): its delivery went back with it, and the jobs behind it
                    // may be the next tenure's, which its lanes must not sweep away. It is
                    // settled here as returned; the next one finds out for itself. (One still
                    // ours whose lanes are let go is left with the jobs behind it, by `defer`:
                    // they go back together with their channel, in order.)
                    tracing::info!(
                        "its delivery went back with its source's tenure while it waited; not set aside"
                    );
                    job.returned();
                    self.leaves(&job);
                } else {
                    let sessions = &self.sessions;
                    let behind = || sessions.take_waiting_if(&key, |w| lanes.may_move(w));
                    match lanes.defer(job, behind) {
                        Ok(()) => return,
                        Err(stays) => {
                            job = stays;
                            job.origin = Origin::TakenIn {
                                lanes,
                                runs_here: true,
                            };
                            continue;
                        }
                    }
                }
            }
            // Settled: its slot and its place in the prefetch go before the next one starts.
            drop(job);
            match self.sessions.next_after(&key, pinned) {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    /// Runs one job; true if it should be set aside instead (nothing was done for it).
    async fn run_one(&self, job: &mut Job) -> bool {
        // A command runs in one of its account's slots (docs/contract.md §12).
        let aside = match &job.parsed.command {
            Ok(command) if job.may_go_aside().is_some() => Some(command.bot.account.aside_after()),
            _ => None,
        };
        // One whose delivery went back already waits for nothing: `process` lets it go.
        if let (Ok(command), None, true) = (&job.parsed.command, &job.slot, job.ours()) {
            let account = command.bot.account.clone();
            let wait = aside.unwrap_or(Duration::MAX);
            tokio::select! {
                biased;
                // Handled below: the command goes back to the queue.
                () = self.decider.shutdown.abandoned() => {}
                slot = tokio::time::timeout(wait, account.slot()) => match slot {
                    Ok(slot) => job.slot = Some(slot),
                    // Every slot stayed taken: it may wait in the account queue instead.
                    Err(_) => return true,
                },
            }
        }
        let incoming = &job.parsed.envelope.trace;
        let preset = CommandTrace::preset(incoming);
        // `None` records nothing until the trace id is known.
        let trace_id = preset.map(|id| trace_context::hex(&id));
        let trace_id = trace_id.as_deref();
        let span = match &job.parsed.command {
            Ok(c) => tracing::info_span!(
                "command",
                command_id = %c.command.command_id,
                stream_id = %c.command.stream_id,
                bot_session_id = %c.command.bot_session_id,
                trace_id,
            ),
            Err(r) => tracing::info_span!("command", command_id = %r.command_id, trace_id),
        };
        let trace = CommandTrace::start(&span, incoming, preset);
        if preset != Some(trace.trace_id) {
            span.record("trace_id", trace.trace_id_hex());
        }
        let processing = trace_context::scope(trace, self.process(job, aside));
        let done = AssertUnwindSafe(processing.instrument(span.clone()))
            .catch_unwind()
            .await;
        if let Ok(true) = done {
            return true;
        }
        job.waiting = None;
        if let Err(panic) = done {
            // Past the decision (which has its own guard): publishing or acking panicked. The
            // command goes back to the queue; its outcome, if decided, is remembered.
            self.decider.metrics.command_panics.inc();
            span.in_scope(|| {
                tracing::error!(
                    panic = panic_message(&*panic),
                    "processing a command panicked; returning it to the queue"
                );
            });
            self.requeue(job, "internal error").instrument(span).await;
        }
        self.leaves(job);
        false
    }

    /// Whether this is a fleet's intake that leaves what it holds ([`intake::Router::leaves`]).
    fn leaves_at_stop(&self) -> bool {
        self.router.as_ref().is_some_and(intake::Router::leaves)
    }

    /// The job is no longer in flight here (settled, returned, or set aside).
    fn leaves(&self, job: &Job) {
        if job.counted {
            self.decider.metrics.commands_in_flight.dec();
        }
    }

    /// Takes the job to its outcome, publishes it and acks; true if it is to be set aside
    /// instead (nothing was done for it).
    async fn process(&self, job: &mut Job, aside: Option<Duration>) -> bool {
        if !job.ours() || self.leaves_at_stop() {
            // Its connection or its channel is gone, and the broker has already put it back on
            // the queue (nothing is claimed or booked for it here); or the intake stops, and it
            // goes back with its channel, in order, nothing done.
            job.returned();
            return false;
        }
        // Its delivery is ours while its channel and the connection of its source (which
        // carries the source's hold) are open: once either closed, the broker has handed the
        // command, or may hand it, to the queue's next holder, and no call may start for it
        // here any more. (A reader's channel stays open while what it took is in hand, even
        // once its queue is gone.)
        if let (Some(router), Ok(_)) = (&self.router, &job.parsed.command) {
            let admitted = router.admit(job, aside).await;
            return match admitted {
                intake::Admitted::Routed => false,
                intake::Admitted::Left => {
                    job.returned();
                    false
                }
                intake::Admitted::Aside => true,
            };
        }
        let held = &*job;
        let ours = || held.ours();
        let decision = self.decider.decide(&job.parsed, aside, &ours).await;
        // The call is over: its slot is free for the account's next command.
        job.slot = None;
        let event = match decision {
            Decision::Decided(event) | Decision::Remembered(event) => event,
            Decision::Requeue(why) => {
                self.requeue(job, why).await;
                return false;
            }
            Decision::Aside => return true,
            Decision::NotOurs => {
                tracing::info!(
                    "its delivery is no longer this replica's; it goes back with its channel"
                );
                job.returned();
                return false;
            }
        };
        let command_id = job.parsed.command_id();
        let delivery = &job.delivery;
        let reply = delivery.reply_to().map(|queue| Reply {
            queue,
            correlation_id: delivery.correlation_id().unwrap_or(command_id),
        });
        let dead_letter = event.kind.is_dead_letter().then(|| delivery.dead_letter());
        match Box::pin(job.publisher.publish(&event, reply, dead_letter)).await {
            Ok(()) => {
                self.decider.metrics.published(event.kind);
                log_outcome(&event);
                if let Err(e) = job.delivery.ack().await {
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
        false
    }

    async fn requeue(&self, job: &mut Job, why: &str) {
        job.returned();
        self.decider.metrics.commands_requeued.inc();
        tracing::info!(why, "returning the command to the queue");
        if let Err(e) = job.delivery.requeue().await {
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
