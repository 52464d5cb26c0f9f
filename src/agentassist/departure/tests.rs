use std::collections::HashMap;
use std::sync::Arc;

use super::*;
use crate::agentassist::bots::Bots;
use crate::config::Settings;
use crate::ops::metrics::Metrics;

fn bots(window: Duration) -> (Bots, String) {
    let mut settings = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
    settings.bots[0].rate_limit = 1;
    settings.bots[0].rate_window = window;
    let metrics = Arc::new(Metrics::new());
    let stream = settings.bots[0].stream_id.clone();
    (Bots::new(&settings, &metrics), stream)
}

/// A 429 pause that comes while a call waits at the gate holds it until the pause ends: it
/// does not leave the moment the call ahead of it is answered.
#[tokio::test]
async fn a_pause_that_comes_while_a_call_waits_at_the_gate_holds_it() {
    let (bots, stream) = bots(Duration::from_millis(50));
    let bot = bots.get(&stream).unwrap();
    let shutdown = Shutdown::new();
    let ahead = through_own_arrivals(&bot, None, &shutdown)
        .await
        .unwrap()
        .unwrap();
    let waiting = {
        let bot = bot.clone();
        tokio::spawn(async move {
            let shutdown = Shutdown::new();
            let left = through_own_arrivals(&bot, None, &shutdown)
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
    bot.account.pacer.pause_until(paused_until);
    ahead.answered().await;
    let left = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(left >= paused_until, "left {:?} early", paused_until - left);
}
