//! What operators see: health, readiness and metrics endpoints ([`admin`]), the Prometheus
//! series ([`metrics`]), the logs and exported spans ([`telemetry`]) and the W3C trace
//! context of each command ([`trace_context`]).

pub mod admin;
pub mod metrics;
pub mod telemetry;
pub mod trace_context;
