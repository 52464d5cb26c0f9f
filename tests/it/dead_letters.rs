//! `transfer-worker dead-letters list | replay | purge` (CONTRACT §11) as an operator runs it:
//! the real binary against the dead-letter queue a real worker filled, on the local broker.

use std::io::Write;
use std::process::Output;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::QueueDeleteOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use serde_json::{Value, json};
use transfer_worker::tools::simulator::Reply;

use crate::harness::{
    EVENT_WAIT, Harness, binary, declared, output, own_topology, passive, publish_confirmed,
    succeeded, take_all, wait_for, worker_env,
};

/// Publishes a command stamped with the time it was sent.
async fn publish(h: &Harness, command: &Value) {
    let stamped = BasicProperties::default().with_timestamp(unix_now());
    h.publish_raw(&serde_json::to_vec(command).unwrap(), stamped)
        .await;
}

/// The `dead-letters` command with these arguments, pointed at this test's topology.
async fn cli(h: &Harness, args: &[&str]) -> Output {
    let mut command = binary();
    command
        .arg("dead-letters")
        .args(args)
        .envs(worker_env(&h.settings.amqp, &h.sim.base_url()));
    output(command, Duration::from_secs(60)).await
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
    let what = format!("{queue} holding {n} messages");
    wait_for(&what, EVENT_WAIT, String::new, async || {
        depth(channel, queue).await == n
    })
    .await;
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A failed and a rejected command, dead-lettered by the worker; returns their ids.
async fn fill(h: &mut Harness, tag: &str) -> (String, String) {
    let failed = format!("dl-failed-{tag}");
    let rejected = format!("dl-rejected-{tag}");
    h.sim.script([permanent_error()]);
    publish(h, &command(&failed)).await;
    assert_eq!(h.next_event().await.name(), "transfer.failed");
    let bad = json!({"commandId": rejected, "botSessionId": "s-bad", "aId": "a-dl"});
    publish(h, &bad).await;
    assert_eq!(h.next_event().await.name(), "transfer.rejected");
    wait_depth(&h.channel, &h.settings.amqp.dead_letter_queue, 2).await;
    (failed, rejected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_names_what_is_dead_lettered_and_leaves_it_there_and_purge_wants_yes() {
    let mut h = Harness::start(|_, _| {}).await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (failed, rejected) = fill(&mut h, &tag).await;
    let queue = h.settings.amqp.dead_letter_queue.clone();

    // `--config FILE`, like `run`: the queue's name comes from the file.
    let mut config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let amqp = &h.settings.amqp;
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
    assert_eq!(depth(&h.channel, &queue).await, 2, "list consumed");

    // Listed again, they are all still there: returning them cost nothing.
    let limited = succeeded(&cli(&h, &["list", "--limit", "1"]).await);
    assert_eq!(limited.lines().count(), 3, "{limited}");
    assert!(limited.contains("1 of 2 message(s)"), "{limited}");
    let again = succeeded(&cli(&h, &["list"]).await);
    assert!(
        again.contains(&failed) && again.contains(&rejected),
        "{again}"
    );
    assert_eq!(depth(&h.channel, &queue).await, 2);

    // An id that is not there: non-zero, and nothing moves.
    let unknown = cli(&h, &["replay", "--command-id", "dl-unknown"]).await;
    assert!(!unknown.status.success(), "{}", text(&unknown.stdout));
    assert!(
        text(&unknown.stdout).contains("not found: dl-unknown"),
        "{}",
        text(&unknown.stdout)
    );
    assert_eq!(depth(&h.channel, &queue).await, 2);
    assert_eq!(depth(&h.channel, &h.settings.amqp.commands_queue).await, 0);
    assert_eq!(h.sim.stats().calls, 1);

    let refused = cli(&h, &["purge"]).await;
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--yes"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(depth(&h.channel, &queue).await, 2);
    let purged = succeeded(&cli(&h, &["purge", "--yes"]).await);
    assert!(purged.contains("removed 2 message(s)"), "{purged}");
    assert_eq!(depth(&h.channel, &queue).await, 0);
    h.stop().await.expect("app stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_processes_a_failed_command_again_and_answers_a_completed_one_from_memory() {
    let mut h = Harness::start(|_, _| {}).await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (failed, rejected) = fill(&mut h, &tag).await;
    // Published again, the failed command is answered from memory: a second copy of it is
    // dead-lettered, with the same eventId.
    publish(&h, &command(&failed)).await;
    assert_eq!(h.next_event().await.name(), "transfer.failed");
    let queue = h.settings.amqp.dead_letter_queue.clone();
    wait_depth(&h.channel, &queue, 3).await;
    assert_eq!(h.sim.stats().calls, 1);

    // The simulator accepts from now on. Both copies go back, in order: the first is
    // processed as new, the second finds it completed.
    let out = succeeded(&cli(&h, &["replay", "--command-id", &failed]).await);
    assert!(
        out.contains("replayed 2 message(s)") && out.contains(&failed),
        "{out}"
    );
    let first = h.next_event().await;
    assert_eq!(
        (first.name(), first.command_id()),
        ("transfer.succeeded", failed.as_str())
    );
    let second = h.next_event().await;
    assert_eq!(
        (second.name(), second.command_id()),
        ("transfer.succeeded", failed.as_str())
    );
    assert_eq!(
        second.json["eventId"], first.json["eventId"],
        "the completed command is answered from memory"
    );
    assert_eq!(h.sim.stats().calls, 2, "one new call, not two");

    // Exactly those were removed: the rejected command stays.
    assert_eq!(depth(&h.channel, &queue).await, 1);
    let listed = succeeded(&cli(&h, &["list"]).await);
    assert!(listed.contains(&rejected), "{listed}");
    assert!(!listed.contains(&failed), "{listed}");
    h.stop().await.expect("app stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_republishes_as_received_and_keeps_what_it_could_not_confirm() {
    let (settings, _cleanup) = own_topology();
    let amqp = &settings.amqp;
    let (_conn, channel) = declared(amqp).await;
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
    let dead = [(body, properties.clone())];
    publish_confirmed(&channel, &amqp.dead_letter_exchange, "", dead.clone()).await;
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
    publish_confirmed(&channel, &amqp.dead_letter_exchange, "", dead).await;
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
    let (mut settings, _cleanup) = own_topology();
    settings.amqp.delivery_limit = 1;
    let amqp = &settings.amqp;
    let (_conn, channel) = declared(amqp).await;
    let body = b"\xffnot a command";
    let properties = BasicProperties::default().with_message_id("m-dl-poison".into());
    publish_confirmed(&channel, "", &amqp.commands_queue, [(body, properties)]).await;
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
