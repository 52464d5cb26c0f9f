//! What operators see: health, readiness and metrics endpoints ([`admin`]), the Prometheus
//! series ([`metrics`]) and the logs ([`telemetry`]).

pub mod admin;
pub mod metrics;
pub mod telemetry;
