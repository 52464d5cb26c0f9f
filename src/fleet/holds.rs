//! The holds of one replica (docs/contract.md §9, "One holder at a time"): at most one replica
//! has a consumer registered on a partition queue, or on the commands queue as intake.
//!
//! - [`Fleet::take_hold`] (`lua/hold.lua`) takes a queue's hold atomically, before the
//!   consumer registers: a queue another replica holds is left alone, waiting consumers
//!   included.
//! - Every heartbeat keeps this replica's holds for another `fleet.member_ttl`
//!   (`lua/heartbeat.lua`); a hold not kept expires, so a replica that died loses its holds.
//! - [`Fleet::give_hold`] gives one up, once the consumer's channel is closed.
//! - So that expiry is safe, a replica whose holds were last kept at `t` (the instant *before*
//!   the heartbeat that kept them was sent: Redis set their expiry after it) must have stopped
//!   consuming by `t + member_ttl − heartbeat`: the [`deadline`](Fleet::hold_deadline) the
//!   consumer watches. It then closes its channels by itself and takes the holds again when
//!   the fleet answers; its running commands keep their claims.
//! - Redis that loses its state (restarted without its data, or flushed) loses every hold at
//!   once. The first replica to heartbeat then would see itself alone and take the others'
//!   holds before they could take them back, and the others, finding theirs taken, would drop
//!   every connection: the whole fleet would churn. So the heartbeat keeps an epoch
//!   (`lua/heartbeat.lua`): a replica that knew one and finds none (or finds one made right
//!   after by a replica that just started) marks the new one as made after a loss, and for
//!   `fleet.member_ttl` from then no hold is taken anew (`lua/hold.lua`) and the membership
//!   moves no partition, while every holder takes its own holds back in its heartbeat (a hold
//!   it kept in time and finds gone is set again). By then every holder has heartbeated, or
//!   has stopped consuming by itself (its deadline came first). Nor is any hold taken before
//!   the fleet has an epoch: Redis lost its state and nobody has heartbeated since.
//! - A replica frozen past `fleet.member_ttl` (a VM or GC pause) wakes with its deadline past
//!   and its holds perhaps another's. Its heartbeat then sets no hold found gone again (only one
//!   it kept in time, after Redis lost its state, is: see above); and until it holds its queues
//!   again it starts no call ([`Fleet::holds_valid`], checked right before a request leaves,
//!   and [`Holds::valid`] for whatever the broker side does on behalf of a source). A command it
//!   was running when its holds lapsed never calls again ([`Fleet::holds_valid_in`]), even
//!   once it holds queues again: its delivery went back with the connection, to the holder.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::{Fleet, FleetError, millis, scripts};
use crate::broker::holds::Holds;

/// What this replica holds, each queue with the instant by which its consumer must have
/// stopped unless the hold is kept again; and the earliest of them.
#[derive(Debug)]
pub(crate) struct HoldState {
    held: Mutex<BTreeMap<String, Instant>>,
    deadline: watch::Sender<Option<Instant>>,
    /// Whether this replica ever held a queue: a replica that does not share work through
    /// holds (no partitions) is never fenced by them.
    used: AtomicBool,
    /// Counts the times the holds lapsed: lost, or all given up.
    term: AtomicU64,
}

impl Default for HoldState {
    fn default() -> Self {
        Self {
            held: Mutex::default(),
            deadline: watch::Sender::new(None),
            used: AtomicBool::new(false),
            term: AtomicU64::new(0),
        }
    }
}

/// One unbroken stretch of this replica's holds ([`Fleet::hold_term`]): it ends when a hold is
/// lost or every hold is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldTerm(u64);

impl HoldState {
    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Instant>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Brings the deadline in line with `held`: the earliest.
    fn settle(&self, held: &BTreeMap<String, Instant>) {
        let next = held.values().min().copied();
        self.deadline.send_if_modified(|deadline| {
            let changed = *deadline != next;
            *deadline = next;
            changed
        });
    }
}

impl Fleet {
    fn hold_key(&self, queue: &str) -> String {
        self.key("hold", queue)
    }

    /// `lua/hold.lua` on `queue`'s hold, `mode` `take` or `give`: '' or the other holder ('-':
    /// none, but no hold may be taken anew yet).
    async fn hold(&self, queue: &str, mode: &str) -> Result<String, FleetError> {
        let mut invocation = scripts::HOLD.prepare_invoke();
        invocation
            .key(self.hold_key(queue))
            .key(self.key("fleet", "epoch"))
            .arg(&self.claimant)
            .arg(mode)
            .arg(millis(self.member_ttl));
        self.invoke_acknowledged("hold", &invocation).await
    }

    /// The deadline for holds kept by a call sent at `sent`.
    fn stop_by(&self, sent: Instant) -> Instant {
        sent + self.member_ttl.saturating_sub(self.heartbeat)
    }

    /// Takes the hold of `queue`: `None` when this replica holds it now, else the holder (or
    /// why nobody may take it yet: the fleet settles after Redis lost its state, see the
    /// module's documentation).
    pub async fn take_hold(&self, queue: &str) -> Result<Option<String>, FleetError> {
        let sent = Instant::now();
        let holder = self.hold(queue, "take").await?;
        if holder == "-" {
            return Ok(Some(
                "nobody yet: the fleet settles after Redis lost its state".to_owned(),
            ));
        }
        if !holder.is_empty() {
            return Ok(Some(holder));
        }
        let mut held = self.holds.held();
        held.insert(queue.to_owned(), self.stop_by(sent));
        self.holds.used.store(true, Ordering::Release);
        self.holds.settle(&held);
        Ok(None)
    }

    /// Gives the hold of `queue` up (once the consumer's channel is closed). It is no longer
    /// kept either way: if Redis does not answer, it expires.
    pub async fn give_hold(&self, queue: &str) {
        {
            let mut held = self.holds.held();
            if held.remove(queue).is_none() {
                return;
            }
            if held.is_empty() {
                self.holds.term.fetch_add(1, Ordering::AcqRel);
            }
            self.holds.settle(&held);
        }
        match self.hold(queue, "give").await {
            Ok(holder) if holder.is_empty() => tracing::debug!(queue, "hold given"),
            Ok(holder) => {
                tracing::warn!(queue, %holder, "a hold this replica gave had already gone to another")
            }
            Err(e) => {
                tracing::warn!(queue, error = %e, "could not give a hold; it expires within fleet.member_ttl")
            }
        }
    }

    /// The queues held, in the order the heartbeat keeps them, each with whether it may be
    /// set again should the heartbeat find it gone: only if kept in time, this heartbeat sent
    /// (at `sent`) before its deadline (see the module's documentation).
    pub(crate) fn holds_to_keep(&self, sent: Instant) -> Vec<(String, bool)> {
        self.holds
            .held()
            .iter()
            .map(|(queue, by)| (queue.clone(), sent < *by))
            .collect()
    }

    /// Whether this replica holds any queue.
    pub fn holding(&self) -> bool {
        !self.holds.held().is_empty()
    }

    /// A heartbeat sent at `sent` kept `kept`, except those at the positions in `lost`
    /// (0-based). A hold lost while still held means another may consume there: consuming
    /// must stop now.
    pub(crate) fn holds_kept(&self, sent: Instant, kept: &[(String, bool)], lost: &[usize]) {
        let mut held = self.holds.held();
        let really_lost: Vec<&String> = lost
            .iter()
            .filter_map(|&i| kept.get(i))
            .map(|(queue, _)| queue)
            .filter(|q| held.contains_key(*q))
            .collect();
        if !really_lost.is_empty() {
            tracing::error!(queues = ?really_lost, "holds lost to expiry; letting every queue go at once");
            held.values_mut().for_each(|by| *by = (*by).min(sent));
            self.holds.term.fetch_add(1, Ordering::AcqRel);
        } else {
            let by = self.stop_by(sent);
            for (queue, _) in kept {
                if let Some(at) = held.get_mut(queue) {
                    *at = (*at).max(by);
                }
            }
        }
        self.holds.settle(&held);
    }

    /// Whether this replica's holds are valid now: it holds its queues, and their deadline has
    /// not passed (`now < deadline`). False from the moment a pause, a silent Redis or a lost
    /// hold took them, until it holds queues again; and while it holds none. Always true for a
    /// replica that never held a queue (one that does not share work through holds). Checked
    /// right before anything is done on behalf of a held queue that another holder must not
    /// see done twice: an API call, a publish or a delete.
    pub fn holds_valid(&self) -> bool {
        if !self.holds.used.load(Ordering::Acquire) {
            return true;
        }
        self.holds
            .deadline
            .borrow()
            .is_some_and(|by| Instant::now() < by)
    }

    /// The current stretch of this replica's holds: taken when a command begins, so that
    /// [`Fleet::holds_valid_in`] can tell whether the holds it began under are still held.
    pub fn hold_term(&self) -> HoldTerm {
        HoldTerm(self.holds.term.load(Ordering::Acquire))
    }

    /// Whether the holds are valid now ([`Fleet::holds_valid`]) and have not lapsed since
    /// `term` was taken: a command that began under holds that lapsed (a pause past
    /// `fleet.member_ttl`) has had its delivery returned to the queues' next holder, and must
    /// not call for it even once this replica holds queues again.
    pub fn holds_valid_in(&self, term: HoldTerm) -> bool {
        self.holds_valid() && self.hold_term() == term
    }

    /// When consuming must have stopped (see the module's documentation).
    pub fn hold_deadline(&self) -> watch::Receiver<Option<Instant>> {
        self.holds.deadline.subscribe()
    }
}

impl Holds for Fleet {
    fn take<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, bool> {
        async move {
            match self.take_hold(queue).await {
                Ok(None) => true,
                Ok(Some(holder)) => {
                    tracing::debug!(queue, %holder, "held by another replica; waiting");
                    false
                }
                Err(e) => {
                    tracing::debug!(queue, error = %e, "cannot take a hold");
                    false
                }
            }
        }
        .boxed()
    }

    fn give<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, ()> {
        self.give_hold(queue).boxed()
    }

    fn give_all(&self) -> BoxFuture<'_, ()> {
        async move {
            let held: Vec<String> = self.holds.held().keys().cloned().collect();
            for queue in held {
                self.give_hold(&queue).await;
            }
        }
        .boxed()
    }

    fn deadline(&self) -> watch::Receiver<Option<Instant>> {
        self.hold_deadline()
    }

    fn valid(&self) -> bool {
        self.holds_valid()
    }
}
