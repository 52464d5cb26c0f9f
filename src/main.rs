//! The `transfer-worker` command line: parse arguments, load settings, call the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use transfer_worker::app::App;
use transfer_worker::config::Settings;
use transfer_worker::ops::telemetry;
use transfer_worker::tools::dead_letters::{self, Selection};
use transfer_worker::tools::demo;
use transfer_worker::tools::publish::{CommandFields, publish_command};
use transfer_worker::tools::simulator::{self, SimulatorConfig};

/// Transfers conversations to Kore.ai AgentAssist agents and queues, from commands on RabbitMQ.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker.
    Run(ConfigArg),
    /// Run a stand-in AgentAssist API that checks requests and posts callbacks.
    Simulate(SimulateArgs),
    /// Run worker and simulator in-process against the local broker, with sample commands.
    Demo(DemoArgs),
    /// Enqueue one command; print its commandId (and its outcome with --wait).
    Publish(PublishArgs),
    /// Print the effective configuration, secrets redacted; fail if it is invalid.
    Config(ConfigArg),
    /// Show the fleet: members, the partitions each owns, queue depths.
    Fleet(ConfigArg),
    /// Show each account: its budget, slots, and what waits in its account queues.
    Status(ConfigArg),
    /// List, replay or purge the dead-letter queue.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// One line per message: commandId, event, age, error. Consumes nothing.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Show at most this many messages.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
    },
    /// Republish messages to the commands queue as received; each is removed once confirmed.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// Replay the messages of these command ids.
        #[arg(long = "command-id", value_name = "ID", num_args = 1.., required_unless_present = "all", conflicts_with = "all")]
        command_ids: Vec<String>,
        /// Replay every message.
        #[arg(long)]
        all: bool,
    },
    /// Remove every message, for good.
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        /// Yes, remove them.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
struct ConfigArg {
    /// A TOML file layered over the defaults.
    #[arg(long, short, env = "TRANSFER_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct SimulateArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fraction of requests answered 503.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Fraction of requests answered 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    rate_limited_rate: f64,
    /// Retry-After of those 429s, in seconds.
    #[arg(long, default_value_t = 1)]
    retry_after_secs: u64,
    /// Fraction of requests answered 400 (permanent).
    #[arg(long, default_value_t = 0.0)]
    reject_rate: f64,
    /// Delay before each callback, in milliseconds.
    #[arg(long, default_value_t = 200)]
    callback_delay_ms: u64,
    /// Fraction of callbacks that report a failed transfer.
    #[arg(long, default_value_t = 0.0)]
    callback_fail_rate: f64,
    /// During an outage, refuse unauthenticated requests with 401 before routing, as an API
    /// gateway in front of the service would.
    #[arg(long)]
    edge_authenticates_first: bool,
    /// Post no callbacks.
    #[arg(long)]
    no_callbacks: bool,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Transfers to publish (plus one invalid command).
    #[arg(long, default_value_t = 6)]
    count: usize,
}

#[derive(Args)]
struct PublishArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Read the command from this JSON file ("-" for stdin) instead of the flags.
    #[arg(long, conflicts_with_all = ["org_id", "session_id", "agent", "queue"])]
    file: Option<PathBuf>,
    /// orgId.
    #[arg(long, required_unless_present = "file")]
    org_id: Option<String>,
    /// botSessionId.
    #[arg(long, required_unless_present = "file")]
    session_id: Option<String>,
    /// Transfer to this agent (aId).
    #[arg(long, conflicts_with = "queue", required_unless_present_any = ["file", "queue"])]
    agent: Option<String>,
    /// Transfer to this queue (queueId).
    #[arg(long)]
    queue: Option<String>,
    /// streamId (default: the worker's default bot).
    #[arg(long)]
    stream_id: Option<String>,
    /// commandId (default: a new UUID).
    #[arg(long)]
    command_id: Option<String>,
    /// callbackUrl (default: the worker's relay).
    #[arg(long)]
    callback_url: Option<String>,
    /// expiresAt, RFC 3339.
    #[arg(long)]
    expires_at: Option<String>,
    /// Wait for the outcome and print it.
    #[arg(long)]
    wait: bool,
    /// How long to wait, e.g. "30s".
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

fn load(arg: &ConfigArg) -> anyhow::Result<Settings> {
    Ok(Settings::load(arg.config.as_deref())?)
}

/// Calls `then` on SIGINT or SIGTERM.
fn on_signal(then: impl FnOnce() + Send + 'static) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("signal received; shutting down");
        then();
    });
}

/// mimalloc: the worker allocates and frees small buffers per command on several threads,
/// where the system allocator spent a fifth of the worker's CPU time (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping causes the message above already quotes.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Config(arg) => {
            let settings = load(&arg)?;
            print!("{}", settings.to_redacted_toml());
        }
        Command::Fleet(arg) => {
            let settings = load(&arg)?;
            let status = transfer_worker::tools::fleet_status::fleet_status(&settings).await?;
            print!("{status}");
        }
        Command::Status(arg) => {
            let settings = load(&arg)?;
            let status = transfer_worker::tools::account_status::status(&settings).await?;
            print!("{status}");
        }
        Command::Run(arg) => run(load(&arg)?).await?,
        Command::Simulate(args) => simulate(args).await?,
        Command::Demo(args) => {
            let settings = load(&args.config)?;
            demo::run(settings, args.count).await?;
        }
        Command::Publish(args) => publish(args).await?,
        Command::DeadLetters(command) => dead_letters_command(command).await?,
    }
    Ok(())
}

/// `run`: the worker until a signal, then its last spans exported.
async fn run(settings: Settings) -> anyhow::Result<()> {
    // A shipped example (a secret, a bot) never consumes real commands.
    settings.ready_for_production()?;
    let telemetry = telemetry::init_with_export(&settings.log, &settings.telemetry)?;
    let app = App::build(settings).await?;
    let shutdown = app.shutdown();
    on_signal(move || shutdown.stop());
    let ran = app.run_until_stopped().await;
    // The last spans, exported within `telemetry.export_timeout`.
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    ran?;
    Ok(())
}

/// `simulate`: the stand-in API until a signal.
async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let settings = load(&args.config)?;
    telemetry::init(&settings.log);
    let config = args.simulator_config(&settings)?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    on_signal(move || token.cancel());
    simulator::serve_until(config, async move { stop.cancelled().await }).await?;
    Ok(())
}

impl SimulateArgs {
    /// The simulator as the flags describe it, for the bots of `settings`.
    fn simulator_config(&self, settings: &Settings) -> anyhow::Result<SimulatorConfig> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(simulator::SimTls {
                cert_pem: std::fs::read(cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?,
                key_pem: std::fs::read(key)
                    .with_context(|| format!("cannot read {}", key.display()))?,
            }),
            _ => None,
        };
        Ok(SimulatorConfig {
            listen: self.listen,
            bots: simulator::bots_from_settings(settings),
            latency: Duration::from_millis(self.latency_ms),
            fail_rate: self.fail_rate,
            rate_limited_rate: self.rate_limited_rate,
            retry_after: Duration::from_secs(self.retry_after_secs),
            reject_rate: self.reject_rate,
            callbacks: !self.no_callbacks,
            callback_delay: Duration::from_millis(self.callback_delay_ms),
            callback_fail_rate: self.callback_fail_rate,
            edge: if self.edge_authenticates_first {
                simulator::Edge::AuthenticatesFirst
            } else {
                simulator::Edge::RoutesFirst
            },
            tls,
        })
    }
}

/// `publish`: one command enqueued, its id printed, and with `--wait` its outcome; an error if
/// that outcome is not a success.
async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let settings = load(&args.config)?;
    let wait = args.wait.then_some(args.timeout);
    let command = args.command()?;
    let published = publish_command(&settings.amqp, command, wait).await?;
    println!("{}", published.command_id);
    if let Some(outcome) = published.outcome {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
        if outcome["event"] != "transfer.succeeded" {
            anyhow::bail!("the transfer did not succeed: {}", outcome["event"]);
        }
    }
    Ok(())
}

impl PublishArgs {
    /// The command: read from `--file` (`-`: stdin), or made of the flags.
    fn command(self) -> anyhow::Result<serde_json::Value> {
        let Some(path) = &self.file else {
            return Ok(CommandFields {
                command_id: self.command_id,
                stream_id: self.stream_id,
                org_id: self.org_id.unwrap_or_default(),
                bot_session_id: self.session_id.unwrap_or_default(),
                agent: self.agent,
                queue: self.queue,
                callback_url: self.callback_url,
                expires_at: self.expires_at,
            }
            .to_json());
        };
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?
        };
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
    }
}

async fn dead_letters_command(command: DeadLettersCommand) -> anyhow::Result<()> {
    match command {
        DeadLettersCommand::List { config, limit } => {
            let settings = load(&config)?;
            let limit = limit.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
            print!("{}", dead_letters::list(&settings.amqp, limit).await?);
        }
        DeadLettersCommand::Replay {
            config,
            command_ids,
            all,
        } => {
            let settings = load(&config)?;
            let selection = if all {
                Selection::All
            } else {
                Selection::Ids(command_ids.into_iter().collect())
            };
            let replayed = dead_letters::replay(&settings.amqp, selection).await?;
            print!("{replayed}");
            replayed.into_result()?;
        }
        DeadLettersCommand::Purge { config, yes } => {
            let settings = load(&config)?;
            let removed = dead_letters::purge(&settings.amqp, yes).await?;
            println!(
                "removed {removed} message(s) from {}",
                settings.amqp.dead_letter_queue
            );
        }
    }
    Ok(())
}
