//! The circuit breaker (CONTRACT §11): during an outage longer than `breaker.open_after` it
//! opens, holds new commands and retries without spending attempts, probes, and everything
//! completes once the API answers; deadlines still end commands that wait.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use transfer_worker::ops::metrics::{Metrics, ProbeLabels};
use transfer_worker::tools::simulator::{Edge, RecordedRequest, Reply};

use crate::harness::admin::get;
use crate::harness::{Harness, Received, agent_command, eventually, expire_in, redis_url};

/// Short enough for a test, long enough that commands spend their whole budget before it.
const OPEN_AFTER: Duration = Duration::from_secs(2);
const PROBE_INTERVAL: Duration = Duration::from_millis(300);

async fn start(open_after: Duration) -> Harness {
    start_behind(open_after, Edge::RoutesFirst).await
}

/// The worker, with the simulator behind `edge`.
async fn start_behind(open_after: Duration, edge: Edge) -> Harness {
    Harness::start(|s, sim| {
        s.breaker.open_after = open_after;
        s.breaker.probe_interval = PROBE_INTERVAL;
        sim.edge = edge;
    })
    .await
}

fn probes(metrics: &Metrics, result: &'static str) -> u64 {
    metrics
        .breaker_probes
        .get_or_create(&ProbeLabels { result })
        .get()
}

/// The breaker's probe names no session; every real attempt does.
fn is_probe(r: &RecordedRequest) -> bool {
    r.bot_session_id.is_none()
}

async fn by_command(h: &mut Harness, n: usize) -> HashMap<String, Received> {
    let events = h.events(n).await;
    events
        .into_iter()
        .map(|e| (e.command_id().to_owned(), e))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_open_after_fails_no_command_and_spends_no_attempt_while_open() {
    outage_longer_than_open_after(Edge::RoutesFirst).await;
}

/// An edge that refuses an unsigned request with 401 while the service behind it is down
/// must not close the breaker: the probe is signed, so it reaches the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_an_edge_that_authenticates_first_the_probe_still_sees_the_outage() {
    outage_longer_than_open_after(Edge::AuthenticatesFirst).await;
}

async fn outage_longer_than_open_after(edge: Edge) {
    let mut h = start_behind(OPEN_AFTER, edge).await;
    let max_attempts = u64::from(h.settings.retry.max_attempts);
    h.publish(&agent_command("br-warm", "s-br-warm")).await;
    assert_eq!(h.next_event().await.name(), "transfer.succeeded");

    h.sim.start_outage(503);
    // Published as the outage begins: each spends its whole budget (4 attempts, backoff under
    // a second) long before open_after, and must not fail for it.
    let early: Vec<String> = (0..3).map(|i| format!("br-early-{i}")).collect();
    for id in &early {
        h.publish(&agent_command(id, &format!("s-{id}"))).await;
    }
    let metrics = h.metrics.clone();
    eventually("the breaker opens", || metrics.breaker_open.get() == 1).await;
    assert_eq!(
        get(h.admin_addr, "/readyz").await.0,
        StatusCode::OK,
        "the worker is healthy; the vendor is not"
    );
    // Published while open: held before their first attempt.
    let held: Vec<String> = (0..3).map(|i| format!("br-held-{i}")).collect();
    for id in &held {
        h.publish(&agent_command(id, &format!("s-{id}"))).await;
    }
    eventually("two probes fail", || probes(&metrics, "failed") >= 2).await;
    eventually("every command waits on the breaker", || {
        metrics.breaker_held.get() == 6
    })
    .await;
    h.assert_no_event(Duration::from_millis(300)).await;

    h.sim.end_outage();
    let events = by_command(&mut h, early.len() + held.len()).await;
    for id in early.iter().chain(&held) {
        let e = &events[id.as_str()];
        assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
    }
    for id in &early {
        // The budget spent on the outage was forgiven: more calls than max_attempts.
        let attempts = events[id.as_str()].json["attempts"].as_u64().unwrap();
        assert!(attempts > max_attempts, "{id}: {attempts} attempts");
    }
    for id in &held {
        assert_eq!(events[id.as_str()].json["attempts"], 1, "{id}");
    }
    assert_eq!(metrics.breaker_open.get(), 0);
    assert_eq!(metrics.breaker_openings.get(), 1);
    assert_eq!(metrics.breaker_held.get(), 0);
    assert!(metrics.breaker_open_time.get() > 0.0);

    // The API's view: while open (from the first probe to the one that was answered) only
    // probes reached it, and the held commands were first called after it answered.
    let requests = h.sim.requests();
    let probe_seqs: Vec<&RecordedRequest> = requests.iter().filter(|r| is_probe(r)).collect();
    let (first, last) = (probe_seqs[0], probe_seqs[probe_seqs.len() - 1]);
    assert!(probe_seqs.len() >= 3, "{} probes", probe_seqs.len());
    assert_eq!(last.status, 400, "an API that is up refuses a probe");
    assert!(
        probe_seqs
            .iter()
            .all(|p| p.auth.is_some() && p.account_id.is_some()),
        "every probe passes the front door: signed, with its account"
    );
    if edge == Edge::AuthenticatesFirst {
        // The edge does refuse an unsigned request while the service is down.
        h.sim.start_outage(503);
        let unsigned = reqwest::Client::new()
            .post(format!(
                "{}/agentassist/api/v1/public/{}/assign-conversation",
                h.sim.base_url(),
                h.settings.bots[0].stream_id
            ))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);
        h.sim.end_outage();
    }
    assert!(
        probe_seqs[..probe_seqs.len() - 1]
            .iter()
            .all(|p| p.status == 503)
    );
    let attempts_while_open: Vec<_> = requests
        .iter()
        .filter(|r| !is_probe(r) && r.seq > first.seq && r.seq < last.seq)
        .map(|r| (r.seq, r.bot_session_id.clone()))
        .collect();
    assert_eq!(attempts_while_open, [], "attempts against an open breaker");
    for id in &held {
        let session = format!("s-{id}");
        let calls: Vec<u64> = requests
            .iter()
            .filter(|r| r.bot_session_id.as_deref() == Some(session.as_str()))
            .map(|r| r.seq)
            .collect();
        assert!(calls.len() == 1 && calls[0] > last.seq, "{id}: {calls:?}");
    }
    h.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_still_end_commands_held_by_an_open_breaker() {
    let mut h = start(Duration::from_secs(1)).await;
    h.sim.start_outage(503);
    // Fails, spends its budget, is held; its deadline passes while the breaker is open.
    let mut tried = agent_command("br-tried", "s-br-tried");
    expire_in(&mut tried, Duration::from_secs(3));
    h.publish(&tried).await;
    let metrics = h.metrics.clone();
    eventually("the breaker opens", || metrics.breaker_open.get() == 1).await;
    // Never called: the breaker was open from its arrival to its deadline.
    let mut never = agent_command("br-never", "s-br-never");
    expire_in(&mut never, Duration::from_millis(1500));
    h.publish(&never).await;

    let events = by_command(&mut h, 2).await;
    assert_eq!(
        metrics.breaker_open.get(),
        1,
        "still open: the outage goes on"
    );
    let tried = &events["br-tried"];
    assert_eq!(tried.name(), "transfer.failed", "{}", tried.json);
    assert_eq!(tried.json["retryable"], true);
    assert_eq!(tried.json["error"]["status"], 503);
    assert_eq!(
        tried.json["attempts"],
        u64::from(h.settings.retry.max_attempts)
    );
    let never = &events["br-never"];
    assert_eq!(never.name(), "transfer.expired", "{}", never.json);
    assert_eq!(never.json["attempts"], 0);
    assert!(
        h.sim
            .requests()
            .iter()
            .all(|r| r.bot_session_id.as_deref() != Some("s-br-never")),
        "a command held from its arrival is never called"
    );
    h.sim.end_outage();
    eventually("the breaker closes", || metrics.breaker_open.get() == 0).await;
    h.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_failing_on_its_own_while_others_succeed_gets_one_last_attempt_and_fails() {
    // The default open_after (30 s): the breaker plays no part but for the verdict.
    let mut h = Harness::start(|_, _| {}).await;
    let max_attempts = h.settings.retry.max_attempts;
    h.sim.script((0..max_attempts).map(|_| Reply::Status(503)));
    h.publish(&agent_command("br-own", "s-br-own")).await;
    let metrics = h.metrics.clone();
    eventually("its spent budget waits for the verdict", || {
        metrics.breaker_held.get() == 1
    })
    .await;
    // Another command succeeds: the API answers, so the failures were br-own's own.
    h.sim.script([Reply::Accept, Reply::Status(503)]);
    h.publish(&agent_command("br-other", "s-br-other")).await;
    let events = by_command(&mut h, 2).await;
    assert_eq!(events["br-other"].name(), "transfer.succeeded");
    let own = &events["br-own"];
    assert_eq!(own.name(), "transfer.failed", "{}", own.json);
    assert_eq!(own.json["attempts"], max_attempts + 1, "one last attempt");
    assert_eq!(own.json["retryable"], true);
    assert_eq!(own.json["error"]["status"], 503);
    assert_eq!(metrics.breaker_openings.get(), 0);
    h.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_fleet_a_held_command_keeps_its_claim_renewed() {
    let lease = Duration::from_secs(1);
    let mut h = Harness::start(|s, _| {
        s.breaker.open_after = Duration::from_secs(1);
        s.breaker.probe_interval = PROBE_INTERVAL;
        s.fleet.redis_url = redis_url();
        s.fleet.lease = lease;
        s.fleet.redis_timeout = Duration::from_millis(500);
        // The fleet's keys for this test's queue expire on their own.
        s.commands.outcome_cache_ttl = Duration::from_secs(30);
    })
    .await;
    h.sim.start_outage(503);
    h.publish(&agent_command("br-claimed", "s-br-claimed"))
        .await;
    let metrics = h.metrics.clone();
    eventually("the breaker opens", || metrics.breaker_open.get() == 1).await;
    // Held for several leases: a claim left to lapse would be gone by now.
    tokio::time::sleep(lease * 3).await;
    let key = format!("{}:claim:br-claimed", h.settings.amqp.commands_queue);
    let client = redis::Client::open(redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(ttl > 0, "the claim {key} lapsed while held (PTTL {ttl})");
    assert_eq!(metrics.breaker_open.get(), 1, "still held");

    h.sim.end_outage();
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
    assert_eq!(metrics.fleet_claims_taken_over.get(), 0);
    h.stop_leaving_nothing().await;
}
