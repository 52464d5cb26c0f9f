use super::*;

fn account(cap: usize, aside_after: Duration) -> Arc<Account> {
    Arc::new(Account::new(
        "a",
        60,
        Duration::from_secs(60),
        Duration::from_secs(10),
        cap,
        aside_after,
        AccountMetrics::default(),
    ))
}

#[test]
fn takes_in_unless_congested_and_shows_what_waits() {
    let a = account(2, Duration::from_millis(100));
    let one = a.take_in().expect("not congested");
    let _two = a.take_in().expect("not congested");
    a.aside_changed(3);
    a.refresh_gauges(None);
    assert_eq!(
        a.metrics().waiting.get(),
        5,
        "two in memory, three set aside"
    );
    drop(one);
    a.aside_changed(-3);
    a.refresh_gauges(None);
    assert_eq!(a.metrics().waiting.get(), 1);
    a.starts_in(Duration::from_secs(5));
    assert!(
        a.take_in().is_none(),
        "congested: its next start is 5 s away"
    );
}

#[test]
fn a_far_start_congests_until_it_is_near() {
    let a = account(8, Duration::from_millis(100));
    a.starts_in(Duration::from_millis(50));
    assert!(
        !a.congested(),
        "a start within aside_after is no congestion"
    );
    a.starts_in(Duration::from_millis(400));
    assert!(a.congested());
    std::thread::sleep(Duration::from_millis(350));
    assert!(!a.congested(), "the start is near again");
}

#[tokio::test]
async fn a_long_wait_for_a_slot_congests() {
    let a = account(1, Duration::from_millis(50));
    let held = a.try_slot().expect("free");
    assert!(a.try_slot().is_none());
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move { a.slot().await })
    };
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(a.congested(), "the slot wait outlasted aside_after");
    drop(held);
    let _slot = waiter.await.unwrap();
}

#[test]
fn the_cap_bounds_the_wait_to_a_quarter_of_the_consumer_timeout() {
    let half_hour = Duration::from_secs(1800);
    assert_eq!(
        effective_cap(32, 60, Duration::from_secs(60), half_hour, 1),
        32
    );
    // One call a minute: no more than 7 may queue up for a 7.5-minute quarter.
    assert_eq!(
        effective_cap(32, 1, Duration::from_secs(60), half_hour, 1),
        7
    );
    assert_eq!(
        effective_cap(0, 1, Duration::from_secs(3600), half_hour, 1),
        1
    );
}

#[test]
fn the_cap_shrinks_with_the_sources_a_replica_may_read_account_queues_of() {
    let half_hour = Duration::from_secs(1800);
    // 60 a minute: 900 starts in 15 minutes, shared by 16 partitions' readers and the
    // commands taken in directly: 52 each at most.
    assert_eq!(
        effective_cap(60, 60, Duration::from_secs(60), half_hour, 16),
        52
    );
    // Every delivery a replica may hold unacked for the account starts within half the
    // timeout.
    let cap = effective_cap(60, 10, Duration::from_secs(60), half_hour, 16);
    assert!(17 * cap <= 150, "cap {cap}");
}

mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any configured numbers: never zero, never past what was asked, never a panic.
        #[test]
        fn effective_cap_is_bounded(
            max in any::<u32>(),
            limit in any::<u32>(),
            window_ms in any::<u64>(),
            timeout_ms in any::<u64>(),
            sources in any::<u32>(),
        ) {
            let cap = effective_cap(
                max,
                limit,
                Duration::from_millis(window_ms),
                Duration::from_millis(timeout_ms),
                sources,
            );
            prop_assert!(cap >= 1);
            prop_assert!(cap <= usize::try_from(max.max(1)).unwrap());
            // Past the floor of 1, every delivery held unacked starts within half the
            // timeout.
            if cap > 1 {
                let starts = u128::from(limit) * u128::from(timeout_ms / 2)
                    / u128::from(window_ms.max(1));
                prop_assert!((u128::from(sources) + 1) * cap as u128 <= starts);
            }
        }
    }
}
