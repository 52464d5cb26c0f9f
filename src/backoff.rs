//! Exponential backoff with full jitter — a uniformly random wait between zero and the
//! exponential step — built once for every schedule in the worker: reconnecting to the
//! broker and retrying the API. Jittered in full, so that clients failing together do not
//! come back together.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// A schedule of waits: doubling steps, each jittered in full.
#[derive(Debug)]
pub struct Delays(ExponentialBackoff);

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.0.next().map(full_jitter)
    }
}

/// Waits doubling from `min` up to `max`, each jittered in full; `times` of them, or without
/// end when `None`.
pub fn delays(min: Duration, max: Duration, times: Option<usize>) -> Delays {
    let builder = ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0);
    let builder = match times {
        Some(n) => builder.with_max_times(n),
        None => builder.without_max_times(),
    };
    Delays(builder.build())
}

/// A uniformly random duration in `[0, step]`.
fn full_jitter(step: Duration) -> Duration {
    let nanos = u64::try_from(step.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_limit_the_waits_go_on_below_the_cap() {
        let max = Duration::from_millis(800);
        let waits: Vec<_> = delays(Duration::from_millis(100), max, None)
            .take(50)
            .collect();
        assert_eq!(waits.len(), 50);
        assert!(waits.iter().all(|w| *w <= max));
    }
}
