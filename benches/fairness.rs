//! Scenario (i), a noisy neighbour (docs/fairness.md): account A has a backlog (10 000 commands
//! at the vendor's 60 a minute) while account B publishes a steady 50 commands a second; the
//! API answers in 100 ms. Measured on the real artifact — `transfer-worker simulate` and one or
//! three `transfer-worker run` processes (three: fleet mode, Redis, 16 partitions) — against
//! the local RabbitMQ:
//!
//! - B's latency from publish to its event: p50, p99, max, and how many of B's commands ended;
//! - A's calls against its budget, as the simulator saw them arrive (`/simulator/arrivals`):
//!   the calls in each whole window from A's first call (least and most; the target is the limit,
//!   both), and the time from call n to call n + limit (shortest and longest; the target is the
//!   window: never under it, and not much over it);
//! - the workers' peak RSS (all replicas together), and what they report waiting for A.
//!
//! `--backlog 100000 --duration 30 --quiet-rate 0` measures the memory of a large backlog.
//! `--worker-exe PATH` runs another build (the one before a change, say) with the same load.
//! Numbers are printed, never asserted; the exit code is 2 when the harness fails, else 0.
//!
//! ```text
//! cargo bench --bench fairness                       # one worker, then three replicas
//! cargo bench --bench fairness -- --replicas 1 --duration 70
//! cargo bench --bench fairness -- --backlog 100000 --duration 30 --quiet-rate 0 --replicas 1
//! ```
//!
//! Options: `--replicas 1|3` (repeatable; default both), `--backlog N` (10 000), `--limit N`
//! and `--window-secs S` (A's budget, 60 per 60), `--quiet-rate R` (B's commands a second, 50),
//! `--duration S` (how long B publishes, 130: two whole windows after A's first), `--prefetch P`
//! (256), `--worker-exe PATH`. Broker: `TRANSFER__AMQP__URL`, else the local one; Redis:
//! `TRANSFER__FLEET__REDIS_URL`, else `redis://127.0.0.1:6379/0`.
//!
//! Scenario scale, many accounts and a replica joining (benches/fairness/scale.rs): 1 000
//! accounts at 5 calls per 3 s; 200 of them get 30 commands each at once, 50 others one command
//! every 2 s for `--duration` s; a fleet of three replicas (Redis, 16 partitions) whose third
//! starts 5 s into the load. Measured: the account queues at RabbitMQ (peak, and 30 s after the
//! last command ended), RabbitMQ's peak RSS, the third replica's take-up time and account-queue
//! looks, the trickle accounts' latency, the commands ended, and the most calls of any account
//! in any rate window at the simulator. `rabbitmqctl` must be on the PATH for the queue counts.
//!
//! ```text
//! cargo bench --bench fairness -- --scenario scale
//! cargo bench --bench fairness -- --scenario scale --duration 120 --limit 5 --window-secs 3
//! ```
//!
//! Options of scale: `--duration S` (60), `--limit N` and `--window-secs S` (every account's
//! budget, 5 per 3), `--accounts N` (1 000), `--bursting N` (200), `--burst N` (30 each),
//! `--trickle N` (50), `--prefetch P` (256), `--worker-exe PATH`. `--scenario i` is the default.

#[path = "pipeline/amqp.rs"]
#[allow(dead_code)]
mod amqp;
#[path = "pipeline/fleet.rs"]
#[allow(dead_code)]
mod fleet;
#[path = "fairness/noisy.rs"]
mod noisy;
#[path = "pipeline/procs.rs"]
#[allow(dead_code)]
mod procs;
#[path = "fairness/rabbit.rs"]
mod rabbit;
#[path = "fairness/scale.rs"]
mod scale;
#[path = "fairness/scale_report.rs"]
mod scale_report;

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

use amqp::Names;

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379/0";
const WORKER_EXE: &str = env!("CARGO_BIN_EXE_transfer-worker");
const CLIENT_ID: &str = "cs-00000000-0000-4000-8000-000000000001";
const CLIENT_SECRET: &str = "bench-secret-bench-secret-bench-secret";
const PARTITIONS: u16 = 16;
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut scenario = "i".to_owned();
    if let Some(at) = args.iter().position(|a| a == "--scenario") {
        let Some(name) = args.get(at + 1).cloned() else {
            eprintln!("--scenario needs a value (i or scale)");
            return ExitCode::from(2);
        };
        scenario = name;
        args.drain(at..at + 2);
    }
    match scenario.as_str() {
        "i" => noisy::main(&args).await,
        "scale" => scale::main(&args).await,
        other => {
            eprintln!("unknown scenario {other} (i or scale)");
            ExitCode::from(2)
        }
    }
}

/// One `[[bots]]` entry with the bench's client id and secret.
fn bot_entry(stream: &str, account: &str, limit: u32, window: Duration) -> String {
    let q = |s: &str| Value::String(s.to_owned()).to_string();
    format!(
        "[[bots]]\nstream_id = {}\naccount_id = {}\nclient_id = {}\nclient_secret = {}\n\
         rate_limit = {limit}\nrate_window = \"{}s\"\n\n",
        q(stream),
        q(account),
        q(CLIENT_ID),
        q(CLIENT_SECRET),
        window.as_secs(),
    )
}

/// A worker's configuration: this run's broker names, the simulator at `sim`, `/metrics` at
/// `admin`, the `[[bots]]` entries `bots`, and in fleet mode Redis and the replica's number.
fn worker_config(
    url: &str,
    names: &Names,
    prefetch: u16,
    sim: u16,
    admin: u16,
    bots: &str,
    fleet: Option<(&str, usize)>,
) -> String {
    let q = |s: &str| Value::String(s.to_owned()).to_string();
    let mut text = format!(
        "[amqp]\nurl = {}\ncommands_queue = {}\nresults_exchange = {}\n\
         dead_letter_exchange = {}\ndead_letter_queue = {}\nprefetch = {prefetch}\n\n\
         [agentassist]\nbase_url = \"http://127.0.0.1:{sim}\"\n\n{bots}\
         [callbacks]\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:9/unused\"\n\
         secret = \"bench-callback-secret-bench-callback\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n",
        q(url),
        q(&names.commands),
        q(&names.results),
        q(&names.dead_letter),
        q(&names.dead_queue),
    );
    if let Some((redis, replica)) = fleet {
        text.push_str(&format!(
            "\n[fleet]\nredis_url = {}\npartitions = {PARTITIONS}\nname = {}\n",
            q(redis),
            q(&format!("{}-r{replica}", names.prefix)),
        ));
    }
    text
}

fn command(stream: &str, id: &str, session: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "commandId": id,
        "streamId": stream,
        "orgId": "o-6a8a7a3e-5c9b-4f0e-9a57-1f1b2c3d4e5f",
        "botSessionId": session,
        "aId": "a-0e1f2a3b-agent",
    }))
    .expect("JSON")
}

/// The sum of a series' samples whose labels mention `label` (all when empty).
async fn series(http: &reqwest::Client, url: &str, name: &str, label: &str) -> f64 {
    let Ok(response) = http.get(url).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with(name) && (label.is_empty() || l.contains(&format!("\"{label}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
