//! What the caller of [`super::transfer::Transfers::execute`] hands it besides the command:
//! how the execution begins (the command's first start, which the caller asks its account's
//! budget for) and whether the command is still this replica's to call.

use std::time::Instant;

use crate::fairness::start::FirstStart;

/// Whether the command being executed is still this replica's: asked right before each call
/// leaves (the pipeline answers from its delivery's channel and the fleet's holds).
pub type Ours<'a> = dyn Fn() -> bool + Send + Sync + 'a;

/// How an execution begins.
#[derive(Debug)]
pub struct Begun {
    /// When the command began to wait for its first start: its `durationMs` counts from here.
    pub at: Instant,
    /// What became of that first start.
    pub first: First,
}

/// The first start of an execution, as its caller left it.
#[derive(Debug)]
pub enum First {
    /// Waited for: the first call may leave now.
    Taken,
    /// The deadline comes before any start the budget could give: it expires uncalled.
    DeadlineFirst,
    /// Not asked yet (the API host was down): the execution asks for it like any later start,
    /// with the start booked along with the fleet claim, if one was (given back if unused).
    Ask(Option<FirstStart>),
}

impl Begun {
    /// Begins now, asking for the first start like any later one: a command run outside any
    /// queue, as the unit tests run one.
    #[cfg(test)]
    pub fn now() -> Self {
        Self {
            at: Instant::now(),
            first: First::Ask(None),
        }
    }
}
