//! `transfer-worker dead-letters list | replay | purge` (docs/contract.md §11): the dead-letter
//! queue (`amqp.dead_letter_queue`), inspected, replayed to the commands queue, or emptied.
//!
//! Reading never consumes. Messages are taken with `basic.get` without auto-ack on a channel
//! of their own, at most as many as the queue held when the command started (so a message
//! returned or newly dead-lettered meanwhile is never read twice), and every one not acked
//! returns to the queue when that channel closes. A replayed message is acked — removed — only
//! after the broker confirmed its copy on the commands queue: a failure leaves it where it was.
//! The dead-letter queue has no delivery limit, so returning a message costs it nothing.

pub mod letter;

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, SystemTime};

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

use crate::broker::{BrokerError, PublishError, Publisher, connection, timed};
use crate::config::AmqpSettings;
use letter::{Letter, human_age};

/// Widest error shown in a listing, in characters.
const ERROR_WIDTH: usize = 72;

/// Why a `dead-letters` command did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The queue is not on the broker.
    #[error("queue {0} does not exist: start the worker once (it declares the topology)")]
    NoQueue(String),
    /// `purge` without `--yes`.
    #[error("purge removes every message of {0} for good; run it again with --yes to do it")]
    PurgeNotConfirmed(String),
    /// `replay` ended with work undone; the report says what.
    #[error("{0}")]
    Incomplete(String),
}

/// What `list` found.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The dead-letter queue.
    pub queue: String,
    /// Messages it held when the listing started.
    pub depth: u32,
    /// The first of them, described.
    pub letters: Vec<Letter>,
}

impl fmt::Display for Listing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<[String; 4]> = self
            .letters
            .iter()
            .map(|l| {
                let id = match l.id_source.note() {
                    Some(note) => format!("{} ({note})", l.command_id),
                    None => l.command_id.clone(),
                };
                let age = l.age.map_or_else(|| "-".to_owned(), human_age);
                [id, l.event.clone(), age, shorten(&l.error, ERROR_WIDTH)]
            })
            .collect();
        let header = ["COMMAND ID", "EVENT", "AGE", "ERROR"].map(str::to_owned);
        let width = |i: usize| {
            rows.iter()
                .chain([&header])
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        };
        let (w0, w1, w2) = (width(0), width(1), width(2));
        for row in [&header].into_iter().chain(&rows) {
            let line = format!("{:w0$}  {:w1$}  {:w2$}  {}", row[0], row[1], row[2], row[3]);
            writeln!(f, "{}", line.trim_end())?;
        }
        let shown = self.letters.len();
        let depth = self.depth;
        if u32::try_from(shown).is_ok_and(|n| n == depth) {
            writeln!(f, "{depth} message(s) in {}", self.queue)
        } else {
            writeln!(f, "{shown} of {depth} message(s) in {} shown", self.queue)
        }
    }
}

/// The first `max` characters of `s` on one line, with an ellipsis if cut.
fn shorten(s: &str, max: usize) -> String {
    let line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

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

/// Lists the dead-letter queue's messages, at most `limit`, leaving every one in place.
pub async fn list(amqp: &AmqpSettings, limit: Option<usize>) -> Result<Listing, DeadLetterError> {
    let link = Link::open(amqp, "transfer-worker dead-letters list").await?;
    let result = async {
        let depth = link.depth().await?;
        let wanted = limit.map_or(depth, |n| depth.min(u32::try_from(n).unwrap_or(u32::MAX)));
        let now = SystemTime::now();
        let mut letters = Vec::new();
        // Held unacked until the channel closes: each get returns the next message, never one
        // already read.
        for _ in 0..wanted {
            let Some(message) = link.get().await? else {
                break;
            };
            letters.push(Letter::read(&message.data, &message.properties, now));
        }
        Ok(Listing {
            queue: amqp.dead_letter_queue.clone(),
            depth,
            letters,
        })
    }
    .await;
    let expected = result.as_ref().ok().map(|listing| listing.depth);
    link.close(expected).await;
    result
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

/// Empties the dead-letter queue, returning how many messages it removed; refuses unless
/// `confirmed` (`--yes`).
pub async fn purge(amqp: &AmqpSettings, confirmed: bool) -> Result<u32, DeadLetterError> {
    let queue = &amqp.dead_letter_queue;
    if !confirmed {
        return Err(DeadLetterError::PurgeNotConfirmed(queue.clone()));
    }
    let link = Link::open(amqp, "transfer-worker dead-letters purge").await?;
    let result = async {
        link.depth().await?;
        let purged = timed(
            "queue.purge",
            amqp.operation_timeout,
            link.channel
                .queue_purge(queue.as_str().into(), QueuePurgeOptions::default()),
        )
        .await?;
        Ok(purged)
    }
    .await;
    link.close(None).await;
    result
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

/// A connection with one channel for reading the dead-letter queue.
struct Link {
    conn: Connection,
    channel: Channel,
    queue: String,
    limit: Duration,
}

impl Link {
    async fn open(amqp: &AmqpSettings, name: &str) -> Result<Self, DeadLetterError> {
        let limit = amqp.operation_timeout;
        let conn = connection::connect(amqp, name).await?;
        let channel = match timed("channel.open", limit, conn.create_channel()).await {
            Ok(channel) => channel,
            Err(e) => {
                let _ = tokio::time::timeout(limit, conn.close(200, "done".into())).await;
                return Err(e.into());
            }
        };
        Ok(Self {
            conn,
            channel,
            queue: amqp.dead_letter_queue.clone(),
            limit,
        })
    }

    /// The queue's depth, from a passive declare: ready messages, not those others hold.
    async fn depth(&self) -> Result<u32, DeadLetterError> {
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = timed(
            "queue.declare",
            self.limit,
            self.channel
                .queue_declare(self.queue.as_str().into(), options, FieldTable::default()),
        )
        .await;
        match declared {
            Ok(queue) => Ok(queue.message_count()),
            Err(BrokerError::Amqp { source, .. }) if source.to_string().contains("NOT_FOUND") => {
                Err(DeadLetterError::NoQueue(self.queue.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The next message, held unacked; `None` if the queue has no more ready.
    async fn get(&self) -> Result<Option<lapin::message::Delivery>, DeadLetterError> {
        let got = timed(
            "basic.get",
            self.limit,
            self.channel.basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            ),
        )
        .await?;
        Ok(got.map(|m| m.delivery))
    }

    /// Closes the reading channel first: whatever it holds unacked returns to the queue. The
    /// broker puts them back asynchronously, so with `expected` (the depth there should be
    /// again) it waits, up to `amqp.operation_timeout`, until the queue holds at least that
    /// many: when the command ends, a listing has left the depth as it was. (Another
    /// consumer of the queue may keep it lower; then the wait just ends.)
    async fn close(self, expected: Option<u32>) {
        let _ = timed(
            "channel.close",
            self.limit,
            self.channel.close(200, "done".into()),
        )
        .await;
        if let Some(expected) = expected {
            let _ = tokio::time::timeout(self.limit, self.returned(expected)).await;
        }
        let _ = tokio::time::timeout(self.limit, self.conn.close(200, "done".into())).await;
    }

    async fn returned(&self, expected: u32) {
        let Ok(channel) = self.conn.create_channel().await else {
            return;
        };
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        loop {
            let declared = channel
                .queue_declare(self.queue.as_str().into(), options, FieldTable::default())
                .await;
            match declared {
                Ok(queue) if queue.message_count() < expected => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                _ => break,
            }
        }
        let _ = channel.close(200, "done".into()).await;
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
    fn errors_are_shortened_to_one_line() {
        assert_eq!(shorten("a\nb", 10), "a b");
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abcd", 4), "abcd");
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
