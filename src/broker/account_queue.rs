//! An account's own queue beside a source queue (docs/contract.md §12, docs/fairness.md):
//! `<source>.account.<account_id>`, where commands of an account that cannot start soon wait,
//! out of the way of every other account's. It has the commands queue's arguments (quorum,
//! dead-lettered past the delivery limit, one consumer at a time), exists only while the
//! account has commands set aside there, and is consumed by whoever consumes its source.

mod reader;
mod stamps;

pub use reader::{Deliveries, QueueReader, ReaderChannel};
#[cfg(feature = "fault-injection")]
pub use reader::{FAULT_BAD_QUEUE_ACCOUNT, FAULT_BAD_QUEUE_TIMES};
pub use stamps::{MARKER, WAITING_SINCE, marker_of, waiting_since};

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::{BrokerError, timed, topology};
use crate::config::AmqpSettings;

/// Declares the queue; returns how many messages it holds. One declared by an earlier
/// version with other arguments (a lower delivery limit) is used as it is: it goes once
/// drained, and comes back with today's.
pub async fn declare(
    connection: &Connection,
    amqp: &AmqpSettings,
    queue: &str,
) -> Result<u32, BrokerError> {
    let t = amqp.operation_timeout;
    let channel = timed("channel.open", t, connection.create_channel()).await?;
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let declared = timed(
        "queue.declare",
        t,
        channel.queue_declare(queue.into(), options, topology::account_arguments(amqp)),
    )
    .await
    .map_err(|e| topology::mismatch(e, queue));
    if channel.status().connected() {
        let _ = timed("channel.close", t, channel.close(200, "declared".into())).await;
    }
    match declared {
        Ok(q) => Ok(q.message_count()),
        // Deleted in between: declared afresh next time.
        Err(e @ BrokerError::TopologyMismatch { .. }) => {
            probe(connection, amqp, queue).await?.ok_or(e)
        }
        Err(e) => Err(e),
    }
}

/// Whether the queue exists, and how many messages it holds (see [`counts`]).
pub async fn probe(
    connection: &Connection,
    amqp: &AmqpSettings,
    queue: &str,
) -> Result<Option<u32>, BrokerError> {
    Ok(counts(connection, amqp, queue).await?.map(|c| c.messages))
}

/// What a passive declare says of the queue (`None`: it does not exist). Asked on a channel
/// of its own, which the broker closes when the queue does not exist.
pub async fn counts(
    connection: &Connection,
    amqp: &AmqpSettings,
    queue: &str,
) -> Result<Option<Counts>, BrokerError> {
    let t = amqp.operation_timeout;
    let channel = timed("channel.open", t, connection.create_channel()).await?;
    let found = look(&channel, queue, t).await;
    if channel.status().connected() {
        let _ = timed("channel.close", t, channel.close(200, "looked".into())).await;
    }
    found
}

/// A passive declare of `queue` on `channel` (`None`: it does not exist, and the broker
/// closed the channel).
async fn look(
    channel: &Channel,
    queue: &str,
    t: std::time::Duration,
) -> Result<Option<Counts>, BrokerError> {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = timed(
        "queue.declare",
        t,
        channel.queue_declare(queue.into(), options, FieldTable::default()),
    )
    .await;
    match found {
        Ok(q) => Ok(Some(Counts {
            messages: q.message_count(),
            consumers: q.consumer_count(),
        })),
        Err(BrokerError::Amqp { source, .. }) if source.to_string().contains("NOT_FOUND") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What a passive declare says of a queue: ready messages and consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Ready messages (a quorum queue leaves out the unacked ones).
    pub messages: u32,
    /// Consumers, a cancelled one that still holds unacked messages included (waiting
    /// single-active consumers left out).
    pub consumers: u32,
}

/// Deletes the queue only when its holder's own reader is its one consumer and it has no
/// ready message; returns whether it is gone.
///
/// This is the second look, not the proof: the caller has read back its own marker with
/// everything before it settled (see `pipeline::lanes`). A passive declare answers 0 messages
/// and 0 consumers when the broker's count query times out or the queue has no leader, so
/// anything but exactly one consumer (the caller's reader, still registered and active, so no
/// other consumer can be handed anything between the look and the delete) leaves the queue
/// alone. A consumer cancelled with unacked messages still counts, so a former holder that
/// has not returned what it took keeps the queue too.
pub async fn delete_if_alone(
    connection: &Connection,
    amqp: &AmqpSettings,
    queue: &str,
) -> Result<Option<Counts>, BrokerError> {
    let t = amqp.operation_timeout;
    let channel = timed("channel.open", t, connection.create_channel()).await?;
    let outcome = match look(&channel, queue, t).await {
        Ok(Some(counts)) if counts.messages == 0 && counts.consumers == 1 => timed(
            "queue.delete",
            t,
            channel.queue_delete(queue.into(), QueueDeleteOptions::default()),
        )
        .await
        .map(|_| None),
        Ok(Some(counts)) => Ok(Some(counts)),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    if channel.status().connected() {
        let _ = timed("channel.close", t, channel.close(200, "looked".into())).await;
    }
    outcome
}
