//! Operator endpoints (docs/contract.md §6) on `admin.listen`: liveness, readiness, metrics.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use tower_http::timeout::TimeoutLayer;

use crate::broker::CurrentLink;
use crate::fleet::Fleet;
use crate::ops::metrics::Metrics;

/// What the endpoints report on.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Readiness.
    pub link: Arc<CurrentLink>,
    /// The series.
    pub metrics: Arc<Metrics>,
    /// The fleet's shared state, when there is one: readiness needs Redis too.
    pub fleet: Option<Arc<Fleet>>,
}

/// The admin routes.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(10),
        ))
        .with_state(Arc::new(admin))
}

async fn ready(State(admin): State<Arc<Admin>>) -> (StatusCode, &'static str) {
    if !admin.link.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: broker not connected or not consuming\n",
        );
    }
    if admin.fleet.as_ref().is_some_and(|f| !f.is_healthy()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the fleet's Redis does not answer\n",
        );
    }
    (StatusCode::OK, "ready\n")
}

async fn metrics(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        admin.metrics.encode(),
    )
}
