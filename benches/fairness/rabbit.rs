//! RabbitMQ seen from outside, for scenario scale: the account queues of a run, counted with
//! `rabbitmqctl list_queues` (which must be on the PATH and allowed to reach the local node),
//! and the RSS of the broker's `beam.smp` process, sampled every second. Against another node
//! (a disposable one: this scenario can overwhelm a small broker), `FAIRNESS_RABBITMQCTL`
//! names the command to run instead, words split on spaces (say `scripts/rabbitmq-cluster ctl
//! 5`), and `FAIRNESS_BROKER_PID` the node's process.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::procs;

/// How long one `rabbitmqctl list_queues` may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(15);

/// RabbitMQ at its peak, sampled every second.
#[derive(Default)]
pub(crate) struct BrokerPeaks {
    /// The most account queues of this run at once.
    pub(crate) queues: Option<usize>,
    /// How many counts failed, and the first error.
    pub(crate) failed: (usize, Option<String>),
    /// `beam.smp`'s RSS at the first sample and at its peak, KiB.
    pub(crate) rss_kib: Option<(u64, u64)>,
}

/// Sets its flag when dropped, so the sampler stops with the run however the run ends.
pub(crate) struct StopOnDrop(pub(crate) Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Samples RabbitMQ every second until `stop`: the account queues whose name starts with
/// `prefix` in `vhost`, and the RSS of its `beam.smp`.
pub(crate) async fn sample_broker(
    prefix: String,
    vhost: String,
    stop: Arc<AtomicBool>,
) -> BrokerPeaks {
    let beam = match std::env::var("FAIRNESS_BROKER_PID") {
        Ok(pid) => pid.trim().parse().ok(),
        Err(_) => procs::find_by_name("beam.smp"),
    };
    let mut peaks = BrokerPeaks::default();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        every.tick().await;
        if let Some(rss) = beam.and_then(|p| procs::sample(p).ok()).map(|s| s.rss_kib) {
            let kib = peaks.rss_kib.get_or_insert((rss, rss));
            kib.1 = kib.1.max(rss);
        }
        match account_queue_count(&prefix, &vhost).await {
            Ok(n) => peaks.queues = Some(peaks.queues.unwrap_or(0).max(n)),
            Err(e) => {
                peaks.failed.0 += 1;
                if peaks.failed.1.is_none() {
                    peaks.failed.1 = Some(e);
                }
            }
        }
    }
    peaks
}

/// The queues whose name starts with `prefix` and holds `.account.`, from `rabbitmqctl`.
pub(crate) async fn account_queue_count(prefix: &str, vhost: &str) -> Result<usize, String> {
    let command = std::env::var("FAIRNESS_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = command.split_whitespace();
    let mut ctl = tokio::process::Command::new(words.next().unwrap_or("rabbitmqctl"));
    ctl.args(words);
    ctl.args([
        "list_queues",
        "-p",
        vhost,
        "name",
        "-q",
        "--no-table-headers",
    ])
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let out = match tokio::time::timeout(CTL_TIMEOUT, ctl.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("cannot run rabbitmqctl: {e}")),
        Err(_) => return Err(format!("rabbitmqctl took over {CTL_TIMEOUT:?}")),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("rabbitmqctl {}: {}", out.status, err.trim()));
    }
    let names = String::from_utf8_lossy(&out.stdout);
    Ok(names
        .lines()
        .map(str::trim)
        .filter(|q| q.starts_with(prefix) && q.contains(".account."))
        .count())
}

/// The virtual host an AMQP URL names, percent-decoded ("/" when it names none).
pub(crate) fn vhost(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = rest.split_once('/').map_or("", |(_, path)| path);
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path.is_empty() {
        return "/".to_owned();
    }
    let (bytes, mut out, mut i) = (path.as_bytes(), Vec::new(), 0);
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        if bytes[i] == b'%'
            && let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
