//! The queues and exchanges of docs/contract.md §1, declared idempotently at every (re)connect.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::{BrokerError, timed};
use crate::config::AmqpSettings;

/// Declares the commands queue, the results and dead-letter exchanges and the dead-letter
/// queue. A mismatch with what exists is reported as [`BrokerError::TopologyMismatch`].
pub async fn declare(channel: &Channel, amqp: &AmqpSettings) -> Result<(), BrokerError> {
    let t = amqp.operation_timeout;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let exchange = |name: &str, kind: ExchangeKind| {
        timed(
            "exchange.declare",
            t,
            channel.exchange_declare(name.into(), kind, durable, FieldTable::default()),
        )
    };
    exchange(&amqp.results_exchange, ExchangeKind::Topic)
        .await
        .map_err(|e| mismatch(e, &amqp.results_exchange))?;
    exchange(&amqp.dead_letter_exchange, ExchangeKind::Fanout)
        .await
        .map_err(|e| mismatch(e, &amqp.dead_letter_exchange))?;

    queue(channel, &amqp.commands_queue, commands_arguments(amqp), t).await?;
    queue(channel, &amqp.dead_letter_queue, quorum(), t).await?;
    timed(
        "queue.bind",
        t,
        channel.queue_bind(
            amqp.dead_letter_queue.as_str().into(),
            amqp.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    Ok(())
}

/// The arguments of the commands queue, and of its partitions: quorum, dead-lettered past the
/// delivery limit, one consumer at a time (docs/contract.md §9). With a single active consumer,
/// further replicas on the commands queue are hot standbys, and commands are taken in order by
/// exactly one of them; on a partition, a new owner waits until the old one let go.
pub(crate) fn commands_arguments(amqp: &AmqpSettings) -> FieldTable {
    let mut commands = quorum();
    commands.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(amqp.dead_letter_exchange.as_bytes())),
    );
    commands.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(i32::try_from(amqp.delivery_limit).unwrap_or(i32::MAX)),
    );
    commands.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    commands
}

/// How often a command in an account queue may be delivered before the broker dead-letters
/// it, at least: a safety net only. Poison is screened on the source, within
/// `amqp.delivery_limit`; a command set aside is delivered again at every hand-over while it
/// waits (the reader's prefetch goes back when a holder lets go, and RabbitMQ counts those
/// returns, or every delivery from 4.0), and must never run out of deliveries for that.
pub(crate) const ACCOUNT_QUEUE_DELIVERY_LIMIT: u32 = 1_000;

/// The arguments of an account queue: the commands queue's, with a delivery limit of
/// [`ACCOUNT_QUEUE_DELIVERY_LIMIT`] (or `amqp.delivery_limit`, if more).
pub(crate) fn account_arguments(amqp: &AmqpSettings) -> FieldTable {
    let mut arguments = commands_arguments(amqp);
    let limit = amqp.delivery_limit.max(ACCOUNT_QUEUE_DELIVERY_LIMIT);
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(i32::try_from(limit).unwrap_or(i32::MAX)),
    );
    arguments
}

/// Declares the partition queues `{commands_queue}.p0` … `.p{partitions-1}` of a fleet, with
/// the commands queue's arguments.
pub async fn declare_partitions(
    channel: &Channel,
    amqp: &AmqpSettings,
    partitions: u16,
) -> Result<(), BrokerError> {
    for k in 0..partitions {
        let name = crate::contract::names::partition_queue(&amqp.commands_queue, k);
        queue(
            channel,
            &name,
            commands_arguments(amqp),
            amqp.operation_timeout,
        )
        .await?;
    }
    Ok(())
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum".as_bytes())),
    );
    args
}

pub(crate) async fn queue(
    channel: &Channel,
    name: &str,
    args: FieldTable,
    t: std::time::Duration,
) -> Result<(), BrokerError> {
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    timed(
        "queue.declare",
        t,
        channel.queue_declare(name.into(), options, args),
    )
    .await
    .map(drop)
    .map_err(|e| mismatch(e, name))
}

/// PRECONDITION_FAILED (406) on a declare means "exists with other arguments".
pub(crate) fn mismatch(error: BrokerError, name: &str) -> BrokerError {
    if let BrokerError::Amqp { source, .. } = &error {
        let text = source.to_string();
        if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
            return BrokerError::TopologyMismatch {
                name: name.to_owned(),
                reason: text,
            };
        }
    }
    error
}

/// A server-named queue that lives as long as this connection: where a tool receives replies
/// or watches events.
pub async fn private_queue(
    channel: &Channel,
    t: std::time::Duration,
) -> Result<lapin::types::ShortString, BrokerError> {
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let queue = timed(
        "queue.declare",
        t,
        channel.queue_declare("".into(), options, FieldTable::default()),
    )
    .await?;
    Ok(queue.name().clone())
}

/// Consumes `queue` without acks: for tools that watch replies or events, never for commands.
pub async fn watch(
    channel: &Channel,
    queue: lapin::types::ShortString,
    t: std::time::Duration,
) -> Result<lapin::Consumer, BrokerError> {
    let options = lapin::options::BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    timed(
        "basic.consume",
        t,
        channel.basic_consume(queue, "".into(), options, FieldTable::default()),
    )
    .await
}
