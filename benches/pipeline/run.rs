//! One measured run: start the processes, wait until they consume, publish the commands,
//! collect the events, read what `/proc` and the simulator say, stop everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::amqp::{self, Names, Patience, Registry, Tally};
use crate::fleet::{self, KeyRegistry, RedisMetrics};
use crate::procs::{self, ChildGuard, ProcSample};

/// The bench's own bot (`run` refuses the example bot of `config/default.toml`), with pacing
/// that never binds; the floor calls the API as this bot too.
pub(crate) const STREAM_ID: &str = "st-00000000-0000-4000-8000-0000000be9c4";
pub(crate) const ACCOUNT_ID: &str = "bench-account";
pub(crate) const CLIENT_ID: &str = "cs-00000000-0000-4000-8000-0000000be9c4";
pub(crate) const CLIENT_SECRET: &str = "bench-client-secret-bench-client-secret";
/// The bench's own relay secret: `run` refuses the shipped one.
const CALLBACK_SECRET: &str = "bench-callback-secret-bench-callback-secret";
/// `retry.max_attempts` of the defaults: a `transfer.failed` after transient errors must have
/// used all of them.
pub const MAX_ATTEMPTS: u64 = 8;
/// Scenario (e)'s sessions: as many calls in flight, every other command waits for its own
/// session's turn.
const WAITING_SESSIONS: usize = 10;
/// Longest wait for a child to start consuming (generous for `--wrap valgrind`).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for one HTTP answer from the simulator or the admin endpoint.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the worker's `commands_in_flight` gauge is read during a run.
const GAUGE_PERIOD: Duration = Duration::from_millis(200);

/// How the worker runs: alone or in fleet mode, with how many partitions and replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Shares its state through Redis (`[fleet] redis_url`).
    pub fleet: bool,
    /// `fleet.partitions` written into the config; `None`: the key as shipped.
    pub partitions: Option<u16>,
    /// `transfer-worker run` processes, each with its own config and admin port.
    pub replicas: usize,
}

impl Mode {
    /// One worker without Redis.
    pub const SINGLE: Self = Self {
        fleet: false,
        partitions: None,
        replicas: 1,
    };

    /// `replicas` workers in fleet mode, with `partitions` (`None`: as shipped).
    pub const fn fleet(partitions: Option<u16>, replicas: usize) -> Self {
        Self {
            fleet: true,
            partitions,
            replicas,
        }
    }

    /// The partition queues the workers use (`fleet.partitions` of `config/default.toml` when
    /// the config leaves the key out).
    pub fn partition_count(&self) -> u16 {
        match (self.fleet, self.partitions) {
            (false, _) => 0,
            (true, Some(p)) => p,
            (true, None) => fleet::SHIPPED_PARTITIONS,
        }
    }
}

/// Two ways of running the worker, measured one after the other in every run: the baseline
/// and the one compared with it, with their names in the table.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    /// Baseline, then compared.
    pub modes: [Mode; 2],
    /// Their names in the table.
    pub labels: [&'static str; 2],
}

/// One benchmark scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// `a`, `b`, `c`, `d`, `e`, `f`, `g` or `h`.
    pub key: char,
    /// What it shows.
    pub title: &'static str,
    /// Commands published.
    pub n: usize,
    /// `amqp.prefetch` of the worker (and the relay).
    pub prefetch: u16,
    /// Simulator latency.
    pub latency_ms: u64,
    /// Simulator 503 rate.
    pub fail_rate: f64,
    /// Also measure the broker-only relay with the same N and prefetch.
    pub relay: bool,
    /// Also measure the floor (the minimal API-calling worker) with the same N and prefetch.
    pub floor: bool,
    /// (f), (g), (h): two modes per run; otherwise the worker alone, single-process.
    pub pair: Option<Pair>,
    /// Sessions the commands share, round robin; `None`: one session each.
    pub sessions: Option<usize>,
}

impl Scenario {
    /// The scenario's defaults.
    pub fn new(key: char) -> Option<Self> {
        let (title, n, prefetch, latency_ms, fail_rate, relay) = match key {
            'a' => ("API answers at once", 20_000, 256, 0, 0.0, true),
            'b' => ("API latency 200 ms", 5_000, 256, 200, 0.0, false),
            'c' => (
                "10 000 in flight (latency 2 s)",
                10_000,
                10_000,
                2_000,
                0.0,
                false,
            ),
            'd' => ("20 % transient 503s", 5_000, 256, 0, 0.2, false),
            'e' => (
                "10 000 waiting for their session (10 sessions, latency 20 ms)",
                10_000,
                10_000,
                20,
                0.0,
                false,
            ),
            'f' => (
                "API answers at once, fleet mode vs single-process",
                20_000,
                256,
                0,
                0.0,
                false,
            ),
            'g' => (
                "API answers at once, one replica in fleet mode: 16 partitions vs none",
                20_000,
                256,
                0,
                0.0,
                false,
            ),
            // Prefetch 64: three replicas' ceiling (960/s) stays within what the bench's two
            // cores carry besides RabbitMQ, Redis and the simulator, so the replicas, not the
            // machine, set the pace.
            'h' => (
                "API latency 200 ms, fleet mode with 16 partitions: 3 replicas vs 1",
                6_000,
                64,
                200,
                0.0,
                false,
            ),
            _ => return None,
        };
        let pair = match key {
            'f' => Some(Pair {
                modes: [Mode::SINGLE, Mode::fleet(None, 1)],
                labels: ["single-process", "fleet mode"],
            }),
            'g' => Some(Pair {
                modes: [Mode::fleet(Some(0), 1), Mode::fleet(Some(16), 1)],
                labels: ["no partitions", "16 partitions"],
            }),
            'h' => Some(Pair {
                modes: [Mode::fleet(Some(16), 1), Mode::fleet(Some(16), 3)],
                labels: ["1 replica", "3 replicas"],
            }),
            _ => None,
        };
        Some(Self {
            key,
            title,
            n,
            prefetch,
            latency_ms,
            fail_rate,
            relay,
            floor: matches!(key, 'a' | 'b' | 'c'),
            pair,
            sessions: (key == 'e').then_some(WAITING_SESSIONS),
        })
    }

    /// Whether this first event is what the scenario allows: success, or in (d) a failure
    /// after the whole retry budget.
    pub fn expected(&self, seen: &amqp::Seen) -> bool {
        match seen.event.as_str() {
            "transfer.succeeded" => true,
            "transfer.failed" if self.fail_rate > 0.0 => {
                seen.retryable == Some(true) && seen.attempts == Some(MAX_ATTEMPTS)
            }
            _ => false,
        }
    }
}

/// What every run shares.
pub struct Ctx {
    /// Broker URL.
    pub url: String,
    /// The release `transfer-worker` binary.
    pub worker_exe: PathBuf,
    /// This bench binary, re-executed as the relay and as the floor.
    pub self_exe: PathBuf,
    /// Configs and child logs go here.
    pub log_dir: PathBuf,
    /// Unconfirmed publishes allowed.
    pub window: usize,
    /// How long to wait for events.
    pub patience: Patience,
    /// Prefix for the worker's command line (e.g. valgrind), empty for none.
    pub wrap: Vec<String>,
    /// Names to delete from the broker.
    pub registry: Registry,
    /// Redis of the fleet-mode runs.
    pub redis_url: String,
    /// Key prefixes to delete from Redis.
    pub redis_keys: KeyRegistry,
}

/// The raw results of one run of the worker, the relay or the floor.
#[derive(Debug)]
pub struct Measured {
    /// Commands published.
    pub n: usize,
    /// First publish to the last command's first event.
    pub elapsed: Duration,
    /// Publish → first event, microseconds.
    pub latency_us: Histogram<u64>,
    /// Process CPU and memory just before publishing.
    pub idle: ProcSample,
    /// ... and once the events are in.
    pub end: ProcSample,
    /// First event per command, by event name.
    pub events: BTreeMap<String, u64>,
    /// Commands without an event.
    pub missing: usize,
    /// Events beyond the first per command.
    pub duplicates: u64,
    /// Events of no command of this run.
    pub foreign: u64,
    /// First events the scenario does not allow.
    pub unexpected: u64,
    /// Sum of `attempts` over first events.
    pub attempts: u64,
    /// Why collection stopped early, if it did.
    pub stopped: Option<String>,
    /// Messages left in the commands queue after the run.
    pub left_in_queue: Option<u32>,
    /// Highest `transfer_commands_in_flight` seen (worker only).
    pub peak_in_flight: Option<f64>,
    /// RabbitMQ's CPU over the same interval, when its `beam.smp` was found.
    pub broker_cpu_s: Option<f64>,
    /// Redis's CPU over the same interval, in fleet mode when its `redis-server` was found.
    pub redis_cpu_s: Option<f64>,
    /// This bench process's CPU over the same interval (publishing and consuming).
    pub bench_cpu_s: f64,
    /// The floor's runs: the simulator's CPU over the same interval.
    pub sim_cpu_s: Option<f64>,
    /// The floor's runs: the calls the simulator counted (`/simulator/stats`).
    pub api_calls: Option<u64>,
}

/// A worker run: [`Measured`] plus what only the worker has.
#[derive(Debug)]
pub struct WorkerRun {
    /// The common measurements.
    pub measured: Measured,
    /// The simulator's `/simulator/stats`.
    pub api: Value,
    /// Simulator CPU over the run.
    pub sim_cpu_s: f64,
    /// Messages in the dead-letter queue after the run.
    pub dead_lettered: Option<u32>,
    /// The worker exited 0 on SIGTERM within the grace period.
    pub clean_exit: bool,
    /// Lines the worker logged at warn level or above, and the first few of them.
    pub log_lines: usize,
    /// The first few of them.
    pub log_excerpt: Vec<String>,
    /// Where its log is.
    pub log_path: PathBuf,
    /// In fleet mode: what the worker says about Redis, and the keys left there.
    pub redis: Option<RedisRun>,
    /// The mode it ran in.
    pub mode: Mode,
    /// With partitions: `transfer_fleet_partitions_owned` of each replica when publishing
    /// started (the bench waits until they are balanced).
    pub partitions_owned: Vec<f64>,
    /// Growth of `transfer_fleet_routed_total` over the run, all replicas together.
    pub routed: Option<f64>,
}

/// The Redis side of one fleet-mode run.
#[derive(Debug)]
pub struct RedisRun {
    /// Growth of the worker's Redis series from just before publishing to the last event.
    pub metrics: RedisMetrics,
    /// Keys under the fleet's prefix once the worker stopped (deleted by the bench then).
    pub keys_left: Option<u64>,
}

/// Runs the simulator and `mode.replicas` workers for one run of `scenario`; in fleet mode
/// the workers share their state through Redis (`[fleet] redis_url`), and with partitions the
/// bench publishes only once every replica owns its share of them. CPU and memory are the
/// replicas' together.
pub async fn run_worker(ctx: &Ctx, scenario: &Scenario, mode: Mode) -> anyhow::Result<WorkerRun> {
    let names = Names::new().with_partitions(mode.partition_count());
    ctx.registry.register(&names);
    // Every key of the fleet starts with its name, the commands queue, and a colon.
    let key_prefix = format!("{}:", names.commands);
    if mode.fleet {
        fleet::ping(&ctx.redis_url).await?;
        ctx.redis_keys.register(&key_prefix);
    }
    let sim_port = procs::free_port()?;
    let mut configs = Vec::with_capacity(mode.replicas);
    let mut metrics_urls = Vec::with_capacity(mode.replicas);
    for r in 0..mode.replicas.max(1) {
        let admin_port = procs::free_port()?;
        let file = match r {
            0 => format!("{}.toml", names.prefix),
            r => format!("{}.r{r}.toml", names.prefix),
        };
        let config = ctx.log_dir.join(file);
        let text = worker_config(ctx, scenario, &names, sim_port, admin_port, mode, r);
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        configs.push(config);
        metrics_urls.push(format!("http://127.0.0.1:{admin_port}/metrics"));
    }

    let (mut sim, sim_url, http) =
        start_simulator(ctx, scenario, &names, &configs[0], sim_port).await?;

    let mut workers = Vec::with_capacity(configs.len());
    let mut worker_logs = Vec::with_capacity(configs.len());
    for (r, config) in configs.iter().enumerate() {
        let log = match r {
            0 => format!("{}.worker.log", names.prefix),
            r => format!("{}.worker-r{r}.log", names.prefix),
        };
        let log = ctx.log_dir.join(log);
        workers.push(ChildGuard::spawn(
            "worker",
            worker_command(ctx, config),
            &log,
        )?);
        worker_logs.push(log);
    }
    let connections = Connections::open(&ctx.url).await?;
    amqp::wait_for_consumer(
        &connections.consume,
        &names.commands,
        &mut workers[0],
        READY_TIMEOUT,
    )
    .await?;
    let partitions_owned = match names.partitions {
        0 => Vec::new(),
        p => wait_balanced(&http, &metrics_urls, &mut workers, p).await?,
    };

    let before = match mode.fleet {
        true => Some(fleet_metrics(&http, &metrics_urls).await?),
        false => None,
    };
    let pids: Vec<u32> = workers.iter().map(ChildGuard::pid).collect();
    let sim_before = procs::sample(sim.pid())?;
    let gauge = GaugeSampler::start(http.clone(), metrics_urls.clone());
    let mut measured = measure(ctx, scenario, &names, &connections, &pids, mode.fleet).await?;
    measured.peak_in_flight = gauge.stop().await;
    let growth = match before {
        Some((redis, routed)) => {
            let (redis_after, routed_after) = fleet_metrics(&http, &metrics_urls).await?;
            Some((redis_after.since(&redis), routed_after - routed))
        }
        None => None,
    };
    for worker in &mut workers {
        if let Err(e) = worker.check_alive() {
            let note = measured.stopped.take().unwrap_or_default();
            let sep = if note.is_empty() { "" } else { "; " };
            measured.stopped = Some(format!("{note}{sep}{e:#}"));
        }
    }
    let sim_cpu_s = procs::sample(sim.pid())?.cpu_s - sim_before.cpu_s;
    let api = get_json(&http, &format!("{sim_url}/simulator/stats")).await?;
    let dead_lettered = amqp::queue_state(&connections.consume, &names.dead_queue)
        .await?
        .map(|(messages, _)| messages);
    connections.close().await;

    // All at once, as a fleet is stopped: no replica takes over another's partitions.
    let stops = workers.iter_mut().map(ChildGuard::stop);
    let clean_exit = futures_util::future::join_all(stops)
        .await
        .iter()
        .all(|s| s.is_some_and(|s| s.success()));
    sim.stop().await;
    let (redis, routed) = match growth {
        Some((metrics, routed)) => {
            let keys_left = fleet::delete_prefix(&ctx.redis_url, &key_prefix).await;
            if keys_left.is_ok() {
                ctx.redis_keys.forget(&key_prefix);
            }
            let redis = RedisRun {
                metrics,
                keys_left: keys_left.ok(),
            };
            (Some(redis), Some(routed))
        }
        None => (None, None),
    };
    let (log_lines, log_excerpt) = log_summary(&worker_logs);
    Ok(WorkerRun {
        measured,
        api,
        sim_cpu_s,
        dead_lettered,
        clean_exit,
        log_lines,
        log_excerpt,
        log_path: worker_logs.swap_remove(0),
        redis,
        mode,
        partitions_owned,
        routed,
    })
}

/// Polls every replica's `/metrics` until each sees all `replicas` members and owns its share
/// of the `partitions` (⌊P/N⌋ or ⌈P/N⌉, together P), twice in a row half a second apart, so a
/// rebalance in progress is not taken for the end state. Returns what each owns.
async fn wait_balanced(
    http: &reqwest::Client,
    urls: &[String],
    workers: &mut [ChildGuard],
    partitions: u16,
) -> anyhow::Result<Vec<f64>> {
    let started = Instant::now();
    let replicas = urls.len().max(1) as f64;
    let (low, high) = (
        (f64::from(partitions) / replicas).floor(),
        (f64::from(partitions) / replicas).ceil(),
    );
    let mut stable = 0;
    let mut last = Vec::new();
    loop {
        for worker in workers.iter_mut() {
            worker.check_alive()?;
        }
        let mut owned = Vec::with_capacity(urls.len());
        let mut members = Vec::with_capacity(urls.len());
        for url in urls {
            let text = get_text(http, url).await.unwrap_or_default();
            owned.push(metric(&text, "transfer_fleet_partitions_owned"));
            members.push(metric(&text, "transfer_fleet_members"));
        }
        let balanced = members.iter().all(|m| *m == Some(replicas))
            && owned
                .iter()
                .all(|o| o.is_some_and(|o| o >= low && o <= high))
            && owned.iter().flatten().sum::<f64>() == f64::from(partitions);
        let owned: Vec<f64> = owned.into_iter().map(|o| o.unwrap_or(f64::NAN)).collect();
        stable = if balanced && owned == last {
            stable + 1
        } else {
            0
        };
        if balanced && stable >= 1 {
            return Ok(owned);
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "the {partitions} partitions were not balanced over {replicas} replicas within \
                 {READY_TIMEOUT:?} (owned: {owned:?}, members seen: {members:?})"
            );
        }
        last = owned;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One unlabelled series of the Prometheus text exposition (`name value`).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Runs the broker-only relay for one run of `scenario`.
pub async fn run_relay(ctx: &Ctx, scenario: &Scenario) -> anyhow::Result<Measured> {
    let names = Names::new();
    ctx.registry.register(&names);
    let connections = Connections::open(&ctx.url).await?;
    amqp::declare_relay_topology(&connections.publish, &names).await?;
    let mut relay = start_child(ctx, scenario, &names, &connections, "relay", &[]).await?;
    let pids = [relay.pid()];
    let measured = measure(ctx, scenario, &names, &connections, &pids, false).await?;
    connections.close().await;
    relay.stop().await;
    Ok(measured)
}

/// Runs the floor (the minimal API-calling worker, this binary with `--floor-child`) against
/// the simulator for one run of `scenario`.
pub async fn run_floor(ctx: &Ctx, scenario: &Scenario) -> anyhow::Result<Measured> {
    let names = Names::new();
    ctx.registry.register(&names);
    let connections = Connections::open(&ctx.url).await?;
    amqp::declare_relay_topology(&connections.publish, &names).await?;
    // The simulator reads the bot from a worker's config; the floor itself reads none.
    let sim_port = procs::free_port()?;
    let config = ctx.log_dir.join(format!("{}.toml", names.prefix));
    let text = worker_config(ctx, scenario, &names, sim_port, 0, Mode::SINGLE, 0);
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    let (mut sim, sim_url, http) =
        start_simulator(ctx, scenario, &names, &config, sim_port).await?;
    let mut floor = start_child(ctx, scenario, &names, &connections, "floor", &[&sim_url]).await?;
    let pids = [floor.pid()];
    let sim_before = procs::sample(sim.pid())?;
    let mut measured = measure(ctx, scenario, &names, &connections, &pids, false).await?;
    measured.sim_cpu_s = Some(procs::sample(sim.pid())?.cpu_s - sim_before.cpu_s);
    let api = get_json(&http, &format!("{sim_url}/simulator/stats")).await?;
    measured.api_calls = api["calls"].as_u64();
    if let Err(e) = floor.check_alive() {
        let note = measured.stopped.take().unwrap_or_default();
        let sep = if note.is_empty() { "" } else { "; " };
        measured.stopped = Some(format!("{note}{sep}{e:#}"));
    }
    connections.close().await;
    floor.stop().await;
    sim.stop().await;
    Ok(measured)
}

/// Starts this binary as `role` (`--relay-child` or `--floor-child`) on the run's queues, with
/// `extra` arguments after the prefetch, and waits until it consumes the commands queue.
async fn start_child(
    ctx: &Ctx,
    scenario: &Scenario,
    names: &Names,
    connections: &Connections,
    role: &'static str,
    extra: &[&str],
) -> anyhow::Result<ChildGuard> {
    let log = ctx.log_dir.join(format!("{}.{role}.log", names.prefix));
    let mut command = Command::new(&ctx.self_exe);
    command
        .arg(format!("--{role}-child"))
        .args([&names.commands, &names.results])
        .arg(scenario.prefetch.to_string())
        .args(extra)
        .env("BENCH_AMQP_URL", &ctx.url);
    let mut child = ChildGuard::spawn(role, command, &log)?;
    amqp::wait_for_consumer(
        &connections.consume,
        &names.commands,
        &mut child,
        READY_TIMEOUT,
    )
    .await?;
    Ok(child)
}

/// Starts the simulator on `port` with the bot of `config`; its base URL and a client for it,
/// once it answers.
async fn start_simulator(
    ctx: &Ctx,
    scenario: &Scenario,
    names: &Names,
    config: &Path,
    port: u16,
) -> anyhow::Result<(ChildGuard, String, reqwest::Client)> {
    let log = ctx.log_dir.join(format!("{}.simulator.log", names.prefix));
    let command = simulator_command(ctx, scenario, config, port);
    let mut sim = ChildGuard::spawn("simulator", command, &log)?;
    let url = format!("http://127.0.0.1:{port}");
    let http = http_client()?;
    wait_http_ok(&http, &format!("{url}/healthz"), &mut sim).await?;
    Ok((sim, url, http))
}

/// The bench's two connections: one publishes commands, the other reads events and queues.
struct Connections {
    publish: lapin::Connection,
    consume: lapin::Connection,
}

impl Connections {
    async fn open(url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            publish: amqp::connect(url, "transfer-worker bench publisher").await?,
            consume: amqp::connect(url, "transfer-worker bench consumer").await?,
        })
    }

    async fn close(self) {
        for connection in [self.publish, self.consume] {
            let _ = amqp::timed("connection.close", connection.close(200, "done".into())).await;
        }
    }
}

/// Binds the sink, samples the processes, publishes while collecting, samples again. With
/// `fleet`, Redis's CPU is sampled too.
async fn measure(
    ctx: &Ctx,
    scenario: &Scenario,
    names: &Names,
    connections: &Connections,
    pids: &[u32],
    fleet: bool,
) -> anyhow::Result<Measured> {
    let bodies: Vec<Vec<u8>> = (0..scenario.n)
        .map(|i| command_body(&names.prefix, i, scenario.sessions))
        .collect();
    let (_sink_channel, consumer) = amqp::bind_sink(&connections.consume, &names.results).await?;
    let broker = procs::find_by_name("beam.smp");
    let broker_before = broker.and_then(|b| procs::sample(b).ok());
    let redis = fleet.then(|| procs::find_by_name("redis-server")).flatten();
    let redis_before = redis.and_then(|r| procs::sample(r).ok());
    let bench_before = procs::own_cpu_s();
    let idle = procs::sample_all(pids)?;
    let prefix = names.prefix.clone();
    let (n, patience) = (scenario.n, ctx.patience);
    let collector =
        tokio::spawn(async move { amqp::collect(consumer, &prefix, n, patience).await });
    let published =
        amqp::publish_all(&connections.publish, &names.commands, &bodies, ctx.window).await;
    let published = match published {
        Ok(started) => started,
        Err(e) => {
            collector.abort();
            return Err(e.context("publishing the commands failed"));
        }
    };
    let tally = collector.await.context("the event collector panicked")?;
    let end = procs::sample_all(pids)?;
    let bench_cpu_s = procs::own_cpu_s() - bench_before;
    let broker_cpu_s = broker
        .and_then(|b| procs::sample(b).ok())
        .zip(broker_before)
        .map(|(after, before)| after.cpu_s - before.cpu_s);
    let redis_cpu_s = redis
        .and_then(|r| procs::sample(r).ok())
        .zip(redis_before)
        .map(|(after, before)| after.cpu_s - before.cpu_s);
    let mut left_in_queue = amqp::queue_state(&connections.consume, &names.commands)
        .await?
        .map(|(messages, _)| messages);
    for queue in names.partition_queues() {
        if let Some((messages, _)) = amqp::queue_state(&connections.consume, &queue).await? {
            left_in_queue = Some(left_in_queue.unwrap_or(0).saturating_add(messages));
        }
    }
    let mut measured = summarize(scenario, &published, tally, idle, end, left_in_queue);
    measured.broker_cpu_s = broker_cpu_s;
    measured.redis_cpu_s = redis_cpu_s;
    measured.bench_cpu_s = bench_cpu_s;
    Ok(measured)
}

fn summarize(
    scenario: &Scenario,
    published: &[Instant],
    tally: Tally,
    idle: ProcSample,
    end: ProcSample,
    left_in_queue: Option<u32>,
) -> Measured {
    let first = published.first().copied().unwrap_or_else(Instant::now);
    let last = tally.last_new_at.unwrap_or(first);
    let mut latency_us = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
    for (sent, arrived) in published.iter().zip(&tally.arrivals) {
        if let Some(arrived) = arrived {
            let us = arrived.saturating_duration_since(*sent).as_micros();
            latency_us.saturating_record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
        }
    }
    let mut events = BTreeMap::new();
    let (mut unexpected, mut attempts) = (0, 0);
    for seen in tally.seen.iter().flatten() {
        *events.entry(seen.event.clone()).or_insert(0) += 1;
        attempts += seen.attempts.unwrap_or(0);
        if !scenario.expected(seen) {
            unexpected += 1;
        }
    }
    let duplicates = tally
        .counts
        .iter()
        .map(|&c| u64::from(c.saturating_sub(1)))
        .sum();
    Measured {
        n: scenario.n,
        elapsed: last.saturating_duration_since(first),
        latency_us,
        idle,
        end,
        events,
        missing: scenario.n - tally.unique,
        duplicates,
        foreign: tally.foreign,
        unexpected,
        attempts,
        stopped: tally.stopped,
        left_in_queue,
        peak_in_flight: None,
        broker_cpu_s: None,
        redis_cpu_s: None,
        bench_cpu_s: 0.0,
        sim_cpu_s: None,
        api_calls: None,
    }
}

/// Command `i` of a run: even ones are agent transfers, odd ones queue transfers, with the
/// commandId `<prefix>-<i>` and a 24-hex `botSessionId`: its own, or with `sessions`, the
/// `i mod sessions`-th of the run's.
fn command_body(prefix: &str, i: usize, sessions: Option<usize>) -> Vec<u8> {
    let own = uuid::Uuid::new_v4().simple().to_string();
    let shared = sessions.map(|s| format!("{:0>16}{:08x}", prefix_hex(prefix), i % s.max(1)));
    let session = shared.as_deref().unwrap_or(&own[..24]);
    let mut body = json!({
        "commandId": format!("{prefix}-{i}"),
        "streamId": STREAM_ID,
        "orgId": "o-3c5e7a9b-1d2f-4a6b-8c0d-2e4f6a8b0c1d",
        "botSessionId": session,
    });
    if i.is_multiple_of(2) {
        body["aId"] = json!("a-5f2e8c1d-7b3a-4e6f-9d0c-1a2b3c4d5e6f");
    } else {
        body["transferredType"] = json!("QUEUE");
        body["queueId"] = json!("qu-9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d");
    }
    serde_json::to_vec(&body).expect("JSON values serialize")
}

/// The run's 8 hex digits (`bench-<8 hex>`), so sessions of one run are not another's.
fn prefix_hex(prefix: &str) -> &str {
    prefix.rsplit('-').next().unwrap_or(prefix)
}

/// The `--config` of replica `replica` (and of the simulator): this run's names, the one bot,
/// quiet listeners, and in fleet mode the Redis the fleet shares, `fleet.partitions` when the
/// mode sets it and a name per replica when there are several (the other `[fleet]` keys as
/// shipped).
fn worker_config(
    ctx: &Ctx,
    scenario: &Scenario,
    names: &Names,
    sim_port: u16,
    admin_port: u16,
    mode: Mode,
    replica: usize,
) -> String {
    let q = |s: &str| Value::String(s.to_owned()).to_string();
    let mut fleet = String::new();
    if mode.fleet {
        fleet = format!("\n[fleet]\nredis_url = {}\n", q(&ctx.redis_url));
        if let Some(p) = mode.partitions {
            fleet.push_str(&format!("partitions = {p}\n"));
        }
        if mode.replicas > 1 {
            let name = format!("{}-r{replica}", names.prefix);
            fleet.push_str(&format!("name = {}\n", q(&name)));
        }
    }
    format!(
        "[amqp]\nurl = {url}\ncommands_queue = {commands}\nresults_exchange = {results}\n\
         dead_letter_exchange = {dle}\ndead_letter_queue = {dlq}\nprefetch = {prefetch}\n\n\
         [agentassist]\nbase_url = \"http://127.0.0.1:{sim_port}\"\n\n\
         [[bots]]\nstream_id = {stream}\naccount_id = {account}\nclient_id = {client}\n\
         client_secret = {secret}\nrate_limit = 100000000\nrate_window = \"1s\"\n\n\
         [callbacks]\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:9/unused\"\n\
         secret = {callback_secret}\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{fleet}",
        url = q(&ctx.url),
        commands = q(&names.commands),
        results = q(&names.results),
        dle = q(&names.dead_letter),
        dlq = q(&names.dead_queue),
        prefetch = scenario.prefetch,
        stream = q(STREAM_ID),
        account = q(ACCOUNT_ID),
        client = q(CLIENT_ID),
        secret = q(CLIENT_SECRET),
        callback_secret = q(CALLBACK_SECRET),
    )
}

fn simulator_command(ctx: &Ctx, scenario: &Scenario, config: &Path, port: u16) -> Command {
    let mut command = procs::clean_command(&ctx.worker_exe);
    command.env("TRANSFER__LOG__LEVEL", "warn");
    command.args(["simulate", "--config"]).arg(config).args([
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--latency-ms".to_owned(),
        scenario.latency_ms.to_string(),
        "--fail-rate".to_owned(),
        scenario.fail_rate.to_string(),
        "--no-callbacks".to_owned(),
    ]);
    command
}

/// `transfer-worker run --config FILE`, behind `--wrap` when one is given.
fn worker_command(ctx: &Ctx, config: &Path) -> Command {
    let mut command = match ctx.wrap.split_first() {
        Some((wrapper, args)) => {
            let mut command = procs::clean_command(Path::new(wrapper));
            command.args(args).arg(&ctx.worker_exe);
            command
        }
        None => procs::clean_command(&ctx.worker_exe),
    };
    command.args(["run", "--config"]).arg(config);
    command
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .context("cannot build an HTTP client")
}

async fn wait_http_ok(
    http: &reqwest::Client,
    url: &str,
    child: &mut ChildGuard,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        child.check_alive()?;
        if let Ok(response) = http.get(url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!("{url} did not answer within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get_text(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let response = http
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    response.text().await.with_context(|| format!("GET {url}"))
}

async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let text = get_text(http, url).await?;
    serde_json::from_str(&text).with_context(|| format!("GET {url} did not return JSON"))
}

/// Reads the workers' `transfer_commands_in_flight` gauges periodically, keeping the highest
/// sum.
struct GaugeSampler {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Option<f64>>,
}

impl GaugeSampler {
    fn start(http: reqwest::Client, urls: Vec<String>) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut peak: Option<f64> = None;
            let mut tick = tokio::time::interval(GAUGE_PERIOD);
            loop {
                tokio::select! {
                    _ = &mut stopped => return peak,
                    _ = tick.tick() => {
                        let mut sum = None;
                        for url in &urls {
                            if let Some(v) = read_gauge(&http, url).await {
                                sum = Some(sum.unwrap_or(0.0) + v);
                            }
                        }
                        if let Some(v) = sum {
                            peak = Some(peak.map_or(v, |p| p.max(v)));
                        }
                    }
                }
            }
        });
        Self { stop, task }
    }

    async fn stop(self) -> Option<f64> {
        let _ = self.stop.send(());
        self.task.await.ok().flatten()
    }
}

/// The workers' Redis series and `transfer_fleet_routed_total` now, all replicas together.
async fn fleet_metrics(
    http: &reqwest::Client,
    urls: &[String],
) -> anyhow::Result<(RedisMetrics, f64)> {
    let mut redis = RedisMetrics::default();
    let mut routed = 0.0;
    for url in urls {
        let text = get_text(http, url).await?;
        redis.add(&RedisMetrics::parse(&text));
        routed += metric(&text, "transfer_fleet_routed_total").unwrap_or(0.0);
    }
    Ok((redis, routed))
}

async fn read_gauge(http: &reqwest::Client, url: &str) -> Option<f64> {
    let text = http.get(url).send().await.ok()?.text().await.ok()?;
    metric(&text, "transfer_commands_in_flight")
}

/// How many warnings and errors the workers logged, and the first five of them.
fn log_summary(paths: &[PathBuf]) -> (usize, Vec<String>) {
    let text: String = paths
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .collect();
    let excerpt = lines.iter().take(5).map(|l| (*l).to_owned()).collect();
    (lines.len(), excerpt)
}
