//! `dead-letters replay`: the selected dead letters republished to the commands queue as
//! received, each removed from the dead-letter queue once the broker confirmed its copy.

use std::collections::BTreeSet;
use std::fmt;
use std::time::SystemTime;

use lapin::BasicProperties;
use lapin::options::BasicAckOptions;
use lapin::types::FieldTable;

use super::DeadLetterError;
use super::letter::Letter;
use super::link::Link;
use crate::broker::{PublishError, Publisher, timed};
use crate::config::AmqpSettings;

/// Which dead letters `replay` takes.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every one in the queue when it starts.
    All,
    /// Those whose command id is one of these (every copy of each).
    Ids(BTreeSet<String>),
}

/// What `replay` did.
#[derive(Debug, Clone, Default)]
pub struct Replayed {
    /// The dead-letter queue.
    pub queue: String,
    /// The commands queue the replays went to.
    pub commands_queue: String,
    /// Command ids replayed and removed from the dead-letter queue, in order (an id twice
    /// if two copies were).
    pub replayed: Vec<String>,
    /// Ids asked for that were not in the queue.
    pub not_found: Vec<String>,
    /// What went wrong, if a replay did: it stopped there, and what was not replayed stayed.
    pub failed: Option<String>,
}

impl Replayed {
    /// `Ok` if every message asked for was replayed; else the error that says what was not,
    /// for a non-zero exit.
    pub fn into_result(self) -> Result<(), DeadLetterError> {
        let mut problems = Vec::new();
        if let Some(failed) = &self.failed {
            problems.push(failed.clone());
        }
        if !self.not_found.is_empty() {
            problems.push(format!(
                "not in {}: {}",
                self.queue,
                self.not_found.join(", ")
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DeadLetterError::Incomplete(problems.join("; ")))
        }
    }
}

impl fmt::Display for Replayed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "replayed {} message(s) to {}{}{}",
            self.replayed.len(),
            self.commands_queue,
            if self.replayed.is_empty() { "" } else { ": " },
            self.replayed.join(", ")
        )?;
        if let Some(failed) = &self.failed {
            writeln!(f, "stopped: {failed}")?;
        }
        if !self.not_found.is_empty() {
            writeln!(f, "not found: {}", self.not_found.join(", "))?;
        }
        Ok(())
    }
}
/// Republishes the selected dead letters to the commands queue as received, each removed from
/// the dead-letter queue once the broker confirmed its copy. Stops at the first copy not
/// confirmed; what was not replayed stays in the dead-letter queue, untouched.
pub async fn replay(
    amqp: &AmqpSettings,
    selection: Selection,
) -> Result<Replayed, DeadLetterError> {
    let link = Link::open(amqp, "transfer-worker dead-letters replay").await?;
    let result = async {
        let publisher = Publisher::open(&link.conn, amqp).await?;
        let depth = link.depth().await?;
        let mut report = Replayed {
            queue: amqp.dead_letter_queue.clone(),
            commands_queue: amqp.commands_queue.clone(),
            ..Default::default()
        };
        let mut seen = BTreeSet::new();
        let now = SystemTime::now();
        for _ in 0..depth {
            let Some(message) = link.get().await? else {
                break;
            };
            let id = Letter::read(&message.data, &message.properties, now).command_id;
            let chosen = match &selection {
                Selection::All => true,
                Selection::Ids(ids) => ids.contains(&id),
            };
            if !chosen {
                // Not acked: it returns to the queue when the channel closes.
                continue;
            }
            seen.insert(id.clone());
            let properties = as_received(&message.properties);
            if let Err(e) = publisher.publish_command(&message.data, properties).await {
                report.failed = Some(format!(
                    "the replay of {id} was not confirmed ({}); it and the rest stay in {}",
                    describe(&e),
                    report.queue
                ));
                break;
            }
            let ack = message.acker.ack(BasicAckOptions::default());
            if let Err(e) = timed("basic.ack", amqp.operation_timeout, ack).await {
                // Confirmed on the commands queue, still in the dead-letter queue: a second
                // replay of it is answered from memory if it completes this time.
                report.failed = Some(format!(
                    "{id} was replayed but could not be removed from {} ({e}); it is in both \
                     queues now",
                    report.queue
                ));
                break;
            }
            report.replayed.push(id);
        }
        if let Selection::Ids(ids) = &selection
            && report.failed.is_none()
        {
            report.not_found = ids.difference(&seen).cloned().collect();
        }
        publisher.close(amqp.operation_timeout).await;
        let left = u32::try_from(report.replayed.len())
            .ok()
            .and_then(|n| depth.checked_sub(n));
        Ok((report, left))
    }
    .await;
    match result {
        Ok((report, left)) => {
            link.close(left).await;
            Ok(report)
        }
        Err(e) => {
            link.close(None).await;
            Err(e)
        }
    }
}

/// The properties a dead letter is replayed with: as received, but for the broker's
/// `x-delivery-count`, which counts deliveries from the dead-letter queue itself (this
/// tool's reads), not anything about the command.
fn as_received(received: &BasicProperties) -> BasicProperties {
    match received.headers() {
        Some(headers) if headers.inner().contains_key("x-delivery-count") => {
            let mut kept = FieldTable::default();
            for (key, value) in headers.inner() {
                if key.as_str() != "x-delivery-count" {
                    kept.insert(key.clone(), value.clone());
                }
            }
            received.clone().with_headers(kept)
        }
        _ => received.clone(),
    }
}

fn describe(e: &PublishError) -> String {
    match e {
        PublishError::Unroutable(queue) => format!("queue {queue} does not exist"),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, LongString};

    use super::*;

    #[test]
    fn replayed_properties_keep_everything_but_the_dead_letter_queues_delivery_count() {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-transfer-event".into(),
            AMQPValue::LongString(LongString::from("transfer.failed".as_bytes())),
        );
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        let received = BasicProperties::default()
            .with_headers(headers)
            .with_message_id("m-1".into())
            .with_timestamp(7);
        let replayed = as_received(&received);
        let kept = replayed.headers().as_ref().unwrap().inner();
        assert!(kept.contains_key("x-transfer-event"));
        assert!(!kept.contains_key("x-delivery-count"));
        assert_eq!(replayed.message_id(), received.message_id());
        assert_eq!(replayed.timestamp(), &Some(7));
    }

    #[test]
    fn a_replay_with_ids_missing_is_an_error_naming_them() {
        let report = Replayed {
            queue: "dead".into(),
            commands_queue: "commands".into(),
            replayed: vec!["c-1".into()],
            not_found: vec!["c-9".into()],
            failed: None,
        };
        let text = report.to_string();
        assert!(
            text.contains("replayed 1 message(s) to commands: c-1"),
            "{text}"
        );
        assert!(text.contains("not found: c-9"), "{text}");
        let err = report.into_result().unwrap_err().to_string();
        assert!(err.contains("c-9"), "{err}");
    }
}
