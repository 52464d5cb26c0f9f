//! `transfer-worker demo`: the product end to end with nothing but a local RabbitMQ. It starts
//! the simulator and the worker in-process on a private topology, publishes a handful of agent
//! and queue transfers and one invalid command, shows every event as it arrives, prints a
//! summary, and removes what it declared.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::options::{ExchangeDeleteOptions, QueueBindOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::app::{App, AppError};
use crate::broker::{BrokerError, PublishError, Publisher, connection, timed, topology};
use crate::config::{AmqpSettings, Settings};
use crate::shutdown::Shutdown;
use crate::tools::simulator::{
    self, Reply, Simulator, SimulatorConfig, SimulatorError, SimulatorStats,
};

/// How long the demo waits for all events before giving up.
const DEMO_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the demo could not complete.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// No broker.
    #[error(
        "cannot reach RabbitMQ at {url} ({source}). Start one: `docker compose up -d rabbitmq`, \
         or your distribution's rabbitmq-server package"
    )]
    NoBroker {
        /// The URL tried, password redacted.
        url: String,
        /// Why.
        source: BrokerError,
    },
    /// A broker operation failed midway.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A command was not confirmed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The simulator failed.
    #[error(transparent)]
    Simulator(#[from] SimulatorError),
    /// The worker failed.
    #[error(transparent)]
    App(#[from] AppError),
    /// Not every expected event arrived.
    #[error("only {got} of {expected} events arrived within {DEMO_TIMEOUT:?}")]
    Incomplete {
        /// Events seen.
        got: usize,
        /// Events expected.
        expected: usize,
    },
}

/// What the demo saw.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    /// Events by name.
    pub events: BTreeMap<String, usize>,
    /// From first publish to last event.
    pub elapsed: Duration,
}

/// Runs the demo with `count` transfers, printing as it goes.
pub async fn run(mut settings: Settings, count: usize) -> Result<DemoSummary, DemoError> {
    let loopback = demo_settings(&mut settings);
    let amqp = settings.amqp.clone();
    let broker = DemoBroker::open(&amqp).await?;
    let sim = start_simulator(&mut settings, loopback).await?;
    let stream_id = settings.bots[0].stream_id.clone();

    println!("transfer-worker demo");
    println!("  broker     {}", amqp.shown_nodes());
    println!("  commands   {}", amqp.commands_queue);
    println!("  results    {}", amqp.results_exchange);
    println!("  AgentAssist simulator at {}", sim.base_url());
    let worker = DemoWorker::start(settings).await?;

    let result = exchange_events(&broker, &amqp, &stream_id, count).await;

    let stopped = worker.stop().await;
    let stats = sim.stats();
    sim.shutdown().await;
    broker.close(&amqp).await;

    // A worker that stopped with an error (a service that panicked) says why first.
    stopped?;
    let summary = result?;
    print_summary(&summary, &stats);
    Ok(summary)
}

/// The demo's settings: a private topology, listeners on loopback ports the system picks, a
/// short grace. Returns that loopback address.
fn demo_settings(settings: &mut Settings) -> SocketAddr {
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    private_topology(&mut settings.amqp, suffix);
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    settings.callbacks.listen = loopback;
    settings.callbacks.public_url = String::new();
    settings.admin.listen = loopback;
    settings.shutdown.grace = Duration::from_secs(5);
    loopback
}

fn private_topology(amqp: &mut AmqpSettings, suffix: &str) {
    amqp.commands_queue = format!("transfer-demo-{suffix}.commands");
    amqp.results_exchange = format!("transfer-demo-{suffix}.results");
    amqp.dead_letter_exchange = format!("transfer-demo-{suffix}.dead-letter");
    amqp.dead_letter_queue = format!("transfer-demo-{suffix}.commands.dead");
}

/// The demo's own link to the broker: the private topology declared, a publisher, and a
/// queue that receives every event.
struct DemoBroker {
    conn: Connection,
    channel: Channel,
    publisher: Publisher,
    events_queue: String,
}

impl DemoBroker {
    /// Connects and declares; a broker that cannot be reached is [`DemoError::NoBroker`].
    async fn open(amqp: &AmqpSettings) -> Result<Self, DemoError> {
        let conn = connection::connect_any(amqp, "transfer-worker demo")
            .await
            .map_err(|source| DemoError::NoBroker {
                url: amqp.shown_nodes(),
                source,
            })?;
        let channel = timed(
            "channel.open",
            amqp.operation_timeout,
            conn.create_channel(),
        )
        .await?;
        let publisher = Publisher::open(&conn, amqp).await?;
        crate::broker::lane_registry::prepare(
            &conn,
            amqp,
            &publisher,
            std::slice::from_ref(&amqp.commands_queue),
        )
        .await?;
        topology::declare(&channel, amqp).await?;
        let events_queue = watch_results(&channel, amqp).await?;
        Ok(Self {
            conn,
            channel,
            publisher,
            events_queue,
        })
    }

    /// Removes what the demo declared, then closes the connection.
    async fn close(&self, amqp: &AmqpSettings) {
        remove_topology(&self.channel, amqp, &self.events_queue).await;
        let _ = tokio::time::timeout(
            amqp.operation_timeout,
            self.conn.close(200, "demo done".into()),
        )
        .await;
    }
}

/// Starts the simulator on `listen` and points the worker at it.
async fn start_simulator(
    settings: &mut Settings,
    listen: SocketAddr,
) -> Result<Simulator, DemoError> {
    let sim = Simulator::start(SimulatorConfig {
        listen,
        bots: simulator::bots_from_settings(settings),
        latency: Duration::from_millis(120),
        callback_delay: Duration::from_millis(400),
        ..SimulatorConfig::default()
    })
    .await?;
    // The first call meets a transient 503, to show a retry.
    sim.script([Reply::Status(503)]);
    settings.agentassist.base_url = sim.base_url();
    Ok(sim)
}

/// The worker, running in-process.
struct DemoWorker {
    shutdown: Shutdown,
    task: JoinHandle<Result<(), AppError>>,
}

impl DemoWorker {
    /// Builds the worker, says where its callback relay listens, starts it and waits until
    /// it is ready (15 s at most).
    async fn start(settings: Settings) -> Result<Self, DemoError> {
        let app = App::build(settings).await?;
        println!("  callback relay at http://{}", app.relay_addr());
        println!();
        let shutdown = app.shutdown();
        let broker = app.broker();
        let task = tokio::spawn(app.run_until_stopped());
        let ready_by = Instant::now() + Duration::from_secs(15);
        while !broker.is_ready() && Instant::now() < ready_by {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { shutdown, task })
    }

    /// Stops the worker and gives it 15 s to finish; the error it stopped with, if any.
    async fn stop(self) -> Result<(), DemoError> {
        self.shutdown.stop();
        match tokio::time::timeout(Duration::from_secs(15), self.task).await {
            Ok(Ok(ran)) => ran.map_err(DemoError::from),
            Ok(Err(e)) if e.is_panic() => {
                Err(DemoError::App(AppError::Panicked { service: "worker" }))
            }
            // It did not finish in time, or its task was cancelled: nothing more to say.
            Ok(Err(_)) | Err(_) => Ok(()),
        }
    }
}

/// What the demo saw, and what the simulator counted.
fn print_summary(summary: &DemoSummary, stats: &SimulatorStats) {
    println!();
    println!(
        "summary ({:.1?} from first command to last event)",
        summary.elapsed
    );
    for (event, n) in &summary.events {
        println!("  {event:<20} {n}");
    }
    println!(
        "  API calls: {} ({} accepted), callbacks posted: {}",
        stats.calls, stats.accepted, stats.callbacks_delivered
    );
}

async fn watch_results(channel: &Channel, amqp: &AmqpSettings) -> Result<String, BrokerError> {
    let t = amqp.operation_timeout;
    let queue = topology::private_queue(channel, t).await?;
    timed(
        "queue.bind",
        t,
        channel.queue_bind(
            queue.clone(),
            amqp.results_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    Ok(queue.to_string())
}

fn sample_commands(stream_id: &str, count: usize) -> Vec<Value> {
    let mut commands: Vec<Value> = (0..count)
        .map(|i| {
            let session = format!("{:024x}", 0xdead_0000_u64 + i as u64);
            let mut c = json!({
                "commandId": format!("demo-{}", i + 1),
                "streamId": stream_id,
                "orgId": "o-6a8a7a3e-5c9b-4f0e-9a57-1f1b2c3d4e5f",
                "botSessionId": session,
            });
            if i % 2 == 0 {
                c["aId"] = json!(format!("a-agent-{}", i + 1));
            } else {
                c["transferredType"] = json!("QUEUE");
                c["queueId"] = json!(format!("qu-support-{}", i + 1));
            }
            c
        })
        .collect();
    // And one a bot might really send: no orgId.
    commands.push(
        json!({"commandId": "demo-bad", "botSessionId": "0badc0ffee0badc0ffee0bad", "aId": "a-1"}),
    );
    commands
}

async fn exchange_events(
    broker: &DemoBroker,
    amqp: &AmqpSettings,
    stream_id: &str,
    count: usize,
) -> Result<DemoSummary, DemoError> {
    let t = amqp.operation_timeout;
    let mut consumer =
        topology::watch(&broker.channel, broker.events_queue.as_str().into(), t).await?;
    let commands = sample_commands(stream_id, count);
    // Each transfer yields a terminal event and a relayed callback; the bad one a rejection.
    let expected = count * 2 + 1;
    let started = Instant::now();
    for command in &commands {
        let body = serde_json::to_vec(command).expect("JSON serializes");
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        broker.publisher.publish_command(&body, properties).await?;
        let target = command["aId"]
            .as_str()
            .map(|a| format!("agent {a}"))
            .or_else(|| command["queueId"].as_str().map(|q| format!("queue {q}")))
            .unwrap_or_default();
        println!(
            "→ published {:<9} {target}",
            command["commandId"].as_str().unwrap_or("?")
        );
    }
    println!();

    let bar = ProgressBar::new(expected as u64).with_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} events {wide_bar} {elapsed}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let mut summary = DemoSummary::default();
    let deadline = tokio::time::Instant::now() + DEMO_TIMEOUT;
    let mut got = 0;
    while got < expected {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let Ok(Some(Ok(delivery))) = next else { break };
        let event: Value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
        got += 1;
        bar.inc(1);
        // A hidden bar (output not a terminal) swallows println; print directly then.
        if bar.is_hidden() {
            println!("{}", describe(&event));
        } else {
            bar.println(describe(&event));
        }
        let name = event["event"].as_str().unwrap_or("?").to_owned();
        *summary.events.entry(name).or_default() += 1;
    }
    bar.finish_and_clear();
    summary.elapsed = started.elapsed();
    if got < expected {
        return Err(DemoError::Incomplete { got, expected });
    }
    Ok(summary)
}

fn describe(event: &Value) -> String {
    let name = event["event"].as_str().unwrap_or("?");
    let id = event["commandId"].as_str().unwrap_or("?");
    let target = match (
        event["target"]["type"].as_str(),
        event["target"]["id"].as_str(),
    ) {
        (Some(kind), Some(id)) => format!("{kind} {id}"),
        _ => String::new(),
    };
    let detail = match name {
        "transfer.succeeded" => format!(
            "attempts={} {}ms status={}",
            event["attempts"], event["durationMs"], event["response"]["status"]
        ),
        "transfer.callback" => format!("payload status={}", event["payload"]["status"]),
        _ => event["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    };
    let mark = match name {
        "transfer.succeeded" => "✔",
        "transfer.callback" => "↩",
        _ => "✘",
    };
    format!("{mark} {name:<19} {id:<9} {target:<22} {detail}")
}

async fn remove_topology(channel: &Channel, amqp: &AmqpSettings, events_queue: &str) {
    let t = amqp.operation_timeout;
    for queue in [
        &amqp.commands_queue,
        &amqp.dead_letter_queue,
        &crate::broker::consumer::holder_queue(&amqp.commands_queue),
        &crate::contract::names::lane_registry(&amqp.commands_queue),
        &events_queue.to_owned(),
    ] {
        let _ = timed(
            "queue.delete",
            t,
            channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
        )
        .await;
    }
    for exchange in [&amqp.results_exchange, &amqp.dead_letter_exchange] {
        let _ = timed(
            "exchange.delete",
            t,
            channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()),
        )
        .await;
    }
}
