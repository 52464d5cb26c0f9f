//! The hand-over model (tests/it/model) checked at larger bounds than `cargo test` affords, in
//! release mode: today's protocol and how it loses a command, the fixed protocol over every
//! interleaving, and the fixed protocol without each of its rules.
//!
//! `cargo bench --bench handover` runs every part; `cargo bench --bench handover -- today`
//! (or `fixed`, `rules`) one of them. `HANDOVER_THREADS` sets the checker's threads (1);
//! `HANDOVER_RULE=Marker` (say) checks only that rule's absence, `HANDOVER_TRACES=1` prints the
//! counterexamples, `HANDOVER_LARGE=1` checks the fixed protocol at larger bounds (minutes, and
//! gigabytes of memory).

#[path = "../tests/it/model/mod.rs"]
mod model;

use std::time::{Duration, Instant};

use model::{Fleet, Handover, Rule, Variant};
use stateright::{Checker, HasDiscoveries, Model};

fn threads() -> usize {
    std::env::var("HANDOVER_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1)
}

fn main() {
    let parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |part: &str| parts.is_empty() || parts.iter().any(|p| p == part);
    if wants("today") {
        today();
    }
    if wants("fixed") {
        fixed();
    }
    if wants("rules") {
        rules();
    }
}

fn describe(m: &Handover) -> String {
    format!(
        "{:?} {:?}{}{}: {} replicas ({} running), sessions {:?}, prefetch {}, sigterm {} kill {} freeze {} rebalance {}",
        m.variant,
        m.fleet,
        m.without
            .map(|r| format!(" without {r:?}"))
            .unwrap_or_default(),
        if m.deferral { ", deferral" } else { "" },
        m.replicas,
        m.running,
        m.sessions,
        m.prefetch,
        m.sigterms,
        m.kills,
        m.freezes,
        m.rebalances,
    )
}

/// What a check explored, and what it found.
struct Run {
    states: usize,
    unique: usize,
    depth: usize,
    took: Duration,
    /// Properties that must not be broken and are.
    failures: Vec<&'static str>,
}

fn run(model: Handover, until: HasDiscoveries, cap: Option<usize>) -> Run {
    let failing: Vec<&'static str> = model
        .properties()
        .iter()
        .filter(|p| p.expectation.discovery_is_failure())
        .map(|p| p.name)
        .collect();
    let started = Instant::now();
    let mut builder = model.checker().threads(threads()).finish_when(until);
    if let Some(cap) = cap {
        builder = builder.target_state_count(cap);
    }
    let checker = builder.spawn_bfs().join();
    let took = started.elapsed();
    let discoveries = checker.discoveries();
    let mut failures: Vec<&'static str> = failing
        .into_iter()
        .filter(|name| discoveries.contains_key(name))
        .collect();
    failures.sort();
    Run {
        states: checker.state_count(),
        unique: checker.unique_state_count(),
        depth: checker.max_depth(),
        took,
        failures,
    }
}

/// A short counterexample of `property` (breadth first, stopping at the first block of states
/// that breaks it: the shortest, give or take a level).
fn counterexample(model: Handover, property: &'static str) -> Option<Vec<String>> {
    let checker = model
        .checker()
        .threads(threads())
        .finish_when(HasDiscoveries::AnyOf([property].into()))
        .target_state_count(RULE_STATES)
        .spawn_bfs()
        .join();
    let path = checker.discovery(property)?;
    Some(
        path.into_actions()
            .iter()
            .map(|a| format!("{a:?}"))
            .collect(),
    )
}

fn report(run: &Run) -> String {
    format!(
        "{} states ({} unique), depth {}, {:.2?}",
        run.states, run.unique, run.depth, run.took
    )
}

/// Today's protocol, with a hot standby and in a rolling update: every invariant it breaks,
/// and the shortest trace to each.
fn today() {
    println!("## today: the invariants broken");
    for fleet in [Fleet::Standby, Fleet::Holds] {
        for model in [
            Handover::new(Variant::Today, fleet),
            Handover::new(Variant::Today, fleet)
                .replicas(3, 1)
                .sessions(&[0, 0, 1]),
        ] {
            let found = run(
                model.clone(),
                HasDiscoveries::AllFailures,
                Some(RULE_STATES),
            );
            print_failures(&model, &found);
        }
    }
}

/// The bounds the fixed protocol is checked at, smallest first.
fn fixed_bounds() -> Vec<Handover> {
    let standby = |n, sessions: &[u8], k, f| {
        Handover::new(Variant::Fixed, Fleet::Standby)
            .replicas(n, 1)
            .sessions(sessions)
            .with_events(1, k, f, 0)
    };
    let holds = |n, sessions: &[u8], k, f, r| {
        Handover::new(Variant::Fixed, Fleet::Holds)
            .replicas(n, 1)
            .sessions(sessions)
            .with_events(1, k, f, r)
    };
    if std::env::var_os("HANDOVER_LARGE").is_some() {
        return vec![
            standby(2, &[0, 0, 1, 1], 1, 1),
            standby(3, &[0, 0, 1], 1, 1),
            holds(2, &[0, 0, 1, 1], 1, 1, 0),
            holds(3, &[0, 0, 1], 1, 1, 0),
        ];
    }
    vec![
        standby(2, &[0, 0], 1, 1),
        standby(2, &[0, 0, 1], 1, 1),
        standby(3, &[0, 0], 1, 1),
        standby(3, &[0, 0, 1], 1, 0),
        holds(2, &[0, 0], 1, 1, 1),
        holds(2, &[0, 0, 1], 1, 1, 0),
        holds(3, &[0, 0], 1, 1, 0),
        // Commands set aside after they were taken in, and remembered past a reconnect.
        standby(2, &[0, 0, 1], 1, 1).with_deferral(),
        holds(2, &[0, 0], 1, 1, 1).with_deferral(),
        holds(2, &[0, 0, 1], 1, 1, 0).with_deferral(),
    ]
}

/// The fixed protocol over every interleaving: no counterexample at any bound.
fn fixed() {
    println!("## fixed: every reachable state");
    for model in fixed_bounds() {
        let line = describe(&model);
        let run = run(model, HasDiscoveries::AllFailures, None);
        let verdict = if run.failures.is_empty() {
            "every invariant holds".to_owned()
        } else {
            format!("COUNTEREXAMPLES: {:?}", run.failures)
        };
        println!("{line}\n  {verdict}; {}", report(&run));
    }
}

/// Where a rule's absence is checked: the fleets and events it is about.
fn rule_bounds(rule: Rule) -> Vec<Handover> {
    let at = |fleet, sigterms, kills, freezes, rebalances| {
        Handover::new(Variant::Fixed, fleet)
            .without(rule)
            .with_events(sigterms, kills, freezes, rebalances)
    };
    match rule {
        Rule::StandbyTakesNoLane => vec![at(Fleet::Standby, 1, 1, 1, 0)],
        // The two hand-overs of today's bugs: a hot standby's, a rolling update's.
        Rule::LanesCloseFirst => vec![at(Fleet::Standby, 1, 0, 0, 0), at(Fleet::Holds, 1, 0, 0, 0)],
        Rule::ReturnInOrder | Rule::Marker | Rule::ConsumerCount | Rule::HolderDeletes => vec![
            at(Fleet::Standby, 1, 1, 1, 0),
            at(Fleet::Holds, 1, 1, 1, 0),
            at(Fleet::Holds, 1, 1, 0, 1),
        ],
        Rule::Generation => vec![at(Fleet::Holds, 1, 1, 0, 1)],
        Rule::ListFirst => vec![at(Fleet::Standby, 1, 1, 0, 0), at(Fleet::Holds, 1, 1, 0, 0)],
        Rule::WokenActsOnNothing | Rule::ConnectionDiesBeforeExpiry => {
            vec![at(Fleet::Holds, 1, 1, 1, 0), at(Fleet::Holds, 1, 0, 1, 1)]
        }
        Rule::DeferOwnTenure => vec![
            at(Fleet::Standby, 1, 1, 1, 0).with_deferral(),
            at(Fleet::Holds, 1, 1, 1, 0).with_deferral(),
            at(Fleet::Holds, 1, 1, 0, 1).with_deferral(),
        ],
    }
}

/// States a check of a rule's absence explores at most (a broken protocol reaches many more
/// states than the fixed one).
const RULE_STATES: usize = 20_000_000;

/// The fixed protocol without one rule: every invariant that breaks, and the shortest trace
/// that breaks it.
fn rules() {
    println!("## fixed without one rule: the invariants broken");
    let only = std::env::var("HANDOVER_RULE").ok();
    for rule in Rule::ALL {
        if only.as_ref().is_some_and(|o| *o != format!("{rule:?}")) {
            continue;
        }
        for model in rule_bounds(rule) {
            let found = run(
                model.clone(),
                HasDiscoveries::AllFailures,
                Some(RULE_STATES),
            );
            print_failures(&model, &found);
        }
    }
}

/// Prints what a check found, and a short counterexample of each property it broke.
fn print_failures(model: &Handover, run: &Run) {
    let partial = if run.states >= RULE_STATES {
        " (stopped at the cap: not every state explored)"
    } else {
        ""
    };
    println!("{}\n  {}{partial}", describe(model), report(run));
    if run.failures.is_empty() {
        println!("  nothing breaks at these bounds");
    }
    let traces = std::env::var_os("HANDOVER_TRACES").is_some();
    for &property in &run.failures {
        match counterexample(model.clone(), property) {
            Some(steps) => {
                println!("  {property:?} broken in {} steps", steps.len());
                if traces {
                    for (i, step) in steps.iter().enumerate() {
                        println!("    {:2}. {step}", i + 1);
                    }
                }
            }
            None => println!("  {property:?} broken"),
        }
    }
}
