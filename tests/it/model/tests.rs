//! The model checked at small bounds: today's protocol loses a command (the checker finds how),
//! the fixed one keeps every invariant, and the fixed one without one of its rules breaks.
//! Larger bounds: `cargo bench --bench handover`.

use std::time::Instant;

use stateright::{Checker, HasDiscoveries, Model};

// Benches compile this module too (with `cfg(test)`, without a harness, so without the tests
// themselves): what only the tests use is unused there.
#[allow(unused_imports)]
use super::state::Which;
#[allow(unused_imports)]
use super::{Action, Fleet, Handover, Rule, Variant, property};

/// Checks `model` breadth first until `wanted` is broken (or everything is explored); prints
/// what was explored and the counterexample, and returns its steps.
fn find(model: Handover, wanted: &'static str) -> Option<Vec<Action>> {
    let started = Instant::now();
    let checker = model
        .checker()
        .finish_when(HasDiscoveries::AnyOf([wanted].into()))
        .spawn_bfs()
        .join();
    println!(
        "{wanted:?}: {} states ({} unique), depth {}, {:.1?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    let actions = checker.discovery(wanted).map(|path| path.into_actions());
    if let Some(actions) = &actions {
        println!("counterexample in {} steps:", actions.len());
        for (i, a) in actions.iter().enumerate() {
            println!("  {:2}. {a:?}", i + 1);
        }
    }
    actions
}

/// Checks every reachable state of `model`: no invariant is ever broken, every command
/// ends, and a backlog can drain and its account queue be deleted, and change hands (the lanes
/// and the hand-over are exercised).
fn check_all(model: Handover) {
    let started = Instant::now();
    let checker = model.checker().spawn_bfs().join();
    println!(
        "{:?} {:?}, sigterm {} kill {} freeze {} rebalance {}: {} states ({} unique), depth {}, {:.1?}",
        checker.model().variant,
        checker.model().fleet,
        checker.model().sigterms,
        checker.model().kills,
        checker.model().freezes,
        checker.model().rebalances,
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    for name in property::SAFETY {
        checker.assert_no_discovery(name);
    }
    checker.assert_no_discovery(property::ALL_END);
    checker.assert_any_discovery(property::DRAINED);
    checker.assert_any_discovery(property::HANDED_OVER);
}

/// (a) Without Redis, a hot standby takes up the lane when it connects: it sees the account
/// queue's ready count 0 (the active replica's reader holds its messages unacked) and deletes
/// it; what the active one gives back later goes into nothing. (Its reader may also become the
/// account queue's active consumer and take commands the active replica then deletes.)
#[test]
fn today_loses_a_command_with_a_hot_standby() {
    let model = Handover::new(Variant::Today, Fleet::Standby);
    let trace = find(model.clone(), property::NOTHING_LOST).expect("a command lost");
    assert!(
        trace.contains(&Action::TakeUp(1)),
        "the standby takes up the lane"
    );
    let trace = find(model, property::RETURNED_TO_NOTHING).expect("a return to nothing");
    assert!(trace.contains(&Action::Delete(1)), "the standby deletes");
}

/// (b) A rolling update with Redis: the old holder gives the hold up once its grace ran out,
/// while its lane reader still holds deliveries; the new holder sees ready count 0 and deletes
/// the account queue; the old one's deliveries come back to nothing when it exits.
#[test]
fn today_loses_a_command_in_a_rolling_update() {
    let model = Handover::new(Variant::Today, Fleet::Holds);
    let trace = find(model.clone(), property::NOTHING_LOST).expect("a command lost");
    assert!(trace.contains(&Action::Delete(1)), "the new holder deletes");
    let trace = find(model, property::RETURNED_TO_NOTHING).expect("a return to nothing");
    assert!(
        trace.contains(&Action::GraceOut(0, Which::Own)),
        "the old holder's grace ran out"
    );
}

/// Two replicas, two commands of one session, one SIGTERM and one kill, and a freeze or a
/// rebalance: every interleaving keeps every invariant.
#[test]
fn fixed_keeps_every_invariant() {
    check_all(Handover::new(Variant::Fixed, Fleet::Standby).with_events(1, 1, 1, 0));
    check_all(Handover::new(Variant::Fixed, Fleet::Holds).with_events(1, 1, 1, 0));
    check_all(Handover::new(Variant::Fixed, Fleet::Holds).with_events(1, 1, 0, 1));
}

/// The old holder gives the source up before its lanes are closed (today's order): its lane
/// still runs a command of a session while the new holder runs the next one.
#[test]
fn fixed_without_closing_lanes_first_runs_a_session_twice_at_once() {
    for fleet in [Fleet::Standby, Fleet::Holds] {
        let model = Handover::new(Variant::Fixed, fleet).without(Rule::LanesCloseFirst);
        let trace = find(model, property::ONE_CALL).expect("two calls of a session at once");
        // The source is given up while its lane still runs.
        let given_up = trace
            .iter()
            .position(|a| *a == Action::CloseSource(0, Which::Own));
        let lane_closed = trace
            .iter()
            .position(|a| *a == Action::CloseLane(0, Which::Own));
        assert!(
            given_up.is_some() && (lane_closed.is_none() || lane_closed > given_up),
            "{trace:?}"
        );
    }
}

/// A standby that takes up its lane before it is the active consumer: its reader becomes the
/// account queue's consumer while the active replica still runs the source, and a command is
/// lost.
#[test]
fn fixed_without_the_standby_rule_loses_a_command() {
    let model = Handover::new(Variant::Fixed, Fleet::Standby)
        .without(Rule::StandbyTakesNoLane)
        .with_events(1, 1, 1, 0);
    find(model, property::NOTHING_LOST).expect("a command lost");
}

/// A rebalance that moves the source away and back: the old ownership's release gives the hold
/// of the new one up, another replica takes it, and two replicas hold the source.
#[test]
fn fixed_without_generations_loses_a_command() {
    let model = Handover::new(Variant::Fixed, Fleet::Holds)
        .without(Rule::Generation)
        .with_events(1, 1, 0, 1);
    let trace = find(model, property::NOTHING_LOST).expect("a command lost");
    assert!(trace.contains(&Action::Rebalance(0)));
}

/// A stopping reader rejects what it received but did not take, ahead of what it took and
/// gives back later: the next holder runs a session backwards.
#[test]
fn fixed_rejecting_before_closing_reorders_a_session() {
    let model = Handover::new(Variant::Fixed, Fleet::Holds)
        .without(Rule::ReturnInOrder)
        .with_events(1, 1, 0, 1);
    find(model, property::ORDER).expect("a session out of order");
}

/// A frozen holder whose connection outlives its hold: the new holder takes commands in while
/// the frozen one's deliveries come back to the account queue behind them.
#[test]
fn fixed_without_the_freeze_assumption_reorders_a_session() {
    let model = Handover::new(Variant::Fixed, Fleet::Holds)
        .without(Rule::ConnectionDiesBeforeExpiry)
        .with_events(1, 1, 1, 0);
    let trace = find(model, property::ORDER).expect("a session out of order");
    assert!(trace.contains(&Action::HoldExpires));
}

/// A holder that lists its account queue only after it set commands aside there (or never):
/// killed in between, it leaves a queue no list names, and the next holder never takes up the
/// commands waiting there.
#[test]
fn fixed_without_listing_first_strands_a_command() {
    let model = Handover::new(Variant::Fixed, Fleet::Holds)
        .without(Rule::ListFirst)
        .with_events(1, 1, 0, 0);
    let trace = find(model.clone(), property::LISTED).expect("a queue not listed");
    assert!(!trace.contains(&Action::List(0)), "published before listed");
    let trace = find(model, property::ALL_END).expect("a command that never ends");
    let killed = trace.iter().position(|a| *a == Action::Kill(0));
    let taken_up = trace.iter().position(|a| *a == Action::TakeUp(1));
    assert!(
        killed.is_some() && killed < taken_up && !trace.contains(&Action::List(0)),
        "the holder died unlisted, and the next one took the source up"
    );
}

/// A command taken in is set aside later, at its turn, with its session's commands waiting
/// behind it; and a replica remembers what it took in after a lost connection sent the
/// delivery back. Before the rule that only a delivery's own tenure sets it aside, and only
/// with what that tenure took in: the command remembered from before a reconnect comes to its
/// turn and its lanes, let go with the connection, sweep the redelivered copy and its session
/// away, unacked on the new, open channel: they never end.
#[test]
fn fixed_without_deferring_by_its_own_tenure_strands_a_command() {
    let model = Handover::new(Variant::Fixed, Fleet::Standby)
        .with_deferral()
        .without(Rule::DeferOwnTenure)
        .with_events(0, 0, 1, 0);
    let trace = find(model, property::ALL_END).expect("a command that never ends");
    let reconnect = trace.iter().position(|a| *a == Action::Reconnect(0));
    let swept = trace
        .iter()
        .position(|a| matches!(a, Action::Defer { ghost: true, .. }));
    assert!(
        reconnect.is_some() && swept > reconnect,
        "a command remembered from before the reconnect is set aside after it: {trace:?}"
    );
}

/// And a command still on its channel, at its turn when SIGTERM has let its lanes go, let go
/// alone: the next of its session is called here, and the first, back in the source when the
/// channel closes, after it.
#[test]
fn fixed_without_deferring_by_its_own_tenure_reorders_a_session_at_sigterm() {
    let model = Handover::new(Variant::Fixed, Fleet::Standby)
        .with_deferral()
        .without(Rule::DeferOwnTenure)
        .with_events(1, 0, 0, 0);
    let trace = find(model, property::ORDER).expect("a session out of order");
    assert!(
        trace.contains(&Action::Sigterm(0))
            && trace
                .iter()
                .any(|a| matches!(a, Action::LetGo { ghost: false, .. })),
        "{trace:?}"
    );
}

/// The same, and with SIGTERM, a kill, a freeze or a rebalance: with the rule, every
/// interleaving keeps every invariant.
#[test]
fn fixed_with_deferral_keeps_every_invariant() {
    check_all(
        Handover::new(Variant::Fixed, Fleet::Standby)
            .with_deferral()
            .with_events(1, 1, 1, 0),
    );
    check_all(
        Handover::new(Variant::Fixed, Fleet::Holds)
            .with_deferral()
            .with_events(1, 1, 1, 0),
    );
    check_all(
        Handover::new(Variant::Fixed, Fleet::Holds)
            .with_deferral()
            .with_events(1, 1, 0, 1),
    );
}
