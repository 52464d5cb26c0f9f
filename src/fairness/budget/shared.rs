//! The rate budget of a fleet: each account's sliding log, pause and arrivals in Redis, shared
//! by every replica (docs/fleet.md). A start can ride on the command's fleet claim: one round
//! trip for both ([`RateBudget::first_start_request`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{Ask, RateBudget, Started};
use crate::fairness::account::Account;
use crate::fairness::departure::{self, Departure};
use crate::fairness::start::{FirstStart, FleetStart};
use crate::fleet::{Fleet, Reservation, StartRequest};
use crate::shutdown::{Abandoned, Shutdown};

/// Budgets kept in the fleet's Redis.
#[derive(Debug, Clone)]
pub struct SharedBudget {
    fleet: Arc<Fleet>,
}

impl SharedBudget {
    /// The budgets of `fleet`.
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Self { fleet }
    }
}

impl RateBudget for SharedBudget {
    fn start<'a>(
        &'a self,
        ask: Ask<'a>,
        first: Option<FirstStart>,
        shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, Started> {
        async move {
            let start = FleetStart {
                fleet: &self.fleet,
                id: ask.id,
                account: ask.account,
                limit: ask.limit,
                aside: ask.aside,
            };
            start.wait(first, shutdown).await
        }
        .boxed()
    }

    fn give_back(&self, first: FirstStart) -> BoxFuture<'_, ()> {
        first.give_back(&self.fleet).boxed()
    }

    /// Held in this process at once, and fleet-wide as soon as Redis answers.
    fn pause<'a>(
        &'a self,
        account: &'a Account,
        until: Instant,
        for_: Duration,
    ) -> BoxFuture<'a, ()> {
        account.pacer.pause_until(until);
        async move {
            if let Err(e) = self.fleet.pause(&account.id, for_).await {
                tracing::warn!(error = %e, "could not share the pause with the fleet");
            }
        }
        .boxed()
    }

    fn depart<'a>(
        &'a self,
        account: &'a Account,
        until: Option<Instant>,
        shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, Result<Option<Departure<'a>>, Abandoned>> {
        departure::in_fleet(&self.fleet, account, until, shutdown).boxed()
    }

    fn probe_start<'a>(
        &'a self,
        account: &'a Account,
        within: Duration,
    ) -> BoxFuture<'a, Option<Instant>> {
        async move {
            let asked = Instant::now();
            let probe_id = format!("probe-{}", uuid::Uuid::new_v4().simple());
            let request = account.start_request(Some(within));
            match self.fleet.reserve(&request, &probe_id).await {
                Ok(Reservation::Booked { delay, .. }) => asked.checked_add(delay),
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "no start for the breaker's probe");
                    None
                }
            }
        }
        .boxed()
    }

    fn first_start_request(
        &self,
        account: &Account,
        limit: Option<Instant>,
    ) -> Option<StartRequest> {
        let now = Instant::now();
        let deadline_in = match limit {
            Some(limit) if limit <= now => return None,
            limit => limit.map(|l| l.saturating_duration_since(now)),
        };
        Some(account.start_request(deadline_in))
    }
}
