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
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers.
    pub async fn start() -> Self {
        let port = free_port();
        let mut server = Self {
            port,
            process: Process::new(format!("redis-server on {port}")),
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
            .args(["--appendonly", "no"]);
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
}
