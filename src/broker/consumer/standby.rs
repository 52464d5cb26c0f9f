//! The broker's own hold on the commands queue, for a worker without a fleet (docs/contract.md
//! §9): extra replicas are hot standbys, and exactly one of them holds the queue.
//!
//! A single-active-consumer queue orders its consumers but does not fence them: the broker
//! activates the next one the moment the active one is cancelled, while what the cancelled
//! one took is still unsettled, and a standby cannot tell when it became active while the
//! queue is idle. So the hold is a token instead: one message in `<queue>.holder`, a quorum
//! queue with a single active consumer. Every replica consumes it; the active consumer gets
//! the token and keeps it unacked for as long as it holds the commands queue. It registers on
//! the commands queue, and takes up its account queues, only once the token is in hand; the
//! token goes to the next replica in line only when the holder's channel closes (a kill, a
//! lost connection, or the end of an orderly hand-over, after everything else was closed),
//! because the broker returns an unacked message only then. A replica frozen past the AMQP
//! heartbeat loses its connection, and the token with it, before another can hold.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};

use crate::broker::{BrokerError, timed};

/// Puts a token into the holder queue `name`, confirmed.
async fn put_token(channel: &Channel, name: &str, t: Duration) -> Result<(), BrokerError> {
    let props = BasicProperties::default().with_delivery_mode(2);
    let publish = async {
        channel
            .basic_publish("".into(), name.into(), Default::default(), b"holder", props)
            .await?
            .await
    };
    timed("basic.publish", t, publish).await?;
    Ok(())
}

/// Sleeps until `at`; forever when there is none.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
use crate::config::AmqpSettings;

/// The queue whose token says who holds `queue`.
pub fn holder_queue(queue: &str) -> String {
    format!("{queue}.holder")
}

/// This replica's place in line for the hold of a queue, on one connection.
pub(super) struct Standby {
    channel: Channel,
    /// The holder queue.
    name: String,
    consumer: lapin::Consumer,
    /// The token, while held, and when it is to be refreshed.
    token: Option<(Delivery, tokio::time::Instant)>,
    /// The token was announced held.
    announced: bool,
    /// How often the token is handed back to the broker and taken again, so that it is never
    /// held unacked past the broker's `consumer_timeout`.
    refresh: Duration,
    t: Duration,
}

/// What the line says.
pub(super) enum InLine {
    /// The hold is this replica's now.
    Held,
    /// The line is gone (its channel or queue): the connection must go.
    Lost(String),
}

impl Standby {
    /// Joins the line for `queue`: declares its holder queue, puts a token in when it has none
    /// and nobody holds one, and consumes it.
    pub(super) async fn join(
        connection: &Connection,
        amqp: &AmqpSettings,
        queue: &str,
    ) -> Result<Self, BrokerError> {
        let t = amqp.operation_timeout;
        let name = holder_queue(queue);
        let channel = timed("channel.open", t, connection.create_channel()).await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum".as_bytes())),
        );
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let declared = timed(
            "queue.declare",
            t,
            channel.queue_declare(name.as_str().into(), options, args),
        )
        .await?;
        timed(
            "confirm.select",
            t,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        // No token ready and no consumer holding one: this replica puts one in. A count that
        // timed out answers 0 and 0 too, so a second token may appear; harmless, since only
        // the active consumer is ever handed any.
        if declared.message_count() == 0 && declared.consumer_count() == 0 {
            put_token(&channel, &name, t).await?;
        }
        timed(
            "basic.qos",
            t,
            channel.basic_qos(1, BasicQosOptions::default()),
        )
        .await?;
        let tag = format!("transfer-worker-holder-{}", uuid::Uuid::new_v4());
        let consumer = timed(
            "basic.consume",
            t,
            channel.basic_consume(
                name.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(Self {
            channel,
            name,
            consumer,
            token: None,
            announced: false,
            refresh: amqp.consumer_timeout / 4,
            t,
        })
    }

    /// The next thing the line says: the hold once it is this replica's, or the line's end;
    /// meanwhile it keeps the token fresh. Never, without a line.
    pub(super) async fn next(line: &mut Option<Self>) -> InLine {
        let Some(line) = line else {
            return std::future::pending().await;
        };
        loop {
            let refresh_at = line.token.as_ref().map(|(_, at)| *at);
            let next = tokio::select! {
                next = line.consumer.next() => next,
                () = until(refresh_at), if refresh_at.is_some() => {
                    if let Err(e) = line.refresh().await {
                        return InLine::Lost(format!("cannot keep the hold's token: {e}"));
                    }
                    continue;
                }
            };
            match next {
                Some(Ok(token)) => {
                    if let Some((old, _)) = line.token.take() {
                        // A second token while one is held (one put in after a count that
                        // timed out): one is enough.
                        let ack = old.acker.ack(BasicAckOptions::default());
                        if let Err(e) = timed("basic.ack", line.t, ack).await {
                            return InLine::Lost(format!("cannot keep the hold's token: {e}"));
                        }
                    }
                    // A token just taken over is refreshed at once: it may come back from
                    // a holder that let go, its deliveries counted, and a fresh one starts
                    // from none (RabbitMQ 4 drops a message past 20 without a word).
                    let now = tokio::time::Instant::now();
                    let at = if line.announced {
                        now + line.refresh
                    } else {
                        now
                    };
                    line.token = Some((token, at));
                    if !line.announced {
                        line.announced = true;
                        return InLine::Held;
                    }
                }
                Some(Err(e)) => return InLine::Lost(format!("the hold's line failed: {e}")),
                None => return InLine::Lost("the broker cancelled the hold's line".to_owned()),
            }
        }
    }

    /// Puts a fresh token in behind the one held and acks the old one, so that no token is
    /// ever held unacked past the broker's `consumer_timeout`. The broker hands the new one
    /// to its active consumer, this one (returning the old one instead would count a delivery
    /// against the queue's delivery limit every time). Between the ack and the new token's
    /// delivery no other consumer is active, so nobody else can be handed it.
    async fn refresh(&mut self) -> Result<(), BrokerError> {
        put_token(&self.channel, &self.name, self.t).await?;
        if let Some((old, _)) = self.token.take() {
            let ack = old.acker.ack(BasicAckOptions::default());
            timed("basic.ack", self.t, ack).await?;
        }
        Ok(())
    }

    /// Whether the line's channel is still open.
    pub(super) fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Gives the hold up: closes the line's channel, which returns the token to the broker
    /// for the next replica in line. Only once everything else taken up with it is closed.
    pub(super) async fn give(self) {
        let _ = timed(
            "channel.close",
            self.t,
            self.channel.close(200, "hold given".into()),
        )
        .await;
    }
}
