//! One rate budget per account across the fleet: a sliding log of starts in Redis, timed by
//! Redis's clock, booked at most a horizon ahead (`lua/reserve_fn.lua`, `reserve.lua`,
//! `unreserve.lua`; a command's first start also comes with its claim, `claim.lua`), and a
//! shared pause after a 429 (`lua/pause.lua`).

use std::time::Duration;

use super::{Fleet, FleetError, micros, millis, scripts};

/// The answer to a request for a start.
#[derive(Debug)]
pub enum Reservation {
    /// Booked: call after this delay.
    Booked {
        /// From the request.
        delay: Duration,
        /// What to give back if the call does not happen.
        booking: Booking,
    },
    /// The deadline comes before the next free start; nothing was booked.
    DeadlineFirst {
        /// When the start would have been.
        delay: Duration,
    },
    /// The next free start is beyond the horizon: ask again a horizon before it.
    NotYet {
        /// When the start would be, as things stand.
        delay: Duration,
    },
}

/// A booked start, as given back by [`Fleet::unreserve`].
#[derive(Debug, Clone)]
pub struct Booking {
    account: String,
    member: String,
}

/// An account's budget as the fleet booked it ([`Fleet::booked`]).
#[derive(Debug, Default)]
pub struct Booked {
    /// Until when the account is paused, from now (zero: it is not).
    pub paused: Duration,
    /// Each start booked within the last window or later, in µs from now (negative: past),
    /// ascending.
    pub starts: Vec<i64>,
}

/// A start asked of an account's budget: `limit` calls in any `window`, and when the
/// command's deadline (or aside limit) comes.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// The account.
    pub account: String,
    /// Calls per window.
    pub limit: usize,
    /// The window.
    pub window: Duration,
    /// From the moment of asking; past it nothing is booked.
    pub deadline_in: Option<Duration>,
    /// What the start is booked as, drawn by [`StartRequest::new`]: the same for every time
    /// one start is asked again (after a write the replicas did not acknowledge, say), so it
    /// is booked once, not once a try.
    member: String,
}

impl StartRequest {
    /// A start of `account`'s budget, `limit` calls per `window`, under a member of its own.
    pub fn new(
        account: &str,
        limit: usize,
        window: Duration,
        deadline_in: Option<Duration>,
    ) -> Self {
        Self {
            account: account.to_owned(),
            limit,
            window,
            deadline_in,
            member: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// The same start asked again, with what is left until its deadline: booked under the
    /// same member.
    pub fn again(&self, deadline_in: Option<Duration>) -> Self {
        Self {
            deadline_in,
            ..self.clone()
        }
    }
}

impl Fleet {
    /// Asks for the next start of `request.account`'s budget, timed by Redis. Marks
    /// `command_id` as possibly on the wire when a start is booked.
    pub async fn reserve(
        &self,
        request: &StartRequest,
        command_id: &str,
    ) -> Result<Reservation, FleetError> {
        let mut invocation = scripts::RESERVE.prepare_invoke();
        invocation
            .key(self.key("pace", &request.account))
            .key(self.key("pause", &request.account))
            .key(self.key("wire", command_id));
        let member = self.start_args(&mut invocation, request);
        let (state, delay): (i64, i64) = self.invoke_acknowledged("reserve", &invocation).await?;
        reservation("reserve", state, delay, request, member)
    }

    /// The arguments of a start asked in `invocation` (`reserve_fn.lua`'s a[1..7]); returns
    /// the member it would be booked as.
    pub(super) fn start_args(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
        request: &StartRequest,
    ) -> String {
        let member = request.member.clone();
        let deadline = request
            .deadline_in
            .map_or(-1, |d| i64::try_from(micros(d)).unwrap_or(i64::MAX));
        invocation
            .arg(request.limit)
            .arg(micros(request.window))
            .arg(deadline)
            .arg(&member)
            .arg(&self.claimant)
            .arg(millis(self.outcome_ttl))
            .arg(micros(self.horizon()));
        member
    }

    /// How far ahead a start is booked: a third of the lease. Further starts are only told,
    /// so a replica that dies leaves at most this much of an account's budget unused.
    pub fn horizon(&self) -> Duration {
        self.lease / 3
    }

    /// Gives back a start booked but not used.
    pub async fn unreserve(&self, booking: &Booking) -> Result<(), FleetError> {
        let mut invocation = scripts::UNRESERVE.prepare_invoke();
        invocation
            .key(self.key("pace", &booking.account))
            .arg(&booking.member);
        let _: i64 = self.invoke("unreserve", &invocation).await?;
        Ok(())
    }

    /// What `account`'s budget holds now, fleet-wide: its pause and the starts booked within
    /// the last `window` or later, each as seen from now.
    pub async fn booked(&self, account: &str, window: Duration) -> Result<Booked, FleetError> {
        let mut invocation = scripts::BOOKED.prepare_invoke();
        invocation
            .key(self.key("pace", account))
            .key(self.key("pause", account))
            .arg(micros(window));
        let reply: Vec<i64> = self.invoke("booked", &invocation).await?;
        let (paused, starts) = reply.split_first().map_or((0, &[][..]), |(p, s)| (*p, s));
        Ok(Booked {
            paused: Duration::from_micros(u64::try_from(paused).unwrap_or(0)),
            starts: starts.to_vec(),
        })
    }

    /// Holds every later start of `account`, fleet-wide, for `for_` from now.
    pub async fn pause(&self, account: &str, for_: Duration) -> Result<(), FleetError> {
        let mut invocation = scripts::PAUSE.prepare_invoke();
        invocation.key(self.key("pause", account)).arg(micros(for_));
        let _: i64 = self.invoke_acknowledged("pause", &invocation).await?;
        Ok(())
    }
}

/// `reserve_fn.lua`'s answer, read.
pub(super) fn reservation(
    op: &'static str,
    state: i64,
    delay: i64,
    request: &StartRequest,
    member: String,
) -> Result<Reservation, FleetError> {
    let delay = Duration::from_micros(u64::try_from(delay).unwrap_or(0));
    match state {
        1 => Ok(Reservation::Booked {
            delay,
            booking: Booking {
                account: request.account.clone(),
                member,
            },
        }),
        0 => Ok(Reservation::DeadlineFirst { delay }),
        2 => Ok(Reservation::NotYet { delay }),
        other => Err(FleetError::Unexpected {
            op,
            what: other.to_string(),
        }),
    }
}
