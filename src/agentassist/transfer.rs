//! Carrying out one valid command: pace, call, classify, retry — until it succeeds, fails for
//! good, runs out of budget or time, or the worker shuts down. What happened is an
//! [`Outcome`]; turning it into an event is the pipeline's business, and where AgentAssist
//! should post its callbacks is the caller's. With [`Breakers`], every attempt first passes
//! the breaker of its host, and a budget spent on an outage is the breaker's to forgive (see [`super::breaker`]).

use std::sync::Arc;
use std::time::Instant;

use super::attempts::AttemptBudget;
use super::bots::Bot;
use super::breaker::Breakers;
use super::breaker::{Failure as BreakerFailure, Interrupted};
use super::client::{ApiClient, ApiError, request_body};
use super::deadline::{deadline_of, reaches};
use super::retry::RetryPolicy;
use crate::contract::Command;
use crate::fairness::budget::{Ask, OwnBudget, RateBudget};
use crate::fairness::pacer::DeadlineFirst;
use crate::fairness::start::{FirstStart, Unstarted};
use crate::ops::metrics::{AccountLabels, Metrics};
use crate::shutdown::{Abandoned, Shutdown};

use super::outcome::{Outcome, Unfinished};
pub use super::terms::{Begun, First, Ours};

mod call;

use call::{Call, Leg, held_on_the_way};
#[cfg(feature = "fault-injection")]
pub use call::{FAULT_LATE_DEPARTURE, FAULT_LATE_DEPARTURE_ORG_ID};

/// Executes commands against the API.
#[derive(Debug, Clone)]
pub struct Transfers {
    api: ApiClient,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
    /// The accounts' budgets: this process's, or the fleet's.
    budget: Arc<dyn RateBudget>,
    /// Hold attempts while their API host is down; none with `breaker.enabled = false`.
    breakers: Breakers,
}

impl Transfers {
    /// Everything an execution needs; the budgets are this process's until
    /// [`Transfers::with_budget`] says otherwise.
    pub fn new(api: ApiClient, retry: RetryPolicy, metrics: Arc<Metrics>) -> Self {
        Self {
            api,
            retry,
            metrics,
            budget: Arc::new(OwnBudget),
            breakers: Breakers::default(),
        }
    }

    /// The client every call goes through.
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// Passes every attempt through the breaker of its bot's host.
    pub fn with_breakers(mut self, breakers: Breakers) -> Self {
        self.breakers = breakers;
        self
    }

    /// Paces through `budget` (the fleet's, say).
    pub fn with_budget(mut self, budget: Arc<dyn RateBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// Whether the bot's API host is down (its breaker open): no start is asked for a command
    /// of it until the breaker lets it through.
    pub fn held_by_breaker(&self, bot: &Bot) -> bool {
        self.breakers.of(bot).is_some_and(|b| b.is_open())
    }

    /// Waits while the bot's API host is down (its breaker open): `Ok(true)` once it is up,
    /// `Ok(false)` when the deadline comes first.
    pub async fn until_host_up(
        &self,
        bot: &Bot,
        deadline: Option<Instant>,
        shutdown: &Shutdown,
    ) -> Result<bool, Abandoned> {
        let Some(breaker) = self.breakers.of(bot) else {
            return Ok(true);
        };
        match breaker
            .pass(&mut breaker.ticket(), deadline, shutdown)
            .await
        {
            Ok(_) => Ok(true),
            Err(Interrupted::Deadline) => Ok(false),
            Err(Interrupted::Abandoned) => Err(Abandoned),
        }
    }

    /// The accounts' budgets it paces through.
    pub fn budget(&self) -> &dyn RateBudget {
        self.budget.as_ref()
    }

    /// Waits for the next start the account's budget allows, or says the deadline comes
    /// first.
    async fn wait_for_start(
        &self,
        command: &Command,
        bot: &Bot,
        deadline: Option<Instant>,
        first: Option<FirstStart>,
        shutdown: &Shutdown,
    ) -> Result<Result<(), DeadlineFirst>, Unfinished> {
        let ask = Ask {
            id: &command.command_id,
            account: &bot.account,
            limit: deadline,
            aside: false,
        };
        self.budget
            .start(ask, first, shutdown)
            .await
            .map_err(|unstarted| match unstarted {
                // Asked without `aside`, a wait ends with a start, at the deadline or at the
                // shutdown: never set aside.
                Unstarted::Aside | Unstarted::Abandoned => Unfinished::Abandoned,
            })
    }

    /// Runs the command to its outcome, or gives it up at shutdown. `callback_url` is where
    /// AgentAssist should post its callbacks for this command; `begun` says what the caller
    /// did about its first start (a start booked with the fleet claim and not used is given
    /// back).
    pub async fn execute(
        &self,
        command: &Command,
        bot: &Bot,
        callback_url: &str,
        shutdown: &Shutdown,
        ours: &Ours<'_>,
        mut begun: Begun,
    ) -> Result<Outcome, Unfinished> {
        let outcome = self
            .run(command, bot, callback_url, shutdown, ours, &mut begun)
            .await;
        if let First::Ask(Some(unused)) = begun.first {
            self.budget.give_back(unused).await;
        }
        outcome
    }

    async fn run(
        &self,
        command: &Command,
        bot: &Bot,
        callback_url: &str,
        shutdown: &Shutdown,
        ours: &Ours<'_>,
        begun: &mut Begun,
    ) -> Result<Outcome, Unfinished> {
        let (started, first) = (begun.at, &mut begun.first);
        // From now: the wait for the first start, already behind, is not counted twice.
        let deadline = deadline_of(command, Instant::now());
        #[cfg(feature = "fault-injection")]
        if command.org_id == FAULT_PANIC_ORG_ID {
            panic!("fault injected for a test");
        }
        let body = request_body(command, callback_url);
        let mut budget = AttemptBudget::new(self.retry, command.deadline);
        let breaker = self.breakers.of(bot);
        let mut ticket = breaker.map(|b| b.ticket());
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(budget.out_of_time());
            }
            if let (Some(breaker), Some(ticket)) = (breaker, &mut ticket) {
                match breaker.pass(ticket, deadline, shutdown).await {
                    Ok(false) => {}
                    Ok(true) => {
                        let attempts = budget.made();
                        tracing::debug!(
                            attempts,
                            "an outage ended; the retry budget starts afresh"
                        );
                        budget.forgive();
                    }
                    Err(Interrupted::Deadline) => return Ok(budget.out_of_time()),
                    Err(Interrupted::Abandoned) => return Err(Unfinished::Abandoned),
                }
            }
            // Boxed, as is the retry decision below: each is larger than the call itself and
            // lasts only a moment, so a command in flight does not carry their room while it
            // waits for the API (benches/pipeline, scenario (c)).
            let start = match std::mem::replace(first, First::Ask(None)) {
                First::Taken => Ok(()),
                First::DeadlineFirst => return Ok(budget.out_of_time()),
                First::Ask(booked) => {
                    let start = self.wait_for_start(command, bot, deadline, booked, shutdown);
                    Box::pin(start).await?
                }
            };
            if start.is_err() {
                return Ok(budget.out_of_time());
            }
            // Once the grace has run out no new call starts, whatever woke this command.
            if shutdown.is_abandoned() {
                return Err(Unfinished::Abandoned);
            }
            // The breaker may have opened while this command waited for its start.
            if breaker.is_some_and(|b| b.is_open()) {
                continue;
            }
            let leg = Leg {
                bot,
                body: &body,
                ours,
                deadline,
                late: held_on_the_way(command),
            };
            let (error, outage) = match self.call(leg, &mut budget, shutdown).await? {
                Call::Answered(response) => {
                    let (attempts, elapsed) = (budget.made(), started.elapsed());
                    return Ok(Outcome::Succeeded {
                        attempts,
                        response,
                        elapsed,
                    });
                }
                Call::NoToken(error) => return Ok(budget.failed(error, false)),
                Call::Late => return Ok(budget.out_of_time()),
                Call::Held => continue,
                Call::NotHeld => {
                    tracing::warn!(
                        attempts = budget.made(),
                        "the command is no longer this replica's (its delivery went back with a \
                         lost connection, or the fleet's holds lapsed in a pause past \
                         fleet.member_ttl): not calling; its queue's holder carries it on"
                    );
                    return Err(Unfinished::NotHeld);
                }
                Call::Failed(error, outage) => (error, outage),
            };
            let failure = Failure {
                error,
                outage,
                deadline,
            };
            match Box::pin(self.next_after_failure(failure, bot, &mut budget, shutdown)).await? {
                Next::Now => {}
                Next::At(until) => shutdown.sleep_until(until).await?,
                Next::Done(outcome) => return Ok(outcome),
            }
        }
    }

    /// What follows a failed call: another at once (a fresh token, or the breaker's last
    /// chance), another after a wait, or the end.
    async fn next_after_failure(
        &self,
        failure: Failure,
        bot: &Bot,
        budget: &mut AttemptBudget,
        shutdown: &Shutdown,
    ) -> Result<Next, Unfinished> {
        let Failure {
            error,
            outage,
            deadline,
        } = failure;
        let attempts = budget.made();
        if error.is_unauthorized() && budget.reauthorize() {
            // A token the API no longer accepts (secret rotated, clock skew): mint anew once.
            bot.tokens.invalidate();
            budget.failed_with(error);
            tracing::warn!(
                attempts,
                "AgentAssist refused the token; retrying with a new one"
            );
            return Ok(Next::Now);
        }
        if !error.is_transient() {
            return Ok(Next::Done(budget.failed(error, false)));
        }
        let asked = error.retry_after.unwrap_or_default();
        let now = Instant::now();
        // The API asks for a wait the command cannot afford: say so now, not at the deadline.
        if !asked.is_zero() && deadline.is_some_and(|d| reaches(now, asked, d)) {
            return Ok(Next::Done(budget.failed(error, true)));
        }
        let retry_after = self.retry.honoured_retry_after(asked);
        if error.is_rate_limited()
            && let Some(until) = now.checked_add(retry_after).filter(|_| !asked.is_zero())
        {
            self.budget.pause(&bot.account, until, retry_after).await;
        }
        let Some(backoff) = budget.next_wait() else {
            // Out of budget during what may be an outage: the breaker decides.
            let (Some(breaker), Some(outage)) = (self.breakers.of(bot), outage) else {
                return Ok(Next::Done(budget.failed(error, true)));
            };
            if !budget.last_chance() {
                return Ok(Next::Done(budget.failed(error, true)));
            }
            tracing::debug!(attempts, %error, "retry budget spent on a failing API; waiting for the breaker");
            return match breaker.verdict(outage, deadline, shutdown).await {
                Ok(_) => {
                    budget.failed_with(error);
                    Ok(Next::Now)
                }
                Err(Interrupted::Deadline) => Ok(Next::Done(budget.failed(error, true))),
                Err(Interrupted::Abandoned) => Err(Unfinished::Abandoned),
            };
        };
        let wait = backoff.max(retry_after);
        let until = match now.checked_add(wait) {
            Some(until) if deadline.is_none_or(|d| until < d) => until,
            _ => return Ok(Next::Done(budget.failed(error, true))),
        };
        let account = bot.account_id.clone();
        self.metrics
            .api_retries
            .get_or_create(&AccountLabels { account })
            .inc();
        tracing::debug!(attempts, ?wait, %error, "transient failure; retrying");
        budget.failed_with(error);
        Ok(Next::At(until))
    }
}

/// A failed call, and what it is judged against.
struct Failure {
    error: ApiError,
    /// The breaker's record of it, when it looks like an outage.
    outage: Option<BreakerFailure>,
    deadline: Option<Instant>,
}

/// What a command does after a failed call.
enum Next {
    Now,
    At(Instant),
    Done(Outcome),
}

/// With the `fault-injection` feature, a command with this `orgId` panics inside its
/// processing, so tests can show that a fault stays inside one command.
#[cfg(feature = "fault-injection")]
pub const FAULT_PANIC_ORG_ID: &str = "o-fault-injection-panic";
