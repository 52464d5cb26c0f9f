//! The intake of a fleet that shares work (docs/contract.md §9, docs/fairness.md): the
//! [`Pipeline`](super::Pipeline) on the commands queue of the replica that holds it, which
//! routes each command, body and properties unchanged, to the partition queue of its
//! `botSessionId` ([`ownership::partition_of`]) instead of calling the API, and acks it only
//! after the broker confirmed it there. A command that cannot be read is rejected here, as a
//! worker alone would.
//!
//! Fairness starts here. Each account has a budget of its own at the intake, the vendor's
//! (`rate_limit` per `rate_window`): a command is routed when it could start, so its partition
//! takes it in and calls at once. An account whose next admission is further than
//! `commands.aside_after` is congested, and its commands are set aside in its own queue beside
//! the commands queue, one queue per account with a backlog across the fleet, whatever the
//! partitions; they come back, in order, at the account's pace. The partitions keep lanes of
//! their own for what the intake cannot see (a 429's pause, slow calls), which seldom turn on.
//!
//! The intake's budgets start from the fleet's: when it takes the commands queue up, and when
//! it starts admitting again after a replica of an earlier version left, each account's budget
//! is read from what the fleet booked in Redis at its first command ([`Fleet::booked`]). An
//! intake that started from an empty budget would admit a window's worth at once that the
//! partitions could not start, and they would set them aside in queues of their own.
//!
//! Order: commands of one session are routed one after another (each confirmed before the
//! next is published), so a session's commands reach their partition in arrival order even
//! when a publish fails and is retried. Different sessions are routed concurrently.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::Job;
use crate::agentassist::deadline::deadline_of;
use crate::backoff;
use crate::fairness::account::Account;
use crate::fairness::start::start_limit;
use crate::fleet::{Fleet, ownership};
use crate::ops::metrics::Metrics;
use crate::shutdown::Shutdown;

/// After the fleet's budget of an account could not be read: how long the intake admits from
/// its own before it tries again.
const SEED_RETRY: Duration = Duration::from_secs(1);

/// With the `fault-injection` feature, the partition of a command with this `orgId` refuses
/// it for [`FAULT_REFUSED_ROUTE`] from its first attempt, as a partition queue at its length
/// limit would: a test can hold one command's route up.
#[cfg(feature = "fault-injection")]
pub const FAULT_REFUSED_ROUTE_ORG_ID: &str = "o-fault-injection-refused-route";

/// How long [`FAULT_REFUSED_ROUTE_ORG_ID`] is refused.
#[cfg(feature = "fault-injection")]
pub const FAULT_REFUSED_ROUTE: Duration = Duration::from_secs(6);

/// First and longest wait before routing a command again after the broker refused it.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Where a fleet's intake routes commands, and how.
pub struct Router {
    /// The partition queues, by index.
    queues: Vec<String>,
    metrics: Arc<Metrics>,
    /// Cancelled when the shutdown grace ran out: stop retrying, the broker returns the rest.
    shutdown: Shutdown,
    /// Says whether every member admits at the intake ([`Fleet::everyone_admits`]), and what
    /// each account's budget holds across the fleet.
    fleet: Arc<Fleet>,
    /// Counts the times the intake's budgets must start again from the fleet's: a tenure of the
    /// commands queue, or admitting again after a pause of the gate.
    era: AtomicU64,
    /// Whether the last command found every member admitting.
    admitting: AtomicBool,
    /// Each account's last reading of the fleet's budget.
    seeds: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Seed>>>>,
}

/// When an account's budget at the intake was last read from the fleet's.
#[derive(Debug, Default)]
struct Seed {
    /// The era it was read in.
    era: u64,
    /// After a reading failed: not before this again.
    retry_at: Option<Instant>,
}

/// What became of a command at the intake.
pub(super) enum Admitted {
    /// Routed to its partition and acked.
    Routed,
    /// Left to go back to its queue with its channel, in delivery order: the worker stops, or
    /// the delivery is no longer this replica's. Nothing was done for it.
    Left,
    /// Its account cannot admit it within `aside_after`: it is to be set aside.
    Aside,
}

impl Router {
    /// A router to the partition queues of `commands_queue` in `fleet`.
    pub fn new(
        commands_queue: &str,
        fleet: Arc<Fleet>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            queues: (0..fleet.partitions())
                .map(|k| crate::contract::names::partition_queue(commands_queue, k))
                .collect(),
            metrics,
            shutdown,
            fleet,
            era: AtomicU64::new(1),
            admitting: AtomicBool::new(false),
            seeds: Mutex::default(),
        }
    }

    /// Whether the intake leaves what it holds: once stopping has begun it routes and sets
    /// aside nothing, and what it holds goes back with its channels, in delivery order. (A
    /// command left while a later one of its session was set aside would come back behind it.)
    pub(super) fn leaves(&self) -> bool {
        self.shutdown.is_stopping()
    }

    /// The commands queue was taken up (again): each account's budget is read anew from the
    /// fleet's at its next command.
    pub(super) fn new_tenure(&self) {
        self.era.fetch_add(1, Ordering::AcqRel);
    }

    /// Reads `account`'s budget from what the fleet booked, once an era: the intake admits from
    /// where the fleet stands. Best effort: when Redis does not answer, the intake goes on with
    /// its own view and tries again [`SEED_RETRY`] later; the partitions, which book in Redis,
    /// stay right meanwhile. False when stopping began: nothing was done for the command.
    async fn seeded(&self, account: &Account) -> bool {
        let cell = {
            let mut seeds = self.seeds.lock().unwrap_or_else(PoisonError::into_inner);
            seeds.entry(account.id.clone()).or_default().clone()
        };
        let mut seed = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return false,
            seed = cell.lock() => seed,
        };
        // Read under the lock, so an account's era only ever goes forward.
        let era = self.era.load(Ordering::Acquire);
        if seed.era == era || seed.retry_at.is_some_and(|at| Instant::now() < at) {
            return true;
        }
        let booked = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return false,
            booked = self.fleet.booked(&account.id, account.pacer.window()) => booked,
        };
        match booked {
            Ok(booked) => {
                let now = Instant::now();
                let at = |us: i64| match u64::try_from(us) {
                    Ok(ahead) => now.checked_add(Duration::from_micros(ahead)),
                    Err(_) => now.checked_sub(Duration::from_micros(us.unsigned_abs())),
                };
                let paused = (!booked.paused.is_zero())
                    .then(|| now.checked_add(booked.paused))
                    .flatten();
                account
                    .pacer
                    .seed(booked.starts.iter().filter_map(|&us| at(us)), paused);
                *seed = Seed {
                    era,
                    retry_at: None,
                };
            }
            Err(e) => {
                tracing::debug!(account = %account.id, error = %e, "could not read the account's budget from the fleet's; admitting from the intake's own meanwhile");
                seed.retry_at = Instant::now().checked_add(SEED_RETRY);
            }
        }
        true
    }

    fn partition_count(&self) -> u16 {
        u16::try_from(self.queues.len()).unwrap_or(u16::MAX)
    }

    /// Waits for the command's admission by its account's budget at the intake, then routes
    /// it. With `aside`, an admission further away than that books nothing and sets the
    /// command aside instead. A command whose deadline comes before its admission is routed
    /// at once and books nothing: its partition reports it expired. While a replica of an
    /// earlier version is a member of the fleet, nothing is admitted: commands are routed at
    /// once, as that version does, and the partitions keep the accounts apart; what was set
    /// aside already still comes back in order.
    pub(super) async fn admit(&self, job: &mut Job, aside: Option<Duration>) -> Admitted {
        let Ok(valid) = &job.parsed.command else {
            return Admitted::Left;
        };
        let now = Instant::now();
        let (account, deadline) = (valid.bot.account.clone(), deadline_of(&valid.command, now));
        let session = valid.command.bot_session_id.clone();
        // Once stopping has begun nothing more is routed: a command left here goes back with
        // its channel, and a later one of its session must not go ahead of it.
        if self.leaves() {
            return Admitted::Left;
        }
        if !self.fleet.everyone_admits() {
            self.admitting.store(false, Ordering::Release);
            return self.routed(job, &session).await;
        }
        if !self.admitting.swap(true, Ordering::AcqRel) {
            self.new_tenure();
        }
        if !self.seeded(&account).await {
            return Admitted::Left;
        }
        let (limit, by_aside) = start_limit(deadline, aside);
        match account.pacer.reserve(limit) {
            Ok(at) => {
                account.starts_in(at.saturating_duration_since(now));
                // Nothing has been done for it yet: when the worker stops, it goes back at
                // once, and the commands queue changes hands without waiting for the grace.
                tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => return Admitted::Left,
                    () = tokio::time::sleep_until(at.into()) => {}
                }
                account.waited_for_budget(now.elapsed());
            }
            Err(first) => {
                account.starts_in(first.slot.saturating_duration_since(now));
                if by_aside.is_some() {
                    return Admitted::Aside;
                }
            }
        }
        self.routed(job, &session).await
    }

    /// Routes an admitted command. Its slot goes first: a partition that refuses publishes
    /// holds up the sessions routed there, not its account's other commands.
    async fn routed(&self, job: &mut Job, session: &str) -> Admitted {
        job.slot = None;
        if self.route(job, session).await {
            Admitted::Routed
        } else {
            Admitted::Left
        }
    }

    /// Publishes the command to its partition until the broker confirms it, then acks it;
    /// false if it was not routed. If the connection goes, the broker returns the command (and
    /// those behind it) by itself.
    async fn route(&self, job: &Job, session: &str) -> bool {
        let partition = ownership::partition_of(session, self.partition_count());
        let Some(queue) = self.queues.get(usize::from(partition)) else {
            return false;
        };
        let publisher = &job.publisher;
        let mut waits = backoff::delays(RETRY_MIN, RETRY_MAX, None);
        #[cfg(feature = "fault-injection")]
        let refused_until = (job.parsed.command.as_ref())
            .is_ok_and(|c| c.command.org_id == FAULT_REFUSED_ROUTE_ORG_ID)
            .then(|| Instant::now() + FAULT_REFUSED_ROUTE);
        loop {
            // Its delivery is ours while its channel and its source's connection are open.
            if !publisher.is_connected()
                || !job.delivery.settleable()
                || self.shutdown.is_abandoned()
            {
                return false;
            }
            let publish = publisher.forward(queue, &job.delivery);
            #[cfg(feature = "fault-injection")]
            let publish = async {
                if refused_until.is_some_and(|t| Instant::now() < t) {
                    return Err(crate::broker::PublishError::Nacked(queue.to_owned()));
                }
                publish.await
            };
            match publish.await {
                Ok(()) => break,
                Err(e) if !publisher.is_connected() => {
                    tracing::warn!(error = %e, queue, "could not route a command; the connection is gone and the broker returned it");
                    return false;
                }
                Err(e) => {
                    // Never nacked back: the session's next command would overtake it.
                    let wait = waits.next().unwrap_or(RETRY_MAX);
                    tracing::error!(error = %e, queue, ?wait, "could not route a command; trying again");
                    if self.shutdown.sleep(wait).await.is_err() {
                        return false;
                    }
                }
            }
        }
        self.metrics.fleet_routed.inc();
        if let Err(e) = job.delivery.ack().await {
            // Routed twice at worst; the partition's consumer answers the copy from memory.
            tracing::warn!(error = %e, "could not ack a routed command");
        }
        true
    }
}
