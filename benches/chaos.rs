//! The chaos soak (docs/contract.md §4, §9, §12): three `transfer-worker run` replicas in fleet
//! mode on the local 3-node RabbitMQ cluster (`scripts/rabbitmq-cluster up`), a private Redis
//! (a primary, its replica and three sentinels; `fleet.redis_min_replicas = 1`) and the
//! project's simulator, fed steady sessions of two accounts (one paced at 20 calls per
//! 5 s) and bursts of a third (5 calls per 3 s, 12–24 commands over 6–12 sessions every 10–20 s,
//! so its lane turns on and off all the time), while random faults hit one after another:
//!
//! - a replica killed (SIGKILL) and started again 1–3 s later, or stopped (SIGTERM) and started
//!   again at once (a rolling deploy's step, same name);
//! - a rolling update as a Kubernetes Deployment does it: a new replica under a new name first,
//!   and once it has joined the fleet (ready, and seeing the others) an old one gets SIGTERM
//!   0–4 s later and exits by itself;
//! - a replica frozen (SIGSTOP) for 4–9 s, longer than `fleet.member_ttl` (3.25 s), then
//!   woken (SIGCONT);
//! - the bursting account's queues (`<source>.account.burst#<tag>`) deleted by an operator while they
//!   hold a backlog (`queue.delete` on a connection of its own);
//! - broker node 1 or 3 stopped, or killed, and started again; the network to node 1 stalled
//!   (everything the node sends held back) through a proxy;
//! - Redis's primary killed (SIGKILL) and failed over by the sentinels, the old primary started
//!   again as the new one's replica;
//! - Redis killed (primary and replica) and started again, empty;
//! - the API down (503) or slow (2 s a call).
//!
//! Faults come in rounds: each kind once a round, in an order the seed shuffles, 1.5–4 s apart;
//! they go on for the duration, and at least until each kind has hit once.
//! Node 2 carries this program's own connections (the feed, the events, the operator), so
//! faults there would measure the soak rather than the worker.
//!
//! When the time is up the feed stops, every command is given time to end, and the whole
//! history is checked (`chaos/check.rs`), from the simulator's log and the events: commands
//! lost, deleted by the operator, transferred twice, sessions reordered or overlapping, windows
//! over an account's limit at the simulator's clock, SIGTERMs not obeyed. docs/performance.md
//! describes the soak and what it finds.
//! It prints a report and exits 1 when any check fails (2 when the soak itself could not run).
//!
//! ```text
//! scripts/rabbitmq-cluster up
//! cargo bench --bench chaos -- --duration 90 --seed 17
//! cargo bench --bench chaos -- --duration 1800 --seed 2026
//! ```
//!
//! Options: `--duration S` (90), `--seed N` (from the clock; printed, so a run can be
//! repeated), `--worker-exe PATH` (another build).

#[path = "pipeline/amqp.rs"]
#[allow(dead_code)]
mod amqp;
#[path = "pipeline/procs.rs"]
#[allow(dead_code)]
mod procs;

#[path = "chaos/check.rs"]
mod check;
#[path = "chaos/faults.rs"]
mod faults;
#[path = "chaos/feed.rs"]
mod feed;
#[path = "chaos/fleet.rs"]
mod fleet;
#[path = "chaos/redis.rs"]
mod redis;
#[path = "../tests/it/harness/redis_cli.rs"]
mod redis_cli;
#[path = "chaos/rig.rs"]
mod rig;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::watch;

use amqp::{Names, Registry};
use feed::History;

const WORKER_EXE: &str = env!("CARGO_BIN_EXE_transfer-worker");
/// The time between two faults, in ms (drawn).
const GAP: (u64, u64) = (1500, 4000);
/// How long the soak waits for every command to end once the feed has stopped, at most.
const SETTLE: Duration = Duration::from_secs(150);
/// Once nothing has ended for this long, the commands still open are not coming.
const SETTLE_IDLE: Duration = Duration::from_secs(15);
/// The same, when every command still open may be in a queue the operator deleted.
const SETTLE_IDLE_DELETED: Duration = Duration::from_secs(5);

pub struct Options {
    pub duration: Duration,
    pub seed: u64,
    pub worker_exe: PathBuf,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        duration: Duration::from_secs(90),
        seed: u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_micros()
                % 1_000_000,
        )?,
        worker_exe: PathBuf::from(WORKER_EXE),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().context(format!("{arg} needs a value"));
        match arg.as_str() {
            "--duration" => o.duration = Duration::from_secs(value()?.parse()?),
            "--seed" => o.seed = value()?.parse()?,
            "--worker-exe" => o.worker_exe = PathBuf::from(value()?),
            // `cargo bench` passes `--bench`.
            "--bench" => {}
            other => bail!("unknown option {other}"),
        }
    }
    Ok(o)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("chaos: {e:#}");
            return ExitCode::from(2);
        }
    };
    let registry = Registry::default();
    let outcome = soak(&o, &registry).await;
    let _ = registry.delete_all(&rig::node_url(2)).await;
    match outcome {
        Ok(report) => {
            println!("{}", report.text);
            if report.failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("chaos: the soak could not run: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The soak's pseudo-random choices, from the seed (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// An index below `n`.
    pub fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).unwrap_or(0)
    }
    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
    /// `items` in an order of this generator's choosing (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.index(i + 1));
        }
    }
}

pub fn lock(history: &Mutex<History>) -> std::sync::MutexGuard<'_, History> {
    history
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn soak(o: &Options, registry: &Registry) -> anyhow::Result<check::Report> {
    let names = Names::new()
        .with_partitions(rig::PARTITIONS)
        .with_accounts(&rig::ACCOUNTS.map(|a| a.id));
    registry.register(&names);
    let history = Arc::new(Mutex::new(History::default()));
    let mut rig = rig::Rig::start(o, &names, history.clone()).await?;
    let events = feed::watch_events(&names, history.clone()).await?;
    rig.fleet.wait_for_intake(&names).await?;
    println!(
        "chaos: seed {}, {} s, {} replicas, logs in {}",
        o.seed,
        o.duration.as_secs(),
        rig::REPLICAS,
        rig.dir.display()
    );
    let (stop_feed, stopping) = watch::channel(false);
    let feeding = tokio::spawn(feed::feed(
        names.clone(),
        history.clone(),
        stopping,
        Rng::new(o.seed ^ 0xb0b5_b0b5_b0b5_b0b5),
    ));

    let mut rng = Rng::new(o.seed);
    let mut deck = Vec::new();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut dealt = 0usize;
    // For the duration, and until every kind has hit once.
    while started.elapsed() < o.duration || dealt < faults::Fault::ALL.len() {
        if feeding.is_finished() {
            break;
        }
        if deck.is_empty() {
            deck = faults::Fault::ALL.to_vec();
            rng.shuffle(&mut deck);
        }
        let fault = deck.pop().context("a fault")?;
        dealt += 1;
        let at = Instant::now();
        let (name, detail) = rig.apply(fault, &mut rng).await?;
        let line = format!("  {:7.1} s  {name}: {detail}", (at - started).as_secs_f64());
        println!("{line}");
        {
            let mut h = lock(&history);
            *h.faults.entry(name).or_default() += 1;
            h.log.push(feed::FaultRecord {
                start: at,
                end: Instant::now(),
                name,
                line,
            });
        }
        tokio::time::sleep(rng.millis(GAP.0, GAP.1)).await;
    }
    stop_feed.send_replace(true);
    feeding.await.context("the feed")?.context("the feed")?;
    let fed_for = started.elapsed();
    println!(
        "chaos: feed stopped after {:.0} s; waiting for every command to end",
        fed_for.as_secs_f64()
    );
    settle(&history).await;
    rig.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    if let Ok(channel) = events.create_channel().await {
        let queue = format!("{}.chaos-events", names.prefix);
        let _ = channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    let _ = events.close(200, "done".into()).await;
    let requests = rig.sim.requests();
    rig.sim.shutdown().await;
    let h = lock(&history);
    let mut report = check::check(o, &h, &requests, started, started.elapsed());
    if report.failed {
        for id in &report.suspects {
            report.text.push_str(&what_the_logs_say(&rig.dir, id));
        }
    }
    Ok(report)
}

/// The replicas' log lines that name `id` (at most 40, each cut at 400 characters), for a
/// report that must be read where the logs are gone (a CI run).
fn what_the_logs_say(dir: &std::path::Path, id: &str) -> String {
    let mut out = format!("  the logs on {id}:\n");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    let mut shown = 0;
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        for line in text.lines().filter(|l| l.contains(id)) {
            if shown == 40 {
                return out;
            }
            let cut: String = line.chars().take(400).collect();
            out.push_str(&format!("    {}: {cut}\n", name.as_deref().unwrap_or("?")));
            shown += 1;
        }
    }
    out
}

/// Waits until every command has ended, or nothing has ended for a while (the rest are lost,
/// or in a queue the operator deleted), or [`SETTLE`] has passed.
async fn settle(history: &Mutex<History>) {
    let until = Instant::now() + SETTLE;
    let mut last = (usize::MAX, Instant::now());
    loop {
        let (open, deletable) = {
            let h = lock(history);
            let open: Vec<&String> = h
                .commands
                .keys()
                .filter(|id| !h.ended.contains_key(*id))
                .collect();
            let deletable = check::may_be_deleted(&h, &open);
            (open.len(), deletable)
        };
        if open != last.0 {
            last = (open, Instant::now());
        }
        let idle = last.1.elapsed();
        if open == 0
            || Instant::now() > until
            || idle > SETTLE_IDLE
            || (deletable && idle > SETTLE_IDLE_DELETED)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
