//! The last gate before a call leaves (docs/contract.md §4): this process's
//! [`Arrivals`](super::arrivals::Arrivals) for a worker alone, the fleet's gate in Redis
//! ([`Fleet::depart`]) in a fleet; the account's [`RateBudget`](super::budget::RateBudget)
//! says which. A call passes it after its booked start, right before it is sent, and reports
//! its answer on the way back.

use std::time::{Duration, Instant};

use super::account::Account;
use super::arrivals;
use crate::fleet::Fleet;
use crate::fleet::gate::{DepartRequest, Gate};
use crate::shutdown::{Abandoned, Shutdown};

/// The least that may pass between the fleet's gate opening (as timed from before it was
/// asked) and the request leaving (see [`send_within`]): the bound recorded for a call that
/// gets no answer counts it in. A call that could not leave within it (a replica frozen, a
/// Redis answer that took this long) takes nothing and asks again.
const SEND_WITHIN: Duration = Duration::from_secs(2);

/// How soon to ask the fleet's gate again while a call on the wire stands in the way: its
/// answer can come at any moment. The pause doubles while the same call keeps standing there
/// (one that timed out is counted until its bound, and no answer will come), up to
/// [`ON_THE_WIRE_POLL_MAX`].
const ON_THE_WIRE_POLL: Duration = Duration::from_millis(20);

/// The longest pause between questions while a call on the wire stands in the way.
const ON_THE_WIRE_POLL_MAX: Duration = Duration::from_millis(640);

/// How a call that passed the gate ended, as the gate counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The API answered, with any status: it saw the call, whose window counts from now.
    Answered,
    /// Nothing was sent (no connection or TLS handshake could be made).
    Unsent,
    /// No answer came (the request failed or timed out): it counts until its bound.
    Unanswered,
}

/// A call through the gate, on its way.
#[derive(Debug)]
pub enum Departure<'a> {
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

    /// Records how the call ended.
    pub async fn ended(self, how: Ended) {
        match how {
            Ended::Answered => self.answered().await,
            Ended::Unsent => self.unsent().await,
            // Dropped: it counts until its bound.
            Ended::Unanswered => {}
        }
    }

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

/// Through this process's arrivals ([`super::budget::OwnBudget`]). An account paused by a 429
/// lets nothing leave until its pause ends, however long the call waited at the gate.
pub(super) async fn through_own_arrivals<'a>(
    account: &'a Account,
    until: Option<Instant>,
    shutdown: &Shutdown,
) -> Result<Option<Departure<'a>>, Abandoned> {
    loop {
        if let Some(paused) = account.pacer.paused() {
            if until.is_some_and(|u| u <= paused) {
                return Ok(None);
            }
            shutdown.sleep_until(paused).await?;
            continue;
        }
        let departure = tokio::select! {
            departure = account.arrivals.depart(until) => departure,
            () = shutdown.abandoned() => return Err(Abandoned),
        };
        let Some(departure) = departure else {
            return Ok(None);
        };
        // Paused while it waited: it leaves after the pause, through the gate again.
        if account.pacer.paused().is_some() {
            departure.unsent();
            continue;
        }
        return Ok(Some(Departure::Here(departure)));
    }
}

/// The most that may pass between asking the fleet's gate and the request leaving: at least
/// [`SEND_WITHIN`], and a second more than Redis may take to answer, so that a slow answer does
/// not keep every call from leaving.
fn send_within(fleet: &Fleet) -> Duration {
    fleet
        .timeout()
        .saturating_add(Duration::from_secs(1))
        .max(SEND_WITHIN)
}

/// Through the fleet's arrivals in Redis. One member for the call, kept across questions: a
/// call let through whose answer was lost on the way back is not counted twice.
pub(super) async fn in_fleet<'a>(
    fleet: &'a Fleet,
    account: &'a Account,
    until: Option<Instant>,
    shutdown: &Shutdown,
) -> Result<Option<Departure<'a>>, Abandoned> {
    let arrivals = &account.arrivals;
    let within = send_within(fleet);
    let request = DepartRequest {
        account: &account.id,
        limit: arrivals.limit(),
        window: arrivals.window(),
        unanswered: arrivals.unanswered().saturating_add(within),
    };
    let member = uuid::Uuid::new_v4().simple().to_string();
    let mut poll = ON_THE_WIRE_POLL;
    loop {
        if until.is_some_and(|u| Instant::now() >= u) {
            fleet.unsent(&account.id, &member).await.ok();
            return Ok(None);
        }
        let (asked, gate) = fleet
            .until_answered(shutdown, || async {
                let asked = Instant::now();
                Ok((asked, fleet.depart(&request, &member).await?))
            })
            .await
            .ok_or(Abandoned)?;
        let again = match gate {
            Gate::Open => {
                let departure = Departure::Fleet {
                    fleet,
                    account: &account.id,
                    member: member.clone(),
                };
                if asked.elapsed() <= within {
                    return Ok(Some(departure));
                }
                departure.unsent().await;
                Duration::ZERO
            }
            Gate::Closed(after) => {
                poll = ON_THE_WIRE_POLL;
                after
            }
            Gate::OnTheWire(after) => {
                let wait = after.min(poll);
                poll = poll.saturating_mul(2).min(ON_THE_WIRE_POLL_MAX);
                wait
            }
        };
        let at = asked.checked_add(again).unwrap_or(asked);
        let at = until.map_or(at, |u| at.min(u));
        shutdown.sleep_until(at).await?;
    }
}

#[cfg(test)]
mod tests;
