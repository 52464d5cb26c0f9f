//! transfer-worker: hands conversations from bots to Kore.ai AgentAssist agents and queues.
//!
//! Upstream systems publish *transfer commands* to RabbitMQ; the worker calls AgentAssist's
//! `assign-conversation` API and publishes what happened to every command. Each folder is one
//! component; bottom up, and then in the order a command flows through them (which component
//! may use which: docs/architecture.md, checked by a test):
//!
//! - [`contract`] — the bottom: the contract's commands, targets, rejections and events, and
//!   the names of the queues the worker makes (docs/contract.md). It uses nothing else.
//! - [`config`] — settings in layers (defaults, file, environment), validated once, section
//!   by section. Beside it, used by several: [`backoff`] (exponential, full jitter),
//!   [`json`] (bodies kept as JSON, else as a string), [`shutdown`] (stop, then abandon;
//!   every wait that shutdown may cut short goes through it).
//! - [`ops`] — health and readiness ([`ops::admin`]), Prometheus [`ops::metrics`], logs
//!   ([`ops::telemetry`], with spans exported over OTLP when configured), and the W3C trace
//!   context a command carries on to its API call and events ([`ops::trace_context`]).
//! - [`broker`] — the AMQP side, and the only component that speaks lapin:
//!   [`broker::Delivery`] (a message taken, with its settle operations), [`broker::connection`] (to one node of a cluster, chosen by
//!   [`broker::nodes`]), [`broker::topology`] (the queues and exchanges of the contract),
//!   [`broker::publisher`] (publisher confirms), [`broker::account_queue`] (an account's
//!   queue beside a source, where its commands wait while it is congested: declared, read,
//!   stamped),
//!   [`broker::lane_registry`] (the list of a source's account queues, read when it is taken
//!   up), [`broker::account_links`] (the connections account queues are used on, apart from the
//!   replica's own, so a queue the broker cannot serve costs only itself), and
//!   [`broker::consumer`]: one queue's consumer and the partition queues it owns (connect,
//!   consume, rebalance, reconnect, drain, and without a fleet the broker's own hold, a token
//!   that makes every other replica a standby), fed to any [`broker::consumer::Handler`];
//!   [`broker::CurrentLink`] is the shared handle on the current link.
//! - [`fleet`] — with several replicas, the state they share through Redis: one rate budget
//!   per account, claims and recorded outcomes, so the fleet behaves as one worker;
//!   [`fleet::membership`] (heartbeats: who is alive), [`fleet::ownership`] (which partition
//!   a session goes to, and which replica consumes each partition) and [`fleet::holds`] (one
//!   holder per queue).
//! - [`fairness`] — what an account allows: its slots and congestion
//!   ([`fairness::account`]), its budget ([`fairness::pacer`]) and its calls on the wire
//!   ([`fairness::arrivals`]: the last gate, so the limit holds at the vendor's clock), asked
//!   through a [`fairness::budget`], this process's or the fleet's, chosen once.
//! - [`agentassist`] — the API: [`agentassist::transfer`] carries one command through its
//!   starts and the last gate (both asked of its account's budget), the call
//!   ([`agentassist::client`], with a JWT from [`agentassist::jwt`] for one of the
//!   [`agentassist::bots`]), the classification of its answer, and retries
//!   ([`agentassist::retry`], within an [`agentassist::attempts`] budget); the circuit
//!   [`agentassist::breaker`] holds every attempt while the API is down, probing it until it
//!   answers.
//! - [`callbacks`] — AgentAssist's callbacks, authenticated by a signed URL
//!   ([`callbacks::token`]), relayed to the results exchange ([`callbacks::relay`]).
//! - [`pipeline`] — the handler of the commands queue: [`pipeline::parser`] (a delivery
//!   becomes a typed command or a rejection, once, at the edge), [`pipeline::sessions`]
//!   (commands of one `botSessionId` in arrival order), [`pipeline::outcomes`] (recent
//!   outcomes, so a completed command is never sent twice), [`pipeline::ledger`] (claims and
//!   outcomes beyond this process: the fleet's, or nobody's), [`pipeline::decision`] (the step
//!   that decides what happened to a command, without a broker); then publish, then ack.
//!   [`pipeline::lanes`] keeps accounts apart: a congested account's commands wait in its
//!   own queue, taken back at its pace (docs/fairness.md). In a fleet that shares work, the
//!   commands queue's pipeline is the intake ([`pipeline::intake`]): it admits each command at
//!   its account's pace and routes it to its session's partition queue, whose owner carries
//!   it out.
//! - [`app`] — all of the above assembled and run together.
//! - [`tools`] — not the worker: a stand-in AgentAssist API ([`tools::simulator`]), the
//!   `demo` and `publish` commands, [`tools::fleet_status`] (`transfer-worker fleet`),
//!   [`tools::account_status`] (`transfer-worker status`), and [`tools::dead_letters`]
//!   (list, replay and purge the dead-letter queue).

pub mod agentassist;
pub mod app;
pub mod backoff;
pub mod broker;
pub mod callbacks;
pub mod config;
pub mod contract;
pub mod fairness;
pub mod fleet;
pub mod json;
pub mod ops;
pub mod pipeline;
pub mod shutdown;
pub mod tools;
