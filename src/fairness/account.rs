//! One account at the vendor, as this worker sees it (docs/contract.md §12): its rate budget
//! ([`Pacer`]), its cap on commands in flight, and whether it is *congested* — its next start is
//! further away than `commands.aside_after`, or it already has as many commands waiting in
//! memory as its cap. A congested account's new commands are set aside in its own queue
//! (see `pipeline::lanes`) instead of holding the worker's prefetch, so another account's
//! commands never wait behind them.
//!
//! Bots that share an account share one `Account`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::arrivals::Arrivals;
use super::pacer::Pacer;
use crate::fleet::StartRequest;
use crate::ops::metrics::{AccountLabels, Metrics};

/// The account's series, labelled with its id.
#[derive(Debug, Clone, Default)]
pub struct AccountMetrics {
    /// Commands waiting: in memory for a slot or a start, and set aside in its queues.
    pub waiting: Gauge,
    /// How long the oldest of them has waited.
    pub oldest_wait: Gauge<f64, AtomicU64>,
    /// Commands holding one of the account's slots (waiting for a start, or calling).
    pub in_flight: Gauge,
    /// Time commands spent waiting for the account's budget.
    pub budget_wait: Counter<f64, AtomicU64>,
    /// Commands set aside in the account's queues.
    pub set_aside: Counter,
    /// Operations on its queues that failed.
    pub queue_failures: Counter,
}

impl AccountMetrics {
    /// The series of `account` in `metrics`, created (at zero) if new.
    pub fn of(metrics: &Metrics, account: &str) -> Self {
        let labels = AccountLabels {
            account: account.to_owned(),
        };
        Self {
            waiting: metrics.account_waiting.get_or_create(&labels).clone(),
            oldest_wait: metrics.account_oldest_wait.get_or_create(&labels).clone(),
            in_flight: metrics.account_in_flight.get_or_create(&labels).clone(),
            budget_wait: metrics.account_budget_wait.get_or_create(&labels).clone(),
            set_aside: metrics.account_set_aside.get_or_create(&labels).clone(),
            queue_failures: metrics
                .account_queue_failures
                .get_or_create(&labels)
                .clone(),
        }
    }
}

impl AccountMetrics {
    /// The series an account's twin at a fleet's intake shares: its waits for the budget,
    /// what it sets aside and its queues' failures. Its slots are the intake's own and not
    /// exported (the account's calls are counted where they are made); what waits for it
    /// there is added to the account's own gauges (see [`Account::refresh_gauges`]).
    pub fn at_intake(metrics: &Metrics, account: &str) -> Self {
        let all = Self::of(metrics, account);
        Self {
            budget_wait: all.budget_wait,
            set_aside: all.set_aside,
            queue_failures: all.queue_failures,
            ..Self::default()
        }
    }
}

/// One account's budget, slots and congestion.
#[derive(Debug)]
pub struct Account {
    /// The account id.
    pub id: String,
    /// The account's budget in this process (a fleet paces through Redis instead).
    pub pacer: Pacer,
    /// Its calls on the wire and recent answers: the last gate before a call leaves (in a
    /// fleet, its limit, window and bound; the count is kept in Redis).
    pub arrivals: Arrivals,
    /// `bots.max_in_flight`, as applied (see [`effective_cap`]).
    cap: usize,
    /// One permit per command in flight: from its slot to the end of its execution.
    slots: Arc<Semaphore>,
    /// `commands.aside_after`.
    aside_after: Duration,
    /// Instants are kept as microseconds since this.
    epoch: Instant,
    /// Congested until then (µs since `epoch`): a start was found that far away.
    congested_until: AtomicU64,
    /// Commands taken in directly and not yet holding a slot, counted by the second (since
    /// `epoch`, modulo [`WAIT_SECONDS`]) they were taken in: lock-free on the path of every
    /// command, and enough to tell the oldest wait to the second.
    waiting: Vec<AtomicUsize>,
    /// Commands set aside and not yet settled, over every lane of this process.
    aside: AtomicUsize,
    /// Since when the oldest command set aside has waited, per lane.
    aside_since: Mutex<BTreeMap<String, std::time::SystemTime>>,
    metrics: AccountMetrics,
}

/// The cap applied: `max_in_flight`, but no more than the budget can start in half the
/// broker's `consumer_timeout` divided by `sources + 1`, so no delivery waits unacked for half
/// of it. `sources` is how many sources one replica may hold lanes of (every partition, in a
/// fleet that shares work; else 1): each of their account-queue readers takes up to the cap,
/// and the commands taken in directly hold up to the cap more, so a waiting delivery has at
/// most `(sources + 1) × cap` starts ahead of it (docs/fairness.md, "Unacked time").
pub fn effective_cap(
    max_in_flight: u32,
    rate_limit: u32,
    rate_window: Duration,
    consumer_timeout: Duration,
    sources: u32,
) -> usize {
    let half = consumer_timeout / 2;
    let window = rate_window.max(Duration::from_millis(1));
    // Starts the budget allows in half the timeout, computed without overflow.
    let starts = u128::from(rate_limit).saturating_mul(half.as_millis()) / window.as_millis();
    let starts = starts / (u128::from(sources) + 1);
    let bound = usize::try_from(starts).unwrap_or(usize::MAX).max(1);
    usize::try_from(max_in_flight)
        .unwrap_or(usize::MAX)
        .clamp(1, bound)
}

/// How many seconds of waits in memory are told apart; an older one counts as this old.
const WAIT_SECONDS: usize = 64;

/// A command taken in directly, waiting in memory for its slot; leaves the count on drop.
#[derive(Debug)]
pub struct Waiting {
    account: Arc<Account>,
    second: usize,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(count) = self.account.waiting.get(self.second % WAIT_SECONDS) {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A slot of the account: held from the moment a command may start until its execution ends.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

impl Account {
    /// An account with `limit` calls per `window`, `cap` commands in flight, set aside when
    /// its next start is further than `aside_after`; a call with no answer counts as seen by
    /// the API until `request_timeout` after it left.
    pub fn new(
        id: &str,
        limit: u32,
        window: Duration,
        request_timeout: Duration,
        cap: usize,
        aside_after: Duration,
        metrics: AccountMetrics,
    ) -> Self {
        Self {
            id: id.to_owned(),
            pacer: Pacer::new(limit, window),
            arrivals: Arrivals::new(limit, window, request_timeout),
            cap: cap.max(1),
            slots: Arc::new(Semaphore::new(cap.max(1))),
            aside_after,
            epoch: Instant::now(),
            congested_until: AtomicU64::new(0),
            waiting: (0..WAIT_SECONDS).map(|_| AtomicUsize::new(0)).collect(),
            aside: AtomicUsize::new(0),
            aside_since: Mutex::new(BTreeMap::new()),
            metrics,
        }
    }

    /// A start asked of the fleet's budget of this account, past which (from now) nothing is
    /// to be booked.
    pub fn start_request(&self, deadline_in: Option<Duration>) -> StartRequest {
        StartRequest::new(
            &self.id,
            self.pacer.limit(),
            self.pacer.window(),
            deadline_in,
        )
    }

    /// Commands in flight at most.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// `commands.aside_after`.
    pub fn aside_after(&self) -> Duration {
        self.aside_after
    }

    /// The account's metrics (waiting, in flight, budget waits, set aside).
    pub fn metrics(&self) -> &AccountMetrics {
        &self.metrics
    }

    fn micros_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// Whether a new command should be set aside rather than wait in memory: the account's
    /// next start is known to be further than `aside_after`, or a command waited longer than
    /// that for a slot.
    pub fn congested(&self) -> bool {
        let now = self.micros_since_epoch(Instant::now());
        now < self.congested_until.load(Ordering::Relaxed)
    }

    /// Takes a command in directly, unless the account is congested.
    pub fn take_in(self: &Arc<Self>) -> Option<Waiting> {
        if self.congested() {
            return None;
        }
        let second = self.second_now();
        if let Some(count) = self.waiting.get(second % WAIT_SECONDS) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        Some(Waiting {
            account: self.clone(),
            second,
        })
    }

    fn second_now(&self) -> usize {
        usize::try_from(self.epoch.elapsed().as_secs()).unwrap_or(usize::MAX)
    }

    /// Commands taken in directly and not yet holding a slot.
    pub fn waiting_in_memory(&self) -> usize {
        self.waiting.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Waits for a slot. A wait longer than `aside_after` marks the account congested for as
    /// long again, so commands behind it are set aside meanwhile.
    pub async fn slot(&self) -> Slot {
        let acquire = self.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        let permit = loop {
            match tokio::time::timeout(self.aside_after, &mut acquire).await {
                Ok(permit) => break permit.expect("the slots semaphore is never closed"),
                Err(_) => self.congest_for(self.aside_after),
            }
        };
        self.metrics.in_flight.inc();
        Slot {
            _permit: permit,
            in_flight: self.metrics.in_flight.clone(),
        }
    }

    /// A slot if one is free now.
    pub fn try_slot(&self) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        self.metrics.in_flight.inc();
        Some(Slot {
            _permit: permit,
            in_flight: self.metrics.in_flight.clone(),
        })
    }

    /// A start was booked (or found) `delay` away: past `aside_after`, the account is
    /// congested until the start is that close again. Counts the wait.
    pub fn starts_in(&self, delay: Duration) {
        if delay > self.aside_after {
            self.congest_for(delay.saturating_sub(self.aside_after));
        }
    }

    /// Time spent waiting for the budget.
    pub fn waited_for_budget(&self, waited: Duration) {
        self.metrics.budget_wait.inc_by(waited.as_secs_f64());
    }

    fn congest_for(&self, d: Duration) {
        let until = Instant::now().checked_add(d).unwrap_or_else(Instant::now);
        self.congested_until
            .fetch_max(self.micros_since_epoch(until), Ordering::Relaxed);
    }

    /// Commands set aside (in a lane's inbox, in an account queue, or taken from it and not
    /// settled) went up or down by `delta`.
    pub fn aside_changed(&self, delta: isize) {
        if delta >= 0 {
            self.aside
                .fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
        } else {
            let _ = self
                .aside
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(delta.unsigned_abs()))
                });
        }
    }

    /// Notes since when the head of `lane`'s queue has waited; `None` when it is empty.
    pub fn lane_head(&self, lane: &str, since: Option<std::time::SystemTime>) {
        let mut heads = self
            .aside_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match since {
            Some(since) => {
                heads.insert(lane.to_owned(), since);
            }
            None => {
                heads.remove(lane);
            }
        }
    }

    /// Sets the gauges of waiting commands and of the oldest wait, counting also what waits
    /// for the account at a fleet's intake (`at_intake`).
    pub fn refresh_gauges(&self, at_intake: Option<&Account>) {
        let (mut total, mut oldest) = self.waits();
        if let Some((more, older)) = at_intake.map(Account::waits) {
            total = total.saturating_add(more);
            oldest = oldest.max(older);
        }
        self.metrics
            .waiting
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        self.metrics.oldest_wait.set(oldest.as_secs_f64());
    }

    /// Commands waiting, in memory and set aside, and the oldest wait.
    fn waits(&self) -> (usize, Duration) {
        let in_memory = self.waiting_in_memory();
        let now = self.second_now();
        let oldest_in_memory = (0..WAIT_SECONDS).rev().find_map(|age| {
            let second = now.checked_sub(age)?;
            let count = self.waiting.get(second % WAIT_SECONDS)?;
            (count.load(Ordering::Relaxed) > 0).then(|| Duration::from_secs(age as u64))
        });
        let aside = self.aside.load(Ordering::Relaxed);
        let oldest_aside = self
            .aside_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .min()
            .and_then(|since| since.elapsed().ok());
        let oldest = oldest_in_memory
            .into_iter()
            .chain(oldest_aside)
            .max()
            .unwrap_or_default();
        (in_memory.saturating_add(aside), oldest)
    }
}

#[cfg(test)]
mod tests;
