//! Recent outcomes by command id: a bounded cache with a TTL (moka), so that a command this
//! worker already completed is answered from memory — the same event, the same `eventId` —
//! instead of being sent to the API a second time.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::event::Event;

/// Terminal events by command id.
#[derive(Clone)]
pub struct Outcomes {
    cache: Cache<String, Arc<Event>>,
}

impl std::fmt::Debug for Outcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcomes")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl Outcomes {
    /// At most `capacity` outcomes, each kept for `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The remembered outcome of a command.
    pub fn get(&self, command_id: &str) -> Option<Arc<Event>> {
        self.cache.get(command_id)
    }

    /// Remembers an outcome; called before the event is published, so that a publish lost with
    /// the connection is redone from memory.
    pub fn insert(&self, command_id: String, event: Arc<Event>) {
        self.cache.insert(command_id, event);
    }
}
