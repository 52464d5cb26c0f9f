//! The Redis side of the fleet scenario: the worker's Redis series from `/metrics`, Redis
//! itself (reachable or not), and the keys a run leaves there, deleted afterwards.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use redis::aio::MultiplexedConnection;

/// The Redis of the fleet runs unless `--redis-url` or `TRANSFER__FLEET__REDIS_URL` says
/// otherwise.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// `fleet.partitions` of `config/default.toml`: what a fleet-mode config without the key uses.
pub const SHIPPED_PARTITIONS: u16 = 16;

/// Every single Redis operation of the bench (connect, ping, one scan or unlink) must end
/// within this.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// The worker's once-a-second health probe: not per-command work.
pub const PING_OP: &str = "ping";

/// The worker's Redis series at one moment, or their growth over an interval, by `op` label.
#[derive(Debug, Clone, Default)]
pub struct RedisMetrics {
    /// `transfer_redis_round_trips_total`.
    pub round_trips: BTreeMap<String, f64>,
    /// `transfer_redis_errors_total`.
    pub errors: BTreeMap<String, f64>,
    /// `transfer_redis_round_trip_seconds_sum`.
    pub seconds_sum: BTreeMap<String, f64>,
    /// `transfer_redis_round_trip_seconds_count`.
    pub seconds_count: BTreeMap<String, f64>,
}

impl RedisMetrics {
    /// Reads the series from the Prometheus text exposition; other lines are ignored.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            let Some((name, rest)) = line.split_once('{') else {
                continue;
            };
            let series = match name {
                "transfer_redis_round_trips_total" => &mut out.round_trips,
                "transfer_redis_errors_total" => &mut out.errors,
                "transfer_redis_round_trip_seconds_sum" => &mut out.seconds_sum,
                "transfer_redis_round_trip_seconds_count" => &mut out.seconds_count,
                _ => continue,
            };
            let Some((labels, value)) = rest.split_once('}') else {
                continue;
            };
            let op = labels.split(',').find_map(|l| {
                l.trim()
                    .strip_prefix("op=")
                    .map(|v| v.trim_matches('"').to_owned())
            });
            let value = value.split_whitespace().next().map(str::parse::<f64>);
            if let (Some(op), Some(Ok(value))) = (op, value) {
                series.insert(op, value);
            }
        }
        out
    }

    /// The growth from `before` to `self` (a series `before` did not have yet counts from 0).
    pub fn since(&self, before: &Self) -> Self {
        let delta = |now: &BTreeMap<String, f64>, then: &BTreeMap<String, f64>| {
            now.iter()
                .map(|(op, v)| (op.clone(), v - then.get(op).copied().unwrap_or(0.0)))
                .collect()
        };
        Self {
            round_trips: delta(&self.round_trips, &before.round_trips),
            errors: delta(&self.errors, &before.errors),
            seconds_sum: delta(&self.seconds_sum, &before.seconds_sum),
            seconds_count: delta(&self.seconds_count, &before.seconds_count),
        }
    }

    /// Adds `other`'s counts to these (for totals over runs).
    pub fn add(&mut self, other: &Self) {
        let add = |into: &mut BTreeMap<String, f64>, from: &BTreeMap<String, f64>| {
            for (op, v) in from {
                *into.entry(op.clone()).or_insert(0.0) += v;
            }
        };
        add(&mut self.round_trips, &other.round_trips);
        add(&mut self.errors, &other.errors);
        add(&mut self.seconds_sum, &other.seconds_sum);
        add(&mut self.seconds_count, &other.seconds_count);
    }

    /// Round trips of every operation but the health probe.
    pub fn per_command_round_trips(&self) -> f64 {
        self.round_trips
            .iter()
            .filter(|(op, _)| op.as_str() != PING_OP)
            .map(|(_, v)| v)
            .fold(0.0, |a, b| a + b)
    }

    /// Mean latency in ms of the operations `include` accepts, together (NaN when none was
    /// timed).
    pub fn mean_ms(&self, include: impl Fn(&str) -> bool) -> f64 {
        let (mut sum, mut count) = (0.0, 0.0);
        for (op, s) in &self.seconds_sum {
            if include(op) {
                sum += s;
                count += self.seconds_count.get(op).copied().unwrap_or(0.0);
            }
        }
        if count > 0.0 {
            sum * 1000.0 / count
        } else {
            f64::NAN
        }
    }
}

/// Connects, with an error that says plainly when Redis is not there.
async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(url).context("unusable Redis URL")?;
    let connecting = client.get_multiplexed_async_connection();
    let hint = || {
        format!(
            "cannot connect to Redis at {} — is it running? (`redis-cli ping`)",
            crate::amqp::redact(url)
        )
    };
    match tokio::time::timeout(OP_TIMEOUT, connecting).await {
        Ok(result) => result.with_context(hint),
        Err(_) => Err(anyhow::anyhow!("timed out after {OP_TIMEOUT:?}")).with_context(hint),
    }
}

/// Runs one Redis command under [`OP_TIMEOUT`].
async fn query<T: redis::FromRedisValue>(
    connection: &mut MultiplexedConnection,
    command: &redis::Cmd,
) -> anyhow::Result<T> {
    match tokio::time::timeout(OP_TIMEOUT, command.query_async::<T>(connection)).await {
        Ok(result) => result.context("Redis command failed"),
        Err(_) => bail!("Redis command timed out after {OP_TIMEOUT:?}"),
    }
}

/// Fails unless Redis answers PING.
pub async fn ping(url: &str) -> anyhow::Result<()> {
    let mut connection = connect(url).await?;
    let answer: String = query(&mut connection, &redis::cmd("PING")).await?;
    if answer != "PONG" {
        bail!("Redis answered PING with {answer:?}");
    }
    Ok(())
}

/// Deletes every key that starts with `prefix`; returns how many there were.
pub async fn delete_prefix(url: &str, prefix: &str) -> anyhow::Result<u64> {
    let mut connection = connect(url).await?;
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000);
        let (next, keys): (u64, Vec<String>) = query(&mut connection, &scan).await?;
        if !keys.is_empty() {
            let removed: u64 = query(&mut connection, redis::cmd("UNLINK").arg(&keys)).await?;
            deleted += removed;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// The key prefixes of the fleet runs so far; whatever is still registered is deleted from
/// Redis by [`KeyRegistry::delete_all`], after every run, on error and on interrupt.
#[derive(Debug, Clone, Default)]
pub struct KeyRegistry(Arc<Mutex<Vec<String>>>);

impl KeyRegistry {
    /// Remembers `prefix` before a worker may write under it.
    pub fn register(&self, prefix: &str) {
        self.0
            .lock()
            .expect("key registry lock")
            .push(prefix.to_owned());
    }

    /// Forgets `prefix` (its keys were deleted).
    pub fn forget(&self, prefix: &str) {
        self.0
            .lock()
            .expect("key registry lock")
            .retain(|p| p != prefix);
    }

    /// Deletes the keys of every registered prefix.
    pub async fn delete_all(&self, url: &str) -> anyhow::Result<()> {
        let all: Vec<String> = std::mem::take(&mut *self.0.lock().expect("key registry lock"));
        for prefix in &all {
            delete_prefix(url, prefix).await?;
        }
        Ok(())
    }
}
