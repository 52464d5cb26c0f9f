//! The soak's Redis, as production runs it: a primary, a replica and three sentinels, all
//! private. The replicas find the primary through the sentinels and wait for the replica's
//! acknowledgement (`fleet.redis_min_replicas = 1`). Two faults act on it: the primary killed
//! and failed over (inside the contract), and every node killed and started again empty
//! (outside it: what a Redis without persistence costs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::procs;
use crate::redis_cli::cli;

/// The sentinels call a primary silent for this long down.
const DOWN_AFTER_MS: u64 = 1000;

/// A data node: its port, and its process while it runs.
struct Node {
    port: u16,
    process: Option<tokio::process::Child>,
}

pub struct RedisSet {
    nodes: [Node; 2],
    sentinels: Vec<(u16, tokio::process::Child)>,
    master: String,
    log: PathBuf,
}

/// A private `redis-server`, a replica of `of` when given; killed (SIGKILL) when dropped.
fn server(port: u16, of: Option<u16>, log: &Path) -> anyhow::Result<tokio::process::Child> {
    // A replica's full sync goes through a file even without persistence: beside the log.
    let dir = log.parent().unwrap_or(Path::new("."));
    let mut command = tokio::process::Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--dbfilename", &format!("redis-{port}.rdb")]);
    if let Some(of) = of {
        command.args(["--replicaof", "127.0.0.1", &of.to_string()]);
    }
    spawn(command, log).context("cannot start redis-server")
}

/// Runs `command` in a process group of its own, its output appended to `log`; killed
/// (SIGKILL) when dropped.
fn spawn(
    mut command: tokio::process::Command,
    log: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Ok(command
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?)
}

impl RedisSet {
    /// Starts the set, logs in `dir`, and waits until the sentinels know each other and the
    /// replica, and the replica is in sync.
    pub async fn start(dir: &Path, prefix: &str) -> anyhow::Result<Self> {
        let log = dir.join(format!("{prefix}.redis.log"));
        let (a, b) = (procs::free_port()?, procs::free_port()?);
        let nodes = [
            Node {
                port: a,
                process: Some(server(a, None, &log)?),
            },
            Node {
                port: b,
                process: Some(server(b, Some(a), &log)?),
            },
        ];
        let master = format!("{prefix}-redis");
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = procs::free_port()?;
            let conf = dir.join(format!("{prefix}.sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nsentinel monitor {master} 127.0.0.1 {a} 2\n\
                     sentinel down-after-milliseconds {master} {DOWN_AFTER_MS}\n\
                     sentinel failover-timeout {master} 10000\n"
                ),
            )?;
            let mut command = tokio::process::Command::new("redis-server");
            command.arg(&conf).arg("--sentinel");
            let child = spawn(command, &log).context("cannot start a sentinel")?;
            sentinels.push((port, child));
        }
        let set = Self {
            nodes,
            sentinels,
            master,
            log,
        };
        set.settle(Duration::from_secs(30)).await?;
        Ok(set)
    }

    /// The URL the replicas are given.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/{}", hosts.join(","), self.master)
    }

    /// The primary's port, as the first sentinel that answers says.
    async fn primary(&self) -> Option<u16> {
        for (port, _) in &self.sentinels {
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

    /// Until every sentinel knows the other two and the replica, and the replica is in sync.
    async fn settle(&self, limit: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + limit;
        loop {
            let mut settled = true;
            for (port, _) in &self.sentinels {
                let others = cli(*port, &["SENTINEL", "sentinels", &self.master]).await;
                let replicas = cli(*port, &["SENTINEL", "replicas", &self.master]).await;
                settled &= others.iter().filter(|l| *l == "name").count() == 2
                    && replicas.iter().any(|l| l == "name");
            }
            settled &= self.in_sync().await;
            if settled {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("the Sentinel set did not settle in {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the primary has a replica in sync.
    async fn in_sync(&self) -> bool {
        let Some(primary) = self.primary().await else {
            return false;
        };
        cli(primary, &["INFO", "replication"])
            .await
            .iter()
            .any(|l| l.starts_with("slave0:") && l.contains("state=online"))
    }

    fn node(&mut self, port: u16) -> anyhow::Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .context("the sentinels name a node that is not the set's")
    }

    /// The primary killed (SIGKILL); the sentinels promote the replica; the old primary starts
    /// again (empty) as the new one's replica. Returns how long the promotion took and how long
    /// until the replica was in sync again.
    pub async fn fail_over(&mut self) -> anyhow::Result<(Duration, Duration)> {
        let old = self.primary().await.context("no primary named")?;
        let killed = Instant::now();
        drop(self.node(old)?.process.take());
        let promoted = loop {
            if self.primary().await.is_some_and(|p| p != old) {
                break killed.elapsed();
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("no replica was promoted within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let new = self.primary().await.context("no primary named")?;
        let log = self.log.clone();
        self.node(old)?.process = Some(server(old, Some(new), &log)?);
        let until = Instant::now() + Duration::from_secs(30);
        while !self.in_sync().await {
            if Instant::now() > until {
                bail!("the old primary did not come back in sync within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok((promoted, killed.elapsed()))
    }

    /// Every data node killed (SIGKILL), and after `down` started again empty, in the roles
    /// the sentinels last gave them.
    pub async fn kill_all(&mut self, down: Duration) -> anyhow::Result<()> {
        let primary = self.primary().await.context("no primary named")?;
        for node in &mut self.nodes {
            drop(node.process.take());
        }
        tokio::time::sleep(down).await;
        let log = self.log.clone();
        for node in &mut self.nodes {
            let of = (node.port != primary).then_some(primary);
            node.process = Some(server(node.port, of, &log)?);
        }
        Ok(())
    }
}
