//! The AgentAssist simulator a test's workers call, on a free loopback port.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use transfer_worker::config::Settings;
use transfer_worker::tools::simulator::{self, RecordedRequest, Simulator, SimulatorConfig};

use super::wait::wait_for;

/// A simulator for the bots of `settings`, on a free loopback port, posting no callbacks.
pub fn config(settings: &Settings) -> SimulatorConfig {
    SimulatorConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        bots: simulator::bots_from_settings(settings),
        callbacks: false,
        ..SimulatorConfig::default()
    }
}

/// Makes the simulator post each accepted transfer's callback, `delay` after answering.
pub fn call_back_after(config: &mut SimulatorConfig, delay: Duration) {
    config.callbacks = true;
    config.callback_delay = delay;
}

/// Starts a simulator.
pub async fn start(config: SimulatorConfig) -> Simulator {
    Simulator::start(config).await.expect("simulator starts")
}

/// The simulator's requests by `botSessionId`, each session's in arrival order.
pub fn calls_by_session(sim: &Simulator) -> BTreeMap<String, Vec<RecordedRequest>> {
    let mut out: BTreeMap<String, Vec<RecordedRequest>> = BTreeMap::new();
    for r in sim.requests() {
        let session = r.bot_session_id.clone().expect("a botSessionId");
        out.entry(session).or_default().push(r);
    }
    for calls in out.values_mut() {
        calls.sort_by_key(|r| r.seq);
    }
    out
}

/// Waits, up to 10 s, until a call is on the wire, looking every millisecond; returns when the
/// look that saw it began.
pub async fn call_on_the_wire(sim: &Simulator) -> Instant {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let now = Instant::now();
        if sim.in_flight() > 0 {
            return now;
        }
        assert!(Instant::now() < until, "no call on the wire");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits, up to `limit`, until the simulator has answered every call it received.
pub async fn all_answered(sim: &Simulator, limit: Duration) {
    let what = "the simulator answered every call";
    wait_for(what, limit, String::new, async || sim.in_flight() == 0).await;
}

/// How many of `requests` arrived before `before` and were answered after `after`: the calls
/// on the wire across whatever happened in between.
pub fn straddling(requests: &[RecordedRequest], before: Instant, after: Instant) -> usize {
    requests
        .iter()
        .filter(|r| r.received_at < before && r.answered_at.is_some_and(|a| a > after))
        .count()
}
