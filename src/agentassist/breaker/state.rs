//! The breaker's state and its transitions: outage failures open a failure window, which
//! opens the breaker once it has lasted `open_after`; an answer closes both. Each transition is
//! decided under the state's lock and reported (a log line, metrics) after it.

use std::time::Duration;

use tokio::time::Instant;

use super::{Breaker, Failure};

/// Who closed the breaker, for the log.
#[derive(Debug, Clone, Copy)]
pub(super) enum ClosedBy {
    Call(Option<u16>),
    Probe(Option<u16>),
}

/// What the breaker knows; kept in a watch channel, which wakes the commands waiting on it.
#[derive(Debug, Default)]
pub(super) struct State {
    /// The first outage failure since the API last answered; `None` while it answers.
    pub(super) failing_since: Option<Instant>,
    /// The latest outage failure, for the log.
    pub(super) last_error: Option<String>,
    /// Set while open.
    pub(super) opened_at: Option<Instant>,
    /// A probe or a call failed while open: the outage is real, not a command's own failures.
    pub(super) confirmed: bool,
    /// Answers received while a failure window was open or the breaker open.
    pub(super) answers: u64,
    /// Times it opened.
    pub(super) openings: u64,
    /// Confirmed outages that ended.
    pub(super) recoveries: u64,
}

/// A change worth a log line and a metric, decided under the lock and reported after it.
enum Transition {
    Opened {
        failing_for: Duration,
        last_error: String,
    },
    Closed {
        open_for: Duration,
        by: ClosedBy,
        confirmed: bool,
    },
}

impl Breaker {
    /// An outage failure now.
    pub(super) fn failed(&self, error: &str) -> Failure {
        let now = Instant::now();
        let mut failure = Failure {
            answers: 0,
            openings: 0,
        };
        let mut transition = None;
        self.state.send_if_modified(|s| {
            s.last_error = Some(error.to_owned());
            if s.opened_at.is_some() {
                s.confirmed = true;
            } else {
                let since = *s.failing_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.open_after {
                    transition = Some(open(s, now));
                }
            }
            failure = Failure {
                answers: s.answers,
                openings: s.openings,
            };
            transition.is_some()
        });
        self.report(transition);
        failure
    }

    /// An answer from the API: the failure window, and the breaker if open, close.
    pub(super) fn answered(&self, by: ClosedBy) {
        let mut transition = None;
        self.state.send_if_modified(|s| {
            if s.failing_since.is_none() && s.opened_at.is_none() {
                // The steady state: nothing waits on answers, no one to wake.
                return false;
            }
            s.answers = s.answers.wrapping_add(1);
            s.failing_since = None;
            s.last_error = None;
            if let Some(opened_at) = s.opened_at.take() {
                let confirmed = std::mem::take(&mut s.confirmed);
                if confirmed {
                    s.recoveries = s.recoveries.wrapping_add(1);
                }
                transition = Some(Transition::Closed {
                    open_for: opened_at.elapsed(),
                    by,
                    confirmed,
                });
            }
            true
        });
        self.report(transition);
    }

    /// Opens if the failure window has lasted `open_after` with no answer.
    pub(super) fn open_if_due(&self) {
        let now = Instant::now();
        let mut transition = None;
        self.state.send_if_modified(|s| {
            let due = s.opened_at.is_none()
                && s.failing_since
                    .is_some_and(|since| now.saturating_duration_since(since) >= self.open_after);
            if due {
                transition = Some(open(s, now));
            }
            due
        });
        self.report(transition);
    }

    fn report(&self, transition: Option<Transition>) {
        match transition {
            None => {}
            Some(Transition::Opened {
                failing_for,
                last_error,
            }) => {
                // One breaker per API host: the gauge counts those open.
                self.metrics.breaker_open.inc();
                self.metrics.breaker_openings.inc();
                tracing::warn!(
                    host = %self.host,
                    failing_for = ?failing_for,
                    open_after = ?self.open_after,
                    %last_error,
                    "circuit breaker open: AgentAssist has failed transiently with no answer for open_after; no attempt starts until a probe finds it answering"
                );
            }
            Some(Transition::Closed {
                open_for,
                by,
                confirmed,
            }) => {
                self.metrics.breaker_open.dec();
                self.metrics
                    .breaker_open_time
                    .inc_by(open_for.as_secs_f64());
                let (by, status) = match by {
                    ClosedBy::Call(status) => ("call", status),
                    ClosedBy::Probe(status) => ("probe", status),
                };
                tracing::info!(
                    host = %self.host,
                    open_for = ?open_for,
                    answered = by,
                    status,
                    outage_confirmed = confirmed,
                    "circuit breaker closed: AgentAssist answers again; resuming"
                );
            }
        }
    }
}

/// Opens the breaker at `now`.
fn open(s: &mut State, now: Instant) -> Transition {
    let since = s.failing_since.unwrap_or(now);
    s.opened_at = Some(now);
    s.confirmed = false;
    s.openings = s.openings.wrapping_add(1);
    Transition::Opened {
        failing_for: now.saturating_duration_since(since),
        last_error: s.last_error.clone().unwrap_or_default(),
    }
}
