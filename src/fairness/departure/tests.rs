use std::sync::Arc;

use super::*;
use crate::fairness::account::AccountMetrics;
use crate::ops::metrics::Metrics;

/// An account of one call per `window`.
fn account(window: Duration) -> Arc<Account> {
    let metrics = Metrics::new();
    Arc::new(Account::new(
        "acc-1",
        1,
        window,
        Duration::from_secs(5),
        4,
        Duration::from_secs(1),
        AccountMetrics::of(&metrics, "acc-1"),
    ))
}

/// A 429 pause that comes while a call waits at the gate holds it until the pause ends: it
/// does not leave the moment the call ahead of it is answered.
#[tokio::test]
async fn a_pause_that_comes_while_a_call_waits_at_the_gate_holds_it() {
    let account = account(Duration::from_millis(50));
    let shutdown = Shutdown::new();
    let ahead = through_own_arrivals(&account, None, &shutdown)
        .await
        .unwrap()
        .unwrap();
    let waiting = {
        let account = account.clone();
        tokio::spawn(async move {
            let shutdown = Shutdown::new();
            let left = through_own_arrivals(&account, None, &shutdown)
                .await
                .unwrap()
                .unwrap();
            let at = Instant::now();
            left.unsent().await;
            at
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let paused_until = Instant::now() + Duration::from_millis(600);
    account.pacer.pause_until(paused_until);
    ahead.answered().await;
    let left = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(left >= paused_until, "left {:?} early", paused_until - left);
}
