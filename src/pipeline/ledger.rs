//! The ledger of outcomes a command is judged against before and after it runs: whose it is
//! (claim it, keep the claim, release it) and how it ended (record it). `app.rs` chooses one
//! for the process: [`Unshared`] for a worker alone, whose in-memory outcomes
//! ([`super::outcomes::Outcomes`]) are the whole ledger; [`SharedLedger`], the fleet's
//! claims and outcomes in Redis, for replicas that may each be handed the same command.

use std::convert::Infallible;
use std::fmt::Debug;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::contract::event::Event;
use crate::fairness::start::FirstStart;
use crate::fleet::StartRequest;
use crate::shutdown::{Abandoned, Shutdown};

mod shared;

pub use shared::SharedLedger;

/// Whether the holds a command began under are still this replica's: asked right before each
/// call leaves.
pub type Holds<'a> = Box<dyn Fn() -> bool + Send + Sync + 'a>;

/// A claim's end.
#[derive(Debug)]
pub enum Claimed {
    /// Completed somewhere in the fleet already: its recorded event.
    Done(Event),
    /// Ours, with the first start asked with it, if one was.
    Ours(Option<FirstStart>),
}

/// The ledger. See the module's documentation.
pub trait Ledger: Debug + Send + Sync {
    /// Claims `command_id` for this replica before anything is done for it, and with the
    /// claim asks for `start`, the command's first start, where that saves a round trip.
    /// Waits while another live replica holds it. A `replayed` command is answered by a
    /// recorded outcome only if that outcome is a completion. `Err` once the shutdown's grace
    /// has run out.
    fn claim<'a>(
        &'a self,
        command_id: &'a str,
        replayed: bool,
        start: Option<StartRequest>,
        shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, Result<Claimed, Abandoned>>;

    /// Keeps the claim for as long as it is polled; never ends.
    fn keep<'a>(&'a self, command_id: &'a str) -> BoxFuture<'a, Infallible>;

    /// Gives the claim up: the command ended unfinished here.
    fn release<'a>(&'a self, command_id: &'a str) -> BoxFuture<'a, ()>;

    /// Records the outcome before it is published, so no replica can miss it once it is out.
    fn record<'a>(
        &'a self,
        command_id: &'a str,
        event: &'a Event,
        shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, ()>;

    /// The holds this replica has now, as a question asked before each call: still held?
    fn holds(&self) -> Holds<'_>;
}

/// A worker alone: nobody else is handed its commands, so every claim is its own at once, and
/// its outcomes are remembered in memory only.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unshared;

impl Ledger for Unshared {
    fn claim<'a>(
        &'a self,
        _command_id: &'a str,
        _replayed: bool,
        _start: Option<StartRequest>,
        _shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, Result<Claimed, Abandoned>> {
        std::future::ready(Ok(Claimed::Ours(None))).boxed()
    }

    fn keep<'a>(&'a self, _command_id: &'a str) -> BoxFuture<'a, Infallible> {
        std::future::pending().boxed()
    }

    fn release<'a>(&'a self, _command_id: &'a str) -> BoxFuture<'a, ()> {
        std::future::ready(()).boxed()
    }

    fn record<'a>(
        &'a self,
        _command_id: &'a str,
        _event: &'a Event,
        _shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, ()> {
        std::future::ready(()).boxed()
    }

    fn holds(&self) -> Holds<'_> {
        Box::new(|| true)
    }
}
