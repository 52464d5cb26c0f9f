//! The properties checked in every reachable state.

use stateright::Property;

use super::state::{From, Life, Msg, Stage, State};
use super::{Handover, property};

pub fn all() -> Vec<Property<Handover>> {
    vec![
        Property::always(property::NOTHING_LOST, nothing_lost),
        Property::always(property::ONE_CALL, one_call_per_session),
        Property::always(property::ORDER, |_, s: &State| !s.out_of_order),
        Property::always(property::ONE_HOLDER, |m: &Handover, s: &State| {
            m.holders(s) <= 1
        }),
        Property::always(property::LISTED, listed),
        Property::eventually(property::ALL_END, all_end),
        Property::sometimes(property::RETURNED_TO_NOTHING, |_, s: &State| {
            s.returned_to_nothing
        }),
        Property::sometimes(property::DRAINED, drained),
        Property::sometimes(property::HANDED_OVER, |_, s: &State| {
            s.deliveries.iter().any(|d| {
                d.replica != 0 && matches!(d.from, From::Account(_)) && d.stage == Stage::Calling
            })
        }),
    ]
}

/// (1) Every command acked on its source is ready or returned in a queue, unacked on an open
/// channel, or ended.
fn nothing_lost(m: &Handover, s: &State) -> bool {
    (0..m.commands()).all(|c| {
        !s.is(s.acked, c)
            || s.is(s.ended, c)
            || s.source.holds(c)
            || (s.account.exists && s.account.holds(c))
            || s.deliveries.iter().any(|d| d.msg == Msg::Command(c))
    })
}

/// (5) With a list (the fixed protocol), an account queue that holds a command is in it: a new
/// holder finds it.
fn listed(m: &Handover, s: &State) -> bool {
    m.today() || s.listed || !s.account.exists || !(0..m.commands()).any(|c| s.account.holds(c))
}

/// (2) At most one call of a session on the wire at once.
fn one_call_per_session(m: &Handover, s: &State) -> bool {
    let calling = |session: u8| {
        s.deliveries
            .iter()
            .filter(|d| {
                d.stage == Stage::Calling
                    && d.command()
                        .is_some_and(|c| m.sessions[usize::from(c)] == session)
            })
            .count()
    };
    m.sessions.iter().all(|&session| calling(session) <= 1)
}

/// Every command ended, or the fleet is gone.
fn all_end(m: &Handover, s: &State) -> bool {
    (0..m.commands()).all(|c| s.is(s.ended, c)) || s.replicas.iter().all(|r| r.life == Life::Gone)
}

/// Every command ended, one or more through the account queue, and the account queue is gone:
/// the model does exercise lanes and their retirement.
fn drained(m: &Handover, s: &State) -> bool {
    (0..m.commands()).all(|c| s.is(s.ended, c)) && s.account.incarnation > 0 && !s.account.exists
}
