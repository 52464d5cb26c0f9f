//! The connections account queues are used on (docs/fairness.md, "One bad queue stalls only
//! itself"), apart from the one that carries a replica's intake, its holds and its publisher.
//!
//! The broker answers some failures of one queue with a connection-level error: RabbitMQ
//! closes the whole connection when a quorum queue without a leader is consumed or declared
//! again right after its deletion (`INTERNAL_ERROR`), for instance. On the connection every
//! source shares, one such queue would cost all of them, over and over. So account queues are
//! declared, looked at, deleted and consumed on a connection of their own, opened when first
//! needed and again after a loss; and a queue whose operation brought that connection down is
//! moved to a connection of its own, where it costs only itself. Both live as long as the
//! replica's connection, and close before it: whatever their readers hold goes back to the
//! account queues before the holds go.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use lapin::Connection;
use lapin::protocol::AMQPErrorKind;

use super::{BrokerError, connection};
use crate::config::AmqpSettings;

/// The connections of one replica connection's account queues.
pub struct AccountLinks {
    amqp: AmqpSettings,
    /// How the connections are named in the management UI.
    name: String,
    /// The account queues' shared connection, once opened.
    shared: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// Queues that brought a connection down, with their own connection once opened.
    own: tokio::sync::Mutex<HashMap<String, Option<Arc<Connection>>>>,
    /// Queues moved to a connection of their own (read without waiting).
    isolated: Mutex<HashSet<String>>,
    /// Closed with the replica's connection: nothing opens again.
    closed: std::sync::atomic::AtomicBool,
}

impl AccountLinks {
    /// Nothing is opened until an account queue needs it; `name` names the replica's
    /// connection.
    pub fn new(amqp: &AmqpSettings, name: &str) -> Arc<Self> {
        Arc::new(Self {
            amqp: amqp.clone(),
            name: name.to_owned(),
            shared: tokio::sync::Mutex::new(None),
            own: tokio::sync::Mutex::new(HashMap::new()),
            isolated: Mutex::new(HashSet::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The open connection `queue` is used on: its own if it brought one down before, else
    /// the shared one; opened (once, under `amqp.operation_timeout`) if it is not.
    pub async fn get(&self, queue: &str) -> Result<Arc<Connection>, BrokerError> {
        if self.is_isolated(queue) {
            let mut own = self.own.lock().await;
            let slot = own.entry(queue.to_owned()).or_default();
            let name = format!("{} {queue}", self.name);
            return self.open(slot, &name).await;
        }
        let mut shared = self.shared.lock().await;
        let name = format!("{} account queues", self.name);
        self.open(&mut shared, &name).await
    }

    /// After an operation on `queue` failed with `error`: whether it brought its connection
    /// down (a connection-level error from the broker). Such a queue is moved to a connection
    /// of its own, for as long as this replica's connection lives.
    pub fn failed(&self, queue: &str, error: &BrokerError) -> bool {
        if !is_connection_error(error) {
            return false;
        }
        let moved = self
            .isolated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(queue.to_owned());
        if moved {
            tracing::error!(
                queue,
                %error,
                "the broker closed the account queues' connection over this queue; it is used \
                 on a connection of its own from now on, so that it costs no other queue"
            );
        }
        true
    }

    /// Closes every connection (what their readers hold goes back to the account queues);
    /// nothing opens again.
    pub async fn close(&self, reason: &str) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let shared = self.shared.lock().await.take();
        let own: Vec<_> = self.own.lock().await.drain().collect();
        let open = shared
            .into_iter()
            .chain(own.into_iter().filter_map(|(_, c)| c))
            .filter(|c| c.status().connected());
        futures_util::future::join_all(open.map(|c| async move {
            connection::close(&c, &self.amqp, reason).await;
        }))
        .await;
    }

    /// Whether `queue` brought a connection down, and has one of its own.
    pub fn is_isolated(&self, queue: &str) -> bool {
        self.isolated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(queue)
    }

    /// The connection in `slot`, opened again if it is not open.
    async fn open(
        &self,
        slot: &mut Option<Arc<Connection>>,
        name: &str,
    ) -> Result<Arc<Connection>, BrokerError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BrokerError::Closed {
                operation: "connect",
            });
        }
        if let Some(c) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.clone());
        }
        let opened = Arc::new(connection::connect(&self.amqp, name).await?);
        *slot = Some(opened.clone());
        Ok(opened)
    }
}

/// Whether `error` is the broker closing the connection over an operation (an AMQP hard
/// error), as opposed to a channel-level refusal or a lost link.
fn is_connection_error(error: &BrokerError) -> bool {
    match error {
        BrokerError::Amqp { source, .. } => matches!(
            source.kind(),
            lapin::ErrorKind::ProtocolError(e) if matches!(e.kind(), AMQPErrorKind::Hard(_))
        ),
        _ => false,
    }
}
