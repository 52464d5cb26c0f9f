//! The callback relay (docs/contract.md §5): `POST /callbacks/{token}` from AgentAssist becomes a
//! `transfer.callback` event on the results exchange. The token authenticates the caller and
//! says which command the callback is about; the body is relayed as received.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;

use crate::broker::CurrentLink;
use crate::callbacks::token::TokenSigner;
use crate::contract::event::{Event, Subject, callback_event_id};
use crate::json;
use crate::ops::metrics::{Metrics, RelayResult};

/// Largest callback body accepted.
pub const MAX_CALLBACK_BYTES: usize = 256 * 1024;

/// A caller that has not sent its whole request by then gets 408 and loses its connection, so
/// slow clients cannot pile up on a public listener. Longer than any publish confirm wait.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the relay needs.
#[derive(Debug, Clone)]
pub struct Relay {
    /// Verifies tokens.
    pub signer: TokenSigner,
    /// Publishes.
    pub link: Arc<CurrentLink>,
    /// Counts.
    pub metrics: Arc<Metrics>,
}

/// The relay's routes.
pub fn router(relay: Relay) -> Router {
    Router::new()
        .route("/callbacks/{token}", post(receive))
        .layer(DefaultBodyLimit::max(MAX_CALLBACK_BYTES))
        // A bug while handling one callback answers 500 (the sender retries) and costs nothing
        // else.
        .layer(CatchPanicLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(Arc::new(relay))
}

async fn receive(
    State(relay): State<Arc<Relay>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> (StatusCode, &'static str) {
    let received_at = SystemTime::now();
    // The token is checked before the body is looked at: an unauthenticated caller learns
    // nothing, not even the size limit.
    let ids = match relay.signer.verify(&token) {
        Ok(ids) => ids,
        Err(e) => {
            // Debug only: it tells an operator why (say, a previous secret dropped too early),
            // while every caller gets the same answer.
            tracing::debug!(reason = %e, "callback token refused");
            relay.metrics.callback(RelayResult::Forbidden);
            return (StatusCode::NOT_FOUND, "not found\n");
        }
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                relay.metrics.callback(RelayResult::TooLarge);
                return (status, "callback body over 256 KiB\n");
            }
            return (status, "cannot read the body\n");
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let payload = json::value_or_string(&body);
    let subject = Subject {
        command_id: &ids.command_id,
        stream_id: Some(&ids.stream_id),
        bot_session_id: Some(&ids.bot_session_id),
        target: Some(&ids.target),
    };
    let id = callback_event_id(&token, &body);
    let event = Event::callback(subject, id, received_at, content_type, &payload);
    let Some(publisher) = relay.link.publisher() else {
        relay.metrics.callback(RelayResult::Unavailable);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "broker unavailable; retry\n",
        );
    };
    match publisher.publish(&event, None, None).await {
        Ok(()) => {
            relay.metrics.callback(RelayResult::Published);
            relay.metrics.published(event.kind);
            tracing::info!(command_id = %ids.command_id, event_id = %event.id, "callback relayed");
            (StatusCode::OK, "ok\n")
        }
        Err(e) => {
            relay.metrics.callback(RelayResult::Unavailable);
            tracing::warn!(command_id = %ids.command_id, error = %e, "callback not relayed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "broker unavailable; retry\n",
            )
        }
    }
}
