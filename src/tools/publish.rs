//! `transfer-worker publish`: enqueue one command the way an upstream system would, and
//! optionally wait for its outcome on a private `reply_to` queue.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use serde_json::{Map, Value};

use crate::broker::{BrokerError, PublishError, Publisher, connection, timed, topology};
use crate::config::{AmqpSettings, MAX_COMMAND_BYTES};
use crate::json;

/// Why a command could not be enqueued or its outcome not awaited.
#[derive(Debug, thiserror::Error)]
pub enum PublishCommandError {
    /// The command is not a JSON object or is too large.
    #[error("invalid command: {0}")]
    Invalid(String),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The broker could not route the command: the queue does not exist.
    #[error("queue {0} does not exist: start the worker once (it declares the topology)")]
    NoQueue(String),
    /// The broker refused it.
    #[error("the broker refused the command")]
    Nacked,
    /// The publish failed otherwise.
    #[error(transparent)]
    Publish(PublishError),
    /// No outcome in time.
    #[error("no outcome within {0:?}; the command is still queued or in flight")]
    WaitTimeout(Duration),
}

/// What was published.
#[derive(Debug, Clone)]
pub struct Published {
    /// The id the worker will use.
    pub command_id: String,
    /// The terminal event, if waited for.
    pub outcome: Option<Value>,
}

/// Fields of a command given on the command line.
#[derive(Debug, Clone, Default)]
pub struct CommandFields {
    /// `commandId`.
    pub command_id: Option<String>,
    /// `streamId`.
    pub stream_id: Option<String>,
    /// `orgId`.
    pub org_id: String,
    /// `botSessionId`.
    pub bot_session_id: String,
    /// `aId`.
    pub agent: Option<String>,
    /// `queueId` (with `transferredType: QUEUE`).
    pub queue: Option<String>,
    /// `callbackUrl`.
    pub callback_url: Option<String>,
    /// `expiresAt`.
    pub expires_at: Option<String>,
}

impl CommandFields {
    /// The command body.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                m.insert(k.into(), Value::String(v.clone()));
            }
        };
        put("commandId", &self.command_id);
        put("streamId", &self.stream_id);
        put("orgId", &Some(self.org_id.clone()));
        put("botSessionId", &Some(self.bot_session_id.clone()));
        put("aId", &self.agent);
        if self.queue.is_some() {
            put("transferredType", &Some("QUEUE".into()));
        }
        put("queueId", &self.queue);
        put("callbackUrl", &self.callback_url);
        put("expiresAt", &self.expires_at);
        Value::Object(m)
    }
}

/// Publishes `command` (a JSON object) to the commands queue with a confirm. A command without
/// `commandId` gets a fresh one, so the printed id is the one every event will carry.
pub async fn publish_command(
    amqp: &AmqpSettings,
    mut command: Value,
    wait: Option<Duration>,
) -> Result<Published, PublishCommandError> {
    let Value::Object(fields) = &mut command else {
        return Err(PublishCommandError::Invalid(
            "a command is a JSON object".into(),
        ));
    };
    let command_id = match fields.get("commandId") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => {
            let id = uuid::Uuid::new_v4().to_string();
            fields.insert("commandId".into(), Value::String(id.clone()));
            id
        }
    };
    let body = serde_json::to_vec(&command).expect("JSON values serialize");
    if body.len() > MAX_COMMAND_BYTES {
        return Err(PublishCommandError::Invalid(format!(
            "{} bytes; the limit is {MAX_COMMAND_BYTES}",
            body.len()
        )));
    }
    let t = amqp.operation_timeout;
    let conn = connection::connect_any(amqp, "transfer-worker publish").await?;
    let publisher = Publisher::open(&conn, amqp).await?;
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(command_id.as_str().into())
        .with_correlation_id(command_id.as_str().into())
        .with_timestamp(unix_now());
    let mut replies = None;
    if wait.is_some() {
        let channel = timed("channel.open", t, conn.create_channel()).await?;
        let queue = topology::private_queue(&channel, t).await?;
        let consumer = topology::watch(&channel, queue.clone(), t).await?;
        properties = properties.with_reply_to(queue);
        replies = Some((channel, consumer));
    }
    publisher
        .publish_command(&body, properties)
        .await
        .map_err(|e| match e {
            PublishError::Unroutable(queue) => PublishCommandError::NoQueue(queue),
            PublishError::Nacked(_) => PublishCommandError::Nacked,
            e => PublishCommandError::Publish(e),
        })?;
    let mut outcome = None;
    if let (Some(limit), Some((_channel, mut consumer))) = (wait, replies) {
        let delivery = tokio::time::timeout(limit, consumer.next())
            .await
            .map_err(|_| PublishCommandError::WaitTimeout(limit))?;
        if let Some(Ok(delivery)) = delivery {
            outcome = Some(json::value_or_string(&delivery.data));
        }
    }
    let _ = tokio::time::timeout(t, conn.close(200, "done".into())).await;
    Ok(Published {
        command_id,
        outcome,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
