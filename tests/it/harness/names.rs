//! Where the tests' services are, and a test's own names: unique queue and exchange names,
//! free ports, fast retries.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::time::Duration;

use secrecy::SecretString;
use transfer_worker::config::Settings;
use transfer_worker::contract::names::{account_queue_of_old, lane_registry, partition_queue};

/// The broker every test talks to.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The broker's `host:port` in [`amqp_url`], resolved: what a proxy in front of it forwards to.
pub fn amqp_addr() -> SocketAddr {
    let url = reqwest::Url::parse(&amqp_url()).expect("TEST_AMQP_URL is a URL");
    let host = url.host_str().expect("a host").to_owned();
    let port = url.port().unwrap_or(5672);
    (host.as_str(), port)
        .to_socket_addrs()
        .expect("the broker's host resolves")
        .next()
        .expect("an address")
}

/// [`amqp_url`] with its `host:port` replaced by `addr`: credentials and vhost kept.
pub fn amqp_url_via(addr: SocketAddr) -> String {
    let mut url = reqwest::Url::parse(&amqp_url()).expect("TEST_AMQP_URL is a URL");
    url.set_host(Some(&addr.ip().to_string())).unwrap();
    url.set_port(Some(addr.port())).unwrap();
    url.to_string()
}

/// The shared Redis the tests use when they need no outage.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A free TCP port on loopback (free when asked; the caller binds it soon after).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("a free port")
        .local_addr()
        .unwrap()
        .port()
}

/// A short tag, so command ids and sessions are this run's own.
pub fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// The tests' relay secret: `transfer-worker run` refuses the example of
/// `config/default.toml`, so worker processes of the tests run with this one.
pub const TEST_CALLBACK_SECRET: &str = "test-callback-secret-test-callback-secret";

/// Settings for one test: unique names, free ports, fast retries, the tests' own bot and relay
/// secret. (Installs the log subscriber, when RUST_LOG asks for one: every test that sets up
/// something passes here.)
pub fn test_settings() -> Settings {
    crate::init_logs();
    let mut s = Settings::load_with_env(None, Some(HashMap::new())).expect("defaults load");
    s.callbacks.secret = SecretString::from(TEST_CALLBACK_SECRET);
    s.bots[0].stream_id = "st-00000000-0000-4000-8000-0000000007e5".into();
    s.bots[0].account_id = "test-account".into();
    s.bots[0].client_id = "cs-00000000-0000-4000-8000-0000000007e5".into();
    s.bots[0].client_secret = Some(SecretString::from("test-bot-secret-test-bot-secret"));
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    s.amqp.url = amqp_url();
    s.amqp.commands_queue = format!("tw-test-{id}.commands");
    s.amqp.results_exchange = format!("tw-test-{id}.results");
    s.amqp.dead_letter_exchange = format!("tw-test-{id}.dead-letter");
    s.amqp.dead_letter_queue = format!("tw-test-{id}.commands.dead");
    s.amqp.prefetch = 64;
    s.amqp.reconnect_initial_delay = Duration::from_millis(50);
    s.amqp.reconnect_max_delay = Duration::from_millis(500);
    s.amqp.operation_timeout = Duration::from_secs(5);
    s.amqp.confirm_timeout = Duration::from_secs(5);
    s.agentassist.request_timeout = Duration::from_secs(5);
    s.bots[0].rate_limit = 10_000;
    s.bots[0].rate_window = Duration::from_secs(1);
    s.retry.initial_delay = Duration::from_millis(20);
    s.retry.max_delay = Duration::from_millis(200);
    s.retry.max_attempts = 4;
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    s.callbacks.listen = loopback;
    s.callbacks.public_url = String::new();
    s.admin.listen = loopback;
    s.shutdown.grace = Duration::from_secs(5);
    s
}

/// The partition queues a worker with `settings` shares work through (none without a fleet).
pub fn partition_queues(settings: &Settings) -> Vec<String> {
    let partitions = if settings.fleet.enabled() {
        settings.fleet.partitions
    } else {
        0
    };
    (0..partitions)
        .map(|k| partition_queue(&settings.amqp.commands_queue, k))
        .collect()
}

/// The sources a worker with `settings` may set commands aside beside: the commands queue and
/// each partition queue.
pub fn lane_sources(settings: &Settings) -> Vec<String> {
    let mut sources = vec![settings.amqp.commands_queue.clone()];
    sources.extend(partition_queues(settings));
    sources
}

/// The lists of account queues beside each source, and each account's queue under the name
/// earlier versions gave it. (The account queues the lists name are found through them.)
pub fn account_queues(settings: &Settings) -> Vec<String> {
    let mut accounts: Vec<&str> = settings
        .bots
        .iter()
        .map(|b| b.account_id.as_str())
        .collect();
    accounts.sort_unstable();
    accounts.dedup();
    lane_sources(settings)
        .iter()
        .flat_map(|source| {
            std::iter::once(lane_registry(source)).chain(
                accounts
                    .iter()
                    .map(move |a| account_queue_of_old(source, a)),
            )
        })
        .collect()
}

/// The account queues on the test broker of any account of `settings` beside any of its
/// sources.
pub fn account_queues_left(settings: &Settings) -> Vec<String> {
    let sources = lane_sources(settings);
    super::broker::broker_queue_names()
        .into_iter()
        .filter(|q| {
            sources.iter().any(|source| {
                settings
                    .bots
                    .iter()
                    .any(|b| super::broker::is_account_queue(q, source, &b.account_id))
            })
        })
        .collect()
}

/// Every queue a worker with `settings` may declare: commands, dead letters, partitions and
/// account queues.
pub fn worker_queues(settings: &Settings) -> Vec<String> {
    let amqp = &settings.amqp;
    let mut queues = vec![
        amqp.commands_queue.clone(),
        amqp.dead_letter_queue.clone(),
        transfer_worker::broker::consumer::holder_queue(&amqp.commands_queue),
    ];
    queues.extend(partition_queues(settings));
    queues.extend(account_queues(settings));
    queues
}
