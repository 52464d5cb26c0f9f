//! What the worker writes on an account queue's messages: a command set aside carries the
//! instant it began waiting (so the oldest wait is known to whoever holds the queue next), and
//! a marker is a message with no body that a holder publishes into the queue and reads back,
//! to know that everything published before it has been handed to a consumer.

use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use crate::broker::{Delivery, PublishError, Publisher};

/// Header carrying since when a command set aside has waited (ms since the Unix epoch).
pub const WAITING_SINCE: &str = "x-transfer-waiting-since";

/// Header of a lane's marker (see `pipeline::lanes`).
pub const MARKER: &str = "x-transfer-lane-marker";

impl Publisher {
    /// Publishes `delivery` to the account queue `queue`, as received, stamped with the
    /// instant it began waiting unless it carries one; mandatory and confirmed.
    pub async fn set_aside(&self, queue: &str, delivery: &Delivery) -> Result<(), PublishError> {
        let props = aside_properties(delivery.properties());
        self.publish_to_queue(queue, delivery.body(), props).await
    }

    /// Publishes marker `id` into the account queue `queue`, confirmed.
    pub async fn publish_marker(&self, queue: &str, id: &str) -> Result<(), PublishError> {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(marker_headers(id));
        self.publish_to_queue(queue, b"", props).await
    }
}

/// The headers of marker `id`.
pub(super) fn marker_headers(id: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(MARKER.into(), AMQPValue::LongString(id.into()));
    headers
}

/// The id of a lane's marker, if the delivery is one.
pub fn marker_of(delivery: &Delivery) -> Option<String> {
    match delivery
        .properties()
        .headers()
        .as_ref()?
        .inner()
        .get(MARKER)?
    {
        AMQPValue::LongString(id) => Some(id.to_string()),
        _ => None,
    }
}

/// Since when a command set aside has waited, from its header; any value that is not a
/// plausible instant is none.
pub fn waiting_since(delivery: &Delivery) -> Option<SystemTime> {
    waiting_since_in(delivery.properties())
}

fn waiting_since_in(props: &BasicProperties) -> Option<SystemTime> {
    let headers = props.headers().as_ref()?;
    let ms = match headers.inner().get(WAITING_SINCE)? {
        AMQPValue::LongLongInt(ms) => u64::try_from(*ms).ok()?,
        AMQPValue::LongUInt(ms) => u64::from(*ms),
        AMQPValue::LongInt(ms) => u64::try_from(*ms).ok()?,
        _ => return None,
    };
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// A command's properties for its account queue: as received, with the instant it started
/// waiting.
fn aside_properties(received: &BasicProperties) -> BasicProperties {
    let props = received.clone();
    if waiting_since_in(&props).is_some() {
        return props;
    }
    let mut headers = props.headers().clone().unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    headers.insert(WAITING_SINCE.into(), AMQPValue::LongLongInt(now));
    props.with_headers(headers)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever a message carries in the header, reading it never panics, and a value
        /// that is a plausible instant reads back.
        #[test]
        fn any_waiting_since_header(value in prop_oneof![
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            ".*".prop_map(|s| AMQPValue::LongString(s.into())),
        ]) {
            let mut headers = FieldTable::default();
            headers.insert(WAITING_SINCE.into(), value.clone());
            let props = BasicProperties::default().with_headers(headers);
            let read = waiting_since_in(&props);
            if let AMQPValue::LongLongInt(ms) = value
                && (0..=4_102_444_800_000).contains(&ms)
            {
                prop_assert_eq!(
                    read,
                    Some(SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap()))
                );
            }
        }

        /// A command set aside again keeps the instant it first began waiting.
        #[test]
        fn set_aside_again_keeps_its_first_wait(ms in 0i64..=4_102_444_800_000) {
            let mut headers = FieldTable::default();
            headers.insert(WAITING_SINCE.into(), AMQPValue::LongLongInt(ms));
            let props = BasicProperties::default().with_headers(headers);
            prop_assert_eq!(waiting_since_in(&aside_properties(&props)), waiting_since_in(&props));
        }
    }
}
