//! `transfer-worker dead-letters list | replay | purge` (CONTRACT §11) as an operator runs it:
//! the real binary against the dead-letter queue a real worker filled, on the local broker.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Output;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use transfer_worker::app::{App, AppError};
use transfer_worker::broker::topology;
use transfer_worker::config::Settings;
use transfer_worker::shutdown::Shutdown;
use transfer_worker::tools::simulator::{self, Reply, Simulator, SimulatorConfig};

use crate::cli::{binary, output};
use crate::harness::{
    Cleanup, EVENT_WAIT, events_queue, passive, take_all, test_channel, test_settings, worker_env,
};

/// A worker and its simulator, with a consumer of every event. Unlike the shared harness it
/// does not consume the dead-letter queue: that is what the commands under test read.
struct Rig {
    settings: Settings,
    sim: Simulator,
    _conn: Connection,
    channel: Channel,
    events: Consumer,
    app: Option<JoinHandle<Result<(), AppError>>>,
    shutdown: Shutdown,
    _cleanup: Cleanup,
}

impl Rig {
    async fn start() -> Self {
        crate::init_logs();
        let mut settings = test_settings();
        let sim = Simulator::start(SimulatorConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            bots: simulator::bots_from_settings(&settings),
            callbacks: false,
            ..SimulatorConfig::default()
        })
        .await
        .expect("simulator starts");
        settings.agentassist.base_url = sim.base_url();
        let cleanup = cleanup(&settings);
        let (conn, channel) = test_channel().await;
        topology::declare(&channel, &settings.amqp)
            .await
            .expect("topology");
        let queue = events_queue(&channel, &settings.amqp.results_exchange).await;
        let events = topology::watch(&channel, queue.into(), Duration::from_secs(10))
            .await
            .expect("consume events");
        let app = App::build(settings.clone()).await.expect("app builds");
        let shutdown = app.shutdown();
        let broker = app.broker();
        let handle = tokio::spawn(app.run_until_stopped());
        let until = tokio::time::Instant::now() + EVENT_WAIT;
        while !broker.is_ready() {
            assert!(tokio::time::Instant::now() < until, "worker not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            settings,
            sim,
            _conn: conn,
            channel,
            events,
            app: Some(handle),
            shutdown,
            _cleanup: cleanup,
        }
    }

    async fn publish(&self, command: &Value) {
        publish_to(
            &self.channel,
            "",
            &self.settings.amqp.commands_queue,
            &serde_json::to_vec(command).unwrap(),
            BasicProperties::default().with_timestamp(unix_now()),
        )
        .await;
    }

    /// The next event: its name, commandId and eventId.
    async fn next_event(&mut self) -> (String, String, String) {
        let delivery = tokio::time::timeout(EVENT_WAIT, self.events.next())
            .await
            .expect("an event in time")
            .expect("consumer open")
            .expect("delivery");
        let v: Value = serde_json::from_slice(&delivery.data).unwrap();
        let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        (text("event"), text("commandId"), text("eventId"))
    }

    fn dead_letter_queue(&self) -> &str {
        &self.settings.amqp.dead_letter_queue
    }

    /// The `dead-letters` command with these arguments, pointed at this test's topology.
    async fn cli(&self, args: &[&str]) -> Output {
        let mut command = binary();
        command
            .arg("dead-letters")
            .args(args)
            .envs(worker_env(&self.settings.amqp, &self.sim.base_url()));
        output(command, Duration::from_secs(60)).await
    }

    async fn stop(mut self) {
        self.shutdown.stop();
        let handle = self.app.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("app stops in time")
            .expect("app task")
            .expect("app stops cleanly");
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.abandon();
    }
}

fn cleanup(settings: &Settings) -> Cleanup {
    let amqp = &settings.amqp;
    Cleanup::new(
        vec![amqp.commands_queue.clone(), amqp.dead_letter_queue.clone()],
        vec![
            amqp.results_exchange.clone(),
            amqp.dead_letter_exchange.clone(),
        ],
    )
}

async fn publish_to(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap();
    assert!(confirm.await.unwrap().is_ack());
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn permanent_error() -> Reply {
    Reply::Raw {
        status: 400,
        headers: Vec::new(),
        body: b"no such agent".to_vec(),
    }
}

/// A transfer command with this id.
fn command(id: &str) -> Value {
    json!({"commandId": id, "orgId": "o-dl", "botSessionId": format!("s-{id}"), "aId": "a-dl"})
}

/// Ready messages in `queue`.
async fn depth(channel: &Channel, queue: &str) -> u32 {
    passive(channel, queue).await.message_count()
}

/// Waits until `queue` holds `n` ready messages.
async fn wait_depth(channel: &Channel, queue: &str, n: u32) {
    let until = tokio::time::Instant::now() + EVENT_WAIT;
    loop {
        let now = depth(channel, queue).await;
        if now == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{queue} holds {now} messages, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn succeeded(out: &Output) -> String {
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        text(&out.stderr)
    );
    stdout
}

/// A failed and a rejected command, dead-lettered by the worker; returns their ids.
async fn fill(rig: &mut Rig, tag: &str) -> (String, String) {
    let failed = format!("dl-failed-{tag}");
    let rejected = format!("dl-rejected-{tag}");
    rig.sim.script([permanent_error()]);
    rig.publish(&command(&failed)).await;
    assert_eq!(rig.next_event().await.0, "transfer.failed");
    rig.publish(&json!({"commandId": rejected, "botSessionId": "s-bad", "aId": "a-dl"}))
        .await;
    assert_eq!(rig.next_event().await.0, "transfer.rejected");
    let queue = rig.dead_letter_queue().to_owned();
    wait_depth(&rig.channel, &queue, 2).await;
    (failed, rejected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_names_what_is_dead_lettered_and_leaves_it_there_and_purge_wants_yes() {
    let mut rig = Rig::start().await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (failed, rejected) = fill(&mut rig, &tag).await;
    let queue = rig.dead_letter_queue().to_owned();

    // `--config FILE`, like `run`: the queue's name comes from the file.
    let mut config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let amqp = &rig.settings.amqp;
    writeln!(
        config,
        "[amqp]\nurl = {:?}\ncommands_queue = {:?}\ndead_letter_queue = {:?}",
        amqp.url, amqp.commands_queue, amqp.dead_letter_queue
    )
    .unwrap();
    config.flush().unwrap();
    let mut command = binary();
    command.args(["dead-letters", "list", "--config"]);
    command.arg(config.path());
    let listed = succeeded(&output(command, Duration::from_secs(60)).await);
    println!("{listed}");
    let line = |id: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no line for {id}:\n{listed}"))
            .to_owned()
    };
    assert!(listed.starts_with("COMMAND ID"), "{listed}");
    let failed_line = line(&failed);
    assert!(failed_line.contains("transfer.failed"), "{failed_line}");
    assert!(failed_line.contains("HTTP 400"), "{failed_line}");
    let rejected_line = line(&rejected);
    assert!(
        rejected_line.contains("transfer.rejected"),
        "{rejected_line}"
    );
    assert!(rejected_line.contains("orgId"), "{rejected_line}");
    assert!(
        listed.contains(&format!("2 message(s) in {queue}")),
        "{listed}"
    );
    assert_eq!(depth(&rig.channel, &queue).await, 2, "list consumed");

    // Listed again, they are all still there: returning them cost nothing.
    let limited = succeeded(&rig.cli(&["list", "--limit", "1"]).await);
    assert_eq!(limited.lines().count(), 3, "{limited}");
    assert!(limited.contains("1 of 2 message(s)"), "{limited}");
    let again = succeeded(&rig.cli(&["list"]).await);
    assert!(
        again.contains(&failed) && again.contains(&rejected),
        "{again}"
    );
    assert_eq!(depth(&rig.channel, &queue).await, 2);

    // An id that is not there: non-zero, and nothing moves.
    let unknown = rig.cli(&["replay", "--command-id", "dl-unknown"]).await;
    assert!(!unknown.status.success(), "{}", text(&unknown.stdout));
    assert!(
        text(&unknown.stdout).contains("not found: dl-unknown"),
        "{}",
        text(&unknown.stdout)
    );
    assert_eq!(depth(&rig.channel, &queue).await, 2);
    assert_eq!(
        depth(&rig.channel, &rig.settings.amqp.commands_queue).await,
        0
    );
    assert_eq!(rig.sim.stats().calls, 1);

    let refused = rig.cli(&["purge"]).await;
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--yes"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(depth(&rig.channel, &queue).await, 2);
    let purged = succeeded(&rig.cli(&["purge", "--yes"]).await);
    assert!(purged.contains("removed 2 message(s)"), "{purged}");
    assert_eq!(depth(&rig.channel, &queue).await, 0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_processes_a_failed_command_again_and_answers_a_completed_one_from_memory() {
    let mut rig = Rig::start().await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (failed, rejected) = fill(&mut rig, &tag).await;
    // Published again, the failed command is answered from memory: a second copy of it is
    // dead-lettered, with the same eventId.
    rig.publish(&command(&failed)).await;
    let (event, _, _) = rig.next_event().await;
    assert_eq!(event, "transfer.failed");
    let queue = rig.dead_letter_queue().to_owned();
    wait_depth(&rig.channel, &queue, 3).await;
    assert_eq!(rig.sim.stats().calls, 1);

    // The simulator accepts from now on. Both copies go back, in order: the first is
    // processed as new, the second finds it completed.
    let out = succeeded(&rig.cli(&["replay", "--command-id", &failed]).await);
    assert!(
        out.contains("replayed 2 message(s)") && out.contains(&failed),
        "{out}"
    );
    let (first, id, first_event_id) = rig.next_event().await;
    assert_eq!(
        (first.as_str(), id.as_str()),
        ("transfer.succeeded", failed.as_str())
    );
    let (second, id, second_event_id) = rig.next_event().await;
    assert_eq!(
        (second.as_str(), id.as_str()),
        ("transfer.succeeded", failed.as_str())
    );
    assert_eq!(
        second_event_id, first_event_id,
        "the completed command is answered from memory"
    );
    assert_eq!(rig.sim.stats().calls, 2, "one new call, not two");

    // Exactly those were removed: the rejected command stays.
    assert_eq!(depth(&rig.channel, &queue).await, 1);
    let listed = succeeded(&rig.cli(&["list"]).await);
    assert!(listed.contains(&rejected), "{listed}");
    assert!(!listed.contains(&failed), "{listed}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_republishes_as_received_and_keeps_what_it_could_not_confirm() {
    crate::init_logs();
    let settings = test_settings();
    let amqp = &settings.amqp;
    let _cleanup = cleanup(&settings);
    let (_conn, channel) = test_channel().await;
    topology::declare(&channel, amqp).await.expect("topology");
    let mut headers = FieldTable::default();
    let long = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
    headers.insert("x-transfer-event".into(), long("transfer.failed"));
    headers.insert("x-transfer-error".into(), long("boom"));
    headers.insert(
        "traceparent".into(),
        long("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    );
    headers.insert("x-custom".into(), AMQPValue::LongLongInt(42));
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id("m-dl-asis".into())
        .with_correlation_id("corr-dl".into())
        .with_reply_to("replies-dl".into())
        .with_timestamp(1_700_000_000)
        .with_headers(headers);
    let body = br#"{"commandId":"dl-asis","orgId":"o"}"#;
    publish_to(
        &channel,
        &amqp.dead_letter_exchange,
        "",
        body,
        properties.clone(),
    )
    .await;
    wait_depth(&channel, &amqp.dead_letter_queue, 1).await;
    let env = worker_env(amqp, "http://127.0.0.1:9");
    let run = async |args: &[&str]| {
        let mut command = binary();
        command.arg("dead-letters").args(args).envs(env.clone());
        output(command, Duration::from_secs(60)).await
    };
    // Listed first, so the broker has redelivered it from the dead-letter queue once.
    succeeded(&run(&["list"]).await);

    let out = succeeded(&run(&["replay", "--all"]).await);
    assert!(out.contains("replayed 1 message(s)"), "{out}");
    assert_eq!(depth(&channel, &amqp.dead_letter_queue).await, 0);
    let taken = take_all(&channel, &amqp.commands_queue).await;
    assert_eq!(taken.len(), 1, "replayed once");
    let replayed = &taken[0];
    assert_eq!(replayed.data, body);
    let got = &replayed.properties;
    assert_eq!(got.content_type(), properties.content_type());
    assert_eq!(got.delivery_mode(), properties.delivery_mode());
    assert_eq!(got.message_id(), properties.message_id());
    assert_eq!(got.correlation_id(), properties.correlation_id());
    assert_eq!(got.reply_to(), properties.reply_to());
    assert_eq!(got.timestamp(), properties.timestamp());
    // The dead-letter queue's own count of deliveries (the listing's) is left behind.
    let got_headers = got.headers().as_ref().unwrap().inner();
    assert_eq!(got_headers, properties.headers().as_ref().unwrap().inner());

    // With the commands queue gone nothing confirms the copy: it stays where it was.
    publish_to(
        &channel,
        &amqp.dead_letter_exchange,
        "",
        body,
        properties.clone(),
    )
    .await;
    wait_depth(&channel, &amqp.dead_letter_queue, 1).await;
    channel
        .queue_delete(
            amqp.commands_queue.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let out = run(&["replay", "--all"]).await;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("not confirmed"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(depth(&channel, &amqp.dead_letter_queue).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_dead_lettered_past_the_delivery_limit_is_listed_as_poison() {
    crate::init_logs();
    let mut settings = test_settings();
    settings.amqp.delivery_limit = 1;
    let amqp = &settings.amqp;
    let _cleanup = cleanup(&settings);
    let (_conn, channel) = test_channel().await;
    topology::declare(&channel, amqp).await.expect("topology");
    let body = b"\xffnot a command";
    let properties = BasicProperties::default().with_message_id("m-dl-poison".into());
    publish_to(&channel, "", &amqp.commands_queue, body, properties).await;
    // Returned until the broker gives up on it, as after a worker crashing on it.
    let mut consumer = channel
        .basic_consume(
            amqp.commands_queue.as_str().into(),
            "poisoned".into(),
            lapin::options::BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    while depth(&channel, &amqp.dead_letter_queue).await == 0 {
        let next = tokio::time::timeout(EVENT_WAIT, consumer.next()).await;
        let Ok(Some(Ok(delivery))) = next else {
            panic!("the broker did not dead-letter the message: {next:?}");
        };
        delivery
            .acker
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut command = binary();
    command
        .args(["dead-letters", "list"])
        .envs(worker_env(amqp, "http://127.0.0.1:9"));
    let listed = succeeded(&output(command, Duration::from_secs(60)).await);
    println!("{listed}");
    let line = listed
        .lines()
        .find(|l| l.starts_with("m-dl-poison (not JSON; message_id)"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(line.contains("  poison  "), "the event column: {line}");
    assert!(
        line.contains(&format!(
            "redelivered past the delivery limit of {}",
            amqp.commands_queue
        )),
        "{line}"
    );
    assert_eq!(depth(&channel, &amqp.dead_letter_queue).await, 1);
}
