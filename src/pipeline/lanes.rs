//! Fairness between accounts (docs/contract.md §12, docs/fairness.md). A queue is FIFO, so a
//! command can only get past another account's backlog if that backlog moves out of the way.
//! Each source queue (the commands queue, or a partition) has a *lane* per account: while the
//! account is congested (its next start is further than `commands.aside_after`, or it has
//! `max_in_flight` commands waiting in memory already), its new commands are set aside, in
//! arrival order, in the account's own queue beside the source
//! ([`crate::broker::account_queue`]), and acked there only once the broker confirmed them. That
//! queue is consumed at the account's pace: a command is taken from it only when one of the
//! account's slots is free. Every other account's commands flow past.
//!
//! A command taken in may still be set aside when its turn comes and its account cannot start
//! it within `aside_after` (a burst that arrived before the account was known to be congested):
//! then it and the commands of its session waiting behind it go to the account queue, in order.
//!
//! Order within a session holds because, once a lane is on, every later command of the account
//! is set aside too, in arrival order, until the account queue is empty and nothing taken from
//! it is unsettled; only then is the queue deleted and the lane off. A session's commands in
//! memory are thus older than its commands set aside, which come back in order behind them. The
//! one move against that grain, a command taken in and then set aside, is made only when no
//! later command of its session is set aside or taken back: the lane keeps a count per session
//! (hashed into a fixed number of buckets, so memory stays bounded; a shared bucket only makes
//! the check more careful) and, for an account queue found already holding commands, sets
//! nothing aside that way until the queue has drained.
//!
//! Only the holder of a source sets aside for it or consumes its account queues; a new holder
//! looks for them before it takes anything (a standby of the commands queue again right before
//! its first delivery).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicRejectOptions;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::sessions::SessionQueues;
use super::{Job, Pipeline};
use crate::agentassist::account::Account;
use crate::backoff;
use crate::broker::consumer::{InFlight, Source};
use crate::broker::{BrokerError, account_queue, timed};

/// Header carrying since when a command set aside has waited (ms since the Unix epoch).
pub const WAITING_SINCE: &str = "x-transfer-waiting-since";

/// Time the broker gets to apply the last acks before a channel closes.
const ACK_SETTLE: Duration = Duration::from_millis(250);

/// A job with its place in the order it was set aside.
type Numbered = (usize, Job);

/// Buckets of the per-session counts of a lane.
const BUCKETS: usize = 1024;

/// Most commands published to an account queue before their confirms are awaited.
const BATCH: usize = 256;

/// An account queue found empty, with nothing taken from it unsettled, for this long is
/// deleted and the lane goes off.
const LINGER: Duration = Duration::from_secs(2);

/// The lanes of one source queue.
pub(super) struct SourceLanes {
    source: Source,
    pipeline: Weak<Pipeline>,
    accounts: Vec<Arc<Account>>,
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    /// What was taken from the account queues and not yet settled.
    settled: TaskTracker,
    /// The lanes' tasks.
    tasks: TaskTracker,
    /// Stops the readers; cancelled when the source is let go, after which nothing more is
    /// set aside.
    stop: CancellationToken,
}

/// One account's lane beside a source.
struct Lane {
    account: Arc<Account>,
    queue: String,
    state: Mutex<LaneState>,
    /// Messages in the account queue, as far as this holder knows.
    in_queue: AtomicUsize,
    /// Taken from the account queue and not yet settled.
    taken: AtomicUsize,
}

struct LaneState {
    /// Every new command of the account is set aside.
    on: bool,
    /// The lane's task, while it runs.
    inbox: Option<mpsc::UnboundedSender<Job>>,
    /// Jobs sent to the task and not yet confirmed in the account queue.
    queued: usize,
    /// Commands set aside, or taken back and not settled, by bucket of their session.
    marks: Vec<u32>,
    /// The account queue was found holding commands this holder knows nothing of.
    unknown: bool,
}

impl Default for LaneState {
    fn default() -> Self {
        Self {
            on: false,
            inbox: None,
            queued: 0,
            marks: vec![0; BUCKETS],
            unknown: false,
        }
    }
}

/// The bucket of a session's count.
fn bucket(session: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    session.hash(&mut h);
    usize::try_from(h.finish() % BUCKETS as u64).unwrap_or(0)
}

/// A command taken from an account queue, counted until it settles.
#[derive(Debug)]
pub(super) struct Taken {
    lane: Weak<Lane>,
    bucket: usize,
    returned: bool,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").field("queue", &self.queue).finish()
    }
}

impl Taken {
    /// It goes back to the account queue instead of settling.
    pub(super) fn returned(&mut self) {
        self.returned = true;
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let Some(lane) = self.lane.upgrade() else {
            return;
        };
        lane.taken.fetch_sub(1, Ordering::Relaxed);
        if self.returned {
            lane.in_queue.fetch_add(1, Ordering::Relaxed);
        } else {
            lane.account.aside_changed(-1);
            if let Some(mark) = lane.state().marks.get_mut(self.bucket) {
                *mark = mark.saturating_sub(1);
            }
        }
    }
}

/// Where a command of a lane's account goes.
pub(super) enum Route {
    /// Taken in, queued behind its session: the job to run now, if its session was idle.
    Here(Option<Box<Job>>),
    /// Set aside in the account queue.
    Aside,
}

impl SourceLanes {
    /// The lanes of `source` for `accounts`; nothing runs until [`SourceLanes::refresh`].
    pub(super) fn new(
        source: Source,
        pipeline: Weak<Pipeline>,
        accounts: Vec<Arc<Account>>,
    ) -> Self {
        Self {
            source,
            pipeline,
            accounts,
            lanes: Mutex::new(HashMap::new()),
            settled: TaskTracker::new(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Whether these lanes belong to a connection that is gone.
    pub(super) fn is_stale(&self) -> bool {
        !self.source.connection.status().connected()
    }

    fn lane(&self, account: &Arc<Account>) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lane) = lanes.get(&account.id) {
            return lane.clone();
        }
        lanes
            .entry(account.id.clone())
            .or_insert_with(|| {
                Arc::new(Lane {
                    account: account.clone(),
                    queue: crate::contract::names::account_queue(&self.source.queue, &account.id),
                    state: Mutex::new(LaneState::default()),
                    in_queue: AtomicUsize::new(0),
                    taken: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// Looks for account queues left by an earlier holder of the source (or by the active
    /// consumer while this one stood by) and takes up each one found, before anything of the
    /// source is taken in.
    pub(super) async fn refresh(self: &Arc<Self>) {
        for account in &self.accounts {
            let lane = self.lane(account);
            if lane.state().on {
                continue;
            }
            let amqp = &self.source.amqp;
            match account_queue::probe(&self.source.connection, amqp, &lane.queue).await {
                Ok(Some(found)) => {
                    let found = usize::try_from(found).unwrap_or(usize::MAX);
                    lane.in_queue.store(found, Ordering::Relaxed);
                    lane.account
                        .aside_changed(isize::try_from(found).unwrap_or(isize::MAX));
                    tracing::info!(
                        account = %account.id,
                        queue = %lane.queue,
                        found,
                        "account queue found; its commands go first and new ones join them"
                    );
                    let mut state = lane.state();
                    state.on = true;
                    state.unknown = true;
                    self.start(&lane, &mut state, true);
                }
                Ok(None) => {}
                Err(e) => {
                    // Unknown: the lane stays off until the next look, and commands are taken
                    // in; the connection is most likely going, and a new one looks again.
                    tracing::warn!(account = %account.id, error = %e, "could not look for an account queue");
                }
            }
        }
    }

    /// Where a new command of `account` goes: taken in unless its account is congested or its
    /// lane is on; else, in arrival order, to the account queue. A command taken in is queued
    /// behind its session by `queue_up` while the lane is held, so no command set aside later
    /// can pass it.
    pub(super) fn route(
        self: &Arc<Self>,
        account: &Arc<Account>,
        mut job: Job,
        sessions: &SessionQueues<Job>,
    ) -> Route {
        let lane = self.lane(account);
        let mut state = lane.state();
        let session = job.parsed.session_key();
        let take_in = |mut job: Job| {
            job.lanes = Some(self.clone());
            Route::Here(sessions.push_marked(&session, job, true).map(Box::new))
        };
        if !state.on {
            if let Some(waiting) = account.take_in() {
                job.waiting = Some(waiting);
                return take_in(job);
            }
            lane.turn_on(&mut state);
        }
        // A session with commands taken in from the source keeps its new ones behind them, in
        // memory: were the worker to die, those would go back to the source, and these must
        // not be found ahead of them in the account queue.
        if sessions.pinned(&session) > 0 {
            return take_in(job);
        }
        self.set_aside(&lane, &mut state, job);
        Route::Aside
    }

    /// Sets aside `job`, taken in earlier, and `behind()` (the commands of its session waiting
    /// after it), unless a later command of its session is set aside or taken back already:
    /// then the job is handed back, to run here.
    pub(super) fn defer(
        self: &Arc<Self>,
        job: Box<Job>,
        behind: impl FnOnce() -> Vec<Job>,
    ) -> Result<(), Box<Job>> {
        let Ok(command) = &job.parsed.command else {
            return Err(job);
        };
        let lane = self.lane(&command.bot.account);
        let mut state = lane.state();
        let session = bucket(&job.parsed.session_key());
        if state.unknown || state.marks.get(session).is_some_and(|m| *m > 0) {
            return Err(job);
        }
        if !state.on {
            lane.turn_on(&mut state);
        }
        self.set_aside(&lane, &mut state, *job);
        for job in behind() {
            self.set_aside(&lane, &mut state, job);
        }
        Ok(())
    }

    /// Sends `job` to the lane's task, to be published to the account queue.
    fn set_aside(self: &Arc<Self>, lane: &Arc<Lane>, state: &mut LaneState, mut job: Job) {
        if self.stop.is_cancelled() {
            // The source is let go: the delivery goes back with its channel.
            self.forget(job);
            return;
        }
        job.waiting = None;
        job.slot = None;
        if let Some(mark) = state.marks.get_mut(bucket(&job.parsed.session_key())) {
            *mark = mark.saturating_add(1);
        }
        lane.account.aside_changed(1);
        lane.account.metrics().set_aside.inc();
        state.queued = state.queued.saturating_add(1);
        if state.inbox.is_none() {
            self.start(lane, state, false);
        }
        let inbox = state.inbox.as_ref().expect("started above");
        if let Err(mpsc::error::SendError(job)) = inbox.send(job) {
            // The task ended (the source is closing): the delivery goes back with its channel.
            state.queued = state.queued.saturating_sub(1);
            lane.account.aside_changed(-1);
            self.forget(job);
        }
    }

    /// A job dropped unsettled: its delivery goes back to the source with its channel.
    fn forget(&self, job: Job) {
        if let Some(pipeline) = self.pipeline.upgrade() {
            pipeline.stages.metrics.commands_in_flight.dec();
        }
        drop(job);
    }

    /// Starts the lane's task.
    fn start(self: &Arc<Self>, lane: &Arc<Lane>, state: &mut LaneState, declared: bool) {
        let (tx, rx) = mpsc::unbounded_channel();
        state.inbox = Some(tx);
        self.tasks
            .spawn(self.clone().run_lane(lane.clone(), rx, declared));
    }

    /// Lets the source go: no more commands are set aside or taken from the account queues;
    /// what the lanes hold is published and acked, what they took and started settles (within
    /// the grace); then their channels close.
    pub(super) async fn close(&self) {
        self.stop.cancel();
        {
            let lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            for lane in lanes.values() {
                lane.state().inbox = None;
            }
        }
        self.tasks.close();
        self.settled.close();
        let grace = self.source.grace;
        let _ = tokio::time::timeout(grace, async {
            self.tasks.wait().await;
            self.settled.wait().await;
        })
        .await;
    }

    /// One lane's life: publishes what is set aside, consumes the account queue at the
    /// account's pace, and deletes the queue once it has stayed empty for a while.
    async fn run_lane(
        self: Arc<Self>,
        lane: Arc<Lane>,
        mut inbox: mpsc::UnboundedReceiver<Job>,
        mut declared: bool,
    ) {
        let mut reader: Option<LaneReader> = None;
        let mut pending: Vec<Job> = Vec::new();
        let mut delays = self.delays();
        loop {
            if declared && reader.is_none() && !self.stop.is_cancelled() {
                match self.read(&lane).await {
                    Ok(r) => reader = Some(r),
                    Err(e) => {
                        let _ = self
                            .source
                            .lost
                            .try_send(format!("cannot consume account queue {}: {e}", lane.queue));
                    }
                }
            }
            if pending.is_empty() {
                tokio::select! {
                    biased;
                    job = inbox.recv() => match job {
                        Some(job) => pending.push(job),
                        None => break,
                    },
                    () = LaneReader::ended(&mut reader) => {
                        reader = None;
                        // Deleted under a standby, or its channel failed: look again.
                        if !self.stop.is_cancelled() {
                            match account_queue::probe(&self.source.connection, &self.source.amqp, &lane.queue).await {
                                // Its channel failed (a consumer_timeout, say): a broker
                                // problem, met like any other by a new connection.
                                Ok(Some(_)) => {
                                    let _ = self.source.lost.try_send(format!(
                                        "the consumer of account queue {} ended",
                                        lane.queue
                                    ));
                                    tokio::time::sleep(delays.next().unwrap_or(LINGER)).await;
                                }
                                Ok(None) => {
                                    declared = false;
                                    let mut state = lane.state();
                                    state.on = state.queued > 0;
                                }
                                Err(_) => tokio::time::sleep(LINGER).await,
                            }
                        }
                        continue;
                    }
                    () = tokio::time::sleep(LINGER), if declared => {
                        if self.retire(&lane, &mut reader).await {
                            declared = false;
                        }
                        continue;
                    }
                }
            }
            while pending.len() < BATCH {
                match inbox.try_recv() {
                    Ok(job) => pending.push(job),
                    Err(_) => break,
                }
            }
            if !declared {
                match account_queue::declare(
                    &self.source.connection,
                    &self.source.amqp,
                    &lane.queue,
                )
                .await
                {
                    Ok(_) => {
                        declared = true;
                        delays = self.delays();
                    }
                    Err(e) => {
                        if !self.source.publisher.is_connected() {
                            break;
                        }
                        let wait = delays.next().unwrap_or(LINGER);
                        tracing::error!(queue = %lane.queue, error = %e, ?wait, "could not declare an account queue; trying again");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
            if !self.publish(&lane, &mut pending).await {
                if !self.source.publisher.is_connected() {
                    break;
                }
                tokio::time::sleep(delays.next().unwrap_or(LINGER)).await;
            } else {
                delays = self.delays();
            }
        }
        // Whatever was not published goes back to the source with its channel.
        inbox.close();
        while let Ok(job) = inbox.try_recv() {
            pending.push(job);
        }
        let unpublished = pending.len();
        for job in pending {
            self.forget(job);
        }
        if unpublished > 0 {
            lane.account
                .aside_changed(-isize::try_from(unpublished).unwrap_or(isize::MAX));
            let mut state = lane.state();
            state.queued = state.queued.saturating_sub(unpublished);
        }
        if let Some(reader) = reader {
            let t = self.source.amqp.operation_timeout;
            let channel = reader.stop(&lane, t).await;
            // Acks of what it took go to its channel: closed once they are in (see
            // `broker::consumer` on acks right before a close).
            self.settled.wait().await;
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

    fn delays(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        backoff::delays(Duration::from_millis(200), Duration::from_secs(5), None)
    }

    /// Publishes pending commands to the account queue, at most one per session at a time (so
    /// a failed publish cannot be overtaken by a later command of its session), and acks each
    /// on its source once confirmed. Keeps what failed, in order; false if anything did.
    async fn publish(&self, lane: &Lane, pending: &mut Vec<Job>) -> bool {
        let mut sessions = HashSet::new();
        let (batch, later): (Vec<Numbered>, Vec<Numbered>) = std::mem::take(pending)
            .into_iter()
            .enumerate()
            .partition(|(_, job)| sessions.insert(job.parsed.session_key()));
        let publisher = &self.source.publisher;
        let results = futures_util::future::join_all(batch.iter().map(|(_, job)| {
            publisher.publish_to_queue(&lane.queue, &job.delivery.data, aside_properties(job))
        }))
        .await;
        let mut failed = Vec::new();
        let mut published = 0usize;
        for ((i, job), result) in batch.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    published = published.saturating_add(1);
                    lane.in_queue.fetch_add(1, Ordering::Relaxed);
                    let ack = job.delivery.acker.ack(BasicAckOptions::default());
                    if let Err(e) =
                        timed("basic.ack", self.source.amqp.operation_timeout, ack).await
                    {
                        // In both queues at worst: the copy is answered from memory.
                        tracing::warn!(error = %e, "could not ack a command set aside");
                    }
                    if let Some(pipeline) = self.pipeline.upgrade() {
                        pipeline.stages.metrics.commands_in_flight.dec();
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %lane.queue, error = %e, "could not set a command aside; trying again");
                    failed.push((i, job));
                }
            }
        }
        {
            let mut state = lane.state();
            state.queued = state.queued.saturating_sub(published);
        }
        let ok = failed.is_empty();
        let mut rest: Vec<Numbered> = failed.into_iter().chain(later).collect();
        rest.sort_by_key(|(i, _)| *i);
        *pending = rest.into_iter().map(|(_, job)| job).collect();
        ok
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

    /// Starts consuming the lane's account queue on a channel of its own, with the account's
    /// cap as prefetch.
    async fn read(self: &Arc<Self>, lane: &Arc<Lane>) -> Result<LaneReader, BrokerError> {
        let t = self.source.amqp.operation_timeout;
        let channel = timed("channel.open", t, self.source.connection.create_channel()).await?;
        let prefetch = u16::try_from(lane.account.cap()).unwrap_or(u16::MAX);
        timed(
            "basic.qos",
            t,
            channel.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        let tag = format!("transfer-worker-{}", uuid::Uuid::new_v4());
        let consumer = timed(
            "basic.consume",
            t,
            channel.basic_consume(
                lane.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let stop = self.stop.child_token();
        let task = tokio::spawn(self.clone().take(lane.clone(), consumer, stop.clone()));
        Ok(LaneReader {
            channel,
            tag,
            stop,
            task,
        })
    }

    /// Takes the account queue's commands in order, each when one of the account's slots is
    /// free, until stopped; then gives the consumer back with what it has not taken.
    async fn take(
        self: Arc<Self>,
        lane: Arc<Lane>,
        mut consumer: lapin::Consumer,
        stop: CancellationToken,
    ) -> Option<Held> {
        loop {
            let delivery = tokio::select! {
                biased;
                () = stop.cancelled() => return Some(Held { consumer, held: None }),
                delivery = consumer.next() => delivery,
            };
            let Some(Ok(delivery)) = delivery else {
                return None;
            };
            let _ = lane
                .in_queue
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
            let slot = tokio::select! {
                biased;
                () = stop.cancelled() => return Some(Held { consumer, held: Some(delivery) }),
                slot = lane.account.slot() => slot,
            };
            let Some(pipeline) = self.pipeline.upgrade() else {
                return Some(Held {
                    consumer,
                    held: Some(delivery),
                });
            };
            lane.account
                .lane_head(&lane.queue, waiting_since(&delivery.properties));
            lane.taken.fetch_add(1, Ordering::Relaxed);
            let session = session_of(&delivery.data);
            let taken = Taken {
                lane: Arc::downgrade(&lane),
                bucket: bucket(&session),
                returned: false,
            };
            let in_flight = InFlight::tracked(&self.settled);
            if let Some(task) =
                pipeline.accept_aside(delivery, &self.source.publisher, in_flight, slot, taken)
            {
                self.source.tracker.spawn(task);
            }
        }
    }
}

impl Lane {
    fn state(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn turn_on(&self, state: &mut LaneState) {
        state.on = true;
        tracing::info!(
            account = %self.account.id,
            queue = %self.queue,
            "account backlog: its commands wait in its own queue, out of the others' way"
        );
    }
}

/// A running reader of an account queue.
struct LaneReader {
    channel: Channel,
    tag: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Option<Held>>,
}

/// A stopped reader's consumer, and the delivery it held while waiting for a slot.
struct Held {
    consumer: lapin::Consumer,
    held: Option<Delivery>,
}

impl LaneReader {
    /// Resolves when the reader ended by itself (its consumer was cancelled or failed);
    /// never without one.
    async fn ended(reader: &mut Option<Self>) {
        match reader {
            Some(r) if !r.task.is_finished() => {
                // Polled by reference; the handle stays for `stop`.
                let _ = (&mut r.task).await;
            }
            Some(_) => {}
            None => std::future::pending().await,
        }
    }

    /// Stops taking, cancels the consumer and returns what it had received but not taken to
    /// the account queue, in order. Returns the channel, to be closed once what it took has
    /// settled.
    async fn stop(self, lane: &Lane, t: Duration) -> Channel {
        self.stop.cancel();
        let held = (self.task.await).ok().flatten();
        let cancel = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default());
        let mut left = Vec::new();
        if timed("basic.cancel", t, cancel).await.is_ok()
            && let Some(Held { mut consumer, held }) = held
        {
            left.extend(held);
            while let Ok(Some(Ok(delivery))) = tokio::time::timeout(t, consumer.next()).await {
                left.push(delivery);
            }
        }
        for delivery in left {
            let reject = delivery.acker.reject(BasicRejectOptions { requeue: true });
            if timed("basic.reject", t, reject).await.is_ok() {
                lane.in_queue.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.channel
    }
}

/// The session a command set aside belongs to, as the pipeline keys it (it was read once
/// already, so it is JSON with a `botSessionId`; anything else keys nothing).
fn session_of(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Session {
        #[serde(rename = "botSessionId")]
        bot_session_id: String,
    }
    serde_json::from_slice::<Session>(body)
        .map(|s| s.bot_session_id)
        .unwrap_or_default()
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
