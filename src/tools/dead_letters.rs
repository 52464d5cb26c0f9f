//! `transfer-worker dead-letters list | replay | purge` (docs/contract.md §11): the dead-letter
//! queue (`amqp.dead_letter_queue`), inspected, replayed to the commands queue, or emptied.
//!
//! Reading never consumes. Messages are taken with `basic.get` without auto-ack on a channel
//! of their own, at most as many as the queue held when the command started (so a message
//! returned or newly dead-lettered meanwhile is never read twice), and every one not acked
//! returns to the queue when that channel closes. A replayed message is acked — removed — only
//! after the broker confirmed its copy on the commands queue: a failure leaves it where it was.
//! The dead-letter queue has no delivery limit, so returning a message costs it nothing.

pub mod letter;
mod link;
mod list;
mod purge;
mod replay;

use crate::broker::BrokerError;

pub use list::{Listing, list};
pub use purge::purge;
pub use replay::{Replayed, Selection, replay};

/// Why a `dead-letters` command did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The queue is not on the broker.
    #[error("queue {0} does not exist: start the worker once (it declares the topology)")]
    NoQueue(String),
    /// `purge` without `--yes`.
    #[error("purge removes every message of {0} for good; run it again with --yes to do it")]
    PurgeNotConfirmed(String),
    /// `replay` ended with work undone; the report says what.
    #[error("{0}")]
    Incomplete(String),
}
