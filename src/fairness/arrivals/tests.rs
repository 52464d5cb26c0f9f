use std::collections::{BTreeMap, HashMap};

use super::*;

const MS: Duration = Duration::from_millis(1);

fn at(base: Instant, ms: u64) -> Instant {
    base + MS * u32::try_from(ms).unwrap()
}

/// The most arrivals within any half-open `window`.
fn most_in_a_window(arrivals: &[u64], window: u64) -> usize {
    let mut sorted = arrivals.to_vec();
    sorted.sort_unstable();
    (0..sorted.len())
        .map(|i| {
            sorted[i..]
                .iter()
                .take_while(|&&a| a < sorted[i] + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_full_window_opens_a_window_after_the_answer_not_after_the_departure() {
    let base = Instant::now();
    let arrivals = Arrivals::new(2, Duration::from_secs(1), Duration::from_secs(10));
    let first = arrivals.try_depart_at(base).unwrap();
    let second = arrivals.try_depart_at(base).unwrap();
    // Both on the wire: nothing says when the API saw them yet.
    assert_eq!(
        arrivals.try_depart_at(at(base, 5)).unwrap_err(),
        Closed::UntilAnEnd
    );
    // Answered 300 ms after it left: the next call leaves a window after that answer.
    first.answered_at(at(base, 300));
    assert_eq!(
        arrivals.try_depart_at(at(base, 999)).unwrap_err(),
        Closed::Until(at(base, 1300))
    );
    assert_eq!(
        arrivals.try_depart_at(at(base, 1299)).unwrap_err(),
        Closed::Until(at(base, 1300))
    );
    let third = arrivals.try_depart_at(at(base, 1300)).unwrap();
    third.unsent();
    second.unsent();
}

#[test]
fn a_call_without_an_answer_counts_until_the_request_timeout_after_it_left() {
    let base = Instant::now();
    let arrivals = Arrivals::new(1, Duration::from_secs(1), Duration::from_secs(10));
    drop(arrivals.try_depart_at(base).unwrap());
    assert_eq!(
        arrivals.try_depart_at(at(base, 1)).unwrap_err(),
        Closed::Until(at(base, 11_000))
    );
    assert!(arrivals.try_depart_at(at(base, 11_000)).is_ok());
}

#[test]
fn a_call_not_sent_counts_for_nothing() {
    let arrivals = Arrivals::new(1, Duration::from_secs(60), Duration::from_secs(10));
    arrivals.try_depart().unwrap().unsent();
    assert!(arrivals.try_depart().is_ok());
}

/// The checker below is not blind: the schedule a booking alone gives (five at once, five a
/// window and a guard later), with the fifth call held 1 s on its way, crowds one window.
#[test]
fn the_window_check_sees_a_late_call_that_booking_alone_lets_through() {
    let booked_late = [0, 0, 0, 0, 1000, 2100, 2100, 2100, 2100, 2100];
    assert_eq!(most_in_a_window(&booked_late, 2000), 6);
}

#[tokio::test]
async fn a_waiting_departure_leaves_when_a_call_ends() {
    let arrivals = std::sync::Arc::new(Arrivals::new(1, Duration::from_millis(50), MS * 5000));
    let first = arrivals.try_depart().unwrap();
    let waiting = tokio::spawn({
        let arrivals = arrivals.clone();
        async move { arrivals.depart(None).await.map(Departure::unsent).is_some() }
    });
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    first.answered();
    let left = tokio::time::timeout(Duration::from_secs(5), waiting).await;
    assert!(
        left.unwrap().unwrap(),
        "left once the window after the answer passed"
    );
    // A limit that comes first ends the wait with nothing.
    let held = arrivals.try_depart().unwrap();
    let soon = Instant::now() + Duration::from_millis(20);
    assert!(arrivals.depart(Some(soon)).await.is_none());
    held.unsent();
}

/// Calls of one account trying to leave over a virtual clock, each on the wire for a while
/// before the API sees it and a while more before its answer (or its timeout) comes back.
mod props {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    struct Call {
        wants: u64,
        on_the_way: u64,
        answer_after: Option<u64>,
    }

    fn call() -> impl Strategy<Value = Call> {
        (
            0u64..6000,
            prop_oneof![0u64..30, 0u64..3000],
            proptest::option::weighted(0.9, 0u64..800),
        )
            .prop_map(|(wants, on_the_way, answer_after)| Call {
                wants,
                on_the_way,
                answer_after,
            })
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Event {
        Try(usize),
        End(usize),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn no_window_at_the_apis_clock_holds_more_than_the_limit(
            limit in 1u32..6,
            window in 100u64..3000,
            calls in proptest::collection::vec(call(), 1..40),
        ) {
            let timeout = 4000;
            let base = Instant::now();
            let arrivals = Arrivals::new(limit, MS * u32::try_from(window).unwrap(), MS * 4000);
            let mut events: BTreeMap<(u64, Event), ()> =
                calls.iter().enumerate().map(|(i, c)| ((c.wants, Event::Try(i)), ())).collect();
            let mut on_the_wire = HashMap::new();
            let mut waiting = Vec::new();
            let mut seen = Vec::new();
            while let Some(((now, event), ())) = events.pop_first() {
                match event {
                    Event::Try(i) => match arrivals.try_depart_at(at(base, now)) {
                        Ok(departure) => {
                            let c = &calls[i];
                            // Seen on arrival; without an answer the call is cut off at the
                            // timeout, and the API saw it by then at the latest.
                            let (arrival, end) = match c.answer_after {
                                Some(a) => (now + c.on_the_way, now + c.on_the_way + a),
                                None => (now + c.on_the_way.min(timeout), now + timeout),
                            };
                            seen.push(arrival);
                            on_the_wire.insert(i, departure);
                            events.insert((end, Event::End(i)), ());
                        }
                        Err(Closed::Until(t)) => {
                            let ms = u64::try_from((t - base).as_millis()).unwrap();
                            prop_assert!(ms > now);
                            events.insert((ms, Event::Try(i)), ());
                        }
                        Err(Closed::UntilAnEnd) => waiting.push(i),
                    },
                    Event::End(i) => {
                        let departure = on_the_wire.remove(&i).unwrap();
                        match calls[i].answer_after {
                            Some(_) => departure.answered_at(at(base, now)),
                            None => drop(departure),
                        }
                        for w in waiting.drain(..) {
                            events.insert((now, Event::Try(w)), ());
                        }
                    }
                }
            }
            prop_assert!(waiting.is_empty(), "every call left");
            let limit = usize::try_from(limit).unwrap();
            prop_assert!(most_in_a_window(&seen, window) <= limit, "{seen:?}");
        }
    }
}
