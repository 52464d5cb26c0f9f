//! The external contract's types (docs/contract.md): the commands the worker reads
//! ([`command`]), the events it publishes ([`event`]), and the names of the queues it makes
//! ([`names`]). This is the bottom of the crate: it uses no other component, and every
//! component that speaks of commands or events uses these types (docs/architecture.md).

pub mod command;
pub mod event;
pub mod names;

pub use command::{Command, REPLAY_MARK, Rejection, Target};
pub use event::{Event, EventKind};
