//! Recent outcomes by command id: a bounded cache with a TTL (moka), so that a command this
//! worker already completed is answered from memory — the same event, the same `eventId` —
//! instead of being sent to the API a second time.
//!
//! Bounded twice, by entries and by bytes, with one weigher: each entry weighs its size, but
//! never less than its share of the byte budget (`max_bytes / capacity`). So no more than
//! `capacity` entries fit, and however large the responses, no more than `max_bytes` bytes.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::contract::event::Event;

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
    /// At most `capacity` outcomes taking at most `max_bytes`, each kept for `ttl`.
    pub fn new(capacity: u64, max_bytes: u64, ttl: Duration) -> Self {
        let share = u32::try_from((max_bytes / capacity.max(1)).max(1)).unwrap_or(u32::MAX);
        Self {
            cache: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(move |key: &String, event: &Arc<Event>| {
                    let size = weight(key, event);
                    u32::try_from(size).unwrap_or(u32::MAX).max(share)
                })
                .time_to_live(ttl)
                .build(),
        }
    }

    /// Bytes the cached outcomes weigh, once pending evictions have run.
    pub fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }

    /// Outcomes cached, once pending evictions have run.
    pub fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

/// What one entry costs: the key, the event's body and strings, and an estimate of moka's and
/// the `Arc`'s bookkeeping.
fn weight(key: &str, event: &Event) -> usize {
    const OVERHEAD: usize = 200;
    key.len()
        .saturating_add(event.body.len())
        .saturating_add(event.command_id.len())
        .saturating_add(event.error.as_ref().map_or(0, String::len))
        .saturating_add(OVERHEAD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Rejection;

    fn event(size: usize) -> Arc<Event> {
        let rejection = Rejection {
            command_id: "c".into(),
            stream_id: None,
            bot_session_id: None,
            target: None,
            message: "x".repeat(size),
        };
        Arc::new(Event::rejected(&rejection, None))
    }

    #[test]
    fn large_outcomes_are_bounded_by_bytes_not_entries() {
        let budget = 1024 * 1024;
        let outcomes = Outcomes::new(5_000, budget, Duration::from_secs(60));
        for i in 0..200 {
            outcomes.insert(format!("c{i}"), event(64 * 1024));
        }
        assert!(
            outcomes.weighted_size() <= budget,
            "{}",
            outcomes.weighted_size()
        );
        assert!(
            outcomes.len() < 20,
            "{} entries of 128 KiB fit in 1 MiB",
            outcomes.len()
        );
    }

    #[test]
    fn small_outcomes_are_bounded_by_entries() {
        let outcomes = Outcomes::new(100, 1024 * 1024 * 1024, Duration::from_secs(60));
        for i in 0..1_000 {
            outcomes.insert(format!("c{i}"), event(10));
        }
        assert!(outcomes.len() <= 100, "{}", outcomes.len());
        assert!(outcomes.len() >= 50, "{}", outcomes.len());
    }
}
