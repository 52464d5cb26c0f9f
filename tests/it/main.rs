//! Integration tests: the real application against the local RabbitMQ and the project's
//! AgentAssist simulator. Each test has its own queue names and ports, so they run in parallel.
//! `RUST_LOG=transfer_worker=debug` shows the worker's logs.

mod architecture;
mod breaker;
mod cli;
mod cluster;
mod contract;
mod dashboard;
mod dead_letters;
mod fairness;
mod fairness_scale;
mod fleet;
mod fleet_freeze;
mod fleet_identity;
mod fleet_redis_loss;
mod handover;
mod hardening;
mod harness;
mod holds;
mod kubernetes;
mod model;
mod operations;
mod partitions;
mod relay;
mod rolling;
mod schemas;
mod sentinel;
mod tls;
mod trace_context;
mod transfers;
mod vendor_clock;

/// Installs a log subscriber once, when RUST_LOG asks for one.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    }
}
