//! A Redis that fails over: a primary, its replicas and three sentinels, all local on ports of
//! their own, started by the test and gone with it.

use std::time::{Duration, Instant};

use super::names::{free_port, tag};
use super::process::Process;
use super::proxy::Proxy;
use super::redis::RedisServer;
pub use super::redis_cli::cli;

/// Quorum 2 of 3; a primary silent for a second is down.
const DOWN_AFTER_MS: u64 = 1000;

pub struct Sentinels {
    /// The data nodes; the first started as the primary.
    pub nodes: Vec<RedisServer>,
    sentinels: Vec<Process>,
    ports: Vec<u16>,
    /// The name the sentinels monitor the primary under.
    pub master: String,
    /// The replication link of a replica started behind a proxy ([`Sentinels::start_stallable`]).
    pub link: Option<Proxy>,
    _dir: tempfile::TempDir,
}

impl Sentinels {
    /// A primary with `replicas` replicas in sync, and three sentinels that know them all and
    /// each other.
    pub async fn start(replicas: usize) -> Self {
        let primary = RedisServer::start().await;
        let mut nodes = vec![primary];
        for _ in 0..replicas {
            let of = nodes[0].port.to_string();
            nodes.push(
                RedisServer::start_with(vec!["--replicaof".into(), "127.0.0.1".into(), of]).await,
            );
        }
        Self::watch(nodes, None).await
    }

    /// A primary and one replica that replicates through a proxy: stalling the proxy holds
    /// the replica back (its link looks alive, nothing arrives), and cutting it then loses
    /// what was held, as a replica that lagged when its primary died.
    pub async fn start_stallable() -> Self {
        let primary = RedisServer::start().await;
        let link = Proxy::start_to(([127, 0, 0, 1], primary.port).into()).await;
        let replica = RedisServer::start_with(vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            link.addr.port().to_string(),
        ])
        .await;
        Self::watch(vec![primary, replica], Some(link)).await
    }

    async fn watch(nodes: Vec<RedisServer>, link: Option<Proxy>) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let master = format!("fleet-{}", tag());
        let (mut sentinels, mut ports) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            // A long failover timeout: a sentinel also sends a replica that replicates from
            // another address than the primary's (the stallable one) back to it after that long.
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\n\
                     sentinel monitor {master} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {master} {DOWN_AFTER_MS}\n\
                     sentinel failover-timeout {master} 60000\n\
                     sentinel parallel-syncs {master} 1\n",
                    nodes[0].port
                ),
            )
            .expect("the sentinel's configuration is written");
            let mut command = tokio::process::Command::new("redis-server");
            command.arg(&conf).arg("--sentinel");
            sentinels.push(Process::start(format!("sentinel on {port}"), command));
            ports.push(port);
        }
        let set = Self {
            nodes,
            sentinels,
            ports,
            master,
            link,
            _dir: dir,
        };
        set.wait_settled(Duration::from_secs(30)).await;
        set
    }

    /// `redis+sentinel://…/master`
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/{}", hosts.join(","), self.master)
    }

    /// The primary's port, as the first sentinel that answers says.
    pub async fn primary_port(&self) -> Option<u16> {
        for port in &self.ports {
            let answer = cli(
                *port,
                &["SENTINEL", "get-master-addr-by-name", &self.master],
            )
            .await;
            if let Some(p) = answer.get(1).and_then(|p| p.parse().ok()) {
                return Some(p);
            }
        }
        None
    }

    /// Until every sentinel knows the other two and every replica, and every replica is in
    /// sync with the primary.
    async fn wait_settled(&self, limit: Duration) {
        let until = Instant::now() + limit;
        let replicas = self.nodes.len() - 1;
        loop {
            let mut settled = true;
            for port in &self.ports {
                let others = cli(*port, &["SENTINEL", "sentinels", &self.master]).await;
                let known = cli(*port, &["SENTINEL", "replicas", &self.master]).await;
                settled &= others.iter().filter(|l| *l == "name").count() == 2
                    && known.iter().filter(|l| *l == "name").count() == replicas;
            }
            if let Some(primary) = self.primary_port().await {
                let info = cli(primary, &["INFO", "replication"]).await;
                settled &= info
                    .iter()
                    .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                    .count()
                    == replicas;
            }
            if settled {
                return;
            }
            assert!(
                Instant::now() < until,
                "the Sentinel set did not settle in {limit:?}:\n{}",
                self.sentinels
                    .iter()
                    .map(Process::last_log)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The data node on `port`.
    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of the set")
    }

    /// `kill -9` of the primary; returns its port.
    pub async fn kill_primary(&mut self) -> u16 {
        let port = self
            .primary_port()
            .await
            .expect("the sentinels name a primary");
        self.node(port).kill().await;
        port
    }

    /// Until the sentinels name a primary other than `old`; how long that took.
    pub async fn wait_promoted(&self, old: u16, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if self.primary_port().await.is_some_and(|p| p != old) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "no replica was promoted within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the node on `port` again (empty) as a replica of the primary the sentinels name,
    /// as an operator (or Kubernetes) brings a failed node back. Waits until it is in sync.
    pub async fn restart_as_replica(&mut self, port: u16, limit: Duration) {
        let primary = self
            .primary_port()
            .await
            .expect("the sentinels name a primary");
        self.node(port)
            .restart_with(vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary.to_string(),
            ])
            .await;
        let until = Instant::now() + limit;
        loop {
            let info = cli(port, &["INFO", "replication"]).await;
            if info.iter().any(|l| l == "role:slave")
                && info.iter().any(|l| l == "master_link_status:up")
            {
                return;
            }
            assert!(
                Instant::now() < until,
                "the node on {port} did not become an in-sync replica within {limit:?}: {info:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
