//! A worker on a 3-node RabbitMQ cluster (CONTRACT §10): one node dies mid-burst, and the
//! worker goes on from another node without losing a command or calling the API twice for one.
//!
//! The nodes are the local cluster of `scripts/rabbitmq-cluster` (AMQP on 127.0.0.1:5681-5683);
//! the tests start it when it does not answer. They share its three nodes, so they run one at
//! a time, and each leaves all three running.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use serde_json::Value;
use transfer_worker::broker::topology;
use transfer_worker::config::Settings;
use transfer_worker::tools::simulator::{self, Simulator, SimulatorConfig};

use crate::harness::{Cleanup, EVENT_WAIT, Received, test_settings, worker_env};
use crate::proxy::Proxy;
use crate::replicas::wait_for;

/// The tests share the cluster's nodes: one at a time.
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq-cluster");
const NODES: [u8; 3] = [1, 2, 3];

fn amqp_port(node: u8) -> u16 {
    5680 + u16::from(node)
}

fn node_url(node: u8) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", amqp_port(node))
}

fn node_name(node: u8) -> String {
    format!("tw-cluster-{node}@localhost")
}

/// Runs the cluster script; panics with its output when it fails.
fn script(args: &[&str]) -> String {
    let out = Command::new(SCRIPT)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("scripts/rabbitmq-cluster runs");
    assert!(
        out.status.success(),
        "rabbitmq-cluster {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn answers(node: u8) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, amqp_port(node)));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Starts the cluster unless its three nodes answer.
fn cluster_up() {
    if !NODES.iter().all(|&n| answers(n)) {
        script(&["up"]);
    }
}

/// Starts a stopped node again when dropped, so the next test finds three nodes.
struct Revive(Option<u8>);

impl Drop for Revive {
    fn drop(&mut self) {
        if let Some(node) = self.0.take() {
            let _ = Command::new(SCRIPT)
                .args(["start-node", &node.to_string()])
                .stdin(Stdio::null())
                .output();
        }
    }
}

/// The nodes holding a replica of `queue`, as a node of the cluster lists them. A node revived
/// by the test before answers AMQP a little before its command-line interface: each node is
/// asked in turn, for up to half a minute.
fn queue_members(queue: &str) -> BTreeSet<String> {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let json = 'asked: loop {
        let mut errors = String::new();
        for node in NODES {
            let out = Command::new(SCRIPT)
                .args([
                    "ctl",
                    &node.to_string(),
                    "-q",
                    "list_queues",
                    "name",
                    "members",
                    "--formatter",
                    "json",
                ])
                .stdin(Stdio::null())
                .output()
                .expect("scripts/rabbitmq-cluster runs");
            if out.status.success() {
                break 'asked String::from_utf8_lossy(&out.stdout).into_owned();
            }
            errors.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        assert!(
            std::time::Instant::now() < until,
            "no node lists the queues:\n{errors}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let queues: Vec<Value> = serde_json::from_str(&json).expect("list_queues answers JSON");
    let entry = queues
        .iter()
        .find(|q| q["name"] == queue)
        .unwrap_or_else(|| panic!("{queue} is not on the cluster: {json}"));
    entry["members"]
        .as_array()
        .expect("a quorum queue lists its members")
        .iter()
        .map(|m| m.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// One `transfer-worker run` process on the cluster, its logs (JSON) in a file.
struct Worker {
    child: tokio::process::Child,
    log: tempfile::NamedTempFile,
    _config: tempfile::NamedTempFile,
}

impl Worker {
    /// Starts a worker for `settings`' topology, with `TRANSFER__AMQP__URLS` naming every node
    /// as an operator would write it.
    fn start(settings: &Settings, api_base_url: &str) -> Self {
        let urls = settings.amqp.urls.join(",");
        let bot = &settings.bots[0];
        let mut config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
        write!(
            config,
            "[[bots]]\nstream_id = {}\naccount_id = {}\nclient_id = {}\nclient_secret = {}\n\
             rate_limit = 100000\nrate_window = \"1s\"\n",
            s(&bot.stream_id),
            s(&bot.account_id),
            s(&bot.client_id),
            s(bot.client_secret.as_ref().unwrap().expose_secret()),
        )
        .unwrap();
        config.flush().unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_transfer-worker"));
        command.arg("run").arg("--config").arg(config.path());
        for (key, _) in std::env::vars() {
            if key.starts_with("TRANSFER__") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command.envs(worker_env(&settings.amqp, api_base_url));
        let child = command
            .env("TRANSFER__AMQP__URLS", urls)
            .env("TRANSFER__AMQP__PREFETCH", "32")
            .env("TRANSFER__AMQP__RECONNECT_INITIAL_DELAY", "50ms")
            .env("TRANSFER__AMQP__RECONNECT_MAX_DELAY", "500ms")
            .env("TRANSFER__AMQP__OPERATION_TIMEOUT", "5s")
            .env("TRANSFER__AGENTASSIST__REQUEST_TIMEOUT", "5s")
            .env("TRANSFER__CALLBACKS__PUBLIC_URL", "")
            .env("TRANSFER__SHUTDOWN__GRACE", "5s")
            .env("TRANSFER__LOG__LEVEL", "info")
            .env("TRANSFER__LOG__FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(append(&log))
            .stderr(append(&log))
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        Self {
            child,
            log,
            _config: config,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// The worker's log lines with this message, as JSON.
    fn logged(&self, message: &str) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["fields"]["message"] == message)
            .collect()
    }

    /// The nodes (`host:port`) the worker connected to, in order.
    fn connections(&self) -> Vec<String> {
        self.logged("connected to the broker")
            .iter()
            .map(|l| l["fields"]["node"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// How many times the worker began consuming.
    fn consuming(&self) -> usize {
        self.logged("consuming commands").len()
    }
}

fn append(file: &tempfile::NamedTempFile) -> std::fs::File {
    std::fs::OpenOptions::new()
        .append(true)
        .open(file.path())
        .unwrap()
}

/// A test's view of the cluster: a connection to one node, a consumer of every event.
struct Observer {
    _conn: Connection,
    channel: lapin::Channel,
    events: lapin::Consumer,
}

impl Observer {
    async fn on(node: u8, results_exchange: &str) -> Self {
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(&node_url(node), ConnectionProperties::default()),
        )
        .await
        .expect("connect in time")
        .expect("the cluster node answers");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .unwrap();
        let queue = crate::harness::events_queue(&channel, results_exchange).await;
        let events = topology::watch(&channel, queue.as_str().into(), EVENT_WAIT)
            .await
            .expect("consume the events");
        Self {
            _conn: conn,
            channel,
            events,
        }
    }

    async fn publish_all(&self, queue: &str, commands: &[Value]) {
        let mut confirms = Vec::with_capacity(commands.len());
        for c in commands {
            confirms.push(
                self.channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        lapin::options::BasicPublishOptions::default(),
                        &serde_json::to_vec(c).unwrap(),
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
        }
        for confirm in confirms {
            assert!(confirm.await.unwrap().is_ack());
        }
    }

    async fn next_event(&mut self, limit: Duration) -> Option<Received> {
        use futures_util::StreamExt;
        let delivery = match tokio::time::timeout(limit, self.events.next()).await {
            Err(_) => return None,
            Ok(next) => next.expect("events consumer open").expect("delivery"),
        };
        Some(Received {
            json: serde_json::from_slice(&delivery.data).expect("events are JSON"),
            routing_key: delivery.routing_key.to_string(),
            properties: delivery.properties,
        })
    }
}

/// Keeps an event, and its `eventId` under its command.
fn record(
    e: Received,
    events: &mut Vec<Received>,
    terminal: &mut BTreeMap<String, BTreeSet<String>>,
) {
    terminal
        .entry(e.command_id().to_owned())
        .or_default()
        .insert(e.json["eventId"].as_str().unwrap_or_default().to_owned());
    events.push(e);
}

/// How the node is taken away.
#[derive(Clone, Copy)]
enum Loss {
    /// SIGKILL of the node's VM: its connections drop at once.
    Crash,
    /// `rabbitmqctl stop`: the node closes its connections and leaves.
    Stop,
    /// The network between the worker and the node goes silent (a proxy holds back whatever
    /// the node sends); nothing is closed, only heartbeats can tell.
    Partition,
}

/// Commands per session, and sessions: each session's commands run one after another, so the
/// burst lasts about `PER_SESSION` API latencies (5 s) and is mid-flight when the node goes:
/// taking a node away takes the script up to 2 s.
const SESSIONS: usize = 4;
const PER_SESSION: usize = 50;
/// The events seen before the node is taken away.
const BEFORE_LOSS: usize = 20;
/// How soon the worker must consume again from another node (the test's bound: the contract's
/// is `amqp.reconnect_max_delay` after the loss is noticed).
const FAILOVER_BOUND: Duration = Duration::from_secs(15);

async fn node_dies_mid_burst(loss: Loss) {
    let _one_at_a_time = CLUSTER.lock().await;
    crate::init_logs();
    cluster_up();

    let mut settings = test_settings();
    // The worker reaches each node directly, or through a proxy that can cut it off.
    let proxies = match loss {
        Loss::Partition => {
            let mut proxies = Vec::new();
            for n in NODES {
                proxies.push(
                    Proxy::start_to(SocketAddr::from((Ipv4Addr::LOCALHOST, amqp_port(n)))).await,
                );
            }
            proxies
        }
        Loss::Crash | Loss::Stop => Vec::new(),
    };
    let addresses: Vec<String> = match loss {
        Loss::Partition => proxies.iter().map(|p| p.addr.to_string()).collect(),
        Loss::Crash | Loss::Stop => NODES
            .iter()
            .map(|&n| format!("127.0.0.1:{}", amqp_port(n)))
            .collect(),
    };
    settings.amqp.urls = addresses
        .iter()
        .map(|a| format!("amqp://guest:guest@{a}/%2f"))
        .collect();
    let amqp = settings.amqp.clone();
    let sim = Simulator::start(SimulatorConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        bots: simulator::bots_from_settings(&settings),
        latency: Duration::from_millis(100),
        callbacks: false,
        ..SimulatorConfig::default()
    })
    .await
    .expect("simulator starts");

    let mut worker = Worker::start(&settings, &sim.base_url());
    wait_for(
        "the worker consumes",
        Duration::from_secs(30),
        || worker.log(),
        async || worker.consuming() >= 1,
    )
    .await;
    let first = worker.connections();
    let [first] = &first[..] else {
        panic!("one connection expected before the loss:\n{}", worker.log());
    };
    let dead = NODES
        .into_iter()
        .zip(&addresses)
        .find(|(_, a)| *a == first)
        .map(|(n, _)| n)
        .unwrap_or_else(|| panic!("connected to {first}, not a cluster node"));
    let mut revive = Revive(None);
    let watcher = NODES.into_iter().find(|&n| n != dead).unwrap();
    // Declared by the worker; the cleanup runs on a node that stays up.
    let _cleanup = Cleanup::at(
        node_url(watcher),
        vec![amqp.commands_queue.clone(), amqp.dead_letter_queue.clone()],
        vec![
            amqp.results_exchange.clone(),
            amqp.dead_letter_exchange.clone(),
        ],
    );
    let expected: BTreeSet<String> = NODES.iter().map(|&n| node_name(n)).collect();
    for queue in [&amqp.commands_queue, &amqp.dead_letter_queue] {
        assert_eq!(
            queue_members(queue),
            expected,
            "{queue} is replicated on every node"
        );
    }

    let mut observer = Observer::on(watcher, &amqp.results_exchange).await;
    let commands: Vec<Value> = (0..PER_SESSION)
        .flat_map(|i| {
            (0..SESSIONS).map(move |s| {
                // A distinct aId per command: the API's request log tells its calls apart.
                let id = format!("cmd-{s}-{i:03}");
                let mut c = crate::harness::agent_command(&id, &format!("session-{s}"));
                c["aId"] = Value::String(format!("a-{id}"));
                c
            })
        })
        .collect();
    observer.publish_all(&amqp.commands_queue, &commands).await;

    let mut events: Vec<Received> = Vec::new();
    let mut terminal: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    while events.len() < BEFORE_LOSS {
        let e = observer
            .next_event(EVENT_WAIT)
            .await
            .unwrap_or_else(|| panic!("no event before the loss:\n{}", worker.log()));
        record(e, &mut events, &mut terminal);
    }

    // The node goes while the test keeps reading events: the script's own run time (the CLI
    // starts slowly) is not the worker's.
    let lost_at = Instant::now();
    let how = match loss {
        Loss::Crash => "kill-node",
        Loss::Stop => "stop-node",
        Loss::Partition => "partition",
    };
    let taking_away = match loss {
        Loss::Partition => {
            proxies[usize::from(dead - 1)].stall();
            tokio::spawn(async { Instant::now() })
        }
        Loss::Crash | Loss::Stop => {
            revive.0 = Some(dead);
            tokio::task::spawn_blocking(move || {
                script(&[how, &dead.to_string()]);
                Instant::now()
            })
        }
    };
    // Events already on their way may still arrive; the first one that arrives once the worker
    // connected to another node marks its return.
    let mut back_after = None;
    let until = Instant::now() + Duration::from_secs(120);
    while terminal.len() < commands.len() {
        let left = until.saturating_duration_since(Instant::now());
        let Some(e) = observer.next_event(left.min(EVENT_WAIT)).await else {
            panic!(
                "events stopped after {} of {} commands:\n{}",
                terminal.len(),
                commands.len(),
                worker.log()
            );
        };
        if back_after.is_none() && worker.connections().len() > 1 {
            back_after = Some(lost_at.elapsed());
        }
        record(e, &mut events, &mut terminal);
    }
    let stopped = taking_away.await.expect("the node is taken away");
    let back_after = back_after.unwrap_or_else(|| {
        panic!("the worker never connected again:\n{}", worker.log());
    });
    let nodes = worker.connections();
    eprintln!(
        "cluster failover ({how}): the script took {:?}; first event from the next connection \
         {back_after:?} after it began; connections: {nodes:?}",
        stopped - lost_at,
    );
    assert!(
        back_after <= FAILOVER_BOUND,
        "consuming again took {back_after:?}:\n{}",
        worker.log()
    );
    let dead_address = &addresses[usize::from(dead - 1)];
    assert!(
        nodes[1..].iter().all(|n| n != dead_address),
        "reconnected to the dead node: {nodes:?}"
    );

    // Every command has exactly one terminal event: republished copies carry its eventId.
    for c in &commands {
        let id = c["commandId"].as_str().unwrap();
        let ids = terminal.get(id).map(|s| s.len()).unwrap_or(0);
        assert_eq!(ids, 1, "{id}: {ids} distinct terminal events");
    }
    let succeeded = events
        .iter()
        .filter(|e| e.name() == "transfer.succeeded")
        .map(Received::command_id)
        .collect::<BTreeSet<_>>();
    assert_eq!(succeeded.len(), commands.len(), "every command succeeded");

    // No command reached the API twice.
    let mut calls: BTreeMap<String, usize> = BTreeMap::new();
    for r in sim.requests() {
        *calls
            .entry(r.body["aId"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let twice: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "commands sent to the API again: {twice:?}"
    );
    assert_eq!(calls.len(), commands.len(), "one call per command");

    crate::harness::sigterm(&worker.child);
    let status = tokio::time::timeout(Duration::from_secs(20), worker.child.wait())
        .await
        .expect("the worker stops in time")
        .unwrap();
    assert!(status.success(), "{status}:\n{}", worker.log());
    drop(revive);
    assert!(answers(dead), "node {dead} is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_by_the_network_mid_burst_is_left_and_nothing_is_lost_or_sent_twice() {
    node_dies_mid_burst(Loss::Partition).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_crashes_mid_burst_loses_nothing_and_sends_nothing_twice() {
    node_dies_mid_burst(Loss::Crash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_mid_burst_loses_nothing_and_sends_nothing_twice() {
    node_dies_mid_burst(Loss::Stop).await;
}
