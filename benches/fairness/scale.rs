//! Scenario scale (`--scenario scale`, the module doc of benches/fairness.rs): 1 000 accounts,
//! each its own bot at 5 calls per 3 s. 200 bursting accounts get 30 commands each at once and
//! 50 trickle accounts one every 2 s for `--duration` s, each command in a session of its own;
//! a fleet of three replicas (Redis, 16 partitions) whose third starts 5 s into the load; the API
//! answers in 100 ms. Printed next to their goals, never asserted: the account queues at the
//! broker (peak; 30 s after the last command ended: 0), RabbitMQ's peak RSS, the third replica's
//! take-up time (under 2 s) and account-queue looks, the trickle latency (p99 under 500 ms), the
//! commands ended (all), and the most calls of any account in any rate window as the simulator
//! saw them arrive (never over the limit). Run with `cargo bench --bench fairness -- --scenario
//! scale`; RabbitMQ is sampled in rabbit.rs, the events are tallied and reported in
//! scale_report.rs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection};
use serde_json::Value;

use crate::amqp::{self, Names, Registry};
use crate::procs::{self, ChildGuard};
use crate::rabbit::{StopOnDrop, account_queue_count, sample_broker, vhost};
use crate::scale_report::{Outcome, Tally, most_in_a_window, report};
use crate::{
    DEFAULT_REDIS, DEFAULT_URL, PARTITIONS, READY_TIMEOUT, WORKER_EXE, bot_entry, command, fleet,
    series, worker_config,
};

/// Each trickle account publishes one command this often.
pub(crate) const TRICKLE_EVERY: Duration = Duration::from_secs(2);
/// The third replica starts this long after the burst and the trickle.
pub(crate) const THIRD_AFTER: Duration = Duration::from_secs(5);
/// The partitions the third replica must own for its take-up to be done.
const THIRD_SHARE: f64 = 5.0;
/// How long the third replica gets to take up its share.
pub(crate) const TAKE_UP_LIMIT: Duration = Duration::from_secs(120);
/// How long the commands get to end once publishing stopped.
const END_LIMIT: Duration = Duration::from_secs(200);
/// The account queues are counted again this long after the last command ended.
pub(crate) const SETTLE: Duration = Duration::from_secs(30);

/// The command line of scenario scale.
pub(crate) struct Options {
    pub(crate) accounts: usize,
    pub(crate) bursting: usize,
    pub(crate) burst: usize,
    pub(crate) trickle: usize,
    pub(crate) limit: u32,
    pub(crate) window: Duration,
    pub(crate) duration: Duration,
    pub(crate) prefetch: u16,
    pub(crate) worker_exe: PathBuf,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        accounts: 1000,
        bursting: 200,
        burst: 30,
        trickle: 50,
        limit: 5,
        window: Duration::from_secs(3),
        duration: Duration::from_secs(60),
        prefetch: 256,
        worker_exe: PathBuf::from(WORKER_EXE),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--accounts" => o.accounts = value()?.parse()?,
            "--bursting" => o.bursting = value()?.parse()?,
            "--burst" => o.burst = value()?.parse()?,
            "--trickle" => o.trickle = value()?.parse()?,
            "--limit" => o.limit = value()?.parse()?,
            "--window-secs" => o.window = Duration::from_secs(value()?.parse()?),
            "--duration" => o.duration = Duration::from_secs(value()?.parse()?),
            "--prefetch" => o.prefetch = value()?.parse()?,
            "--worker-exe" => o.worker_exe = PathBuf::from(value()?),
            // What cargo bench passes.
            "--bench" => {}
            other => bail!("unknown option {other} of scenario scale"),
        }
    }
    if o.bursting + o.trickle > o.accounts {
        bail!("--bursting plus --trickle is more than --accounts");
    }
    if o.trickle == 0 || o.limit == 0 || o.window.is_zero() {
        bail!("--trickle, --limit and --window-secs are at least 1");
    }
    Ok(o)
}

fn account(i: usize) -> String {
    format!("acct-{i:04}")
}

fn stream(i: usize) -> String {
    format!("st-00000000-0000-4000-8000-{i:012x}")
}

/// Runs scenario scale with `args` (the command line without `--scenario`).
pub(crate) async fn main(args: &[String]) -> ExitCode {
    let o = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let url = std::env::var("TRANSFER__AMQP__URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let redis =
        std::env::var("TRANSFER__FLEET__REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS.to_owned());
    let registry = Registry::default();
    let keys = fleet::KeyRegistry::default();
    let run = tokio::select! {
        r = run(&o, &url, &redis, &registry, &keys) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    eprintln!("(scale) deleting the run's queues, exchanges and Redis keys");
    // A broker busy with thousands of queues may not take a connection at once.
    for attempt in 1..=5 {
        match registry.delete_all(&url).await {
            Ok(()) => break,
            Err(e) if attempt < 5 => {
                eprintln!("(scale) the broker's cleanup failed ({e:#}); trying again in 10 s");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Err(e) => eprintln!("(scale) the broker's cleanup failed: {e:#}"),
        }
    }
    if let Err(e) = keys.delete_all(&redis).await {
        eprintln!("(scale) the Redis cleanup failed: {e:#}");
    }
    match run {
        Ok(outcome) => {
            report(&o, &outcome);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("scenario scale failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(
    o: &Options,
    url: &str,
    redis: &str,
    registry: &Registry,
    keys: &fleet::KeyRegistry,
) -> anyhow::Result<Outcome> {
    // Only accounts with commands may get account queues: the cleanup looks for theirs.
    let active: Vec<String> = (0..o.bursting + o.trickle).map(account).collect();
    let active: Vec<&str> = active.iter().map(String::as_str).collect();
    let names = Names::new()
        .with_partitions(PARTITIONS)
        .with_accounts(&active);
    registry.register(&names);
    fleet::ping(redis).await?;
    keys.register(&format!("{}:", names.commands));
    let logs = procs::bench_dir("logs");
    eprintln!("(scale) run {}, logs in {}", names.prefix, logs.display());
    let sim_port = procs::free_port()?;
    let bots: String = (0..o.accounts)
        .map(|i| bot_entry(&stream(i), &account(i), o.limit, o.window))
        .collect();
    let (mut configs, mut admin_urls) = (Vec::new(), Vec::new());
    for r in 0..3 {
        let admin = procs::free_port()?;
        let path = logs.join(format!("{}.r{r}.toml", names.prefix));
        let fleet = Some((redis, r));
        let text = worker_config(url, &names, o.prefetch, sim_port, admin, &bots, fleet);
        std::fs::write(&path, text)?;
        configs.push(path);
        admin_urls.push(format!("http://127.0.0.1:{admin}/metrics"));
    }
    let mut sim_cmd = procs::clean_command(Path::new(WORKER_EXE));
    sim_cmd
        .env("TRANSFER__LOG__LEVEL", "warn")
        .args(["simulate", "--config"])
        .arg(&configs[0])
        .args(["--listen", &format!("127.0.0.1:{sim_port}")])
        .args(["--latency-ms", "100", "--no-callbacks"]);
    let sim_log = logs.join(format!("{}.sim.log", names.prefix));
    let mut sim = ChildGuard::spawn("simulator", sim_cmd, &sim_log)?;
    let mut workers = vec![
        spawn_worker(o, &configs[0], &logs, &names, 0)?,
        spawn_worker(o, &configs[1], &logs, &names, 1)?,
    ];
    let connection = amqp::connect(url, "transfer-worker bench (scale)").await?;
    amqp::wait_for_consumer(&connection, &names.commands, &mut workers[0], READY_TIMEOUT).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    // Until the first two replicas share the partitions.
    let until = Instant::now() + READY_TIMEOUT;
    loop {
        for w in &mut workers {
            w.check_alive()?;
        }
        let owned = owned(&http, &admin_urls[..2]).await;
        if owned.iter().sum::<f64>() >= f64::from(PARTITIONS) && owned.iter().all(|&n| n > 0.0) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            break;
        }
        if Instant::now() > until {
            bail!("two replicas did not share the partitions within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let (_sink_channel, mut sink) = amqp::bind_sink(&connection, &names.results).await?;
    let tally = Arc::new(Mutex::new(Tally::new()?));
    let collector = {
        let tally = tally.clone();
        let prefix = format!("{}-", names.prefix);
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = sink.next().await {
                let event = delivery.routing_key.as_str();
                let body: Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
                let id = body["commandId"].as_str().unwrap_or_default();
                if id.starts_with(&prefix) && event != "transfer.callback" {
                    tally.lock().unwrap().ended(id, event);
                }
            }
        })
    };
    let vhost = vhost(url);
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let sampler = tokio::spawn(sample_broker(
        names.prefix.clone(),
        vhost.clone(),
        stop.0.clone(),
    ));

    // The burst (round after round over the bursting accounts), the trickle, and the third
    // replica, all from the same moment.
    let burst: Vec<Vec<u8>> = (0..o.burst)
        .flat_map(|j| (0..o.bursting).map(move |a| (a, j)))
        .map(|(a, j)| {
            let id = format!("{}-b-{a}-{j}", names.prefix);
            command(&stream(a), &id, &format!("b-{a}-{j}"))
        })
        .collect();
    let started = Instant::now();
    let publish_burst = async {
        amqp::publish_all(&connection, &names.commands, &burst, 1000).await?;
        eprintln!(
            "(scale) {} burst commands published in {:.1?}",
            burst.len(),
            started.elapsed()
        );
        anyhow::Ok(())
    };
    let (_, trickle_published, third) = tokio::try_join!(
        publish_burst,
        trickle(&connection, &names, o, &tally, started),
        third(o, &configs[2], &logs, &names, &http, &admin_urls, started),
    )?;
    workers.push(third.guard);

    let total = burst.len() + trickle_published;
    let stopped = Instant::now();
    loop {
        let ended = tally.lock().unwrap().seen.len();
        if ended >= total || stopped.elapsed() > END_LIMIT {
            eprintln!("(scale) {ended} of {total} commands ended");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let last = tally.lock().unwrap().last.unwrap_or_else(Instant::now);
    tokio::time::sleep_until((last + SETTLE).into()).await;
    let queues_after = account_queue_count(&names.prefix, &vhost).await;
    drop(stop);
    let broker = sampler.await?;

    let arrivals = http
        .get(format!("http://127.0.0.1:{sim_port}/simulator/arrivals"))
        .send()
        .await?
        .text()
        .await?;
    let arrivals: BTreeMap<String, Vec<u64>> =
        serde_json::from_str(&arrivals).context("the simulator's arrivals")?;
    let looks_now = series(&http, &admin_urls[2], LOOKS, "").await;
    collector.abort();
    for w in &mut workers {
        w.stop().await;
    }
    sim.stop().await;
    let _ = connection.close(200, "done".into()).await;
    let tally = std::mem::replace(&mut *tally.lock().unwrap(), Tally::new()?);
    Ok(Outcome {
        broker,
        queues_after,
        take_up: third.after,
        third_owned: third.owned,
        looks: (third.looks, looks_now),
        burst: burst.len(),
        trickle_published,
        tally,
        most: most_in_a_window(&arrivals, o.window),
        calls: arrivals.values().map(Vec::len).sum(),
    })
}

const LOOKS: &str = "transfer_account_queue_looks_total";

fn spawn_worker(
    o: &Options,
    config: &Path,
    logs: &Path,
    names: &Names,
    r: usize,
) -> anyhow::Result<ChildGuard> {
    let mut cmd = procs::clean_command(&o.worker_exe);
    cmd.args(["run", "--config"]).arg(config);
    let log = logs.join(format!("{}.worker-r{r}.log", names.prefix));
    ChildGuard::spawn(&format!("replica {r}"), cmd, &log)
}

/// `transfer_fleet_partitions_owned` of each replica (0 while one does not answer).
async fn owned(http: &reqwest::Client, admin_urls: &[String]) -> Vec<f64> {
    let mut owned = Vec::with_capacity(admin_urls.len());
    for u in admin_urls {
        owned.push(series(http, u, "transfer_fleet_partitions_owned", "").await);
    }
    owned
}

/// The trickle: one command every [`TRICKLE_EVERY`] from each trickle account, in turn, each
/// publish confirmed before the next, until `o.duration` after `started`. Returns how many.
async fn trickle(
    connection: &Connection,
    names: &Names,
    o: &Options,
    tally: &Mutex<Tally>,
    started: Instant,
) -> anyhow::Result<usize> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut every = tokio::time::interval(TRICKLE_EVERY / u32::try_from(o.trickle)?);
    let mut published = 0usize;
    while started.elapsed() < o.duration {
        every.tick().await;
        let (a, k) = (o.bursting + published % o.trickle, published / o.trickle);
        let id = format!("{}-t-{a}-{k}", names.prefix);
        let body = command(&stream(a), &id, &format!("t-{a}-{k}"));
        tally.lock().unwrap().sent.insert(id, Instant::now());
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        channel
            .basic_publish(
                "".into(),
                names.commands.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?
            .await?;
        published += 1;
    }
    Ok(published)
}

/// The third replica and its take-up.
struct Third {
    guard: ChildGuard,
    /// From its process start until the three own every partition and it owns at least
    /// [`THIRD_SHARE`] of them; `None` when that took over [`TAKE_UP_LIMIT`].
    after: Option<Duration>,
    /// The partitions it owned then.
    owned: f64,
    /// Its `transfer_account_queue_looks_total` then.
    looks: f64,
}

/// Starts the third replica [`THIRD_AFTER`] after `started` and times its take-up.
async fn third(
    o: &Options,
    config: &Path,
    logs: &Path,
    names: &Names,
    http: &reqwest::Client,
    admin_urls: &[String],
    started: Instant,
) -> anyhow::Result<Third> {
    tokio::time::sleep_until((started + THIRD_AFTER).into()).await;
    let spawned = Instant::now();
    let mut guard = spawn_worker(o, config, logs, names, 2)?;
    loop {
        guard.check_alive()?;
        let owned = owned(http, admin_urls).await;
        let done = owned.iter().sum::<f64>() >= f64::from(PARTITIONS) && owned[2] >= THIRD_SHARE;
        if done || spawned.elapsed() > TAKE_UP_LIMIT {
            let after = done.then(|| spawned.elapsed());
            eprintln!("(scale) the third replica's take-up: {after:.2?}, owned {owned:?}");
            let looks = series(http, &admin_urls[2], LOOKS, "").await;
            let owned = owned[2];
            return Ok(Third {
                guard,
                after,
                owned,
                looks,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
