//! Retiring a lane: its account queue is deleted only when it provably holds nothing, and the
//! lane goes off only after (docs/fairness.md, "Retiring an account queue").

use std::sync::atomic::Ordering;

use super::publish::Unpublished;
use super::reader::LaneReader;
use super::task::{LaneTask, MARKER_TRIES, MARKER_WAIT};
use super::{Lane, SourceLanes};
use crate::broker::account_queue;

impl SourceLanes {
    /// Retires the lane once its account queue provably holds nothing: returns whether the
    /// queue was deleted. In order:
    ///
    /// 1. nothing waits to be set aside or published, nothing taken back is unsettled, the
    ///    reader holds nothing it received (a message returned late by a former holder, say),
    ///    the account is no longer congested, and this replica still holds the source;
    /// 2. a marker is published into the queue, confirmed, and read back by this holder's
    ///    own reader, the queue's single active consumer: everything published before it
    ///    (by this holder or an earlier one) has been handed out, and what was handed to
    ///    this reader is settled (a command returned goes back in first and is read again);
    /// 3. the broker's second look: no ready message and exactly one consumer, this reader
    ///    (a former holder's consumer that still holds messages counts; a count query that
    ///    timed out answers none and is refused), then the queue is deleted;
    /// 4. the lane goes off, unless a command was set aside meanwhile: then the queue is
    ///    declared again and the lane stays on.
    ///
    /// While it runs, the lane's task publishes nothing, so this holder (the only publisher
    /// while it holds the source) adds nothing behind the marker.
    pub(super) async fn retire(&self, task: &mut LaneTask) -> bool {
        let lane = &task.lane;
        if !self.idle(lane) || task.reader.as_ref().is_none_or(LaneReader::is_finished) {
            return false;
        }
        let id = match &task.marker {
            Some(id) => id.clone(),
            None => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                match self.publish_marker(lane, &id).await {
                    Ok(()) => task.marker = Some(id.clone()),
                    Err(Unpublished::Missing) => {
                        self.missing(lane).await;
                        task.declared = false;
                        return false;
                    }
                    Err(Unpublished::Failed) => return false,
                }
                id
            }
        };
        let mut seen = lane.last_marker.subscribe();
        let back = tokio::time::timeout(MARKER_WAIT, async {
            seen.wait_for(|last| last.as_deref() == Some(id.as_str()))
                .await
                .is_ok()
        })
        .await;
        if back != Ok(true) {
            // Behind a backlog this holder does not know of, say: waited for again later, and
            // after a while given up for a fresh one (read by someone else, it never comes).
            task.marker_waits = task.marker_waits.saturating_add(1);
            if task.marker_waits >= MARKER_TRIES {
                task.marker = None;
                task.marker_waits = 0;
            }
            return false;
        }
        task.marker_waits = 0;
        task.marker = None;
        // Looked at again right before the delete: a replica that froze meanwhile past its
        // holds' deadline deletes nothing.
        if !self.idle(lane) {
            return false;
        }
        // On the source's own connection, which carries its hold (the broker's, without
        // Redis): should the broker have let that go (the token is someone else's now), the
        // delete cannot happen, however late this replica learns of it.
        let gone = account_queue::delete_if_alone(
            &self.source.connection,
            &self.source.amqp,
            &lane.queue(),
        )
        .await;
        match gone {
            Ok(None) => {}
            Ok(Some(counts)) => {
                tracing::debug!(queue = %lane.queue(), ?counts, "account queue not alone yet; kept");
                return false;
            }
            Err(e) => {
                tracing::debug!(queue = %lane.queue(), error = %e, "could not look at an account queue; kept");
                return false;
            }
        }
        lane.in_queue.store(0, Ordering::Relaxed);
        // Deleted: off the list, and the next queue of the lane gets a name of its own.
        let deleted = lane.queue();
        self.renew(lane);
        self.unregister(lane, &deleted).await;
        if let Some(r) = task.reader.take() {
            // The broker cancelled the consumer with the queue; nothing it took is unsettled.
            r.stop(lane).await.close("lane retired").await;
        }
        let mut state = lane.state();
        if state.queued > 0 {
            // Set aside while the queue went: declared again, and the lane stays on.
            return true;
        }
        state.on = false;
        // Everything set aside has settled: the counts start afresh.
        state.unknown = false;
        state.marks.iter_mut().for_each(|m| *m = 0);
        drop(state);
        lane.account.lane_head(&deleted, None);
        tracing::info!(account = %lane.account.id, queue = %deleted, "account backlog drained; its commands are taken in directly again");
        true
    }

    /// The account queue went behind this holder's back (an operator deleted it, say): what
    /// it held is gone with it, and the lane declares it again before it publishes anything.
    pub(super) async fn missing(&self, lane: &Lane) {
        let gone = lane.queue();
        self.renew(lane);
        self.unregister(lane, &gone).await;
        let known = lane.in_queue.swap(0, Ordering::Relaxed);
        lane.account
            .aside_changed(-isize::try_from(known).unwrap_or(isize::MAX));
        tracing::warn!(
            account = %lane.account.id,
            queue = %gone,
            lost = known,
            "account queue deleted behind this worker's back; what is set aside next goes to a new one"
        );
    }

    /// Whether the lane has nothing in hand and its source is still held here.
    pub(super) fn idle(&self, lane: &Lane) -> bool {
        let state = lane.state();
        state.queued == 0
            && lane.in_queue.load(Ordering::Relaxed) == 0
            && lane.taken.load(Ordering::Relaxed) == 0
            && !lane.holding.load(Ordering::Relaxed)
            && !lane.account.congested()
            && !self.stop.is_cancelled()
            && self.source.connection.status().connected()
            && self.source.held()
    }
}
