//! Commands in, API calls out, one event per command (CONTRACT §2–4).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use lapin::BasicProperties;
use lapin::types::AMQPValue;
use serde_json::{Value, json};
use sha2::Digest;
use transfer_worker::tools::simulator::{RecordedRequest, Reply};

use crate::harness::{
    Harness, ReplyQueue, agent_command, expire_in, queue_command, sim, sorted_keys, test_channel,
    wait_for,
};

fn header(d: &lapin::message::Delivery, key: &str) -> String {
    let headers = d.properties.headers().as_ref().expect("headers");
    match headers.inner().get(key) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {key}: {other:?}"),
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn assert_timestamp(v: &Value) {
    let s = v.as_str().expect("timestamp is a string");
    assert!(
        s.len() == 24 && s.ends_with('Z') && s.as_bytes()[19] == b'.',
        "RFC 3339 UTC with milliseconds: {s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_queue_transfers_publish_contract_events() {
    let mut h = Harness::start(|_, _| {}).await;
    let stream_id = h.settings.bots[0].stream_id.clone();
    h.publish(&agent_command("cmd-agent", "0123456789abcdef01234567"))
        .await;
    let agent = h.next_event().await;
    h.publish(&queue_command("cmd-queue", "0123456789abcdef0123456f"))
        .await;
    let queue = h.next_event().await;

    for (e, target) in [
        (&agent, json!({"type": "agent", "id": "a-0e1f2a3b-agent"})),
        (&queue, json!({"type": "queue", "id": "qu-7f8e9d-support"})),
    ] {
        let v = &e.json;
        assert_eq!(e.routing_key, "transfer.succeeded");
        assert_eq!(v["event"], "transfer.succeeded");
        let event_id = v["eventId"].as_str().unwrap();
        uuid::Uuid::parse_str(event_id).expect("eventId is a uuid");
        assert_eq!(v["streamId"], stream_id.as_str());
        assert_eq!(v["target"], target);
        assert_eq!(v["attempts"], 1);
        assert!(v["durationMs"].as_u64().is_some());
        assert_eq!(v["response"]["status"], "transferred");
        assert_timestamp(&v["occurredAt"]);
        assert_eq!(
            sorted_keys(v),
            [
                "attempts",
                "botSessionId",
                "commandId",
                "durationMs",
                "event",
                "eventId",
                "occurredAt",
                "response",
                "streamId",
                "target"
            ]
        );
        e.assert_properties();
        let p = &e.properties;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(p.timestamp().unwrap().abs_diff(now) < 60);
    }
    assert_eq!(agent.json["commandId"], "cmd-agent");
    assert_eq!(agent.json["botSessionId"], "0123456789abcdef01234567");
    assert_eq!(agent.json["response"]["agentId"], "a-0e1f2a3b-agent");
    assert_eq!(queue.json["response"]["queueId"], "qu-7f8e9d-support");

    // What the API received: the documented bodies, with the relay URL as callbackUrl.
    let requests = h.sim.requests();
    assert_eq!(requests.len(), 2);
    let relay_prefix = format!("http://{}/callbacks/", h.relay_addr);
    let a = &requests[0].body;
    assert_eq!(a["orgId"], "o-6a8a7a3e-5c9b-4f0e-9a57-1f1b2c3d4e5f");
    assert_eq!(a["aId"], "a-0e1f2a3b-agent");
    assert!(
        a.get("transferredType").is_none(),
        "no transferredType for agents: {a}"
    );
    assert!(
        a["callbackUrl"]
            .as_str()
            .unwrap()
            .starts_with(&relay_prefix)
    );
    let q = &requests[1].body;
    assert_eq!(q["transferredType"], "QUEUE");
    assert_eq!(q["queueId"], "qu-7f8e9d-support");
    assert!(q.get("aId").is_none());
    assert_eq!(
        requests[1].account_id.as_deref(),
        Some(h.settings.bots[0].account_id.as_str())
    );
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_with_its_own_callback_url_sends_it_as_is() {
    let mut h = Harness::start(|_, _| {}).await;
    let mut c = agent_command("own-cb", "s-own-cb");
    c["callbackUrl"] = json!("https://bot.example/transfer-status");
    h.publish(&c).await;
    assert_eq!(h.next_event().await.name(), "transfer.succeeded");
    assert_eq!(
        h.sim.requests()[0].body["callbackUrl"],
        "https://bot.example/transfer-status"
    );
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_is_rejected_dead_lettered_and_the_worker_goes_on() {
    let mut h = Harness::start(|_, _| {}).await;
    let big = format!(
        r#"{{"orgId":"o","botSessionId":"s","aId":"a","pad":"{}"}}"#,
        "x".repeat(64 * 1024)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\xc3\x28 not utf-8".to_vec(), "not UTF-8"),
        (b"{\"orgId\": ".to_vec(), "not valid JSON"),
        (big.into_bytes(), "limit is 65536"),
        (br#"{"botSessionId":"s1","aId":"a-1"}"#.to_vec(), "missing required field orgId"),
        (br#"{"orgId":"o-1","aId":"a-1"}"#.to_vec(), "missing required field botSessionId"),
        (br#"{"orgId":"o-1","botSessionId":"s1"}"#.to_vec(), "no target"),
        (
            br#"{"orgId":"o-1","botSessionId":"s1","aId":"a-1","transferredType":"QUEUE","queueId":"q-1"}"#.to_vec(),
            "two targets",
        ),
        (br#"{"orgId":"o-1","botSessionId":"s1","aId":"a-1","streamId":"st-unknown"}"#.to_vec(), "unknown streamId"),
        (br#"{"orgId":"o-1","botSessionId":"s1","transferredType":"BOT","queueId":"q-1"}"#.to_vec(), "transferredType \"BOT\""),
    ];
    for (i, (body, needle)) in cases.iter().enumerate() {
        let props = BasicProperties::default().with_message_id(format!("bad-{i}").into());
        h.publish_raw(body, props).await;
        let e = h.next_event().await;
        assert_eq!(e.routing_key, "transfer.rejected", "case {i}");
        assert_eq!(e.json["error"]["kind"], "invalid_command");
        let message = e.json["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "case {i}: {message:?} lacks {needle:?}"
        );
        assert_eq!(e.json["messageId"], format!("bad-{i}"));
        assert_eq!(e.json["attempts"], 0);
        let dead = h.next_dead_letter().await;
        assert_eq!(
            &dead.data, body,
            "the dead letter is the command as received"
        );
        assert_eq!(header(&dead, "x-transfer-event"), "transfer.rejected");
        assert_eq!(header(&dead, "x-transfer-error"), message);
    }
    // Ids that could not be read are null; those that could are kept.
    h.publish_raw(
        br#"{"commandId":"half","botSessionId":"s9","aId":"a-9"}"#,
        BasicProperties::default(),
    )
    .await;
    let e = h.next_event().await;
    assert_eq!(e.json["commandId"], "half");
    assert_eq!(e.json["botSessionId"], "s9");
    assert_eq!(e.json["target"], json!({"type":"agent","id":"a-9"}));
    let _ = h.next_dead_letter().await;
    // Nothing reached the API, and the worker still works.
    assert!(h.sim.requests().is_empty());
    h.publish(&agent_command("after-bad", "s-after")).await;
    assert_eq!(h.next_event().await.name(), "transfer.succeeded");
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_then_200_succeeds_on_the_second_attempt() {
    let mut h = Harness::start(|_, _| {}).await;
    h.sim.script([Reply::Status(503), Reply::Accept]);
    h.publish(&agent_command("flaky", "s-flaky")).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded");
    assert_eq!(e.json["attempts"], 2);
    assert_eq!(h.sim.requests().len(), 2);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_is_retried_once_with_a_fresh_token() {
    // Tokens with `iat` and a long TTL: cached, and a new one differs from one minted in an
    // earlier second, so the API's log tells a fresh token from the cached one.
    let mut h = Harness::start(|s, _| s.bots[0].token_ttl = Some(Duration::from_secs(3600))).await;
    h.publish(&agent_command("before", "s-before")).await;
    assert_eq!(h.next_event().await.name(), "transfer.succeeded");
    let minted_in = unix_secs();
    while unix_secs() == minted_in {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.sim.script([Reply::Status(401), Reply::Accept]);
    h.publish(&agent_command("reauth", "s-reauth")).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded");
    assert_eq!(e.json["attempts"], 2);
    let auth: Vec<String> = h
        .sim
        .requests()
        .iter()
        .map(|r| r.auth.clone().expect("an auth header"))
        .collect();
    assert_eq!(auth.len(), 3);
    assert_eq!(auth[1], auth[0], "the token is cached between commands");
    assert_ne!(
        auth[2], auth[1],
        "the retry after a 401 carries a fresh token, not the refused one"
    );
    // A second 401 in a row is final.
    h.sim
        .script([Reply::Status(401), Reply::Status(401), Reply::Accept]);
    h.publish(&agent_command("reauth-2", "s-reauth-2")).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.failed");
    assert_eq!(e.json["attempts"], 2);
    assert_eq!(e.json["error"]["status"], 401);
    assert_eq!(e.json["retryable"], false);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_transient() {
    // Long enough for a healthy call on a loaded machine: only the hang times out.
    let mut h = Harness::start(|s, _| s.agentassist.request_timeout = Duration::from_secs(1)).await;
    h.sim.script([Reply::Hang, Reply::Accept]);
    h.publish(&agent_command("slow", "s-slow")).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded");
    assert_eq!(e.json["attempts"], 2);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_waits_at_least_that_long() {
    let mut h = Harness::start(|_, _| {}).await;
    h.sim.script([
        Reply::RateLimited {
            retry_after: Duration::from_secs(2),
        },
        Reply::Accept,
    ]);
    h.publish(&agent_command("limited", "s-limited")).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded");
    assert_eq!(e.json["attempts"], 2);
    let r = h.sim.requests();
    let gap = r[1].received_at - r[0].received_at;
    // The backoff alone would be at most 20 ms here.
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_fails_at_once_without_retry() {
    let mut h = Harness::start(|_, _| {}).await;
    h.sim.script([Reply::Status(400), Reply::Accept]);
    h.publish(&queue_command("refused", "s-refused")).await;
    let e = h.next_event().await;
    assert_eq!(e.routing_key, "transfer.failed");
    assert_eq!(e.json["attempts"], 1);
    assert_eq!(e.json["retryable"], false);
    assert_eq!(e.json["error"]["kind"], "http_status");
    assert_eq!(e.json["error"]["status"], 400);
    assert!(
        e.json["error"]["body"]["errors"].is_array(),
        "the API's body is kept: {}",
        e.json
    );
    assert_eq!(h.sim.requests().len(), 1);
    let dead = h.next_dead_letter().await;
    assert_eq!(header(&dead, "x-transfer-event"), "transfer.failed");
    assert!(header(&dead, "x-transfer-error").contains("400"));
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_until_the_budget_runs_out_fail_as_retryable() {
    // The budget alone: with the breaker, a budget spent on 5xx waits for its verdict
    // (tests/it/breaker.rs).
    let mut h = Harness::start(|s, _| {
        s.retry.max_attempts = 3;
        s.breaker.enabled = false;
    })
    .await;
    h.sim.script([
        Reply::Status(503),
        Reply::Status(502),
        Reply::Status(500),
        Reply::Accept,
    ]);
    h.publish(&agent_command("doomed", "s-doomed")).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.failed");
    assert_eq!(e.json["attempts"], 3);
    assert_eq!(e.json["retryable"], true);
    assert_eq!(e.json["error"]["status"], 500);
    assert_eq!(h.sim.requests().len(), 3);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_command_is_never_sent() {
    let mut h = Harness::start(|_, _| {}).await;
    let mut c = agent_command("late", "s-late");
    c["expiresAt"] = json!("2020-01-01T00:00:00Z");
    h.publish(&c).await;
    let e = h.next_event().await;
    assert_eq!(e.routing_key, "transfer.expired");
    assert_eq!(e.json["expiresAt"], "2020-01-01T00:00:00.000Z");
    assert_eq!(e.json["attempts"], 0);
    // An AMQP timestamp older than commands.max_age is a deadline too.
    let old = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let body = serde_json::to_vec(&agent_command("stale", "s-stale")).unwrap();
    h.publish_raw(&body, BasicProperties::default().with_timestamp(old))
        .await;
    let e = h.next_event().await;
    assert_eq!(e.routing_key, "transfer.expired");
    assert_eq!(e.json["commandId"], "stale");
    assert!(h.sim.requests().is_empty(), "expired commands reach no API");
    let dead = h.next_dead_letter().await;
    assert_eq!(header(&dead, "x-transfer-event"), "transfer.expired");
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_gets_the_outcome_with_the_commands_correlation_id() {
    let mut h = Harness::start(|_, _| {}).await;
    let (_conn, ch) = test_channel().await;
    let reply = ReplyQueue::declare(&ch).await;
    let body = serde_json::to_vec(&agent_command("with-reply", "s-reply")).unwrap();
    let props = BasicProperties::default()
        .with_reply_to(reply.name.clone())
        .with_correlation_id("caller-42".into());
    h.publish_raw(&body, props).await;
    let on_results = h.next_event().await;
    let got = reply.next(&ch).await;
    let v: Value = serde_json::from_slice(&got.data).unwrap();
    assert_eq!(v, on_results.json, "the same event");
    assert_eq!(
        got.properties.correlation_id().as_ref().unwrap().as_str(),
        "caller-42"
    );
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_command_is_not_sent_again_and_its_event_is_republished() {
    let mut h = Harness::start(|_, _| {}).await;
    h.publish(&agent_command("once", "s-once")).await;
    let first = h.next_event().await;
    // Published again by an upstream retry.
    h.publish(&agent_command("once", "s-once")).await;
    let second = h.next_event().await;
    assert_eq!(second.json, first.json, "same event, same eventId");
    assert_eq!(h.sim.requests().len(), 1, "the API was called once");
    // Without commandId: the body hash dedupes.
    let mut anon = agent_command("x", "s-anon");
    anon.as_object_mut().unwrap().remove("commandId");
    h.publish(&anon).await;
    let a = h.next_event().await;
    h.publish(&anon).await;
    let b = h.next_event().await;
    let digest = sha2::Sha256::digest(serde_json::to_vec(&anon).unwrap());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        a.command_id(),
        format!("sha256:{hex}"),
        "the SHA-256 of the body"
    );
    assert_eq!(a.json["eventId"], b.json["eventId"]);
    assert_eq!(h.sim.requests().len(), 2);
    assert_eq!(h.metrics.commands_deduplicated.get(), 2);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_session_keeps_order_while_other_sessions_overtake() {
    let latency = Duration::from_millis(400);
    let mut h = Harness::start(|_, sim| sim.latency = latency).await;
    // Each command its own agent, so the API's log shows which call is which.
    for i in 0..4 {
        let mut c = agent_command(&format!("slow-{i}"), "s-busy");
        c["aId"] = json!(format!("a-busy-{i}"));
        h.publish(&c).await;
    }
    let mut fast = agent_command("fast", "s-other");
    fast["aId"] = json!("a-other");
    h.publish(&fast).await;
    let events = h.events(5).await;
    let order: Vec<&str> = events.iter().map(|e| e.command_id()).collect();
    let busy: Vec<&str> = order
        .iter()
        .copied()
        .filter(|id| id.starts_with("slow"))
        .collect();
    assert_eq!(busy, ["slow-0", "slow-1", "slow-2", "slow-3"]);
    // s-busy needs four latencies one after another; the other session needs one.
    let fast_at = order.iter().position(|id| *id == "fast").unwrap();
    let last_busy = order.iter().position(|id| *id == "slow-3").unwrap();
    assert!(
        fast_at < last_busy,
        "the other session overtook the queue of s-busy: {order:?}"
    );

    // The API saw the session's calls in publish order, one at a time: each arrived only after
    // the previous one was answered, so at least one latency after the previous one arrived.
    let requests = h.sim.requests();
    let calls: Vec<&RecordedRequest> = requests
        .iter()
        .filter(|r| r.bot_session_id.as_deref() == Some("s-busy"))
        .collect();
    let agents: Vec<&str> = calls
        .iter()
        .map(|r| r.body["aId"].as_str().unwrap())
        .collect();
    assert_eq!(agents, ["a-busy-0", "a-busy-1", "a-busy-2", "a-busy-3"]);
    for pair in calls.windows(2) {
        let answered = pair[0].answered_at.expect("answered");
        assert!(
            pair[1].received_at >= answered,
            "{} arrived {:?} before {} was answered",
            pair[1].body["aId"],
            answered - pair[1].received_at,
            pair[0].body["aId"]
        );
        assert!(pair[1].received_at - pair[0].received_at >= latency);
    }
    // And the other session's call ran while one of s-busy's was on the wire.
    let other = requests
        .iter()
        .find(|r| r.bot_session_id.as_deref() == Some("s-other"))
        .unwrap();
    let overlaps = |r: &&RecordedRequest| {
        r.received_at < other.answered_at.unwrap() && other.received_at < r.answered_at.unwrap()
    };
    assert!(calls.iter().any(overlaps), "sessions ran one after another");
    h.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacing_holds_a_low_rate_over_any_sliding_window() {
    let limit = 3;
    let window = Duration::from_secs(1);
    let mut h = Harness::start(|s, _| {
        s.bots[0].rate_limit = limit;
        s.bots[0].rate_window = window;
    })
    .await;
    for i in 0..10 {
        h.publish(&agent_command(
            &format!("paced-{i}"),
            &format!("s-paced-{i}"),
        ))
        .await;
    }
    let events = h.events(10).await;
    assert!(events.iter().all(|e| e.name() == "transfer.succeeded"));
    let mut times: Vec<Instant> = h.sim.requests().iter().map(|r| r.received_at).collect();
    times.sort();
    assert_eq!(times.len(), 10);
    // The pacer spaces the calls' starts; the simulator sees their arrivals, each a little late
    // by a scheduling delay that varies with the machine's load (two tests at once on two
    // cores). Slack for that delay, far less than a window: a fourth call per window, or a
    // burst, still fails.
    let slack = Duration::from_millis(150);
    let narrowed = window - slack;
    for (i, t) in times.iter().enumerate() {
        let within = times[i..].iter().filter(|u| **u - *t < narrowed).count();
        assert!(
            within <= limit as usize,
            "{within} calls within {narrowed:?} from call {i}"
        );
    }
    // 10 calls at 3 per second need at least three full windows.
    assert!(times[9] - times[0] >= 3 * window - slack);
    h.stop().await.unwrap();
}

/// A worker whose account may call once every 30 s.
async fn once_in_30_s() -> Harness {
    Harness::start(|s, _| {
        s.bots[0].rate_limit = 1;
        s.bots[0].rate_window = Duration::from_secs(30);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_deadline_passes_while_paced_expires_unsent() {
    let mut h = once_in_30_s().await;
    h.publish(&agent_command("first", "s-first")).await;
    assert_eq!(h.next_event().await.name(), "transfer.succeeded");
    let mut c = agent_command("waits", "s-waits");
    expire_in(&mut c, Duration::from_secs(2));
    h.publish(&c).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.expired");
    assert_eq!(h.sim.requests().len(), 1);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_between_attempts_fails_with_the_last_error() {
    let mut h = once_in_30_s().await;
    h.sim.script([Reply::Status(503)]);
    let mut c = agent_command("out-of-time", "s-out-of-time");
    expire_in(&mut c, Duration::from_secs(2));
    h.publish(&c).await;
    let e = h.next_event().await;
    // The retry's slot lies 30 s out, past the deadline: the 503 is what went wrong.
    assert_eq!(e.name(), "transfer.failed", "{}", e.json);
    assert_eq!(e.json["attempts"], 1);
    assert_eq!(e.json["retryable"], true);
    assert_eq!(e.json["error"]["status"], 503);
    assert_eq!(h.sim.requests().len(), 1);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_results_exchange_is_declared_again_and_the_outcome_delivered() {
    let h = Harness::start(|_, _| {}).await;
    let (_conn, ch) = test_channel().await;
    let reply = ReplyQueue::declare(&ch).await;
    // An operator deletes the exchange: the worker's next publish closes its channel.
    h.channel
        .exchange_delete(
            h.settings.amqp.results_exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let body = serde_json::to_vec(&agent_command("orphan", "s-orphan")).unwrap();
    h.publish_raw(
        &body,
        BasicProperties::default().with_reply_to(reply.name.clone()),
    )
    .await;
    // The outcome arrives on reply_to once the worker has reconnected and re-declared.
    let got = reply.next(&ch).await;
    let v: Value = serde_json::from_slice(&got.data).unwrap();
    assert_eq!(v["event"], "transfer.succeeded");
    assert_eq!(
        h.sim.requests().len(),
        1,
        "answered from memory, not sent again"
    );
    assert_eq!(h.metrics.broker_reconnects.get(), 1);
    let passive = lapin::options::ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    h.channel
        .exchange_declare(
            h.settings.amqp.results_exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            passive,
            Default::default(),
        )
        .await
        .expect("the worker declared the exchange again");
    h.stop_leaving_nothing().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_broker_connection_loses_no_command() {
    let (proxy, mut h) =
        Harness::start_behind_proxy(|_, sim| sim.latency = Duration::from_millis(150)).await;
    let n = 40;
    for i in 0..n {
        let mut c = agent_command(&format!("cut-{i}"), &format!("s-cut-{}", i % 10));
        c["aId"] = json!(format!("a-cut-{i}"));
        h.publish(&c).await;
    }
    // Let some complete, then cut while calls are on the wire.
    let mut seen: HashMap<String, usize> = HashMap::new();
    while seen.len() < 5 {
        let e = h.next_event().await;
        *seen.entry(e.command_id().to_owned()).or_default() += 1;
    }
    let before_cut = sim::call_on_the_wire(&h.sim).await;
    proxy.cut();
    let after_cut = Instant::now();
    let (what, limit) = ("the cut noticed", Duration::from_secs(5));
    wait_for(what, limit, String::new, async || !h.broker.is_ready()).await;
    proxy.restore();
    while seen.len() < n {
        let e = h.next_event().await;
        assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
        *seen.entry(e.command_id().to_owned()).or_default() += 1;
    }
    // Work was in flight at the cut: calls that arrived before it and were answered after.
    sim::all_answered(&h.sim, Duration::from_secs(10)).await;
    let requests = h.sim.requests();
    let cut_off = sim::straddling(&requests, before_cut, after_cut);
    assert!(cut_off >= 1, "no call straddled the cut");
    // Every API call is accounted for by a terminal event (one call per command, so no call is
    // in doubt), and every command whose call straddled the cut came back and was answered
    // from memory rather than sent again.
    let mut per_command: HashMap<&str, usize> = HashMap::new();
    for r in &requests {
        *per_command
            .entry(r.body["aId"].as_str().unwrap())
            .or_default() += 1;
    }
    let twice: Vec<_> = per_command.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "sent to the API more than once: {twice:?}"
    );
    assert_eq!(
        requests.len(),
        n,
        "API calls = terminal events + 0 in doubt"
    );
    assert_eq!(seen.len(), n);
    let deduplicated = h.metrics.commands_deduplicated.get();
    assert!(
        deduplicated >= cut_off as u64,
        "{cut_off} calls straddled the cut, {deduplicated} redeliveries answered from memory"
    );
    assert_eq!(
        h.metrics.broker_reconnects.get(),
        1,
        "one loss, one reconnect"
    );
    h.stop_leaving_nothing().await;
}
