//! Opening a connection to the broker.

use std::str::FromStr;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use super::{BrokerError, timed};
use crate::config::AmqpSettings;

/// The frame size proposed when the URL names none. The client keeps send and receive buffers
/// of 32 frames each: at RabbitMQ's default of 128 KiB that is 8 MiB before the first message,
/// at 32 KiB it is 2 MiB. Commands are at most 64 KiB, so larger frames buy nothing here.
const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// Connects under `amqp.operation_timeout`, naming the connection so operators can tell it
/// apart in the management UI.
pub async fn connect(amqp: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    let mut uri = AMQPUri::from_str(&amqp.url).map_err(|reason| BrokerError::Url { reason })?;
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    timed(
        "connect",
        amqp.operation_timeout,
        Connection::connect_uri(uri, properties),
    )
    .await
}
