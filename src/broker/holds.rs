//! One holder per queue across a fleet (docs/contract.md §9, "One holder at a time"). A
//! single-active-consumer queue orders its consumers, it does not fence them: the broker
//! activates a waiting consumer the moment the active one is cancelled, while the commands the
//! cancelled one started still run. So a consumer registers on a shared queue only while it
//! holds it, and gives the hold up only once that queue's channel is closed.
//!
//! The fleet keeps the holds (`fleet::holds`); the consumer only asks and tells, through
//! this trait.

use std::time::Instant;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

/// The holds of one replica.
pub trait Holds: Send + Sync + 'static {
    /// Takes the hold of `queue`: true when this replica holds it now (taken, or already its
    /// own), false when another does or the fleet does not answer.
    fn take<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, bool>;

    /// Gives the hold of `queue` up. Only once the queue's consumer channel is closed.
    fn give<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, ()>;

    /// Gives every hold up. Only once every consuming channel is closed.
    fn give_all(&self) -> BoxFuture<'_, ()>;

    /// When consuming must have stopped, unless the holds are kept before then: `None` while
    /// nothing is held. Past it, another replica may take the holds.
    fn deadline(&self) -> watch::Receiver<Option<Instant>>;

    /// Whether this replica's holds are valid now: it holds its queues and their deadline has
    /// not passed. False after a pause past `fleet.member_ttl` (a VM or GC pause: the holds
    /// expired, another replica may hold the queues, while this replica's connection and tasks
    /// live on), after a lost hold, and while nothing is held, until the queues are held again.
    /// Ask it right before doing anything on behalf of a held queue that the next holder must
    /// not see done: publishing to or deleting a queue beside a source (an account queue), for
    /// one. When it is false, do nothing and leave the delivery to go back with the connection.
    fn valid(&self) -> bool;
}
