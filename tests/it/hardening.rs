//! Hostile and careless input (docs/contract.md §4, last bullet; §5; §7): a message, a header
//! or an API answer that used to crash the process, wedge a session or mislead, and the fixes
//! of a code review. Each test names what it pins.

use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use secrecy::SecretString;
use serde_json::json;
use transfer_worker::agentassist::transfer::FAULT_PANIC_ORG_ID;
use transfer_worker::broker::{PublishError, Publisher};
use transfer_worker::callbacks::token::{CallbackIds, TokenSigner};
use transfer_worker::contract::Target;
use transfer_worker::contract::event::{Event, EventKind, callback_event_id};
use transfer_worker::tools::simulator::Reply;

use crate::harness::{
    Harness, agent_command, amqp_url, eventually, expire_in, passive, test_channel, test_settings,
};
use crate::relay::post;
use crate::schemas::{assert_valid, schema};

/// Validates an event against the union schema and its own.
fn assert_schemas(json: &serde_json::Value) {
    let own = format!("{}.json", json["event"].as_str().unwrap());
    for file in ["event.json", own.as_str()] {
        assert_valid(&schema(file), file, json);
    }
}

/// A 429 whose `Retry-After` says this, verbatim.
fn rate_limited(retry_after: &str) -> Reply {
    Reply::Raw {
        status: 429,
        headers: vec![("retry-after".into(), retry_after.into())],
        body: br#"{"errors":[{"msg":"rate limit exceeded","code":429}]}"#.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_at_the_end_of_time_neither_kills_the_worker_nor_sets_a_deadline() {
    let mut h = Harness::start(|_, _| {}).await;
    let props = BasicProperties::default().with_timestamp(u64::MAX);
    h.publish_raw(
        &serde_json::to_vec(&agent_command("eot-1", "s-eot")).unwrap(),
        props,
    )
    .await;
    h.publish(&agent_command("eot-2", "s-eot")).await;
    let events = h.events(2).await;
    for (e, id) in events.iter().zip(["eot-1", "eot-2"]) {
        assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
        assert_eq!(e.command_id(), id);
    }
    // The process is alive: it stops cleanly, not with a panic.
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_at_the_end_of_time_is_cut_to_the_maximum_and_the_session_goes_on() {
    let mut h = Harness::start(|s, _| s.retry.max_retry_after = Duration::from_millis(500)).await;
    h.sim
        .script([rate_limited("18446744073709551615"), Reply::Accept]);
    h.publish(&agent_command("ra-max", "s-ra")).await;
    h.publish(&agent_command("ra-next", "s-ra")).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
    assert_eq!(e.command_id(), "ra-max");
    assert_eq!(e.json["attempts"], 2);
    // The session was not wedged, and the account was not paused for ever.
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
    assert_eq!(e.command_id(), "ra-next");
    let r = h.sim.requests();
    assert_eq!(r.len(), 3);
    let gap = r[1].received_at - r[0].received_at;
    assert!(
        gap >= Duration::from_millis(500),
        "honoured up to the cap: {gap:?}"
    );
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_does_not_pause_the_account_for_centuries() {
    let mut h = Harness::start(|s, _| s.retry.max_retry_after = Duration::from_millis(300)).await;
    // 95 years: no overflow, but without a cap every call of the account would wait for it.
    h.sim.script([rate_limited("3000000000"), Reply::Accept]);
    h.publish(&agent_command("century-1", "s-century-1")).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
    h.publish(&agent_command("century-2", "s-century-2")).await;
    let e = h.next_event().await;
    assert_eq!(e.command_id(), "century-2");
    assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_past_the_deadline_fails_the_command_at_once() {
    let mut h = Harness::start(|_, _| {}).await;
    h.sim.script([rate_limited("120"), Reply::Accept]);
    let mut command = agent_command("ra-deadline", "s-ra-deadline");
    let expires = expire_in(&mut command, Duration::from_secs(30));
    h.publish(&command).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.failed", "{}", e.json);
    assert_eq!(e.json["retryable"], true);
    assert_eq!(e.json["attempts"], 1);
    assert_eq!(e.json["error"]["status"], 429);
    // Ended at once, not at the deadline 30 s away.
    assert!(SystemTime::now() < expires - Duration::from_secs(20));
    assert_eq!(h.sim.requests().len(), 1);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_inside_one_command_fails_it_alone_and_its_session_goes_on() {
    let mut h = Harness::start(|_, _| {}).await;
    let mut bad = agent_command("boom", "s-boom");
    bad["orgId"] = json!(FAULT_PANIC_ORG_ID);
    h.publish(&bad).await;
    h.publish(&agent_command("after-boom", "s-boom")).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.failed", "{}", e.json);
    assert_eq!(e.command_id(), "boom");
    assert_eq!(e.json["error"]["kind"], "internal");
    assert_schemas(&e.json);
    assert_eq!(e.json["retryable"], false);
    assert_eq!(e.json["botSessionId"], "s-boom");
    assert!(
        e.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fault injected"),
        "{}",
        e.json
    );
    let dead = h.next_dead_letter().await;
    let headers = dead.properties.headers().as_ref().unwrap().inner();
    assert!(headers.contains_key("x-transfer-error"));
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
    assert_eq!(e.command_id(), "after-boom");
    assert_eq!(h.metrics.command_panics.get(), 1);
    assert!(
        h.metrics
            .encode()
            .contains("transfer_command_panics_total 1")
    );
    // Only the healthy command reached the API.
    assert_eq!(h.sim.requests().len(), 1);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_body_over_64_kib_is_cut_and_the_event_says_so() {
    let mut h = Harness::start(|_, _| {}).await;
    let big = format!(
        r#"{{"status":"transferred","pad":"{}"}}"#,
        "x".repeat(200_000)
    );
    h.sim.script([Reply::Raw {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: big.into_bytes(),
    }]);
    h.publish(&agent_command("big-body", "s-big")).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded", "{}", e.json["event"]);
    assert_eq!(e.json["responseTruncated"], true);
    assert_schemas(&e.json);
    let kept = e.json["response"].as_str().expect("a cut body is a string");
    assert_eq!(kept.len(), 64 * 1024);
    assert!(kept.starts_with(r#"{"status":"transferred""#));
    // A body within the cap is kept as JSON, and says nothing of truncation.
    h.publish(&agent_command("small-body", "s-small")).await;
    let e = h.next_event().await;
    assert!(e.json["response"].is_object(), "{}", e.json);
    assert!(e.json.get("responseTruncated").is_none(), "{}", e.json);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_the_grace_has_run_out_no_new_call_starts() {
    let mut h = Harness::start(|s, sim| {
        s.shutdown.grace = Duration::from_millis(200);
        sim.latency = Duration::from_secs(2);
    })
    .await;
    // The first call is on the wire when the grace runs out; its 401 would, before the fix,
    // start a second call at once with a fresh token.
    h.sim.script([Reply::Status(401), Reply::Accept]);
    h.publish(&agent_command("late", "s-late")).await;
    eventually("the command is in flight", || {
        h.metrics.commands_in_flight.get() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.stop_app().await.unwrap();
    // Stopping waited for the call on the wire to end. It was the only one: the command went
    // back to the queue instead of starting another.
    assert_eq!(h.sim.stats().calls, 1);
    assert_eq!(h.metrics.commands_requeued.get(), 1);
    let queue = h.settings.amqp.commands_queue.clone();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let q = passive(&h.channel, &queue).await;
        if q.consumer_count() == 0 {
            assert_eq!(q.message_count(), 1, "the command is back in the queue");
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the worker still consumes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_posted_twice_carries_one_event_id_and_expired_tokens_get_404() {
    let mut h = Harness::start(|_, _| {}).await;
    let ids = CallbackIds {
        command_id: "cb-1".into(),
        stream_id: h.settings.bots[0].stream_id.clone(),
        bot_session_id: "s-cb".into(),
        target: Target::Agent("a-1".into()),
    };
    let ttl = h.settings.callbacks.token_ttl;
    let signer = TokenSigner::new(h.settings.callbacks.secret.clone(), vec![], ttl);
    let token = signer.sign(&ids);
    let url = format!("http://{}/callbacks/{token}", h.relay_addr);
    let body = br#"{"status":"transferred"}"#.to_vec();
    for _ in 0..2 {
        let status = post(&url, Some("application/json"), body.clone()).await;
        assert_eq!(status, 200);
    }
    let a = h.next_event().await;
    let b = h.next_event().await;
    let expected = callback_event_id(&token, &body).to_string();
    assert_eq!(a.json["eventId"], expected);
    assert_eq!(b.json["eventId"], expected);
    assert_eq!(
        a.properties.message_id().as_ref().unwrap().as_str(),
        expected
    );
    // Another body on the same URL is another callback.
    let status = post(&url, Some("application/json"), b"{}".to_vec()).await;
    assert_eq!(status, 200);
    let c = h.next_event().await;
    assert_ne!(c.json["eventId"], expected);

    // Signed with the right secret, but longer ago than the ttl: refused like a forgery.
    let issued = SystemTime::now() - ttl - Duration::from_secs(60);
    let old = signer.sign_at(&ids, issued);
    let status = post(
        &format!("http://{}/callbacks/{old}", h.relay_addr),
        Some("application/json"),
        body.clone(),
    )
    .await;
    assert_eq!(status, 404);
    let other = TokenSigner::new(SecretString::from("a-different-secret-000"), vec![], ttl);
    let forged = other.sign(&ids);
    let status = post(
        &format!("http://{}/callbacks/{forged}", h.relay_addr),
        Some("application/json"),
        body,
    )
    .await;
    assert_eq!(status, 404);
    h.assert_no_event(Duration::from_millis(300)).await;
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_never_confirmed_is_an_error() {
    let (conn, _) = test_channel().await;
    // A channel without confirm mode: lapin answers every publish "not requested".
    let channel = conn.create_channel().await.unwrap();
    let mut amqp = test_settings().amqp;
    amqp.url = amqp_url();
    amqp.results_exchange = "amq.topic".into();
    amqp.dead_letter_exchange = "amq.fanout".into();
    let publisher = Publisher::on_channel(channel, &amqp);
    let rejection = transfer_worker::contract::Rejection {
        command_id: "nc-1".into(),
        stream_id: None,
        bot_session_id: None,
        target: None,
        message: "test".into(),
    };
    let event = Event::rejected(&rejection, None);
    assert_eq!(event.kind, EventKind::Rejected);
    let result = publisher.publish(&event, None, None).await;
    assert!(
        matches!(result, Err(PublishError::NotConfirmed(_))),
        "{result:?}"
    );
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_a_lost_connection_neither_pauses_nor_nacks_before_its_redelivery() {
    let (proxy, mut h) =
        Harness::start_behind_proxy(|_, sim| sim.latency = Duration::from_millis(1500)).await;
    h.publish(&agent_command("lost-1", "s-lost")).await;
    eventually("the command is in flight", || {
        h.metrics.commands_in_flight.get() == 1
    })
    .await;
    // Cut while the call is on the wire; the connection comes back before it answers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut();
    eventually("the loss is seen", || !h.broker.is_ready()).await;
    proxy.restore();
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
    assert_eq!(e.command_id(), "lost-1");
    eventually("the redelivery is answered from memory", || {
        h.metrics.commands_deduplicated.get() == 1
    })
    .await;
    // The old job's publish failed with its connection: the broker had already returned the
    // command, so the worker neither waited nor nacked it.
    assert_eq!(h.metrics.commands_requeued.get(), 0);
    assert_eq!(h.sim.requests().len(), 1);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_failed_events_carry_their_name_as_amqp_type() {
    let mut h = Harness::start(|_, _| {}).await;
    h.publish_raw(b"not json", BasicProperties::default()).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.rejected");
    assert_eq!(
        e.properties.kind().as_ref().unwrap().as_str(),
        "transfer.rejected"
    );
    h.sim.script([Reply::Status(400)]);
    h.publish(&agent_command("typed-failed", "s-typed")).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.failed");
    assert_eq!(
        e.properties.kind().as_ref().unwrap().as_str(),
        "transfer.failed"
    );
    h.stop().await.unwrap();
}

#[test]
fn a_typo_in_the_config_stops_run_and_config_naming_the_key_and_its_origin() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, b"[retry]\nmax_attemps = 2\n").unwrap();
    let path = file.path().display().to_string();
    for command in ["config", "run"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_transfer-worker"))
            .args([command, "--config", &path])
            .env_remove("TRANSFER_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} accepted a typo");
        assert!(stderr.contains("retry.max_attemps"), "{command}: {stderr}");
        assert!(stderr.contains(&path), "{command}: {stderr}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_transfer-worker"))
        .arg("config")
        .env("TRANSFER__RETRY__MAX_ATTEMPS", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("TRANSFER__RETRY__MAX_ATTEMPS"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_value_quoted_in_a_rejection_is_cut_and_the_dead_letter_still_goes_out() {
    let mut h = Harness::start(|_, _| {}).await;
    let mut command = agent_command("huge-stream", "s-huge");
    command["streamId"] = json!("x".repeat(60_000));
    h.publish(&command).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.rejected");
    let message = e.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("unknown streamId"), "{message}");
    assert!(message.len() < 300, "{} bytes", message.len());
    let dead = h.next_dead_letter().await;
    assert_eq!(dead.data.len(), serde_json::to_vec(&command).unwrap().len());
    h.publish(&agent_command("after-huge", "s-huge")).await;
    assert_eq!(h.next_event().await.name(), "transfer.succeeded");
    h.stop().await.unwrap();
}
