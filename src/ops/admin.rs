//! Operator endpoints (docs/contract.md §6) on `admin.listen`: liveness, readiness, metrics.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use tower_http::timeout::TimeoutLayer;

use crate::ops::metrics::Metrics;

/// Something the worker needs to take commands: the broker link, the fleet's Redis. Each
/// component says for itself whether it is ready, so this module needs none of them.
pub trait Readiness: Send + Sync + 'static {
    /// `Err` with what is missing, for the operator, when commands cannot be taken now.
    fn ready(&self) -> Result<(), &'static str>;
}

/// What the endpoints report on.
#[derive(Clone)]
pub struct Admin {
    /// Every condition of readiness, asked in order; the first not met is reported.
    pub readiness: Vec<Arc<dyn Readiness>>,
    /// The metrics `/metrics` renders.
    pub metrics: Arc<Metrics>,
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

async fn ready(State(admin): State<Arc<Admin>>) -> (StatusCode, String) {
    match admin.readiness.iter().try_for_each(|r| r.ready()) {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(missing) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {missing}\n"),
        ),
    }
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
