//! Carrying out one valid command: pace, call, classify, retry — until it succeeds, fails for
//! good, runs out of budget or time, or the worker shuts down.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::agentassist::retry::RetryPolicy;
use crate::agentassist::{ApiClient, ApiError, ErrorKind, request_body};
use crate::callbacks::token::RelayUrls;
use crate::ops::metrics::Metrics;
use crate::pipeline::command::Command;
use crate::pipeline::event::Event;

/// The worker is shutting down and the command did not finish: it goes back to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

/// Executes commands against the API.
#[derive(Debug, Clone)]
pub struct Transfers {
    api: ApiClient,
    retry: RetryPolicy,
    relay: RelayUrls,
    metrics: Arc<Metrics>,
}

impl Transfers {
    /// Everything an execution needs.
    pub fn new(
        api: ApiClient,
        retry: RetryPolicy,
        relay: RelayUrls,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            api,
            retry,
            relay,
            metrics,
        }
    }

    /// Runs the command to its terminal event, or gives it up at shutdown.
    pub async fn execute(
        &self,
        command: &Command,
        shutdown: &CancellationToken,
    ) -> Result<Event, Abandoned> {
        #[cfg(feature = "fault-injection")]
        if command.org_id == FAULT_PANIC_ORG_ID {
            panic!("fault injected for a test");
        }
        let started = Instant::now();
        // A deadline too far away to be an `Instant` is no deadline at all.
        let deadline = command
            .deadline
            .and_then(|d| match d.duration_since(SystemTime::now()) {
                Ok(left) => started.checked_add(left),
                Err(_) => Some(started),
            });
        let bot = &command.bot;
        let callback_url = match &command.callback_url {
            Some(url) => url.clone(),
            None => self.relay.url(command),
        };
        let body = request_body(command, &callback_url);
        let mut delays = self.retry.delays();
        let mut attempts = 0u32;
        let mut reauthorized = false;
        // The deadline ends a command as `expired` if the API was never called, and as a
        // retryable `failed` with the last error if it was: that error is what went wrong.
        let mut last_error: Option<ApiError> = None;
        let out_of_time = |attempts, last_error: Option<&ApiError>| match last_error {
            Some(error) => Event::failed(command, attempts, error, true),
            None => expired(command, attempts),
        };
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(out_of_time(attempts, last_error.as_ref()));
            }
            let Ok(slot) = bot.pacer.reserve(deadline) else {
                return Ok(out_of_time(attempts, last_error.as_ref()));
            };
            sleep_until(slot, shutdown).await?;
            // Once the grace has run out no new call starts, whatever woke this command.
            if shutdown.is_cancelled() {
                return Err(Abandoned);
            }
            let token = match bot.tokens.token() {
                Ok(token) => token,
                Err(e) => {
                    let error = ApiError::without_status(ErrorKind::Request, e.to_string());
                    return Ok(Event::failed(command, attempts, &error, false));
                }
            };
            attempts = attempts.saturating_add(1);
            let call_started = Instant::now();
            let result = self.api.assign(bot, &token, body.clone()).await;
            let status = match &result {
                Ok(r) => Some(r.status),
                Err(e) => e.status,
            };
            self.metrics.api_call(
                &bot.account_id,
                status,
                call_started.elapsed().as_secs_f64(),
            );
            let error = match result {
                Ok(response) => {
                    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    return Ok(Event::succeeded(command, attempts, &response, ms));
                }
                Err(error) => error,
            };
            let budget_left = attempts < self.retry.max_attempts();
            if error.is_unauthorized() && !reauthorized && budget_left {
                // A token the API no longer accepts (secret rotated, clock skew): mint anew once.
                reauthorized = true;
                bot.tokens.invalidate();
                last_error = Some(error);
                tracing::warn!(
                    attempts,
                    "AgentAssist refused the token; retrying with a new one"
                );
                continue;
            }
            if !error.is_transient() {
                return Ok(Event::failed(command, attempts, &error, false));
            }
            let asked = error.retry_after.unwrap_or_default();
            let now = Instant::now();
            // The API asks for a wait the command cannot afford: say so now, not at the deadline.
            if !asked.is_zero() && deadline.is_some_and(|d| reaches(now, asked, d)) {
                return Ok(Event::failed(command, attempts, &error, true));
            }
            let retry_after = self.retry.honoured_retry_after(asked);
            if error.is_rate_limited()
                && let Some(until) = now.checked_add(retry_after).filter(|_| !asked.is_zero())
            {
                bot.pacer.pause_until(until);
            }
            let Some(backoff) = delays.next().filter(|_| budget_left) else {
                return Ok(Event::failed(command, attempts, &error, true));
            };
            let wait = backoff.max(retry_after);
            let until = match now.checked_add(wait) {
                Some(until) if deadline.is_none_or(|d| until < d) => until,
                _ => return Ok(Event::failed(command, attempts, &error, true)),
            };
            self.metrics
                .api_retries
                .get_or_create(&crate::ops::metrics::AccountLabels {
                    account: bot.account_id.clone(),
                })
                .inc();
            tracing::debug!(attempts, ?wait, %error, "transient failure; retrying");
            last_error = Some(error);
            sleep_until(until, shutdown).await?;
        }
    }
}

/// Whether waiting `wait` from `now` reaches `deadline` (or past anything representable).
fn reaches(now: Instant, wait: std::time::Duration, deadline: Instant) -> bool {
    now.checked_add(wait).is_none_or(|at| at >= deadline)
}

/// With the `fault-injection` feature, a command with this `orgId` panics inside its
/// processing, so tests can show that a fault stays inside one command.
#[cfg(feature = "fault-injection")]
pub const FAULT_PANIC_ORG_ID: &str = "o-fault-injection-panic";

fn expired(command: &Command, attempts: u32) -> Event {
    let deadline = command.deadline.unwrap_or_else(SystemTime::now);
    Event::expired(command, attempts, deadline)
}

async fn sleep_until(at: Instant, shutdown: &CancellationToken) -> Result<(), Abandoned> {
    if shutdown.is_cancelled() {
        return Err(Abandoned);
    }
    if at <= Instant::now() {
        return Ok(());
    }
    tokio::select! {
        biased;
        () = shutdown.cancelled() => Err(Abandoned),
        () = tokio::time::sleep_until(at.into()) => Ok(()),
    }
}
