//! Turning runs into numbers: per-run metrics, medians over runs, the terminal table with
//! its target column, and the JSON file.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::fleet::{PING_OP, RedisMetrics};
use crate::run::{Measured, Pair, Scenario, WorkerRun};

/// Metric name → value, for one run or a median.
pub type Numbers = BTreeMap<&'static str, f64>;

/// A metric, or NaN when it is missing, so a report never panics over a missing number.
pub fn v(numbers: &Numbers, key: &str) -> f64 {
    numbers.get(key).copied().unwrap_or(f64::NAN)
}

/// Every run of one scenario.
pub struct ScenarioResult {
    /// What was run.
    pub scenario: Scenario,
    /// The worker's runs (in (f), (g), (h): the pair's baseline, e.g. single-process).
    pub workers: Vec<WorkerRun>,
    /// The runs of the pair's other mode ((f), (g), (h) only; in (f): fleet mode).
    pub compared: Vec<WorkerRun>,
    /// The relay's runs (scenario (a) only).
    pub relays: Vec<Measured>,
    /// The floor's runs (scenarios (a), (b) and (c)).
    pub floors: Vec<Measured>,
    /// The harness failed during this scenario.
    pub error: Option<String>,
}

/// One line of the table.
pub struct Row {
    scenario: char,
    metric: String,
    value: String,
    target: String,
    met: Option<bool>,
}

/// The numbers every process has.
pub fn measured_numbers(m: &Measured) -> Numbers {
    let unique = m.n - m.missing;
    let secs = m.elapsed.as_secs_f64();
    let ms = |q: f64| m.latency_us.value_at_quantile(q) as f64 / 1000.0;
    let mut out = Numbers::new();
    out.insert("commands", m.n as f64);
    out.insert("elapsed_s", secs);
    out.insert(
        "throughput_per_s",
        if secs > 0.0 {
            unique as f64 / secs
        } else {
            0.0
        },
    );
    out.insert("latency_p50_ms", ms(0.50));
    out.insert("latency_p90_ms", ms(0.90));
    out.insert("latency_p99_ms", ms(0.99));
    out.insert("latency_max_ms", m.latency_us.max() as f64 / 1000.0);
    let cpu_s = m.end.cpu_s - m.idle.cpu_s;
    out.insert("cpu_s", cpu_s);
    out.insert("cpu_us_per_command", cpu_s * 1e6 / m.n.max(1) as f64);
    if cpu_s > 0.0 {
        out.insert("cpu_sys_share", (m.end.sys_s - m.idle.sys_s) / cpu_s);
    }
    let per_command = |cpu: f64| cpu * 1e6 / m.n.max(1) as f64;
    if let Some(broker) = m.broker_cpu_s {
        out.insert("broker_cpu_us_per_command", per_command(broker));
    }
    if let Some(redis) = m.redis_cpu_s {
        out.insert("redis_cpu_us_per_command", per_command(redis));
    }
    out.insert("bench_cpu_us_per_command", per_command(m.bench_cpu_s));
    out.insert("idle_rss_mib", m.idle.rss_kib as f64 / 1024.0);
    out.insert("idle_rss_anon_mib", m.idle.anon_kib as f64 / 1024.0);
    out.insert("end_rss_mib", m.end.rss_kib as f64 / 1024.0);
    out.insert("peak_rss_mib", m.end.hwm_kib as f64 / 1024.0);
    if let Some(peak) = m.peak_in_flight {
        out.insert("peak_in_flight", peak);
    }
    if let Some(sim) = m.sim_cpu_s {
        out.insert("sim_cpu_us_per_command", per_command(sim));
    }
    if let Some(calls) = m.api_calls {
        out.insert("api_calls", calls as f64);
    }
    out
}

/// Growth from idle RSS to peak RSS per command that can be in flight at once, KiB.
fn rss_kib_per_in_flight(m: &Measured, scenario: &Scenario) -> f64 {
    let in_flight = m.n.min(usize::from(scenario.prefetch)).max(1) as f64;
    m.end.hwm_kib.saturating_sub(m.idle.rss_kib) as f64 / in_flight
}

/// With commands sharing sessions ((e)): growth from idle RSS to peak RSS per command that
/// waits for its session's turn while the first of each session is in flight, KiB. The calls
/// in flight are counted in the growth, so this is an upper bound.
fn rss_kib_per_waiting(m: &Measured, scenario: &Scenario) -> Option<f64> {
    let sessions = scenario.sessions?;
    let held = m.n.min(usize::from(scenario.prefetch));
    let waiting = held.saturating_sub(sessions).max(1) as f64;
    Some(m.end.hwm_kib.saturating_sub(m.idle.rss_kib) as f64 / waiting)
}

/// The floor's numbers: the common ones plus memory per in-flight command.
pub fn floor_numbers(m: &Measured, scenario: &Scenario) -> Numbers {
    let mut out = measured_numbers(m);
    out.insert("rss_kib_per_in_flight", rss_kib_per_in_flight(m, scenario));
    out
}

/// The worker's numbers: the common ones plus API calls, simulator CPU and memory per
/// in-flight command.
pub fn worker_numbers(run: &WorkerRun, scenario: &Scenario) -> Numbers {
    let m = &run.measured;
    let mut out = measured_numbers(m);
    out.insert("api_calls", run.api["calls"].as_f64().unwrap_or(f64::NAN));
    out.insert(
        "sim_cpu_us_per_command",
        run.sim_cpu_s * 1e6 / m.n.max(1) as f64,
    );
    out.insert("rss_kib_per_in_flight", rss_kib_per_in_flight(m, scenario));
    if let Some(per) = rss_kib_per_waiting(m, scenario) {
        out.insert("rss_kib_per_waiting", per);
    }
    if let Some(redis) = &run.redis {
        out.extend(redis_numbers(redis, m.n));
    }
    if let Some(routed) = run.routed {
        out.insert("routed_per_command", routed / m.n.max(1) as f64);
    }
    out.insert("replicas", run.mode.replicas as f64);
    out
}

/// The fleet's per-command Redis operations with their keys in [`Numbers`]: round trips per
/// command and mean latency. Any other operation but the health probe counts as `other`.
const REDIS_OPS: [(&str, &str, &str); 7] = [
    ("claim", "redis_claim_per_command", "redis_claim_mean_ms"),
    (
        "reserve",
        "redis_reserve_per_command",
        "redis_reserve_mean_ms",
    ),
    ("record", "redis_record_per_command", "redis_record_mean_ms"),
    ("renew", "redis_renew_per_command", "redis_renew_mean_ms"),
    ("pause", "redis_pause_per_command", "redis_pause_mean_ms"),
    (
        "release",
        "redis_release_per_command",
        "redis_release_mean_ms",
    ),
    ("other", "redis_other_per_command", "redis_other_mean_ms"),
];

fn is_known_op(op: &str) -> bool {
    op == PING_OP || REDIS_OPS.iter().any(|(name, _, _)| *name == op)
}

/// What the worker's metrics say about Redis over one fleet-mode run.
fn redis_numbers(redis: &crate::run::RedisRun, n: usize) -> Numbers {
    let m = &redis.metrics;
    let n = n.max(1) as f64;
    let mut out = Numbers::new();
    let total = m.per_command_round_trips();
    out.insert("redis_round_trips", total);
    out.insert("redis_round_trips_per_command", total / n);
    for (op, per_command, mean_ms) in REDIS_OPS {
        let count: f64 = m
            .round_trips
            .iter()
            .filter(|(o, _)| {
                if op == "other" {
                    !is_known_op(o)
                } else {
                    *o == op
                }
            })
            .map(|(_, v)| v)
            .fold(0.0, |a, b| a + b);
        out.insert(per_command, count / n);
        let mean = if op == "other" {
            m.mean_ms(|o| !is_known_op(o))
        } else {
            m.mean_ms(|o| o == op)
        };
        out.insert(mean_ms, mean);
    }
    out.insert(
        "redis_pings",
        m.round_trips.get(PING_OP).copied().unwrap_or(0.0),
    );
    out.insert("redis_errors", m.errors.values().fold(0.0, |a, b| a + b));
    out.insert("redis_mean_ms", m.mean_ms(|o| o != PING_OP));
    if let Some(keys) = redis.keys_left {
        out.insert("redis_keys_left", keys as f64);
        out.insert("redis_keys_left_per_command", keys as f64 / n);
    }
    out
}

/// The pair's second mode against its first, for one pair of runs (in (f): fleet mode against
/// single-process, whence the names).
fn fleet_ratios(single: &Numbers, fleet: &Numbers) -> Numbers {
    let mut out = Numbers::new();
    out.insert(
        "throughput_fleet_vs_single",
        v(fleet, "throughput_per_s") / v(single, "throughput_per_s"),
    );
    out.insert(
        "cpu_fleet_vs_single",
        v(fleet, "cpu_us_per_command") / v(single, "cpu_us_per_command"),
    );
    out
}

/// Ratios of one run: to the relay in (a), to the floor in (a), (b) and (c), to prefetch ÷ latency
/// when the API has latency.
fn ratios(
    scenario: &Scenario,
    worker: &Numbers,
    relay: Option<&Numbers>,
    floor: Option<&Numbers>,
) -> Numbers {
    let mut out = Numbers::new();
    // The worker's `key` over the reference's, as `name`.
    let mut ratio = |name, key, reference: &Numbers| {
        out.insert(name, v(worker, key) / v(reference, key));
    };
    if let Some(floor) = floor {
        ratio("throughput_vs_floor", "throughput_per_s", floor);
        ratio("cpu_vs_floor", "cpu_us_per_command", floor);
        ratio("peak_rss_vs_floor", "peak_rss_mib", floor);
    }
    if let Some(relay) = relay {
        ratio("throughput_vs_relay", "throughput_per_s", relay);
        ratio("cpu_vs_relay", "cpu_us_per_command", relay);
    }
    if let Some(floor) = floor
        && scenario.key == 'c'
    {
        let floor_kib = v(floor, "rss_kib_per_in_flight");
        out.insert("floor_rss_kib_per_in_flight", floor_kib);
        out.insert(
            "rss_kib_per_in_flight_above_floor",
            v(worker, "rss_kib_per_in_flight") - floor_kib,
        );
    }
    if scenario.latency_ms > 0 {
        // What can run at once: the prefetch, or in (e) one call per session.
        let slots = scenario
            .sessions
            .map_or(f64::from(scenario.prefetch), |s| s as f64);
        let ceiling = slots * 1000.0 / scenario.latency_ms as f64;
        out.insert("ceiling_per_s", ceiling);
        out.insert(
            "throughput_vs_ceiling",
            v(worker, "throughput_per_s") / ceiling,
        );
        // All slots start together, so commands run in rounds of `slots`: even a perfect
        // worker needs ceil(N / slots) latencies, a partial last round included.
        let rounds = (v(worker, "commands") / slots).ceil();
        let ideal = v(worker, "commands") / (rounds * scenario.latency_ms as f64 / 1000.0);
        out.insert("ideal_vs_ceiling", ideal / ceiling);
    }
    out
}

/// The median of each metric over runs (the lower middle one for an even count).
pub fn median(runs: &[Numbers]) -> Numbers {
    let mut out = Numbers::new();
    let Some(first) = runs.first() else {
        return out;
    };
    for key in first.keys() {
        let mut values: Vec<f64> = runs.iter().filter_map(|r| r.get(key).copied()).collect();
        values.sort_by(f64::total_cmp);
        if !values.is_empty() {
            out.insert(key, values[(values.len() - 1) / 2]);
        }
    }
    out
}

/// Counts over every run of a scenario that decide correctness.
#[derive(Debug, Default)]
pub struct Correctness {
    /// Commands published.
    pub commands: usize,
    /// Commands that never got an event.
    pub missing: usize,
    /// Events beyond the first per command.
    pub duplicates: u64,
    /// First events the scenario does not allow.
    pub unexpected: u64,
    /// Worker runs whose API calls differ from the sum of `attempts` in the events.
    pub api_mismatches: usize,
    /// Commands left on the commands queue after a run.
    pub left_in_queue: u64,
    /// Why collection stopped early, per run that did.
    pub stopped: Vec<String>,
}

impl Correctness {
    fn add(&mut self, m: &Measured) {
        self.commands += m.n;
        self.missing += m.missing;
        self.duplicates += m.duplicates;
        self.unexpected += m.unexpected;
        self.left_in_queue += u64::from(m.left_in_queue.unwrap_or(0));
        self.stopped.extend(m.stopped.clone());
    }

    /// Every command got exactly one allowed terminal event.
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.unexpected == 0
    }
}

impl ScenarioResult {
    /// Worker numbers per run.
    fn worker_runs(&self) -> Vec<Numbers> {
        self.workers
            .iter()
            .map(|w| worker_numbers(w, &self.scenario))
            .collect()
    }

    /// Worker numbers per run of the pair's second mode.
    fn compared_runs(&self) -> Vec<Numbers> {
        self.compared
            .iter()
            .map(|w| worker_numbers(w, &self.scenario))
            .collect()
    }

    fn relay_runs(&self) -> Vec<Numbers> {
        self.relays.iter().map(measured_numbers).collect()
    }

    fn floor_runs(&self) -> Vec<Numbers> {
        self.floors
            .iter()
            .map(|m| floor_numbers(m, &self.scenario))
            .collect()
    }

    fn ratio_runs(&self) -> Vec<Numbers> {
        let relays = self.relay_runs();
        let floors = self.floor_runs();
        let fleets = self.compared_runs();
        self.worker_runs()
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let mut out = ratios(&self.scenario, w, relays.get(i), floors.get(i));
                if let Some(fleet) = fleets.get(i) {
                    out.extend(fleet_ratios(w, fleet));
                }
                out
            })
            .collect()
    }

    /// Correctness over every run: worker (both modes), relay and floor.
    pub fn correctness(&self) -> Correctness {
        let mut c = workers_correctness(self.workers.iter().chain(&self.compared));
        for r in &self.relays {
            c.add(r);
        }
        for f in &self.floors {
            c.add(f);
            if f.api_calls.is_some_and(|calls| calls != f.attempts) {
                c.api_mismatches += 1;
            }
        }
        c
    }

    /// The table rows of this scenario.
    pub fn rows(&self) -> Vec<Row> {
        let s = &self.scenario;
        let mut rows = Vec::new();
        if let Some(e) = &self.error {
            rows.push(row(s.key, "HARNESS ERROR", e, "", None));
        }
        if s.key == 'f' {
            rows.extend(self.fleet_rows());
            return rows;
        }
        if let Some(pair) = s.pair {
            rows.extend(self.pair_rows(pair));
            return rows;
        }
        if self.workers.is_empty() {
            return rows;
        }
        let w = median(&self.worker_runs());
        let r = median(&self.relay_runs());
        let f = median(&self.floor_runs());
        let x = median(&self.ratio_runs());
        rows.extend(throughput_rows(s, &w, &r, &x));
        rows.extend(floor_throughput_rows(s, &f, &x));
        rows.extend(latency_rows(s, &w, &r, &f));
        rows.extend(cpu_rows(s, &w, &r, &x));
        rows.extend(floor_cpu_rows(s, &f, &x));
        rows.extend(memory_rows(s, &w, &r));
        rows.extend(floor_memory_rows(s, &f, &x));
        rows.extend(self.outcome_rows(&w, &f));
        rows
    }

    fn outcome_rows(&self, w: &Numbers, f: &Numbers) -> Vec<Row> {
        let s = &self.scenario;
        let c = self.correctness();
        let events = event_tally(&self.workers);
        let api = format!(
            "{:.0}{}",
            v(w, "api_calls"),
            if c.api_mismatches == 0 {
                " (= Σ attempts)"
            } else {
                " (≠ Σ attempts!)"
            }
        );
        let exactly_once = format!(
            "{} of {} got one; missing {}, duplicates {}, unexpected {}",
            c.commands - c.missing,
            c.commands,
            c.missing,
            c.duplicates,
            c.unexpected
        );
        let target = if s.fail_rate > 0.0 {
            "none lost; succeeded, or failed after 8 attempts"
        } else {
            "none lost, all succeeded"
        };
        let mut rows = vec![
            row(s.key, "API calls (median run)", &api, "", None),
            row(s.key, "terminal events (all runs)", &events, "", None),
            row(
                s.key,
                "exactly one event per command",
                &exactly_once,
                target,
                Some(c.ok()),
            ),
        ];
        if !self.floors.is_empty() {
            let events = tally(self.floors.iter());
            let text = format!("{events}; {:.0} API calls (median run)", v(f, "api_calls"));
            rows.push(row(
                s.key,
                "terminal events, floor (all runs)",
                &text,
                "",
                None,
            ));
        }
        let logged: usize = self.workers.iter().map(|w| w.log_lines).sum();
        let unclean = self.workers.iter().filter(|w| !w.clean_exit).count();
        rows.push(row(
            s.key,
            "worker warn/error log lines; unclean exits",
            &format!("{logged}; {unclean}"),
            "",
            None,
        ));
        rows
    }
}

/// Correctness over some worker runs.
fn workers_correctness<'a>(runs: impl Iterator<Item = &'a WorkerRun>) -> Correctness {
    let mut c = Correctness::default();
    for w in runs {
        c.add(&w.measured);
        if w.api["calls"].as_u64() != Some(w.measured.attempts) {
            c.api_mismatches += 1;
        }
    }
    c
}

impl ScenarioResult {
    /// Scenario (f): both modes side by side, fleet against single-process, and what Redis
    /// cost per command.
    fn fleet_rows(&self) -> Vec<Row> {
        let k = self.scenario.key;
        let single = median(&self.worker_runs());
        let fleet = median(&self.compared_runs());
        let x = median(&self.ratio_runs());
        let mut rows = Vec::new();
        let throughput = |n: &Numbers| format!("{:.0} cmd/s", v(n, "throughput_per_s"));
        rows.push(row(
            k,
            "throughput, single-process",
            &throughput(&single),
            "",
            None,
        ));
        let ratio = v(&x, "throughput_fleet_vs_single");
        let text = format!(
            "{} ({:.0} % of single-process)",
            throughput(&fleet),
            ratio * 100.0
        );
        rows.push(row(
            k,
            "throughput, fleet mode",
            &text,
            "≥ 75 % of single-process",
            (!ratio.is_nan()).then_some(ratio >= 0.75),
        ));
        for (mode, n) in [("single-process", &single), ("fleet mode", &fleet)] {
            let metric = format!("latency p50/p90/p99/max, {mode}");
            rows.push(row(k, &metric, &latency_text(n), "", None));
        }
        if !fleet.is_empty() {
            rows.extend(self.redis_rows(&fleet));
        }
        rows.extend(fleet_cpu_rows(k, &single, &fleet, &x));
        for (mode, n) in [("single-process", &single), ("fleet mode", &fleet)] {
            let peak = v(n, "peak_rss_mib");
            let (target, met) = if self.scenario.prefetch == 256 && peak > 0.0 {
                ("≤ 40 MiB at prefetch 256", Some(peak <= 40.0))
            } else {
                ("", None)
            };
            let text = format!("{peak:.1} MiB (idle {:.1} MiB)", v(n, "idle_rss_mib"));
            rows.push(row(k, &format!("peak RSS, {mode}"), &text, target, met));
        }
        let in_flight = format!(
            "{:.0} / {:.0} (single-process / fleet)",
            v(&single, "peak_in_flight"),
            v(&fleet, "peak_in_flight")
        );
        rows.push(row(
            k,
            "peak in flight (worker gauge)",
            &in_flight,
            "",
            None,
        ));
        rows.extend(self.pair_outcome_rows(&single, &fleet));
        rows
    }

    /// Round trips per command by operation, errors, latency and keys, from fleet mode.
    fn redis_rows(&self, fleet: &Numbers) -> Vec<Row> {
        let k = self.scenario.key;
        // Over all fleet-mode runs together, by operation name as the worker labels it, so an
        // operation the bench does not know yet still shows.
        let mut all = RedisMetrics::default();
        let mut commands = 0;
        for w in &self.compared {
            if let Some(redis) = &w.redis {
                all.add(&redis.metrics);
                commands += w.measured.n;
            }
        }
        let commands = commands.max(1) as f64;
        let mut ops: Vec<&String> = all
            .round_trips
            .keys()
            .filter(|op| op.as_str() != PING_OP)
            .collect();
        let rank = |op: &str| {
            REDIS_OPS
                .iter()
                .position(|(name, _, _)| *name == op)
                .unwrap_or(REDIS_OPS.len())
        };
        ops.sort_by_key(|op| (rank(op), op.as_str()));
        let per_command = all.per_command_round_trips() / commands;
        let breakdown = ops
            .iter()
            .map(|op| format!("{op} {:.2}", all.round_trips[*op] / commands))
            .collect::<Vec<_>>()
            .join(" + ");
        let mut rows = vec![row(
            k,
            "Redis round trips per command (all runs, no ping)",
            &format!("{per_command:.2} = {breakdown}"),
            "≤ 2",
            // Membership's heartbeats and holds are a few a second, whatever the load.
            (!per_command.is_nan()).then_some(per_command <= 2.01),
        )];
        let total: f64 = all.errors.values().fold(0.0, |a, b| a + b);
        let by_op = all
            .errors
            .iter()
            .filter(|(_, c)| **c > 0.0)
            .map(|(op, c)| format!("{op} {c:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        let text = if by_op.is_empty() {
            format!("{total:.0}")
        } else {
            format!("{total:.0} ({by_op})")
        };
        rows.push(row(
            k,
            "Redis errors, fleet mode (all runs)",
            &text,
            "0",
            Some(total == 0.0),
        ));
        let means = ops
            .iter()
            .map(|op| format!("{op} {:.3}", all.mean_ms(|o| o == op.as_str())))
            .collect::<Vec<_>>()
            .join(", ");
        let mean = all.mean_ms(|o| o != PING_OP);
        let text = format!("{mean:.3} ms ({means})");
        rows.push(row(k, "Redis round trip, mean (all runs)", &text, "", None));
        if let Some(keys) = fleet.get("redis_keys_left") {
            let text = format!(
                "{keys:.0} ({:.2} per command; deleted by the bench)",
                v(fleet, "redis_keys_left_per_command")
            );
            rows.push(row(k, "Redis keys after the run", &text, "", None));
        }
        rows
    }

    /// API calls, events, exactly-once and logs of both modes of a pair.
    fn pair_outcome_rows(&self, single: &Numbers, fleet: &Numbers) -> Vec<Row> {
        let s = &self.scenario;
        let [first, second] = s.pair.map_or(["first", "second"], |p| p.labels);
        let modes = [(first, &self.workers), (second, &self.compared)];
        let events = event_tally(self.workers.iter().chain(&self.compared));
        let mismatches = self.correctness().api_mismatches;
        let api = format!(
            "{:.0} / {:.0} ({first} / {second}){}",
            v(single, "api_calls"),
            v(fleet, "api_calls"),
            if mismatches == 0 {
                " (= Σ attempts)"
            } else {
                " (≠ Σ attempts!)"
            }
        );
        let mut rows = vec![
            row(s.key, "API calls (median run)", &api, "", None),
            row(s.key, "terminal events (all runs)", &events, "", None),
        ];
        for (mode, runs) in modes {
            let c = workers_correctness(runs.iter());
            rows.push(row(
                s.key,
                &format!("exactly one event per command, {mode}"),
                &exactly_once_text(&c),
                "none lost, all succeeded",
                Some(c.ok() && c.commands > 0),
            ));
        }
        let logs = modes
            .iter()
            .map(|(mode, runs)| {
                let logged: usize = runs.iter().map(|w| w.log_lines).sum();
                let unclean = runs.iter().filter(|w| !w.clean_exit).count();
                format!("{logged}; {unclean} ({mode})")
            })
            .collect::<Vec<_>>()
            .join(" · ");
        rows.push(row(
            s.key,
            "worker warn/error log lines; unclean exits",
            &logs,
            "",
            None,
        ));
        rows
    }
}

impl ScenarioResult {
    /// Scenarios (g) and (h): the pair's two modes side by side (throughput and its ratio,
    /// latency, CPU, Redis, routing, partitions), then the outcome by mode.
    fn pair_rows(&self, pair: Pair) -> Vec<Row> {
        let s = &self.scenario;
        let k = s.key;
        let [first, second] = pair.labels;
        let medians = [median(&self.worker_runs()), median(&self.compared_runs())];
        let runs = [&self.workers, &self.compared];
        let x = median(&self.ratio_runs());
        let mut rows = Vec::new();
        for ((label, mode), n) in pair.labels.iter().zip(pair.modes).zip(&medians) {
            let mut text = format!("{:.0} cmd/s", v(n, "throughput_per_s"));
            if s.latency_ms > 0 {
                let ceiling =
                    mode.replicas as f64 * f64::from(s.prefetch) * 1000.0 / s.latency_ms as f64;
                text.push_str(&format!(
                    " ({:.1} % of replicas × prefetch ÷ latency = {ceiling:.0}/s)",
                    v(n, "throughput_per_s") / ceiling * 100.0
                ));
            }
            rows.push(row(k, &format!("throughput, {label}"), &text, "", None));
        }
        let per_run = self
            .ratio_runs()
            .iter()
            .map(|r| format!("{:.2}", v(r, "throughput_fleet_vs_single")))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "{:.2}× (runs: {per_run})",
            v(&x, "throughput_fleet_vs_single")
        );
        let metric = format!("throughput, {second} ÷ {first}");
        rows.push(row(k, &metric, &text, "", None));
        for (label, n) in pair.labels.iter().zip(&medians) {
            let metric = format!("latency p50/p90/p99/max, {label}");
            rows.push(row(k, &metric, &latency_text(n), "", None));
        }
        for (i, (label, n)) in pair.labels.iter().zip(&medians).enumerate() {
            let mut text = cpu_text(n);
            if i == 1 {
                let ratio = v(&x, "cpu_fleet_vs_single");
                text.push_str(&format!(" ({ratio:.2} × {first})"));
            }
            let metric = format!("CPU per command, worker(s), {label}");
            rows.push(row(k, &metric, &text, "", None));
        }
        let pairs = |key: &str, digits: usize| {
            format!(
                "{:.digits$} / {:.digits$} ({first} / {second})",
                v(&medians[0], key),
                v(&medians[1], key)
            )
        };
        let redis_cpu = pairs("redis_cpu_us_per_command", 1);
        rows.push(row(k, "CPU per command, Redis (µs)", &redis_cpu, "", None));
        let sim = pairs("sim_cpu_us_per_command", 1);
        rows.push(row(k, "CPU per command, simulator (µs)", &sim, "", None));
        for (label, n) in pair.labels.iter().zip(&medians) {
            let metric = format!("CPU per command, RabbitMQ + bench ({label})");
            rows.push(row(k, &metric, &others(n), "", None));
        }
        let trips = pairs("redis_round_trips_per_command", 2);
        rows.push(row(
            k,
            "Redis round trips per command, no ping",
            &trips,
            "",
            None,
        ));
        let routed = pairs("routed_per_command", 2);
        rows.push(row(k, "commands routed per command", &routed, "", None));
        let owned = runs
            .iter()
            .zip(pair.labels)
            .map(|(runs, label)| {
                let owned = runs.first().map_or_else(String::new, |w| {
                    w.partitions_owned
                        .iter()
                        .map(|o| format!("{o:.0}"))
                        .collect::<Vec<_>>()
                        .join(" + ")
                });
                let owned = if owned.is_empty() {
                    "none"
                } else {
                    owned.as_str()
                };
                format!("{owned} ({label})")
            })
            .collect::<Vec<_>>()
            .join(" · ");
        rows.push(row(k, "partitions owned per replica", &owned, "", None));
        let peak = pairs("peak_rss_mib", 1);
        rows.push(row(k, "peak RSS, all replicas (MiB)", &peak, "", None));
        let in_flight = pairs("peak_in_flight", 0);
        rows.push(row(
            k,
            "peak in flight (workers' gauges)",
            &in_flight,
            "",
            None,
        ));
        rows.extend(self.pair_outcome_rows(&medians[0], &medians[1]));
        rows
    }
}

/// CPU per command in both modes, Redis's share, the simulator's and everyone else's.
fn fleet_cpu_rows(k: char, single: &Numbers, fleet: &Numbers, x: &Numbers) -> Vec<Row> {
    let ratio = v(x, "cpu_fleet_vs_single");
    let mut rows = vec![
        row(
            k,
            "CPU per command, single-process",
            &cpu_text(single),
            "",
            None,
        ),
        row(
            k,
            "CPU per command, fleet mode",
            &format!("{} ({ratio:.2} × single-process)", cpu_text(fleet)),
            "",
            None,
        ),
    ];
    let redis = fleet
        .get("redis_cpu_us_per_command")
        .map_or_else(|| "n/a".to_owned(), |us| format!("{us:.1} µs"));
    rows.push(row(
        k,
        "CPU per command, Redis (fleet mode)",
        &redis,
        "",
        None,
    ));
    let sim = format!(
        "{:.1} / {:.1} µs (single-process / fleet)",
        v(single, "sim_cpu_us_per_command"),
        v(fleet, "sim_cpu_us_per_command")
    );
    rows.push(row(k, "CPU per command, simulator", &sim, "", None));
    for (mode, n) in [("single-process", single), ("fleet mode", fleet)] {
        let metric = format!("CPU per command, RabbitMQ + bench ({mode})");
        rows.push(row(k, &metric, &others(n), "", None));
    }
    rows
}

fn cpu_text(n: &Numbers) -> String {
    let sys = n.get("cpu_sys_share").copied().unwrap_or(0.0);
    format!(
        "{:.1} µs ({:.0} % sys)",
        v(n, "cpu_us_per_command"),
        sys * 100.0
    )
}

fn exactly_once_text(c: &Correctness) -> String {
    format!(
        "{} of {} got one; missing {}, duplicates {}, unexpected {}",
        c.commands - c.missing,
        c.commands,
        c.missing,
        c.duplicates,
        c.unexpected
    )
}

fn row(scenario: char, metric: &str, value: &str, target: &str, met: Option<bool>) -> Row {
    Row {
        scenario,
        metric: metric.to_owned(),
        value: value.to_owned(),
        target: target.to_owned(),
        met,
    }
}

fn throughput_rows(s: &Scenario, w: &Numbers, r: &Numbers, x: &Numbers) -> Vec<Row> {
    let mut rows = Vec::new();
    let value = format!("{:.0} cmd/s", v(w, "throughput_per_s"));
    if let Some(ratio) = x.get("throughput_vs_relay") {
        let text = format!("{value} ({:.0} % of relay)", ratio * 100.0);
        rows.push(row(
            s.key,
            "throughput, worker",
            &text,
            "≥ 90 % of relay",
            Some(*ratio >= 0.9),
        ));
        let relay = format!("{:.0} cmd/s", v(r, "throughput_per_s"));
        rows.push(row(s.key, "throughput, relay (ceiling)", &relay, "", None));
    } else if let Some(ratio) = x.get("throughput_vs_ceiling") {
        // The "perfect worker" figure assumes a steady state, i.e. more commands than prefetch.
        let slots = s.sessions.unwrap_or(usize::from(s.prefetch));
        let perfect = if s.n > slots {
            format!(
                "; a perfect worker: {:.1} %",
                v(x, "ideal_vs_ceiling") * 100.0
            )
        } else {
            String::new()
        };
        let text = format!(
            "{value} ({:.1} % of {:.0}/s{perfect})",
            ratio * 100.0,
            v(x, "ceiling_per_s"),
        );
        let target = if s.key == 'b' {
            "≥ 95 % of prefetch ÷ latency"
        } else {
            ""
        };
        let met = (s.key == 'b').then_some(*ratio >= 0.95);
        rows.push(row(s.key, "throughput, worker", &text, target, met));
    } else {
        rows.push(row(s.key, "throughput, worker", &value, "", None));
    }
    rows
}

/// The floor's throughput and the worker's against it.
fn floor_throughput_rows(s: &Scenario, f: &Numbers, x: &Numbers) -> Vec<Row> {
    let Some(ratio) = x.get("throughput_vs_floor") else {
        return Vec::new();
    };
    let mut floor = format!("{:.0} cmd/s", v(f, "throughput_per_s"));
    if let Some(ceiling) = x.get("ceiling_per_s") {
        let share = v(f, "throughput_per_s") / ceiling * 100.0;
        floor.push_str(&format!(" ({share:.1} % of {ceiling:.0}/s)"));
    }
    vec![
        row(s.key, "throughput, floor", &floor, "", None),
        row(
            s.key,
            "throughput, worker vs floor",
            &format!("{ratio:.2} × floor"),
            "≥ 0.95 × floor",
            Some(*ratio >= 0.95),
        ),
    ]
}

/// The floor's CPU per command and the worker's against it.
fn floor_cpu_rows(s: &Scenario, f: &Numbers, x: &Numbers) -> Vec<Row> {
    let Some(ratio) = x.get("cpu_vs_floor") else {
        return Vec::new();
    };
    vec![
        row(s.key, "CPU per command, floor", &cpu_text(f), "", None),
        row(
            s.key,
            "CPU per command, worker vs floor",
            &format!("{ratio:.2} × floor"),
            "≤ 1.10 × floor",
            Some(*ratio <= 1.1),
        ),
        row(
            s.key,
            "CPU per command, simulator (floor run)",
            &format!("{:.1} µs", v(f, "sim_cpu_us_per_command")),
            "",
            None,
        ),
        row(
            s.key,
            "CPU per command, RabbitMQ + bench (floor run)",
            &others(f),
            "",
            None,
        ),
    ]
}

/// The floor's memory, and in (c) the worker's memory per in-flight command above it.
fn floor_memory_rows(s: &Scenario, f: &Numbers, x: &Numbers) -> Vec<Row> {
    if f.is_empty() {
        return Vec::new();
    }
    let text = format!(
        "{:.1} / {:.1} MiB (worker's peak: {:.2} × floor)",
        v(f, "idle_rss_mib"),
        v(f, "peak_rss_mib"),
        v(x, "peak_rss_vs_floor")
    );
    let mut rows = vec![row(s.key, "idle / peak RSS, floor", &text, "", None)];
    if s.key == 'c' {
        let floor = v(f, "rss_kib_per_in_flight");
        let text = format!("{floor:.2} KiB ((peak − idle) ÷ {})", s.prefetch);
        rows.push(row(
            s.key,
            "memory per in-flight command, floor",
            &text,
            "",
            None,
        ));
        let above = v(x, "rss_kib_per_in_flight_above_floor");
        rows.push(row(
            s.key,
            "memory per in-flight command, worker above floor",
            &format!("{above:.2} KiB (worker − floor)"),
            "≤ 4 KiB",
            (!above.is_nan()).then_some(above <= 4.0),
        ));
    }
    rows
}

fn latency_text(n: &Numbers) -> String {
    format!(
        "{:.1} / {:.1} / {:.1} / {:.1} ms",
        v(n, "latency_p50_ms"),
        v(n, "latency_p90_ms"),
        v(n, "latency_p99_ms"),
        v(n, "latency_max_ms")
    )
}

fn latency_rows(s: &Scenario, w: &Numbers, r: &Numbers, f: &Numbers) -> Vec<Row> {
    let mut rows = vec![row(
        s.key,
        "latency p50/p90/p99/max, worker",
        &latency_text(w),
        "",
        None,
    )];
    if !r.is_empty() {
        rows.push(row(
            s.key,
            "latency p50/p90/p99/max, relay",
            &latency_text(r),
            "",
            None,
        ));
    }
    if !f.is_empty() {
        rows.push(row(
            s.key,
            "latency p50/p90/p99/max, floor",
            &latency_text(f),
            "",
            None,
        ));
    }
    rows
}

fn cpu_rows(s: &Scenario, w: &Numbers, r: &Numbers, x: &Numbers) -> Vec<Row> {
    let cpu = |n: &Numbers| {
        let sys = n.get("cpu_sys_share").copied().unwrap_or(0.0);
        format!(
            "{:.1} µs ({:.0} % sys)",
            v(n, "cpu_us_per_command"),
            sys * 100.0
        )
    };
    let value = cpu(w);
    let mut rows = Vec::new();
    if let Some(ratio) = x.get("cpu_vs_relay") {
        let text = format!("{value} ({ratio:.2} × relay)");
        rows.push(row(
            s.key,
            "CPU per command, worker",
            &text,
            "≤ 1.3 × relay",
            Some(*ratio <= 1.3),
        ));
        rows.push(row(s.key, "CPU per command, relay", &cpu(r), "", None));
    } else {
        rows.push(row(s.key, "CPU per command, worker", &value, "", None));
    }
    let sim = format!("{:.1} µs", v(w, "sim_cpu_us_per_command"));
    rows.push(row(s.key, "CPU per command, simulator", &sim, "", None));
    rows.push(row(
        s.key,
        "CPU per command, RabbitMQ + bench",
        &others(w),
        "",
        None,
    ));
    if !r.is_empty() {
        let text = others(r);
        rows.push(row(
            s.key,
            "CPU per command, RabbitMQ + bench (relay run)",
            &text,
            "",
            None,
        ));
    }
    rows
}

/// RabbitMQ's and the bench's CPU per command, and how many cores all processes kept busy.
fn others(n: &Numbers) -> String {
    let broker = n
        .get("broker_cpu_us_per_command")
        .copied()
        .unwrap_or(f64::NAN);
    let bench = v(n, "bench_cpu_us_per_command");
    let total = broker
        + bench
        + v(n, "cpu_us_per_command")
        + n.get("sim_cpu_us_per_command").copied().unwrap_or(0.0)
        + n.get("redis_cpu_us_per_command").copied().unwrap_or(0.0);
    let cores = total * v(n, "commands") / 1e6 / v(n, "elapsed_s");
    format!("{broker:.1} + {bench:.1} µs (all processes: {total:.0} µs, {cores:.2} cores busy)")
}

fn memory_rows(s: &Scenario, w: &Numbers, r: &Numbers) -> Vec<Row> {
    let (idle, peak) = (v(w, "idle_rss_mib"), v(w, "peak_rss_mib"));
    let mut rows = Vec::new();
    let idle_target = "≤ 15 MiB";
    rows.push(row(
        s.key,
        "idle RSS, worker",
        &format!("{idle:.1} MiB"),
        idle_target,
        Some(idle <= 15.0),
    ));
    // A worker that died before the end sample has no memory lines: no verdict then.
    let (target, met) = if s.prefetch == 256 && peak > 0.0 {
        ("≤ 40 MiB at prefetch 256", Some(peak <= 40.0))
    } else {
        ("", None)
    };
    rows.push(row(
        s.key,
        "peak RSS, worker",
        &format!("{peak:.1} MiB"),
        target,
        met,
    ));
    if s.key == 'c' {
        let per = v(w, "rss_kib_per_in_flight");
        let text = format!("{per:.2} KiB ((peak − idle) ÷ {})", s.prefetch);
        rows.push(row(
            s.key,
            "memory per in-flight command",
            &text,
            "≤ 16 KiB",
            Some(per <= 16.0),
        ));
    }
    if let (Some(sessions), Some(&per)) = (s.sessions, w.get("rss_kib_per_waiting")) {
        let waiting = s.n.min(usize::from(s.prefetch)).saturating_sub(sessions);
        let text = format!(
            "{per:.2} KiB ((peak − idle) ÷ {waiting}, the {sessions} calls in flight included)"
        );
        rows.push(row(
            s.key,
            "memory per waiting command",
            &text,
            "≤ 2 KiB",
            Some(per <= 2.0),
        ));
    }
    if let Some(peak) = w.get("peak_in_flight") {
        rows.push(row(
            s.key,
            "peak in flight (worker gauge)",
            &format!("{peak:.0}"),
            "",
            None,
        ));
    }
    if !r.is_empty() {
        let text = format!(
            "{:.1} / {:.1} MiB",
            v(r, "idle_rss_mib"),
            v(r, "peak_rss_mib")
        );
        rows.push(row(s.key, "idle / peak RSS, relay", &text, "", None));
    }
    rows
}

/// Prints the rows as an aligned table.
pub fn print_table(rows: &[Row]) {
    let header = ["", "metric", "value", "target", "met"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            [
                r.scenario.to_string(),
                r.metric.clone(),
                r.value.clone(),
                r.target.clone(),
                met.to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for line in &cells {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let print = |line: &[String]| {
        let text: Vec<String> = line
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    print(&header.map(str::to_owned));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("{}", rule.join("  "));
    let mut previous = None;
    for line in &cells {
        if previous.is_some() && previous != Some(&line[0]) {
            println!();
        }
        previous = Some(&line[0]);
        print(line);
    }
}

fn numbers_json(n: &Numbers) -> Value {
    Value::Object(n.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect())
}

fn measured_json(m: &Measured, numbers: &Numbers) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("metrics".into(), numbers_json(numbers));
    out.insert("events".into(), json!(m.events));
    out.insert("missing".into(), json!(m.missing));
    out.insert("duplicates".into(), json!(m.duplicates));
    out.insert("unexpected".into(), json!(m.unexpected));
    out.insert("foreign".into(), json!(m.foreign));
    out.insert("attemptsSum".into(), json!(m.attempts));
    out.insert("leftInCommandsQueue".into(), json!(m.left_in_queue));
    out.insert("stopped".into(), json!(m.stopped));
    out
}

fn worker_json(w: &WorkerRun, numbers: &Numbers) -> Value {
    let mut obj = measured_json(&w.measured, numbers);
    obj.insert("api".into(), w.api.clone());
    obj.insert("deadLettered".into(), json!(w.dead_lettered));
    obj.insert("cleanExit".into(), json!(w.clean_exit));
    obj.insert("logLines".into(), json!(w.log_lines));
    obj.insert("logExcerpt".into(), json!(w.log_excerpt));
    obj.insert("logPath".into(), json!(w.log_path));
    obj.insert("replicas".into(), json!(w.mode.replicas));
    obj.insert("partitions".into(), json!(w.mode.partition_count()));
    obj.insert("partitionsOwned".into(), json!(w.partitions_owned));
    obj.insert("routed".into(), json!(w.routed));
    if let Some(redis) = &w.redis {
        let m = &redis.metrics;
        obj.insert(
            "redis".into(),
            json!({
                "roundTrips": m.round_trips,
                "errors": m.errors,
                "roundTripSecondsSum": m.seconds_sum,
                "roundTripSecondsCount": m.seconds_count,
                "keysLeft": redis.keys_left,
            }),
        );
    }
    Value::Object(obj)
}

fn correctness_json(c: &Correctness) -> Value {
    json!({
        "ok": c.ok(),
        "commands": c.commands,
        "missing": c.missing,
        "duplicates": c.duplicates,
        "unexpected": c.unexpected,
        "apiCallMismatches": c.api_mismatches,
        "leftInCommandsQueue": c.left_in_queue,
        "stopped": c.stopped,
    })
}

/// The scenario as JSON: parameters, every run, medians, targets, correctness. Scenarios
/// (f), (g), (h) add the names of their two modes (`modes`), the second mode's runs
/// (`comparedRuns`, `median.compared`) and correctness by mode; their `runs` are the first
/// mode's.
pub fn scenario_json(result: &ScenarioResult) -> Value {
    let s = &result.scenario;
    let runs: Vec<Value> = result
        .workers
        .iter()
        .zip(result.worker_runs())
        .map(|(w, numbers)| worker_json(w, &numbers))
        .collect();
    let relays: Vec<Value> = result
        .relays
        .iter()
        .zip(result.relay_runs())
        .map(|(m, numbers)| Value::Object(measured_json(m, &numbers)))
        .collect();
    let floors: Vec<Value> = result
        .floors
        .iter()
        .zip(result.floor_runs())
        .map(|(m, numbers)| {
            let mut obj = measured_json(m, &numbers);
            obj.insert("apiCalls".into(), json!(m.api_calls));
            Value::Object(obj)
        })
        .collect();
    let c = result.correctness();
    let targets: Vec<Value> = result
        .rows()
        .iter()
        .filter(|r| r.met.is_some())
        .map(|r| json!({"metric": r.metric, "value": r.value, "target": r.target, "met": r.met}))
        .collect();
    let mut doc = json!({
        "scenario": s.key.to_string(),
        "title": s.title,
        "commands": s.n,
        "prefetch": s.prefetch,
        "latencyMs": s.latency_ms,
        "failRate": s.fail_rate,
        "runs": runs,
        "relayRuns": relays,
        "floorRuns": floors,
        "median": {
            "worker": numbers_json(&median(&result.worker_runs())),
            "relay": numbers_json(&median(&result.relay_runs())),
            "floor": numbers_json(&median(&result.floor_runs())),
            "ratios": numbers_json(&median(&result.ratio_runs())),
        },
        "targets": targets,
        "correctness": correctness_json(&c),
        "error": result.error,
    });
    if let Some(pair) = s.pair {
        let compared: Vec<Value> = result
            .compared
            .iter()
            .zip(result.compared_runs())
            .map(|(w, numbers)| worker_json(w, &numbers))
            .collect();
        let [first, second] = pair.labels;
        doc["modes"] = json!(pair.labels);
        doc["comparedRuns"] = json!(compared);
        doc["median"]["compared"] = numbers_json(&median(&result.compared_runs()));
        doc["correctnessByMode"] = json!({
            first: correctness_json(&workers_correctness(result.workers.iter())),
            second: correctness_json(&workers_correctness(result.compared.iter())),
        });
    }
    doc
}

/// Terminal events of all these runs, by name: "succeeded 20000, failed 3".
fn event_tally<'a>(runs: impl IntoIterator<Item = &'a WorkerRun>) -> String {
    tally(runs.into_iter().map(|run| &run.measured))
}

/// [`event_tally`] of runs of any process.
fn tally<'a>(runs: impl Iterator<Item = &'a Measured>) -> String {
    let mut events: BTreeMap<&str, u64> = BTreeMap::new();
    for run in runs {
        for (name, count) in &run.events {
            *events.entry(name.as_str()).or_default() += count;
        }
    }
    events
        .iter()
        .map(|(k, v)| format!("{} {v}", k.trim_start_matches("transfer.")))
        .collect::<Vec<_>>()
        .join(", ")
}
