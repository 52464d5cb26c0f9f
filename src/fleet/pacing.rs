//! One rate budget per account across the fleet: a sliding log of starts in Redis, timed by
//! Redis's clock, booked at most a horizon ahead (`lua/reserve.lua`, `unreserve.lua`), and a
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

impl Fleet {
    /// Asks for the next start of `account`'s budget: `limit` calls in any `window`, timed by
    /// Redis. Marks `command_id` as possibly on the wire when a start is booked.
    pub async fn reserve(
        &self,
        account: &str,
        limit: usize,
        window: Duration,
        deadline_in: Option<Duration>,
        command_id: &str,
    ) -> Result<Reservation, FleetError> {
        let member = uuid::Uuid::new_v4().simple().to_string();
        let mut invocation = scripts::RESERVE.prepare_invoke();
        invocation
            .key(self.key("pace", account))
            .key(self.key("pause", account))
            .key(self.key("wire", command_id))
            .arg(limit)
            .arg(micros(window))
            .arg(deadline_in.map_or(-1, |d| i64::try_from(micros(d)).unwrap_or(i64::MAX)))
            .arg(&member)
            .arg(&self.claimant)
            .arg(millis(self.outcome_ttl))
            .arg(micros(self.horizon()));
        let (state, delay): (i64, i64) = self.invoke("reserve", &invocation).await?;
        let delay = Duration::from_micros(u64::try_from(delay).unwrap_or(0));
        match state {
            1 => Ok(Reservation::Booked {
                delay,
                booking: Booking {
                    account: account.to_owned(),
                    member,
                },
            }),
            0 => Ok(Reservation::DeadlineFirst { delay }),
            2 => Ok(Reservation::NotYet { delay }),
            other => Err(FleetError::Unexpected {
                op: "reserve",
                what: other.to_string(),
            }),
        }
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

    /// Holds every later start of `account`, fleet-wide, for `for_` from now.
    pub async fn pause(&self, account: &str, for_: Duration) -> Result<(), FleetError> {
        let mut invocation = scripts::PAUSE.prepare_invoke();
        invocation.key(self.key("pause", account)).arg(micros(for_));
        let _: i64 = self.invoke("pause", &invocation).await?;
        Ok(())
    }
}
