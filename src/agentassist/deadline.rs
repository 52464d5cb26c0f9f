//! A command's deadline as the API calls see it: when it must be done by, how long a start
//! may be waited for, and whether a wait reaches it (all computed without overflow).

use std::time::{Duration, Instant, SystemTime};

use crate::contract::Command;

/// Whether waiting `wait` from `now` reaches `deadline` (or past anything representable).
pub(super) fn reaches(now: Instant, wait: Duration, deadline: Instant) -> bool {
    now.checked_add(wait).is_none_or(|at| at >= deadline)
}

/// When `command` must be done by, as an `Instant` from `now`. A deadline too far away to be
/// an `Instant` is no deadline at all.
pub(crate) fn deadline_of(command: &Command, now: Instant) -> Option<Instant> {
    command
        .deadline
        .and_then(|d| match d.duration_since(SystemTime::now()) {
            Ok(left) => now.checked_add(left),
            Err(_) => Some(now),
        })
}

/// How long a start may be waited for: until the deadline, or until the aside limit when
/// that comes first (then also returned, as the aside limit in force).
pub(crate) fn start_limit(
    deadline: Option<Instant>,
    aside: Option<Duration>,
) -> (Option<Instant>, Option<Instant>) {
    let aside_at = aside.and_then(|d| Instant::now().checked_add(d));
    let by_aside = aside_at.filter(|a| deadline.is_none_or(|d| *a < d));
    (by_aside.or(deadline), by_aside)
}
