//! Work sharing with per-session order (CONTRACT §9): real replicas in fleet mode, the intake
//! routing every command to a partition queue by its `botSessionId`, the live replicas sharing
//! the partitions evenly. Each test reads the simulator's request log per session.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::admin::family_sum;
use crate::harness::sim::calls_by_session;
use crate::harness::{
    Fleet, FleetSpec, Received, command_of, output, publish_commands, session_command, succeeded,
    tag, wait_for,
};

/// The partition of a session, as the intake computes it.
fn partition_of(session: &str, partitions: u16) -> u16 {
    transfer_worker::fleet::ownership::partition_of(session, partitions)
}

/// Commands `per` to a session for each session, interleaved: the first of every session,
/// then the second of every session, and so on; agent and queue targets mixed. Returns them in
/// publish order and, by session, the command ids in publish order.
fn interleaved(
    prefix: &str,
    sessions: &[String],
    per: usize,
) -> (Vec<Value>, BTreeMap<String, Vec<String>>) {
    let mut commands = Vec::with_capacity(sessions.len() * per);
    let mut order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for j in 0..per {
        for (s, session) in sessions.iter().enumerate() {
            let id = format!("{prefix}-s{s:03}-c{j}");
            commands.push(session_command(&id, session, (s + j) % 2 == 1));
            order.entry(session.clone()).or_default().push(id);
        }
    }
    (commands, order)
}

fn is_terminal(e: &Received) -> bool {
    e.name() != "transfer.callback"
}

/// Whether every one of `ids` has a terminal event among `events`.
pub fn all_ended<'a>(events: &[Received], ids: impl IntoIterator<Item = &'a String>) -> bool {
    let ended: HashSet<&str> = events
        .iter()
        .filter(|e| is_terminal(e))
        .map(|e| e.command_id())
        .collect();
    ids.into_iter().all(|id| ended.contains(id.as_str()))
}

/// Terminal events by command.
pub fn terminal_by_command(events: &[Received]) -> BTreeMap<String, Vec<&Received>> {
    let mut out: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for e in events.iter().filter(|e| is_terminal(e)) {
        out.entry(e.command_id().to_owned()).or_default().push(e);
    }
    out
}

/// Exactly `n` commands ended, each with `transfer.succeeded`; an outcome told again (after a
/// failover) is the same event, same `eventId`.
pub fn assert_each_succeeded_once(events: &[Received], n: usize) {
    let ended = terminal_by_command(events);
    assert_eq!(ended.len(), n, "terminal events for other commands");
    for (id, mine) in &ended {
        assert!(
            mine.iter().all(|e| e.name() == "transfer.succeeded"
                && e.json["eventId"] == mine[0].json["eventId"]),
            "{id}: {:?}",
            mine.iter().map(|e| &e.json).collect::<Vec<_>>()
        );
    }
}

/// Waits up to `limit` until every command of `order` (by session) has ended, then a second
/// for any stray event, and asserts that each succeeded once; how many there were.
pub async fn each_ends_once(
    fleet: &mut Fleet,
    order: &BTreeMap<String, Vec<String>>,
    limit: Duration,
) -> usize {
    let n: usize = order.values().map(Vec::len).sum();
    let events = fleet
        .events_until(limit, |e| all_ended(e, order.values().flatten()))
        .await;
    fleet.assert_no_event(Duration::from_secs(1)).await;
    assert_each_succeeded_once(&events, n);
    n
}

/// Each replica's sum of a metric family, by index (`None` when it does not answer).
async fn per_replica(fleet: &Fleet, family: &str) -> Vec<Option<f64>> {
    let mut out = Vec::new();
    for r in &fleet.replicas {
        // An empty sum is -0.0; plus 0.0 prints it as 0.
        out.push(r.try_metrics().await.map(|m| family_sum(&m, family) + 0.0));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stay_in_order_and_never_overlap_while_three_replicas_share_the_work() {
    let partitions = 8;
    let mut fleet = Fleet::start(FleetSpec {
        latency: Duration::from_millis(30),
        prefetch: 16,
        ..FleetSpec::partitioned(3, partitions)
    })
    .await;
    let balanced = fleet
        .wait_balanced(&[0, 1, 2], Duration::from_secs(30))
        .await;

    let t = tag();
    let sessions: Vec<String> = (0..30).map(|s| format!("s-order-{t}-{s:03}")).collect();
    let (commands, order) = interleaved(&format!("order-{t}"), &sessions, 5);
    let n = commands.len();
    fleet.publish_all(&commands).await;
    let events = fleet
        .events_until(Duration::from_secs(50), |e| {
            all_ended(e, order.values().flatten())
        })
        .await;
    fleet.assert_no_event(Duration::from_secs(1)).await;

    // Every command ends once, successfully.
    let ended = terminal_by_command(&events);
    assert_eq!(ended.len(), n, "terminal events for other commands");
    for (id, mine) in &ended {
        assert_eq!(mine.len(), 1, "one terminal event for {id}: {mine:?}");
        assert_eq!(mine[0].name(), "transfer.succeeded", "{}", mine[0].json);
    }

    // Per session: the calls in publish order, each answered before the next arrived.
    let calls = calls_by_session(&fleet.sim);
    assert_eq!(calls.len(), sessions.len(), "calls for other sessions");
    for (session, wanted) in &order {
        let mine = &calls[session];
        let called: Vec<String> = mine.iter().map(command_of).collect();
        assert_eq!(
            &called, wanted,
            "session {session}: calls out of publish order"
        );
        for pair in mine.windows(2) {
            let answered = pair[0].answered_at.expect("answered");
            assert!(
                pair[1].received_at >= answered,
                "session {session}: {} arrived {:?} before {} was answered",
                command_of(&pair[1]),
                answered - pair[1].received_at,
                command_of(&pair[0]),
            );
        }
        assert!(mine.iter().all(|r| r.status == 200), "{mine:?}");
    }

    // The work was shared: every replica owns partitions, and several made calls.
    let owned = fleet.shares(&[0, 1, 2]).await.0;
    let api_calls = per_replica(&fleet, "transfer_api_calls_total").await;
    let routed = per_replica(&fleet, "transfer_fleet_routed_total").await;
    assert!(
        owned.iter().all(|o| o.is_some_and(|o| o > 0.0)),
        "a replica owns no partition: {owned:?}"
    );
    let calling = api_calls
        .iter()
        .filter(|c| c.is_some_and(|c| c > 0.0))
        .count();
    assert!(
        calling >= 2,
        "the calls were not shared: API calls by replica {api_calls:?}"
    );
    assert_eq!(
        api_calls.iter().flatten().sum::<f64>(),
        n as f64,
        "API calls by replica {api_calls:?}"
    );
    assert_eq!(
        routed.iter().flatten().sum::<f64>(),
        n as f64,
        "routed by replica {routed:?}"
    );
    eprintln!(
        "partition order: {n} commands in {} sessions; balanced {balanced:?} after ready; \
         partitions owned {owned:?}, API calls {api_calls:?}, routed {routed:?}",
        sessions.len()
    );
    fleet.stop_leaving_nothing().await;
}

/// Milliseconds from `origin` to `t`, negative before it.
pub fn ms_from(origin: Instant, t: Instant) -> i128 {
    if t >= origin {
        (t - origin).as_millis() as i128
    } else {
        -((origin - t).as_millis() as i128)
    }
}

/// `n` sessions spread evenly over `partitions` (as many in each), so every replica of an
/// even share gets as much work.
fn even_sessions(prefix: &str, n: usize, partitions: u16) -> Vec<String> {
    let each = n / usize::from(partitions);
    let mut count: HashMap<u16, usize> = HashMap::new();
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while out.len() < n {
        let session = format!("{prefix}-{i:05}");
        i += 1;
        let k = partition_of(&session, partitions);
        let c = count.entry(k).or_default();
        if *c < each {
            *c += 1;
            out.push(session);
        }
    }
    out
}

/// Runs `sessions` commands (one per session) on a fleet of `replicas`, balanced before the
/// first publish; returns the API calls each replica made.
async fn calls_by_replica(
    replicas: usize,
    partitions: u16,
    sessions: &[String],
    prefix: &str,
) -> Vec<f64> {
    let spec = FleetSpec {
        latency: Duration::from_millis(200),
        prefetch: 4,
        ..FleetSpec::partitioned(replicas, partitions)
    };
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(30)).await;
    let (commands, order) = interleaved(prefix, sessions, 1);
    let start = Instant::now();
    fleet.publish_all(&commands).await;
    let events = fleet
        .events_until(Duration::from_secs(55), |e| {
            all_ended(e, order.values().flatten())
        })
        .await;
    let took = start.elapsed();
    assert!(
        events
            .iter()
            .filter(|e| is_terminal(e))
            .all(|e| e.name() == "transfer.succeeded"),
        "{:?}",
        events.iter().map(|e| e.json.clone()).collect::<Vec<_>>()
    );
    let api_calls = per_replica(&fleet, "transfer_api_calls_total").await;
    eprintln!(
        "partition scale: {} commands on {replicas} replica(s) in {took:?}; API calls by \
         replica {api_calls:?}",
        commands.len()
    );
    fleet.stop_leaving_nothing().await;
    api_calls
        .into_iter()
        .map(|c| c.expect("every replica answers /metrics"))
        .collect()
}

/// The work is shared, not merely possible to share: with 12 partitions over three replicas,
/// each replica makes its share of the calls. How much faster three replicas are is measured
/// by the pipeline benchmark's scenario (h), not asserted here: a ratio of wall-clock times
/// depends on the machine's load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_latency_bound_work() {
    // 12 partitions: 4 each for three replicas, with 20 sessions in each partition.
    let partitions = 12;
    let t = tag();
    let sessions = even_sessions(&format!("s-scale-{t}"), 240, partitions);
    let calls = calls_by_replica(3, partitions, &sessions, &format!("scale3-{t}")).await;
    let all: f64 = calls.iter().sum();
    assert!(all >= 240.0, "every command was called: {calls:?}");
    // An even share is a third; a replica with a quarter of the partitions' sessions less
    // than half of that still counts as sharing, one with none does not.
    assert!(
        calls.iter().all(|&c| c >= all / 6.0),
        "a replica did less than half its share of the calls: {calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_burst_loses_nothing_reorders_no_session_and_partitions_move_back() {
    let partitions = 12;
    let prefetch = 4;
    let spec = FleetSpec {
        latency: Duration::from_millis(100),
        prefetch,
        ..FleetSpec::partitioned(3, partitions)
    };
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(30)).await;
    let t = tag();
    let sessions: Vec<String> = (0..48).map(|s| format!("s-fail-{t}-{s:03}")).collect();
    let (commands, order) = interleaved(&format!("fail-{t}"), &sessions, 4);
    let n = commands.len();
    fleet.publish_all(&commands).await;

    // The intake dies mid-burst, with calls of its own on the wire.
    let routed = per_replica(&fleet, "transfer_fleet_routed_total").await;
    let victim = routed
        .iter()
        .position(|r| r.is_some_and(|r| r > 0.0))
        .unwrap_or(0);
    let v = &fleet.replicas[victim];
    wait_for(
        "calls made, the victim's on the wire",
        Duration::from_secs(20),
        || fleet.log_tails(40),
        async || {
            fleet.sim.stats().calls >= 30 && v.metric("transfer_commands_in_flight").await > 0.0
        },
    )
    .await;
    fleet.replicas[victim].kill().await;
    let killed = Instant::now();
    let calls_at_kill = fleet.sim.stats().calls as usize;
    assert!(
        calls_at_kill < n,
        "the burst was over before the kill ({calls_at_kill} calls)"
    );
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let moved_after_kill = fleet
        .wait_balanced(&survivors, Duration::from_secs(60))
        .await;

    fleet.restart(victim).await;
    let restarted = Instant::now();
    let moved_after_restart = fleet
        .wait_balanced(&[0, 1, 2], Duration::from_secs(60))
        .await;
    let since_spawn = moved_after_restart + (restarted - killed - moved_after_kill);
    let mut events = fleet
        .events_until(Duration::from_secs(40), |e| {
            all_ended(e, order.values().flatten())
        })
        .await;
    // What still comes is checked with the rest: a command the dead intake had routed and not
    // acked is routed again, and its copy is answered from the fleet's record (the same
    // event, told again) whenever its partition's owner reaches it; any other event fails.
    events.extend(fleet.events.drain(Duration::from_secs(1)).await);

    // Every command has its outcome; an outcome told twice is one event.
    assert_each_succeeded_once(&events, n);

    // Per session, the first call of each command in publish order; a call again only for a
    // command whose first call went out before the kill, and no more of those than the dead
    // replica could hold.
    let calls = calls_by_session(&fleet.sim);
    let mut repeated = Vec::new();
    for (session, wanted) in &order {
        let mine = calls.get(session).map(Vec::as_slice).unwrap_or_default();
        let mut first: Vec<String> = Vec::new();
        for r in mine {
            let id = command_of(r);
            if first.contains(&id) {
                let earlier = mine.iter().find(|e| command_of(e) == id).unwrap();
                assert!(
                    earlier.received_at < killed,
                    "{id} was called again though its first call came after the kill"
                );
                assert!(r.received_at > killed, "{id} called twice before the kill");
                repeated.push(id);
            } else {
                first.push(id);
            }
        }
        assert_eq!(
            &first,
            wanted,
            "session {session} (partition {}): first calls out of publish order; calls (ms \
             from the kill, arrived..answered): {:?}\n{}\n{}",
            partition_of(session, partitions),
            mine.iter()
                .map(|r| format!(
                    "{} {}..{:?}",
                    command_of(r),
                    ms_from(killed, r.received_at),
                    r.answered_at.map(|a| ms_from(killed, a))
                ))
                .collect::<Vec<_>>(),
            fleet.log_lines("partition"),
            fleet.log_lines("returning")
        );
    }
    assert!(
        repeated.len() <= usize::from(prefetch),
        "more commands called again than the dead replica held ({prefetch}): {repeated:?}"
    );
    eprintln!(
        "partition failover: killed replica {victim} (the intake) after {calls_at_kill} of {n} \
         calls; partitions balanced on the two survivors {moved_after_kill:?} after the kill, \
         on all three {moved_after_restart:?} after the restart was ready ({since_spawn:?} \
         after it was spawned); {} calls in all, called again: {repeated:?}",
        fleet.sim.stats().calls
    );
    fleet.stop_leaving_nothing().await;
}

/// The output of the binary running `args` for `fleet`, within 30 s.
async fn fleet_cli(fleet: &Fleet, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = fleet.command(args);
    for (k, v) in env {
        command.env(k, v);
    }
    output(command, Duration::from_secs(30)).await
}

/// The line of `text` that has `token` as one of its words.
fn line_with<'a>(text: &'a str, token: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.split_whitespace().any(|w| w == token))
}

/// Whether a word of the output names replica `name`: a member is its name, or its name and
/// the run's id after a slash.
fn names(word: &str, name: &str) -> bool {
    word == name || word.strip_prefix(name).is_some_and(|r| r.starts_with('/'))
}

fn is_number(word: &str) -> bool {
    word.parse::<u64>().is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_command_lists_members_owners_and_depths_and_needs_redis() {
    let partitions = 4;
    let spec = FleetSpec::partitioned(2, partitions);
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(30)).await;
    let replicas: Vec<String> = fleet.replicas.iter().map(|r| r.name.clone()).collect();

    // Members publish what they consume with their heartbeat, after a handover's drain: the
    // listing settles a little after the metrics do.
    let settled = Instant::now() + Duration::from_secs(10);
    let stdout = loop {
        let stdout = succeeded(&fleet_cli(&fleet, &["fleet"], &[]).await);
        let shares = stdout
            .lines()
            .filter(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                replicas
                    .iter()
                    .any(|n| words.first().is_some_and(|w| names(w, n)))
                    && words.get(1) == Some(&"2")
            })
            .count();
        if shares == 2 || Instant::now() > settled {
            break stdout;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for name in &replicas {
        // A member's line: its name first, and the partitions it owns (an even share: 2).
        assert!(
            stdout.lines().any(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.first().is_some_and(|w| names(w, name)) && words.contains(&"2")
            }),
            "{name} listed with 2 partitions owned:\n{stdout}"
        );
    }
    let mut owners = HashMap::new();
    for queue in fleet.partition_queues() {
        let line = line_with(&stdout, &queue)
            .unwrap_or_else(|| panic!("partition {queue} listed:\n{stdout}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        let owner = replicas
            .iter()
            .find(|n| words.iter().any(|w| names(w, n)))
            .unwrap_or_else(|| panic!("{queue} has an owner: {line}"));
        *owners.entry(owner.clone()).or_insert(0) += 1;
        assert!(
            words.iter().any(|w| is_number(w)),
            "{queue} has a depth: {line}"
        );
    }
    assert_eq!(
        owners.values().copied().collect::<Vec<_>>(),
        vec![2, 2],
        "each member owns 2 partitions: {owners:?}\n{stdout}"
    );
    let intake = &fleet.settings.amqp.commands_queue;
    let line =
        line_with(&stdout, intake).unwrap_or_else(|| panic!("the intake queue listed:\n{stdout}"));
    assert!(
        line.split_whitespace().any(is_number),
        "the intake queue's depth: {line}"
    );

    // Without Redis there is no fleet to show: a clear error, not an empty table.
    let out = fleet_cli(&fleet, &["fleet"], &[("TRANSFER__FLEET__REDIS_URL", "")]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exited 0 without Redis:\n{stderr}");
    assert!(
        stderr.contains("fleet.redis_url"),
        "names the missing setting: {stderr}"
    );

    // A partition's depth is its ready commands: with the fleet stopped, 3 published to one.
    fleet.stop_leaving_nothing().await;
    let queue = fleet.partition_queues()[1].clone();
    let commands: Vec<Value> = (0..3)
        .map(|i| session_command(&format!("cli-{i}"), "s-cli", false))
        .collect();
    publish_commands(&fleet.channel, &queue, &commands).await;
    let stdout = succeeded(&fleet_cli(&fleet, &["fleet"], &[]).await);
    let line = line_with(&stdout, &queue).unwrap_or_else(|| panic!("{queue} listed:\n{stdout}"));
    assert!(
        line.split_whitespace().any(|w| w == "3"),
        "{queue} with depth 3: {line}\n{stdout}"
    );
    eprintln!("fleet command:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_the_calls_in_flight_across_all_partitions_of_a_replica() {
    let partitions = 8;
    let prefetch = 4;
    let spec = FleetSpec {
        latency: Duration::from_millis(300),
        prefetch,
        ..FleetSpec::partitioned(1, partitions)
    };
    let mut fleet = Fleet::start_balanced(spec, Duration::from_secs(30)).await;
    let t = tag();
    // Sessions in every partition, two each.
    let sessions = even_sessions(&format!("s-bound-{t}"), 16, partitions);
    let (commands, order) = interleaved(&format!("bound-{t}"), &sessions, 2);
    fleet.publish_all(&commands).await;
    let events = fleet
        .events_until(Duration::from_secs(40), |e| {
            all_ended(e, order.values().flatten())
        })
        .await;
    assert!(
        events
            .iter()
            .filter(|e| is_terminal(e))
            .all(|e| e.name() == "transfer.succeeded")
    );
    let most = fleet.sim.max_in_flight();
    eprintln!(
        "partition prefetch: at most {most} calls in flight for {} commands over {partitions} \
         partitions, prefetch {prefetch}",
        commands.len()
    );
    assert!(
        most <= usize::from(prefetch),
        "{most} calls in flight at once with prefetch {prefetch}"
    );
    // The bound was reached, so a larger one would have shown.
    assert_eq!(
        most,
        usize::from(prefetch),
        "the load never filled the prefetch"
    );
    fleet.stop_leaving_nothing().await;
}
