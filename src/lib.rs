//! transfer-worker (module map filled in below).

pub mod admin;
pub mod agentassist;
pub mod app;
pub mod bots;
pub mod broker;
pub mod command;
pub mod config;
pub mod demo;
pub mod event;
pub mod metrics;
pub mod outcomes;
pub mod pacer;
pub mod publish;
pub mod relay;
pub mod relay_token;
pub mod retry;
pub mod sessions;
pub mod simulator;
pub mod telemetry;
pub mod token;
pub mod transfer;
pub mod worker;
