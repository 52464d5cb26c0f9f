//! The floor, run as a child process (`--floor-child QUEUE EXCHANGE PREFETCH API_BASE_URL`):
//! the least any worker calling this API must do per command. Consume, parse the command, make
//! one call with a token minted once at start, publish one event with confirm, ack. No retries,
//! pacing, sessions, outcome cache, metrics or logs. One task per delivery, as in the worker.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use lapin::types::ShortString;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use transfer_worker::agentassist::jwt::TokenSource;

use crate::relay::{Link, publish_then_settle};
use crate::run::{ACCOUNT_ID, CLIENT_ID, CLIENT_SECRET, STREAM_ID};

/// Per call, from connect to the last byte.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What every delivery's task shares.
struct Floor {
    publisher: Channel,
    exchange: ShortString,
    http: reqwest::Client,
    url: String,
    token: String,
}

/// The fields of a command the call needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Command<'a> {
    command_id: &'a str,
    org_id: &'a str,
    bot_session_id: &'a str,
    a_id: Option<&'a str>,
    queue_id: Option<&'a str>,
}

/// The body `assign-conversation` expects.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    org_id: &'a str,
    bot_session_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    a_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    transferred_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_id: Option<&'a str>,
}

/// The terminal event.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    event: &'static str,
    command_id: &'a str,
    attempts: u32,
    response: &'a RawValue,
}

/// Runs until the connection or the consumer ends (the bench stops it with SIGTERM).
pub async fn run(
    url: &str,
    queue: &str,
    exchange: &str,
    prefetch: u16,
    api_base_url: &str,
) -> anyhow::Result<()> {
    let token = TokenSource::new(
        CLIENT_ID.into(),
        &SecretString::from(CLIENT_SECRET),
        None,
        false,
    )
    .token()?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::from(prefetch))
        .timeout(CALL_TIMEOUT)
        .build()
        .context("cannot build the HTTP client")?;
    let name = "transfer-worker bench floor";
    let mut link = Link::open(url, name, "bench-floor", queue, prefetch).await?;
    let floor = Arc::new(Floor {
        publisher: link.publisher.clone(),
        exchange: exchange.into(),
        http,
        url: format!(
            "{}/agentassist/api/v1/public/{STREAM_ID}/assign-conversation",
            api_base_url.trim_end_matches('/')
        ),
        token: token.expose().to_owned(),
    });
    loop {
        let delivery = link.next().await?;
        let floor = Arc::clone(&floor);
        tokio::spawn(async move { floor.handle(delivery).await });
    }
}

impl Floor {
    /// Call, publish the event, wait for its confirm, then ack (or return the command to the
    /// queue when the publish failed). A command that does not parse is dropped.
    async fn handle(&self, delivery: Delivery) {
        let Ok(command) = serde_json::from_slice::<Command<'_>>(&delivery.data) else {
            eprintln!("floor: a command did not parse; dropped");
            let _ = delivery.acker.nack(BasicNackOptions::default()).await;
            return;
        };
        let (event, body) = self.call(&command).await;
        let owned;
        let response = match serde_json::from_slice::<&RawValue>(&body) {
            Ok(raw) => raw,
            Err(_) => {
                let text = String::from_utf8_lossy(&body);
                owned = serde_json::value::to_raw_value(&text).expect("a string serializes");
                &owned
            }
        };
        let event_body = serde_json::to_vec(&Event {
            event,
            command_id: command.command_id,
            attempts: 1,
            response,
        })
        .expect("the event serializes");
        let exchange = self.exchange.clone();
        publish_then_settle(
            "floor",
            &self.publisher,
            exchange,
            event,
            &event_body,
            &delivery,
        )
        .await;
    }

    /// One POST: the event's name and the response body (the error's text when none came).
    async fn call(&self, command: &Command<'_>) -> (&'static str, Bytes) {
        let (a_id, transferred_type, queue_id) = match command.a_id {
            Some(a) => (Some(a), None, None),
            None => (None, Some("QUEUE"), command.queue_id),
        };
        let body = Body {
            org_id: command.org_id,
            bot_session_id: command.bot_session_id,
            a_id,
            transferred_type,
            queue_id,
        };
        let body = serde_json::to_vec(&body).expect("the request body serializes");
        let sent = self
            .http
            .post(&self.url)
            .header("auth", &self.token)
            .header("accountid", ACCOUNT_ID)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let answer = match sent {
            Ok(response) => {
                let ok = response.status().is_success();
                response.bytes().await.map(|b| (ok, b))
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok((true, bytes)) => ("transfer.succeeded", bytes),
            Ok((false, bytes)) => ("transfer.failed", bytes),
            Err(e) => ("transfer.failed", Bytes::from(e.to_string())),
        }
    }
}
