//! The rate budget of a worker alone: the account's pacer and arrivals, in this process.

use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{Ask, RateBudget, Started};
use crate::fairness::account::Account;
use crate::fairness::departure::{self, Departure};
use crate::fairness::start::{self, FirstStart};
use crate::fleet::StartRequest;
use crate::shutdown::{Abandoned, Shutdown};

/// Budgets kept in this process: each account's own pacer and arrivals.
#[derive(Debug, Default, Clone, Copy)]
pub struct OwnBudget;

impl RateBudget for OwnBudget {
    fn start<'a>(
        &'a self,
        ask: Ask<'a>,
        _first: Option<FirstStart>,
        shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, Started> {
        start::from_own_pacer(ask.account, ask.limit, shutdown).boxed()
    }

    fn give_back(&self, _first: FirstStart) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }

    fn pause<'a>(
        &'a self,
        account: &'a Account,
        until: Instant,
        _for: Duration,
    ) -> BoxFuture<'a, ()> {
        account.pacer.pause_until(until);
        async {}.boxed()
    }

    fn depart<'a>(
        &'a self,
        account: &'a Account,
        until: Option<Instant>,
        shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, Result<Option<Departure<'a>>, Abandoned>> {
        departure::through_own_arrivals(account, until, shutdown).boxed()
    }

    fn probe_start<'a>(
        &'a self,
        account: &'a Account,
        within: Duration,
    ) -> BoxFuture<'a, Option<Instant>> {
        let start = Instant::now().checked_add(within);
        let start = account.pacer.reserve(start).ok();
        async move { start }.boxed()
    }

    fn first_start_request(
        &self,
        _account: &Account,
        _limit: Option<Instant>,
    ) -> Option<StartRequest> {
        None
    }
}
