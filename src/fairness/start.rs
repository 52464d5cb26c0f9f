//! Waiting for a start from an account's budget (docs/contract.md §4, §9): from this
//! process's pacer when the worker is alone, from the fleet's sliding log in Redis when it is
//! not. Either way the wait ends early when the deadline (or the aside limit) comes first.

use std::time::{Duration, Instant};

use super::account::Account;
use super::pacer::DeadlineFirst;
use crate::fleet::{Fleet, FleetError, Reservation, StartRequest};
use crate::shutdown::{Abandoned, Shutdown};

/// How long a start may be waited for: until the deadline, or until the aside limit when
/// that comes first (then also returned, as the aside limit in force).
pub fn start_limit(
    deadline: Option<Instant>,
    aside: Option<Duration>,
) -> (Option<Instant>, Option<Instant>) {
    let aside_at = aside.and_then(|d| Instant::now().checked_add(d));
    let by_aside = aside_at.filter(|a| deadline.is_none_or(|d| *a < d));
    (by_aside.or(deadline), by_aside)
}

/// Why a wait for a start ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unstarted {
    /// The start is further away than the command may wait in memory: it may wait in its
    /// account's queue instead. Nothing was booked.
    Aside,
    /// The shutdown's grace ran out.
    Abandoned,
}

impl From<Abandoned> for Unstarted {
    fn from(_: Abandoned) -> Self {
        Self::Abandoned
    }
}

/// Waits for a start from this process's pacer.
pub(super) async fn from_own_pacer(
    account: &Account,
    limit: Option<Instant>,
    shutdown: &Shutdown,
) -> Result<Result<(), DeadlineFirst>, Unstarted> {
    let asked = Instant::now();
    match account.pacer.reserve(limit) {
        Ok(slot) => {
            account.starts_in(slot.saturating_duration_since(asked));
            let waited = shutdown.sleep_until(slot).await;
            account.waited_for_budget(asked.elapsed());
            Ok(waited.map(Ok)?)
        }
        Err(e) => {
            account.starts_in(e.slot.saturating_duration_since(asked));
            Ok(Err(e))
        }
    }
}

/// A command's first start, asked with its fleet claim ([`Fleet::claim_with_start`]): one
/// round trip to Redis instead of two. It is the first answer of the fleet's wait for a start when still
/// fresh; a start booked but not used in time is given back and asked for anew.
#[derive(Debug)]
pub struct FirstStart {
    /// When the claim was sent: the answer's delay counts from here.
    pub asked_at: Instant,
    /// When its answer came back.
    pub answered_at: Instant,
    /// What the fleet's budget answered.
    pub answer: Reservation,
}

/// How long after its answer a [`FirstStart`] may still be used. Between the claim and the
/// wait for a start a command only signs its relay URL and passes a closed breaker:
/// microseconds. One that waited longer (for a breaker that opened, say) asks again, so a
/// start is never taken up late, bunching calls together.
pub const FRESH: Duration = Duration::from_millis(20);

impl FirstStart {
    /// Gives the start back if one was booked: the command did not use it.
    pub async fn give_back(self, fleet: &Fleet) {
        if let Reservation::Booked { booking, .. } = self.answer
            && let Err(e) = fleet.unreserve(&booking).await
        {
            tracing::warn!(error = %e, "could not give back a booked start");
        }
    }
}

/// A start from the fleet's budget in Redis: while Redis does not answer no start is handed
/// out (the command waits, its deadline still counting), until it does or the grace runs out;
/// a start booked but not reached at shutdown is given back.
pub(super) struct FleetStart<'a> {
    pub fleet: &'a Fleet,
    /// The command's id: what a booking is made under.
    pub id: &'a str,
    pub account: &'a Account,
    /// The deadline, or the aside limit if sooner.
    pub limit: Option<Instant>,
    /// A start not bookable yet ends the wait: the command may be set aside.
    pub aside: bool,
}

impl FleetStart<'_> {
    /// Waits for the start; `first`, the answer that came with the claim, stands for the
    /// first question to Redis if it is fresh.
    pub async fn wait(
        &self,
        first: Option<FirstStart>,
        shutdown: &Shutdown,
    ) -> Result<Result<(), DeadlineFirst>, Unstarted> {
        let (fleet, account) = (self.fleet, self.account);
        let mut first = match first {
            Some(first) if first.answered_at.elapsed() <= FRESH => Some(first),
            Some(stale) => {
                stale.give_back(fleet).await;
                None
            }
            None => None,
        };
        let first_asked = first.as_ref().map_or_else(Instant::now, |f| f.asked_at);
        // One start is wanted: every question for it books it under the same member.
        let wanted = self.account.start_request(None);
        loop {
            let (asked_at, answer) = match first.take() {
                Some(first) => (first.asked_at, first.answer),
                None => fleet
                    .until_answered(shutdown, || self.ask(&wanted))
                    .await
                    .ok_or(Abandoned)?,
            };
            let at = |delay: Duration| asked_at.checked_add(delay).unwrap_or(asked_at);
            match answer {
                Reservation::Booked { delay, booking } => {
                    account.starts_in(delay);
                    let waited = shutdown.sleep_until(at(delay)).await;
                    account.waited_for_budget(first_asked.elapsed());
                    if let Err(abandoned) = waited {
                        if let Err(e) = fleet.unreserve(&booking).await {
                            tracing::warn!(error = %e, "could not give back a booked start");
                        }
                        return Err(abandoned.into());
                    }
                    return Ok(Ok(()));
                }
                Reservation::DeadlineFirst { delay } => {
                    account.starts_in(delay);
                    return Ok(Err(DeadlineFirst { slot: at(delay) }));
                }
                // Asked again a horizon before the start, when it can be booked.
                Reservation::NotYet { delay } => {
                    account.starts_in(delay);
                    if self.aside {
                        return Err(Unstarted::Aside);
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
    async fn ask(&self, wanted: &StartRequest) -> Result<(Instant, Reservation), FleetError> {
        let now = Instant::now();
        let deadline_in = self.limit.map(|d| d.saturating_duration_since(now));
        // Waiting for Redis does not stop the deadline: past it, ask nothing.
        if deadline_in.is_some_and(|left| left.is_zero()) {
            let delay = Duration::ZERO;
            return Ok((now, Reservation::DeadlineFirst { delay }));
        }
        let request = wanted.again(deadline_in);
        let answer = self.fleet.reserve(&request, self.id).await?;
        Ok((now, answer))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::config::Settings;
    use crate::fairness::account::AccountMetrics;
    use crate::ops::metrics::{Metrics, RedisLabels};

    fn reserves(metrics: &Metrics) -> u64 {
        metrics
            .redis_round_trips
            .get_or_create(&RedisLabels { op: "reserve" })
            .get()
    }

    /// The interleaving a stale first start stands for: booked with the claim, then the
    /// command waited (for a breaker, say) before it asked for its start.
    #[tokio::test]
    async fn a_first_start_stands_for_the_question_when_fresh_and_is_given_back_when_stale() {
        let mut settings = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
        settings.fleet.redis_url =
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
        // The horizon (a third of the lease, 3 s) is short of the window: once the account's
        // one start is booked, the next is only told (NotYet).
        settings.fleet.lease = Duration::from_secs(9);
        let metrics = Arc::new(Metrics::new());
        let name = format!("tw-unit-{}", uuid::Uuid::new_v4().simple());
        let fleet = Fleet::new(
            &settings.fleet,
            &name,
            Duration::from_secs(60),
            metrics.clone(),
        )
        .unwrap();
        // One start per 4 s.
        let account = Account::new(
            "acc-1",
            1,
            Duration::from_secs(4),
            Duration::from_secs(5),
            4,
            Duration::from_secs(1),
            AccountMetrics::of(&metrics, "acc-1"),
        );
        // Set aside rather than waited for when the start is not bookable yet.
        let start = FleetStart {
            fleet: &fleet,
            id: "c1",
            account: &account,
            limit: None,
            aside: true,
        };
        let shutdown = Shutdown::new();

        // Stale: the account's one start, booked a second ago. Kept, the budget would be
        // spent and the command set aside; given back, it is booked again at once.
        let answer = fleet
            .reserve(&account.start_request(None), "c1")
            .await
            .unwrap();
        assert!(matches!(answer, Reservation::Booked { .. }), "{answer:?}");
        let a_second_ago = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        let stale = FirstStart {
            asked_at: a_second_ago,
            answered_at: a_second_ago,
            answer,
        };
        let waited =
            tokio::time::timeout(Duration::from_secs(2), start.wait(Some(stale), &shutdown))
                .await
                .expect("a start within the window");
        assert!(matches!(waited, Ok(Ok(()))), "{waited:?}");

        // Fresh: used as the answer, nothing asked of Redis.
        let asked = reserves(&metrics);
        let fresh = FirstStart {
            asked_at: Instant::now(),
            answered_at: Instant::now(),
            answer: Reservation::NotYet {
                delay: Duration::from_millis(3500),
            },
        };
        let waited = start.wait(Some(fresh), &shutdown).await;
        assert!(matches!(waited, Err(Unstarted::Aside)), "{waited:?}");
        assert_eq!(
            reserves(&metrics),
            asked,
            "a fresh first start stands for the question"
        );
    }
}
