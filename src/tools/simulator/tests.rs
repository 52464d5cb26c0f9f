//! Each test starts its own simulator on port 0 and talks to it over real HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;

const STREAM: &str = "st-0b1c2d3e-test";
const ACCOUNT: &str = "650d9eb6da96d0bc0d230001";
const CLIENT: &str = "cs-50febaa3-test";
const SECRET: &str = "a-client-secret-for-tests";

fn bot() -> SimBot {
    SimBot {
        stream_id: STREAM.into(),
        account_id: ACCOUNT.into(),
        client_id: CLIENT.into(),
        client_secret: SECRET.into(),
    }
}

async fn start_with(adjust: impl FnOnce(&mut SimulatorConfig)) -> Simulator {
    let mut config = SimulatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        bots: vec![bot()],
        ..SimulatorConfig::default()
    };
    adjust(&mut config);
    Simulator::start(config).await.expect("simulator starts")
}

async fn start() -> Simulator {
    start_with(|_| {}).await
}

fn token_with(claims: Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn token() -> String {
    token_with(json!({ "appId": CLIENT }), SECRET)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// One request, valid unless a test changes a part of it.
struct Call {
    stream: String,
    auth: Option<String>,
    bearer: Option<String>,
    account: Option<String>,
    content_type: Option<String>,
    body: String,
}

impl Call {
    fn agent(session: &str) -> Self {
        Self::with_body(json!({
            "callbackUrl": "http://127.0.0.1:9/unused",
            "orgId": "o-02c0d56d-fd90-5e24-8458-01be1d2e0001",
            "aId": "a-8cd2673-0cb7-462d-9453-0ee60e520001",
            "botSessionId": session,
        }))
    }

    fn queue(session: &str) -> Self {
        Self::with_body(json!({
            "orgId": "o-ee9eb154-b7e9-5387-a4a9-bc027a600001",
            "transferredType": "QUEUE",
            "queueId": "qu-b5d3bb4-a1ac-4caa-9be6-55a5abc30001",
            "botSessionId": session,
        }))
    }

    fn with_body(body: Value) -> Self {
        Self {
            stream: STREAM.into(),
            auth: Some(token()),
            bearer: None,
            account: Some(ACCOUNT.into()),
            content_type: Some("application/json".into()),
            body: body.to_string(),
        }
    }

    async fn send(&self, simulator: &Simulator) -> Answer {
        self.send_with(&client(), simulator).await.expect("request")
    }

    async fn send_with(
        &self,
        client: &reqwest::Client,
        simulator: &Simulator,
    ) -> reqwest::Result<Answer> {
        let url = format!(
            "{}/agentassist/api/v1/public/{}/assign-conversation",
            simulator.base_url(),
            self.stream
        );
        let mut request = client.post(url).body(self.body.clone());
        if let Some(auth) = &self.auth {
            request = request.header("auth", auth);
        }
        if let Some(bearer) = &self.bearer {
            request = request.header("Authorization", format!("Bearer {bearer}"));
        }
        if let Some(account) = &self.account {
            request = request.header("accountid", account);
        }
        if let Some(content_type) = &self.content_type {
            request = request.header("Content-Type", content_type);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = response.text().await?;
        Ok(Answer {
            status,
            retry_after,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        })
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

impl Answer {
    fn error_msg(&self) -> &str {
        self.body["errors"][0]["msg"].as_str().unwrap_or_default()
    }

    #[track_caller]
    fn assert_error(&self, status: u16, msg_contains: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.body["errors"][0]["code"], status, "{self:?}");
        assert!(
            self.error_msg().contains(msg_contains),
            "expected a message containing {msg_contains:?}: {self:?}"
        );
    }
}

#[tokio::test]
async fn agent_transfer_is_accepted_with_the_sample_shape() {
    let simulator = start().await;
    let answer = Call::agent("6538f8a3c9cf425ee5cf0001")
        .send(&simulator)
        .await;

    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["sessionId"], "6538f8a3c9cf425ee5cf0001");
    assert_eq!(
        answer.body["agentId"],
        "a-8cd2673-0cb7-462d-9453-0ee60e520001"
    );
    assert_eq!(answer.body["status"], "transferred");
    assert!(answer.body["requestCompletedAt"].as_u64().unwrap() > 1_698_825_180_041);
    assert!(answer.body.get("queueId").is_none());

    let requests = simulator.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].status, 200);
    assert_eq!(requests[0].stream_id, STREAM);
    assert_eq!(requests[0].account_id.as_deref(), Some(ACCOUNT));
    assert_eq!(
        requests[0].bot_session_id.as_deref(),
        Some("6538f8a3c9cf425ee5cf0001")
    );
    let stats = simulator.stats();
    assert_eq!((stats.calls, stats.accepted), (1, 1));
    assert_eq!(stats.by_status, BTreeMap::from([(200, 1)]));
    simulator.shutdown().await;
}

#[tokio::test]
async fn queue_transfer_is_accepted_with_the_queue_id() {
    let simulator = start().await;
    let answer = Call::queue("66c2f6939489bfffc7910001")
        .send(&simulator)
        .await;

    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["sessionId"], "66c2f6939489bfffc7910001");
    assert_eq!(
        answer.body["queueId"],
        "qu-b5d3bb4-a1ac-4caa-9be6-55a5abc30001"
    );
    assert_eq!(answer.body["status"], "transferred");
    assert!(answer.body.get("agentId").is_none());
    simulator.shutdown().await;
}

#[tokio::test]
async fn agent_transfer_may_say_transferred_type_agent() {
    let simulator = start().await;
    let mut body: Value = serde_json::from_str(&Call::agent("s1").body).unwrap();
    body["transferredType"] = "AGENT".into();
    let answer = Call::with_body(body).send(&simulator).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    simulator.shutdown().await;
}

#[tokio::test]
async fn token_signed_with_another_secret_is_401() {
    let simulator = start().await;
    let mut call = Call::agent("s1");
    call.auth = Some(token_with(json!({ "appId": CLIENT }), "not-the-secret"));
    call.send(&simulator)
        .await
        .assert_error(401, "invalid signature");
    assert_eq!(simulator.requests()[0].status, 401);
    assert_eq!(simulator.stats().accepted, 0);
    simulator.shutdown().await;
}

#[tokio::test]
async fn token_for_another_app_is_401() {
    let simulator = start().await;
    let mut call = Call::agent("s1");
    call.auth = Some(token_with(json!({ "appId": "cs-someone-else" }), SECRET));
    call.send(&simulator).await.assert_error(401, "appId");

    call.auth = Some(token_with(json!({ "sub": CLIENT }), SECRET));
    call.send(&simulator).await.assert_error(401, "no appId");
    simulator.shutdown().await;
}

#[tokio::test]
async fn token_in_authorization_bearer_is_401() {
    let simulator = start().await;
    let mut call = Call::agent("s1");
    call.bearer = call.auth.take();
    call.send(&simulator)
        .await
        .assert_error(401, "missing auth header");

    let mut call = Call::agent("s1");
    call.auth = Some(format!("Bearer {}", token()));
    call.send(&simulator).await.assert_error(401, "Bearer");
    simulator.shutdown().await;
}

#[tokio::test]
async fn exp_is_enforced_only_when_present() {
    let simulator = start().await;
    let mut call = Call::agent("s1");
    call.auth = Some(token_with(
        json!({ "appId": CLIENT, "exp": now_secs() - 5 }),
        SECRET,
    ));
    call.send(&simulator).await.assert_error(401, "expired");

    call.auth = Some(token_with(
        json!({ "appId": CLIENT, "iat": now_secs(), "exp": now_secs() + 3600 }),
        SECRET,
    ));
    assert_eq!(call.send(&simulator).await.status, 200);
    simulator.shutdown().await;
}

#[tokio::test]
async fn missing_or_wrong_accountid_is_401() {
    let simulator = start().await;
    let mut call = Call::agent("s1");
    call.account = None;
    call.send(&simulator)
        .await
        .assert_error(401, "missing accountid");

    call.account = Some("650d9eb6da96d0bc0d23ffff".into());
    call.send(&simulator)
        .await
        .assert_error(401, "accountid header does not match");
    simulator.shutdown().await;
}

#[tokio::test]
async fn both_targets_is_400() {
    let simulator = start().await;
    let mut with_type: Value = serde_json::from_str(&Call::queue("s1").body).unwrap();
    with_type["aId"] = "a-1".into();
    Call::with_body(with_type)
        .send(&simulator)
        .await
        .assert_error(400, "both aId and queueId");

    let mut without_type: Value = serde_json::from_str(&Call::agent("s1").body).unwrap();
    without_type["queueId"] = "qu-1".into();
    Call::with_body(without_type)
        .send(&simulator)
        .await
        .assert_error(400, "both aId and queueId");
    assert_eq!(simulator.stats().by_status, BTreeMap::from([(400, 2)]));
    simulator.shutdown().await;
}

#[tokio::test]
async fn no_target_is_400() {
    let simulator = start().await;
    Call::with_body(json!({ "orgId": "o-1", "botSessionId": "s1" }))
        .send(&simulator)
        .await
        .assert_error(400, "no target");
    Call::with_body(json!({ "orgId": "o-1", "botSessionId": "s1", "transferredType": "QUEUE" }))
        .send(&simulator)
        .await
        .assert_error(400, "needs queueId");
    simulator.shutdown().await;
}

#[tokio::test]
async fn malformed_bodies_are_400_and_say_why() {
    let simulator = start().await;
    let cases = [
        (
            json!({ "botSessionId": "s1", "aId": "a-1" }),
            "orgId is required",
        ),
        (
            json!({ "orgId": "o-1", "botSessionId": "", "aId": "a-1" }),
            "botSessionId must be a non-empty string",
        ),
        (
            json!({ "orgId": "o-1", "botSessionId": "s1", "aId": "a-1", "callbackUrl": 7 }),
            "callbackUrl must be a string",
        ),
        (
            json!({ "orgId": "o-1", "botSessionId": "s1", "aId": "a-1", "transferredType": "BOT" }),
            "transferredType must be",
        ),
        (json!(["not", "an", "object"]), "not a JSON object"),
    ];
    for (body, why) in cases {
        Call::with_body(body)
            .send(&simulator)
            .await
            .assert_error(400, why);
    }
    let mut not_json = Call::agent("s1");
    not_json.body = "{\"orgId\": ".into();
    not_json
        .send(&simulator)
        .await
        .assert_error(400, "not a JSON object");
    assert_eq!(simulator.requests().last().unwrap().body, Value::Null);
    simulator.shutdown().await;
}

#[tokio::test]
async fn content_type_must_be_json() {
    let simulator = start().await;
    let mut call = Call::agent("s1");
    call.content_type = Some("text/plain".into());
    call.send(&simulator)
        .await
        .assert_error(415, "application/json");
    call.content_type = None;
    call.send(&simulator)
        .await
        .assert_error(415, "application/json");
    call.content_type = Some("Application/JSON; charset=utf-8".into());
    assert_eq!(call.send(&simulator).await.status, 200);
    simulator.shutdown().await;
}

#[tokio::test]
async fn checks_run_in_the_documented_order() {
    let simulator = start().await;
    // Everything wrong: the bot is judged first.
    let mut call = Call::with_body(json!({}));
    call.stream = "st-unknown".into();
    call.auth = Some("garbage".into());
    call.account = None;
    call.content_type = None;
    call.send(&simulator)
        .await
        .assert_error(404, "bot not found");
    // Then the token, then the account, then the content type, then the body.
    call.stream = STREAM.into();
    call.send(&simulator)
        .await
        .assert_error(401, "error verifying the jwt");
    call.auth = Some(token());
    call.send(&simulator).await.assert_error(401, "accountid");
    call.account = Some(ACCOUNT.into());
    call.send(&simulator)
        .await
        .assert_error(415, "Content-Type");
    call.content_type = Some("application/json".into());
    call.send(&simulator).await.assert_error(400, "orgId");
    simulator.shutdown().await;
}

#[tokio::test]
async fn unknown_stream_is_404_with_the_errors_body() {
    let simulator = start().await;
    let mut call = Call::agent("s1");
    call.stream = "st-not-configured".into();
    let answer = call.send(&simulator).await;
    assert_eq!(answer.status, 404);
    assert_eq!(
        answer.body,
        json!({ "errors": [{ "msg": "bot not found", "code": 404 }] })
    );
    assert_eq!(simulator.requests()[0].stream_id, "st-not-configured");
    simulator.shutdown().await;
}

#[tokio::test]
async fn scripted_503_comes_first_then_accept() {
    let simulator = start().await;
    simulator.script([Reply::Status(503), Reply::Accept]);
    let first = Call::agent("s1").send(&simulator).await;
    assert_eq!(
        first.body,
        json!({ "errors": [{ "msg": "service unavailable", "code": 503 }] })
    );
    assert_eq!(first.status, 503);
    assert_eq!(Call::agent("s1").send(&simulator).await.status, 200);

    let statuses: Vec<u16> = simulator.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 200]);
    let stats = simulator.stats();
    assert_eq!((stats.calls, stats.accepted), (2, 1));
    assert_eq!(stats.by_status, BTreeMap::from([(200, 1), (503, 1)]));
    simulator.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_do_not_consume_the_script() {
    let simulator = start().await;
    simulator.script([Reply::Status(503)]);
    let mut call = Call::agent("s1");
    call.account = None;
    call.send(&simulator).await.assert_error(401, "accountid");
    assert_eq!(Call::agent("s1").send(&simulator).await.status, 503);
    simulator.shutdown().await;
}

#[tokio::test]
async fn rate_limited_answers_carry_retry_after() {
    let simulator = start().await;
    simulator.script([Reply::RateLimited {
        retry_after: Duration::from_millis(1500),
    }]);
    let answer = Call::agent("s1").send(&simulator).await;
    answer.assert_error(429, "rate limit exceeded");
    assert_eq!(answer.retry_after.as_deref(), Some("2"));
    simulator.shutdown().await;

    let simulator = start_with(|c| {
        c.rate_limited_rate = 1.0;
        c.retry_after = Duration::from_secs(3);
    })
    .await;
    let answer = Call::agent("s1").send(&simulator).await;
    answer.assert_error(429, "rate limit exceeded");
    assert_eq!(answer.retry_after.as_deref(), Some("3"));
    simulator.shutdown().await;
}

#[tokio::test]
async fn rates_pick_the_configured_answers() {
    let simulator = start_with(|c| c.fail_rate = 1.0).await;
    Call::agent("s1")
        .send(&simulator)
        .await
        .assert_error(503, "service unavailable");
    simulator.shutdown().await;

    let simulator = start_with(|c| c.reject_rate = 1.0).await;
    Call::agent("s1")
        .send(&simulator)
        .await
        .assert_error(400, "transfer rejected");
    simulator.shutdown().await;
}

#[tokio::test]
async fn replayed_jti_is_401() {
    let simulator = start().await;
    let mut call = Call::agent("s1");
    call.auth = Some(token_with(
        json!({ "appId": CLIENT, "jti": "jti-1", "exp": now_secs() + 600 }),
        SECRET,
    ));
    assert_eq!(call.send(&simulator).await.status, 200);
    let replay = call.send(&simulator).await;
    assert_eq!(replay.status, 401);
    assert_eq!(
        replay.body,
        json!({ "errors": [{ "msg": "error verifying the jwt: possibly a replay", "code": 401 }] })
    );

    call.auth = Some(token_with(
        json!({ "appId": CLIENT, "jti": "jti-2", "exp": now_secs() + 600 }),
        SECRET,
    ));
    assert_eq!(call.send(&simulator).await.status, 200);
    simulator.shutdown().await;
}

/// What the in-test callback receiver saw, and how many times it should refuse.
struct Receiver {
    hits: AtomicUsize,
    refuse_first: usize,
    seen: mpsc::UnboundedSender<(Option<String>, Value)>,
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let content_type = headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    receiver.seen.send((content_type, body)).unwrap();
    if receiver.hits.fetch_add(1, Ordering::SeqCst) < receiver.refuse_first {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

/// Starts a callback receiver; returns its URL, what it sees, and the server task.
async fn callback_receiver(
    refuse_first: usize,
) -> (
    String,
    mpsc::UnboundedReceiver<(Option<String>, Value)>,
    tokio::task::JoinHandle<()>,
) {
    let (seen, rx) = mpsc::unbounded_channel();
    let receiver = Arc::new(Receiver {
        hits: AtomicUsize::new(0),
        refuse_first,
        seen,
    });
    let app = Router::new()
        .route("/callbacks/{token}", post(receive))
        .with_state(receiver);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/callbacks/tok-1", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, rx, server)
}

async fn next_callback(
    rx: &mut mpsc::UnboundedReceiver<(Option<String>, Value)>,
) -> (Option<String>, Value) {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a callback within 5 s")
        .expect("receiver alive")
}

async fn wait_for_stats(simulator: &Simulator, done: impl Fn(&SimulatorStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(&simulator.stats()) {
        assert!(Instant::now() < deadline, "stats: {:?}", simulator.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn callback_arrives_and_is_retried_after_a_500() {
    let (url, mut rx, receiver) = callback_receiver(1).await;
    let simulator = start_with(|c| c.callback_delay = Duration::from_millis(10)).await;
    let mut body: Value =
        serde_json::from_str(&Call::agent("6538f8a3c9cf425ee5cf0042").body).unwrap();
    body["callbackUrl"] = url.into();
    assert_eq!(Call::with_body(body).send(&simulator).await.status, 200);

    for _ in 0..2 {
        let (content_type, payload) = next_callback(&mut rx).await;
        assert_eq!(content_type.as_deref(), Some("application/json"));
        assert_eq!(payload["botSessionId"], "6538f8a3c9cf425ee5cf0042");
        assert_eq!(payload["status"], "transferred");
        assert_eq!(payload["transferredType"], "AGENT");
        assert_eq!(payload["agentId"], "a-8cd2673-0cb7-462d-9453-0ee60e520001");
    }
    wait_for_stats(&simulator, |s| s.callbacks_delivered == 1).await;
    assert_eq!(simulator.stats().callbacks_failed_attempts, 1);
    // Delivered once: no further attempts.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(rx.try_recv().is_err());
    simulator.shutdown().await;
    receiver.abort();
}

#[tokio::test]
async fn callback_can_report_a_failed_queue_transfer() {
    let (url, mut rx, receiver) = callback_receiver(0).await;
    let simulator = start_with(|c| {
        c.callback_delay = Duration::ZERO;
        c.callback_fail_rate = 1.0;
    })
    .await;
    let mut body: Value = serde_json::from_str(&Call::queue("s-q").body).unwrap();
    body["callbackUrl"] = url.into();
    assert_eq!(Call::with_body(body).send(&simulator).await.status, 200);

    let (_, payload) = next_callback(&mut rx).await;
    assert_eq!(payload["status"], "failed");
    assert_eq!(payload["reason"], "agent unavailable");
    assert_eq!(payload["transferredType"], "QUEUE");
    assert_eq!(payload["queueId"], "qu-b5d3bb4-a1ac-4caa-9be6-55a5abc30001");
    simulator.shutdown().await;
    receiver.abort();
}

#[tokio::test]
async fn no_callback_when_callbacks_are_off() {
    let (url, mut rx, receiver) = callback_receiver(0).await;
    let simulator = start_with(|c| {
        c.callbacks = false;
        c.callback_delay = Duration::ZERO;
    })
    .await;
    let mut body: Value = serde_json::from_str(&Call::agent("s1").body).unwrap();
    body["callbackUrl"] = url.into();
    assert_eq!(Call::with_body(body).send(&simulator).await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err());
    simulator.shutdown().await;
    receiver.abort();
}

#[tokio::test]
async fn hang_outlasts_the_client_and_shutdown_releases_it() {
    let simulator = start().await;
    simulator.script([Reply::Hang]);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let error = Call::agent("s-hang")
        .send_with(&impatient, &simulator)
        .await
        .expect_err("no answer");
    assert!(error.is_timeout(), "{error:?}");
    assert_eq!(simulator.requests()[0].status, 0);

    tokio::time::timeout(Duration::from_secs(5), simulator.shutdown())
        .await
        .expect("shutdown does not wait for the hang");
}

#[tokio::test]
async fn latency_delays_the_answer() {
    let simulator = start_with(|c| c.latency = Duration::from_millis(300)).await;
    let started = Instant::now();
    assert_eq!(Call::agent("s1").send(&simulator).await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    simulator.shutdown().await;
}

#[tokio::test]
async fn stats_and_health_routes_answer() {
    let simulator = start().await;
    assert_eq!(Call::agent("s1").send(&simulator).await.status, 200);
    let mut call = Call::agent("s1");
    call.account = None;
    call.send(&simulator).await;

    let client = client();
    let health = client
        .get(format!("{}/healthz", simulator.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");

    let stats = client
        .get(format!("{}/simulator/stats", simulator.base_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["calls"], 2);
    assert_eq!(stats["accepted"], 1);
    assert_eq!(stats["byStatus"], json!({ "200": 1, "401": 1 }));
    assert_eq!(stats["callbacksDelivered"], 0);
    let parsed: SimulatorStats = serde_json::from_value(stats).unwrap();
    assert_eq!(parsed, simulator.stats());
    let arrivals = client
        .get(format!("{}/simulator/arrivals", simulator.base_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let arrivals: Value = serde_json::from_str(&arrivals).unwrap();
    let recorded = simulator.requests();
    let account = recorded[0].account_id.clone().unwrap_or_default();
    assert_eq!(arrivals[&account][0], 0, "{arrivals}");
    assert_eq!(
        arrivals
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_array().unwrap().len())
            .sum::<usize>(),
        recorded.len()
    );
    simulator.shutdown().await;
}

#[tokio::test]
async fn impossible_configurations_are_refused() {
    let config = SimulatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        fail_rate: 0.6,
        reject_rate: 0.6,
        ..SimulatorConfig::default()
    };
    assert!(matches!(
        Simulator::start(config).await,
        Err(SimulatorError::Config(_))
    ));
    let config = SimulatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        bots: vec![bot(), bot()],
        ..SimulatorConfig::default()
    };
    assert!(matches!(
        Simulator::start(config).await,
        Err(SimulatorError::Config(_))
    ));
}

#[tokio::test]
async fn serve_until_stops_when_told() {
    let (tx, rx) = oneshot::channel::<()>();
    let config = SimulatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..SimulatorConfig::default()
    };
    let server = tokio::spawn(serve_until(config, async {
        let _ = rx.await;
    }));
    tx.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("stops promptly")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn secrets_are_redacted_in_debug() {
    let shown = format!("{:?}", bot());
    assert!(!shown.contains(SECRET), "{shown}");
}

#[tokio::test]
async fn a_request_is_recorded_when_it_arrives_and_again_when_answered() {
    let simulator = Arc::new(start_with(|c| c.latency = Duration::from_millis(300)).await);
    let sending = {
        let simulator = Arc::clone(&simulator);
        tokio::spawn(async move { Call::agent("s-arrive").send(&simulator).await })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while simulator.requests().is_empty() {
        assert!(Instant::now() < deadline, "never recorded on arrival");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let arrived = simulator.requests();
    assert_eq!((arrived[0].status, arrived[0].answered_at), (0, None));
    assert_eq!(simulator.in_flight(), 1);
    assert!(
        arrived[0]
            .auth
            .as_deref()
            .is_some_and(|t| t.split('.').count() == 3)
    );
    let answer = tokio::time::timeout(Duration::from_secs(5), sending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status, 200);
    let done = &simulator.requests()[0];
    assert_eq!(done.status, 200);
    let answered_at = done.answered_at.expect("answered");
    assert!(answered_at - done.received_at >= Duration::from_millis(300));
    assert_eq!((simulator.in_flight(), simulator.max_in_flight()), (0, 1));
    Arc::into_inner(simulator).unwrap().shutdown().await;
}
