//! How the worker stops (docs/contract.md §6), passed to every task that must react: first
//! *stop* (take no new commands, finish those in flight), then, when `shutdown.grace` runs out,
//! *abandon* (give up waiting for pacing, backoff or a slot: the command goes back to the
//! queue). Every wait that shutdown may cut short is one of [`Shutdown::sleep`],
//! [`Shutdown::sleep_until`] or a `select!` on [`Shutdown::abandoned`].

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The grace ran out while waiting: whatever waited goes back to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shutdown grace ran out")]
pub struct Abandoned;

/// The two steps of stopping, shared by every task of one worker.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    abandon: CancellationToken,
}

impl Shutdown {
    /// A worker that is running.
    pub fn new() -> Self {
        Self::default()
    }

    /// Step one: take no new commands, finish those in flight.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Step two, when the grace runs out: stop waiting. Implies [`Shutdown::stop`].
    pub fn abandon(&self) {
        self.stop.cancel();
        self.abandon.cancel();
    }

    /// Whether stopping has begun.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Whether waiting has been given up.
    pub fn is_abandoned(&self) -> bool {
        self.abandon.is_cancelled()
    }

    /// Resolves when stopping begins.
    pub async fn cancelled(&self) {
        self.stop.cancelled().await;
    }

    /// Resolves when waiting is given up.
    pub async fn abandoned(&self) {
        self.abandon.cancelled().await;
    }

    /// The stop signal as a token, for a task that is stopped on its own as well (a
    /// partition's reader is a child of it).
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Waits `duration`, unless waiting is given up first.
    pub async fn sleep(&self, duration: Duration) -> Result<(), Abandoned> {
        match Instant::now().checked_add(duration) {
            Some(at) => self.sleep_until(at).await,
            // Further than any clock reaches: only the shutdown ends it.
            None => {
                self.abandoned().await;
                Err(Abandoned)
            }
        }
    }

    /// Waits until `at`, unless waiting is given up first; given up already, it does not
    /// wait at all, even for an instant already past.
    pub async fn sleep_until(&self, at: Instant) -> Result<(), Abandoned> {
        if self.is_abandoned() {
            return Err(Abandoned);
        }
        if at <= Instant::now() {
            return Ok(());
        }
        tokio::select! {
            biased;
            () = self.abandon.cancelled() => Err(Abandoned),
            () = tokio::time::sleep_until(at.into()) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_sleep_ends_at_its_time_unless_abandoned() {
        let shutdown = Shutdown::new();
        let start = tokio::time::Instant::now();
        assert_eq!(shutdown.sleep(Duration::from_secs(5)).await, Ok(()));
        // The deadline is a clock reading, a few real microseconds from the paused clock's.
        let slept = start.elapsed();
        assert!(
            slept >= Duration::from_millis(4_990) && slept < Duration::from_millis(5_100),
            "{slept:?}"
        );

        let waiting = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.sleep(Duration::from_secs(3600)).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.stop();
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "stopping alone does not cut a wait short"
        );
        shutdown.abandon();
        assert_eq!(waiting.await.unwrap(), Err(Abandoned));
        assert!(shutdown.is_stopping());
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_it_does_not_wait_even_for_a_past_instant() {
        let shutdown = Shutdown::new();
        shutdown.abandon();
        assert_eq!(shutdown.sleep_until(Instant::now()).await, Err(Abandoned));
        assert_eq!(shutdown.sleep(Duration::MAX).await, Err(Abandoned));
    }
}
