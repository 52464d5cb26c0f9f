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
//! Only the holder of a source sets aside for it or consumes its account queues. It keeps their
//! list at the broker (`registry.rs`): a queue is listed before it is declared, and a new holder
//! reads the list and takes up what it names before it routes any command of the source
//! (`route.rs`).

mod publish;
mod reader;
mod registry;
mod retire;
mod route;
mod task;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Job, Pipeline};
use crate::broker::consumer::Source;
use crate::broker::lane_registry::Entry;
use crate::broker::{BrokerError, Connection};
use crate::fairness::account::Account;

#[cfg(feature = "fault-injection")]
pub use publish::FAULT_SLOW_ASIDE_ORG_ID;
pub(in crate::pipeline) use route::Route;

/// Buckets of the per-session counts of a lane.
const BUCKETS: usize = 1024;

/// The lanes of one source queue.
pub(super) struct SourceLanes {
    source: Source,
    pipeline: Weak<Pipeline>,
    accounts: Vec<Arc<Account>>,
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    /// The source's account queues, as this holder keeps the list at the broker
    /// ([`crate::broker::lane_registry`]); locked while it is written.
    registry: tokio::sync::Mutex<Registry>,
    /// Until when new account queues get the names earlier versions gave them (ms since the
    /// Unix epoch; see `Registry`).
    old_names_until: std::sync::atomic::AtomicU64,
    /// The list is being read, or was: once per tenure.
    reading: std::sync::atomic::AtomicBool,
    /// Commands of the source that came before its list was read: they wait here, in order,
    /// and are routed once it is (`None` from then on).
    parked: Mutex<Option<Vec<Job>>>,
    /// What was taken from the account queues and not yet settled.
    settled: TaskTracker,
    /// The lanes' tasks.
    tasks: TaskTracker,
    /// Stops the readers; cancelled when the source is let go, after which nothing more is
    /// set aside.
    stop: CancellationToken,
    /// Cancelled when the grace for letting the source go has run out: what the readers took
    /// and did not settle goes back to the account queues with their channels.
    force: CancellationToken,
}

/// What a holder lists of its source's account queues.
#[derive(Default)]
struct Registry {
    /// Every account queue of the source that may exist.
    entries: std::collections::BTreeSet<Entry>,
    /// See [`crate::broker::lane_registry::List::old_names_until`].
    old_names_until: Option<u64>,
    /// The source is let go: nothing is written any more.
    closed: bool,
}

/// One account's lane beside a source.
struct Lane {
    account: Arc<Account>,
    /// Its account queue's name: drawn afresh once a queue of the lane is known gone, so that
    /// no queue is ever declared again under the name of one deleted.
    queue: Mutex<Arc<str>>,
    state: Mutex<LaneState>,
    /// Messages in the account queue, as far as this holder knows.
    in_queue: AtomicUsize,
    /// Taken from the account queue and not yet settled.
    taken: AtomicUsize,
    /// The reader holds a delivery it received and has not taken yet (waiting for a slot).
    holding: std::sync::atomic::AtomicBool,
    /// The last marker the reader read back (see [`SourceLanes::retire`]).
    last_marker: tokio::sync::watch::Sender<Option<String>>,
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
        f.debug_struct("Lane")
            .field("queue", &self.queue())
            .finish()
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
            registry: tokio::sync::Mutex::new(Registry::default()),
            old_names_until: std::sync::atomic::AtomicU64::new(0),
            reading: std::sync::atomic::AtomicBool::new(false),
            parked: Mutex::new(Some(Vec::new())),
            settled: TaskTracker::new(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            force: CancellationToken::new(),
        }
    }

    /// The tenure of the source these lanes belong to.
    pub(super) fn tenure(&self) -> u64 {
        self.source.tenure
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
                    queue: Mutex::new(self.new_name(&account.id).into()),
                    state: Mutex::new(LaneState::default()),
                    in_queue: AtomicUsize::new(0),
                    taken: AtomicUsize::new(0),
                    holding: std::sync::atomic::AtomicBool::new(false),
                    last_marker: tokio::sync::watch::Sender::new(None),
                })
            })
            .clone()
    }

    /// Runs `op` on the connection the lane's account queue is used on (see
    /// [`crate::broker::account_links`]). A failure is counted, and one that brought that
    /// connection down moves the queue to a connection of its own: a queue the broker cannot
    /// serve costs its own lane, never the other sources.
    async fn on_queue<T>(
        &self,
        lane: &Lane,
        op: impl AsyncFnOnce(Arc<Connection>) -> Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        let result = match self.source.links.get(&lane.queue()).await {
            Ok(connection) => op(connection).await,
            Err(e @ BrokerError::Closed { .. }) => Err(e),
            Err(e) if self.source.links.is_isolated(&lane.queue()) => Err(e),
            // The broker takes no second connection now (a connection limit, say): the source's
            // own serves, rather than no account queue at all.
            Err(e) => {
                tracing::warn!(queue = %lane.queue(), error = %e, "cannot open the account queues' connection; using the source's");
                op(self.source.connection.clone()).await
            }
        };
        if let Err(e) = &result
            && !matches!(e, BrokerError::Closed { .. })
        {
            lane.account.metrics().queue_failures.inc();
            self.source.links.failed(&lane.queue(), e);
        }
        result
    }

    /// A job dropped unsettled: its delivery goes back to the source with its channel.
    fn forget(&self, job: Job) {
        if let Some(pipeline) = self.pipeline.upgrade() {
            pipeline.leaves(&job);
        }
        drop(job);
    }

    /// Takes over from `stale`, the lanes of an earlier tenure of the source that nothing
    /// closed: its closing is one of these lanes' tasks, so it has an owner.
    pub(super) fn succeed(&self, stale: Arc<SourceLanes>) {
        self.tasks.spawn(async move { stale.close().await });
    }

    /// Starts the lane's task, unless it runs or the source is let go.
    fn start(self: &Arc<Self>, lane: &Arc<Lane>, state: &mut LaneState, declared: bool) {
        if state.inbox.is_some() || self.stop.is_cancelled() {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        state.inbox = Some(tx);
        self.tasks
            .spawn(self.clone().run_lane(lane.clone(), rx, declared));
    }

    /// Lets the source go, in order: no more commands are set aside or taken from the account
    /// queues; what the lanes were publishing is confirmed (and acked on the source) or left
    /// to go back with the source; what the readers received and did not take goes back to
    /// the account queues; what they took settles within the grace (calls already on the
    /// wire within the time they get after it, as the source's own), and past that goes back
    /// with their channels. Returns once every lane's channel is closed: only then may the
    /// holder give the source up (docs/contract.md §9).
    pub(super) async fn close(&self) {
        self.stop.cancel();
        let parked = self
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        for job in parked.unwrap_or_default() {
            self.forget(job);
        }
        {
            let lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            for lane in lanes.values() {
                lane.state().inbox = None;
            }
        }
        self.tasks.close();
        self.settled.close();
        let grace = self.source.grace;
        let settled = tokio::time::timeout(grace, async {
            self.tasks.wait().await;
            self.settled.wait().await;
        })
        .await;
        if settled.is_err() {
            tracing::warn!(
                source = %self.source.queue,
                unsettled = self.settled.len(),
                "commands taken back from account queues did not settle within shutdown.grace and \
                 the time calls on the wire get after it; \
                 they go back to their account queues"
            );
            self.force.cancel();
            // Every step left is bounded by amqp.operation_timeout.
            self.tasks.wait().await;
        }
        // The lanes' tasks, which write the list, have ended; a take-up still under way is
        // waited for: nothing is written once the source may be given up.
        self.registry.lock().await.closed = true;
    }
}

impl Lane {
    fn state(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The name of the lane's account queue.
    fn queue(&self) -> Arc<str> {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Names the lane's account queue.
    fn name(&self, queue: &str) {
        *self.queue.lock().unwrap_or_else(PoisonError::into_inner) = queue.into();
    }

    fn turn_on(&self, state: &mut LaneState) {
        state.on = true;
        tracing::info!(
            account = %self.account.id,
            queue = %self.queue(),
            "account backlog: its commands wait in its own queue, out of the others' way"
        );
    }
}
