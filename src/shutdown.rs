//! The signals that stop the worker, passed to every task that must react to them.

use tokio_util::sync::CancellationToken;

/// Signals that stop the worker.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop taking commands and finish those in flight.
    pub stop: CancellationToken,
    /// Give up waiting (pacing, backoff): the command goes back to the queue. Cancelled when
    /// `shutdown.grace` runs out.
    pub abandon: CancellationToken,
}
