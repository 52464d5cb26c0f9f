//! Opening a connection to the broker: to one node of the cluster (`amqp.urls`), or to
//! `amqp.url`. [`connect`] makes one attempt at the node [`super::nodes`] chooses, so a caller
//! that retries with backoff fails over from a dead node to the next; [`connect_any`] tries
//! every node once, for commands that run once.

use std::str::FromStr;
use std::sync::PoisonError;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};

use super::{BrokerError, nodes, timed};
use crate::config::AmqpSettings;

/// The frame size proposed when the URL names none. The client keeps send and receive buffers
/// of 32 frames each: at RabbitMQ's default of 128 KiB that is 8 MiB before the first message,
/// at 32 KiB it is 2 MiB. Commands are at most 64 KiB, so larger frames buy nothing here.
const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// The heartbeat interval (seconds) proposed when the URL names none. The client gives a
/// connection up after two intervals without a frame from the broker: a node cut off by the
/// network (its connections silent, not closed) is left after 6 s, well within the default
/// `amqp.reconnect_max_delay` of 10 s, and the next attempt goes to another node. RabbitMQ's
/// own default, 60 s, would keep the worker on a lost node for two minutes.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 3;

/// One attempt, under `amqp.operation_timeout`, at the node of the cluster chosen by
/// [`super::nodes`]: the current one, or the next after a failure of the current one (this
/// attempt's or a connection's that ended in an error). The connection is named so operators
/// can tell it apart in the management UI.
pub async fn connect(amqp: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    let urls = amqp.node_urls();
    let mut nodes = Vec::with_capacity(urls.len());
    for url in urls {
        nodes.push(AMQPUri::from_str(url).map_err(|reason| BrokerError::Url { reason })?);
    }
    let cluster = nodes::cluster(urls);
    let node = cluster
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .choose();
    let mut uri = nodes.swap_remove(node);
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    let address = format!("{}:{}", uri.authority.host, uri.authority.port);
    let shown = endpoint(&uri);
    let attempt = match tls_config(amqp, &uri) {
        Ok(tls) => {
            let builder = DefaultConnectionBuilder::new()
                .map_err(|source| BrokerError::Amqp {
                    operation: "connect",
                    source,
                })?
                .with_uri(uri)
                .with_properties(ConnectionProperties::default().with_connection_name(name.into()))
                .with_tls_config(tls);
            timed("connect", amqp.operation_timeout, builder.connect())
                .await
                .map_err(|e| e.at(&shown))
        }
        Err(e) => Err(e),
    };
    let mut cluster = cluster.lock().unwrap_or_else(PoisonError::into_inner);
    match attempt {
        Ok(connection) => {
            cluster.opened(node, connection.status().clone());
            tracing::info!(node = %address, connection = name, "connected to the broker");
            Ok(connection)
        }
        Err(e) => {
            cluster.failed(node);
            if urls.len() > 1 {
                tracing::info!(node = %address, error = %e, "broker node unreachable; the next attempt goes to another");
            }
            Err(e)
        }
    }
}

/// How a node is named in messages: scheme, host and port, never the credentials.
fn endpoint(uri: &AMQPUri) -> String {
    let scheme = match uri.scheme {
        AMQPScheme::AMQP => "amqp",
        AMQPScheme::AMQPS => "amqps",
    };
    format!("{scheme}://{}:{}", uri.authority.host, uri.authority.port)
}

/// The TLS side of a connection to an `amqps://` node (docs/contract.md §13): `amqp.tls`'s
/// files, read again for every connection so a rotated certificate is picked up. The server's
/// certificate is verified against the system's roots and `amqp.tls.ca_file`; its name against
/// the URL's host.
fn tls_config(amqp: &AmqpSettings, uri: &AMQPUri) -> Result<OwnedTLSConfig, BrokerError> {
    if uri.scheme != AMQPScheme::AMQPS {
        return Ok(OwnedTLSConfig::default());
    }
    let files = amqp.tls.read().map_err(|e| BrokerError::Tls {
        node: endpoint(uri),
        reason: e.to_string(),
    })?;
    Ok(OwnedTLSConfig {
        cert_chain: files.ca,
        identity: files
            .identity
            .map(|(pem, key)| OwnedIdentity::PKCS8 { pem, key }),
    })
}

/// The first node that answers, trying each once in [`connect`]'s order: for commands that
/// connect once and have no retry loop of their own.
pub async fn connect_any(amqp: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    let nodes = amqp.node_urls().len();
    let mut attempt = 1;
    loop {
        match connect(amqp, name).await {
            Err(e) if !e.is_fatal() && attempt < nodes => attempt += 1,
            result => return result,
        }
    }
}

/// Closes `connection` with `reason`, within `amqp.operation_timeout`. Its outcome does not
/// matter to anyone: a connection that cannot close cleanly is dropped, and the broker lets go
/// of what it held either way.
pub async fn close(connection: &Connection, amqp: &AmqpSettings, reason: &str) {
    let close = connection.close(200, short(reason).into());
    let _ = timed("connection.close", amqp.operation_timeout, close).await;
}

/// `reason` cut to what an AMQP short string holds (255 bytes), on a character boundary: a
/// longer one would make the client panic.
fn short(reason: &str) -> &str {
    let mut end = reason.len().min(255);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::short;

    proptest! {
        /// Any reason, however long or wide its characters, becomes a short string the client
        /// accepts, and is kept whole when it fits.
        #[test]
        fn any_close_reason_fits_a_short_string(reason in ".{0,400}") {
            let cut = short(&reason);
            prop_assert!(cut.len() <= 255);
            prop_assert!(reason.starts_with(cut));
            if reason.len() <= 255 {
                prop_assert_eq!(cut, reason.as_str());
            }
            let _: lapin::types::ShortString = cut.into();
        }
    }
}
