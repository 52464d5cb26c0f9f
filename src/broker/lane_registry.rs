//! Which account queues a source has (docs/fairness.md, "Which account queues a source has"):
//! `<source>.lanes`, a quorum queue beside the source holding one message, the list of its
//! account queues as the source's holder last wrote it. A holder writes the list with a queue in
//! it before it declares that queue, and without it only after the queue is deleted; a new
//! holder reads it when it takes the source up. So taking up a source is one read, however many
//! bots are configured.
//!
//! The queue keeps the latest few lists ([`KEPT`], dropping the oldest), and a list read is
//! the union of every message there: a list that arrives late (a write whose confirm timed out,
//! landing after a newer one) adds names, which cost a look, and drops none. A holder reads by
//! taking every message there, unacked, and acks them once it has written its own list (their
//! union, less the queues found gone): should it die in between, they come back. Only the
//! holder writes; anyone else only looks ([`peek`]), and returns what it took by closing its
//! channel (a holder that finds the queue empty meanwhile waits for them to come back: see
//! [`Taken::exists`]).

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use serde::{Deserialize, Serialize};

use super::{BrokerError, PublishError, Publisher, timed};
use crate::config::AmqpSettings;

/// How often the list may be delivered before the broker drops it: never, in practice. A
/// look returns it by closing its channel, which RabbitMQ counts; 4.0 and later would drop it
/// after 20 by default.
const DELIVERY_LIMIT: i32 = 1_000_000;

/// Lists the queue keeps: the latest, and a few before it.
pub const KEPT: i32 = 4;

/// One account queue of a source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Entry {
    /// The account whose commands wait there.
    pub account: String,
    /// The queue's name.
    pub queue: String,
}

/// The message: every account queue the source may have.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct List {
    /// The account queues.
    pub queues: Vec<Entry>,
    /// Until when (ms since the Unix epoch) a holder also looks for each account's queue under
    /// the name earlier versions gave it, and names new ones so: while replicas of an earlier
    /// version may still hold the source (docs/fairness.md, "Which account queues a source
    /// has").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_names_until: Option<u64>,
}

/// A list as it came from the broker; `None` if the message is not one (it is dropped with
/// the holder's next write).
pub fn parse(body: &[u8]) -> Option<List> {
    serde_json::from_slice(body).ok()
}

impl List {
    /// Adds what `other` lists.
    fn merge(&mut self, other: List) {
        for entry in other.queues {
            if !self.queues.contains(&entry) {
                self.queues.push(entry);
            }
        }
        self.old_names_until = self.old_names_until.max(other.old_names_until);
    }
}

/// The arguments of a list's queue: quorum (it outlives any one broker node, as commands
/// do), the latest message only.
fn arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum".as_bytes())),
    );
    args.insert("x-max-length".into(), AMQPValue::LongInt(KEPT));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("drop-head".as_bytes())),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(DELIVERY_LIMIT),
    );
    args
}

/// At connect, before the sources are declared: a source the broker does not have yet gets
/// its list, empty (it can have no account queue). A source that exists without one was used
/// by an earlier version, which kept no list: its holder looks for its account queues once,
/// by their names of then, and writes the list.
pub async fn prepare(
    connection: &Connection,
    amqp: &AmqpSettings,
    publisher: &Publisher,
    sources: &[String],
) -> Result<(), BrokerError> {
    for source in sources {
        let list = crate::contract::names::lane_registry(source);
        match exists(connection, amqp, &list).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(BrokerError::Amqp { source: e, .. }) => {
                // There, but not to be looked at (locked by another connection, say): its
                // holder will find out, and the source's commands wait meanwhile.
                tracing::warn!(list, error = %e, "cannot look at a list of account queues");
                continue;
            }
            Err(e) => return Err(e),
        }
        if exists(connection, amqp, source).await? {
            continue;
        }
        declare(connection, amqp, &list).await?;
        write(publisher, &list, &List::default()).await?;
    }
    Ok(())
}

/// Whether `queue` exists (a passive declare on a channel of its own).
async fn exists(
    connection: &Connection,
    amqp: &AmqpSettings,
    queue: &str,
) -> Result<bool, BrokerError> {
    Ok(super::account_queue::counts(connection, amqp, queue)
        .await?
        .is_some())
}

/// Declares the list's queue `list`.
async fn declare(
    connection: &Connection,
    amqp: &AmqpSettings,
    list: &str,
) -> Result<(), BrokerError> {
    let t = amqp.operation_timeout;
    let channel = timed("channel.open", t, connection.create_channel()).await?;
    let declared = super::topology::queue(&channel, list, arguments(), t).await;
    if channel.status().connected() {
        let _ = timed("channel.close", t, channel.close(200, "declared".into())).await;
    }
    declared
}

/// Publishes `content` as the list in `list`, confirmed.
async fn write(publisher: &Publisher, list: &str, content: &List) -> Result<(), BrokerError> {
    let body = serde_json::to_vec(content).expect("a list of strings serialises");
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    publisher
        .publish_to_queue(list, &body, properties)
        .await
        .map_err(|source| BrokerError::Publish {
            queue: list.to_owned(),
            source,
        })
}

/// Writes `content` as the source's list, confirmed; its queue is declared again first if it
/// went (an operator deleted it, say).
pub async fn store(
    connection: &Connection,
    amqp: &AmqpSettings,
    publisher: &Publisher,
    source: &str,
    content: &List,
) -> Result<(), BrokerError> {
    let list = crate::contract::names::lane_registry(source);
    match write(publisher, &list, content).await {
        Err(BrokerError::Publish {
            source: PublishError::Unroutable(_),
            ..
        }) => {
            declare(connection, amqp, &list).await?;
            write(publisher, &list, content).await
        }
        other => other,
    }
}

/// A source's list, taken by its holder: the messages stay unacked on their channel until the
/// holder has written its own ([`Taken::replace`]), or go back if it never does.
pub struct Taken {
    channel: Option<Channel>,
    last: Option<u64>,
    /// The list's queue exists. With no message in it, someone else may hold them for a
    /// moment (a look from outside), or its first list was never written.
    pub exists: bool,
    /// The union of the lists found; `None` when there is none (an earlier version's source,
    /// or one whose first list was never written).
    pub list: Option<List>,
    /// Messages that were not a list, and are dropped with the next write.
    pub unreadable: usize,
}

/// Takes `source`'s list (see [`Taken`]).
pub async fn take(
    connection: &Connection,
    amqp: &AmqpSettings,
    source: &str,
) -> Result<Taken, BrokerError> {
    let list = crate::contract::names::lane_registry(source);
    let t = amqp.operation_timeout;
    let channel = timed("channel.open", t, connection.create_channel()).await?;
    match get_all(&channel, &list, t).await {
        Ok(Some((found, last, unreadable))) => Ok(Taken {
            channel: Some(channel),
            last,
            exists: true,
            list: last.map(|_| found),
            unreadable,
        }),
        // The broker closed the channel: there is no list yet.
        Ok(None) => Ok(Taken {
            channel: None,
            last: None,
            exists: false,
            list: None,
            unreadable: 0,
        }),
        Err(e) => {
            if channel.status().connected() {
                let _ = timed("channel.close", t, channel.close(200, "failed".into())).await;
            }
            Err(e)
        }
    }
}

/// Every message in `list`, taken unacked: their union, the last delivery tag (none if it was
/// empty) and how many were unreadable; `None` if the queue does not exist.
async fn get_all(
    channel: &Channel,
    list: &str,
    t: std::time::Duration,
) -> Result<Option<(List, Option<u64>, usize)>, BrokerError> {
    let mut union = List::default();
    let mut last = None;
    let mut unreadable = 0usize;
    loop {
        let got = timed(
            "basic.get",
            t,
            channel.basic_get(list.into(), BasicGetOptions { no_ack: false }),
        )
        .await;
        let message = match got {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(Some((union, last, unreadable))),
            Err(BrokerError::Amqp { source, .. }) if source.to_string().contains("NOT_FOUND") => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        last = Some(message.delivery.delivery_tag);
        match parse(&message.delivery.data) {
            Some(found) => union.merge(found),
            None => unreadable = unreadable.saturating_add(1),
        }
    }
}

impl Taken {
    /// Gives what was taken back, unchanged (its channel closes).
    pub async fn give_back(self, t: std::time::Duration) {
        if let Some(channel) = self.channel
            && channel.status().connected()
        {
            let _ = timed("channel.close", t, channel.close(200, "given back".into())).await;
        }
    }

    /// Writes `content` as the source's list, then acks what was taken: the list is never
    /// without a message that holds every queue that may exist.
    pub async fn replace(
        self,
        connection: &Connection,
        amqp: &AmqpSettings,
        publisher: &Publisher,
        source: &str,
        content: &List,
    ) -> Result<(), BrokerError> {
        let t = amqp.operation_timeout;
        let stored = store(connection, amqp, publisher, source, content).await;
        if let Some(channel) = self.channel {
            if stored.is_ok()
                && let Some(tag) = self.last
            {
                let acked = timed(
                    "basic.ack",
                    t,
                    channel.basic_ack(tag, BasicAckOptions { multiple: true }),
                )
                .await;
                if let Err(e) = acked {
                    // The older lists come back, and are read with the new one next time.
                    tracing::debug!(source, error = %e, "could not ack the list read");
                }
            }
            if channel.status().connected() {
                let _ = timed("channel.close", t, channel.close(200, "replaced".into())).await;
            }
        }
        stored
    }
}

/// `source`'s list as it is, for a look from outside (a status, a test): taken and given back
/// with the channel; `None` when there is none.
pub async fn peek(
    connection: &Connection,
    source: &str,
    t: std::time::Duration,
) -> Result<Option<Vec<Entry>>, BrokerError> {
    let list = crate::contract::names::lane_registry(source);
    let channel = timed("channel.open", t, connection.create_channel()).await?;
    let found = get_all(&channel, &list, t).await;
    if channel.status().connected() {
        let _ = timed("channel.close", t, channel.close(200, "looked".into())).await;
    }
    Ok(found?.and_then(|(list, last, _)| last.map(|_| list.queues)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn entry() -> impl Strategy<Value = Entry> {
        ("[a-z0-9.#-]{0,12}", "[a-z0-9.#-]{0,40}")
            .prop_map(|(account, queue)| Entry { account, queue })
    }

    fn list() -> impl Strategy<Value = List> {
        (
            proptest::collection::vec(entry(), 0..6),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(queues, old_names_until)| List {
                queues,
                old_names_until,
            })
    }

    #[test]
    fn a_list_without_old_names_until_reads_as_one() {
        let read = parse(br#"{"queues":[{"account":"a","queue":"s.account.a#0011aabb"}]}"#);
        assert_eq!(
            read,
            Some(List {
                queues: vec![Entry {
                    account: "a".into(),
                    queue: "s.account.a#0011aabb".into(),
                }],
                old_names_until: None,
            })
        );
    }

    proptest! {
        /// Whatever a message holds, reading it answers a list or none, and never panics.
        #[test]
        fn any_message_reads_as_a_list_or_none(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&body);
        }

        /// A list written is read back as it was.
        #[test]
        fn a_list_reads_back_as_written(written in list()) {
            let body = serde_json::to_vec(&written).unwrap();
            prop_assert_eq!(parse(&body), Some(written));
        }

        /// Reading several lists keeps every queue any of them names, and the latest
        /// `old_names_until`: a list that arrives late or out of order drops nothing.
        #[test]
        fn reading_several_lists_drops_no_queue(lists in proptest::collection::vec(list(), 1..5)) {
            let mut union = List::default();
            for l in lists.clone() {
                union.merge(l);
            }
            for l in &lists {
                for e in &l.queues {
                    prop_assert!(union.queues.contains(e));
                }
            }
            let latest = lists.iter().filter_map(|l| l.old_names_until).max();
            prop_assert_eq!(union.old_names_until, latest);
            let mut seen = std::collections::HashSet::new();
            prop_assert!(union.queues.iter().all(|e| seen.insert(e.clone())), "no queue twice");
        }
    }
}
