//! Waiting for a start from an account's budget (docs/contract.md §4, §9): from this
//! process's pacer when the worker is alone, from the fleet's sliding log in Redis when it is
//! not. Either way the wait ends early when the deadline (or the aside limit) comes first.

use std::time::{Duration, Instant};

use super::bots::Bot;
use super::pacer::DeadlineFirst;
use super::transfer::Unfinished;
use crate::contract::Command;
use crate::fleet::{Fleet, FleetError, Reservation};
use crate::shutdown::{Abandoned, Shutdown};

/// Waits for a start from this process's pacer.
pub(super) async fn here(
    bot: &Bot,
    limit: Option<Instant>,
    shutdown: &Shutdown,
) -> Result<Result<(), DeadlineFirst>, Unfinished> {
    let asked = Instant::now();
    match bot.account.pacer.reserve(limit) {
        Ok(slot) => {
            bot.account.starts_in(slot.saturating_duration_since(asked));
            let waited = shutdown.sleep_until(slot).await;
            bot.account.waited_for_budget(asked.elapsed());
            Ok(waited.map(Ok)?)
        }
        Err(e) => {
            bot.account
                .starts_in(e.slot.saturating_duration_since(asked));
            Ok(Err(e))
        }
    }
}

/// A start from the fleet's budget in Redis: while Redis does not answer no start is handed
/// out (the command waits, its deadline still counting), until it does or the grace runs out;
/// a start booked but not reached at shutdown is given back.
pub(super) struct FleetStart<'a> {
    pub fleet: &'a Fleet,
    pub command: &'a Command,
    pub bot: &'a Bot,
    /// The deadline, or the aside limit if sooner.
    pub limit: Option<Instant>,
    /// A start not bookable yet ends the wait: the command may be set aside.
    pub aside: bool,
}

impl FleetStart<'_> {
    pub async fn wait(&self, shutdown: &Shutdown) -> Result<Result<(), DeadlineFirst>, Unfinished> {
        let (fleet, bot) = (self.fleet, self.bot);
        let first_asked = Instant::now();
        loop {
            let (asked_at, answer) = fleet
                .until_answered(shutdown, || self.ask())
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
                    return Ok(Err(DeadlineFirst { slot: at(delay) }));
                }
                // Asked again a horizon before the start, when it can be booked.
                Reservation::NotYet { delay } => {
                    bot.account.starts_in(delay);
                    if self.aside {
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

    /// One question to Redis, timed from before it was sent.
    async fn ask(&self) -> Result<(Instant, Reservation), FleetError> {
        let now = Instant::now();
        let deadline_in = self.limit.map(|d| d.saturating_duration_since(now));
        // Waiting for Redis does not stop the deadline: past it, ask nothing.
        if deadline_in.is_some_and(|left| left.is_zero()) {
            let delay = Duration::ZERO;
            return Ok((now, Reservation::DeadlineFirst { delay }));
        }
        let pacer = &self.bot.account.pacer;
        let answer = self
            .fleet
            .reserve(
                &self.bot.account_id,
                pacer.limit(),
                pacer.window(),
                deadline_in,
                &self.command.command_id,
            )
            .await?;
        Ok((now, answer))
    }
}
