//! An account's own queue beside a source queue (docs/contract.md §12, docs/fairness.md):
//! `<source>.account.<account_id>`, where commands of an account that cannot start soon wait,
//! out of the way of every other account's. It has the commands queue's arguments (quorum,
//! dead-lettered past the delivery limit, one consumer at a time), exists only while the
//! account has commands set aside there, and is consumed by whoever consumes its source.

use lapin::Connection;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

use super::{BrokerError, timed, topology};
use crate::config::AmqpSettings;

/// Declares the queue; returns how many messages it holds.
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
        channel.queue_declare(queue.into(), options, topology::commands_arguments(amqp)),
    )
    .await
    .map_err(|e| topology::mismatch(e, queue));
    let _ = timed("channel.close", t, channel.close(200, "declared".into())).await;
    Ok(declared?.message_count())
}

/// Whether the queue exists, and how many messages it holds. Asked on a channel of its own,
/// which the broker closes when the queue does not exist.
pub async fn probe(
    connection: &Connection,
    amqp: &AmqpSettings,
    queue: &str,
) -> Result<Option<u32>, BrokerError> {
    let t = amqp.operation_timeout;
    let channel = timed("channel.open", t, connection.create_channel()).await?;
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let probed = timed(
        "queue.declare",
        t,
        channel.queue_declare(queue.into(), options, Default::default()),
    )
    .await;
    match probed {
        Ok(declared) => {
            let _ = timed("channel.close", t, channel.close(200, "probed".into())).await;
            Ok(Some(declared.message_count()))
        }
        Err(BrokerError::Amqp { source, .. }) if source.to_string().contains("NOT_FOUND") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Deletes the queue if it holds no message; false if it does (and stays).
///
/// Quorum queues refuse `queue.delete` with `if-empty` (some RabbitMQ versions with a
/// connection error), so the queue is looked at first and deleted only when empty. The caller
/// is the queue's only publisher and has nothing taken from it unsettled, so nothing can come
/// between the look and the delete.
pub async fn delete_if_empty(
    connection: &Connection,
    amqp: &AmqpSettings,
    queue: &str,
) -> Result<bool, BrokerError> {
    let t = amqp.operation_timeout;
    let channel = timed("channel.open", t, connection.create_channel()).await?;
    let look = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = timed(
        "queue.declare",
        t,
        channel.queue_declare(queue.into(), look, FieldTable::default()),
    )
    .await;
    let deleted = match found {
        Ok(q) if q.message_count() > 0 => Ok(false),
        Ok(_) => timed(
            "queue.delete",
            t,
            channel.queue_delete(queue.into(), QueueDeleteOptions::default()),
        )
        .await
        .map(|_| true),
        Err(BrokerError::Amqp { source, .. }) if source.to_string().contains("NOT_FOUND") => {
            return Ok(true);
        }
        Err(e) => Err(e),
    };
    if channel.status().connected() {
        let _ = timed("channel.close", t, channel.close(200, "looked".into())).await;
    }
    deleted
}
