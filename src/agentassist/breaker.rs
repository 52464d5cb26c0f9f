//! The circuit breaker in front of the API (docs/contract.md §11): when the API has failed
//! transiently for `breaker.open_after` with no answer in between, no attempt starts until a
//! probe finds it answering again.
//!
//! - *Closed*: calls go out. An outage failure (connect error, timeout, 408, 5xx) starts a
//!   failure window if none is open; any answer closes it — a success, a permanent error, a 429
//!   (the API is up and pacing us). A window older than `open_after` opens the breaker: on the
//!   next failure, or when a command waiting for the breaker's verdict reaches that time.
//! - *Open*: [`Breaker::pass`] holds every attempt, the first of new commands and the retries of
//!   those in flight, within their deadlines; new deliveries stay unacked and the queue keeps
//!   the rest once `amqp.prefetch` are in flight. [`Breaker::run`] probes every
//!   `probe_interval` with a request that cannot transfer anything.
//! - Back to *closed* on the first answer, from a probe or from a call that was on the wire.
//!
//! Retry budgets, so that no command fails for an outage its deadline outlasts:
//! - When an outage the breaker *confirmed* ends (it opened and a probe or a call failed while
//!   open), every command in flight starts a fresh budget: attempts spent on the outage are
//!   forgiven ([`Breaker::pass`] says so).
//! - A command whose budget runs out on an outage failure does not fail at once: it waits for
//!   the breaker's [`Verdict`]. If the breaker opens, the command is held like the others. If
//!   the API answers first (a success elsewhere, or a probe that closes an opening no failure
//!   confirmed), the command gets one last attempt and then fails as before: failures that are
//!   its own are not an outage.
//! - Deadlines and shutdown end every wait, with the outcome they would give without a breaker.
//!
//! Each replica has its own breaker: an outage is seen by all of them at once, and keeping the
//! decision local needs no Redis round trip on every call.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
// Tokio's clock, so that tests can pause and advance it; deadlines arrive as `std` instants.
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{ApiError, ApiResponse};
use crate::config::BreakerSettings;
use crate::ops::metrics::{Metrics, ProbeLabels};
use crate::shutdown::Shutdown;
use state::{ClosedBy, State};

/// Whether an error says the API is down, rather than answering: transient, and not a rate
/// limit (a 429 comes from an API that is up).
pub fn is_outage(error: &ApiError) -> bool {
    error.is_transient() && !error.is_rate_limited()
}

/// Why a wait on the breaker ended before it let the command go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    /// The command's deadline passed.
    Deadline,
    /// `shutdown.abandon`: the command goes back to the queue.
    Abandoned,
}

/// What the breaker says to a command whose budget ran out on an outage failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The API answered since that failure: one last attempt.
    Answered,
    /// The breaker opened: the command is held until it closes.
    Opened,
}

/// Where one command stands with the breaker: the confirmed outages it has seen end.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    recoveries: u64,
}

/// An outage failure as recorded: what a command waits against for the verdict.
#[derive(Debug, Clone, Copy)]
pub struct Failure {
    answers: u64,
    openings: u64,
}

/// One process's breaker; shared by every command and the prober.
#[derive(Debug)]
pub struct Breaker {
    /// The API host it stands in front of, for its logs.
    host: String,
    open_after: Duration,
    probe_interval: Duration,
    state: watch::Sender<State>,
    metrics: Arc<Metrics>,
}

/// Counts a command in `breaker_held` for as long as it waits.
struct Held<'a>(&'a Metrics);

impl<'a> Held<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.breaker_held.inc();
        Self(metrics)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.breaker_held.dec();
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: &BreakerSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            host: String::new(),
            open_after: settings.open_after,
            probe_interval: settings.probe_interval,
            state: watch::Sender::new(State::default()),
            metrics,
        }
    }

    /// The breaker of API host `host` (scheme, host and port), which its logs name.
    pub fn for_host(mut self, host: &str) -> Self {
        self.host = host.to_owned();
        self
    }

    /// Whether attempts are held now.
    pub fn is_open(&self) -> bool {
        self.state.borrow().opened_at.is_some()
    }

    /// A command's standing as it starts.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            recoveries: self.state.borrow().recoveries,
        }
    }

    /// Before every attempt: waits while the breaker is open, until it closes, the deadline
    /// passes or the command is abandoned. `Ok(true)` when a confirmed outage ended since the
    /// ticket was last seen here: the command's budget starts afresh.
    pub async fn pass(
        &self,
        ticket: &mut Ticket,
        deadline: Option<std::time::Instant>,
        shutdown: &Shutdown,
    ) -> Result<bool, Interrupted> {
        let deadline = deadline.map(Instant::from_std);
        let mut state = self.state.subscribe();
        let mut held = None;
        loop {
            {
                let s = state.borrow_and_update();
                if s.opened_at.is_none() {
                    let fresh = s.recoveries != ticket.recoveries;
                    ticket.recoveries = s.recoveries;
                    return Ok(fresh);
                }
            }
            held.get_or_insert_with(|| Held::new(&self.metrics));
            wait_for_change(&mut state, None, deadline, shutdown).await?;
        }
    }

    /// Takes in the result of a call. An outage failure is returned as recorded, for
    /// [`Breaker::verdict`]; a status from the API is an answer.
    pub fn record(&self, result: &Result<ApiResponse, ApiError>) -> Option<Failure> {
        match result {
            Err(error) if is_outage(error) => Some(self.failed(&error.to_string())),
            Ok(response) => {
                self.answered(ClosedBy::Call(Some(response.status)));
                None
            }
            // Neither: the request could not even be sent, so the API said nothing.
            Err(error) if error.status.is_none() => None,
            Err(error) => {
                self.answered(ClosedBy::Call(error.status));
                None
            }
        }
    }

    /// For a command whose budget ran out on `failure`: waits until the API answers, the
    /// breaker opens (by then, if no answer came, it does), the deadline passes or the command
    /// is abandoned.
    pub async fn verdict(
        &self,
        failure: Failure,
        deadline: Option<std::time::Instant>,
        shutdown: &Shutdown,
    ) -> Result<Verdict, Interrupted> {
        let deadline = deadline.map(Instant::from_std);
        let mut state = self.state.subscribe();
        let _held = Held::new(&self.metrics);
        loop {
            let due = {
                let s = state.borrow_and_update();
                if s.openings != failure.openings || s.opened_at.is_some() {
                    return Ok(Verdict::Opened);
                }
                match s.failing_since {
                    Some(since) if s.answers == failure.answers => {
                        since.checked_add(self.open_after)
                    }
                    _ => return Ok(Verdict::Answered),
                }
            };
            if due.is_none_or(|due| Instant::now() >= due) {
                self.open_if_due();
                continue;
            }
            wait_for_change(&mut state, due, deadline, shutdown).await?;
        }
    }

    /// Probes while the breaker is open, every `probe_interval`, until `stop`. `probe` is one
    /// request that cannot transfer anything ([`super::ApiClient::probe`]), or `None` when
    /// none could be sent this time (the account's budget had no start for it).
    pub async fn run<F, Fut>(&self, mut probe: F, stop: CancellationToken)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<Result<ApiResponse, ApiError>>>,
    {
        let mut state = self.state.subscribe();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                opened = state.wait_for(|s| s.opened_at.is_some()) => {
                    if opened.is_err() {
                        return;
                    }
                }
            }
            while self.is_open() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(self.probe_interval) => {}
                }
                if !self.is_open() {
                    break;
                }
                let probed = tokio::select! {
                    () = stop.cancelled() => return,
                    probed = probe() => probed,
                };
                let Some(probed) = probed else {
                    continue;
                };
                match probed {
                    Err(error) if is_outage(&error) => {
                        self.count_probe("failed");
                        tracing::debug!(%error, "AgentAssist probe failed; the breaker stays open");
                        let error = error.to_string();
                        self.state.send_if_modified(|s| {
                            s.confirmed = true;
                            s.last_error = Some(error);
                            false
                        });
                    }
                    answered => {
                        self.count_probe("answered");
                        let status = match &answered {
                            Ok(r) => Some(r.status),
                            Err(e) => e.status,
                        };
                        self.answered(ClosedBy::Probe(status));
                    }
                }
            }
        }
    }

    fn count_probe(&self, result: &'static str) {
        self.metrics
            .breaker_probes
            .get_or_create(&ProbeLabels { result })
            .inc();
    }
}

/// Waits for the breaker's state to change, or `until`; ends early at the deadline or abandon.
async fn wait_for_change(
    state: &mut watch::Receiver<State>,
    until: Option<Instant>,
    deadline: Option<Instant>,
    shutdown: &Shutdown,
) -> Result<(), Interrupted> {
    if shutdown.is_abandoned() {
        return Err(Interrupted::Abandoned);
    }
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(Interrupted::Deadline);
    }
    let sleep = |at: Option<Instant>| async move {
        match at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        () = shutdown.abandoned() => Err(Interrupted::Abandoned),
        () = sleep(deadline) => Err(Interrupted::Deadline),
        // The sender lives as long as the breaker, which outlives every borrower.
        _ = state.changed() => Ok(()),
        () = sleep(until) => Ok(()),
    }
}

mod by_host;
mod prober;
mod state;

pub use by_host::Breakers;
pub use prober::Prober;

#[cfg(test)]
mod tests;
