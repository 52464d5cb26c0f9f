//! Setting commands aside: publishing them to the account queue, each stamped with the
//! instant it started waiting, and acking each on its source once the broker confirmed it.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use super::{Lane, SourceLanes};
use crate::broker::PublishError;
use crate::pipeline::Job;

/// With the `fault-injection` feature, a batch of set-aside commands with one of this `orgId`
/// waits 2 s before it is published, so that a test can change the account queue under a
/// publish that is under way.
#[cfg(feature = "fault-injection")]
pub const FAULT_SLOW_ASIDE_ORG_ID: &str = "o-fault-injection-slow-aside";

/// Why publishing set-aside commands did not succeed for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unpublished {
    /// Something failed: try again after a pause.
    Failed,
    /// The broker routed a publish nowhere: the account queue is gone (deleted behind the
    /// holder's back); declare it again before anything else.
    Missing,
}

/// A job with its place in the order it was set aside.
type Numbered = (usize, Job);

impl SourceLanes {
    /// Publishes pending commands to the account queue, at most one per session at a time (so
    /// a failed publish cannot be overtaken by a later command of its session), and acks each
    /// on its source once confirmed. Keeps what failed, in order.
    pub(super) async fn publish(
        &self,
        lane: &Lane,
        pending: &mut Vec<Job>,
    ) -> Result<(), Unpublished> {
        if !self.source.held() {
            // The holds lapsed (a freeze, Redis away): nothing is set aside on the source's
            // behalf until they are kept again; the deliveries stay unacked meanwhile.
            return Err(Unpublished::Failed);
        }
        self.drop_returned(lane, pending);
        let mut sessions = HashSet::new();
        let (batch, later): (Vec<Numbered>, Vec<Numbered>) = std::mem::take(pending)
            .into_iter()
            .enumerate()
            .partition(|(_, job)| sessions.insert(job.parsed.session_key()));
        #[cfg(feature = "fault-injection")]
        if batch.iter().any(|(_, job)| {
            (job.parsed.command.as_ref()).is_ok_and(|c| c.command.org_id == FAULT_SLOW_ASIDE_ORG_ID)
        }) {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
        let publisher = &self.source.publisher;
        // Counted in before the publishes, so that the reader, which may take one back before
        // its confirm is in, never finds the count lower than what the queue holds.
        lane.in_queue.fetch_add(batch.len(), Ordering::Relaxed);
        let queue = lane.queue();
        let results = futures_util::future::join_all(
            batch
                .iter()
                .map(|(_, job)| publisher.set_aside(&queue, &job.delivery)),
        )
        .await;
        let mut failed = Vec::new();
        let mut missing = false;
        let mut published = 0usize;
        for ((i, job), result) in batch.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    published = published.saturating_add(1);
                    match job.delivery.ack().await {
                        Ok(true) => {}
                        // In both queues at worst: the copy is answered from memory.
                        Ok(false) => tracing::warn!(
                            "a command set aside went back to its source meanwhile (its channel closed); it is in both queues, and the later copy is answered from memory"
                        ),
                        Err(e) => tracing::warn!(error = %e, "could not ack a command set aside"),
                    }
                    if let Some(pipeline) = self.pipeline.upgrade() {
                        pipeline.leaves(&job);
                    }
                }
                Err(e) => {
                    let _ = lane
                        .in_queue
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            Some(n.saturating_sub(1))
                        });
                    missing |= matches!(e, PublishError::Unroutable(_));
                    tracing::warn!(queue = %lane.queue(), error = %e, "could not set a command aside; trying again");
                    failed.push((i, job));
                }
            }
        }
        {
            let mut state = lane.state();
            state.queued = state.queued.saturating_sub(published);
        }
        let outcome = match (failed.is_empty(), missing) {
            (true, _) => Ok(()),
            (false, true) => Err(Unpublished::Missing),
            (false, false) => Err(Unpublished::Failed),
        };
        let mut rest: Vec<Numbered> = failed.into_iter().chain(later).collect();
        rest.sort_by_key(|(i, _)| *i);
        *pending = rest.into_iter().map(|(_, job)| job).collect();
        outcome
    }

    /// Lets go of the pending jobs whose delivery went back already (their channel closed
    /// while they waited to be published): a copy in the account queue would be a second.
    fn drop_returned(&self, lane: &Lane, pending: &mut Vec<Job>) {
        let (gone, kept): (Vec<Job>, Vec<Job>) = std::mem::take(pending)
            .into_iter()
            .partition(|job| !job.ours());
        *pending = kept;
        if gone.is_empty() {
            return;
        }
        lane.account
            .aside_changed(-isize::try_from(gone.len()).unwrap_or(isize::MAX));
        let mut state = lane.state();
        state.queued = state.queued.saturating_sub(gone.len());
        for job in &gone {
            if let Some(mark) = state
                .marks
                .get_mut(super::bucket(&job.parsed.session_key()))
            {
                *mark = mark.saturating_sub(1);
            }
        }
        drop(state);
        for job in gone {
            self.forget(job);
        }
    }

    /// Publishes marker `id` into the lane's account queue, confirmed.
    pub(super) async fn publish_marker(&self, lane: &Lane, id: &str) -> Result<(), Unpublished> {
        match self
            .source
            .publisher
            .publish_marker(&lane.queue(), id)
            .await
        {
            Ok(()) => Ok(()),
            Err(PublishError::Unroutable(_)) => Err(Unpublished::Missing),
            Err(e) => {
                tracing::debug!(queue = %lane.queue(), error = %e, "could not publish a lane marker");
                Err(Unpublished::Failed)
            }
        }
    }
}
