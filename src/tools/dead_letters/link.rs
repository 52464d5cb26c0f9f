//! The connection the `dead-letters` commands read the dead-letter queue through: one channel
//! whose unacked messages return to the queue when it closes.

use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::DeadLetterError;
use crate::broker::{BrokerError, connection, timed};
use crate::config::AmqpSettings;

/// A connection with one channel for reading the dead-letter queue.
pub(super) struct Link {
    /// The connection, for a publisher beside the reading channel.
    pub(super) conn: Connection,
    /// The reading channel.
    pub(super) channel: Channel,
    queue: String,
    limit: Duration,
}

impl Link {
    /// Connects as `name` and opens the reading channel.
    pub(super) async fn open(amqp: &AmqpSettings, name: &str) -> Result<Self, DeadLetterError> {
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
    pub(super) async fn depth(&self) -> Result<u32, DeadLetterError> {
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
    pub(super) async fn get(&self) -> Result<Option<lapin::message::Delivery>, DeadLetterError> {
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
    pub(super) async fn close(self, expected: Option<u32>) {
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
