//! Posts a transfer's outcome to the `callbackUrl` its request named. The vendor documents no
//! payload and no retry policy, so this behaves like a typical webhook sender: JSON body,
//! retries with backoff on errors, gives up after a while. A relay under test then has to
//! cope with delays and repeats.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::check::{Target, Transfer};
use super::{Shared, stopped};

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Measured from the first attempt: long enough to ride out a relay restart, short enough
/// that a dead URL does not keep a task alive for the rest of a benchmark.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
/// Per attempt, so a relay that never answers cannot hold the task past the give-up time.
pub(super) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// One callback to deliver.
pub(super) struct Callback {
    pub(super) url: String,
    pub(super) bot_session_id: String,
    pub(super) body: Vec<u8>,
}

impl Callback {
    /// The message for an accepted transfer; `failed` models the agent or queue refusing it
    /// after the API already said "transferred".
    pub(super) fn new(url: String, transfer: &Transfer, failed: bool, timestamp_ms: u64) -> Self {
        let (kind, id_field, id) = match &transfer.target {
            Target::Agent(id) => ("AGENT", "agentId", id),
            Target::Queue(id) => ("QUEUE", "queueId", id),
        };
        let mut payload = json!({
            "event": "transfer_status",
            "sessionId": transfer.bot_session_id,
            "botSessionId": transfer.bot_session_id,
            "orgId": transfer.org_id,
            "status": if failed { "failed" } else { "transferred" },
            "transferredType": kind,
            "timestamp": timestamp_ms,
        });
        if let Value::Object(fields) = &mut payload {
            fields.insert(id_field.into(), id.clone().into());
            if failed {
                fields.insert("reason".into(), "agent unavailable".into());
            }
        }
        Self {
            url,
            bot_session_id: transfer.bot_session_id.clone(),
            // Serialising a `Value` cannot fail.
            body: serde_json::to_vec(&payload).unwrap_or_default(),
        }
    }
}

/// Waits `delay`, then posts until a 2xx, the give-up time, or shutdown.
///
/// At shutdown a callback still waiting out its delay is sent at once (the API promised it),
/// while one already retrying is abandoned: its receiver is evidently not there.
pub(super) async fn deliver(
    shared: Arc<Shared>,
    callback: Callback,
    delay: Duration,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = stopped(&mut stop) => {}
    }

    let started = Instant::now();
    let mut waits = crate::backoff::delays(FIRST_BACKOFF, MAX_BACKOFF, None);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        if post(&shared, &callback, attempt).await.is_break() {
            return;
        }
        if *stop.borrow() {
            tracing::info!(bot_session_id = %callback.bot_session_id, "callback abandoned at shutdown");
            return;
        }
        let wait = waits.next().unwrap_or(MAX_BACKOFF);
        if started.elapsed() + wait > GIVE_UP_AFTER {
            tracing::warn!(
                bot_session_id = %callback.bot_session_id,
                attempts = attempt,
                "callback given up"
            );
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// One post of a callback: `Break` when it is done with (delivered, or never deliverable),
/// `Continue` when it is worth another try.
async fn post(shared: &Shared, callback: &Callback, attempt: u32) -> ControlFlow<()> {
    let result = shared
        .http
        .post(&callback.url)
        .header(CONTENT_TYPE, "application/json")
        .body(callback.body.clone())
        .timeout(ATTEMPT_TIMEOUT)
        .send()
        .await;
    let counters = &shared.counters;
    let session = &callback.bot_session_id;
    match result {
        Ok(response) if response.status().is_success() => {
            counters.callbacks_delivered.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(bot_session_id = %session, attempt, "callback delivered");
            return ControlFlow::Break(());
        }
        Ok(response) => {
            counters
                .callbacks_failed_attempts
                .fetch_add(1, Ordering::Relaxed);
            let status = response.status().as_u16();
            tracing::debug!(bot_session_id = %session, attempt, status, "callback refused");
        }
        Err(error) => {
            counters
                .callbacks_failed_attempts
                .fetch_add(1, Ordering::Relaxed);
            // A URL that cannot even be turned into a request will not improve with time.
            if error.is_builder() {
                tracing::warn!(bot_session_id = %session, "callbackUrl is not a usable URL; callback dropped");
                return ControlFlow::Break(());
            }
            // The URL is not logged: it may carry the receiver's signed token.
            tracing::debug!(bot_session_id = %session, attempt, error = %error, "callback attempt failed");
        }
    }
    ControlFlow::Continue(())
}
