//! What carrying out a command came to: an [`Outcome`] (the API answered, or the command
//! failed or expired), or why it is [`Unfinished`] (it goes back to its queue).

use std::time::{Duration, SystemTime};

use super::client::{ApiError, ApiResponse};
use crate::shutdown::Abandoned;

/// Why an execution ended without an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfinished {
    /// The worker is shutting down: the command goes back to the queue.
    Abandoned,
    /// It stopped being this replica's before its call left: its delivery went back with a
    /// lost connection, or the fleet's holds it ran under lapsed (a pause past
    /// `fleet.member_ttl`, a lost hold). Nothing was called; the queue's holder runs it
    /// (docs/contract.md §9).
    NotHeld,
}

impl From<Abandoned> for Unfinished {
    fn from(_: Abandoned) -> Self {
        Self::Abandoned
    }
}

/// How a transfer ended.
#[derive(Debug)]
pub enum Outcome {
    /// The API answered 2xx.
    Succeeded {
        /// Calls made, this one included.
        attempts: u32,
        /// The answer.
        response: ApiResponse,
        /// From the start of the execution to the answer.
        elapsed: Duration,
    },
    /// A permanent error, or a transient one when the budget or the time ran out.
    Failed {
        /// Calls made.
        attempts: u32,
        /// The last error.
        error: ApiError,
        /// Whether trying again later could succeed.
        retryable: bool,
    },
    /// The deadline passed before the API was called.
    Expired {
        /// Calls made: none reached the API.
        attempts: u32,
        /// The command's deadline.
        deadline: SystemTime,
    },
}
