//! The step that decides ([`Decider`]): a read delivery to its outcome. Answered from memory
//! if the command already completed; else claimed in the [`super::ledger`], rejected or
//! carried out against the API, and its outcome recorded and turned into the event; or handed
//! back to the queue at shutdown. It says what happened as a
//! [`Decision`] and touches no broker: publishing the event and acking is the caller's, so the
//! decisions are tested here with the simulator as the API, and the wiring by the broker
//! tests.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;

use super::first_start::{first_start, first_start_request};
use super::ledger::{Claimed, Ledger};
use super::outcomes::Outcomes;
use crate::agentassist::ApiError;
use crate::agentassist::outcome::{Outcome, Unfinished};
use crate::agentassist::transfer::{Ours, Transfers};
use crate::callbacks::token::RelayUrls;
use crate::contract::event::{ErrorDetail, Event, EventKind, Subject};
use crate::contract::{Command, Rejection};
use crate::fairness::start::{FirstStart, Unstarted};
use crate::ops::metrics::Metrics;
use crate::pipeline::parser::{Envelope, Valid};
use crate::shutdown::{Abandoned, Shutdown};

/// What the step needs.
#[derive(Debug, Clone)]
pub struct Decider {
    /// Carries out valid commands.
    pub transfers: Transfers,
    /// The callback URL of commands that bring none.
    pub relay: RelayUrls,
    /// The outcomes of commands ended here, so a redelivered one is answered without a call.
    pub outcomes: Outcomes,
    /// The metrics every stage counts into.
    pub metrics: Arc<Metrics>,
    /// Waits end when the shutdown abandons them: the command goes back to the queue.
    pub shutdown: Shutdown,
    /// Whose a command is and how it ended, beyond this process: the fleet's, or nobody's.
    pub ledger: Arc<dyn Ledger>,
}

/// A delivery, read: its envelope and the command, or why it is not one.
#[derive(Debug)]
pub struct Parsed {
    /// What the AMQP properties said.
    pub envelope: Envelope,
    /// The command and its bot, or its rejection.
    pub command: Result<Valid, Box<Rejection>>,
}

impl Parsed {
    /// The idempotency key.
    pub fn command_id(&self) -> &str {
        match &self.command {
            Ok(v) => &v.command.command_id,
            Err(r) => &r.command_id,
        }
    }

    /// The ids its event carries.
    pub fn subject(&self) -> Subject<'_> {
        match &self.command {
            Ok(v) => (&v.command).into(),
            Err(r) => r.as_ref().into(),
        }
    }

    /// Commands of one `botSessionId` run in order; a rejection without one runs on its own.
    pub fn session_key(&self) -> String {
        match &self.command {
            Ok(v) => v.command.bot_session_id.clone(),
            Err(r) => r
                .bot_session_id
                .clone()
                .unwrap_or_else(|| format!("\0{}", r.command_id)),
        }
    }
}

/// What happened to a command.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Decided now and remembered: publish this event, then ack.
    Decided(Arc<Event>),
    /// Completed before: its remembered event, same `eventId`, is published again, then acked.
    Remembered(Arc<Event>),
    /// Not finished: it goes back to the queue, for this reason.
    Requeue(&'static str),
    /// Not started: its account cannot start it within the `aside` it was given; it may wait
    /// in the account's queue (docs/contract.md §12). Nothing was booked, called or
    /// remembered, and its fleet claim is given up.
    Aside,
    /// Not finished, and its delivery is no longer this replica's (its source was let go, or
    /// the fleet's holds lapsed, while it waited or between its attempts): nothing more is done
    /// with it, not even a nack, which would have the broker hand it straight back behind the
    /// session's later commands. It goes back with its channel, in the order it came.
    NotOurs,
}

impl Decider {
    /// Takes a read delivery to its outcome. The outcome is remembered before it is returned,
    /// so a publish lost with the connection is redone from memory. With `aside`, a command its
    /// account cannot start within that is handed back as [`Decision::Aside`].
    pub async fn decide(
        &self,
        parsed: &Parsed,
        aside: Option<std::time::Duration>,
        ours: &Ours<'_>,
    ) -> Decision {
        let decider = self;
        if decider.shutdown.is_abandoned() {
            return Decision::Requeue("shutting down");
        }
        let replayed = parsed.envelope.replayed;
        if let Some(event) = decider.outcomes.get(parsed.command_id()) {
            if answers(replayed, &event) {
                decider.metrics.commands_deduplicated.inc();
                tracing::info!(event = event.kind.name(), event_id = %event.id, "already completed; republishing its outcome");
                return Decision::Remembered(event);
            }
            tracing::info!(
                remembered = event.kind.name(),
                "replayed from the dead-letter queue; processing it again"
            );
        }
        // Its delivery is ours while the caller says so and the holds it arrived under last:
        // taken before the claim, which may wait long (for Redis, for its replicas, for another
        // replica's claim) while this replica's holds lapse and are taken again.
        let channel = ours;
        let held = decider.ledger.holds();
        let ours = || held() && channel();
        let command_id = parsed.command_id();
        let event = loop {
            let start = match &parsed.command {
                Ok(Valid { command, bot }) => {
                    first_start_request(&decider.transfers, command, bot, aside)
                }
                Err(_) => None,
            };
            let claimed = decider
                .ledger
                .claim(command_id, replayed, start, &decider.shutdown)
                .await;
            let first = match claimed {
                Ok(Claimed::Ours(first)) => first,
                Ok(Claimed::Done(event)) => {
                    let event = Arc::new(event);
                    decider
                        .outcomes
                        .insert(command_id.to_owned(), event.clone());
                    decider.metrics.commands_deduplicated.inc();
                    tracing::info!(event = event.kind.name(), event_id = %event.id, "completed in the fleet; republishing its outcome");
                    return Decision::Remembered(event);
                }
                Err(Abandoned) => return Decision::Requeue("shutdown grace ran out"),
            };
            // The claim is renewed for as long as the command runs, however long it waits.
            let decided = tokio::select! {
                biased;
                decided = carry_out(decider, parsed, aside, first, &ours) => decided,
                never = decider.ledger.keep(command_id) => match never {},
            };
            let unfinished = match decided {
                Ok(event) => break Arc::new(event),
                Err(unfinished) => unfinished,
            };
            decider.ledger.release(command_id).await;
            match unfinished {
                Undecided::Aside if ours() => return Decision::Aside,
                Undecided::Unfinished(Unfinished::Abandoned) => {
                    return Decision::Requeue("shutdown grace ran out");
                }
                // Set aside only by the holder of its source (a replica that let the source go
                // meanwhile would put it in a lane no holder reads), and called only under its
                // holds: not ours now.
                Undecided::Aside | Undecided::Unfinished(Unfinished::NotHeld) => {}
            }
            match decider.after_a_lapse(channel, &held).await {
                // The holds were kept after all (a renewal answered after their deadline): it
                // is still this replica's, in its place in its session. Claimed anew.
                Lapse::Kept => {
                    tracing::info!(
                        "the fleet's holds lapsed for a moment and were kept; carrying the command on"
                    );
                }
                // Its delivery went back, or goes back, with its channel: a nack on a channel
                // still open would put it behind its session's later commands.
                Lapse::Lost => return Decision::NotOurs,
                // As every command still on its channel at that point: the next holder has it
                // back in the order of the nacks.
                Lapse::Abandoned => return Decision::Requeue("shutdown grace ran out"),
            }
        };
        decider
            .outcomes
            .insert(command_id.to_owned(), event.clone());
        decider
            .ledger
            .record(command_id, &event, &decider.shutdown)
            .await;
        Decision::Decided(event)
    }
}

/// How often a command found not ours, its delivery's channel still open, looks whether the
/// holds were kept or let go.
const LAPSE_LOOK: std::time::Duration = std::time::Duration::from_millis(20);

/// How often it says that it still waits.
const LAPSE_SAY: std::time::Duration = std::time::Duration::from_secs(5);

/// What became of holds found lapsed while a command's delivery was still open.
enum Lapse {
    /// Kept after all: valid again, in the same term.
    Kept,
    /// The delivery went back: its channel closed.
    Lost,
    /// The shutdown's grace ran out first, the channel still open.
    Abandoned,
}

impl Decider {
    /// A command found not ours: its delivery went back, or the holds it runs under lapsed.
    /// Holds lapse when their deadline passes, the instant by which the replica's consumer
    /// must have stopped: it then lets go (its channels close) unless a renewal that answered
    /// late kept them. Waits to see which, for as long as that takes (a nack while the channel
    /// is open would put the command behind its session's later ones), or until the shutdown's
    /// grace runs out.
    async fn after_a_lapse(&self, channel: &Ours<'_>, held: &Ours<'_>) -> Lapse {
        let since = tokio::time::Instant::now();
        let mut said = since;
        loop {
            if !channel() {
                return Lapse::Lost;
            }
            if held() {
                return Lapse::Kept;
            }
            if self.shutdown.is_abandoned() {
                return Lapse::Abandoned;
            }
            if said.elapsed() >= LAPSE_SAY {
                said = tokio::time::Instant::now();
                tracing::warn!(
                    waited = ?since.elapsed(),
                    "the fleet's holds lapsed and its delivery's channel is still open: waiting for the replica to let go or keep them"
                );
            }
            tokio::time::sleep(LAPSE_LOOK).await;
        }
    }
}

/// Whether a remembered outcome answers a command. It always does, except for a command
/// replayed from the dead-letter queue: an operator replays a failed (rejected, expired)
/// command to have it processed again, so only a completed one (`transfer.succeeded`) is
/// still answered from memory — same `eventId`, no call — and anything else is processed as
/// new, its new outcome replacing the old one. A completed transfer is never sent twice.
fn answers(replayed: bool, remembered: &Event) -> bool {
    !replayed || remembered.kind == EventKind::Succeeded
}

/// The outcome of a command not already completed: rejected, or carried out. A panic inside
/// (a bug) ends this command alone, as `transfer.failed` with `error.kind = "internal"`.
async fn carry_out(
    decider: &Decider,
    parsed: &Parsed,
    aside: Option<std::time::Duration>,
    first: Option<FirstStart>,
    ours: &Ours<'_>,
) -> Result<Event, Undecided> {
    let decided = AssertUnwindSafe(async {
        match &parsed.command {
            Err(rejection) => Ok(Event::rejected(
                rejection,
                parsed.envelope.message_id.as_deref(),
            )),
            Ok(Valid { command, bot }) => {
                let relay;
                let callback_url = match &command.callback_url {
                    Some(url) => url.as_str(),
                    None => {
                        relay = decider.relay.url(command);
                        relay.as_str()
                    }
                };
                let shutdown = &decider.shutdown;
                let start = first_start(&decider.transfers, command, bot, aside, first, shutdown);
                let begun = match start.await {
                    Ok(begun) => begun,
                    Err(Unstarted::Aside) => return Err(Undecided::Aside),
                    Err(Unstarted::Abandoned) => return Err(Unfinished::Abandoned.into()),
                };
                // Boxed, like the publish: a session task then holds only the phase it is in,
                // not the largest of them, for every command in flight.
                let execution =
                    (decider.transfers).execute(command, bot, callback_url, shutdown, ours, begun);
                match Box::pin(execution).await {
                    Ok(outcome) => Ok(event_of(command, outcome)),
                    Err(unfinished) => Err(unfinished.into()),
                }
            }
        }
    })
    .catch_unwind()
    .await;
    decided.unwrap_or_else(|panic| {
        decider.metrics.command_panics.inc();
        let panic = panic_message(&*panic);
        tracing::error!(%panic, "processing a command panicked; it ends as transfer.failed");
        Ok(Event::internal_failure(
            parsed.subject(),
            &format!("internal error in the worker: {panic}"),
        ))
    })
}

/// Why a command ended here without an outcome.
enum Undecided {
    /// Its account cannot start it within the `aside` it was given, and nothing was booked or
    /// called: it may wait in its account's queue instead (docs/contract.md §12).
    Aside,
    /// It goes back to its queue ([`Unfinished`]).
    Unfinished(Unfinished),
}

impl From<Unfinished> for Undecided {
    fn from(unfinished: Unfinished) -> Self {
        Self::Unfinished(unfinished)
    }
}

/// The event that says how a transfer ended.
fn event_of(command: &Command, outcome: Outcome) -> Event {
    match outcome {
        Outcome::Succeeded {
            attempts,
            response,
            elapsed,
        } => {
            let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
            Event::succeeded(command, attempts, &response.body, response.truncated, ms)
        }
        Outcome::Failed {
            attempts,
            error,
            retryable,
        } => Event::failed(command, attempts, detail(&error), retryable),
        Outcome::Expired { attempts, deadline } => Event::expired(command, attempts, deadline),
    }
}

/// An API error as a `transfer.failed` event shows it.
fn detail(error: &ApiError) -> ErrorDetail<'_> {
    ErrorDetail {
        kind: error.kind.name(),
        status: error.status,
        message: &error.message,
        body: error.body.as_ref(),
    }
}

/// The text a panic carried, for the log and the event.
pub fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

#[cfg(test)]
mod tests;
