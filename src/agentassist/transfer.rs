//! Carrying out one valid command: pace, call, classify, retry — until it succeeds, fails for
//! good, runs out of budget or time, or the worker shuts down. What happened is an
//! [`Outcome`]; turning it into an event is the pipeline's business, and where AgentAssist
//! should post its callbacks is the caller's. With a [`Breaker`], every attempt first passes
//! it, and a budget spent on an outage is the breaker's to forgive (see [`super::breaker`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::bots::Bot;
use super::breaker::{Breaker, Interrupted};
use super::client::{ApiClient, ApiError, ApiResponse, ErrorKind, request_body};
use super::pacer::DeadlineFirst;
use super::retry::RetryPolicy;
use crate::contract::Command;
use crate::fleet::{Fleet, Reservation};
use crate::ops::metrics::{AccountLabels, Metrics};
use crate::shutdown::{Abandoned, Shutdown};

/// Why an execution ended without an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfinished {
    /// The worker is shutting down: the command goes back to the queue.
    Abandoned,
    /// Its account cannot start it within the `aside` it was given, and nothing was booked or
    /// called: it may wait in its account's queue instead (docs/contract.md §12).
    Aside,
}

impl From<Abandoned> for Unfinished {
    fn from(_: Abandoned) -> Self {
        Self::Abandoned
    }
}

/// How a transfer ended.
#[derive(Debug)]
pub enum Outcome {
    /// The API answered 2xx.
    Succeeded {
        /// Calls made, this one included.
        attempts: u32,
        /// The answer.
        response: ApiResponse,
        /// From the start of the execution to the answer.
        elapsed: Duration,
    },
    /// A permanent error, or a transient one when the budget or the time ran out.
    Failed {
        /// Calls made.
        attempts: u32,
        /// The last error.
        error: ApiError,
        /// Whether trying again later could succeed.
        retryable: bool,
    },
    /// The deadline passed before the API was called.
    Expired {
        /// Calls made: none reached the API.
        attempts: u32,
        /// The command's deadline.
        deadline: SystemTime,
    },
}

/// Executes commands against the API.
#[derive(Debug, Clone)]
pub struct Transfers {
    api: ApiClient,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
    /// With a fleet, the budgets are shared through Redis instead of kept in this process.
    fleet: Option<Arc<Fleet>>,
    /// Holds attempts while the API is down; `None` with `breaker.enabled = false`.
    breaker: Option<Arc<Breaker>>,
}

impl Transfers {
    /// Everything an execution needs.
    pub fn new(api: ApiClient, retry: RetryPolicy, metrics: Arc<Metrics>) -> Self {
        Self {
            api,
            retry,
            metrics,
            fleet: None,
            breaker: None,
        }
    }

    /// The client every call goes through.
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// Passes every attempt through `breaker`.
    pub fn with_breaker(mut self, breaker: Arc<Breaker>) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Paces through the fleet's shared budgets.
    pub fn with_fleet(mut self, fleet: Arc<Fleet>) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// Waits for the next start the account's budget allows, or says the deadline comes
    /// first. With a fleet, the budget is Redis's: while it does not answer no start is handed
    /// out (the command waits, its deadline still counting), until it does or the grace runs
    /// out; a start booked but not reached at shutdown is given back.
    async fn wait_for_start(
        &self,
        command: &Command,
        bot: &Bot,
        deadline: Option<Instant>,
        aside: Option<Duration>,
        shutdown: &Shutdown,
    ) -> Result<Result<(), DeadlineFirst>, Unfinished> {
        // With `aside`, a start further away than that is not booked: the command may wait
        // in its account's queue instead.
        let aside_at = aside.and_then(|d| Instant::now().checked_add(d));
        let by_aside = aside_at.filter(|a| deadline.is_none_or(|d| *a < d));
        let deadline = by_aside.or(deadline);
        let first = |first: DeadlineFirst| match by_aside {
            Some(_) => Err(Unfinished::Aside),
            None => Ok(Err(first)),
        };
        let Some(fleet) = &self.fleet else {
            let asked = Instant::now();
            return match bot.account.pacer.reserve(deadline) {
                Ok(slot) => {
                    let delay = slot.saturating_duration_since(asked);
                    bot.account.starts_in(delay);
                    let waited = shutdown.sleep_until(slot).await;
                    bot.account.waited_for_budget(asked.elapsed());
                    Ok(waited.map(Ok)?)
                }
                Err(e) => {
                    bot.account
                        .starts_in(e.slot.saturating_duration_since(asked));
                    first(e)
                }
            };
        };
        let first_asked = Instant::now();
        loop {
            let (asked_at, answer) = fleet
                .until_answered(shutdown, || {
                    let now = Instant::now();
                    let deadline_in = deadline.map(|d| d.saturating_duration_since(now));
                    async move {
                        // Waiting for Redis does not stop the deadline: past it, ask nothing.
                        if deadline_in.is_some_and(|left| left.is_zero()) {
                            let delay = Duration::ZERO;
                            return Ok((now, Reservation::DeadlineFirst { delay }));
                        }
                        let answer = fleet
                            .reserve(
                                &bot.account_id,
                                bot.account.pacer.limit(),
                                bot.account.pacer.window(),
                                deadline_in,
                                &command.command_id,
                            )
                            .await?;
                        Ok((now, answer))
                    }
                })
                .await
                .ok_or(Abandoned)?;
            let at = |delay: Duration| asked_at.checked_add(delay).unwrap_or(asked_at);
            match answer {
                Reservation::Booked { delay, booking } => {
                    bot.account.starts_in(delay);
                    let waited = shutdown.sleep_until(at(delay)).await;
                    bot.account.waited_for_budget(first_asked.elapsed());
                    if let Err(abandoned) = waited {
                        if let Err(e) = fleet.unreserve(&booking).await {
                            tracing::warn!(error = %e, "could not give back a booked start");
                        }
                        return Err(abandoned.into());
                    }
                    return Ok(Ok(()));
                }
                Reservation::DeadlineFirst { delay } => {
                    bot.account.starts_in(delay);
                    return first(DeadlineFirst { slot: at(delay) });
                }
                // Asked again a horizon before the start, when it can be booked.
                Reservation::NotYet { delay } => {
                    bot.account.starts_in(delay);
                    if by_aside.is_some() {
                        return Err(Unfinished::Aside);
                    }
                    let again = delay
                        .saturating_sub(fleet.horizon())
                        .max(Duration::from_millis(50));
                    shutdown.sleep_until(at(again)).await?;
                }
            }
        }
    }

    /// Holds the account's later calls for `for_`: in this process, and fleet-wide.
    async fn pause(&self, bot: &Bot, until: Instant, for_: Duration) {
        bot.account.pacer.pause_until(until);
        if let Some(fleet) = &self.fleet
            && let Err(e) = fleet.pause(&bot.account_id, for_).await
        {
            tracing::warn!(error = %e, "could not share the pause with the fleet");
        }
    }

    /// Runs the command to its outcome, or gives it up at shutdown. `callback_url` is where
    /// AgentAssist should post its callbacks for this command. With `aside`, a first start
    /// further away than that ends the execution as [`Unfinished::Aside`], before anything was
    /// booked or called.
    pub async fn execute(
        &self,
        command: &Command,
        bot: &Bot,
        callback_url: &str,
        shutdown: &Shutdown,
        aside: Option<Duration>,
    ) -> Result<Outcome, Unfinished> {
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
        let body = request_body(command, callback_url);
        let mut delays = self.retry.delays();
        // Calls made, and those of them held against the budget (forgiven after an outage).
        let mut attempts = 0u32;
        let mut spent = 0u32;
        // The one attempt granted after the budget ran out on an outage the API then answered.
        let mut last_chance = false;
        let mut ticket = self.breaker.as_ref().map(|b| b.ticket());
        let mut reauthorized = false;
        // The deadline ends a command as `expired` if the API was never called, and as a
        // retryable `failed` with the last error if it was: that error is what went wrong.
        let mut last_error: Option<ApiError> = None;
        let out_of_time = |attempts, last_error: Option<ApiError>| match last_error {
            Some(error) => failed(attempts, error, true),
            None => Outcome::Expired {
                attempts,
                deadline: command.deadline.unwrap_or_else(SystemTime::now),
            },
        };
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(out_of_time(attempts, last_error));
            }
            if let (Some(breaker), Some(ticket)) = (&self.breaker, &mut ticket) {
                match breaker.pass(ticket, deadline, shutdown).await {
                    Ok(false) => {}
                    Ok(true) => {
                        tracing::debug!(
                            attempts,
                            "an outage ended; the retry budget starts afresh"
                        );
                        spent = 0;
                        delays = self.retry.delays();
                        last_chance = false;
                    }
                    Err(Interrupted::Deadline) => return Ok(out_of_time(attempts, last_error)),
                    Err(Interrupted::Abandoned) => return Err(Unfinished::Abandoned),
                }
            }
            // Only a command that has not been called yet may be set aside.
            let aside = aside.filter(|_| attempts == 0);
            if self
                .wait_for_start(command, bot, deadline, aside, shutdown)
                .await?
                .is_err()
            {
                return Ok(out_of_time(attempts, last_error));
            }
            // Once the grace has run out no new call starts, whatever woke this command.
            if shutdown.is_abandoned() {
                return Err(Unfinished::Abandoned);
            }
            // The breaker may have opened while this command waited for its start.
            if self.breaker.as_ref().is_some_and(|b| b.is_open()) {
                continue;
            }
            let token = match bot.tokens.token() {
                Ok(token) => token,
                Err(e) => {
                    let error = ApiError::without_status(ErrorKind::Request, e.to_string());
                    return Ok(failed(attempts, error, false));
                }
            };
            attempts = attempts.saturating_add(1);
            spent = spent.saturating_add(1);
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
            let outage = self.breaker.as_ref().and_then(|b| b.record(&result));
            let error = match result {
                Ok(response) => {
                    return Ok(Outcome::Succeeded {
                        attempts,
                        response,
                        elapsed: started.elapsed(),
                    });
                }
                Err(error) => error,
            };
            let budget_left = spent < self.retry.max_attempts();
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
                return Ok(failed(attempts, error, false));
            }
            let asked = error.retry_after.unwrap_or_default();
            let now = Instant::now();
            // The API asks for a wait the command cannot afford: say so now, not at the deadline.
            if !asked.is_zero() && deadline.is_some_and(|d| reaches(now, asked, d)) {
                return Ok(failed(attempts, error, true));
            }
            let retry_after = self.retry.honoured_retry_after(asked);
            if error.is_rate_limited()
                && let Some(until) = now.checked_add(retry_after).filter(|_| !asked.is_zero())
            {
                self.pause(bot, until, retry_after).await;
            }
            let Some(backoff) = delays.next().filter(|_| budget_left) else {
                // Out of budget during what may be an outage: the breaker decides.
                let (Some(breaker), Some(outage), false) = (&self.breaker, outage, last_chance)
                else {
                    return Ok(failed(attempts, error, true));
                };
                tracing::debug!(attempts, %error, "retry budget spent on a failing API; waiting for the breaker");
                match breaker.verdict(outage, deadline, shutdown).await {
                    Ok(_) => {
                        last_chance = true;
                        last_error = Some(error);
                        continue;
                    }
                    Err(Interrupted::Deadline) => return Ok(failed(attempts, error, true)),
                    Err(Interrupted::Abandoned) => return Err(Unfinished::Abandoned),
                }
            };
            let wait = backoff.max(retry_after);
            let until = match now.checked_add(wait) {
                Some(until) if deadline.is_none_or(|d| until < d) => until,
                _ => return Ok(failed(attempts, error, true)),
            };
            self.metrics
                .api_retries
                .get_or_create(&AccountLabels {
                    account: bot.account_id.clone(),
                })
                .inc();
            tracing::debug!(attempts, ?wait, %error, "transient failure; retrying");
            last_error = Some(error);
            shutdown.sleep_until(until).await?;
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

fn failed(attempts: u32, error: ApiError, retryable: bool) -> Outcome {
    Outcome::Failed {
        attempts,
        error,
        retryable,
    }
}
