//! What one command may still try (docs/contract.md §4): `retry.max_attempts` calls with
//! backoff between them, one fresh token after a 401, a budget the breaker may forgive after
//! an outage, and one last call when the budget ran out on an outage the API then answered.
//! [`AttemptBudget`] keeps that count and says how the command ends when it stops trying; the
//! waiting and calling are [`super::transfer`]'s.

use std::time::{Duration, SystemTime};

use super::client::ApiError;
use super::outcome::Outcome;
use super::retry::RetryPolicy;
use crate::backoff::Delays;

/// The attempts of one command.
#[derive(Debug)]
pub struct AttemptBudget {
    policy: RetryPolicy,
    delays: Delays,
    /// Calls made.
    made: u32,
    /// Calls held against the budget: those since the last outage the breaker forgave.
    spent: u32,
    /// The one call granted after the budget ran out on an outage, already taken.
    last_chance: bool,
    /// The one new token after a 401, already minted.
    reauthorized: bool,
    /// The last error, which is what went wrong if time runs out.
    last_error: Option<ApiError>,
    /// The command's deadline, for `transfer.expired`.
    deadline: Option<SystemTime>,
}

impl AttemptBudget {
    /// A command that has made no call yet.
    pub fn new(policy: RetryPolicy, deadline: Option<SystemTime>) -> Self {
        Self {
            delays: policy.delays(),
            policy,
            made: 0,
            spent: 0,
            last_chance: false,
            reauthorized: false,
            last_error: None,
            deadline,
        }
    }

    /// Calls made so far.
    pub fn made(&self) -> u32 {
        self.made
    }

    /// A call starts.
    pub fn call(&mut self) {
        self.made = self.made.saturating_add(1);
        self.spent = self.spent.saturating_add(1);
    }

    /// Whether another call fits the budget.
    pub fn has_budget(&self) -> bool {
        self.spent < self.policy.max_attempts()
    }

    /// An outage ended: the budget starts afresh, calls made still count.
    pub fn forgive(&mut self) {
        self.spent = 0;
        self.delays = self.policy.delays();
        self.last_chance = false;
    }

    /// Whether to mint a new token after a 401: once per command, and within the budget.
    pub fn reauthorize(&mut self) -> bool {
        let may = !self.reauthorized && self.has_budget();
        self.reauthorized |= may;
        may
    }

    /// The backoff before the next call, or `None` when the budget is spent.
    pub fn next_wait(&mut self) -> Option<Duration> {
        let has_budget = self.has_budget();
        self.delays.next().filter(|_| has_budget)
    }

    /// Whether the one call after a spent budget is still to be had; taking it.
    pub fn last_chance(&mut self) -> bool {
        !std::mem::replace(&mut self.last_chance, true)
    }

    /// `error` ended this call; another follows.
    pub fn failed_with(&mut self, error: ApiError) {
        self.last_error = Some(error);
    }

    /// The command ends with `error`.
    pub fn failed(&self, error: ApiError, retryable: bool) -> Outcome {
        Outcome::Failed {
            attempts: self.made,
            error,
            retryable,
        }
    }

    /// The deadline came: `transfer.expired` if the API was never called, else a retryable
    /// `transfer.failed` with the last error, because that error is what went wrong.
    pub fn out_of_time(&mut self) -> Outcome {
        match self.last_error.take() {
            Some(error) => self.failed(error, true),
            None => Outcome::Expired {
                attempts: self.made,
                deadline: self.deadline.unwrap_or_else(SystemTime::now),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agentassist::client::ErrorKind;
    use crate::config::RetrySettings;

    fn budget(max_attempts: u32) -> AttemptBudget {
        let policy = RetryPolicy::new(&RetrySettings {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(800),
            max_attempts,
            max_retry_after: Duration::from_secs(60),
        });
        AttemptBudget::new(policy, None)
    }

    fn error() -> ApiError {
        ApiError::without_status(ErrorKind::Request, "refused")
    }

    #[test]
    fn max_attempts_calls_then_no_wait() {
        let mut b = budget(3);
        let mut waits = 0;
        loop {
            b.call();
            match b.next_wait() {
                Some(_) => waits += 1,
                None => break,
            }
        }
        assert_eq!((b.made(), waits), (3, 2));
    }

    #[test]
    fn a_forgiven_budget_starts_afresh_but_calls_still_count() {
        let mut b = budget(2);
        b.call();
        b.call();
        assert!(!b.has_budget());
        assert!(b.last_chance());
        assert!(!b.last_chance(), "one last call, not two");
        b.forgive();
        assert!(b.has_budget());
        assert!(b.last_chance(), "a new outage gets its own last call");
        b.call();
        assert_eq!(b.made(), 3);
        assert!(b.next_wait().is_some());
    }

    #[test]
    fn one_new_token_per_command_and_only_within_the_budget() {
        let mut b = budget(3);
        b.call();
        assert!(b.reauthorize());
        assert!(!b.reauthorize());
        let mut spent = budget(1);
        spent.call();
        assert!(!spent.reauthorize(), "no call left to use the token on");
    }

    #[test]
    fn out_of_time_is_expired_before_any_error_and_failed_after() {
        let deadline = SystemTime::UNIX_EPOCH + Duration::from_secs(7);
        let mut b = AttemptBudget::new(budget(3).policy, Some(deadline));
        assert!(matches!(
            b.out_of_time(),
            Outcome::Expired { attempts: 0, deadline: d } if d == deadline
        ));
        b.call();
        b.failed_with(error());
        assert!(matches!(
            b.out_of_time(),
            Outcome::Failed {
                attempts: 1,
                retryable: true,
                ..
            }
        ));
    }
}
