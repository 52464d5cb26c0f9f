//! The local 3-node RabbitMQ cluster of `scripts/rabbitmq-cluster` (AMQP on
//! 127.0.0.1:5681-5683) and a worker attached to it: a `transfer-worker run` process with
//! `amqp.urls` naming every node, its logs (JSON) in a file.
//!
//! The tests share the cluster's nodes, so they take it one at a time, start it when it does
//! not answer, and leave all three nodes running.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Mutex, MutexGuard};
use transfer_worker::config::Settings;

use super::process::{Process, binary, config_file, quick_env, worker_env};

static CLUSTER: Mutex<()> = Mutex::const_new(());

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq-cluster");
pub const NODES: [u8; 3] = [1, 2, 3];

/// The cluster, for this test alone, with its three nodes up.
pub async fn exclusive() -> MutexGuard<'static, ()> {
    let guard = CLUSTER.lock().await;
    if !NODES.iter().all(|&n| answers(n)) {
        script(&["up"]);
    }
    guard
}

pub fn amqp_port(node: u8) -> u16 {
    5680 + u16::from(node)
}

pub fn node_url(node: u8) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", amqp_port(node))
}

pub fn node_name(node: u8) -> String {
    format!("tw-cluster-{node}@localhost")
}

/// Runs the cluster script; panics with its output when it fails.
pub fn script(args: &[&str]) -> String {
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

/// Whether node `node` accepts connections.
pub fn answers(node: u8) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, amqp_port(node)));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Starts a stopped node again when dropped, so the next test finds three nodes.
pub struct Revive(pub Option<u8>);

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
pub fn queue_members(queue: &str) -> BTreeSet<String> {
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
                ])
                .args(["--formatter", "json"])
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
pub struct ClusterWorker {
    process: Process,
    _config: tempfile::NamedTempFile,
}

impl ClusterWorker {
    /// Starts a worker for `settings`' topology, with `TRANSFER__AMQP__URLS` naming every node
    /// as an operator would write it.
    pub fn start(settings: &Settings, api_base_url: &str) -> Self {
        let mut bot = settings.bots[0].clone();
        bot.rate_limit = 100_000;
        bot.rate_window = Duration::from_secs(1);
        let config = config_file(&[bot]);
        let mut command = binary();
        command
            .arg("run")
            .arg("--config")
            .arg(config.path())
            .env_remove("RUST_LOG")
            .envs(worker_env(&settings.amqp, api_base_url))
            .envs(quick_env())
            .env("TRANSFER__AMQP__URLS", settings.amqp.urls.join(","))
            .env("TRANSFER__AMQP__PREFETCH", "32")
            .env("TRANSFER__AMQP__OPERATION_TIMEOUT", "5s")
            .env("TRANSFER__LOG__FORMAT", "json");
        Self {
            process: Process::start("the cluster's worker", command),
            _config: config,
        }
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// SIGTERM, and the exit status within `limit`.
    pub async fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.process.terminate(limit).await
    }

    /// The worker's log lines with this message, as JSON.
    pub fn logged(&self, message: &str) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["fields"]["message"] == message)
            .collect()
    }

    /// The nodes (`host:port`) the worker's own connection went to, in order (the
    /// connections of its account queues left out).
    pub fn connections(&self) -> Vec<String> {
        self.logged("connected to the broker")
            .iter()
            .filter(|l| {
                let name = l["fields"]["connection"].as_str().unwrap_or_default();
                name.split(' ').count() == 2
            })
            .map(|l| l["fields"]["node"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// How many times the worker began consuming.
    pub fn consuming(&self) -> usize {
        self.logged("consuming commands").len()
    }
}
