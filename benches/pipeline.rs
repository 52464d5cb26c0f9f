//! End-to-end benchmark of transfer-worker against the local RabbitMQ.
//!
//! It measures the real artifact: the release `transfer-worker run` binary and the
//! `transfer-worker simulate` stand-in API run as child processes, each run with its own
//! queues and exchanges (`bench-<8 hex>.commands`, `.results`, `.dead-letter`,
//! `.commands.dead`, deleted afterwards, also on error or Ctrl-C). The bench binds a private
//! queue to the results exchange, waits until the worker consumes, publishes N commands (half
//! agent, half queue transfers, one session each; persistent, confirmed, up to `--window`
//! unconfirmed) and collects one terminal event per command.
//!
//! Reported per scenario (median of `--runs` runs): throughput (commands/s, first publish to
//! last terminal event), publish → event latency p50/p90/p99/max, the worker's CPU time per
//! command (utime + stime from `/proc`), idle RSS (just before publishing) and peak RSS
//! (`VmHWM`), API calls (the simulator's `/simulator/stats`), and whether every command got
//! exactly one terminal event. As the machine's ceiling, scenario (a) also runs a broker-only
//! relay (this binary re-executed with `--relay-child`: consume → publish with confirm → ack,
//! no HTTP) and reports the worker relative to it.
//!
//! Scenarios (a), (b) and (c) also run the floor: the least any worker calling this API must do
//! (this binary re-executed with `--floor-child`, against its own simulator). Per delivery it
//! parses the command, makes one `assign-conversation` call with a JWT minted once at start
//! through one shared HTTP client, publishes one `transfer.succeeded` or `transfer.failed`
//! event with the API's answer, awaits its confirm and acks; one task per delivery, prefetch as
//! the worker's. No retries, pacing, sessions, outcome cache, metrics or logs. The worker is
//! reported against it: throughput (target ≥ 0.95 × floor), CPU per command (≤ 1.10 × floor),
//! peak RSS, and in (c) memory per in-flight command above the floor's (≤ 4 KiB). Each run
//! measures the relay, then the floor, then the worker.
//!
//! Scenarios: (a) API answers at once, 20 000 commands, prefetch 256, plus the relay and the
//! floor;
//! (b) API latency 200 ms, 5 000 commands, prefetch 256 (ceiling 1 280/s), plus the floor: what
//! the ceiling leaves to any worker that acks only after its event is confirmed;
//! (c) 10 000 in flight at once (prefetch 10 000, latency 2 s): memory per in-flight command,
//! plus the floor;
//! (d) 20 % transient 503s, 5 000 commands: every command succeeds or fails after its budget;
//! (e) 10 000 commands taken in at once (prefetch 10 000, latency 20 ms) in 10 sessions: 10
//! calls in flight, 9 990 commands waiting in memory for their session's turn; memory per
//! waiting command ((peak − idle) ÷ 9 990, the 10 calls in flight included, target ≤ 2 KiB);
//! (f) scenario (a) on one replica in fleet mode (`[fleet] redis_url`: pacing, claims and
//! outcomes shared through Redis, the other `[fleet]` keys as shipped) against the same
//! single-process, both in every run (the order alternating between runs), on fresh queues and
//! processes each;
//! (g) scenario (a) on one replica in fleet mode with `fleet.partitions = 16` (the intake's hop:
//! every command is republished to its partition queue, then run from there) against
//! `fleet.partitions = 0` (no partitions, no hop), paired the same way;
//! (h) API latency 200 ms, 6 000 commands (one session each, so they spread over every
//! partition), prefetch 64 per replica: three replicas (three `transfer-worker run` processes,
//! fleet mode, 16 partitions) against one, paired the same way. Prefetch 64 keeps three
//! replicas' ceiling (3 × 64 ÷ 200 ms = 960/s) within what two cores carry with RabbitMQ,
//! Redis and the simulator beside them (about 0.7 ms of CPU per command all together), so the
//! replicas set the pace, not the machine; `--prefetch 256` measures the shipped prefetch. With partitions the bench publishes only
//! once every replica's `transfer_fleet_partitions_owned` is its share (⌊16/N⌋ or ⌈16/N⌉, 16
//! together) and `transfer_fleet_members` is N, twice in a row half a second apart.
//!
//! Scenario (f) reports each mode's throughput, latency, CPU per command and RSS, fleet ÷
//! single-process throughput (median of the per-run ratios), and from the worker's `/metrics`
//! (scraped just before publishing and after the last event): Redis round trips per command
//! over every operation but the once-a-second `ping` probe, by operation (`claim`, `reserve`,
//! `record`, …), Redis errors, the mean Redis round trip (histogram sum ÷ count), Redis's own
//! CPU per command (its `redis-server` process) and the keys the run left in Redis (every key
//! starts with the run's commands queue and a colon; the bench deletes them afterwards, also on
//! error or Ctrl-C). `--runs K` makes K pairs.
//!
//! Scenarios (g) and (h) report each mode's throughput (in (h) also against the ceiling
//! replicas × prefetch ÷ latency), the second mode ÷ the first (median of the per-run ratios,
//! and each run's), latency, the workers' CPU per command (all replicas together) and the
//! ratio, Redis's and the simulator's CPU, Redis round trips and commands routed through the
//! intake per command (1 with partitions, 0 without), the partitions each replica owned when
//! publishing started, peak RSS (all replicas) and exactly-once by mode. The partition queues
//! (`<commands queue>.p0` …) are deleted with the run's other queues, the Redis keys as in (f).
//!
//! Targets are printed next to the numbers, never asserted. The exit code is 2 when the
//! harness fails (broker or Redis down, a process does not start), 1 when a command was lost,
//! duplicated or ended unexpectedly, 0 otherwise. Results: a table on stdout and
//! `<target dir>/bench/pipeline-<unix time>.json` plus `pipeline-latest.json`; child logs and
//! configs in `<target dir>/bench/logs/`.
//!
//! ```text
//! cargo bench --bench pipeline                              # all eight, 1 run each
//! cargo bench --bench pipeline -- --scenario a --runs 3 --n 20000
//! cargo bench --bench pipeline -- --scenario f --runs 3   # fleet mode vs single-process
//! cargo bench --bench pipeline -- --scenario g --runs 3   # 16 partitions vs none
//! cargo bench --bench pipeline -- --scenario h --runs 3   # 3 replicas vs 1, latency 200 ms
//! cargo bench --bench pipeline -- --scenario a --n 3000 --no-relay --no-floor \
//!     --wrap "valgrind --tool=callgrind --callgrind-out-file=target/bench/callgrind.out"
//! ```
//!
//! Options: `--scenario a|b|c|d|e|f|g|h|all` (repeatable, or comma-separated; `all`, the
//! default, is all eight), `--runs K`, `--n N`, `--prefetch P` (overrides all but (c) and (e)),
//! `--window W` (default 1000),
//! `--idle-timeout SECS` (give up when no event comes for this long, default 60),
//! `--linger-ms MS` (keep listening for duplicates after the last event, default 1000),
//! `--no-relay`, `--no-floor`, `--wrap "CMD ARGS"` (start the worker as `CMD ARGS transfer-worker run …`; the
//! `/proc` numbers are then the wrapper's, which is the worker itself only for wrappers that
//! exec, like `env MALLOC_ARENA_MAX=1`, not for valgrind or perf). The broker URL is
//! `TRANSFER__AMQP__URL`, else `amqp://guest:guest@127.0.0.1:5672/%2f`; the Redis of (f)–(h) is
//! `--redis-url URL`, else `TRANSFER__FLEET__REDIS_URL`, else `redis://127.0.0.1:6379/0` (when
//! it does not answer, (f)–(h) end with a harness error and the other scenarios still run).

/// The allocator of the worker's binary: the floor and the relay run in this one, so they
/// differ from the worker in what they do, not in how they allocate.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "pipeline/amqp.rs"]
mod amqp;
#[path = "pipeline/fleet.rs"]
mod fleet;
#[path = "pipeline/floor.rs"]
mod floor;
#[path = "pipeline/procs.rs"]
mod procs;
#[path = "pipeline/relay.rs"]
mod relay;
#[path = "pipeline/report.rs"]
mod report;
#[path = "pipeline/run.rs"]
mod run;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::json;

use amqp::{Patience, Registry};
use report::ScenarioResult;
use run::{Ctx, Mode, Pair, Scenario};

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const WORKER_EXE: &str = env!("CARGO_BIN_EXE_transfer-worker");
/// What `all` (and no `--scenario`) runs.
const ALL: [char; 8] = ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'];

/// What the command line asked for.
struct Options {
    scenarios: Vec<char>,
    runs: usize,
    n: Option<usize>,
    prefetch: Option<u16>,
    window: usize,
    patience: Patience,
    relay: bool,
    floor: bool,
    wrap: Vec<String>,
    redis_url: Option<String>,
}

fn parse_options(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        scenarios: Vec::new(),
        runs: 1,
        n: None,
        prefetch: None,
        window: 1000,
        patience: Patience {
            idle: Duration::from_secs(60),
            linger: Duration::from_millis(1000),
            total: Duration::from_secs(3600),
        },
        relay: true,
        floor: true,
        wrap: Vec::new(),
        redis_url: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--scenario" => {
                for key in value()?.split(',') {
                    match key.trim() {
                        "all" => o.scenarios.extend(ALL),
                        k if k.len() == 1
                            && Scenario::new(k.chars().next().unwrap_or(' ')).is_some() =>
                        {
                            o.scenarios.extend(k.chars());
                        }
                        k => bail!("unknown scenario {k:?} (a, b, c, d, e, f, g, h or all)"),
                    }
                }
            }
            "--runs" => o.runs = value()?.parse::<usize>()?.max(1),
            "--n" => o.n = Some(value()?.parse()?),
            "--prefetch" => o.prefetch = Some(value()?.parse()?),
            "--window" => o.window = value()?.parse::<usize>()?.max(1),
            "--idle-timeout" => o.patience.idle = Duration::from_secs(value()?.parse()?),
            "--linger-ms" => o.patience.linger = Duration::from_millis(value()?.parse()?),
            "--wrap" => o.wrap = value()?.split_whitespace().map(str::to_owned).collect(),
            "--no-relay" => o.relay = false,
            "--no-floor" => o.floor = false,
            "--redis-url" => o.redis_url = Some(value()?.clone()),
            // `cargo bench` appends `--bench` to every bench binary's arguments.
            "--bench" => {}
            "--help" | "-h" => bail!("see the doc comment at the top of benches/pipeline.rs"),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if o.scenarios.is_empty() {
        o.scenarios = ALL.to_vec();
    }
    o.scenarios.dedup();
    Ok(o)
}

impl Options {
    fn scenario(&self, key: char) -> Scenario {
        let mut s = Scenario::new(key).expect("keys were checked while parsing");
        if let Some(n) = self.n {
            s.n = n;
        }
        if let Some(p) = self.prefetch.filter(|_| !matches!(key, 'c' | 'e')) {
            s.prefetch = p;
        }
        s.relay &= self.relay;
        s.floor &= self.floor;
        s
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--relay-child") {
        return relay_child(&args[1..]).await;
    }
    if args.first().map(String::as_str) == Some("--floor-child") {
        return floor_child(&args[1..]).await;
    }
    let options = match parse_options(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match bench(options).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: the benchmark harness failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn relay_child(args: &[String]) -> ExitCode {
    let url = std::env::var("BENCH_AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let [queue, exchange, prefetch] = args else {
        eprintln!("usage: --relay-child QUEUE EXCHANGE PREFETCH");
        return ExitCode::from(2);
    };
    let result = match prefetch.parse() {
        Ok(prefetch) => relay::run(&url, queue, exchange, prefetch).await,
        Err(e) => Err(e.into()),
    };
    if let Err(e) = result {
        eprintln!("relay: {e:#}");
    }
    ExitCode::FAILURE
}

async fn floor_child(args: &[String]) -> ExitCode {
    let url = std::env::var("BENCH_AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let [queue, exchange, prefetch, api_base_url] = args else {
        eprintln!("usage: --floor-child QUEUE EXCHANGE PREFETCH API_BASE_URL");
        return ExitCode::from(2);
    };
    let result = match prefetch.parse() {
        Ok(prefetch) => floor::run(&url, queue, exchange, prefetch, api_base_url).await,
        Err(e) => Err(e.into()),
    };
    if let Err(e) = result {
        eprintln!("floor: {e:#}");
    }
    ExitCode::FAILURE
}

async fn bench(options: Options) -> anyhow::Result<ExitCode> {
    let url = std::env::var("TRANSFER__AMQP__URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let redis_url = options.redis_url.clone().unwrap_or_else(|| {
        std::env::var("TRANSFER__FLEET__REDIS_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| fleet::DEFAULT_REDIS_URL.to_owned())
    });
    let out_dir = procs::bench_dir("");
    let ctx = Ctx {
        worker_exe: PathBuf::from(WORKER_EXE),
        self_exe: std::env::current_exe().context("cannot find the bench binary")?,
        log_dir: out_dir.join("logs"),
        window: options.window,
        patience: options.patience,
        wrap: options.wrap.clone(),
        registry: Registry::default(),
        url,
        redis_url,
        redis_keys: fleet::KeyRegistry::default(),
    };
    std::fs::create_dir_all(&ctx.log_dir)
        .with_context(|| format!("cannot create {}", ctx.log_dir.display()))?;
    let probe = amqp::connect(&ctx.url, "transfer-worker bench probe").await?;
    let _ = amqp::timed("connection.close", probe.close(200, "ok".into())).await;

    let mut results = Vec::new();
    let interrupted = tokio::select! {
        () = run_all(&ctx, &options, &mut results) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    let cleanup = ctx.registry.delete_all(&ctx.url).await;
    if let Err(e) = ctx.redis_keys.delete_all(&ctx.redis_url).await {
        eprintln!("warning: could not delete the fleet runs' Redis keys: {e:#}");
    }

    let rows: Vec<_> = results.iter().flat_map(ScenarioResult::rows).collect();
    println!();
    report::print_table(&rows);
    let correct = results.iter().all(|r| r.correctness().ok());
    let harness_failed = interrupted || results.iter().any(|r| r.error.is_some());
    let path = write_json(&out_dir, &ctx, &options, &results, correct, harness_failed)?;
    println!("\nJSON: {}", path.display());
    println!("logs: {}", ctx.log_dir.display());
    if let Err(e) = cleanup {
        eprintln!("warning: could not delete the bench's queues and exchanges: {e:#}");
    }
    if interrupted {
        eprintln!("interrupted; the table shows the runs that finished");
    }
    Ok(if harness_failed {
        ExitCode::from(2)
    } else if !correct {
        eprintln!("CORRECTNESS FAILURE: a command was lost, duplicated or ended unexpectedly");
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs every scenario `runs` times; a harness error ends that scenario, not the others.
async fn run_all(ctx: &Ctx, options: &Options, results: &mut Vec<ScenarioResult>) {
    for &key in &options.scenarios {
        let scenario = options.scenario(key);
        results.push(ScenarioResult {
            scenario: scenario.clone(),
            workers: Vec::new(),
            compared: Vec::new(),
            relays: Vec::new(),
            floors: Vec::new(),
            error: None,
        });
        let result = results.last_mut().expect("just pushed");
        for i in 1..=options.runs {
            let outcome = run_once(ctx, &scenario, result, i, options.runs).await;
            if let Err(e) = ctx.registry.delete_all(&ctx.url).await {
                eprintln!("warning: cleanup failed: {e:#}");
            }
            if let Err(e) = ctx.redis_keys.delete_all(&ctx.redis_url).await {
                eprintln!("warning: Redis cleanup failed: {e:#}");
            }
            if let Err(e) = outcome {
                eprintln!("({key}) run {i}: harness error: {e:#}");
                result.error = Some(format!("{e:#}"));
                break;
            }
        }
    }
}

async fn run_once(
    ctx: &Ctx,
    scenario: &Scenario,
    result: &mut ScenarioResult,
    i: usize,
    runs: usize,
) -> anyhow::Result<()> {
    let key = scenario.key;
    if let Some(pair) = scenario.pair {
        return run_pair(ctx, scenario, pair, result, i, runs).await;
    }
    if scenario.relay {
        eprintln!("({key}) run {i}/{runs}: relay, {} commands…", scenario.n);
        let relay = run::run_relay(ctx, scenario).await?;
        eprintln!("({key}) run {i}/{runs}: relay {}", progress(&relay));
        result.relays.push(relay);
    }
    if scenario.floor {
        eprintln!("({key}) run {i}/{runs}: floor, {} commands…", scenario.n);
        let floor = run::run_floor(ctx, scenario).await?;
        eprintln!("({key}) run {i}/{runs}: floor {}", progress(&floor));
        result.floors.push(floor);
    }
    eprintln!(
        "({key}) run {i}/{runs}: worker, {} commands, {}…",
        scenario.n, scenario.title
    );
    let worker = run::run_worker(ctx, scenario, Mode::SINGLE).await?;
    eprintln!(
        "({key}) run {i}/{runs}: worker {}",
        progress(&worker.measured)
    );
    result.workers.push(worker);
    Ok(())
}

/// Scenarios (f), (g), (h): the pair's two modes one after the other, the order alternating
/// between runs so that neither always goes first.
async fn run_pair(
    ctx: &Ctx,
    scenario: &Scenario,
    pair: Pair,
    result: &mut ScenarioResult,
    i: usize,
    runs: usize,
) -> anyhow::Result<()> {
    let key = scenario.key;
    let order = if i % 2 == 1 { [0, 1] } else { [1, 0] };
    for m in order {
        let (mode, label) = (pair.modes[m], pair.labels[m]);
        eprintln!(
            "({key}) run {i}/{runs}: worker {label}, {} commands, {}…",
            scenario.n, scenario.title
        );
        let worker = run::run_worker(ctx, scenario, mode).await?;
        let redis = worker.redis.as_ref().map_or_else(String::new, |r| {
            let trips = r.metrics.per_command_round_trips() / scenario.n.max(1) as f64;
            format!(", {trips:.2} Redis round trips per command")
        });
        eprintln!(
            "({key}) run {i}/{runs}: worker {label} {}{redis}",
            progress(&worker.measured)
        );
        if m == 0 {
            result.workers.push(worker);
        } else {
            result.compared.push(worker);
        }
        // Each mode starts from a broker and a Redis without the other's queues and keys.
        ctx.registry.delete_all(&ctx.url).await?;
        ctx.redis_keys.delete_all(&ctx.redis_url).await?;
    }
    Ok(())
}

fn progress(m: &run::Measured) -> String {
    let n = report::measured_numbers(m);
    format!(
        "{:.0} cmd/s, {} of {} got an event{}",
        report::v(&n, "throughput_per_s"),
        m.n - m.missing,
        m.n,
        m.stopped
            .as_deref()
            .map(|s| format!(" ({s})"))
            .unwrap_or_default()
    )
}

fn write_json(
    out_dir: &Path,
    ctx: &Ctx,
    options: &Options,
    results: &[ScenarioResult],
    correct: bool,
    harness_failed: bool,
) -> anyhow::Result<PathBuf> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut doc = json!({
        "unixTime": now,
        "gitCommit": git(&["rev-parse", "HEAD"]),
        "gitDirty": git(&["status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"])
            .map(|s| !s.is_empty()),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "broker": amqp::redact(&ctx.url),
        "workerBinary": WORKER_EXE,
        "options": {
            "runs": options.runs,
            "window": options.window,
            "idleTimeoutS": options.patience.idle.as_secs(),
            "lingerMs": options.patience.linger.as_millis(),
            "wrap": options.wrap,
        },
        "scenarios": results.iter().map(report::scenario_json).collect::<Vec<_>>(),
        "correct": correct,
        "harnessFailed": harness_failed,
    });
    if options
        .scenarios
        .iter()
        .any(|k| matches!(k, 'f' | 'g' | 'h'))
    {
        doc["redis"] = json!(amqp::redact(&ctx.redis_url));
    }
    let text = serde_json::to_string_pretty(&doc)?;
    let path = out_dir.join(format!("pipeline-{now}.json"));
    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::write(out_dir.join("pipeline-latest.json"), &text)?;
    Ok(path)
}

fn git(args: &[&str]) -> Option<String> {
    let output = std::process::Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
