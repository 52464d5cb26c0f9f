//! Everything that talks AMQP: the connection (to one node of a cluster, see [`nodes`]), the
//! topology, the confirm-mode publisher, and the [`CurrentLink`] handle through which the rest of the process sees the current link.

pub mod account_links;
pub mod account_queue;
pub mod connection;
pub mod consumer;
pub mod delivery;
pub mod holds;
pub mod lane_registry;
pub mod nodes;
pub mod publisher;
pub mod topology;
pub mod trace_headers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

pub use delivery::Delivery;
/// A connection to the broker. Outside `broker` it is only handed back to the broker's own
/// operations (an account queue's declare, probe or reader).
pub use lapin::Connection;
pub use publisher::{DeadLetter, PublishError, Publisher, Reply};

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Connecting, or an operation on an open connection, failed.
    #[error("broker {operation} failed: {source}")]
    Amqp {
        /// What was attempted.
        operation: &'static str,
        /// The client's error.
        source: lapin::Error,
    },
    /// Connecting to a node failed: refused, unreachable, or its certificate did not verify.
    #[error("cannot connect to the broker at {node}: {source}")]
    Connect {
        /// The node, as `scheme://host:port`.
        node: String,
        /// The client's error, with the TLS reason when there is one.
        source: lapin::Error,
    },
    /// A node did not answer a connect within `amqp.operation_timeout`.
    #[error("cannot connect to the broker at {node}: no answer within amqp.operation_timeout")]
    ConnectTimeout {
        /// The node, as `scheme://host:port`.
        node: String,
    },
    /// The files of `amqp.tls` could not be read for a connection to an `amqps://` node.
    #[error("cannot connect to the broker at {node}: {reason}")]
    Tls {
        /// The node, as `scheme://host:port`.
        node: String,
        /// What is wrong with the files.
        reason: String,
    },
    /// `amqp.url`, or one of `amqp.urls`, is not an AMQP URL.
    #[error("the broker URL is not a valid AMQP URL: {reason}")]
    Url {
        /// What is wrong with it.
        reason: String,
    },
    /// The connection an operation needed was closed for good (its replica's connection went).
    #[error("broker {operation} not attempted: the connection was let go")]
    Closed {
        /// What was attempted.
        operation: &'static str,
    },
    /// An operation took longer than `amqp.operation_timeout`.
    #[error("broker {operation} timed out")]
    Timeout {
        /// What was attempted.
        operation: &'static str,
    },
    /// A confirmed publish an operation needed did not succeed.
    #[error("broker publish to {queue} failed: {source}")]
    Publish {
        /// Where it was published.
        queue: String,
        /// Why it did not succeed.
        source: PublishError,
    },
    /// The broker refused a declaration: an existing queue or exchange has other arguments.
    /// Retrying cannot help; an operator must reconcile the two.
    #[error(
        "{name} already exists on the broker with other arguments ({reason}); delete it or \
         configure another name"
    )]
    TopologyMismatch {
        /// Queue or exchange name.
        name: String,
        /// The broker's words.
        reason: String,
    },
}

impl BrokerError {
    /// A failed connect, naming the node it was to; other errors as they are.
    fn at(self, node: &str) -> Self {
        match self {
            Self::Amqp { source, .. } => Self::Connect {
                node: node.to_owned(),
                source,
            },
            Self::Timeout { .. } => Self::ConnectTimeout {
                node: node.to_owned(),
            },
            other => other,
        }
    }

    /// Whether reconnecting may help.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::TopologyMismatch { .. } | Self::Url { .. })
    }
}

/// Runs a broker operation under a timeout.
pub async fn timed<T>(
    operation: &'static str,
    limit: std::time::Duration,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(BrokerError::Amqp { operation, source }),
        Err(_) => Err(BrokerError::Timeout { operation }),
    }
}

/// The current link to the broker, shared by the consumer loop, the callback relay and the
/// readiness probe. Replaced on every reconnect.
#[derive(Debug, Default)]
pub struct CurrentLink {
    publisher: RwLock<Option<Arc<Publisher>>>,
    consuming: AtomicBool,
}

impl CurrentLink {
    /// The publisher of the live connection, if there is one.
    pub fn publisher(&self) -> Option<Arc<Publisher>> {
        self.publisher
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .filter(|p| p.is_connected())
    }

    /// Installs the publisher of a new connection, or clears it when the link is lost.
    pub fn set_publisher(&self, publisher: Option<Arc<Publisher>>) {
        *self
            .publisher
            .write()
            .unwrap_or_else(PoisonError::into_inner) = publisher;
    }

    /// Connected and consuming: what `/readyz` reports.
    pub fn is_ready(&self) -> bool {
        self.consuming.load(Ordering::Acquire) && self.publisher().is_some()
    }

    /// Marks whether commands are being consumed.
    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Release);
    }
}

impl crate::ops::admin::Readiness for CurrentLink {
    fn ready(&self) -> Result<(), &'static str> {
        if self.is_ready() {
            Ok(())
        } else {
            Err("broker not connected or not consuming")
        }
    }
}
