//! A rolling deploy (CONTRACT §9, "One holder at a time"): every replica of a fleet in turn gets
//! SIGTERM and starts again under its name within half a second, while sessions keep coming.
//! Read from the simulator's log: no session ever has two calls on the wire at once, every
//! session's calls come in publish order, none is called twice and none is lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::sim::calls_by_session;
use crate::harness::{Fleet, FleetSpec, command_of, publish_commands, session_command, tag};
use crate::partitions::each_ends_once;

/// What went wrong in one session's calls: overlaps, order, repeats; empty when none.
pub fn session_faults(
    fleet: &Fleet,
    order: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, Vec<String>> {
    let calls = calls_by_session(&fleet.sim);
    let mut faults: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (session, wanted) in order {
        let mine = calls.get(session).map(Vec::as_slice).unwrap_or_default();
        let mut found = Vec::new();
        let called: Vec<String> = mine.iter().map(command_of).collect();
        if &called != wanted {
            found.push(format!("calls {called:?}, published {wanted:?}"));
        }
        for pair in mine.windows(2) {
            match pair[0].answered_at {
                Some(answered) if pair[1].received_at >= answered => {}
                _ => found.push(format!(
                    "{} arrived while {} was on the wire",
                    command_of(&pair[1]),
                    command_of(&pair[0])
                )),
            }
        }
        if !found.is_empty() {
            faults.insert(session.clone(), found);
        }
    }
    faults
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_never_overlaps_reorders_repeats_or_loses_a_session() {
    let replicas = 3;
    let spec = FleetSpec {
        latency: Duration::from_millis(300),
        prefetch: 32,
        ..FleetSpec::partitioned(replicas, 12)
    };
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(30)).await;

    // 60 sessions; a round of one command each every 400 ms until the roll is over.
    let t = tag();
    let sessions: Vec<String> = (0..60).map(|s| format!("s-roll-{t}-{s:02}")).collect();
    let rolling = Arc::new(AtomicBool::new(true));
    let feed = {
        let channel = fleet.channel.clone();
        let queue = fleet.settings.amqp.commands_queue.clone();
        let sessions = sessions.clone();
        let rolling = rolling.clone();
        tokio::spawn(async move {
            let mut order: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut round = 0usize;
            // Two rounds after the roll, so the last restarted replica gets work too.
            let mut after = 2;
            while after > 0 {
                if !rolling.load(Ordering::Relaxed) {
                    after -= 1;
                }
                let commands: Vec<Value> = sessions
                    .iter()
                    .enumerate()
                    .map(|(s, session)| {
                        let id = format!("roll-{t}-s{s:02}-c{round:02}");
                        order.entry(session.clone()).or_default().push(id.clone());
                        session_command(&id, session, (s + round) % 2 == 1)
                    })
                    .collect();
                publish_commands(&channel, &queue, &commands).await;
                round += 1;
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            order
        })
    };

    // Every replica in turn: SIGTERM, and the same name again at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut gaps = Vec::new();
    for i in 0..replicas {
        let status = fleet.replicas[i].terminate(Duration::from_secs(30)).await;
        assert!(
            status.success(),
            "{} exited {status}",
            fleet.replicas[i].name
        );
        let exited = Instant::now();
        fleet.restart(i).await;
        gaps.push(exited.elapsed());
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    rolling.store(false, Ordering::Relaxed);
    let order = feed.await.expect("the feed");
    let n = each_ends_once(&mut fleet, &order, Duration::from_secs(90)).await;
    let faults = session_faults(&fleet, &order);
    assert!(
        faults.is_empty(),
        "{} of {} sessions broken by a rolling restart: {faults:#?}\n{}",
        faults.len(),
        sessions.len(),
        fleet.log_lines("partition")
    );
    eprintln!(
        "rolling restart: {n} commands in {} sessions, {} calls; each replica restarted and \
         ready {gaps:?} after it exited",
        sessions.len(),
        fleet.sim.stats().calls
    );
    fleet.stop_leaving_nothing().await;
}
