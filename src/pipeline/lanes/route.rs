//! Where a command of a source goes: taken in, or set aside in its account's queue, or, before
//! the source's list of account queues is read, held in order until it is.

use std::sync::{Arc, PoisonError};

use super::super::sessions::SessionQueues;
use super::super::{Job, Origin};
use tokio::sync::mpsc;

use super::{Lane, LaneState, SourceLanes, bucket};
use crate::fairness::account::Account;

/// Where a command of a lane's account goes.
pub(in crate::pipeline) enum Route {
    /// Taken in, queued behind its session: the job to run now, if its session was idle.
    Here(Option<Box<Job>>),
    /// Set aside in the account queue.
    Aside,
}

impl SourceLanes {
    /// Where a new command of `account` goes: taken in unless its account is congested or its
    /// lane is on; else, in arrival order, to the account queue. A command taken in is queued
    /// behind its session by `queue_up` while the lane is held, so no command set aside later
    /// can pass it.
    pub(in crate::pipeline) fn route(
        self: &Arc<Self>,
        account: &Arc<Account>,
        job: Box<Job>,
        sessions: &SessionQueues<Box<Job>>,
    ) -> Route {
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(parked) = parked.as_mut() {
            // Before the list is read, nothing is known of the account's queue.
            parked.push(*job);
            return Route::Aside;
        }
        drop(parked);
        self.route_now(account, job, sessions)
    }

    /// Routes what came before the list was read, in order, and from now on every command as
    /// it comes.
    pub(super) fn release_parked(self: &Arc<Self>) {
        let Some(pipeline) = self.pipeline.upgrade() else {
            return;
        };
        // Held while they are routed: a command that comes meanwhile waits behind them.
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        for job in parked.take().unwrap_or_default() {
            let Ok(command) = &job.parsed.command else {
                continue;
            };
            let account = command.bot.account.clone();
            if let Route::Here(Some(job)) =
                self.route_now(&account, Box::new(job), &pipeline.sessions)
            {
                self.source.tracker.spawn(pipeline.clone().run_session(job));
            }
        }
    }

    fn route_now(
        self: &Arc<Self>,
        account: &Arc<Account>,
        mut job: Box<Job>,
        sessions: &SessionQueues<Box<Job>>,
    ) -> Route {
        let lane = self.lane(account);
        let mut state = lane.state();
        let session = job.parsed.session_key();
        let take_in = |mut job: Box<Job>| {
            job.origin = Origin::TakenIn {
                lanes: self.clone(),
                runs_here: false,
            };
            Route::Here(sessions.push_marked(&session, job, true))
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
        self.set_aside(&lane, &mut state, *job);
        Route::Aside
    }

    /// Sets aside `job`, taken in earlier, and `behind()` (the commands of its session waiting
    /// after it, `None` if one of them may not go: see [`SourceLanes::may_move`]), unless a
    /// later command of its session is set aside or taken back already: then the job is handed
    /// back, to run here.
    pub(in crate::pipeline) fn defer(
        self: &Arc<Self>,
        job: Box<Job>,
        behind: impl FnOnce() -> Option<Vec<Box<Job>>>,
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
        // Taken under the lane's lock, so no command of the account is taken in meanwhile.
        let Some(behind) = behind() else {
            return Err(job);
        };
        if !state.on {
            lane.turn_on(&mut state);
        }
        self.set_aside(&lane, &mut state, *job);
        for job in behind {
            self.set_aside(&lane, &mut state, *job);
        }
        Ok(())
    }

    /// Whether a job waiting behind one these lanes set aside may go with it: one whose
    /// delivery went back already (it is let go), one of these lanes' own, or one that is not
    /// a command. Not one taken back from an account queue (its lane counts it until it
    /// settles), nor one another tenure of the source took in: moving those would put them where no holder reads, or behind commands
    /// of their session that came after them.
    pub(in crate::pipeline) fn may_move(self: &Arc<Self>, job: &Job) -> bool {
        match &job.origin {
            Origin::Lane(_) => false,
            _ if !job.ours() => true,
            Origin::Source => true,
            Origin::TakenIn { lanes, .. } => Arc::ptr_eq(lanes, self),
        }
    }

    /// Sends `job` to the lane's task, to be published to the account queue.
    pub(super) fn set_aside(
        self: &Arc<Self>,
        lane: &Arc<Lane>,
        state: &mut LaneState,
        mut job: Job,
    ) {
        if self.stop.is_cancelled() || self.pipeline.upgrade().is_some_and(|p| p.leaves_at_stop()) {
            // The source is let go (or the intake stops): the delivery goes back with its
            // channel.
            self.forget(job);
            return;
        }
        if !job.ours() {
            // Its delivery went back already: a copy in the account queue would be a second.
            job.returned();
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
        let sent = match state.inbox.as_ref() {
            Some(inbox) => inbox.send(job).map_err(|mpsc::error::SendError(job)| job),
            // Not started: the source was let go meanwhile.
            None => Err(job),
        };
        if let Err(job) = sent {
            // The task ended (the source is closing): the delivery goes back with its channel.
            state.queued = state.queued.saturating_sub(1);
            lane.account.aside_changed(-1);
            self.forget(job);
        }
    }
}
