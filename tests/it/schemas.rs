//! The JSON Schemas in docs/schemas describe what the worker really publishes and accepts.

use std::time::Duration;

use jsonschema::Validator;
use serde_json::{Value, json};
use transfer_worker::tools::simulator::Reply;

use crate::harness::{Harness, Received, agent_command, queue_command, sim};
use crate::relay::post_json;

pub fn schema(file: &str) -> Validator {
    let path = format!("{}/docs/schemas/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let schema: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(
        schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
        "{file}"
    );
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{file} is not a valid schema: {e}"))
}

fn errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}

pub fn assert_valid(validator: &Validator, file: &str, instance: &Value) {
    let errors = errors(validator, instance);
    assert!(
        errors.is_empty(),
        "{file} rejects {instance}:\n{}",
        errors.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_and_sent_commands_match_the_schemas() {
    let mut h = Harness::start(|_, sim| sim::call_back_after(sim, Duration::from_millis(50))).await;
    let mut commands = Vec::new();
    let mut events: Vec<Received> = Vec::new();

    // transfer.succeeded, and its transfer.callback
    let c = agent_command("schema-ok", "0123456789abcdef00005c01");
    h.publish(&c).await;
    commands.push(c);
    events.extend(h.events(2).await);
    // transfer.failed: a scripted 400 (no callback for a refused transfer)
    h.sim.script([Reply::Status(400)]);
    let c = queue_command("schema-refused", "0123456789abcdef00005c02");
    h.publish(&c).await;
    commands.push(c);
    events.push(h.next_event().await);
    // transfer.expired
    let mut c = agent_command("schema-late", "0123456789abcdef00005c03");
    c["expiresAt"] = json!("2020-01-01T00:00:00Z");
    h.publish(&c).await;
    commands.push(c);
    events.push(h.next_event().await);
    // transfer.rejected, with the ids it could read and null for the rest
    h.publish_raw(
        br#"{"commandId":"schema-bad","botSessionId":"s","aId":"a-1"}"#,
        lapin::BasicProperties::default(),
    )
    .await;
    events.push(h.next_event().await);
    // transfer.rejected for a body that is not JSON at all: every id null but the hash
    h.publish_raw(b"not json", lapin::BasicProperties::default())
        .await;
    events.push(h.next_event().await);
    // transfer.callback with a payload that is not JSON
    let url = h.sim.requests()[0].body["callbackUrl"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        crate::relay::post(&url, Some("text/plain"), b"agent accepted".to_vec()).await,
        reqwest::StatusCode::OK
    );
    events.push(h.next_event().await);
    assert_eq!(post_json(&url, &json!([1, "two", null])).await, 200);
    events.push(h.next_event().await);

    let mut names: Vec<&str> = events.iter().map(|e| e.name()).collect();
    names.sort();
    names.dedup();
    assert_eq!(
        names,
        [
            "transfer.callback",
            "transfer.expired",
            "transfer.failed",
            "transfer.rejected",
            "transfer.succeeded"
        ]
    );
    let any = schema("event.json");
    for e in &events {
        let file = format!("{}.json", e.name());
        assert_eq!(e.routing_key, e.name());
        assert_valid(&schema(&file), &file, &e.json);
        assert_valid(&any, "event.json", &e.json);
        // An event valid for another event's schema would mean the schemas do not tell them
        // apart.
        for other in [
            "transfer.succeeded",
            "transfer.failed",
            "transfer.rejected",
            "transfer.expired",
            "transfer.callback",
        ] {
            if other != e.name() {
                let file = format!("{other}.json");
                assert!(
                    !schema(&file).is_valid(&e.json),
                    "{file} accepts {}",
                    e.json
                );
            }
        }
    }

    // The schemas are strict: one stray field and a real event is invalid.
    for e in &events {
        let own = schema(&format!("{}.json", e.name()));
        let mut stray = e.json.clone();
        stray["extra"] = json!(1);
        assert!(!own.is_valid(&stray), "a stray field passes: {stray}");
        assert!(!any.is_valid(&stray), "a stray field passes: {stray}");
        let mut renamed = e.json.clone();
        let attempts = renamed.as_object_mut().unwrap().remove("attempts").unwrap();
        renamed["attempt"] = attempts;
        assert!(!own.is_valid(&renamed), "a renamed field passes: {renamed}");
        assert!(!any.is_valid(&renamed), "a renamed field passes: {renamed}");
    }

    // What the tests publish is what the command schema describes.
    let command = schema("command.json");
    for c in &commands {
        assert_valid(&command, "command.json", c);
    }
    for (i, valid) in [agent_command("x", "s"), queue_command("x", "s")]
        .iter()
        .enumerate()
    {
        assert_valid(&command, &format!("command.json (helper {i})"), valid);
    }
    // And what it rejects, it rejects: two targets, or none.
    let mut both = agent_command("both", "s");
    both["transferredType"] = json!("QUEUE");
    both["queueId"] = json!("q-1");
    assert!(!command.is_valid(&both), "{both}");
    let mut none = agent_command("none", "s");
    none.as_object_mut().unwrap().remove("aId");
    assert!(!command.is_valid(&none), "{none}");
    h.stop().await.unwrap();
}
