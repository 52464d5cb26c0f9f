//! transfer-worker: hands conversations from bots to Kore.ai AgentAssist agents and queues.
//!
//! Upstream systems publish *transfer commands* to RabbitMQ; the worker calls AgentAssist's
//! `assign-conversation` API and publishes what happened to every command. The modules, in
//! the order a command flows through them:
//!
//! - [`config`] — settings in layers (defaults, file, environment), validated once.
//! - [`broker`] — the AMQP side: [`broker::connection`], [`broker::topology`] (the queues and
//!   exchanges of the contract), [`broker::publisher`] (publisher confirms), and the
//!   [`broker::Broker`] handle on the current link.
//! - [`worker`] — the consumer: manual acks, reconnects, graceful shutdown; hands each
//!   delivery to its session.
//! - [`command`] — a delivery becomes a typed [`command::Command`] or a
//!   [`command::Rejection`], once, at the edge.
//! - [`sessions`] — commands of one `botSessionId` in arrival order, sessions concurrently.
//! - [`outcomes`] — recent outcomes by command id, so a completed command is never sent twice.
//! - [`transfer`] — one command to its terminal event: pacing, the call, retries, deadline.
//!   - [`bots`] — the configured bots and their accounts; [`token`] — their JWTs;
//!     [`pacer`] — the per-account sliding-window budget; [`retry`] — backoff with full
//!     jitter; [`agentassist`] — the HTTP call and the classification of its answer.
//! - [`event`] — the events of the contract, serialized once.
//! - [`relay`] and [`relay_token`] — AgentAssist's callbacks, authenticated by a signed URL,
//!   relayed to the results exchange.
//! - [`admin`] and [`metrics`] — health, readiness, Prometheus metrics.
//! - [`app`] — all of the above assembled and run together.
//! - [`simulator`] — a stand-in AgentAssist API; [`demo`] and [`publish`] — the `demo` and
//!   `publish` commands; [`telemetry`] — logging.

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
