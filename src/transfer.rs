//! Carrying out one valid command: pace, call, classify, retry — until it succeeds, fails for
//! good, runs out of budget or time, or the worker shuts down.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::agentassist::{ApiClient, ApiError, ErrorKind, request_body};
use crate::command::Command;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::relay_token::RelayUrls;
use crate::retry::RetryPolicy;

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
        let started = Instant::now();
        let deadline = command
            .deadline
            .map(|d| match d.duration_since(SystemTime::now()) {
                Ok(left) => started + left,
                Err(_) => started,
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
            let token = match bot.tokens.token() {
                Ok(token) => token,
                Err(e) => {
                    let error = ApiError {
                        kind: ErrorKind::Request,
                        status: None,
                        message: e.to_string(),
                        body: None,
                        retry_after: None,
                    };
                    return Ok(Event::failed(command, attempts, &error, false));
                }
            };
            attempts += 1;
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
                    return Ok(Event::succeeded(command, attempts, &response.body, ms));
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
            let retry_after = error.retry_after.unwrap_or_default();
            if error.is_rate_limited() && !retry_after.is_zero() {
                bot.pacer.pause_until(Instant::now() + retry_after);
            }
            let Some(backoff) = delays.next().filter(|_| budget_left) else {
                return Ok(Event::failed(command, attempts, &error, true));
            };
            let wait = backoff.max(retry_after);
            if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                return Ok(Event::failed(command, attempts, &error, true));
            }
            self.metrics
                .api_retries
                .get_or_create(&crate::metrics::AccountLabels {
                    account: bot.account_id.clone(),
                })
                .inc();
            tracing::debug!(attempts, ?wait, %error, "transient failure; retrying");
            last_error = Some(error);
            sleep_until(Instant::now() + wait, shutdown).await?;
        }
    }
}

fn expired(command: &Command, attempts: u32) -> Event {
    let deadline = command.deadline.unwrap_or_else(SystemTime::now);
    Event::expired(command, attempts, deadline)
}

async fn sleep_until(at: Instant, shutdown: &CancellationToken) -> Result<(), Abandoned> {
    if at <= Instant::now() {
        return Ok(());
    }
    tokio::select! {
        () = tokio::time::sleep_until(at.into()) => Ok(()),
        () = shutdown.cancelled() => Err(Abandoned),
    }
}
