use std::collections::HashMap;
use std::sync::Arc;

use super::*;
use crate::config::Settings;
use crate::ops::metrics::Metrics;

fn fleet() -> Fleet {
    let mut settings = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
    settings.fleet.redis_url =
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let name = format!("tw-unit-{}", uuid::Uuid::new_v4().simple());
    Fleet::new(
        &settings.fleet,
        &name,
        Duration::from_secs(60),
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

fn one_a_minute(account: &str) -> DepartRequest<'_> {
    DepartRequest {
        account,
        limit: 1,
        window: Duration::from_secs(60),
        unanswered: Duration::from_secs(10),
    }
}

/// The interleaving of a reply lost on its way back: the script ran and recorded the call,
/// the replica asked again with the same member. It leaves once, counted once.
#[tokio::test]
async fn a_call_asked_for_again_after_a_lost_reply_is_counted_once() {
    let fleet = fleet();
    let request = one_a_minute("acc-lost-reply");
    assert_eq!(fleet.depart(&request, "m-1").await.unwrap(), Gate::Open);
    assert_eq!(fleet.depart(&request, "m-1").await.unwrap(), Gate::Open);
    // The account's one call is on the wire: another call waits for its answer.
    assert!(matches!(
        fleet.depart(&request, "m-2").await.unwrap(),
        Gate::OnTheWire(_)
    ));
    // Answered: the next call leaves a window after the answer, not before.
    fleet.arrived("acc-lost-reply", "m-1").await.unwrap();
    match fleet.depart(&request, "m-2").await.unwrap() {
        Gate::Closed(after) => assert!(after > Duration::from_secs(59), "{after:?}"),
        other => panic!("{other:?}"),
    }
    // Not sent after all: it counts for nothing.
    fleet.unsent("acc-lost-reply", "m-1").await.unwrap();
    assert_eq!(fleet.depart(&request, "m-2").await.unwrap(), Gate::Open);
}

/// A 429's pause holds the gate too, so a call that waited there does not leave during it.
#[tokio::test]
async fn the_gate_holds_calls_while_the_account_is_paused() {
    let fleet = fleet();
    let request = one_a_minute("acc-paused");
    fleet
        .pause("acc-paused", Duration::from_secs(5))
        .await
        .unwrap();
    match fleet.depart(&request, "m-1").await.unwrap() {
        Gate::Closed(after) => assert!(after > Duration::from_secs(4), "{after:?}"),
        other => panic!("{other:?}"),
    }
}
