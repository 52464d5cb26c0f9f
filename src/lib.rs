//! transfer-worker: hands conversations from bots to Kore.ai AgentAssist agents and queues.
//!
//! Upstream systems publish *transfer commands* to RabbitMQ; the worker calls AgentAssist's
//! `assign-conversation` API and publishes what happened to every command. Each folder is one
//! component; in the order a command flows through them:
//!
//! - [`config`] — settings in layers (defaults, file, environment), validated once.
//! - [`broker`] — the AMQP side: [`broker::connection`], [`broker::topology`] (the queues and
//!   exchanges of the contract), [`broker::publisher`] (publisher confirms), and the
//!   [`broker::CurrentLink`] handle on the current link.
//! - [`pipeline`] — one command to its event: [`pipeline::command`] (parse at the edge),
//!   [`pipeline::sessions`] (order), [`pipeline::outcomes`] (dedupe), [`pipeline::event`].
//! - [`agentassist`] — the API: [`agentassist::transfer`] (pace → call → classify → retry),
//!   [`agentassist::bots`], [`agentassist::jwt`], [`agentassist::pacer`],
//!   [`agentassist::retry`], [`agentassist::client`].
//! - [`callbacks`] — AgentAssist's callbacks, authenticated by a signed URL
//!   ([`callbacks::token`]), relayed to the results exchange ([`callbacks::relay`]).
//! - [`ops`] — health, readiness, Prometheus metrics, logs.
//! - [`shutdown`] — the stop signals; [`app`] — all of the above assembled and run together.
//! - [`tools`] — a stand-in AgentAssist API, and the `demo` and `publish` commands.

pub mod agentassist;
pub mod app;
pub mod backoff;
pub mod broker;
pub mod callbacks;
pub mod config;
pub mod json;
pub mod ops;
pub mod pipeline;
pub mod shutdown;
pub mod tools;
