//! A delivery once read: what the pipeline carries from the consumer to its outcome, and where
//! it came from, which says what may become of it.

use std::sync::Arc;

use super::decision::Parsed;
use super::lanes::{SourceLanes, Taken};
use crate::broker::consumer::InFlight;
use crate::broker::{Delivery, Publisher};
use crate::fairness::account::{Slot, Waiting};

/// A delivery, read, waiting for or in its session's turn.
pub(super) struct Job {
    pub(super) delivery: Delivery,
    pub(super) parsed: Parsed,
    pub(super) publisher: Arc<Publisher>,
    /// Released with the job, after its ack or return.
    pub(super) _in_flight: InFlight,
    /// Taken in directly, waiting for one of its account's slots.
    pub(super) waiting: Option<Waiting>,
    /// One of its account's slots, once it has it.
    pub(super) slot: Option<Slot>,
    /// Where it came from, which says what may become of it.
    pub(super) origin: Origin,
    /// It counts as a command in flight here (at a fleet's intake, only one that ends there).
    pub(super) counted: bool,
}

/// Where a job came from.
pub(super) enum Origin {
    /// Its source, with no lane to pass: a fleet's intake, or a command that is not one.
    Source,
    /// Its source, taken in past its account's lane, by `lanes`: it may still be set aside
    /// there, unless it `runs_here` (its lane would not take it: a later command of its
    /// session was set aside already).
    TakenIn {
        lanes: Arc<SourceLanes>,
        runs_here: bool,
    },
    /// Taken back from its account's queue.
    Lane(Taken),
}

impl Job {
    /// Whether it came from its source, so that its session's later commands stay behind it
    /// in memory (see `SessionQueues::push_marked`).
    pub(super) fn pinned(&self) -> bool {
        !matches!(self.origin, Origin::Lane(_))
    }

    /// The lanes it may still be set aside by.
    pub(super) fn may_go_aside(&self) -> Option<&Arc<SourceLanes>> {
        match &self.origin {
            Origin::TakenIn {
                lanes,
                runs_here: false,
            } => Some(lanes),
            _ => None,
        }
    }

    /// Whether its delivery is still this replica's: its channel and its source's connection
    /// are open. Once either closed, the broker has handed the command, or may hand it, to the
    /// queue's next consumer (a later tenure of its source, here or elsewhere).
    pub(super) fn ours(&self) -> bool {
        self.publisher.is_connected() && self.delivery.settleable()
    }

    /// It goes back to the queue it came from, nothing done: its account queue, if it was
    /// taken from one, counts it in again.
    pub(super) fn returned(&mut self) {
        if let Origin::Lane(taken) = &mut self.origin {
            taken.returned();
        }
    }
}
