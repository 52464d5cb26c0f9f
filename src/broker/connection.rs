//! Opening a connection to the broker.

use lapin::{Connection, ConnectionProperties};

use super::{BrokerError, timed};
use crate::config::AmqpSettings;

/// Connects under `amqp.operation_timeout`, naming the connection so operators can tell it
/// apart in the management UI.
pub async fn connect(amqp: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    timed(
        "connect",
        amqp.operation_timeout,
        Connection::connect(&amqp.url, properties),
    )
    .await
}
