//! Per-account call pacing: no sliding window of `rate_window` ever holds more than
//! `rate_limit` calls (docs/contract.md §4).
//!
//! A token bucket sized for a whole window lets a full window's worth through at once and then
//! a steady refill, so the first minute sees nearly twice the limit. This is a sliding log
//! instead: every call start is recorded, and call n may start only `window` after call
//! n − limit. Starts are handed out as reservations, in order, so concurrent commands queue
//! fairly and each one knows at once when it may call — or that its deadline comes first.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Absorbs the scheduling jitter between a reservation and the request on the wire, so the
/// vendor's clock never sees two calls closer than the window. 25 ms was not enough on two
/// loaded cores: calls n and n + limit once arrived 27 ms closer than their reservations.
/// 100 ms costs 0.17 % of a 60 s window.
const GUARD: Duration = Duration::from_millis(100);

/// The budget of one account.
#[derive(Debug)]
pub struct Pacer {
    limit: usize,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Start times handed out, ascending, none older than one window.
    starts: VecDeque<Instant>,
    /// Set by a 429's `Retry-After`: nothing starts before this.
    paused_until: Option<Instant>,
}

/// The deadline comes before the next free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineFirst {
    /// When the call could have started.
    pub slot: Instant,
}

impl Pacer {
    /// A budget of `limit` calls in any `window`. The window is clamped to
    /// [`MAX_DURATION`](crate::config::MAX_DURATION), so an instant plus it cannot overflow.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit: usize::try_from(limit.max(1)).unwrap_or(usize::MAX),
            window: window
                .min(crate::config::MAX_DURATION)
                .saturating_add(GUARD),
            state: Mutex::new(State::default()),
        }
    }

    /// Calls allowed in any window.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The window, with the guard against clock jitter included.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Reserves the earliest start allowed, unless it falls after `deadline`.
    /// The caller sleeps until the returned instant, then calls.
    pub fn reserve(&self, deadline: Option<Instant>) -> Result<Instant, DeadlineFirst> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while state
            .starts
            .front()
            .is_some_and(|&t| t + self.window <= now)
        {
            state.starts.pop_front();
        }
        let mut slot = now.max(state.paused_until.unwrap_or(now));
        let len = state.starts.len();
        if len >= self.limit {
            slot = slot.max(state.starts[len - self.limit] + self.window);
        }
        // Reservations after a pause can be later than this slot only if the pause moved; keep
        // the log ordered so the indexing above stays right.
        if let Some(&last) = state.starts.back() {
            slot = slot.max(last);
        }
        if deadline.is_some_and(|d| slot > d) {
            return Err(DeadlineFirst { slot });
        }
        state.starts.push_back(slot);
        Ok(slot)
    }

    /// Takes another view of the budget, which holds every start up to now: `starts` (any
    /// order; those a window old or more are dropped) and a pause until `paused`. Of its own,
    /// this pacer keeps only the starts it handed out for later (whoever holds them waits for
    /// them, and nobody else has seen them), and its pause if later.
    pub fn seed(&self, starts: impl IntoIterator<Item = Instant>, paused: Option<Instant>) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<Instant> = starts
            .into_iter()
            .filter(|&t| t.checked_add(self.window).is_some_and(|end| end > now))
            .chain(state.starts.iter().copied().filter(|&t| t > now))
            .collect();
        all.sort_unstable();
        state.starts = all.into();
        if let Some(until) = paused {
            state.paused_until = Some(state.paused_until.map_or(until, |p| p.max(until)));
        }
    }

    /// Until when the account is paused (a 429's `Retry-After`), if that is still ahead.
    pub fn paused(&self) -> Option<Instant> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.paused_until.filter(|&p| p > Instant::now())
    }

    /// The API said "not before": hold every later call of this account until then.
    pub fn pause_until(&self, until: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.paused_until = Some(state.paused_until.map_or(until, |p| p.max(until)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The property itself: any window holds at most `limit` starts.
    fn assert_paced(starts: &[Instant], limit: usize, window: Duration) {
        for (i, &t) in starts.iter().enumerate() {
            let in_window = starts[i..].iter().take_while(|&&u| u < t + window).count();
            assert!(
                in_window <= limit,
                "{in_window} starts within {window:?} of start {i}"
            );
        }
    }

    #[test]
    fn burst_is_spread_so_no_window_exceeds_the_limit() {
        let pacer = Pacer::new(5, Duration::from_secs(60));
        let starts: Vec<Instant> = (0..23).map(|_| pacer.reserve(None).unwrap()).collect();
        assert_paced(&starts, 5, Duration::from_secs(60));
        // The first five go at once; the sixth waits a whole window, not a fifth of one.
        assert!(starts[4] - starts[0] < Duration::from_millis(50));
        assert!(starts[5] - starts[0] >= Duration::from_secs(60));
        assert!(starts[22] - starts[0] >= Duration::from_secs(240));
    }

    #[test]
    fn a_deadline_before_the_slot_reserves_nothing() {
        let pacer = Pacer::new(1, Duration::from_secs(10));
        pacer.reserve(None).unwrap();
        let soon = Instant::now() + Duration::from_secs(1);
        let err = pacer.reserve(Some(soon)).unwrap_err();
        assert!(err.slot > soon);
        // The refused request took no slot: the next one is still one window out, not two.
        let next = pacer.reserve(None).unwrap();
        assert!(next < Instant::now() + Duration::from_secs(11));
    }

    #[test]
    fn pause_holds_later_calls() {
        let pacer = Pacer::new(100, Duration::from_secs(1));
        let until = Instant::now() + Duration::from_secs(3);
        pacer.pause_until(until);
        assert!(pacer.reserve(None).unwrap() >= until);
    }

    /// Seeded with another view of the budget, a pacer hands out what that view leaves: of
    /// its own it keeps only the starts it handed out for later, and its pause if later.
    #[test]
    fn seeding_replaces_what_was_handed_out() {
        let pacer = Pacer::new(2, Duration::from_secs(10));
        let now = Instant::now();
        pacer.reserve(None).unwrap();
        pacer.reserve(None).unwrap();
        let old = now.checked_sub(Duration::from_secs(30)).unwrap_or(now);
        pacer.seed([now + Duration::from_secs(1), old], None);
        // One of two starts is left in the window: the next goes at once.
        assert!(pacer.reserve(None).unwrap() < now + Duration::from_secs(2));
        let third = pacer.reserve(None).unwrap();
        assert!(third >= now + Duration::from_secs(11), "{:?}", third - now);
        // A start handed out for later stays: nobody else has seen it.
        let later = Pacer::new(1, Duration::from_secs(10));
        later.reserve(None).unwrap();
        let ahead = later.reserve(None).unwrap();
        later.seed([], None);
        assert!(later.reserve(None).unwrap() >= ahead + Duration::from_secs(10));
        let until = now + Duration::from_secs(40);
        pacer.seed([], Some(until));
        pacer.seed([], Some(now));
        assert!(pacer.reserve(None).unwrap() >= until);
    }

    /// Any configured budget and any deadline: reservations never panic, stay paced, and
    /// respect the deadline.
    mod props {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_budget_any_deadline(
                limit in prop_oneof![Just(0u32), Just(1), Just(u32::MAX), 1u32..10],
                window_ms in prop_oneof![Just(0u64), Just(u64::MAX), 1u64..100_000],
                deadline_ms in proptest::option::of(prop_oneof![Just(u64::MAX), 0u64..200_000]),
                pause_secs in proptest::option::of(prop_oneof![Just(u64::MAX / 2), 0u64..100]),
            ) {
                let pacer = Pacer::new(limit, Duration::from_millis(window_ms));
                let now = Instant::now();
                if let Some(until) = pause_secs.and_then(|s| now.checked_add(Duration::from_secs(s))) {
                    pacer.pause_until(until);
                }
                let deadline = deadline_ms.and_then(|ms| now.checked_add(Duration::from_millis(ms)));
                let mut starts = Vec::new();
                for _ in 0..12 {
                    match pacer.reserve(deadline) {
                        Ok(slot) => {
                            prop_assert!(deadline.is_none_or(|d| slot <= d));
                            starts.push(slot);
                        }
                        Err(DeadlineFirst { slot }) => prop_assert!(deadline.is_some_and(|d| slot > d)),
                    }
                }
                prop_assert!(starts.windows(2).all(|w| w[0] <= w[1]));
                let window = Duration::from_millis(window_ms).min(crate::config::MAX_DURATION);
                assert_paced(&starts, usize::try_from(limit.max(1)).unwrap(), window);
            }

            /// Whatever view of the budget it is seeded with (any starts from the far past to
            /// the far future, in any order, any pause), a pacer never panics, and what it
            /// hands out after stays ordered and keeps the seeded starts' pace.
            #[test]
            fn any_seed(
                limit in 1u32..6,
                window_ms in 1u64..10_000,
                offsets in proptest::collection::vec(prop_oneof![any::<i64>(), -20_000_000i64..20_000_000], 0..12),
                pause_us in proptest::option::of(any::<u64>()),
            ) {
                let pacer = Pacer::new(limit, Duration::from_millis(window_ms));
                let now = Instant::now();
                let at = |us: i64| match u64::try_from(us) {
                    Ok(ahead) => now.checked_add(Duration::from_micros(ahead)),
                    Err(_) => now.checked_sub(Duration::from_micros(us.unsigned_abs())),
                };
                let seeded: Vec<Instant> = offsets.iter().filter_map(|&us| at(us)).collect();
                let paused = pause_us.and_then(|us| now.checked_add(Duration::from_micros(us)));
                pacer.seed(seeded.clone(), paused);
                let mut starts = Vec::new();
                for _ in 0..6 {
                    if let Ok(slot) = pacer.reserve(None) {
                        starts.push(slot);
                    }
                }
                prop_assert!(starts.windows(2).all(|w| w[0] <= w[1]));
                if let Some(p) = paused {
                    prop_assert!(starts.iter().all(|&s| s >= p));
                }
                // Every start handed out ends a window that holds at most `limit` starts, the
                // seeded ones counted (they may crowd a window of their own: not its doing).
                let window = Duration::from_millis(window_ms);
                let all: Vec<Instant> = seeded.into_iter().chain(starts.iter().copied()).collect();
                for &s in &starts {
                    let from = s.checked_sub(window);
                    let within = all.iter().filter(|&&t| t <= s && from.is_none_or(|f| t > f)).count();
                    prop_assert!(within <= usize::try_from(limit).unwrap(), "{within} starts in the window ending at a new one");
                }
            }
        }
    }
}
