//! The step that decides: a read delivery to its outcome. Answered from memory if the command
//! already completed; else rejected, or carried out against the API and its outcome turned
//! into the event; or handed back to the queue at shutdown. It says what happened as a
//! [`Handled`] and touches no broker: publishing the event and acking is the caller's, so the
//! decisions are tested here with the simulator as the API, and the wiring by the broker
//! tests.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

use super::command::{Command, Envelope, Rejection};
use super::event::{ErrorDetail, Event, Subject};
use super::outcomes::Outcomes;
use crate::agentassist::ApiError;
use crate::agentassist::transfer::{Abandoned, Outcome, Transfers};
use crate::callbacks::token::RelayUrls;
use crate::ops::metrics::Metrics;

/// What the step needs.
#[derive(Debug, Clone)]
pub struct Stages {
    /// Carries out valid commands.
    pub transfers: Transfers,
    /// The callback URL of commands that bring none.
    pub relay: RelayUrls,
    /// Remembers outcomes.
    pub outcomes: Outcomes,
    /// Counts.
    pub metrics: Arc<Metrics>,
    /// `shutdown.abandon`: give up waiting, the command goes back to the queue.
    pub abandon: CancellationToken,
}

/// A delivery, read: its envelope and the command, or why it is not one.
#[derive(Debug)]
pub struct Parsed {
    /// What the AMQP properties said.
    pub envelope: Envelope,
    /// The command, or its rejection.
    pub command: Result<Command, Box<Rejection>>,
}

impl Parsed {
    /// The idempotency key.
    pub fn command_id(&self) -> &str {
        match &self.command {
            Ok(c) => &c.command_id,
            Err(r) => &r.command_id,
        }
    }

    /// The ids its event carries.
    pub fn subject(&self) -> Subject<'_> {
        match &self.command {
            Ok(c) => c.into(),
            Err(r) => r.as_ref().into(),
        }
    }

    /// Commands of one `botSessionId` run in order; a rejection without one runs on its own.
    pub fn session_key(&self) -> String {
        match &self.command {
            Ok(c) => c.bot_session_id.clone(),
            Err(r) => r
                .bot_session_id
                .clone()
                .unwrap_or_else(|| format!("\0{}", r.command_id)),
        }
    }
}

/// What happened to a command.
#[derive(Debug, Clone)]
pub enum Handled {
    /// Decided now and remembered: publish this event, then ack.
    Decided(Arc<Event>),
    /// Completed before: its remembered event, same `eventId`, is published again, then acked.
    Remembered(Arc<Event>),
    /// Not finished: it goes back to the queue, for this reason.
    Requeue(&'static str),
}

/// Takes a read delivery to its outcome. The outcome is remembered before it is returned, so
/// a publish lost with the connection is redone from memory.
pub async fn handle(stages: &Stages, parsed: &Parsed) -> Handled {
    if stages.abandon.is_cancelled() {
        return Handled::Requeue("shutting down");
    }
    if let Some(event) = stages.outcomes.get(parsed.command_id()) {
        stages.metrics.commands_deduplicated.inc();
        tracing::info!(event = event.kind.name(), event_id = %event.id, "already completed; republishing its outcome");
        return Handled::Remembered(event);
    }
    let event = match decide(stages, parsed).await {
        Ok(event) => Arc::new(event),
        Err(Abandoned) => return Handled::Requeue("shutdown grace ran out"),
    };
    stages
        .outcomes
        .insert(parsed.command_id().to_owned(), event.clone());
    Handled::Decided(event)
}

/// The outcome of a command not already completed: rejected, or carried out. A panic inside
/// (a bug) ends this command alone, as `transfer.failed` with `error.kind = "internal"`.
async fn decide(stages: &Stages, parsed: &Parsed) -> Result<Event, Abandoned> {
    let decided = AssertUnwindSafe(async {
        match &parsed.command {
            Err(rejection) => Ok(Event::rejected(
                rejection,
                parsed.envelope.message_id.as_deref(),
            )),
            Ok(command) => {
                let relay;
                let callback_url = match &command.callback_url {
                    Some(url) => url.as_str(),
                    None => {
                        relay = stages.relay.url(command);
                        relay.as_str()
                    }
                };
                // Boxed, like the publish: a session task then holds only the phase it is in,
                // not the largest of them, for every command in flight.
                let execution = stages
                    .transfers
                    .execute(command, callback_url, &stages.abandon);
                Box::pin(execution)
                    .await
                    .map(|outcome| event_of(command, outcome))
            }
        }
    })
    .catch_unwind()
    .await;
    decided.unwrap_or_else(|panic| {
        stages.metrics.command_panics.inc();
        let panic = panic_message(&*panic);
        tracing::error!(%panic, "processing a command panicked; it ends as transfer.failed");
        Ok(Event::internal_failure(
            parsed.subject(),
            &format!("internal error in the worker: {panic}"),
        ))
    })
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
