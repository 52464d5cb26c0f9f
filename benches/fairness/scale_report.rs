//! What scenario scale saw (the events, each command's first; the calls per rate window at the
//! simulator) and its report, each figure next to its goal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::PARTITIONS;
use crate::rabbit::BrokerPeaks;
use crate::scale::{Options, SETTLE, TAKE_UP_LIMIT, THIRD_AFTER, TRICKLE_EVERY};

/// What the run measured.
pub(crate) struct Outcome {
    /// RabbitMQ's peaks while the run went on.
    pub(crate) broker: BrokerPeaks,
    /// The run's account queues [`SETTLE`] after the last command ended.
    pub(crate) queues_after: Result<usize, String>,
    /// The third replica's take-up time, if it took up its share within [`TAKE_UP_LIMIT`].
    pub(crate) take_up: Option<Duration>,
    /// The partitions it owned then.
    pub(crate) third_owned: f64,
    /// Its `transfer_account_queue_looks_total` at take-up and at the end.
    pub(crate) looks: (f64, f64),
    /// Burst commands published.
    pub(crate) burst: usize,
    /// Trickle commands published.
    pub(crate) trickle_published: usize,
    /// The events seen.
    pub(crate) tally: Tally,
    /// The most calls of one account in one rate window, and the account.
    pub(crate) most: Option<(String, usize)>,
    /// Calls the simulator recorded, all accounts.
    pub(crate) calls: usize,
}

/// The events seen: each command's first one.
pub(crate) struct Tally {
    /// Trickle commands not ended yet, with when they were published.
    pub(crate) sent: HashMap<String, Instant>,
    pub(crate) seen: HashSet<String>,
    pub(crate) trickle_ended: usize,
    pub(crate) events: BTreeMap<String, usize>,
    /// When the last command ended.
    pub(crate) last: Option<Instant>,
    pub(crate) latency_ms: Histogram<u64>,
}

impl Tally {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            sent: HashMap::new(),
            seen: HashSet::new(),
            trickle_ended: 0,
            events: BTreeMap::new(),
            last: None,
            latency_ms: Histogram::new(3)?,
        })
    }

    pub(crate) fn ended(&mut self, id: &str, event: &str) {
        if !self.seen.insert(id.to_owned()) {
            return;
        }
        self.last = Some(Instant::now());
        *self.events.entry(event.to_owned()).or_insert(0) += 1;
        if let Some(at) = self.sent.remove(id) {
            let ms = u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX);
            let _ = self.latency_ms.record(ms.max(1));
            self.trickle_ended += 1;
        }
    }
}

/// The most calls of one account within any half-open interval of length `window`, at the
/// simulator's clock (whole ms), and that account (the first by name on a tie).
pub(crate) fn most_in_a_window(
    arrivals: &BTreeMap<String, Vec<u64>>,
    window: Duration,
) -> Option<(String, usize)> {
    let w = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let mut most: Option<(String, usize)> = None;
    for (account, calls) in arrivals {
        let mut sorted = calls.clone();
        sorted.sort_unstable();
        let (mut from, mut best) = (0, 0);
        for (to, &t) in sorted.iter().enumerate() {
            while t - sorted[from] >= w {
                from += 1;
            }
            best = best.max(to + 1 - from);
        }
        if most.as_ref().is_none_or(|(_, n)| best > *n) {
            most = Some((account.clone(), best));
        }
    }
    most
}

/// Prints the figures of the run, each next to its goal and whether it met it (never asserted).
pub(crate) fn report(o: &Options, r: &Outcome) {
    println!(
        "\n(scale) {} accounts at {} per {:?}; {} bursting with {} commands each at once; {} \
         trickling one every {TRICKLE_EVERY:?} for {:?}; 3 replicas, the third from \
         {THIRD_AFTER:?} in; {PARTITIONS} partitions; API 100 ms",
        o.accounts, o.limit, o.window, o.bursting, o.burst, o.trickle, o.duration
    );
    let row = |what: &str, figure: String, goal: &str, met: Option<bool>| {
        let met = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        };
        println!("{what:<42} {figure:>26}  {goal:<18} {met}");
    };
    row("measure", "figure".into(), "goal", None);
    let queues = r.broker.queues.map_or("-".into(), |n| n.to_string());
    row("account queues at the peak", queues, "", None);
    let (after, zero) = match &r.queues_after {
        Ok(n) => (n.to_string(), Some(*n == 0)),
        Err(_) => ("-".to_owned(), None),
    };
    let settle = format!("account queues {} s after the last end", SETTLE.as_secs());
    row(&settle, after, "0", zero);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let rss = r
        .broker
        .rss_kib
        .map_or("- (no beam.smp)".into(), |(first, peak)| {
            format!("{:.1} MiB (at start {:.1})", mib(peak), mib(first))
        });
    row("RabbitMQ (beam.smp) RSS at the peak", rss, "", None);
    let take_up = r.take_up.map_or_else(
        || format!("over {TAKE_UP_LIMIT:?}, owns {}", r.third_owned),
        |d| format!("{:.3} s, owns {}", d.as_secs_f64(), r.third_owned),
    );
    let fast = r.take_up.map(|d| d < Duration::from_secs(2));
    row("take-up by the third replica", take_up, "under 2 s", fast);
    let looks = format!("{} / {}", r.looks.0, r.looks.1);
    row("its account-queue looks (take-up / end)", looks, "", None);
    let h = &r.tally.latency_ms;
    let (p50, p99, max) = (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max());
    let latency = format!("{p50} / {p99} / {max} ms");
    let met = (!h.is_empty()).then_some(p99 < 500);
    row("trickle p50 / p99 / max", latency, "p99 under 500 ms", met);
    let ended = r.tally.seen.len();
    let total = r.burst + r.trickle_published;
    let all = format!("{ended} of {total}");
    row("commands ended", all, "all", Some(ended == total));
    let (burst_ended, trickle_ended) = (ended - r.tally.trickle_ended, r.tally.trickle_ended);
    let split = format!(
        "{burst_ended} of {} / {trickle_ended} of {}",
        r.burst, r.trickle_published
    );
    row("  burst / trickle", split, "", None);
    for (event, n) in &r.tally.events {
        row(&format!("  {event}"), n.to_string(), "", None);
    }
    let (most, within) = r.most.as_ref().map_or(("-".into(), None), |(account, n)| {
        let within = u32::try_from(*n).is_ok_and(|n| n <= o.limit);
        (format!("{n} ({account})"), Some(within))
    });
    let window = format!("most calls in one {:?} window", o.window);
    row(&window, most, &format!("at most {}", o.limit), within);
    row("  calls the simulator saw", r.calls.to_string(), "", None);
    if let (failed, Some(e)) = &r.broker.failed {
        println!("{failed} queue count(s) failed, the first: {e}");
    }
    if let Err(e) = &r.queues_after {
        println!("the count after the last end failed: {e}");
    }
}
