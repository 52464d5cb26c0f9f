//! The one test harness. Every test starts its workers through it and reads their events, the
//! broker and the API the same way:
//!
//! - [`names`]: where the broker and Redis are, unique queue names per test, free ports.
//! - [`broker`]: confirm-mode channels, [`publish_confirmed`], reading and counting queues, and
//!   [`Cleanup`], which deletes a test's queues and exchanges when dropped.
//! - [`events`]: [`Events`], the one reader of a results exchange, yielding [`Received`].
//! - [`commands`] and [`sim`]: the commands the tests publish, and the simulator that answers
//!   the worker's calls.
//! - [`app`]: [`Harness`], one worker in-process.
//! - [`process`]: the real binary as a child process, its environment and its log.
//! - [`replicas`] and [`fleet`]: [`Fleet`], several `transfer-worker run` replicas on one set of
//!   queues, with one simulator and one event reader.
//! - [`cluster`]: a worker process attached to the local 3-node RabbitMQ cluster.
//! - [`pki`] and [`tls`]: certificate authorities made at test time, and the peers of secure
//!   transport: a TLS-only Redis, the cluster's TLS node, an HTTP CONNECT proxy.
//! - [`admin`], [`redis`], [`proxy`] and [`wait`]: a worker's admin listener, Redis for a
//!   fleet, a TCP proxy a test can cut, and bounded waiting.

pub mod admin;
pub mod app;
pub mod broker;
pub mod cluster;
pub mod commands;
pub mod events;
pub mod fleet;
pub mod names;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod redis_cli;
pub mod replicas;
pub mod sentinel;
pub mod sim;
pub mod tls;
pub mod wait;

pub use app::Harness;
pub use broker::{
    Cleanup, ReplyQueue, account_queues_at_broker, declared, is_account_queue, left_in,
    own_topology, passive, publish_commands, publish_confirmed, take_all, test_channel,
    test_channel_at,
};
pub use commands::{agent_command, command_of, expire_in, queue_command, session_command};
pub use events::{EVENT_WAIT, Events, Received, sorted_keys};
pub use fleet::Fleet;
pub use names::{
    TEST_CALLBACK_SECRET, account_queues_left, amqp_url, free_port, redis_url, tag, test_settings,
};
pub use process::{Process, binary, output, succeeded, worker_env};
pub use proxy::Proxy;
pub use replicas::{BotSpec, FleetSpec};
pub use wait::{eventually, wait_for};
