//! The simulated API's routes: the assign-conversation call, checked and answered, and the
//! stats.

use super::callback::{self, Callback};
use super::check::{Rejection, Target, Transfer};
use super::*;

pub(super) async fn stats_route(State(shared): State<Arc<Shared>>) -> Json<SimulatorStats> {
    Json(shared.stats())
}

/// When each recorded request arrived, in ms since the first recorded one, by account.
pub(super) async fn arrivals_route(
    State(shared): State<Arc<Shared>>,
) -> Json<BTreeMap<String, Vec<u64>>> {
    let log = lock(&shared.requests);
    let mut by_account: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    if let Some(first) = log.entries.front().map(|r| r.received_at) {
        for r in &log.entries {
            let ms =
                u64::try_from(r.received_at.duration_since(first).as_millis()).unwrap_or(u64::MAX);
            by_account
                .entry(r.account_id.clone().unwrap_or_default())
                .or_default()
                .push(ms);
        }
    }
    Json(by_account)
}

pub(super) async fn assign_conversation(
    State(shared): State<Arc<Shared>>,
    Path(stream_id): Path<String>,
    request: Request,
) -> Response {
    let received_at = Instant::now();
    let (parts, body) = request.into_parts();
    let mut recorded = RecordedRequest {
        seq: 0,
        auth: parts
            .headers
            .get("auth")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        answered_at: None,
        account_id: parts
            .headers
            .get("accountid")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        stream_id,
        body: Value::Null,
        status: 0,
        received_at,
        bot_session_id: None,
        traceparent: parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };

    let bytes = match read_body(body).await {
        Ok(bytes) => bytes,
        Err(rejection) => {
            let seq = shared.arrive(recorded);
            return reject(&shared, seq, rejection).await;
        }
    };
    recorded.body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    recorded.bot_session_id = recorded
        .body
        .get("botSessionId")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let checked = shared
        .checker
        .check(&recorded.stream_id, &parts.headers, &recorded.body);
    let recorded_stream = recorded.stream_id.clone();
    let seq = shared.arrive(recorded);
    let refused_at_the_edge = shared.config.edge == Edge::AuthenticatesFirst
        && matches!(&checked, Err(r) if r.status == StatusCode::UNAUTHORIZED);
    if let Some(status) = shared.outage()
        && !refused_at_the_edge
    {
        shared.answered(seq, status.as_u16());
        return error_response(status, &message_for(status));
    }
    let transfer = match checked {
        Ok(transfer) => transfer,
        Err(rejection) => return reject(&shared, seq, rejection).await,
    };

    let (answer_tx, answer_rx) = oneshot::channel();
    let task_shared = Arc::clone(&shared);
    let latency = shared.latency(&recorded_stream);
    spawn_tracked(&shared.inflight, async move {
        if let Some(response) = answer(task_shared, transfer, seq, latency).await {
            // The client may have gone; the transfer stands regardless.
            let _ = answer_tx.send(response);
        }
    });
    // No timeout here on purpose: the task is bounded by `latency`, or hangs by design.
    answer_rx
        .await
        .unwrap_or_else(|_| error_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))
}

pub(super) async fn read_body(body: Body) -> Result<Vec<u8>, Rejection> {
    let read = async {
        let mut stream = body.into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| {
                Rejection::new(StatusCode::BAD_REQUEST, "could not read the request body")
            })?;
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(Rejection::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body over 1 MiB",
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                "timed out reading the request body",
            ))
        })
}

/// Answers an invalid request (already recorded as arrived) after the configured latency.
pub(super) async fn reject(shared: &Shared, seq: u64, rejection: Rejection) -> Response {
    tracing::debug!(
        status = rejection.status.as_u16(),
        reason = %rejection.msg,
        "request refused"
    );
    let mut stop = shared.stop.clone();
    tokio::select! {
        () = tokio::time::sleep(shared.config.latency) => {}
        () = stopped(&mut stop) => {}
    }
    shared.answered(seq, rejection.status.as_u16());
    error_response(rejection.status, &rejection.msg)
}

/// Decides and records the answer to a valid request; `None` for a hang.
pub(super) async fn answer(
    shared: Arc<Shared>,
    transfer: Transfer,
    seq: u64,
    latency: Duration,
) -> Option<Response> {
    let mut stop = shared.stop.clone();
    let interrupted = tokio::select! {
        () = tokio::time::sleep(latency) => false,
        () = stopped(&mut stop) => true,
    };
    if interrupted {
        shared.answered(seq, StatusCode::SERVICE_UNAVAILABLE.as_u16());
        return Some(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down",
        ));
    }

    let response = match shared.next_reply() {
        Reply::Accept => accept(&shared, &transfer, StatusCode::OK),
        Reply::Status(code) => match StatusCode::from_u16(code) {
            Ok(status) if status.is_success() => accept(&shared, &transfer, status),
            Ok(status) if code >= 300 => error_response(status, &message_for(status)),
            // 1xx cannot end an exchange; say so rather than confuse the client.
            _ => error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("simulator: cannot answer scripted status {code}"),
            ),
        },
        Reply::RateLimited { retry_after } => {
            let mut response = error_response(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(whole_seconds(retry_after)),
            );
            response
        }
        Reply::Raw {
            status,
            headers,
            body,
        } => {
            let status = StatusCode::from_u16(status)
                .ok()
                .filter(|s| !s.is_informational())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, body).into_response();
            for (name, value) in headers {
                if let (Ok(name), Ok(value)) = (
                    header::HeaderName::try_from(name),
                    HeaderValue::try_from(value),
                ) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        Reply::Hang => {
            tokio::select! {
                () = tokio::time::sleep(HANG_FOR) => {}
                () = stopped(&mut stop) => {}
            }
            shared.released();
            return None;
        }
    };
    shared.answered(seq, response.status().as_u16());
    Some(response)
}

pub(super) fn accept(shared: &Arc<Shared>, transfer: &Transfer, status: StatusCode) -> Response {
    let now = epoch_millis();
    let mut body = json!({
        "sessionId": transfer.bot_session_id,
        "status": "transferred",
        "requestCompletedAt": now,
    });
    if let Value::Object(fields) = &mut body {
        match &transfer.target {
            Target::Agent(id) => fields.insert("agentId".into(), id.clone().into()),
            Target::Queue(id) => fields.insert("queueId".into(), id.clone().into()),
        };
    }

    if shared.config.callbacks
        && let Some(url) = &transfer.callback_url
    {
        let failed = fastrand::f64() < shared.config.callback_fail_rate;
        let callback = Callback::new(url.clone(), transfer, failed, now);
        spawn_tracked(
            &shared.callbacks,
            callback::deliver(
                Arc::clone(shared),
                callback,
                shared.config.callback_delay,
                shared.stop.clone(),
            ),
        );
    }
    (status, Json(body)).into_response()
}

pub(super) fn error_response(status: StatusCode, msg: &str) -> Response {
    let body = json!({ "errors": [{ "msg": msg, "code": status.as_u16() }] });
    (status, Json(body)).into_response()
}

pub(super) fn message_for(status: StatusCode) -> String {
    match status {
        StatusCode::SERVICE_UNAVAILABLE => "service unavailable".into(),
        StatusCode::TOO_MANY_REQUESTS => "rate limit exceeded".into(),
        StatusCode::BAD_REQUEST => "transfer rejected".into(),
        other => other
            .canonical_reason()
            .map_or_else(|| format!("error {}", other.as_u16()), str::to_lowercase),
    }
}

/// `Retry-After` only carries whole seconds; rounding down would invite an early retry.
pub(super) fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

pub(super) fn epoch_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
