//! Redis for a fleet: the cleanup of a test's keys on the shared server, and a private
//! `redis-server` a test can kill and start again on the same port.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::names::free_port;
use super::process::Process;

/// Deletes a fleet's Redis keys (every one starts with its commands queue) when dropped.
pub struct RedisKeys {
    url: String,
    prefix: String,
}

impl RedisKeys {
    pub fn new(url: &str, prefix: &str) -> Self {
        Self {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
        }
    }
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let Ok(scan) = std::process::Command::new("redis-cli")
            .args(["-u", &self.url, "--scan", "--pattern"])
            .arg(format!("{}*", self.prefix))
            .stderr(Stdio::null())
            .output()
        else {
            return;
        };
        let keys: Vec<String> = String::from_utf8_lossy(&scan.stdout)
            .lines()
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect();
        for chunk in keys.chunks(100) {
            let _ = std::process::Command::new("redis-cli")
                .args(["-u", &self.url, "DEL"])
                .args(chunk)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A private `redis-server` on a port of its own, which a test can kill and start again.
pub struct RedisServer {
    pub port: u16,
    process: Process,
    /// Further arguments (`--replicaof`, say).
    args: Vec<String>,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(Vec::new()).await
    }

    /// Starts one with further arguments.
    pub async fn start_with(args: Vec<String>) -> Self {
        let port = free_port();
        let mut server = Self {
            port,
            process: Process::new(format!("redis-server on {port}")),
            args,
        };
        server.spawn().await;
        server
    }

    /// `redis://127.0.0.1:{port}/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn spawn(&mut self) {
        let mut command = tokio::process::Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            // A replica's full sync goes through a file even without persistence: not in the
            // working directory.
            .arg("--dir")
            .arg(std::env::temp_dir())
            .args(["--dbfilename", &format!("tw-test-{}.rdb", self.port)])
            .args(&self.args);
        self.process.spawn(command);
        let until = Instant::now() + Duration::from_secs(10);
        while !self.answers().await {
            assert!(
                Instant::now() < until,
                "{} does not answer:\n{}",
                self.process.name,
                self.process.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether it answers PING.
    pub async fn answers(&self) -> bool {
        tokio::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "PING"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .await
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
    }

    /// `FLUSHALL`: every key gone at once, as in a restart without persistence.
    pub async fn flush_all(&self) {
        let out = tokio::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "FLUSHALL"])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("redis-cli runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    }

    /// SIGKILL, and waits for it to be gone.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Starts it again on the same port (empty: nothing was saved).
    pub async fn restart(&mut self) {
        self.spawn().await;
    }

    /// Starts it again on the same port (empty) with these further arguments instead.
    pub async fn restart_with(&mut self, args: Vec<String>) {
        self.args = args;
        self.spawn().await;
    }
}

/// A managed service's primary endpoint: one address that a failover points at another node.
/// Connections made before the move stay with the node they reached, as a DNS name that moves
/// leaves open connections where they were.
pub struct MovingEndpoint {
    pub port: u16,
    target: std::sync::Arc<std::sync::atomic::AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl MovingEndpoint {
    /// Listens on a free port and forwards every connection to the node on `to`.
    pub async fn start(to: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let port = listener.local_addr().expect("bound").port();
        let target = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(to));
        let task = {
            let target = target.clone();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let to = target.load(std::sync::atomic::Ordering::SeqCst);
                    tokio::spawn(async move {
                        if let Ok(mut node) =
                            tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut node).await;
                        }
                    });
                }
            })
        };
        Self { port, target, task }
    }

    /// `redis://127.0.0.1:{port}/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// New connections go to the node on `to` from now on.
    pub fn point_to(&self, to: u16) {
        self.target.store(to, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for MovingEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}
