//! The last gate before a call leaves (docs/contract.md §4): this process's
//! [`Arrivals`](super::arrivals::Arrivals) when the worker is alone, the fleet's gate in Redis
//! ([`Fleet::depart`]) when it is not. A call passes it after its booked start, right before
//! it is sent, and reports its answer on the way back.

use std::time::{Duration, Instant};

use super::arrivals;
use super::bots::Bot;
use super::transfer::Unfinished;
use crate::fleet::Fleet;
use crate::fleet::gate::{DepartRequest, Gate};
use crate::shutdown::{Abandoned, Shutdown};

/// The most that may pass between the fleet's gate opening (as timed from before it was asked)
/// and the request leaving: the bound recorded for a call that gets no answer counts it in.
/// A call that could not leave within it (a replica frozen, a Redis answer that took this
/// long) takes nothing and asks again.
pub const SEND_WITHIN: Duration = Duration::from_secs(2);

/// How soon to ask the fleet's gate again while a call on the wire stands in the way: its
/// answer can come at any moment.
const ON_THE_WIRE_POLL: Duration = Duration::from_millis(20);

/// A call through the gate, on its way.
#[derive(Debug)]
pub(super) enum Departure<'a> {
    /// Counted in this process.
    Here(arrivals::Departure<'a>),
    /// Counted in Redis.
    Fleet {
        fleet: &'a Fleet,
        account: &'a str,
        member: String,
    },
}

impl Departure<'_> {
    /// The API answered: the call's window counts from now. In a fleet, a failure to say so
    /// leaves the call counted until its bound, which is safe.
    pub async fn answered(self) {
        match self {
            Self::Here(departure) => departure.answered(),
            Self::Fleet {
                fleet,
                account,
                member,
            } => {
                if let Err(e) = fleet.arrived(account, &member).await {
                    tracing::debug!(error = %e, "could not record a call's answer; it counts until its bound");
                }
            }
        }
    }

    /// No answer came (the request failed or timed out): the call counts until its bound.
    pub fn unanswered(self) {}

    /// Nothing was sent after all.
    pub async fn unsent(self) {
        match self {
            Self::Here(departure) => departure.unsent(),
            Self::Fleet {
                fleet,
                account,
                member,
            } => {
                if let Err(e) = fleet.unsent(account, &member).await {
                    tracing::debug!(error = %e, "could not take back a call not sent; it counts until its bound");
                }
            }
        }
    }
}

/// Waits until a call of `bot`'s account may leave; `None` when `until` (the deadline) comes
/// first.
pub(super) async fn depart<'a>(
    fleet: Option<&'a Fleet>,
    bot: &'a Bot,
    until: Option<Instant>,
    shutdown: &Shutdown,
) -> Result<Option<Departure<'a>>, Unfinished> {
    let Some(fleet) = fleet else {
        return tokio::select! {
            departure = bot.account.arrivals.depart(until) => Ok(departure.map(Departure::Here)),
            () = shutdown.abandoned() => Err(Abandoned.into()),
        };
    };
    let arrivals = &bot.account.arrivals;
    let request = DepartRequest {
        account: &bot.account_id,
        limit: arrivals.limit(),
        window: arrivals.window(),
        unanswered: arrivals.unanswered().saturating_add(SEND_WITHIN),
    };
    loop {
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok(None);
        }
        let (asked, gate) = fleet
            .until_answered(shutdown, || async {
                let asked = Instant::now();
                Ok((asked, fleet.depart(&request).await?))
            })
            .await
            .ok_or(Abandoned)?;
        let again = match gate {
            Gate::Open(member) => {
                let departure = Departure::Fleet {
                    fleet,
                    account: &bot.account_id,
                    member,
                };
                if asked.elapsed() <= SEND_WITHIN {
                    return Ok(Some(departure));
                }
                departure.unsent().await;
                Duration::ZERO
            }
            Gate::Closed(after) => after,
            Gate::OnTheWire(after) => after.min(ON_THE_WIRE_POLL),
        };
        let at = asked.checked_add(again).unwrap_or(asked);
        let at = until.map_or(at, |u| at.min(u));
        shutdown.sleep_until(at).await?;
    }
}
