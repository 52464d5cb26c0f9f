//! Waiting for a condition, with a bound.

use std::time::{Duration, Instant};

/// Waits, up to `limit`, until `ok` holds; panics with `what` (and `detail()`) otherwise.
pub async fn wait_for(
    what: &str,
    limit: Duration,
    detail: impl Fn() -> String,
    mut ok: impl AsyncFnMut() -> bool,
) {
    let until = Instant::now() + limit;
    while !ok().await {
        assert!(
            Instant::now() < until,
            "{what} within {limit:?}\n{}",
            detail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits, up to 20 s, until `check` holds; panics with `what` otherwise.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(20), String::new, async || check()).await;
}
