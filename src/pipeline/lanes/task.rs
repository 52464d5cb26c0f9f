//! One lane's task: publishes what is set aside to the account queue, keeps a reader on that
//! queue, and deletes the queue once it has stayed empty for a while. When the source is let
//! go, whatever it did not publish goes back to the source.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use super::publish::Unpublished;
use super::reader::LaneReader;
use super::{Lane, SourceLanes};
use crate::backoff::{self, Delays};
use crate::broker::{account_queue, timed};
use crate::pipeline::Job;

/// Time the broker gets to apply the last acks before a channel closes.
const ACK_SETTLE: Duration = Duration::from_millis(250);

/// Most commands published to an account queue before their confirms are awaited.
const BATCH: usize = 256;

/// An account queue found empty, with nothing taken from it unsettled, for this long is
/// deleted and the lane goes off.
const LINGER: Duration = Duration::from_secs(2);

/// How long a retiring lane waits for its marker to come back before it looks again later.
const MARKER_WAIT: Duration = Duration::from_secs(5);

/// After this many waits in vain a lane's marker is given up for a fresh one.
const MARKER_TRIES: u32 = 12;

/// Waits between failed attempts, growing; started afresh after a success.
fn retry_delays() -> Delays {
    backoff::delays(Duration::from_millis(200), Duration::from_secs(5), None)
}

/// What a lane's task does after a step.
enum Next {
    /// Goes on to the next step.
    On,
    /// Starts its round again.
    Again,
    /// Ends: its inbox closed, or the broker connection is gone.
    Stop,
}

/// A lane's task while it runs: what it carries from one step to the next.
struct LaneTask {
    lanes: Arc<SourceLanes>,
    lane: Arc<Lane>,
    /// Commands to set aside.
    inbox: mpsc::UnboundedReceiver<Job>,
    /// Takes the account queue's commands back, while the queue is declared.
    reader: Option<LaneReader>,
    /// Received from the inbox and not yet published, in order.
    pending: Vec<Job>,
    delays: Delays,
    /// The account queue exists, as far as this task knows.
    declared: bool,
    /// The marker published to retire the queue and not read back yet.
    marker: Option<String>,
    /// How often that marker was waited for in vain.
    marker_waits: u32,
}

impl SourceLanes {
    /// One lane's life: publishes what is set aside, consumes the account queue at the
    /// account's pace, and deletes the queue once it has stayed empty for a while.
    pub(super) async fn run_lane(
        self: Arc<Self>,
        lane: Arc<Lane>,
        inbox: mpsc::UnboundedReceiver<Job>,
        declared: bool,
    ) {
        let task = LaneTask {
            lanes: self,
            lane,
            inbox,
            reader: None,
            pending: Vec::new(),
            delays: retry_delays(),
            declared,
            marker: None,
            marker_waits: 0,
        };
        task.run().await;
    }

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
    async fn retire(&self, task: &mut LaneTask) -> bool {
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
        let gone =
            account_queue::delete_if_alone(&self.source.connection, &self.source.amqp, &lane.queue)
                .await;
        match gone {
            Ok(None) => {}
            Ok(Some(counts)) => {
                tracing::debug!(queue = %lane.queue, ?counts, "account queue not alone yet; kept");
                return false;
            }
            Err(e) => {
                tracing::debug!(queue = %lane.queue, error = %e, "could not look at an account queue; kept");
                return false;
            }
        }
        lane.in_queue.store(0, Ordering::Relaxed);
        if let Some(r) = task.reader.take() {
            // The broker cancelled the consumer with the queue; nothing it took is unsettled.
            let t = self.source.amqp.operation_timeout;
            let channel = r.stop(lane, t).await;
            let _ = timed(
                "channel.close",
                t,
                channel.close(200, "lane retired".into()),
            )
            .await;
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
        lane.account.lane_head(&lane.queue, None);
        tracing::info!(account = %lane.account.id, queue = %lane.queue, "account backlog drained; its commands are taken in directly again");
        true
    }

    /// The account queue went behind this holder's back (an operator deleted it, say): what
    /// it held is gone with it, and the lane declares it again before it publishes anything.
    fn missing(&self, lane: &Lane) {
        let known = lane.in_queue.swap(0, Ordering::Relaxed);
        lane.account
            .aside_changed(-isize::try_from(known).unwrap_or(isize::MAX));
        tracing::warn!(
            account = %lane.account.id,
            queue = %lane.queue,
            lost = known,
            "account queue deleted behind this worker's back; declaring it again"
        );
    }

    /// Whether the lane has nothing in hand and its source is still held here.
    fn idle(&self, lane: &Lane) -> bool {
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

impl LaneTask {
    async fn run(mut self) {
        // A queue that could not be looked for is declared first and read from.
        if !self.declared && self.lane.state().unknown {
            while !self.declared {
                if let Next::Stop = self.declare().await {
                    self.hand_back().await;
                    return;
                }
            }
        }
        loop {
            self.read_if_declared().await;
            if self.pending.is_empty() {
                match self.wait().await {
                    Next::On => {}
                    Next::Again => continue,
                    Next::Stop => break,
                }
            }
            self.fill_batch();
            if !self.declared {
                match self.declare().await {
                    Next::On => {}
                    Next::Again => continue,
                    Next::Stop => break,
                }
            }
            if let Next::Stop = self.publish_pending().await {
                break;
            }
        }
        self.hand_back().await;
    }

    /// Once the account queue is declared, keeps a reader on it, unless the source is let go.
    async fn read_if_declared(&mut self) {
        if !self.declared || self.reader.is_some() || self.lanes.stop.is_cancelled() {
            return;
        }
        match self.lanes.read(&self.lane).await {
            Ok(reader) => self.reader = Some(reader),
            Err(e) => {
                let _ = self.lanes.source.lost.try_send(format!(
                    "cannot consume account queue {}: {e}",
                    self.lane.queue
                ));
            }
        }
    }

    /// With nothing to publish: waits for a command to set aside, meanwhile looking at the
    /// account queue again if its reader ends, and retiring the lane once the queue lingered.
    async fn wait(&mut self) -> Next {
        tokio::select! {
            biased;
            job = self.inbox.recv() => match job {
                Some(job) => {
                    self.pending.push(job);
                    Next::On
                }
                None => Next::Stop,
            },
            () = LaneReader::ended(&mut self.reader) => {
                self.reader = None;
                self.reader_ended().await;
                Next::Again
            }
            () = tokio::time::sleep(LINGER), if self.declared => {
                let lanes = self.lanes.clone();
                if lanes.retire(self).await {
                    self.declared = false;
                }
                Next::Again
            }
        }
    }

    /// The reader ended by itself: the queue was deleted under a standby, or its channel
    /// failed. Looks again.
    async fn reader_ended(&mut self) {
        if self.lanes.stop.is_cancelled() {
            return;
        }
        let source = &self.lanes.source;
        match account_queue::probe(&source.connection, &source.amqp, &self.lane.queue).await {
            // Its channel failed (a consumer_timeout, say): a broker problem, met like any
            // other by a new connection.
            Ok(Some(_)) => {
                let _ = source.lost.try_send(format!(
                    "the consumer of account queue {} ended",
                    self.lane.queue
                ));
                tokio::time::sleep(self.delays.next().unwrap_or(LINGER)).await;
            }
            Ok(None) => {
                self.lanes.missing(&self.lane);
                self.declared = false;
                self.marker = None;
                let mut state = self.lane.state();
                state.on = state.queued > 0;
            }
            Err(_) => tokio::time::sleep(LINGER).await,
        }
    }

    /// Adds to the pending commands what else waits in the inbox, up to a batch.
    fn fill_batch(&mut self) {
        while self.pending.len() < BATCH {
            match self.inbox.try_recv() {
                Ok(job) => self.pending.push(job),
                Err(_) => break,
            }
        }
    }

    /// Declares the account queue; if it cannot, waits to try again, unless the broker
    /// connection is gone.
    async fn declare(&mut self) -> Next {
        let source = &self.lanes.source;
        match account_queue::declare(&source.connection, &source.amqp, &self.lane.queue).await {
            Ok(_) => {
                self.declared = true;
                self.delays = retry_delays();
                // A marker published into a queue that went is never read back.
                self.marker = None;
                if self.reader.as_ref().is_some_and(LaneReader::is_finished) {
                    self.reader = None;
                }
                Next::On
            }
            Err(e) => {
                if !source.publisher.is_connected() || self.lanes.stop.is_cancelled() {
                    return Next::Stop;
                }
                let wait = self.delays.next().unwrap_or(LINGER);
                tracing::error!(queue = %self.lane.queue, error = %e, ?wait, "could not declare an account queue; trying again");
                tokio::time::sleep(wait).await;
                Next::Again
            }
        }
    }

    /// Publishes the pending commands; if any failed, waits before the next round, unless the
    /// broker connection is gone.
    async fn publish_pending(&mut self) -> Next {
        match self.lanes.publish(&self.lane, &mut self.pending).await {
            Ok(()) => {
                self.delays = retry_delays();
                return Next::On;
            }
            Err(Unpublished::Missing) => {
                tracing::warn!(queue = %self.lane.queue, "account queue missing; declaring it again");
                self.lanes.missing(&self.lane);
                self.declared = false;
            }
            Err(Unpublished::Failed) => {}
        }
        // Once the source is let go, what is not published goes back with it.
        if !self.lanes.source.publisher.is_connected() || self.lanes.stop.is_cancelled() {
            return Next::Stop;
        }
        tokio::time::sleep(self.delays.next().unwrap_or(LINGER)).await;
        Next::On
    }

    /// At the end: whatever was not published goes back to the source with its channel; the
    /// reader stops, and its channel closes once what it took has settled.
    async fn hand_back(self) {
        let Self {
            lanes,
            lane,
            mut inbox,
            reader,
            mut pending,
            ..
        } = self;
        inbox.close();
        while let Ok(job) = inbox.try_recv() {
            pending.push(job);
        }
        let unpublished = pending.len();
        for job in pending {
            lanes.forget(job);
        }
        if unpublished > 0 {
            lane.account
                .aside_changed(-isize::try_from(unpublished).unwrap_or(isize::MAX));
            let mut state = lane.state();
            state.queued = state.queued.saturating_sub(unpublished);
        }
        if let Some(reader) = reader {
            let t = lanes.source.amqp.operation_timeout;
            let channel = reader.stop(&lane, t).await;
            // Acks of what it took go to its channel: closed once they are in (see
            // `broker::consumer` on acks right before a close), or once the grace ran out.
            tokio::select! {
                () = lanes.settled.wait() => tokio::time::sleep(ACK_SETTLE).await,
                () = lanes.force.cancelled() => {}
            }
            let _ = timed(
                "channel.close",
                t,
                channel.close(200, "lane stopped".into()),
            )
            .await;
        }
        lane.account.lane_head(&lane.queue, None);
    }
}
