//! An account's rate budget (docs/contract.md §4, §9): where a command's starts come from,
//! where a 429's pause goes, and the last gate a call passes on its way out. It has two
//! implementations, and `app.rs` chooses one for the process: [`OwnBudget`], kept in this
//! process, for a worker alone; [`SharedBudget`], kept in the fleet's Redis, for replicas that
//! share the vendor's limit. Nothing else in the API client asks which one it has.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use super::account::Account;
use super::departure::Departure;
use super::pacer::DeadlineFirst;
use super::start::{FirstStart, Unstarted};
use crate::fleet::StartRequest;
use crate::shutdown::{Abandoned, Shutdown};

mod own;
mod shared;

pub use own::OwnBudget;
pub use shared::SharedBudget;

/// What a command asks of its account's budget for one start.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The command's id: what a booking is made under.
    pub id: &'a str,
    pub account: &'a Account,
    /// The deadline, or the aside limit if sooner: a start later than this is not waited for.
    pub limit: Option<Instant>,
    /// A start not bookable yet ends the wait: the command may be set aside.
    pub aside: bool,
}

/// The start a command got: `Ok` once it may call, `Err` when the limit comes first.
pub type Started = Result<Result<(), DeadlineFirst>, Unstarted>;

/// An account's rate budget. See the module's documentation.
pub trait RateBudget: Debug + Send + Sync {
    /// Waits for the next start `ask` may have. `first`, a start asked along with the
    /// command's fleet claim, stands for the first question if it is fresh.
    fn start<'a>(
        &'a self,
        ask: Ask<'a>,
        first: Option<FirstStart>,
        shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, Started>;

    /// Gives back a start asked with the claim that the command did not use.
    fn give_back(&self, first: FirstStart) -> BoxFuture<'_, ()>;

    /// Holds the account's later calls for `for_` (until `until` here), after a 429.
    fn pause<'a>(
        &'a self,
        account: &'a Account,
        until: Instant,
        for_: Duration,
    ) -> BoxFuture<'a, ()>;

    /// Waits until a call of `account` may leave; `None` when `until` (the deadline)
    /// comes first.
    fn depart<'a>(
        &'a self,
        account: &'a Account,
        until: Option<Instant>,
        shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, Result<Option<Departure<'a>>, Abandoned>>;

    /// When the breaker's probe of `account` may go, if within `within`.
    fn probe_start<'a>(
        &'a self,
        account: &'a Account,
        within: Duration,
    ) -> BoxFuture<'a, Option<Instant>>;

    /// What a command's fleet claim may ask for along with it: its first start, booked in the
    /// same round trip. `None` where starts are not shared (nothing to ride on), or when the
    /// `limit` has passed.
    fn first_start_request(
        &self,
        account: &Account,
        limit: Option<Instant>,
    ) -> Option<StartRequest>;
}
