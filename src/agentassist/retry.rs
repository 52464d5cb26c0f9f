//! The retry schedule for transient failures: exponential backoff with full jitter
//! ([`crate::backoff`]) within `retry.max_attempts`, and how much of a `Retry-After` is
//! honoured.

use std::time::Duration;

use crate::backoff;
use crate::config::RetrySettings;

/// `[retry]`, ready to use.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    initial: Duration,
    max: Duration,
    max_attempts: u32,
    max_retry_after: Duration,
}

impl RetryPolicy {
    /// From validated settings.
    pub fn new(settings: &RetrySettings) -> Self {
        Self {
            initial: settings.initial_delay,
            max: settings.max_delay,
            max_attempts: settings.max_attempts,
            max_retry_after: settings.max_retry_after,
        }
    }

    /// The part of a server's `Retry-After` that is honoured: at most `retry.max_retry_after`.
    pub fn honoured_retry_after(&self, asked: Duration) -> Duration {
        asked.min(self.max_retry_after)
    }

    /// Calls per command, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The waits before attempts 2, 3, …, `max_attempts`, jitter applied; then nothing.
    pub fn delays(&self) -> backoff::Delays {
        let retries = self.max_attempts.saturating_sub(1) as usize;
        backoff::delays(self.initial, self.max, Some(retries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy::new(&RetrySettings {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(800),
            max_attempts,
            max_retry_after: Duration::from_secs(60),
        })
    }

    #[test]
    fn one_delay_per_retry_and_none_after_the_budget() {
        assert_eq!(policy(8).delays().count(), 7);
        assert_eq!(policy(1).delays().count(), 0);
    }

    #[test]
    fn delays_are_jittered_below_the_exponential_step_and_cap() {
        let caps = [100, 200, 400, 800, 800, 800, 800];
        let mut saw_spread = false;
        for _ in 0..200 {
            let ds: Vec<Duration> = policy(8).delays().collect();
            for (d, cap) in ds.iter().zip(caps) {
                assert!(*d <= Duration::from_millis(cap), "{d:?} > {cap}ms");
                saw_spread |= *d < Duration::from_millis(cap / 2);
            }
        }
        assert!(saw_spread, "full jitter must reach below half the step");
    }
}
