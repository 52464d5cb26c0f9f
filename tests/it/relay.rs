//! The callback relay (CONTRACT §5): AgentAssist's callbacks, authenticated by the signed URL
//! the worker handed out, become `transfer.callback` events; anything else gets nothing. Relay
//! URLs handed out before tokens became JWTs keep working until they expire.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sha2::Sha256;
use transfer_worker::callbacks::token::{CallbackIds, TokenSigner};
use transfer_worker::contract::Target;
use transfer_worker::contract::event::callback_event_id;

use crate::harness::admin::series;
use crate::harness::{Harness, Received, agent_command, queue_command, sim, sorted_keys, wait_for};

/// Longest body the relay accepts.
const LIMIT: usize = 256 * 1024;
const TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// POSTs `body` to `url`, with `content_type` when given; the status answered.
pub async fn post(url: &str, content_type: Option<&str>, body: Vec<u8>) -> StatusCode {
    let mut request = reqwest::Client::new().post(url).body(body);
    if let Some(content_type) = content_type {
        request = request.header(reqwest::header::CONTENT_TYPE, content_type);
    }
    request
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the relay answers")
        .status()
}

/// POSTs a JSON body.
pub async fn post_json(url: &str, body: &Value) -> StatusCode {
    post(
        url,
        Some("application/json"),
        serde_json::to_vec(body).unwrap(),
    )
    .await
}

/// Runs one command to success and returns the relay URL the worker handed to the API, and
/// the command's event. Returns once the command is acked, so no redelivery follows.
async fn relay_url_of(h: &mut Harness, command: &Value) -> (String, Received) {
    h.publish(command).await;
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.succeeded", "{}", e.json);
    let session = command["botSessionId"].as_str().unwrap();
    let request = h
        .sim
        .requests()
        .into_iter()
        .find(|r| r.bot_session_id.as_deref() == Some(session))
        .expect("the API saw the command");
    let url = request.body["callbackUrl"].as_str().unwrap().to_owned();
    let prefix = format!("http://{}/callbacks/", h.relay_addr);
    assert!(url.starts_with(&prefix), "{url} is not a relay URL");
    let acked = async || h.metrics.commands_in_flight.get() == 0;
    wait_for(
        "the command acked",
        Duration::from_secs(5),
        String::new,
        acked,
    )
    .await;
    (url, e)
}

/// Waits briefly for the simulator to count `n` delivered callbacks, then checks it is `n`.
async fn delivered_callbacks(h: &Harness, n: u64) {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while h.sim.stats().callbacks_delivered < n && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(h.sim.stats().callbacks_delivered, n);
}

fn assert_timestamp(v: &Value) {
    let s = v.as_str().expect("timestamp is a string");
    assert!(
        s.len() == 24 && s.ends_with('Z') && s.as_bytes()[19] == b'.',
        "RFC 3339 UTC with milliseconds: {s}"
    );
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s} is not RFC 3339: {e}"));
}

/// The ids and AMQP properties a callback event for `command` must carry.
fn assert_callback_for(e: &Received, command: &Value, stream_id: &str, target: &Value) {
    let v = &e.json;
    assert_eq!(e.routing_key, "transfer.callback");
    assert_eq!(v["event"], "transfer.callback");
    assert_eq!(v["commandId"], command["commandId"]);
    assert_eq!(v["streamId"], stream_id);
    assert_eq!(v["botSessionId"], command["botSessionId"]);
    assert_eq!(&v["target"], target);
    assert_eq!(v["attempts"], 0);
    assert_timestamp(&v["occurredAt"]);
    assert_timestamp(&v["receivedAt"]);
    let event_id = v["eventId"].as_str().unwrap();
    uuid::Uuid::parse_str(event_id).expect("eventId is a uuid");
    e.assert_properties();
}

/// `transfer.callback` events carry these keys, and no others.
fn assert_callback_keys(v: &Value) {
    assert_eq!(
        sorted_keys(v),
        [
            "attempts",
            "botSessionId",
            "commandId",
            "contentType",
            "event",
            "eventId",
            "occurredAt",
            "payload",
            "receivedAt",
            "streamId",
            "target"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulator_callback_is_relayed_with_the_commands_ids() {
    let mut h =
        Harness::start(|_, sim| sim::call_back_after(sim, Duration::from_millis(100))).await;
    let stream_id = h.settings.bots[0].stream_id.clone();
    let command = queue_command("cb-real", "0123456789abcdef0000cb01");
    let before = SystemTime::now();
    h.publish(&command).await;
    let events = h.events(2).await;
    let mut names: Vec<&str> = events.iter().map(|e| e.name()).collect();
    names.sort();
    assert_eq!(names, ["transfer.callback", "transfer.succeeded"]);
    let succeeded = events
        .iter()
        .find(|e| e.name() == "transfer.succeeded")
        .unwrap();
    assert_eq!(succeeded.json["commandId"], "cb-real");
    let callback = events
        .iter()
        .find(|e| e.name() == "transfer.callback")
        .unwrap();
    let target = json!({"type": "queue", "id": "qu-7f8e9d-support"});
    assert_callback_for(callback, &command, &stream_id, &target);
    assert_callback_keys(&callback.json);
    assert_ne!(callback.json["eventId"], succeeded.json["eventId"]);
    let v = &callback.json;
    assert!(
        v["contentType"]
            .as_str()
            .unwrap()
            .starts_with("application/json"),
        "{v}"
    );
    // The simulator's own JSON, as it sent it.
    let payload = &v["payload"];
    assert!(payload.is_object(), "payload is the posted JSON: {v}");
    assert_eq!(payload["status"], "transferred");
    assert_eq!(payload["botSessionId"], "0123456789abcdef0000cb01");
    assert_eq!(payload["queueId"], "qu-7f8e9d-support");
    assert_eq!(payload["transferredType"], "QUEUE");
    let received = time::OffsetDateTime::parse(
        v["receivedAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let before = time::OffsetDateTime::from(before) - Duration::from_millis(1);
    assert!(
        received >= before,
        "receivedAt {received} precedes the command"
    );
    // The sender counts its 200 a moment after the event is out.
    delivered_callbacks(&h, 1).await;
    // One callback, one event: nothing more follows.
    h.assert_no_event(Duration::from_millis(300)).await;
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tampered_truncated_and_missing_tokens_get_404_and_publish_nothing() {
    let mut h = Harness::start(|_, _| {}).await;
    let stream_id = h.settings.bots[0].stream_id.clone();
    let command = agent_command("cb-forged", "0123456789abcdef0000cb02");
    let (url, _) = relay_url_of(&mut h, &command).await;
    let base = format!("http://{}/callbacks/", h.relay_addr);
    let token = url.strip_prefix(&base).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, tag] = parts[..] else {
        panic!("{token} is not header.claims.signature");
    };

    // The very ids of the command, signed with a secret the worker does not hold.
    let ids = CallbackIds {
        command_id: "cb-forged".into(),
        stream_id: stream_id.clone(),
        bot_session_id: "0123456789abcdef0000cb02".into(),
        target: Target::Agent("a-0e1f2a3b-agent".into()),
    };
    let other = TokenSigner::new(
        SecretString::from("another-secret-0123456789"),
        vec![],
        TOKEN_TTL,
    );
    let forged = other.sign(&ids);
    assert_ne!(forged, token, "the test's ids match the command's");
    // One character of the signed claims changed, to another valid base64url character.
    let mut tampered = payload.as_bytes().to_vec();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{header}.{}.{tag}", String::from_utf8(tampered).unwrap());
    // Other, well-formed claims under the genuine header and signature.
    let mut claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap())
        .expect("the claims are JSON");
    claims["c"] = "someone-elses-command".into();
    let swapped = format!(
        "{header}.{}.{tag}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
    );
    // The genuine claims and signature under a header that names no algorithm.
    let mut unsigned: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap())
        .expect("the header is JSON");
    unsigned["alg"] = "none".into();
    let unsigned = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&unsigned).unwrap());
    let cases = [
        ("signed with another secret", format!("{base}{forged}")),
        ("claims changed", format!("{base}{tampered}")),
        ("ids swapped", format!("{base}{swapped}")),
        ("alg none", format!("{base}{unsigned}.{payload}.")),
        (
            "alg none, signed",
            format!("{base}{unsigned}.{payload}.{tag}"),
        ),
        (
            "signature truncated",
            format!("{base}{}", &token[..token.len() - 1]),
        ),
        ("signature dropped", format!("{base}{header}.{payload}.")),
        ("no signature", format!("{base}{header}.{payload}")),
        ("claims only", format!("{base}{payload}")),
        ("no token", base.clone()),
        ("garbage", format!("{base}not-a-token")),
        ("garbage with a dot", format!("{base}abc.def")),
        ("garbage with two dots", format!("{base}abc.def.ghi")),
    ];
    let body = json!({"status": "transferred", "forged": true});
    for (case, url) in &cases {
        assert_eq!(post_json(url, &body).await, StatusCode::NOT_FOUND, "{case}");
    }
    // A bad token is refused before the body is looked at: an oversized one is a 404 too.
    let big = vec![b'x'; LIMIT + 1];
    assert_eq!(
        post(&cases[0].1, Some("text/plain"), big).await,
        StatusCode::NOT_FOUND
    );
    h.assert_no_event(Duration::from_secs(1)).await;
    // The genuine URL still works, so the silence above means something.
    assert_eq!(post_json(&url, &body).await, StatusCode::OK);
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.callback");
    assert_eq!(e.json["payload"], body);
    assert_eq!(e.json["commandId"], "cb-forged");
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_256_kib_gets_413_and_exactly_256_kib_is_relayed() {
    let mut h = Harness::start(|_, _| {}).await;
    let (url, _) = relay_url_of(&mut h, &agent_command("cb-big", "0123456789abcdef0000cb03")).await;
    // A JSON string of exactly LIMIT bytes, and one byte more.
    let exact = format!("\"{}\"", "x".repeat(LIMIT - 2)).into_bytes();
    let over = format!("\"{}\"", "x".repeat(LIMIT - 1)).into_bytes();
    assert_eq!((exact.len(), over.len()), (LIMIT, LIMIT + 1));
    assert_eq!(
        post(&url, Some("application/json"), over).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        post(&url, Some("application/json"), exact).await,
        StatusCode::OK
    );
    // The first event after the 413 is the accepted body: the oversized one published nothing.
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.callback");
    assert_eq!(e.json["payload"].as_str().unwrap().len(), LIMIT - 2);
    h.assert_no_event(Duration::from_millis(500)).await;
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_json_is_relayed_as_a_string() {
    let mut h = Harness::start(|_, _| {}).await;
    let command = agent_command("cb-text", "0123456789abcdef0000cb04");
    let (url, _) = relay_url_of(&mut h, &command).await;
    assert_eq!(
        post(&url, Some("text/plain"), b"agent accepted".to_vec()).await,
        StatusCode::OK
    );
    let e = h.next_event().await;
    let stream_id = h.settings.bots[0].stream_id.clone();
    let target = json!({"type": "agent", "id": "a-0e1f2a3b-agent"});
    assert_callback_for(&e, &command, &stream_id, &target);
    assert_eq!(e.json["payload"], "agent accepted");
    assert_eq!(e.json["contentType"], "text/plain");
    // Without a Content-Type: null, and the body still relayed.
    assert_eq!(post(&url, None, b"no type".to_vec()).await, StatusCode::OK);
    let e = h.next_event().await;
    assert_callback_keys(&e.json);
    assert_eq!(e.json["payload"], "no type");
    assert!(e.json["contentType"].is_null(), "{}", e.json);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_signed_with_a_previous_secret_still_verify_after_a_rotation() {
    const OLD: &str = "old-callback-secret-0123456789";
    const NEW: &str = "new-callback-secret-0123456789";
    const THIRD: &str = "third-callback-secret-01234567";
    let mut h = Harness::start(|s, _| {
        s.callbacks.secret = SecretString::from(NEW);
        s.callbacks.previous_secrets = vec![SecretString::from(OLD)];
    })
    .await;
    let stream_id = h.settings.bots[0].stream_id.clone();
    let base = format!("http://{}/callbacks/", h.relay_addr);

    // A URL handed out before the rotation.
    let ids = CallbackIds {
        command_id: "cmd-before-rotation".into(),
        stream_id: stream_id.clone(),
        bot_session_id: "0123456789abcdef0000cb05".into(),
        target: Target::Agent("a-rotated".into()),
    };
    let old_url = format!(
        "{base}{}",
        TokenSigner::new(SecretString::from(OLD), vec![], TOKEN_TTL).sign(&ids)
    );
    assert_eq!(
        post_json(&old_url, &json!({"status": "transferred"})).await,
        StatusCode::OK
    );
    let e = h.next_event().await;
    assert_eq!(e.routing_key, "transfer.callback");
    assert_eq!(e.json["commandId"], "cmd-before-rotation");
    assert_eq!(e.json["streamId"], stream_id.as_str());
    assert_eq!(e.json["botSessionId"], "0123456789abcdef0000cb05");
    assert_eq!(
        e.json["target"],
        json!({"type": "agent", "id": "a-rotated"})
    );
    assert_eq!(
        e.properties.correlation_id().as_ref().unwrap().as_str(),
        "cmd-before-rotation"
    );

    // A secret that is neither the current nor a previous one.
    let third_url = format!(
        "{base}{}",
        TokenSigner::new(SecretString::from(THIRD), vec![], TOKEN_TTL).sign(&ids)
    );
    assert_eq!(
        post_json(&third_url, &json!({})).await,
        StatusCode::NOT_FOUND
    );

    // New URLs are signed with the new secret only.
    let command = agent_command("cmd-after-rotation", "0123456789abcdef0000cb06");
    let (url, _) = relay_url_of(&mut h, &command).await;
    let token = url.strip_prefix(&base).unwrap();
    let verified = TokenSigner::new(SecretString::from(NEW), vec![], TOKEN_TTL).verify(token);
    assert_eq!(
        verified.map(|ids| ids.command_id).as_deref(),
        Ok("cmd-after-rotation")
    );
    assert!(
        TokenSigner::new(SecretString::from(OLD), vec![], TOKEN_TTL)
            .verify(token)
            .is_err(),
        "a previous secret must not sign"
    );
    assert_eq!(post_json(&url, &json!({})).await, StatusCode::OK);
    let e = h.next_event().await;
    assert_eq!(e.json["commandId"], "cmd-after-rotation");
    h.assert_no_event(Duration::from_millis(300)).await;
    h.stop().await.unwrap();
}

/// A relay token of the format before JWTs, made by hand as the worker made them then:
/// `base64url(JSON ids and expiry "e") "." base64url(HMAC-SHA256 under the secret)`.
fn legacy_token(secret: &str, ids: &Value, expires: SystemTime) -> String {
    let mut claims = ids.clone();
    claims["e"] = expires
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .into();
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(payload.as_bytes());
    format!(
        "{payload}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_url_handed_out_before_jwts_works_until_it_expires() {
    let mut h = Harness::start(|_, _| {}).await;
    let secret = h.settings.callbacks.secret.expose_secret().to_owned();
    let stream_id = h.settings.bots[0].stream_id.clone();
    let base = format!("http://{}/callbacks/", h.relay_addr);
    let ids = json!({
        "c": "cmd-legacy",
        "s": stream_id,
        "b": "0123456789abcdef0000cb08",
        "t": {"type": "queue", "id": "qu-legacy"},
    });
    let token = legacy_token(&secret, &ids, SystemTime::now() + Duration::from_secs(3600));
    let body = br#"{"status":"transferred"}"#.to_vec();
    let status = post(
        &format!("{base}{token}"),
        Some("application/json"),
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.callback");
    assert_eq!(e.json["commandId"], "cmd-legacy");
    assert_eq!(e.json["streamId"], stream_id.as_str());
    assert_eq!(e.json["botSessionId"], "0123456789abcdef0000cb08");
    assert_eq!(
        e.json["target"],
        json!({"type": "queue", "id": "qu-legacy"})
    );
    assert_eq!(
        e.json["eventId"],
        callback_event_id(&token, &body).to_string(),
        "the eventId is derived from the token as posted, whatever its format"
    );

    let expired = legacy_token(&secret, &ids, SystemTime::now() - Duration::from_secs(1));
    let status = post(
        &format!("{base}{expired}"),
        Some("application/json"),
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let far = SystemTime::now() + Duration::from_secs(3600);
    let forged = legacy_token("another-secret-0123456789", &ids, far);
    let status = post(&format!("{base}{forged}"), Some("application/json"), body).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    h.assert_no_event(Duration::from_millis(300)).await;
    h.stop().await.unwrap();
}

fn callbacks_counter(h: &Harness, result: &str) -> u64 {
    series(&h.metrics.encode())
        .get(&format!("transfer_callbacks_total{{result=\"{result}\"}}"))
        .copied()
        .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_down_the_relay_answers_503_and_the_senders_retry_gets_through() {
    let (proxy, mut h) = Harness::start_behind_proxy(|_, sim| {
        sim::call_back_after(sim, Duration::from_millis(1500))
    })
    .await;
    let command = agent_command("cb-down", "0123456789abcdef0000cb07");
    let (url, succeeded) = relay_url_of(&mut h, &command).await;
    proxy.cut();
    let (what, limit) = ("the cut noticed", Duration::from_secs(5));
    wait_for(what, limit, String::new, async || !h.broker.is_ready()).await;
    assert_eq!(
        post_json(&url, &json!({"manual": true})).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Keep the broker away until the simulator's own callback has been refused at least once.
    let refused = async || h.sim.stats().callbacks_failed_attempts > 0;
    wait_for(
        "the simulator's callback refused",
        Duration::from_secs(10),
        String::new,
        refused,
    )
    .await;
    assert_eq!(h.sim.stats().callbacks_delivered, 0);
    assert!(
        callbacks_counter(&h, "unavailable") >= 2,
        "{}",
        h.metrics.encode()
    );
    assert_eq!(callbacks_counter(&h, "published"), 0);
    proxy.restore();
    // The sender retries; once the broker is back its callback is relayed, once. (Should the
    // cut have beaten the command's ack, its outcome is republished as is: allowed.)
    let e = loop {
        let e = h.next_event().await;
        if e.name() != "transfer.succeeded" {
            break e;
        }
        assert_eq!(e.json, succeeded.json, "only a republished outcome");
    };
    let stream_id = h.settings.bots[0].stream_id.clone();
    let target = json!({"type": "agent", "id": "a-0e1f2a3b-agent"});
    assert_callback_for(&e, &command, &stream_id, &target);
    assert_eq!(e.json["payload"]["status"], "transferred", "{}", e.json);
    assert!(e.json["payload"].get("manual").is_none(), "{}", e.json);
    // The sender counts its 200 a moment after the event is out.
    delivered_callbacks(&h, 1).await;
    assert_eq!(callbacks_counter(&h, "published"), 1);
    // Nothing more, but the outcome republished as is, should the command's redelivery come
    // after the callback.
    let until = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(e) = tokio::time::timeout_at(until, h.next_event()).await {
        assert_eq!(e.json, succeeded.json, "only a republished outcome");
    }
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "silence proves nothing")]
async fn silence_on_a_closed_consumer_is_not_taken_for_no_event() {
    let mut h = Harness::start(|_, _| {}).await;
    h.channel
        .close(200, "closed by the test".into())
        .await
        .unwrap();
    h.assert_no_event(Duration::from_millis(200)).await;
}

// What a caller can hold. The tests below speak HTTP/1.1 over a bare socket, so they control
// exactly which bytes the relay gets and when.

/// A body size no callback comes near: a caller announcing it must not be waited for.
const HUGE: usize = 10 * 1024 * 1024;

/// Opens a connection to the relay and sends `head` (the request line and headers) and then
/// `body`, and leaves the connection open.
async fn send_raw(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("the relay takes connections");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    stream
}

/// A POST's request line and headers; `headers` are extra lines, each ending in CRLF.
fn post_head(token: &str, headers: &str) -> String {
    format!("POST /callbacks/{token} HTTP/1.1\r\nHost: relay\r\n{headers}\r\n")
}

/// Everything the relay sends on `stream` until it closes the connection; `None` when it has
/// not closed it within `limit`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        // A reset counts as closed too: what came before it is kept.
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// Reads until the end of a response's headers; `None` when they have not come within `limit`.
async fn read_head(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => got.push(byte[0]),
                _ => break,
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// A token for `command_id` signed with the harness's secret: one the relay accepts.
fn valid_token(h: &Harness, command_id: &str) -> String {
    let ids = CallbackIds {
        command_id: command_id.into(),
        stream_id: h.settings.bots[0].stream_id.clone(),
        bot_session_id: "0123456789abcdef0000cb10".into(),
        target: Target::Agent("a-0e1f2a3b-agent".into()),
    };
    let secret = h.settings.callbacks.secret.clone();
    TokenSigner::new(secret, vec![], TOKEN_TTL).sign(&ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_answered_at_once_without_reading_the_body_and_the_connection_closed() {
    let mut h = Harness::start(|_, _| {}).await;
    let ids = CallbackIds {
        command_id: "cb-unread".into(),
        stream_id: h.settings.bots[0].stream_id.clone(),
        bot_session_id: "0123456789abcdef0000cb11".into(),
        target: Target::Agent("a-0e1f2a3b-agent".into()),
    };
    let forged = TokenSigner::new(
        SecretString::from("another-secret-0123456789"),
        vec![],
        TOKEN_TTL,
    )
    .sign(&ids);
    let length = format!("Content-Type: application/json\r\nContent-Length: {HUGE}\r\n");
    let chunked = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n";
    // Each announces a body it never finishes sending: the relay answers anyway.
    let cases: [(&str, &String, String, &[u8]); 3] = [
        (
            "10 MiB announced, 5 bytes sent",
            &forged,
            length.clone(),
            &b"{\"a\":"[..],
        ),
        (
            "chunked, never ending",
            &forged,
            chunked.to_owned(),
            b"5\r\n{\"a\":\r\n",
        ),
        (
            "not a token",
            &"not-a-token".to_owned(),
            length.clone(),
            b"{",
        ),
    ];
    for (case, token, headers, body) in cases {
        let mut stream = send_raw(h.relay_addr, &post_head(token, &headers), body).await;
        let answer = read_until_closed(&mut stream, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{case}: no answer, or the connection left open"));
        assert!(answer.starts_with("HTTP/1.1 404 "), "{case}: {answer}");
        assert!(answer.ends_with("\r\n\r\nnot found\n"), "{case}: {answer}");
    }
    // A caller that waits for leave to send its body is never given it: the refusal comes
    // instead of "100 Continue".
    let expect = format!("{length}Expect: 100-continue\r\n");
    let mut stream = send_raw(h.relay_addr, &post_head(&forged, &expect), b"").await;
    let answer = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("an answer and the connection closed");
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    h.assert_no_event(Duration::from_millis(300)).await;
    assert_eq!(callbacks_counter(&h, "forbidden"), 4);
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_callback_is_read_after_its_token_and_a_body_announced_too_large_is_not_read() {
    let mut h = Harness::start(|_, _| {}).await;
    let token = valid_token(&h, "cb-valid");
    let url = format!("http://{}/callbacks/{token}", h.relay_addr);

    // Announced over the limit: 413 at once, nothing of the body waited for, and the
    // connection closed.
    let headers = format!("Content-Type: application/json\r\nContent-Length: {HUGE}\r\n");
    let mut stream = send_raw(h.relay_addr, &post_head(&token, &headers), b"{\"a\":").await;
    let answer = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("an answer and the connection closed");
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.ends_with("callback body over 256 KiB\n"), "{answer}");

    // A sender that asks before sending its body is let in, and its callback relayed.
    let body = br#"{"status":"transferred","step":1}"#;
    let headers = format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n",
        body.len()
    );
    let mut stream = send_raw(h.relay_addr, &post_head(&token, &headers), b"").await;
    let head = read_head(&mut stream, Duration::from_secs(5))
        .await
        .expect("an interim answer");
    assert!(head.starts_with("HTTP/1.1 100 Continue\r\n"), "{head}");
    {
        use tokio::io::AsyncWriteExt;
        stream.write_all(body).await.unwrap();
    }
    let head = read_head(&mut stream, Duration::from_secs(10))
        .await
        .expect("the final answer");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.callback");
    assert_eq!(e.json["commandId"], "cb-valid");
    assert_eq!(e.json["payload"]["step"], 1);

    // A body that comes in pieces, and an ordinary POST.
    let body = br#"{"status":"transferred","step":2}"#;
    let headers = format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    let (first, rest) = body.split_at(10);
    let mut stream = send_raw(h.relay_addr, &post_head(&token, &headers), first).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    {
        use tokio::io::AsyncWriteExt;
        stream.write_all(rest).await.unwrap();
    }
    let answer = read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(h.next_event().await.json["payload"]["step"], 2);
    assert_eq!(post_json(&url, &json!({"step": 3})).await, StatusCode::OK);
    assert_eq!(h.next_event().await.json["payload"]["step"], 3);
    h.assert_no_event(Duration::from_millis(300)).await;
    h.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_bounded_and_cut_off_and_a_valid_callback_gets_through() {
    use transfer_worker::callbacks::relay::MAX_CONNECTIONS;
    let mut h = Harness::start(|_, _| {}).await;
    let token = valid_token(&h, "cb-crowded");
    let url = format!("http://{}/callbacks/{token}", h.relay_addr);
    // As many connections as the relay serves at once, none of them finishing its request:
    // silent ones, ones stalled in their headers, and ones (with a valid token) stalled in
    // their bodies.
    let stalled = post_head(
        &token,
        "Content-Type: application/json\r\nContent-Length: 100\r\n",
    );
    let mut held = Vec::with_capacity(MAX_CONNECTIONS);
    for i in 0..MAX_CONNECTIONS {
        let stream = match i % 3 {
            0 => send_raw(h.relay_addr, "", b"").await,
            1 => send_raw(h.relay_addr, "POST /callbacks/x HTTP/1.1\r\nHost: re", b"").await,
            _ => send_raw(h.relay_addr, &stalled, b"{\"status\":").await,
        };
        held.push((i, stream));
    }
    // One more, with a whole valid callback: it waits for a place, and gets one when the relay
    // cuts off the callers that hold theirs.
    let callback = tokio::spawn(async move {
        reqwest::Client::new()
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(r#"{"status":"transferred"}"#)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map(|r| r.status())
    });
    let mut callback = std::pin::pin!(callback);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut callback)
            .await
            .is_err(),
        "answered while {MAX_CONNECTIONS} connections held every place"
    );
    let answers = futures_util::future::join_all(held.iter_mut().map(|(i, stream)| async move {
        let answer = read_until_closed(stream, Duration::from_secs(60)).await;
        (*i, answer)
    }))
    .await;
    for (i, answer) in answers {
        let answer = answer.unwrap_or_else(|| panic!("connection {i} still open after 60 s"));
        if i % 3 == 2 {
            assert!(
                answer.starts_with("HTTP/1.1 408 "),
                "connection {i}: {answer}"
            );
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(60), callback)
        .await
        .expect("the valid callback answered")
        .unwrap()
        .expect("the valid callback answered");
    assert_eq!(status, StatusCode::OK);
    let e = h.next_event().await;
    assert_eq!(e.name(), "transfer.callback");
    assert_eq!(e.json["commandId"], "cb-crowded");
    assert_eq!(e.json["payload"]["status"], "transferred");
    h.assert_no_event(Duration::from_millis(300)).await;
    h.stop().await.unwrap();
}
