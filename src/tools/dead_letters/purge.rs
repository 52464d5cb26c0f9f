//! `dead-letters purge`: the dead-letter queue emptied, for good, once confirmed.

use lapin::options::QueuePurgeOptions;

use super::DeadLetterError;
use super::link::Link;
use crate::broker::timed;
use crate::config::AmqpSettings;

/// Empties the dead-letter queue, returning how many messages it removed; refuses unless
/// `confirmed` (`--yes`).
pub async fn purge(amqp: &AmqpSettings, confirmed: bool) -> Result<u32, DeadLetterError> {
    let queue = &amqp.dead_letter_queue;
    if !confirmed {
        return Err(DeadLetterError::PurgeNotConfirmed(queue.clone()));
    }
    let link = Link::open(amqp, "transfer-worker dead-letters purge").await?;
    let result = async {
        link.depth().await?;
        let purged = timed(
            "queue.purge",
            amqp.operation_timeout,
            link.channel
                .queue_purge(queue.as_str().into(), QueuePurgeOptions::default()),
        )
        .await?;
        Ok(purged)
    }
    .await;
    link.close(None).await;
    result
}
