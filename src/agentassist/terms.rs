//! What the caller of [`super::transfer::Transfers::execute`] sets on one execution: whether
//! it may end set aside, and whether the command is still this replica's to call.

use std::time::Duration;

/// Whether the command being executed is still this replica's: asked right before each call
/// leaves (the pipeline answers from its delivery's channel).
pub type Ours<'a> = dyn Fn() -> bool + Send + Sync + 'a;

/// What the caller of [`super::transfer::Transfers::execute`] sets on one execution.
#[derive(Clone, Copy)]
pub struct Terms<'a> {
    /// A first start further away than this ends the execution as [`super::outcome::Unfinished::Aside`].
    pub aside: Option<Duration>,
    /// Whether the command is still this replica's.
    pub ours: &'a Ours<'a>,
}

impl Terms<'_> {
    /// Never set aside, always this replica's: a command run outside any queue.
    pub const PLAIN: Terms<'static> = Terms {
        aside: None,
        ours: &|| true,
    };
}
