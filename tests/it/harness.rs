//! A real application per test: its own queue names on the local RabbitMQ, its own simulator
//! on a free port, a consumer of every event it publishes, and cleanup that runs even when the
//! test panics.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::Value;
use tokio::task::JoinHandle;
use transfer_worker::app::{App, AppError};
use transfer_worker::broker::{CurrentLink, topology};
use transfer_worker::config::Settings;
use transfer_worker::ops::metrics::Metrics;
use transfer_worker::shutdown::Shutdown;
use transfer_worker::tools::simulator::{self, Simulator, SimulatorConfig};

/// The broker every test talks to.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The broker's `host:port` in [`amqp_url`], resolved: what a proxy in front of it forwards to.
pub fn amqp_addr() -> SocketAddr {
    use std::net::ToSocketAddrs;
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

/// Longest wait for one expected event.
pub const EVENT_WAIT: Duration = Duration::from_secs(20);

/// Settings for one test: unique names, free ports, fast retries.
pub fn test_settings() -> Settings {
    let mut s = Settings::load_with_env(None, Some(HashMap::new())).expect("defaults load");
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

/// An event as a consumer of the results exchange sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub json: Value,
    pub routing_key: String,
    pub properties: BasicProperties,
}

impl Received {
    pub fn name(&self) -> &str {
        self.json["event"].as_str().unwrap_or_default()
    }
    pub fn command_id(&self) -> &str {
        self.json["commandId"].as_str().unwrap_or_default()
    }
}

/// Deletes a test's queues and exchanges when dropped, panicking test or not.
pub struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
    url: String,
}

impl Cleanup {
    /// A guard for queues and exchanges a test declares itself.
    pub fn new(queues: Vec<String>, exchanges: Vec<String>) -> Self {
        Self::at(amqp_url(), queues, exchanges)
    }

    /// Like [`Cleanup::new`], on the broker at `url`.
    pub fn at(url: String, queues: Vec<String>, exchanges: Vec<String>) -> Self {
        Self {
            queues,
            exchanges,
            url,
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        let url = std::mem::take(&mut self.url);
        // Drop cannot await; a thread with its own runtime can, whatever runtime we are in.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Ok(Ok(conn)) = tokio::time::timeout(
                    Duration::from_secs(5),
                    Connection::connect(&url, ConnectionProperties::default()),
                )
                .await
                else {
                    return;
                };
                let Ok(ch) = conn.create_channel().await else {
                    return;
                };
                for q in &queues {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
                    )
                    .await;
                }
                for e in &exchanges {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        ch.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default()),
                    )
                    .await;
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

/// One application under test, with its simulator and a view of the broker.
pub struct Harness {
    pub settings: Settings,
    pub sim: Simulator,
    pub channel: Channel,
    pub conn: Connection,
    events: Consumer,
    dead: Consumer,
    app: Option<JoinHandle<Result<(), AppError>>>,
    pub shutdown: Shutdown,
    pub broker: Arc<CurrentLink>,
    pub metrics: Arc<Metrics>,
    pub relay_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    _cleanup: Cleanup,
}

/// Opens a confirm-mode channel on the test broker.
pub async fn test_channel() -> (Connection, Channel) {
    test_channel_at(&amqp_url()).await
}

/// Like [`test_channel`], on the broker at `url`.
pub async fn test_channel_at(url: &str) -> (Connection, Channel) {
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect in time")
    .expect("RabbitMQ must be running on 127.0.0.1:5672");
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, channel)
}

/// A server-named queue for this connection only.
async fn private_queue(channel: &Channel) -> String {
    topology::private_queue(channel, Duration::from_secs(10))
        .await
        .expect("private queue")
        .to_string()
}

/// Consumes `queue` without acks.
async fn consume(channel: &Channel, queue: &str) -> Consumer {
    topology::watch(channel, queue.into(), Duration::from_secs(10))
        .await
        .expect("consume")
}

/// Takes every message of `queue` off it (no acks), until none comes for half a second.
pub async fn take_all(channel: &Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let tag = format!("take-all-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume the queue");
    let mut taken = Vec::new();
    while let Ok(next) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
        match next {
            Some(Ok(delivery)) => taken.push(delivery),
            other => panic!("the queue's consumer ended: {other:?}"),
        }
    }
    channel
        .basic_cancel(tag.as_str().into(), Default::default())
        .await
        .expect("cancel");
    taken
}

/// The commandIds of what is left in `queues` (taken off them), once nothing consumes
/// them; a queue that does not exist holds nothing.
pub async fn left_in(queues: &[String]) -> Vec<String> {
    let (conn, channel) = test_channel().await;
    let mut ids = Vec::new();
    for queue in queues {
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            // A channel of its own: a passive declare of a missing queue closes it.
            let probe = conn.create_channel().await.expect("a channel");
            let options = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match probe
                .queue_declare(queue.as_str().into(), options, FieldTable::default())
                .await
            {
                Ok(q) if q.consumer_count() == 0 => {
                    ids.extend(take_all(&channel, queue).await.iter().map(|d| {
                        let json: Value = serde_json::from_slice(&d.data).unwrap_or_default();
                        json["commandId"].as_str().unwrap_or_default().to_owned()
                    }));
                    break;
                }
                Ok(_) => {
                    assert!(
                        tokio::time::Instant::now() < until,
                        "{queue} is still consumed"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => break,
            }
        }
    }
    ids
}

/// A private queue bound to every event of the results exchange `exchange`.
pub async fn events_queue(channel: &Channel, exchange: &str) -> String {
    let queue = private_queue(channel).await;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the events queue");
    queue
}

/// The environment that points a `transfer-worker` process at a test's own topology on the
/// test broker and at the API `api_base_url`, with its listeners on free ports.
pub fn worker_env(
    amqp: &transfer_worker::config::AmqpSettings,
    api_base_url: &str,
) -> Vec<(String, String)> {
    [
        ("TRANSFER__AMQP__URL", amqp_url()),
        (
            "TRANSFER__AMQP__COMMANDS_QUEUE",
            amqp.commands_queue.clone(),
        ),
        (
            "TRANSFER__AMQP__RESULTS_EXCHANGE",
            amqp.results_exchange.clone(),
        ),
        (
            "TRANSFER__AMQP__DEAD_LETTER_EXCHANGE",
            amqp.dead_letter_exchange.clone(),
        ),
        (
            "TRANSFER__AMQP__DEAD_LETTER_QUEUE",
            amqp.dead_letter_queue.clone(),
        ),
        ("TRANSFER__AGENTASSIST__BASE_URL", api_base_url.to_owned()),
        ("TRANSFER__CALLBACKS__LISTEN", "127.0.0.1:0".to_owned()),
        ("TRANSFER__ADMIN__LISTEN", "127.0.0.1:0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Publishes JSON commands to `queue` back to back, persistent, confirmed together.
pub async fn publish_confirmed(channel: &Channel, queue: &str, commands: &[Value]) {
    let mut confirms = Vec::with_capacity(commands.len());
    for c in commands {
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    lapin::options::BasicPublishOptions::default(),
                    &serde_json::to_vec(c).unwrap(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }
}

/// Sends SIGTERM to a child process.
pub fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running");
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

/// Waits until a worker consumes `queue` (declared by the worker, so it may not exist yet).
pub async fn wait_consumed(
    queue: &str,
    child: &mut tokio::process::Child,
    log: &dyn Fn() -> String,
) {
    let (conn, _) = test_channel().await;
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ch = conn.create_channel().await.unwrap();
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = tokio::time::timeout(
            Duration::from_secs(5),
            ch.queue_declare(queue.into(), options, FieldTable::default()),
        )
        .await
        .expect("queue.declare in time");
        if declared.is_ok_and(|q| q.consumer_count() > 0) {
            let _ = ch.close(200, "ready".into()).await;
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the worker exited early with {status}:\n{}", log());
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the worker never consumed:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A queue's counts, without declaring it.
pub async fn passive(channel: &Channel, queue: &str) -> lapin::Queue {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .unwrap()
}

impl Harness {
    /// Starts a simulator and the application; `tune` adjusts both before they start.
    pub async fn start(tune: impl FnOnce(&mut Settings, &mut SimulatorConfig)) -> Self {
        Self::start_with(test_settings(), tune).await
    }

    /// Like [`Harness::start`] with given base settings.
    pub async fn start_with(
        settings: Settings,
        tune: impl FnOnce(&mut Settings, &mut SimulatorConfig),
    ) -> Self {
        Self::launch(settings, tune, true).await
    }

    /// Like [`Harness::start`], but nothing is declared before the worker starts: the worker
    /// declares its topology itself, and the test's consumers attach once it consumes.
    pub async fn start_undeclared(tune: impl FnOnce(&mut Settings, &mut SimulatorConfig)) -> Self {
        Self::launch(test_settings(), tune, false).await
    }

    async fn launch(
        mut settings: Settings,
        tune: impl FnOnce(&mut Settings, &mut SimulatorConfig),
        declare_first: bool,
    ) -> Self {
        let mut sim_config = SimulatorConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            bots: simulator::bots_from_settings(&settings),
            callbacks: false,
            ..SimulatorConfig::default()
        };
        // The broker of the base settings is the test's; `tune` may point the worker elsewhere
        // (through a proxy, say).
        let test_broker = settings.amqp.url.clone();
        tune(&mut settings, &mut sim_config);
        let sim = Simulator::start(sim_config)
            .await
            .expect("simulator starts");
        settings.agentassist.base_url = sim.base_url();
        let mut queues = vec![
            settings.amqp.commands_queue.clone(),
            settings.amqp.dead_letter_queue.clone(),
        ];
        // A fleet that shares work declares its partition queues too.
        let partitions = if settings.fleet.enabled() {
            settings.fleet.partitions
        } else {
            0
        };
        queues.extend((0..partitions).map(|k| {
            transfer_worker::contract::names::partition_queue(&settings.amqp.commands_queue, k)
        }));
        queues.extend(account_queues(&settings, partitions));
        let cleanup = Cleanup::at(
            test_broker.clone(),
            queues,
            vec![
                settings.amqp.results_exchange.clone(),
                settings.amqp.dead_letter_exchange.clone(),
            ],
        );
        let (conn, channel) = test_channel_at(&test_broker).await;
        let built = App::build(settings.clone()).await.expect("app builds");
        let shutdown = built.shutdown();
        let broker = built.broker();
        let metrics = built.metrics();
        let relay_addr = built.relay_addr();
        let admin_addr = built.admin_addr();
        let mut built = Some(built);
        let mut handle = None;
        if declare_first {
            // Declared here too, so the test's own queues can bind before the worker starts.
            let mut direct = settings.amqp.clone();
            direct.url = test_broker.clone();
            topology::declare(&channel, &direct)
                .await
                .expect("topology");
        } else {
            // The worker declares everything; the test's queues bind once it consumes.
            let app = built.take().expect("not started yet");
            handle = Some(tokio::spawn(app.run_until_stopped()));
            wait_until_ready(&broker).await;
        }
        let events_queue = events_queue(&channel, &settings.amqp.results_exchange).await;
        let events = consume(&channel, &events_queue).await;
        let dead = consume(&channel, &settings.amqp.dead_letter_queue).await;
        let handle = match built {
            Some(app) => tokio::spawn(app.run_until_stopped()),
            None => handle.expect("started"),
        };
        let harness = Self {
            settings,
            sim,
            channel,
            conn,
            events,
            dead,
            app: Some(handle),
            shutdown,
            broker,
            metrics,
            relay_addr,
            admin_addr,
            _cleanup: cleanup,
        };
        harness.wait_ready().await;
        harness
    }

    /// Waits until the worker consumes.
    pub async fn wait_ready(&self) {
        wait_until_ready(&self.broker).await;
    }

    /// Publishes a raw command body with properties, confirmed.
    pub async fn publish_raw(&self, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.settings.amqp.commands_queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }

    /// Publishes a JSON command.
    pub async fn publish(&self, command: &Value) {
        self.publish_raw(
            &serde_json::to_vec(command).unwrap(),
            BasicProperties::default(),
        )
        .await;
    }

    /// The next event on the results exchange.
    pub async fn next_event(&mut self) -> Received {
        let delivery = tokio::time::timeout(EVENT_WAIT, self.events.next())
            .await
            .expect("an event in time")
            .expect("consumer open")
            .expect("delivery");
        Received {
            json: serde_json::from_slice(&delivery.data).expect("events are JSON"),
            routing_key: delivery.routing_key.to_string(),
            properties: delivery.properties,
        }
    }

    /// The next `n` events.
    pub async fn events(&mut self, n: usize) -> Vec<Received> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_event().await);
        }
        out
    }

    /// Asserts that no event arrives within `wait`, on a consumer that is still open: a closed
    /// or failed consumer is not silence.
    pub async fn assert_no_event(&mut self, wait: Duration) {
        match tokio::time::timeout(wait, self.events.next()).await {
            Err(_) => {}
            Ok(Some(Ok(d))) => panic!("unexpected event: {}", String::from_utf8_lossy(&d.data)),
            Ok(Some(Err(e))) => {
                panic!("the events consumer failed, so silence proves nothing: {e}")
            }
            Ok(None) => panic!("the events consumer closed, so silence proves nothing"),
        }
        assert!(
            self.channel.status().connected(),
            "the events channel closed, so silence proves nothing"
        );
    }

    /// The next message on the dead-letter queue.
    pub async fn next_dead_letter(&mut self) -> lapin::message::Delivery {
        tokio::time::timeout(EVENT_WAIT, self.dead.next())
            .await
            .expect("a dead letter in time")
            .expect("consumer open")
            .expect("delivery")
    }

    /// Stops the application gracefully and returns its result.
    pub async fn stop(mut self) -> Result<(), AppError> {
        self.stop_app().await
    }

    /// The commandIds of what is left in `queues`: see [`left_in`].
    pub async fn left_in(&self, queues: &[String]) -> Vec<String> {
        left_in(queues).await
    }

    /// The commandIds of the events still to be read, until none comes for a second.
    pub async fn drain_events(&mut self) -> Vec<String> {
        let mut ids = Vec::new();
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_secs(1), self.events.next()).await
        {
            let json: Value = serde_json::from_slice(&d.data).unwrap_or_default();
            ids.push(json["commandId"].as_str().unwrap_or_default().to_owned());
        }
        ids
    }

    /// Like [`Harness::stop`], keeping the simulator and the broker view for later checks.
    pub async fn stop_app(&mut self) -> Result<(), AppError> {
        self.shutdown.stop();
        let handle = self.app.take().expect("the app runs");
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("app stops in time")
            .expect("app task")
    }

    /// Stops the application and asserts that it left no command behind, ready *or* unacked:
    /// once the worker's connection is closed, whatever it still held unacked is back in the
    /// queue, so a fresh consumer that receives nothing proves both.
    pub async fn stop_leaving_nothing(mut self) {
        self.stop_app().await.expect("the app stops cleanly");
        let queue = self.settings.amqp.commands_queue.clone();
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while passive(&self.channel, &queue).await.consumer_count() > 0 {
            assert!(
                tokio::time::Instant::now() < until,
                "the worker still consumes after stopping"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (_conn, channel) = test_channel().await;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "left-behind".into(),
                lapin::options::BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume the commands queue");
        match tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
            Err(_) => {}
            Ok(Some(Ok(d))) => panic!(
                "a command was left behind (redelivered: {}): {}",
                d.redelivered,
                String::from_utf8_lossy(&d.data)
            ),
            Ok(other) => panic!("the check's consumer ended: {other:?}"),
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.abandon();
    }
}

async fn wait_until_ready(broker: &CurrentLink) {
    let until = tokio::time::Instant::now() + EVENT_WAIT;
    while !broker.is_ready() {
        assert!(
            tokio::time::Instant::now() < until,
            "worker not ready in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A private queue for `reply_to`, read by polling.
pub struct ReplyQueue {
    pub name: lapin::types::ShortString,
}

impl ReplyQueue {
    pub async fn declare(channel: &Channel) -> Self {
        Self {
            name: private_queue(channel).await.into(),
        }
    }

    /// The next message, waiting up to [`EVENT_WAIT`].
    pub async fn next(&self, channel: &Channel) -> lapin::message::Delivery {
        let until = tokio::time::Instant::now() + EVENT_WAIT;
        loop {
            let options = lapin::options::BasicGetOptions { no_ack: true };
            if let Some(m) = channel.basic_get(self.name.clone(), options).await.unwrap() {
                return m.delivery;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "nothing arrived on {}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The keys of a JSON object, sorted.
pub fn sorted_keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .expect("an object")
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    keys
}

/// Every account queue the worker may set commands aside in: one per account beside the
/// commands queue and beside each of `partitions` partitions.
pub fn account_queues(settings: &Settings, partitions: u16) -> Vec<String> {
    let q = &settings.amqp.commands_queue;
    let mut sources = vec![q.clone()];
    sources
        .extend((0..partitions).map(|k| transfer_worker::contract::names::partition_queue(q, k)));
    let mut accounts: Vec<&str> = settings
        .bots
        .iter()
        .map(|b| b.account_id.as_str())
        .collect();
    accounts.sort_unstable();
    accounts.dedup();
    sources
        .iter()
        .flat_map(|source| {
            accounts
                .iter()
                .map(move |a| transfer_worker::contract::names::account_queue(source, a))
        })
        .collect()
}

/// An agent transfer for session `session`.
pub fn agent_command(id: &str, session: &str) -> Value {
    serde_json::json!({
        "commandId": id,
        "orgId": "o-6a8a7a3e-5c9b-4f0e-9a57-1f1b2c3d4e5f",
        "botSessionId": session,
        "aId": "a-0e1f2a3b-agent",
    })
}

/// A queue transfer for session `session`.
pub fn queue_command(id: &str, session: &str) -> Value {
    serde_json::json!({
        "commandId": id,
        "orgId": "o-6a8a7a3e-5c9b-4f0e-9a57-1f1b2c3d4e5f",
        "botSessionId": session,
        "transferredType": "QUEUE",
        "queueId": "qu-7f8e9d-support",
    })
}
