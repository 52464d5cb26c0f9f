//! Transfer commands as the contract defines them (docs/contract.md §2): a valid
//! [`Command`], where it goes ([`Target`]), and a [`Rejection`] that says what is wrong with a
//! delivery that is not one. Reading a delivery into one of these is the edge's work
//! (`pipeline::parser`); everything past the edge sees only these types.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Where a transfer goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "id", rename_all = "lowercase")]
pub enum Target {
    /// A specific agent (`aId`).
    Agent(String),
    /// A queue (`queueId`).
    Queue(String),
}

/// A valid transfer command.
#[derive(Debug, Clone)]
pub struct Command {
    /// Idempotency key.
    pub command_id: String,
    /// The bot acting (`streamId`, or the default bot): a configured one.
    pub stream_id: String,
    /// Passed to the API.
    pub org_id: String,
    /// Passed to the API; the ordering key.
    pub bot_session_id: String,
    /// Agent or queue.
    pub target: Target,
    /// Given by the command: sent as is, and nothing is relayed.
    pub callback_url: Option<String>,
    /// No attempt starts after this.
    pub deadline: Option<SystemTime>,
}

/// A delivery that is not a valid command, with every id that could still be read.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// Always known: from the body, the AMQP `message_id`, or a hash of the body.
    pub command_id: String,
    /// If it could be read and names a known bot.
    pub stream_id: Option<String>,
    /// If it could be read.
    pub bot_session_id: Option<String>,
    /// If exactly one target could be read.
    pub target: Option<Target>,
    /// What is wrong, for people.
    pub message: String,
}

/// The header the worker's dead-letter copies carry (`broker::publisher`), which marks a
/// replayed command.
pub const REPLAY_MARK: &str = "x-transfer-event";
