//! Tooling beside the worker, not part of it: a stand-in AgentAssist API ([`simulator`]),
//! and the `demo`, `publish` and `dead-letters` ([`dead_letters`]) commands of the command
//! line.

pub mod dead_letters;
pub mod demo;
pub mod publish;
pub mod simulator;
