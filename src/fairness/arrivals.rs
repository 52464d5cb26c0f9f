//! The vendor's limit at the vendor's clock (docs/contract.md §4): the last gate a call passes,
//! right before it leaves.
//!
//! The [`Pacer`](super::pacer::Pacer) books starts, but a booked start is not an arrival: a
//! call may leave late (a busy machine, a pool wait) and arrive at the API inside the window of
//! calls booked after it. The vendor counts arrivals, and this process cannot see them; what it
//! does know is that the API saw a call no later than its answer came back, or, when none came,
//! than its departure plus `agentassist.request_timeout`. So a call leaves only while fewer than
//! `rate_limit` calls of its account are on the wire or ended within the last `rate_window`.
//!
//! Why that is enough: were `limit + 1` arrivals within one window `[s, s + window)`, take the one
//! that passed this gate last, at `d < s + window`. Every other of them had passed it before,
//! and ended (its answer came) no earlier than its arrival, so at or after `s > d - window`:
//! each was on the wire or ended within the window before `d`, `limit` of them, and the gate
//! would not have let the last one go.
//!
//! The cost is one latency per window at most (0.2 % at 60 a minute and 100 ms answers): the
//! pacer's bookings already keep calls a window and a guard apart, so the gate mostly waits
//! only for a call that left late or was answered slowly.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// One account's calls on the wire and recent ends, in this process.
#[derive(Debug)]
pub struct Arrivals {
    limit: usize,
    window: Duration,
    /// How long after its departure a call that got no answer may still have arrived.
    unanswered: Duration,
    state: Mutex<State>,
    /// Told whenever a call ends: a waiting departure looks again.
    ended: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Calls that passed the gate and have not ended.
    on_the_wire: usize,
    /// When the API saw each recent call at the latest, ascending.
    ends: VecDeque<Instant>,
}

/// Not yet: when the gate may open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Once a recorded end leaves the window, at this instant.
    Until(Instant),
    /// Once a call on the wire ends.
    UntilAnEnd,
}

impl Arrivals {
    /// `limit` calls in any `window`; a call with no answer counts as seen until `unanswered`
    /// after it left. The window is clamped to [`MAX_DURATION`](crate::config::MAX_DURATION).
    pub fn new(limit: u32, window: Duration, unanswered: Duration) -> Self {
        Self {
            limit: usize::try_from(limit.max(1)).unwrap_or(usize::MAX),
            window: window.min(crate::config::MAX_DURATION),
            unanswered: unanswered.min(crate::config::MAX_DURATION),
            state: Mutex::new(State::default()),
            ended: Notify::new(),
        }
    }

    /// Calls allowed in any window.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The window, at the API's clock.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// How long after its departure a call that got no answer may still have arrived.
    pub fn unanswered(&self) -> Duration {
        self.unanswered
    }

    /// Lets one call leave now, or says when to look again.
    pub fn try_depart(&self) -> Result<Departure<'_>, Closed> {
        self.try_depart_at(Instant::now())
    }

    fn try_depart_at(&self, now: Instant) -> Result<Departure<'_>, Closed> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // An end a window or more ago can no longer share a window with a call leaving now.
        while state.ends.front().is_some_and(|&e| e + self.window <= now) {
            state.ends.pop_front();
        }
        let counted = state.on_the_wire.saturating_add(state.ends.len());
        if counted < self.limit {
            state.on_the_wire += 1;
            return Ok(Departure {
                arrivals: self,
                left: now,
                ended: false,
            });
        }
        // `counted - limit + 1` of them must leave the window first; ends leave in order.
        let must_leave = counted - self.limit + 1;
        match state.ends.get(must_leave - 1) {
            Some(&end) => Err(Closed::Until(end + self.window)),
            None => Err(Closed::UntilAnEnd),
        }
    }

    /// Waits until one call may leave, or until `until` comes first (`None`).
    pub async fn depart(&self, until: Option<Instant>) -> Option<Departure<'_>> {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let closed = match self.try_depart() {
                Ok(departure) => return Some(departure),
                Err(closed) => closed,
            };
            let look_again = match closed {
                Closed::Until(at) => Some(at),
                Closed::UntilAnEnd => None,
            };
            let wake = match (look_again, until) {
                (Some(a), Some(u)) => Some(a.min(u)),
                (a, u) => a.or(u),
            };
            if until.is_some_and(|u| Instant::now() >= u) {
                return None;
            }
            match wake {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => {}
                        () = &mut ended => {}
                    }
                }
                None => ended.await,
            }
        }
    }

    /// Records one call's end at `now`; `seen_by` is when the API saw it at the latest.
    fn end(&self, seen_by: Option<Instant>, now: Instant) {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.on_the_wire = state.on_the_wire.saturating_sub(1);
            if let Some(at) = seen_by {
                let at = at.max(now);
                let i = state.ends.partition_point(|&e| e <= at);
                state.ends.insert(i, at);
            }
        }
        self.ended.notify_waiters();
    }
}

/// A call that passed the gate. Its end is recorded when it is dropped: at once if it was
/// [`answered`](Departure::answered), else as seen until `unanswered` after it left.
#[derive(Debug)]
#[must_use = "a departure records its call's end when dropped"]
pub struct Departure<'a> {
    arrivals: &'a Arrivals,
    left: Instant,
    ended: bool,
}

impl Departure<'_> {
    /// The API answered: it saw the call by now.
    pub fn answered(self) {
        self.answered_at(Instant::now());
    }

    fn answered_at(mut self, now: Instant) {
        self.ended = true;
        self.arrivals.end(Some(now), now);
    }

    /// Nothing was sent after all: the call counts for nothing.
    pub fn unsent(mut self) {
        self.ended = true;
        self.arrivals.end(None, Instant::now());
    }
}

impl Drop for Departure<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let seen_by = self.left.checked_add(self.arrivals.unanswered);
            (self.arrivals).end(Some(seen_by.unwrap_or(self.left)), Instant::now());
        }
    }
}

#[cfg(test)]
mod tests;
