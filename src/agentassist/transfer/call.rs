//! One call of an execution: the last gate (the account's arrivals, docs/contract.md §4), the
//! fence (whose the command is, §9), the breaker, a token, the request, its series and the
//! breaker's record of it.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Ours, Transfers, Unfinished};
use crate::agentassist::attempts::AttemptBudget;
use crate::agentassist::bots::Bot;
use crate::agentassist::breaker::Failure as BreakerFailure;
use crate::agentassist::client::{ApiError, ApiResponse, ErrorKind, how_ended};
use crate::shutdown::Shutdown;

/// How one call went.
pub(super) enum Call {
    Answered(ApiResponse),
    Failed(ApiError, Option<BreakerFailure>),
    /// No token could be made: nothing was sent, and trying again will not help.
    NoToken(ApiError),
    /// The command is no longer this replica's: nothing was sent.
    NotHeld,
    /// The deadline came while the call waited at the gate: nothing was sent.
    Late,
    /// The breaker opened while the call waited at the gate: nothing was sent, and the
    /// command waits for the breaker again.
    Held,
}

/// What one call is made of, and what it must respect.
pub(super) struct Leg<'a> {
    pub bot: &'a Bot,
    pub body: &'a Bytes,
    /// Whether the command's delivery is still this replica's (with a fleet, whether the
    /// holds the execution began under are still held, too).
    pub ours: &'a Ours<'a>,
    pub deadline: Option<Instant>,
    /// Held this long between the gate and the wire: only with the `fault-injection` feature
    /// ([`held_on_the_way`]).
    pub late: Duration,
}

impl Transfers {
    /// One call. It leaves only once the account's arrivals allow it, and only while the
    /// command is this replica's (`ours`: a replica frozen past `fleet.member_ttl` wakes with
    /// its holds gone, perhaps another's, and whatever woke it must not call for a delivery
    /// that went back).
    pub(super) async fn call(
        &self,
        leg: Leg<'_>,
        budget: &mut AttemptBudget,
        shutdown: &Shutdown,
    ) -> Result<Call, Unfinished> {
        let Leg {
            bot,
            body,
            ours,
            deadline,
            late,
        } = leg;
        let Some(departure) = self.budget.depart(&bot.account, deadline, shutdown).await? else {
            return Ok(Call::Late);
        };
        if shutdown.is_abandoned() {
            departure.unsent().await;
            return Err(Unfinished::Abandoned);
        }
        if !ours() {
            departure.unsent().await;
            return Ok(Call::NotHeld);
        }
        if self.breakers.of(bot).is_some_and(|b| b.is_open()) {
            departure.unsent().await;
            return Ok(Call::Held);
        }
        // Minted after the gate, which may have waited long: a token is never older than that
        // wait when it leaves.
        let token = match bot.tokens.token() {
            Ok(token) => token,
            Err(e) => {
                departure.unsent().await;
                let error = ApiError::without_status(ErrorKind::Request, e.to_string());
                return Ok(Call::NoToken(error));
            }
        };
        if !late.is_zero() {
            tokio::time::sleep(late).await;
        }
        // The last look, as the request is first polled: a pause between the looks above and
        // here (a freeze past fleet.member_ttl) must not send it after the wake.
        let mut send = std::pin::pin!(self.api.assign(bot, &token, body.clone()));
        let mut sent = false;
        let fenced = std::future::poll_fn(|cx| {
            if !sent {
                if !ours() {
                    return std::task::Poll::Ready(None);
                }
                sent = true;
            }
            send.as_mut().poll(cx).map(Some)
        });
        let call_started = Instant::now();
        let Some(result) = fenced.await else {
            departure.unsent().await;
            return Ok(Call::NotHeld);
        };
        budget.call();
        let status = match &result {
            Ok(r) => Some(r.status),
            Err(e) => e.status,
        };
        departure.ended(how_ended(&result)).await;
        let seconds = call_started.elapsed().as_secs_f64();
        self.metrics.api_call(&bot.account_id, status, seconds);
        let outage = self.breakers.of(bot).and_then(|b| b.record(&result));
        Ok(match result {
            Ok(response) => Call::Answered(response),
            Err(error) => Call::Failed(error, outage),
        })
    }
}

/// With the `fault-injection` feature, the calls of a command with this `orgId` are held
/// [`FAULT_LATE_DEPARTURE`] between their booked start and the wire, as a busy machine or a
/// slow connection would hold them.
#[cfg(feature = "fault-injection")]
pub const FAULT_LATE_DEPARTURE_ORG_ID: &str = "o-fault-injection-late-departure";

/// How long [`FAULT_LATE_DEPARTURE_ORG_ID`]'s calls are held.
#[cfg(feature = "fault-injection")]
pub const FAULT_LATE_DEPARTURE: Duration = Duration::from_secs(1);

/// How long `command`'s calls are held on their way: zero unless a fault is injected.
pub(super) fn held_on_the_way(command: &crate::contract::Command) -> Duration {
    #[cfg(feature = "fault-injection")]
    if command.org_id == FAULT_LATE_DEPARTURE_ORG_ID {
        return FAULT_LATE_DEPARTURE;
    }
    let _ = command;
    Duration::ZERO
}
