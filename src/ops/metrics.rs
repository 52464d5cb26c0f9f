//! Prometheus metrics (docs/contract.md §6). Labels are bounded: event name, status class, account,
//! result — never a session or command id.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::contract::event::EventKind;

/// `event` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// Event name.
    pub event: &'static str,
}

/// Labels of API calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `2xx`, `4xx`, `5xx`, or `error` when no status came back.
    pub status: &'static str,
    /// Account id (configured, so bounded).
    pub account: String,
}

/// `account` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabels {
    /// Account id.
    pub account: String,
}

/// `op` label of Redis calls: `claim`, `reserve`, `record`, `renew`, `pause`, `ping`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisLabels {
    /// Which fleet operation.
    pub op: &'static str,
}

/// `result` label of the breaker's probes: `answered` (the API is up) or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    /// What the probe found.
    pub result: &'static str,
}

/// `result` label of relayed callbacks.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    /// What happened to the callback: published, forbidden, too_large, unavailable.
    pub result: &'static str,
}

/// The class of an HTTP status (`2xx`, …), or `error` when none came back.
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(_) => "5xx",
        None => "error",
    }
}

/// What the relay did with a callback.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RelayResult {
    /// Published and confirmed.
    Published,
    /// Bad token: 404.
    Forbidden,
    /// Body too large: 413.
    TooLarge,
    /// Broker unavailable: 503.
    Unavailable,
}

impl RelayResult {
    fn label(self) -> &'static str {
        match self {
            Self::Published => "published",
            Self::Forbidden => "forbidden",
            Self::TooLarge => "too_large",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Every series the worker exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Deliveries taken from the commands queue.
    pub commands_received: Counter,
    /// Events confirmed by the broker, by event.
    pub events_published: Family<EventLabels, Counter>,
    /// Terminal events republished from memory for a command already completed.
    pub commands_deduplicated: Counter,
    /// API calls by status class and account.
    pub api_calls: Family<CallLabels, Counter>,
    /// API call latency.
    pub api_call_duration: Family<AccountLabels, Histogram>,
    /// Retries scheduled after transient failures.
    pub api_retries: Family<AccountLabels, Counter>,
    /// Commands received and not yet acked or returned.
    pub commands_in_flight: Gauge,
    /// Callbacks by what the relay did with them.
    pub callbacks: Family<RelayLabels, Counter>,
    /// Broker connections re-established after a loss.
    pub broker_reconnects: Counter,
    /// Commands returned to the queue unacked: outcome not confirmed, or shutdown.
    pub commands_requeued: Counter,
    /// Commands whose processing panicked (a bug): each ended on its own, the worker went on.
    pub command_panics: Counter,
    /// Redis round trips, by fleet operation.
    pub redis_round_trips: Family<RedisLabels, Counter>,
    /// Redis calls that failed or timed out, by fleet operation.
    pub redis_errors: Family<RedisLabels, Counter>,
    /// Redis round-trip latency, by fleet operation.
    pub redis_round_trip_duration: Family<RedisLabels, Histogram>,
    /// Writes the primary applied that fewer than `fleet.redis_min_replicas` replicas
    /// acknowledged in time, by fleet operation: the call they were for waited.
    pub redis_unacknowledged: Family<RedisLabels, Counter>,
    /// Times the fleet went looking for its Redis primary again (a failover, `READONLY`, or
    /// the primary gone) and found one.
    pub redis_primary_changes: Counter,
    /// Claims taken over from a replica that died while a call of its may have been on the
    /// wire: the only case in which the fleet may call the API twice for one command.
    pub fleet_claims_taken_over: Counter,
    /// Times a replica found a command claimed by another live replica and waited for it.
    pub fleet_claim_waits: Counter,
    /// Partition queues this replica owns and consumes.
    pub fleet_partitions_owned: Gauge,
    /// Live fleet members this replica sees, itself included.
    pub fleet_members: Gauge,
    /// Changes of this replica's partitions (assigned or revoked).
    pub fleet_rebalances: Counter,
    /// Commands the intake routed to a partition queue.
    pub fleet_routed: Counter,
    /// Circuit breakers open (one per API host): 1 while the only one is open, else 0.
    pub breaker_open: Gauge,
    /// Times the breaker opened.
    pub breaker_openings: Counter,
    /// Seconds the breaker has been open, counted when it closes.
    pub breaker_open_time: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Probes sent while open, by result.
    pub breaker_probes: Family<ProbeLabels, Counter>,
    /// Commands waiting on the breaker right now (new ones, and retries held).
    pub breaker_held: Gauge,
    /// Commands of an account waiting: in memory for a slot, or set aside in its queues.
    pub account_waiting: Family<AccountLabels, Gauge>,
    /// How long the oldest waiting command of an account has waited.
    pub account_oldest_wait: Family<AccountLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Commands of an account holding one of its slots (waiting for a start, or calling).
    pub account_in_flight: Family<AccountLabels, Gauge>,
    /// Time commands of an account spent waiting for its budget.
    pub account_budget_wait: Family<AccountLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Commands of an account set aside in its queues.
    pub account_set_aside: Family<AccountLabels, Counter>,
    /// Operations on an account's queues that failed.
    pub account_queue_failures: Family<AccountLabels, Counter>,
    /// Account queues looked for at the broker when a source was taken up.
    pub account_queue_looks: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Every series, in the order of the exposition: name (after the `transfer_` prefix), unit (the
/// encoder appends it to the name), the field of [`Metrics`] that holds it, and help. Kept as
/// a table, one row a series, rather than a call each, so `new` stays short and a series is
/// described in one place; rustfmt would spread each row over six lines.
#[rustfmt::skip]
const SERIES: &[Series] = &[
    ("commands_received", None, |m| &m.commands_received,
        "Commands taken from the commands queue"),
    ("events_published", None, |m| &m.events_published,
        "Events confirmed by the broker, by event name"),
    ("commands_deduplicated", None, |m| &m.commands_deduplicated,
        "Commands already completed whose outcome was republished from memory instead of calling the API again"),
    ("api_calls", None, |m| &m.api_calls,
        "AgentAssist calls by HTTP status class and account"),
    ("api_call_duration", Some(Unit::Seconds), |m| &m.api_call_duration,
        "AgentAssist call latency"),
    ("api_retries", None, |m| &m.api_retries,
        "Retries scheduled after transient AgentAssist failures"),
    ("commands_in_flight", None, |m| &m.commands_in_flight,
        "Commands received and not yet acked or returned"),
    ("callbacks", None, |m| &m.callbacks,
        "AgentAssist callbacks received by the relay, by result"),
    ("broker_reconnects", None, |m| &m.broker_reconnects,
        "Broker connections re-established after a loss"),
    ("commands_requeued", None, |m| &m.commands_requeued,
        "Commands returned to the queue unacked: outcome not confirmed, or shutdown"),
    ("command_panics", None, |m| &m.command_panics,
        "Commands whose processing panicked; each ended as transfer.failed (internal) or went back to the queue"),
    ("redis_round_trips", None, |m| &m.redis_round_trips,
        "Redis round trips of the fleet's shared state, by operation"),
    ("redis_errors", None, |m| &m.redis_errors,
        "Redis calls that failed or timed out, by operation"),
    ("redis_round_trip", Some(Unit::Seconds), |m| &m.redis_round_trip_duration,
        "Redis round-trip latency, by operation"),
    ("redis_unacknowledged", None, |m| &m.redis_unacknowledged,
        "Writes fewer than fleet.redis_min_replicas replicas acknowledged in time, by operation; their calls waited"),
    ("redis_primary_changes", None, |m| &m.redis_primary_changes,
        "Times the fleet looked for its Redis primary again (failover, READONLY, primary gone) and found one"),
    ("fleet_claims_taken_over", None, |m| &m.fleet_claims_taken_over,
        "Claims taken over from a replica that died with a call possibly on the wire"),
    ("fleet_claim_waits", None, |m| &m.fleet_claim_waits,
        "Commands found claimed by another live replica and waited for"),
    ("fleet_partitions_owned", None, |m| &m.fleet_partitions_owned,
        "Partition queues this replica owns and consumes"),
    ("fleet_members", None, |m| &m.fleet_members,
        "Live fleet members this replica sees, itself included"),
    ("fleet_rebalances", None, |m| &m.fleet_rebalances,
        "Changes of this replica's partitions"),
    ("fleet_routed", None, |m| &m.fleet_routed,
        "Commands the intake routed to a partition queue"),
    ("breaker_open", None, |m| &m.breaker_open,
        "Circuit breakers open, one per AgentAssist host (no attempt to that host starts): 1 while the only one is open"),
    ("breaker_openings", None, |m| &m.breaker_openings,
        "Times the circuit breaker opened"),
    ("breaker_open_time", Some(Unit::Seconds), |m| &m.breaker_open_time,
        "Time the circuit breaker spent open, counted when it closes"),
    ("breaker_probes", None, |m| &m.breaker_probes,
        "Probes of AgentAssist while the breaker is open, by result (answered, failed)"),
    ("breaker_held", None, |m| &m.breaker_held,
        "Commands waiting on the open circuit breaker (new ones, and retries held)"),
    ("account_waiting", None, |m| &m.account_waiting,
        "Commands of an account waiting: in memory for a slot, or set aside in its own queues"),
    ("account_oldest_wait", Some(Unit::Seconds), |m| &m.account_oldest_wait,
        "How long the oldest waiting command of an account has waited"),
    ("account_in_flight", None, |m| &m.account_in_flight,
        "Commands of an account holding one of its bots.max_in_flight slots (waiting for a start, or calling)"),
    ("account_budget_wait", Some(Unit::Seconds), |m| &m.account_budget_wait,
        "Time commands of an account spent waiting for its rate budget (or a 429 pause)"),
    ("account_set_aside", None, |m| &m.account_set_aside,
        "Commands of an account set aside in its own queue because it could not start them soon"),
    ("account_queue_failures", None, |m| &m.account_queue_failures,
        "Operations on an account's queue that failed (declare, look, consume, delete), or its consumer ending; each is tried again after a pause that grows"),
    ("account_queue_looks", None, |m| &m.account_queue_looks,
        "Account queues looked for at the broker when a source was taken up: those its list names (once per configured account where an earlier version left no list)"),
];

/// One row of [`SERIES`].
type Series = (
    &'static str,
    Option<Unit>,
    fn(&Metrics) -> &dyn Registrable,
    &'static str,
);

/// A field of [`Metrics`], registered under a row of [`SERIES`]: the registry keeps a clone,
/// which shares the field's values.
trait Registrable {
    fn register(&self, registry: &mut Registry, name: &str, unit: Option<Unit>, help: &str);
}

impl<M: Metric + Clone> Registrable for M {
    fn register(&self, registry: &mut Registry, name: &str, unit: Option<Unit>, help: &str) {
        match unit {
            Some(unit) => registry.register_with_unit(name, help, unit, self.clone()),
            None => registry.register(name, help, self.clone()),
        }
    }
}

impl Metrics {
    /// Registers every series (the table `SERIES`) under the `transfer_` prefix.
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::default(),
            commands_received: Counter::default(),
            events_published: Family::default(),
            commands_deduplicated: Counter::default(),
            api_calls: Family::default(),
            api_call_duration: Family::new_with_constructor(|| {
                Histogram::new([
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
            }),
            api_retries: Family::default(),
            commands_in_flight: Gauge::default(),
            callbacks: Family::default(),
            broker_reconnects: Counter::default(),
            commands_requeued: Counter::default(),
            command_panics: Counter::default(),
            redis_round_trips: Family::default(),
            redis_errors: Family::default(),
            redis_unacknowledged: Family::default(),
            redis_primary_changes: Counter::default(),
            redis_round_trip_duration: Family::new_with_constructor(|| {
                Histogram::new([
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ])
            }),
            fleet_claims_taken_over: Counter::default(),
            fleet_claim_waits: Counter::default(),
            fleet_partitions_owned: Gauge::default(),
            fleet_members: Gauge::default(),
            fleet_rebalances: Counter::default(),
            fleet_routed: Counter::default(),
            breaker_open: Gauge::default(),
            breaker_openings: Counter::default(),
            breaker_open_time: Counter::default(),
            breaker_probes: Family::default(),
            breaker_held: Gauge::default(),
            account_waiting: Family::default(),
            account_oldest_wait: Family::default(),
            account_in_flight: Family::default(),
            account_budget_wait: Family::default(),
            account_set_aside: Family::default(),
            account_queue_failures: Family::default(),
            account_queue_looks: Counter::default(),
        };
        let mut registry = Registry::with_prefix("transfer");
        for (name, unit, field, help) in SERIES {
            field(&m).register(&mut registry, name, unit.clone(), help);
        }
        for kind in EventKind::ALL {
            // Zero-valued series exist from the start, so rates work from the first scrape.
            let _ = m
                .events_published
                .get_or_create(&EventLabels { event: kind.name() });
        }
        for result in ["answered", "failed"] {
            let _ = m.breaker_probes.get_or_create(&ProbeLabels { result });
        }
        Self { registry, ..m }
    }

    /// One confirmed event.
    pub fn published(&self, kind: EventKind) {
        self.events_published
            .get_or_create(&EventLabels { event: kind.name() })
            .inc();
    }

    /// One API call.
    pub fn api_call(&self, account: &str, status: Option<u16>, seconds: f64) {
        self.api_calls
            .get_or_create(&CallLabels {
                status: status_class(status),
                account: account.to_owned(),
            })
            .inc();
        self.api_call_duration
            .get_or_create(&AccountLabels {
                account: account.to_owned(),
            })
            .observe(seconds);
    }

    /// One Redis call of the fleet, its latency and whether it failed.
    pub fn redis_call(&self, op: &'static str, seconds: f64, failed: bool) {
        let labels = RedisLabels { op };
        self.redis_round_trips.get_or_create(&labels).inc();
        self.redis_round_trip_duration
            .get_or_create(&labels)
            .observe(seconds);
        if failed {
            self.redis_errors.get_or_create(&labels).inc();
        }
    }

    /// One callback handled by the relay.
    pub fn callback(&self, result: RelayResult) {
        self.callbacks
            .get_or_create(&RelayLabels {
                result: result.label(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
