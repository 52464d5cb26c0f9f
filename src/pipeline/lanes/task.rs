//! One lane's task: publishes what is set aside to the account queue, keeps a reader on that
//! queue, and deletes the queue once it has stayed empty for a while. When the source is let
//! go, whatever it did not publish goes back to the source.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

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
        };
        task.run().await;
    }

    /// Deletes the account queue if it is empty, nothing taken from it is unsettled, nothing
    /// waits to be set aside and the account is no longer congested; the lane goes off.
    async fn retire(&self, lane: &Lane, reader: &mut Option<LaneReader>) -> bool {
        {
            let mut state = lane.state();
            if state.queued > 0
                || lane.in_queue.load(Ordering::Relaxed) > 0
                || lane.taken.load(Ordering::Relaxed) > 0
                || lane.account.congested()
            {
                return false;
            }
            state.on = false;
            // Everything set aside has settled: the counts start afresh.
            state.unknown = false;
            state.marks.iter_mut().for_each(|m| *m = 0);
        }
        if let Some(r) = reader.take() {
            // Nothing taken is unsettled (checked above): the channel can close now.
            let t = self.source.amqp.operation_timeout;
            let channel = r.stop(lane, t).await;
            let _ = timed(
                "channel.close",
                t,
                channel.close(200, "lane retired".into()),
            )
            .await;
        }
        let deleted =
            account_queue::delete_if_empty(&self.source.connection, &self.source.amqp, &lane.queue)
                .await;
        match deleted {
            Ok(true) => {
                lane.account.lane_head(&lane.queue, None);
                tracing::info!(account = %lane.account.id, queue = %lane.queue, "account backlog drained; its commands are taken in directly again");
                true
            }
            Ok(false) | Err(_) => {
                // Messages this holder did not know of (returned late by an earlier one), or
                // no answer: the lane stays on and is consumed again.
                if let Ok(Some(n)) =
                    account_queue::probe(&self.source.connection, &self.source.amqp, &lane.queue)
                        .await
                {
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    let known = lane.in_queue.swap(n, Ordering::Relaxed);
                    lane.account.aside_changed(
                        isize::try_from(n).unwrap_or(isize::MAX)
                            - isize::try_from(known).unwrap_or(isize::MAX),
                    );
                }
                lane.state().on = true;
                false
            }
        }
    }
}

impl LaneTask {
    async fn run(mut self) {
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
                if self.lanes.retire(&self.lane, &mut self.reader).await {
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
                self.declared = false;
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
                Next::On
            }
            Err(e) => {
                if !source.publisher.is_connected() {
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
        if self.lanes.publish(&self.lane, &mut self.pending).await {
            self.delays = retry_delays();
            return Next::On;
        }
        if !self.lanes.source.publisher.is_connected() {
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
            // `broker::consumer` on acks right before a close).
            lanes.settled.wait().await;
            tokio::time::sleep(ACK_SETTLE).await;
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
