//! What happens to one command: read at the edge, ordered by session, answered from memory
//! when already completed, carried out, and turned into its event.

pub mod command;
pub mod event;
pub mod outcomes;
pub mod sessions;
