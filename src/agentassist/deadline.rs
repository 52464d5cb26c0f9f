//! A command's deadline as the API calls see it: when it must be done by, and whether a wait
//! reaches it (computed without overflow).

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
