//! The chaos soak (docs/contract.md §9): three `transfer-worker run` replicas in fleet mode on
//! the local 3-node RabbitMQ cluster (`scripts/rabbitmq-cluster up`), a private Redis and the
//! project's simulator, fed steady sessions of two accounts (one paced at 20 calls per 5 s),
//! while random faults hit one after another:
//!
//! - a replica killed (SIGKILL) and started again 1–3 s later, or stopped (SIGTERM) and started
//!   again at once (a rolling deploy's step);
//! - broker node 1 or 3 stopped, or killed, and started again; the network to node 1 stalled
//!   (everything the node sends held back) through a proxy;
//! - Redis killed and started again, empty;
//! - the API down (503) or slow (2 s a call).
//!
//! Node 2 carries this program's own connections (the feed and the events), so faults there
//! would measure the soak rather than the worker.
//!
//! When the time is up the feed stops, every command is given time to end, and the whole
//! history is checked, from the simulator's log and the events:
//!
//! - **lost**: commands published (confirmed) with no terminal event;
//! - **transferred twice**: commands accepted by the API more than once, less those whose call
//!   was on the wire when a replica was killed, or answered within the second before (its
//!   outcome perhaps not recorded yet): the contract allows those, *in doubt*. Redis killed
//!   comes back empty (no persistence), forgetting claims and the budget: calls again,
//!   overlaps and windows over the limit across such a restart are counted apart, as what a
//!   Redis without persistence costs;
//! - **reordered**: sessions whose commands were first called out of publish order;
//! - **overlapping**: sessions with a call arriving before the previous one was answered;
//! - **pacing**: windows of 5 s holding more than 20 calls of the paced account.
//!
//! It prints a report and exits 1 when any check fails (2 when the soak itself could not run).
//!
//! ```text
//! scripts/rabbitmq-cluster up
//! cargo bench --bench chaos -- --duration 90 --seed 7
//! cargo bench --bench chaos -- --duration 1800
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

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use transfer_worker::tools::simulator::{RecordedRequest, SimBot, Simulator, SimulatorConfig};

use amqp::{Names, Registry};
use procs::ChildGuard;

const WORKER_EXE: &str = env!("CARGO_BIN_EXE_transfer-worker");
const REPLICAS: usize = 3;
const PARTITIONS: u16 = 8;
const CLIENT_ID: &str = "cs-00000000-0000-4000-8000-0000000000c1";
const CLIENT_SECRET: &str = "chaos-secret-chaos-secret-chaos-secret";
/// The paced account: 20 calls per 5 s.
const PACED: (&str, &str, u32, Duration) = (
    "paced",
    "st-00000000-0000-4000-8000-0000000000c1",
    20,
    Duration::from_secs(5),
);
const FREE: (&str, &str) = ("free", "st-00000000-0000-4000-8000-0000000000c2");
const LATENCY: Duration = Duration::from_millis(50);
const SLOW: Duration = Duration::from_secs(2);
/// Sessions of each account, and commands a second for each account.
const PACED_SESSIONS: usize = 8;
const FREE_SESSIONS: usize = 32;
const PACED_RATE: f64 = 2.0;
const FREE_RATE: f64 = 20.0;
/// How long after its answer a killed replica may not have recorded a call's outcome yet.
const UNRECORDED: Duration = Duration::from_secs(1);
/// Arrival jitter allowed when checking the pacing windows.
const PACING_SLACK: Duration = Duration::from_millis(50);

struct Options {
    duration: Duration,
    seed: u64,
    worker_exe: PathBuf,
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
    let _ = registry.delete_all(&node_url(2)).await;
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

fn node_url(n: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5680 + n)
}

fn cluster(args: &[&str]) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-cluster");
    let out = Command::new(script).args(args).output()?;
    if !out.status.success() {
        bail!(
            "scripts/rabbitmq-cluster {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A TCP proxy in front of a broker node that can stall: hold back what the node sends.
async fn stalling_proxy(upstream: u16, held: watch::Receiver<bool>) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let held = held.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                let mut held = held;
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 || held.wait_for(|h| !*h).await.is_err() {
                        break;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    Ok(port)
}

fn config(names: &Names, urls: &[String], sim: u16, admin: u16, redis: u16, r: usize) -> String {
    let q = |s: &str| Value::String(s.to_owned()).to_string();
    let bot = |account: &str, stream: &str, limit: u32, window: Duration| {
        format!(
            "[[bots]]\nstream_id = {}\naccount_id = {}\nclient_id = {}\nclient_secret = {}\n\
             rate_limit = {limit}\nrate_window = \"{}s\"\n\n",
            q(stream),
            q(account),
            q(CLIENT_ID),
            q(CLIENT_SECRET),
            window.as_secs(),
        )
    };
    // 1 s AMQP heartbeats: the broker drops a frozen replica's connection within 3 s, so
    // membership may end 250 ms + 3 × 1 s after the last heartbeat (docs/configuration.md,
    // fleet timings), where the worker's 3 s would ask for over 9 s.
    let urls: Vec<String> = urls
        .iter()
        .map(|u| q(&format!("{u}?heartbeat=1")))
        .collect();
    format!(
        "[amqp]\nurls = [{}]\ncommands_queue = {}\nresults_exchange = {}\n\
         dead_letter_exchange = {}\ndead_letter_queue = {}\nprefetch = 32\n\
         reconnect_initial_delay = \"100ms\"\nreconnect_max_delay = \"1s\"\n\n\
         [agentassist]\nbase_url = \"http://127.0.0.1:{sim}\"\nrequest_timeout = \"5s\"\n\n\
         {}{}[callbacks]\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:9/unused\"\n\
         secret = \"chaos-callback-secret-chaos-callback\"\n\n\
         [retry]\ninitial_delay = \"100ms\"\nmax_delay = \"1s\"\n\n\
         [breaker]\nopen_after = \"3s\"\nprobe_interval = \"500ms\"\n\n\
         [shutdown]\ngrace = \"5s\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [fleet]\nredis_url = \"redis://127.0.0.1:{redis}/0\"\npartitions = {PARTITIONS}\n\
         name = {}\nheartbeat = \"250ms\"\nmember_ttl = \"3250ms\"\nlease = \"3s\"\n",
        urls.join(", "),
        q(&names.commands),
        q(&names.results),
        q(&names.dead_letter),
        q(&names.dead_queue),
        bot(PACED.0, PACED.1, PACED.2, PACED.3),
        bot(FREE.0, FREE.1, 100_000, Duration::from_secs(1)),
        q(&format!("{}-r{r}", names.prefix)),
    )
}

/// A private `redis-server`, killed (SIGKILL) when dropped.
fn redis(port: u16, log: &Path) -> anyhow::Result<tokio::process::Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let child = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start redis-server")?;
    Ok(child)
}

/// One command as published.
#[derive(Clone)]
struct Published {
    id: String,
    session: String,
}

/// What the soak saw.
#[derive(Default)]
struct History {
    /// Per session, the commands in publish order (confirmed).
    sessions: BTreeMap<String, Vec<String>>,
    published: usize,
    /// Terminal event names by command.
    ended: HashMap<String, Vec<String>>,
    /// When replicas were killed (SIGKILL).
    kills: Vec<Instant>,
    /// When Redis was down: killed, until started again (empty).
    redis_down: Vec<(Instant, Instant)>,
    /// Faults applied, for the report.
    faults: BTreeMap<&'static str, u32>,
}

fn command(p: &Published, stream: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "commandId": p.id,
        "streamId": stream,
        "botSessionId": p.session,
        "orgId": "o-chaos",
        "aId": format!("a-{}", p.id),
    }))
    .unwrap_or_default()
}

/// Publishes steady sessions to node 2 until `stop`, recording what was confirmed.
async fn feed(
    names: Names,
    history: Arc<Mutex<History>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let connection = amqp::connect(&node_url(2), "chaos feed").await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let (mut paced_due, mut free_due) = (0.0f64, 0.0f64);
    let mut n = 0u64;
    let started = Instant::now();
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let t = started.elapsed().as_secs_f64();
        let mut batch = Vec::new();
        while paced_due <= t * PACED_RATE {
            let s = (paced_due as usize) % PACED_SESSIONS;
            batch.push((PACED.1, format!("{}-paced-{s:02}", names.prefix)));
            paced_due += 1.0;
        }
        while free_due <= t * FREE_RATE {
            let s = (free_due as usize) % FREE_SESSIONS;
            batch.push((FREE.1, format!("{}-free-{s:02}", names.prefix)));
            free_due += 1.0;
        }
        for (stream, session) in batch {
            n += 1;
            let p = Published {
                id: format!("{}-c{n:06}", names.prefix),
                session,
            };
            let confirm = channel
                .basic_publish(
                    "".into(),
                    names.commands.as_str().into(),
                    BasicPublishOptions::default(),
                    &command(&p, stream),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            let confirmed = tokio::time::timeout(Duration::from_secs(30), confirm)
                .await
                .context("a publish was not confirmed in 30 s")??;
            if !confirmed.is_ack() {
                bail!("the broker refused command {}", p.id);
            }
            let mut h = history
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            h.sessions.entry(p.session.clone()).or_default().push(p.id);
            h.published += 1;
        }
    }
    let _ = connection.close(200, "fed".into()).await;
    Ok(())
}

/// Records every terminal event, from a quorum queue on node 2 bound to the results.
async fn watch_events(names: &Names, history: Arc<Mutex<History>>) -> anyhow::Result<Connection> {
    let connection = amqp::connect(&node_url(2), "chaos events").await?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            names.results.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let queue = format!("{}.chaos-events", names.prefix);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            names.results.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "chaos".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            if let Ok(event) = serde_json::from_slice::<Value>(&delivery.data) {
                let name = event["event"].as_str().unwrap_or_default().to_owned();
                let id = event["commandId"].as_str().unwrap_or_default().to_owned();
                if name != "transfer.callback" && !id.is_empty() {
                    let mut h = history
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    h.ended.entry(id).or_default().push(name);
                }
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
    });
    Ok(connection)
}

/// The fleet under test.
struct Fleet {
    configs: Vec<PathBuf>,
    replicas: Vec<Option<ChildGuard>>,
    starts: Vec<u32>,
    exe: PathBuf,
    prefix: String,
}

impl Fleet {
    fn start(&mut self, r: usize) -> anyhow::Result<()> {
        self.starts[r] += 1;
        let mut cmd = procs::clean_command(&self.exe);
        cmd.env("TRANSFER__LOG__LEVEL", "info")
            .args(["run", "--config"])
            .arg(&self.configs[r]);
        let log =
            procs::bench_dir("chaos").join(format!("{}.r{r}.{}.log", self.prefix, self.starts[r]));
        self.replicas[r] = Some(ChildGuard::spawn("worker", cmd, &log)?);
        Ok(())
    }
}

/// The soak's pseudo-random choices, from the seed (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}

struct Report {
    text: String,
    failed: bool,
}

async fn soak(o: &Options, registry: &Registry) -> anyhow::Result<Report> {
    for n in 1..=3 {
        amqp::connect(&node_url(n), "chaos check")
            .await
            .with_context(|| format!("node {n} of the local cluster does not answer; start it with scripts/rabbitmq-cluster up"))?
            .close(200, "checked".into())
            .await?;
    }
    let names = Names::new()
        .with_partitions(PARTITIONS)
        .with_accounts(&[PACED.0, FREE.0]);
    registry.register(&names);
    let dir = procs::bench_dir("chaos");
    let redis_port = procs::free_port()?;
    let redis_log = dir.join(format!("{}.redis.log", names.prefix));
    let mut redis_server = Some(redis(redis_port, &redis_log)?);
    let secret = || secrecy::SecretString::from(CLIENT_SECRET.to_owned());
    let sim = Simulator::start(SimulatorConfig {
        listen: "127.0.0.1:0".parse()?,
        bots: vec![
            SimBot {
                stream_id: PACED.1.into(),
                account_id: PACED.0.into(),
                client_id: CLIENT_ID.into(),
                client_secret: secret(),
            },
            SimBot {
                stream_id: FREE.1.into(),
                account_id: FREE.0.into(),
                client_id: CLIENT_ID.into(),
                client_secret: secret(),
            },
        ],
        latency: LATENCY,
        callbacks: false,
        ..SimulatorConfig::default()
    })
    .await?;
    let (stall, stalled) = watch::channel(false);
    let proxy = stalling_proxy(5681, stalled).await?;
    let urls = vec![
        format!("amqp://guest:guest@127.0.0.1:{proxy}/%2f"),
        node_url(2),
        node_url(3),
    ];
    let mut fleet = Fleet {
        configs: Vec::new(),
        replicas: (0..REPLICAS).map(|_| None).collect(),
        starts: vec![0; REPLICAS],
        exe: o.worker_exe.clone(),
        prefix: names.prefix.clone(),
    };
    for r in 0..REPLICAS {
        let path = dir.join(format!("{}.r{r}.toml", names.prefix));
        let admin = procs::free_port()?;
        std::fs::write(
            &path,
            config(&names, &urls, sim.addr().port(), admin, redis_port, r),
        )?;
        fleet.configs.push(path);
    }
    for r in 0..REPLICAS {
        fleet.start(r)?;
    }
    let history = Arc::new(Mutex::new(History::default()));
    let events = watch_events(&names, history.clone()).await?;
    let probe = amqp::connect(&node_url(2), "chaos readiness").await?;
    if let Some(first) = fleet.replicas[0].as_mut() {
        amqp::wait_for_consumer(&probe, &names.commands, first, Duration::from_secs(60)).await?;
    }
    let _ = probe.close(200, "ready".into()).await;
    println!(
        "chaos: seed {}, {} s, 3 replicas, logs in {}",
        o.seed,
        o.duration.as_secs(),
        dir.display()
    );
    let (stop_feed, stopping) = watch::channel(false);
    let feeding = tokio::spawn(feed(names.clone(), history.clone(), stopping));

    let mut rng = Rng(o.seed);
    let started = Instant::now();
    let mut log = String::new();
    tokio::time::sleep(Duration::from_secs(3)).await;
    while started.elapsed() < o.duration {
        if feeding.is_finished() {
            break;
        }
        let at = started.elapsed().as_secs_f64();
        let kind = rng.below(9);
        let (name, detail): (&'static str, String) = match kind {
            0 | 1 => {
                let r = usize::try_from(rng.below(REPLICAS as u64))?;
                let down = rng.millis(1000, 3000);
                history.lock().unwrap().kills.push(Instant::now());
                fleet.replicas[r] = None;
                tokio::time::sleep(down).await;
                fleet.start(r)?;
                ("replica killed", format!("r{r}, back after {down:?}"))
            }
            2 | 3 => {
                let r = usize::try_from(rng.below(REPLICAS as u64))?;
                if let Some(mut replica) = fleet.replicas[r].take() {
                    replica.stop().await;
                }
                fleet.start(r)?;
                ("replica restarted (SIGTERM)", format!("r{r}"))
            }
            4 => {
                let n = if rng.below(2) == 0 { "1" } else { "3" };
                let how = if rng.below(2) == 0 {
                    "stop-node"
                } else {
                    "kill-node"
                };
                cluster(&[how, n])?;
                tokio::time::sleep(rng.millis(2000, 5000)).await;
                cluster(&["start-node", n])?;
                (
                    if how == "stop-node" {
                        "broker node stopped"
                    } else {
                        "broker node killed"
                    },
                    format!("node {n}"),
                )
            }
            5 => {
                drop(redis_server.take());
                let killed = Instant::now();
                let down = rng.millis(1000, 4000);
                tokio::time::sleep(down).await;
                redis_server = Some(redis(redis_port, &redis_log)?);
                history
                    .lock()
                    .unwrap()
                    .redis_down
                    .push((killed, Instant::now()));
                ("Redis killed", format!("back after {down:?}, empty"))
            }
            6 => {
                let down = rng.millis(2000, 6000);
                sim.start_outage(503);
                tokio::time::sleep(down).await;
                sim.end_outage();
                ("API down", format!("503 for {down:?}"))
            }
            7 => {
                let slow = rng.millis(3000, 6000);
                sim.set_latency(PACED.1, SLOW);
                sim.set_latency(FREE.1, SLOW);
                tokio::time::sleep(slow).await;
                sim.set_latency(PACED.1, LATENCY);
                sim.set_latency(FREE.1, LATENCY);
                ("API slow", format!("{SLOW:?} a call for {slow:?}"))
            }
            _ => {
                let stalled = rng.millis(2000, 6000);
                stall.send_replace(true);
                tokio::time::sleep(stalled).await;
                stall.send_replace(false);
                ("network to node 1 stalled", format!("for {stalled:?}"))
            }
        };
        *history.lock().unwrap().faults.entry(name).or_default() += 1;
        let _ = writeln!(log, "  {at:7.1} s  {name}: {detail}");
        tokio::time::sleep(rng.millis(2000, 5000)).await;
    }
    stop_feed.send_replace(true);
    feeding.await.context("the feed")?.context("the feed")?;

    // Every command gets time to end.
    let until = Instant::now() + Duration::from_secs(180);
    loop {
        let left = {
            let h = history.lock().unwrap();
            h.sessions
                .values()
                .flatten()
                .filter(|id| !h.ended.contains_key(*id))
                .count()
        };
        if left == 0 || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for replica in fleet.replicas.iter_mut().flatten() {
        replica.stop().await;
    }
    drop(redis_server);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = events.close(200, "done".into()).await;
    let requests = sim.requests();
    sim.shutdown().await;
    let h = history.lock().unwrap();
    Ok(check(o, &h, &requests, &log, started.elapsed()))
}

fn check(
    o: &Options,
    h: &History,
    requests: &[RecordedRequest],
    faults: &str,
    took: Duration,
) -> Report {
    let mut by_command: HashMap<&str, Vec<&RecordedRequest>> = HashMap::new();
    for r in requests {
        if let Some(id) = r.body["aId"].as_str().and_then(|a| a.strip_prefix("a-")) {
            by_command.entry(id).or_default().push(r);
        }
    }
    let on_the_wire_at = |r: &RecordedRequest, k: Instant| {
        r.received_at <= k && r.answered_at.is_none_or(|a| a >= k)
    };
    // On the wire when its replica was killed, or answered so shortly before that the
    // replica may not have recorded the outcome yet.
    let in_flight_at_a_kill = |r: &RecordedRequest| {
        h.kills.iter().any(|&k| {
            on_the_wire_at(r, k)
                || r.received_at <= k && r.answered_at.is_some_and(|a| a + UNRECORDED >= k)
        })
    };
    // Redis restarted empty forgets claims: a call made before it was back and not answered
    // (and recorded) before it went down is in doubt, as at a replica's kill.
    let in_doubt_at_redis = |r: &RecordedRequest| {
        h.redis_down.iter().any(|&(down, up)| {
            r.received_at <= up && r.answered_at.is_none_or(|a| a + UNRECORDED >= down)
        })
    };
    // Lost, twice.
    let lost: Vec<&String> = h
        .sessions
        .values()
        .flatten()
        .filter(|id| !h.ended.contains_key(*id))
        .collect();
    let (mut twice, mut in_doubt, mut in_doubt_redis) = (Vec::new(), 0usize, 0usize);
    for (id, calls) in &by_command {
        let accepted: Vec<&&RecordedRequest> = calls
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect();
        if accepted.len() > 1 {
            if calls.iter().any(|r| in_flight_at_a_kill(r)) {
                in_doubt += 1;
            } else if calls.iter().any(|r| in_doubt_at_redis(r)) {
                in_doubt_redis += 1;
            } else {
                twice.push(*id);
            }
        }
    }
    // Reordered, overlapping (per session, from every call of its commands).
    let (mut reordered, mut overlapping, mut overlap_at_redis) = (Vec::new(), Vec::new(), 0usize);
    for (session, ids) in &h.sessions {
        let mut calls: Vec<&RecordedRequest> = ids
            .iter()
            .filter_map(|id| by_command.get(id.as_str()))
            .flatten()
            .copied()
            .collect();
        calls.sort_by_key(|r| r.seq);
        let mut first: Vec<&str> = Vec::new();
        for r in &calls {
            let id = r.body["aId"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches("a-");
            if !first.contains(&id) {
                first.push(id);
            }
        }
        let wanted: Vec<&str> = ids
            .iter()
            .map(String::as_str)
            .filter(|id| first.contains(id))
            .collect();
        if first != wanted {
            let origin = calls.first().map(|r| r.received_at);
            let detail: Vec<String> = calls
                .iter()
                .map(|r| {
                    format!(
                        "{}:{}@{}",
                        r.body["aId"]
                            .as_str()
                            .unwrap_or_default()
                            .rsplit('c')
                            .next()
                            .unwrap_or_default(),
                        r.status,
                        origin.map_or(0, |o| (r.received_at - o).as_millis())
                    )
                })
                .collect();
            reordered.push(format!("{session} {detail:?}"));
        }
        for w in calls.windows(2) {
            if w[0].answered_at.is_none_or(|a| w[1].received_at < a) {
                if in_flight_at_a_kill(w[0]) || in_flight_at_a_kill(w[1]) {
                    continue;
                }
                if in_doubt_at_redis(w[0]) || in_doubt_at_redis(w[1]) {
                    overlap_at_redis += 1;
                    continue;
                }
                let id = |r: &RecordedRequest| {
                    r.body["aId"]
                        .as_str()
                        .unwrap_or_default()
                        .trim_start_matches("a-")
                        .to_owned()
                };
                overlapping.push(format!("{session}: {} while {}", id(w[1]), id(w[0])));
                break;
            }
        }
    }
    // Pacing: every window of the paced account's requests (probes included).
    let mut arrivals: Vec<Instant> = requests
        .iter()
        .filter(|r| r.account_id.as_deref() == Some(PACED.0))
        .map(|r| r.received_at)
        .collect();
    arrivals.sort();
    let limit = usize::try_from(PACED.2).unwrap_or(usize::MAX);
    // The shared budget is Redis's sliding log: a restart without persistence forgets it, so
    // a window reaching over a restart is counted apart.
    let (mut over, mut over_at_redis) = (0usize, 0usize);
    for w in arrivals.windows(limit + 1) {
        if w[limit] - w[0] + PACING_SLACK < PACED.3 {
            if h.redis_down
                .iter()
                .any(|&(_, up)| w[0] <= up + PACED.3 && up <= w[limit])
            {
                over_at_redis += 1;
            } else {
                over += 1;
            }
        }
    }
    let ended: usize = h.ended.len();
    let statuses = requests.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.status).or_insert(0u64) += 1;
        m
    });
    let failed_events = h
        .ended
        .values()
        .filter(|names| names.iter().any(|n| n != "transfer.succeeded"))
        .count();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "chaos soak: seed {}, {:.0} s ({} s of faults), 3 replicas, 3 broker nodes, Redis, the simulator",
        o.seed,
        took.as_secs_f64(),
        o.duration.as_secs()
    );
    let _ = writeln!(
        text,
        "  fed {} commands in {} sessions ({} paced at {} per {:?}); {} ended ({} not with \
         transfer.succeeded); {} API requests by status {:?}",
        h.published,
        h.sessions.len(),
        PACED_SESSIONS,
        PACED.2,
        PACED.3,
        ended,
        failed_events,
        requests.len(),
        statuses
    );
    let _ = writeln!(text, "  faults: {:?}", h.faults);
    text.push_str(faults);
    let verdicts = [
        (
            "lost",
            lost.len(),
            format!("{:?}", lost.iter().take(5).collect::<Vec<_>>()),
        ),
        (
            "transferred twice",
            twice.len(),
            format!("{:?}", twice.iter().take(5).collect::<Vec<_>>()),
        ),
        (
            "sessions reordered",
            reordered.len(),
            format!("{:?}", reordered.iter().take(5).collect::<Vec<_>>()),
        ),
        (
            "sessions overlapping",
            overlapping.len(),
            format!("{:?}", overlapping.iter().take(5).collect::<Vec<_>>()),
        ),
        ("pacing windows over the limit", over, String::new()),
    ];
    let mut failed = false;
    for (what, n, detail) in verdicts {
        failed |= n > 0;
        let _ = writeln!(
            text,
            "  {what}: {n} {}",
            if n > 0 { detail } else { String::new() }
        );
    }
    let _ = writeln!(
        text,
        "  in doubt, as the contract allows: {in_doubt} commands called again after a replica \
         was killed with the call on the wire\n  outside the contract, Redis restarted without \
         its data (claims and budgets forgotten): {in_doubt_redis} commands called again, \
         {overlap_at_redis} calls overlapping, {over_at_redis} windows over the limit"
    );
    let _ = writeln!(text, "  verdict: {}", if failed { "FAILED" } else { "ok" });
    Report { text, failed }
}
