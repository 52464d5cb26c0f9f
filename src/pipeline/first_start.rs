//! A command's first start, taken by the pipeline before the command's execution
//! (docs/contract.md §12): a command its account cannot start within the `aside` it was given
//! is not waited for in memory, and goes to wait in its account's queue instead, nothing booked
//! and nothing called. The API client never hears of it: it is handed a command whose first
//! start has come ([`First::Taken`]), or whose deadline comes first.

use std::time::{Duration, Instant};

use crate::agentassist::bots::Bot;
use crate::agentassist::deadline::deadline_of;
use crate::agentassist::transfer::{Begun, First, Transfers};
use crate::contract::Command;
use crate::fairness::budget::Ask;
use crate::fairness::start::{FirstStart, Unstarted, start_limit};
use crate::fleet::StartRequest;
use crate::shutdown::{Abandoned, Shutdown};

/// What to ask for with the fleet claim of `command`
/// ([`crate::fleet::Fleet::claim_with_start`]): its first start, as [`first_start`] will ask
/// for it. None where starts are not shared
/// ([`crate::fairness::budget::RateBudget::first_start_request`]), with a deadline already
/// past, or while the bot's API host is down: the command then waits for the breaker before
/// it asks.
pub fn first_start_request(
    transfers: &Transfers,
    command: &Command,
    bot: &Bot,
    aside: Option<Duration>,
) -> Option<StartRequest> {
    if transfers.held_by_breaker(bot) {
        return None;
    }
    let (limit, _) = start_limit(deadline_of(command, Instant::now()), aside);
    transfers.budget().first_start_request(&bot.account, limit)
}

/// Takes the command's first start from its account's budget. `booked`, the start asked
/// along with the fleet claim, stands for the first question if still fresh. `Err(Aside)`:
/// no start within `aside`, nothing booked. While the bot's API host is down the command
/// waits for its breaker first, and asks for its start once the host is up.
pub async fn first_start(
    transfers: &Transfers,
    command: &Command,
    bot: &Bot,
    aside: Option<Duration>,
    booked: Option<FirstStart>,
    shutdown: &Shutdown,
) -> Result<Begun, Unstarted> {
    let at = Instant::now();
    let deadline = deadline_of(command, at);
    let begun = |first| Begun { at, first };
    if deadline.is_some_and(|d| d <= at) {
        return Ok(begun(First::Ask(booked)));
    }
    if transfers.held_by_breaker(bot) {
        match transfers.until_host_up(bot, deadline, shutdown).await {
            Ok(true) => {}
            // The deadline came first: the execution says so.
            Ok(false) => return Ok(begun(First::Ask(booked))),
            Err(Abandoned) => {
                if let Some(booked) = booked {
                    transfers.budget().give_back(booked).await;
                }
                return Err(Unstarted::Abandoned);
            }
        }
    }
    let (limit, by_aside) = start_limit(deadline, aside);
    let ask = Ask {
        id: &command.command_id,
        account: &bot.account,
        limit,
        aside: by_aside.is_some(),
    };
    match transfers.budget().start(ask, booked, shutdown).await? {
        Ok(()) => Ok(begun(First::Taken)),
        // Not within the aside limit, which comes before the deadline.
        Err(_) if by_aside.is_some() => Err(Unstarted::Aside),
        Err(_) => Ok(begun(First::DeadlineFirst)),
    }
}
