//! The list of a source's account queues its holder keeps at the broker
//! ([`crate::broker::lane_registry`], docs/fairness.md "Which account queues a source has"):
//! read when the source is taken up, a queue written into it before it is declared and out of
//! it after it is deleted. So a new holder finds every account queue that may hold a command
//! with one read, however many bots are configured.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Lane, Registry, SourceLanes};
use crate::backoff;
use crate::broker::lane_registry::{self, Entry, List};
use crate::broker::{BrokerError, account_queue};
use crate::fairness::account::Account;

/// The longest pause between attempts to read the list when the broker keeps failing.
const READ_RETRY_MAX: Duration = Duration::from_secs(10);

/// How long after a source was first taken up without a list (from an earlier version) its
/// holders keep looking for, and naming, account queues the way that version did: while its
/// replicas may still hold the source in a rolling update.
const OLD_NAMES_FOR: Duration = Duration::from_secs(3600);

/// Now, in ms since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long a list queue found empty is read again before it is taken for one without a list
/// (its first list never written): someone looking from outside holds its messages for a moment
/// only, and a frozen holder's connection, with what it took, goes before its hold does.
const EMPTY_FOR: Duration = Duration::from_secs(30);

/// Why a reading of the list did not take the source up.
#[derive(Debug, thiserror::Error)]
enum Unread {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the list's queue has no message yet")]
    Empty,
    #[error("the source is let go")]
    Stopped,
}

impl SourceLanes {
    /// Takes up the account queues an earlier holder of the source left (or the active
    /// consumer, while this one stood by), before anything of the source is taken in: reads
    /// the list, looks at each queue listed, turns on the lane of each one there, and writes
    /// the list back without the ones gone. Once per tenure, in the background: commands of
    /// the source that come before wait, in order, and the consumer goes on meanwhile (a
    /// SIGTERM, another source). A list that cannot be read is read again, with a growing
    /// pause, until it is or the source is let go.
    pub(in crate::pipeline) fn refresh(self: &Arc<Self>) {
        if self.reading.swap(true, Ordering::AcqRel) {
            return;
        }
        self.tasks.spawn(self.clone().read_until_read());
    }

    async fn read_until_read(self: Arc<Self>) {
        let mut delays = backoff::delays(Duration::from_millis(200), READ_RETRY_MAX, None);
        let mut empty_since = None;
        let mut failed = false;
        loop {
            let outcome = {
                let mut registry = self.registry.lock().await;
                if registry.closed {
                    return;
                }
                self.read_list(&mut registry, &mut empty_since).await
            };
            let wait = delays.next().unwrap_or(READ_RETRY_MAX);
            match outcome {
                Ok(()) => {
                    if failed {
                        tracing::info!(source = %self.source.queue, "list of account queues read; the source's commands go on");
                    }
                    self.release_parked();
                    return;
                }
                Err(Unread::Stopped) => return,
                Err(Unread::Empty) => {
                    tracing::debug!(source = %self.source.queue, ?wait, "the list of account queues is empty for now; reading it again");
                }
                Err(e) if failed => {
                    tracing::warn!(source = %self.source.queue, error = %e, ?wait, "cannot read the list of the source's account queues yet");
                }
                Err(e) => {
                    failed = true;
                    tracing::error!(source = %self.source.queue, error = %e, ?wait, "cannot read the list of the source's account queues; its commands wait until it can");
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One reading of the list: takes it, takes up what it names, writes it back.
    async fn read_list(
        self: &Arc<Self>,
        registry: &mut Registry,
        empty_since: &mut Option<Instant>,
    ) -> Result<(), Unread> {
        let source = &self.source;
        let list = crate::contract::names::lane_registry(&source.queue);
        let connection = match source.links.get(&list).await {
            Ok(c) => c,
            Err(_) => source.connection.clone(),
        };
        let taken = lane_registry::take(&connection, &source.amqp, &source.queue).await?;
        if taken.list.is_none()
            && taken.exists
            && empty_since.get_or_insert_with(Instant::now).elapsed() < EMPTY_FOR
        {
            taken.give_back(source.amqp.operation_timeout).await;
            return Err(Unread::Empty);
        }
        if taken.unreadable > 0 {
            tracing::warn!(source = %source.queue, unreadable = taken.unreadable, "messages in the list of account queues that are not a list; dropped");
        }
        let mut listed = match &taken.list {
            Some(list) => list.clone(),
            None => {
                tracing::info!(source = %source.queue, accounts = self.accounts.len(), "no list of account queues beside this source (kept since this version): looking for each account's queue once");
                List {
                    queues: Vec::new(),
                    old_names_until: now_ms()
                        .checked_add(u64::try_from(OLD_NAMES_FOR.as_millis()).unwrap_or(u64::MAX)),
                }
            }
        };
        registry.old_names_until = registry.old_names_until.max(listed.old_names_until);
        self.old_names_until
            .store(registry.old_names_until.unwrap_or(0), Ordering::Relaxed);
        if self.old_names() {
            match self.old_named().await {
                Some(found) => {
                    for entry in found {
                        if !listed.queues.contains(&entry) {
                            listed.queues.push(entry);
                        }
                    }
                }
                None => {
                    taken.give_back(source.amqp.operation_timeout).await;
                    return Err(Unread::Stopped);
                }
            }
        }
        for entry in listed.queues {
            if self.stop.is_cancelled() {
                taken.give_back(source.amqp.operation_timeout).await;
                return Err(Unread::Stopped);
            }
            if let Some(kept) = self.take_up(entry).await {
                registry.entries.insert(kept);
            }
        }
        let content = registry.content();
        if let Err(e) = taken
            .replace(
                &connection,
                &source.amqp,
                &source.publisher,
                &source.queue,
                &content,
            )
            .await
        {
            // What was read goes back with its channel: the list is still whole, if older.
            tracing::warn!(source = %source.queue, error = %e, "could not write the list of account queues back; it stays as it was");
        }
        Ok(())
    }

    /// Every configured account's queue under the name earlier versions gave it, that exists
    /// (or could not be looked at); `None` once the source is let go.
    async fn old_named(&self) -> Option<Vec<Entry>> {
        let mut found: Vec<Entry> = Vec::new();
        for account in &self.accounts {
            if self.stop.is_cancelled() {
                return None;
            }
            let entry = Entry {
                account: account.id.clone(),
                queue: crate::contract::names::account_queue_of_old(
                    &self.source.queue,
                    &account.id,
                ),
            };
            if found.contains(&entry) {
                continue;
            }
            let amqp = &self.source.amqp;
            self.looked();
            let probed = match self.source.links.get(&entry.queue).await {
                Ok(c) => account_queue::probe(&c, amqp, &entry.queue).await,
                Err(e) => Err(e),
            };
            match probed {
                Ok(None) => {}
                // There, or unknown: taken up (an empty one is retired again).
                Ok(Some(_)) | Err(_) => found.push(entry),
            }
        }
        Some(found)
    }

    /// Takes up a listed account queue: its lane goes on and reads it first, if it is there.
    /// Returns the entry to keep listed (`None`: the queue is gone).
    async fn take_up(self: &Arc<Self>, entry: Entry) -> Option<Entry> {
        let Some(account) = self.accounts.iter().find(|a| a.id == entry.account) else {
            tracing::error!(account = %entry.account, queue = %entry.queue, "an account queue of an account no bot is configured for: its commands wait there until one is");
            return Some(entry);
        };
        let lane = self.lane(account);
        if self.taken_up(&lane, &entry) {
            return Some(entry);
        }
        let amqp = &self.source.amqp;
        lane.name(&entry.queue);
        self.looked();
        let probed = self
            .on_queue(&lane, async |c| {
                account_queue::probe(&c, amqp, &entry.queue).await
            })
            .await;
        // A command routed meanwhile (a source taken up again) may have started the lane: its
        // task uses the queue named above.
        if self.taken_up(&lane, &entry) {
            return Some(entry);
        }
        match probed {
            Ok(Some(found)) => {
                self.found(&lane, account, found);
                Some(entry)
            }
            Ok(None) => {
                self.renew(&lane);
                None
            }
            Err(e) => {
                // Unknown: the queue may hold older commands of its sessions, so the lane
                // goes on as if it did and its task reads it first. It is not declared again
                // under this name (it may be one deleted): a reader that finds it gone
                // draws a new one.
                tracing::warn!(account = %account.id, queue = %entry.queue, error = %e, "could not look at an account queue; taking it up as if it held commands");
                let mut state = lane.state();
                state.on = true;
                state.unknown = true;
                self.start(&lane, &mut state, true);
                Some(entry)
            }
        }
    }

    /// Whether the lane runs already (taken up before, or started by a command meanwhile).
    fn taken_up(&self, lane: &Lane, entry: &Entry) -> bool {
        let state = lane.state();
        if !state.on && state.inbox.is_none() {
            return false;
        }
        if *lane.queue() != *entry.queue {
            tracing::error!(account = %entry.account, queue = %entry.queue, taken = %lane.queue(), "a second account queue of one account beside a source: it waits until the source is taken up again");
        }
        true
    }

    /// An account queue found holding `found` messages: its lane goes on and reads it first.
    fn found(self: &Arc<Self>, lane: &Arc<Lane>, account: &Account, found: u32) {
        let found = usize::try_from(found).unwrap_or(usize::MAX);
        lane.in_queue.store(found, Ordering::Relaxed);
        lane.account
            .aside_changed(isize::try_from(found).unwrap_or(isize::MAX));
        tracing::info!(
            account = %account.id,
            queue = %lane.queue(),
            found,
            "account queue found; its commands go first and new ones join them"
        );
        let mut state = lane.state();
        state.on = true;
        state.unknown = true;
        self.start(lane, &mut state, true);
    }

    /// Whether replicas of an earlier version may still hold the source (see
    /// [`OLD_NAMES_FOR`]).
    fn old_names(&self) -> bool {
        self.old_names_until.load(Ordering::Relaxed) > now_ms()
    }

    /// A name for a new account queue of `account`: drawn afresh, or, while replicas of an
    /// earlier version may hold the source, the name that version gives it.
    pub(super) fn new_name(&self, account: &str) -> String {
        if self.old_names() {
            crate::contract::names::account_queue_of_old(&self.source.queue, account)
        } else {
            crate::contract::names::account_queue(&self.source.queue, account)
        }
    }

    /// Names the lane's next account queue: the last one is gone.
    pub(super) fn renew(&self, lane: &Lane) {
        lane.name(&self.new_name(&lane.account.id));
    }

    /// Counts a look for an account queue at take-up.
    fn looked(&self) {
        if let Some(pipeline) = self.pipeline.upgrade() {
            pipeline.decider.metrics.account_queue_looks.inc();
        }
    }

    /// Lists the lane's account queue at the broker, confirmed, before it is declared.
    pub(super) async fn register(&self, lane: &Lane) -> Result<(), BrokerError> {
        let mut registry = self.registry.lock().await;
        let entry = Entry {
            account: lane.account.id.clone(),
            queue: lane.queue().to_string(),
        };
        if registry.entries.contains(&entry) {
            return Ok(());
        }
        if registry.closed || !self.source.held() {
            return Err(BrokerError::Closed {
                operation: "write the list of account queues",
            });
        }
        registry.entries.insert(entry.clone());
        let stored = self.store(&registry).await;
        if stored.is_err() {
            // Written again before the queue is declared.
            registry.entries.remove(&entry);
        }
        stored
    }

    /// Takes `queue`, deleted, off the list. Best effort: a queue listed that is gone costs
    /// the next holder one look.
    pub(super) async fn unregister(&self, lane: &Lane, queue: &str) {
        let mut registry = self.registry.lock().await;
        let entry = Entry {
            account: lane.account.id.clone(),
            queue: queue.to_owned(),
        };
        if !registry.entries.remove(&entry) || registry.closed || !self.source.held() {
            return;
        }
        if let Err(e) = self.store(&registry).await {
            tracing::debug!(queue, error = %e, "could not take a deleted account queue off the list; the next holder looks at it once");
        }
    }

    async fn store(&self, registry: &Registry) -> Result<(), BrokerError> {
        let source = &self.source;
        lane_registry::store(
            &source.connection,
            &source.amqp,
            &source.publisher,
            &source.queue,
            &registry.content(),
        )
        .await
    }
}

impl Registry {
    /// The list to write.
    fn content(&self) -> List {
        List {
            queues: self.entries.iter().cloned().collect(),
            old_names_until: self.old_names_until,
        }
    }
}
