//! One lane's task: publishes what is set aside to the account queue, keeps a reader on that
//! queue, and deletes the queue once it has stayed empty for a while. When the source is let
//! go, whatever it did not publish goes back to the source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::publish::Unpublished;
use super::reader::LaneReader;
use super::{Lane, SourceLanes};
use crate::backoff::{self, Delays};
use crate::broker::account_queue::{self, ReaderChannel};
use crate::pipeline::Job;

/// Most commands published to an account queue before their confirms are awaited.
const BATCH: usize = 256;

/// An account queue found empty, with nothing taken from it unsettled, for this long is
/// deleted and the lane goes off.
const LINGER: Duration = Duration::from_secs(2);

/// How long a retiring lane waits for its marker to come back before it looks again later.
pub(super) const MARKER_WAIT: Duration = Duration::from_secs(5);

/// After this many waits in vain a lane's marker is given up for a fresh one.
pub(super) const MARKER_TRIES: u32 = 12;

/// Waits between failed attempts, growing; started afresh after a success.
fn retry_delays() -> Delays {
    backoff::delays(Duration::from_millis(200), Duration::from_secs(5), None)
}

/// The longest pause between attempts to read an account queue that keeps failing: as long
/// as the default `amqp.reconnect_max_delay`, since the account's commands wait meanwhile.
const READ_RETRY_MAX: Duration = Duration::from_secs(10);

/// Pauses between failed reads of an account queue: from a second up to ten, so that a queue
/// the broker cannot serve costs a few operations a minute, not a loop.
fn read_delays() -> Delays {
    backoff::delays(Duration::from_secs(1), READ_RETRY_MAX, None)
}

/// Resolves at `at`; never without one.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
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
pub(super) struct LaneTask {
    lanes: Arc<SourceLanes>,
    pub(super) lane: Arc<Lane>,
    /// Commands to set aside.
    inbox: mpsc::UnboundedReceiver<Job>,
    /// Takes the account queue's commands back, while the queue is declared.
    pub(super) reader: Option<LaneReader>,
    /// Received from the inbox and not yet published, in order.
    pending: Vec<Job>,
    delays: Delays,
    /// The account queue exists, as far as this task knows.
    pub(super) declared: bool,
    /// The marker published to retire the queue and not read back yet.
    pub(super) marker: Option<String>,
    /// How often that marker was waited for in vain.
    pub(super) marker_waits: u32,
    /// After a failed read, when the queue is read again.
    read_after: Option<Instant>,
    /// When the current reader started.
    read_since: Option<Instant>,
    /// Channels of readers that ended by themselves, kept open while what they took is in
    /// hand.
    spent: Vec<ReaderChannel>,
    /// Pauses between failed reads, growing; started afresh after a reader ran a while.
    read_delays: Delays,
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
            read_after: None,
            read_since: None,
            spent: Vec::new(),
            read_delays: read_delays(),
        };
        task.run().await;
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
        if self.read_after.is_some_and(|at| at > Instant::now()) {
            return;
        }
        match self.lanes.read(&self.lane).await {
            Ok(reader) => {
                self.reader = Some(reader);
                self.read_after = None;
                self.read_since = Some(Instant::now());
                self.close_spent().await;
            }
            Err(e) if e.to_string().contains("NOT_FOUND") => self.gone().await,
            Err(e) => {
                // Its own lane waits, with its commands in the queue; every other lane and
                // source goes on.
                let wait = self.read_delays.next().unwrap_or(READ_RETRY_MAX);
                tracing::error!(
                    account = %self.lane.account.id,
                    queue = %self.lane.queue(),
                    error = %e,
                    ?wait,
                    "cannot consume an account queue; its commands wait there until it can"
                );
                self.read_after = Some(Instant::now() + wait);
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
                // Its channel stays open until what it took has settled: closed now, it would
                // take those commands back from under their calls (a queue deleted behind the
                // worker's back cancels the consumer, not the deliveries in hand).
                self.spend_reader();
                self.reader_ended().await;
                Next::Again
            }
            () = until(self.read_after), if self.read_after.is_some() && self.reader.is_none() => {
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
        let (lanes, lane) = (&self.lanes, &self.lane);
        let amqp = &lanes.source.amqp;
        let probed = lanes
            .on_queue(lane, async |c| {
                account_queue::probe(&c, amqp, &lane.queue()).await
            })
            .await;
        match probed {
            // Its channel or connection failed (a consumer_timeout, a queue the broker could
            // not serve): read again after a pause that grows while it keeps failing.
            Ok(Some(_)) => {
                lane.account.metrics().queue_failures.inc();
                if self
                    .read_since
                    .take()
                    .is_some_and(|at| at.elapsed() >= READ_RETRY_MAX)
                {
                    // It had read a while: a fresh failure, not the same one again.
                    self.read_delays = read_delays();
                }
                let wait = self.read_delays.next().unwrap_or(READ_RETRY_MAX);
                tracing::warn!(account = %lane.account.id, queue = %lane.queue(), ?wait, "the consumer of an account queue ended; reading it again");
                self.read_after = Some(Instant::now() + wait);
            }
            Ok(None) => self.gone().await,
            Err(_) => tokio::time::sleep(LINGER).await,
        }
    }

    /// The account queue is gone (deleted behind the worker's back): declared again before
    /// anything is published to it; the lane stays on only if something waits to be.
    async fn gone(&mut self) {
        self.lanes.missing(&self.lane).await;
        self.declared = false;
        self.marker = None;
        let mut state = self.lane.state();
        state.on = state.queued > 0;
    }

    /// Sets aside the reader that ended by itself: its channel stays open until what it took
    /// has settled.
    fn spend_reader(&mut self) {
        if let Some(ended) = self.reader.take() {
            self.spent.push(ended.into_channel());
        }
    }

    /// Closes the channels of readers that ended by themselves, once nothing they took is in
    /// hand.
    async fn close_spent(&mut self) {
        if self.lane.taken.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return;
        }
        for channel in self.spent.drain(..) {
            channel.close("reader ended").await;
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
        let (lanes, lane) = (&self.lanes, &self.lane);
        let source = &lanes.source;
        // Listed first: a new holder finds whatever this one sets aside there.
        let declared = match lanes.register(lane).await {
            Ok(()) => {
                lanes
                    .on_queue(lane, async |c| {
                        account_queue::declare(&c, &source.amqp, &lane.queue()).await
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        match declared {
            Ok(_) => {
                self.declared = true;
                self.delays = retry_delays();
                // A marker published into a queue that went is never read back.
                self.marker = None;
                if self.reader.as_ref().is_some_and(LaneReader::is_finished) {
                    self.spend_reader();
                }
                Next::On
            }
            Err(e) => {
                if !source.publisher.is_connected() || self.lanes.stop.is_cancelled() {
                    return Next::Stop;
                }
                let wait = self.delays.next().unwrap_or(LINGER);
                tracing::error!(queue = %self.lane.queue(), error = %e, ?wait, "could not declare an account queue; trying again");
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
                self.lanes.missing(&self.lane).await;
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
            spent,
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
        let mut channels = spent;
        if let Some(reader) = reader {
            let channel = reader.stop(&lane).await;
            channels.push(channel);
        }
        if !channels.is_empty() {
            // Acks of what they took go to their channels: closed once they are applied (see
            // `ReaderChannel::acks_applied`), or once the grace ran out.
            tokio::select! {
                () = lanes.settled.wait() => {
                    let open = channels.iter().filter(|c| c.is_open());
                    let queue = lane.queue();
                    futures_util::future::join_all(open.map(|c| c.acks_applied(&queue))).await;
                }
                () = lanes.force.cancelled() => {}
            }
            for channel in channels {
                channel.close("lane stopped").await;
            }
        }
        lane.account.lane_head(&lane.queue(), None);
    }
}
