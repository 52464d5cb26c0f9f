//! Scenario (i), a noisy neighbour (the module doc of benches/fairness.rs): account A's backlog
//! at the vendor's limit while account B publishes a steady rate, with one worker or three
//! replicas; B's latency, A's calls against its budget, the workers' memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde_json::Value;

use crate::amqp::{self, Names, Registry};
use crate::procs::{self, ChildGuard};
use crate::{
    DEFAULT_REDIS, DEFAULT_URL, PARTITIONS, READY_TIMEOUT, WORKER_EXE, bot_entry, command, fleet,
    series, worker_config,
};

const NOISY: &str = "noisy";
const QUIET: &str = "quiet";
const NOISY_STREAM: &str = "st-00000000-0000-4000-8000-00000000000a";
const QUIET_STREAM: &str = "st-00000000-0000-4000-8000-00000000000b";

struct Options {
    replicas: Vec<usize>,
    backlog: usize,
    limit: u32,
    window: Duration,
    quiet_rate: u32,
    duration: Duration,
    prefetch: u16,
    worker_exe: PathBuf,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        replicas: Vec::new(),
        backlog: 10_000,
        limit: 60,
        window: Duration::from_secs(60),
        quiet_rate: 50,
        duration: Duration::from_secs(130),
        prefetch: 256,
        worker_exe: PathBuf::from(WORKER_EXE),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--replicas" => o.replicas.push(value()?.parse()?),
            "--backlog" => o.backlog = value()?.parse()?,
            "--limit" => o.limit = value()?.parse()?,
            "--window-secs" => o.window = Duration::from_secs(value()?.parse()?),
            "--quiet-rate" => o.quiet_rate = value()?.parse()?,
            "--duration" => o.duration = Duration::from_secs(value()?.parse()?),
            "--prefetch" => o.prefetch = value()?.parse()?,
            "--worker-exe" => o.worker_exe = PathBuf::from(value()?),
            // What cargo bench passes.
            "--bench" => {}
            other => bail!("unknown option {other}"),
        }
    }
    if o.replicas.is_empty() {
        o.replicas = vec![1, 3];
    }
    if o.replicas.iter().any(|r| !matches!(r, 1 | 3)) {
        bail!("--replicas is 1 or 3");
    }
    Ok(o)
}

/// What one run measured.
struct Outcome {
    replicas: usize,
    quiet_published: usize,
    quiet_ended: usize,
    quiet_latency_ms: Histogram<u64>,
    noisy_budget: Option<BudgetUse>,
    noisy_ended: usize,
    peak_rss_mib: f64,
    noisy_waiting: f64,
    oldest_wait_s: f64,
}

/// Runs scenario (i) with `args` (the command line without `--scenario`).
pub(crate) async fn main(args: &[String]) -> ExitCode {
    let options = match parse(args) {
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
    let mut outcomes = Vec::new();
    let mut code = ExitCode::SUCCESS;
    for &replicas in &options.replicas {
        let run = tokio::select! {
            r = run(&options, &url, &redis, replicas, &registry, &keys) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        let _ = registry.delete_all(&url).await;
        let _ = keys.delete_all(&redis).await;
        match run {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => {
                eprintln!("scenario (i) with {replicas} replica(s) failed: {e:#}");
                code = ExitCode::from(2);
                break;
            }
        }
    }
    report(&options, &outcomes);
    code
}

fn config(
    o: &Options,
    url: &str,
    names: &Names,
    sim: u16,
    admin: u16,
    fleet: Option<(&str, usize)>,
) -> String {
    let bots = format!(
        "{}{}",
        bot_entry(NOISY_STREAM, NOISY, o.limit, o.window),
        bot_entry(QUIET_STREAM, QUIET, 100_000_000, Duration::from_secs(1)),
    );
    worker_config(url, names, o.prefetch, sim, admin, &bots, fleet)
}

async fn run(
    o: &Options,
    url: &str,
    redis: &str,
    replicas: usize,
    registry: &Registry,
    keys: &fleet::KeyRegistry,
) -> anyhow::Result<Outcome> {
    let fleet_mode = replicas > 1;
    let names = Names::new()
        .with_partitions(if fleet_mode { PARTITIONS } else { 0 })
        .with_accounts(&[NOISY, QUIET]);
    registry.register(&names);
    if fleet_mode {
        fleet::ping(redis).await?;
        keys.register(&format!("{}:", names.commands));
    }
    let logs = procs::bench_dir("logs");
    let sim_port = procs::free_port()?;
    let mut admin_urls = Vec::new();
    let mut configs = Vec::new();
    for r in 0..replicas {
        let admin = procs::free_port()?;
        let path = logs.join(format!("{}.r{r}.toml", names.prefix));
        let fleet = fleet_mode.then_some((redis, r));
        std::fs::write(&path, config(o, url, &names, sim_port, admin, fleet))?;
        configs.push(path);
        admin_urls.push(format!("http://127.0.0.1:{admin}/metrics"));
    }
    // The simulator is this build's, whatever worker is measured.
    let mut sim_cmd = procs::clean_command(Path::new(WORKER_EXE));
    sim_cmd
        .env("TRANSFER__LOG__LEVEL", "warn")
        .args(["simulate", "--config"])
        .arg(&configs[0])
        .args([
            "--listen",
            &format!("127.0.0.1:{sim_port}"),
            "--latency-ms",
            "100",
            "--no-callbacks",
        ]);
    let mut sim = ChildGuard::spawn(
        "simulator",
        sim_cmd,
        &logs.join(format!("{}.sim.log", names.prefix)),
    )?;
    let mut workers = Vec::new();
    for (r, path) in configs.iter().enumerate() {
        let mut cmd = procs::clean_command(&o.worker_exe);
        cmd.args(["run", "--config"]).arg(path);
        let log = logs.join(format!("{}.worker-r{r}.log", names.prefix));
        workers.push(ChildGuard::spawn("worker", cmd, &log)?);
    }
    let connection = amqp::connect(url, "transfer-worker bench (i)").await?;
    amqp::wait_for_consumer(&connection, &names.commands, &mut workers[0], READY_TIMEOUT).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    if fleet_mode {
        // Until every replica owns its share of the partitions.
        let until = Instant::now() + READY_TIMEOUT;
        loop {
            let mut owned = 0.0;
            for u in &admin_urls {
                owned += series(&http, u, "transfer_fleet_partitions_owned", "").await;
            }
            if owned >= f64::from(PARTITIONS) {
                tokio::time::sleep(Duration::from_secs(2)).await;
                break;
            }
            if Instant::now() > until {
                bail!("the partitions were not taken within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let (_sink_channel, mut sink) = amqp::bind_sink(&connection, &names.results).await?;

    // A's backlog, all at once.
    let bodies: Vec<Vec<u8>> = (0..o.backlog)
        .map(|i| {
            command(
                NOISY_STREAM,
                &format!("{}-a-{i}", names.prefix),
                &format!("a-{i}"),
            )
        })
        .collect();
    let published = Instant::now();
    amqp::publish_all(&connection, &names.commands, &bodies, 1000).await?;
    eprintln!(
        "({replicas} replica(s)) {} commands of account A published in {:.1?}",
        o.backlog,
        published.elapsed()
    );

    // Events: B's latency, A's count.
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let quiet_latency = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let counts = Arc::new(Mutex::new((0usize, 0usize)));
    let collector = {
        let (sent, quiet_latency, counts) = (sent.clone(), quiet_latency.clone(), counts.clone());
        let prefix = names.prefix.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = sink.next().await {
                let event: Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
                let id = event["commandId"].as_str().unwrap_or_default();
                if !id.starts_with(&prefix) {
                    continue;
                }
                if let Some(at) = sent.lock().unwrap().remove(id) {
                    let ms = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
                    let _ = quiet_latency.lock().unwrap().record(ms.max(1));
                    counts.lock().unwrap().1 += 1;
                } else {
                    counts.lock().unwrap().0 += 1;
                }
            }
        })
    };

    // The workers' RSS, every second.
    let started = Instant::now();
    let sampler = {
        let pids: Vec<u32> = workers.iter().map(ChildGuard::pid).collect();
        let total = o.duration;
        tokio::spawn(async move {
            let mut peak_kib = 0u64;
            let mut every = tokio::time::interval(Duration::from_secs(1));
            while started.elapsed() <= total + Duration::from_secs(2) {
                every.tick().await;
                let rss: u64 = pids
                    .iter()
                    .filter_map(|p| procs::sample(*p).ok())
                    .map(|s| s.rss_kib)
                    .sum();
                peak_kib = peak_kib.max(rss);
            }
            peak_kib
        })
    };

    // B: a steady rate, each publish confirmed on its own channel.
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut quiet_published = 0usize;
    if o.quiet_rate > 0 {
        let mut every = tokio::time::interval(Duration::from_secs(1) / o.quiet_rate);
        while started.elapsed() < o.duration {
            every.tick().await;
            let id = format!("{}-b-{quiet_published}", names.prefix);
            let body = command(QUIET_STREAM, &id, &format!("b-{quiet_published}"));
            sent.lock().unwrap().insert(id, Instant::now());
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
            quiet_published += 1;
        }
    } else {
        tokio::time::sleep(o.duration).await;
    }
    // The last of B's commands get a few seconds to end.
    let until = Instant::now() + Duration::from_secs(10);
    while !sent.lock().unwrap().is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak_kib = sampler.await?;
    let arrivals = http
        .get(format!("http://127.0.0.1:{sim_port}/simulator/arrivals"))
        .send()
        .await?
        .text()
        .await?;
    let arrivals: HashMap<String, Vec<u64>> =
        serde_json::from_str(&arrivals).context("the simulator's arrivals")?;
    let noisy_calls = arrivals.get(NOISY).cloned().unwrap_or_default();
    let mut noisy_waiting = 0.0;
    let mut oldest = 0.0f64;
    for u in &admin_urls {
        noisy_waiting += series(&http, u, "transfer_account_waiting", NOISY).await;
        oldest = oldest.max(series(&http, u, "transfer_account_oldest_wait_seconds", NOISY).await);
    }
    collector.abort();
    for w in &mut workers {
        w.stop().await;
    }
    sim.stop().await;
    let _ = connection.close(200, "done".into()).await;
    let (noisy_ended, quiet_ended) = *counts.lock().unwrap();
    let latency = quiet_latency.lock().unwrap().clone();
    Ok(Outcome {
        replicas,
        quiet_published,
        quiet_ended,
        quiet_latency_ms: latency,
        noisy_budget: budget_use(&noisy_calls, o.limit, o.window),
        noisy_ended,
        peak_rss_mib: peak_kib as f64 / 1024.0,
        noisy_waiting,
        oldest_wait_s: oldest,
    })
}

/// A's calls against its budget, from their arrivals (ms since the first call the simulator
/// saw): the least and the most calls in the whole windows that follow one another from the
/// first call, and the shortest and longest time from call n to call n + limit (never under the
/// window: never over the budget; not much over it: no budget lost while a backlog waits).
fn budget_use(calls: &[u64], limit: u32, window: Duration) -> Option<BudgetUse> {
    let w = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
    let first = *calls.first()?;
    let last = *calls.last()?;
    let whole = (last - first) / w;
    let per_window: Vec<usize> = (0..whole)
        .map(|k| {
            let (from, to) = (first + k * w, first + (k + 1) * w);
            calls.iter().filter(|&&t| t >= from && t < to).count()
        })
        .collect();
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let gaps: Vec<u64> = calls
        .iter()
        .zip(calls.iter().skip(limit))
        .map(|(a, b)| b - a)
        .collect();
    Some(BudgetUse {
        windows: (
            per_window.iter().copied().min()?,
            per_window.iter().copied().max()?,
        ),
        gaps_ms: (gaps.iter().copied().min()?, gaps.iter().copied().max()?),
    })
}

/// What [`budget_use`] found.
struct BudgetUse {
    windows: (usize, usize),
    gaps_ms: (u64, u64),
}

fn report(o: &Options, outcomes: &[Outcome]) {
    println!(
        "\n(i) noisy neighbour: A has {} waiting at {} per {:?}; B publishes {} a second for {:?}; API 100 ms",
        o.backlog, o.limit, o.window, o.quiet_rate, o.duration
    );
    println!(
        "{:<9} {:>8} {:>8} {:>8} {:>10} {:>12} {:>16} {:>7} {:>9} {:>9} {:>10}",
        "replicas",
        "B p50 ms",
        "B p99 ms",
        "B max ms",
        "B ended",
        "A per window",
        "A n->n+limit s",
        "A ended",
        "peak MiB",
        "A waiting",
        "oldest s"
    );
    for r in outcomes {
        let h = &r.quiet_latency_ms;
        let (per_window, gaps) = r.noisy_budget.as_ref().map_or_else(
            || ("-".to_owned(), "-".to_owned()),
            |b| {
                let s = |ms: u64| ms as f64 / 1000.0;
                (
                    format!("{}..{}", b.windows.0, b.windows.1),
                    format!("{:.3}..{:.3}", s(b.gaps_ms.0), s(b.gaps_ms.1)),
                )
            },
        );
        println!(
            "{:<9} {:>8} {:>8} {:>8} {:>10} {:>12} {:>16} {:>7} {:>9.1} {:>9.0} {:>10.0}",
            r.replicas,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max(),
            format!("{}/{}", r.quiet_ended, r.quiet_published),
            per_window,
            gaps,
            r.noisy_ended,
            r.peak_rss_mib,
            r.noisy_waiting,
            r.oldest_wait_s,
        );
    }
}
