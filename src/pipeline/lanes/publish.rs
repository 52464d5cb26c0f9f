//! Setting commands aside: publishing them to the account queue, each stamped with the
//! instant it started waiting, and acking each on its source once the broker confirmed it.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;

use super::{Lane, SourceLanes};
use crate::broker::{PublishError, timed};
use crate::pipeline::Job;

/// Header carrying since when a command set aside has waited (ms since the Unix epoch).
pub const WAITING_SINCE: &str = "x-transfer-waiting-since";

/// Header of a lane's marker: a message with no body that a holder publishes into its account
/// queue and reads back before it deletes the queue (see `SourceLanes::retire`).
pub const MARKER: &str = "x-transfer-lane-marker";

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
        let mut sessions = HashSet::new();
        let (batch, later): (Vec<Numbered>, Vec<Numbered>) = std::mem::take(pending)
            .into_iter()
            .enumerate()
            .partition(|(_, job)| sessions.insert(job.parsed.session_key()));
        #[cfg(feature = "fault-injection")]
        if batch.iter().any(|(_, job)| {
            (job.parsed.command.as_ref()).is_ok_and(|c| c.command.org_id == FAULT_SLOW_ASIDE_ORG_ID)
        }) {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let publisher = &self.source.publisher;
        // Counted in before the publishes, so that the reader, which may take one back before
        // its confirm is in, never finds the count lower than what the queue holds.
        lane.in_queue.fetch_add(batch.len(), Ordering::Relaxed);
        let queue = lane.queue();
        let results = futures_util::future::join_all(batch.iter().map(|(_, job)| {
            publisher.publish_to_queue(&queue, &job.delivery.data, aside_properties(job))
        }))
        .await;
        let mut failed = Vec::new();
        let mut missing = false;
        let mut published = 0usize;
        for ((i, job), result) in batch.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    published = published.saturating_add(1);
                    let ack = job.delivery.acker.ack(BasicAckOptions::default());
                    if let Err(e) =
                        timed("basic.ack", self.source.amqp.operation_timeout, ack).await
                    {
                        // In both queues at worst: the copy is answered from memory.
                        tracing::warn!(error = %e, "could not ack a command set aside");
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

    /// Publishes marker `id` into the lane's account queue, confirmed.
    pub(super) async fn publish_marker(&self, lane: &Lane, id: &str) -> Result<(), Unpublished> {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(MARKER.into(), AMQPValue::LongString(id.into()));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        match self
            .source
            .publisher
            .publish_to_queue(&lane.queue(), b"", props)
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

/// The id of a lane's marker, if the message is one.
pub(super) fn marker_of(props: &BasicProperties) -> Option<String> {
    match props.headers().as_ref()?.inner().get(MARKER)? {
        AMQPValue::LongString(id) => Some(id.to_string()),
        _ => None,
    }
}

/// A command's properties for its account queue: as received, with the instant it started
/// waiting.
fn aside_properties(job: &Job) -> BasicProperties {
    let props = job.delivery.properties.clone();
    if waiting_since(&props).is_some() {
        return props;
    }
    let mut headers = props.headers().clone().unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    headers.insert(WAITING_SINCE.into(), AMQPValue::LongLongInt(now));
    props.with_headers(headers)
}

/// Since when a command set aside has waited, from its header; any value that is not a
/// plausible instant is none.
pub fn waiting_since(props: &BasicProperties) -> Option<SystemTime> {
    let headers = props.headers().as_ref()?;
    let ms = match headers.inner().get(WAITING_SINCE)? {
        AMQPValue::LongLongInt(ms) => u64::try_from(*ms).ok()?,
        AMQPValue::LongUInt(ms) => u64::from(*ms),
        AMQPValue::LongInt(ms) => u64::try_from(*ms).ok()?,
        _ => return None,
    };
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use lapin::types::FieldTable;

    use super::*;

    mod props {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Whatever a message carries in the header, reading it never panics, and a
            /// value that is a plausible instant reads back.
            #[test]
            fn any_waiting_since_header(value in prop_oneof![
                any::<i64>().prop_map(AMQPValue::LongLongInt),
                any::<i32>().prop_map(AMQPValue::LongInt),
                any::<u32>().prop_map(AMQPValue::LongUInt),
                ".*".prop_map(|s| AMQPValue::LongString(s.into())),
            ]) {
                let mut headers = FieldTable::default();
                headers.insert(WAITING_SINCE.into(), value.clone());
                let props = BasicProperties::default().with_headers(headers);
                let read = waiting_since(&props);
                if let AMQPValue::LongLongInt(ms) = value
                    && (0..=4_102_444_800_000).contains(&ms)
                {
                    prop_assert_eq!(
                        read,
                        Some(SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap()))
                    );
                }
            }
        }
    }
}
