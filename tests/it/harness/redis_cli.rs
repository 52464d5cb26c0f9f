//! `redis-cli` on a local port: what the tests' Sentinel sets and the chaos soak's ask their
//! nodes and sentinels (the soak includes this file by path).

use std::process::Stdio;
use std::time::Duration;

/// `redis-cli -p port args…`, its answer's lines (none when it does not answer within 5 s).
pub async fn cli(port: u16, args: &[&str]) -> Vec<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output(),
    )
    .await;
    match out {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect(),
        _ => Vec::new(),
    }
}
