//! Turning runs into numbers: per-run metrics, medians over runs, the terminal table with
//! its target column, and the JSON file.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::run::{Measured, Scenario, WorkerRun};

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
    /// The worker's runs.
    pub workers: Vec<WorkerRun>,
    /// The relay's runs (scenario (a) only).
    pub relays: Vec<Measured>,
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
    out.insert("bench_cpu_us_per_command", per_command(m.bench_cpu_s));
    out.insert("idle_rss_mib", m.idle.rss_kib as f64 / 1024.0);
    out.insert("idle_rss_anon_mib", m.idle.anon_kib as f64 / 1024.0);
    out.insert("end_rss_mib", m.end.rss_kib as f64 / 1024.0);
    out.insert("peak_rss_mib", m.end.hwm_kib as f64 / 1024.0);
    if let Some(peak) = m.peak_in_flight {
        out.insert("peak_in_flight", peak);
    }
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
    let in_flight = m.n.min(usize::from(scenario.prefetch)).max(1) as f64;
    let growth_kib = m.end.hwm_kib.saturating_sub(m.idle.rss_kib) as f64;
    out.insert("rss_kib_per_in_flight", growth_kib / in_flight);
    out
}

/// Ratios of one run: to the relay in (a), to prefetch ÷ latency otherwise.
fn ratios(scenario: &Scenario, worker: &Numbers, relay: Option<&Numbers>) -> Numbers {
    let mut out = Numbers::new();
    if let Some(relay) = relay {
        out.insert(
            "throughput_vs_relay",
            v(worker, "throughput_per_s") / v(relay, "throughput_per_s"),
        );
        out.insert(
            "cpu_vs_relay",
            v(worker, "cpu_us_per_command") / v(relay, "cpu_us_per_command"),
        );
    }
    if scenario.latency_ms > 0 {
        let ceiling = f64::from(scenario.prefetch) * 1000.0 / scenario.latency_ms as f64;
        out.insert("ceiling_per_s", ceiling);
        out.insert(
            "throughput_vs_ceiling",
            v(worker, "throughput_per_s") / ceiling,
        );
        // All slots start together, so commands run in rounds of `prefetch`: even a perfect
        // worker needs ceil(N / prefetch) latencies, a partial last round included.
        let rounds = (v(worker, "commands") / f64::from(scenario.prefetch)).ceil();
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

    fn relay_runs(&self) -> Vec<Numbers> {
        self.relays.iter().map(measured_numbers).collect()
    }

    fn ratio_runs(&self) -> Vec<Numbers> {
        let relays = self.relay_runs();
        self.worker_runs()
            .iter()
            .enumerate()
            .map(|(i, w)| ratios(&self.scenario, w, relays.get(i)))
            .collect()
    }

    /// Correctness over every run, worker and relay.
    pub fn correctness(&self) -> Correctness {
        let mut c = Correctness::default();
        for w in &self.workers {
            c.add(&w.measured);
            if w.api["calls"].as_u64() != Some(w.measured.attempts) {
                c.api_mismatches += 1;
            }
        }
        for r in &self.relays {
            c.add(r);
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
        if self.workers.is_empty() {
            return rows;
        }
        let w = median(&self.worker_runs());
        let r = median(&self.relay_runs());
        let x = median(&self.ratio_runs());
        rows.extend(throughput_rows(s, &w, &r, &x));
        rows.extend(latency_rows(s, &w, &r));
        rows.extend(cpu_rows(s, &w, &r, &x));
        rows.extend(memory_rows(s, &w, &r));
        rows.extend(self.outcome_rows(&w));
        rows
    }

    fn outcome_rows(&self, w: &Numbers) -> Vec<Row> {
        let s = &self.scenario;
        let c = self.correctness();
        let mut events: BTreeMap<&str, u64> = BTreeMap::new();
        for run in &self.workers {
            for (name, count) in &run.measured.events {
                *events.entry(name.as_str()).or_default() += count;
            }
        }
        let events = events
            .iter()
            .map(|(k, v)| format!("{} {v}", k.trim_start_matches("transfer.")))
            .collect::<Vec<_>>()
            .join(", ");
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
        let perfect = if s.n > usize::from(s.prefetch) {
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

fn latency_text(n: &Numbers) -> String {
    format!(
        "{:.1} / {:.1} / {:.1} / {:.1} ms",
        v(n, "latency_p50_ms"),
        v(n, "latency_p90_ms"),
        v(n, "latency_p99_ms"),
        v(n, "latency_max_ms")
    )
}

fn latency_rows(s: &Scenario, w: &Numbers, r: &Numbers) -> Vec<Row> {
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
        + n.get("sim_cpu_us_per_command").copied().unwrap_or(0.0);
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

/// The scenario as JSON: parameters, every run, medians, targets, correctness.
pub fn scenario_json(result: &ScenarioResult) -> Value {
    let s = &result.scenario;
    let runs: Vec<Value> = result
        .workers
        .iter()
        .zip(result.worker_runs())
        .map(|(w, numbers)| {
            let mut obj = measured_json(&w.measured, &numbers);
            obj.insert("api".into(), w.api.clone());
            obj.insert("deadLettered".into(), json!(w.dead_lettered));
            obj.insert("cleanExit".into(), json!(w.clean_exit));
            obj.insert("logLines".into(), json!(w.log_lines));
            obj.insert("logExcerpt".into(), json!(w.log_excerpt));
            obj.insert("logPath".into(), json!(w.log_path));
            Value::Object(obj)
        })
        .collect();
    let relays: Vec<Value> = result
        .relays
        .iter()
        .zip(result.relay_runs())
        .map(|(m, numbers)| Value::Object(measured_json(m, &numbers)))
        .collect();
    let c = result.correctness();
    let targets: Vec<Value> = result
        .rows()
        .iter()
        .filter(|r| r.met.is_some())
        .map(|r| json!({"metric": r.metric, "value": r.value, "target": r.target, "met": r.met}))
        .collect();
    json!({
        "scenario": s.key.to_string(),
        "title": s.title,
        "commands": s.n,
        "prefetch": s.prefetch,
        "latencyMs": s.latency_ms,
        "failRate": s.fail_rate,
        "runs": runs,
        "relayRuns": relays,
        "median": {
            "worker": numbers_json(&median(&result.worker_runs())),
            "relay": numbers_json(&median(&result.relay_runs())),
            "ratios": numbers_json(&median(&result.ratio_runs())),
        },
        "targets": targets,
        "correctness": {
            "ok": c.ok(),
            "commands": c.commands,
            "missing": c.missing,
            "duplicates": c.duplicates,
            "unexpected": c.unexpected,
            "apiCallMismatches": c.api_mismatches,
            "leftInCommandsQueue": c.left_in_queue,
            "stopped": c.stopped,
        },
        "error": result.error,
    })
}
